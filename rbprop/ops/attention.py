"""Scaled dot-product attention as one primitive.

For ``Q`` (..., L, E), ``K`` (..., S, E) and ``V`` (..., S, Ev)::

    scores = scale * Q K^T (+ mask),   P = softmax(scores),   O = P_d V

with ``P_d = P * M / (1 - p)`` under attention dropout (mask ``M``), else ``P``.
The exact VJP, for a cotangent ``dO``::

    dV = P_d^T dO
    dP = (dO V^T) * M / (1 - p)
    dS = P * (dP - rowsum(dP * P)) * scale
    dQ = dS K,   dK = dS^T Q

and ``rowsum(dP * P) = rowsum(dO * O)``, which lets a sampled VJP form ``dS``
on a subset of the key columns without the others. The softmax and its VJP
on whole rows are the fused kernels of :mod:`rbprop.kernels.softmax`.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..kernels.softmax import softmax, softmax_backward
from ..primitive import Primitive, ShapeError, sum_to
from ..tensor import Tensor, as_tensor, record
from .dropout import check_probability, keep_mask


def _swap(array):
    return array_module(array).swapaxes(array, -1, -2)


def _masked_softmax(scores, may_mask_whole_rows: bool):
    """Softmax over the last axis; a row whose entries are all ``-inf`` gives zeros.

    Only a mask can make a whole row ``-inf`` (where softmax is 0 / 0), so the
    rows are checked only when ``may_mask_whole_rows``; such rows are replaced
    by zeros before the softmax and their probabilities zeroed after it.
    """
    if may_mask_whole_rows:
        xp = array_module(scores)
        empty = xp.all(scores == -np.inf, axis=-1)
        if bool(empty.any()):
            probs = softmax(xp.where(empty[..., None], 0, scores))
            probs[empty] = 0
            return probs
    return softmax(scores)


def _softmax_vjp(probs, d_probs):
    """``P * (dP - rowsum(dP * P))``: fused when the two have one shape (no broadcasting)."""
    if probs.shape == d_probs.shape:
        return softmax_backward(probs, d_probs)
    return probs * (d_probs - (d_probs * probs).sum(axis=-1, keepdims=True))


def _squared_norms_along(array, axis):
    """Sum of squares over every axis but ``axis`` (float64), one value per index."""
    moved = array_module(array).moveaxis(array, axis, 0)
    flat = moved.reshape(moved.shape[0], -1).astype(np.float64)
    return (flat * flat).sum(axis=1)


class ScaledDotProductAttention(Primitive):
    """``softmax(scale * Q K^T + mask) V``; saves Q, K, V and the probabilities ``P``.

    Placements of the sketch:

    * ``"cotangent"`` (default): on the ``L`` query rows of ``dO``. Rows of
      ``dP``, ``dS`` and ``dQ`` depend only on the same row of ``dO``, so only
      the kept rows are formed: ``dQ[kept] = dS[kept] K``,
      ``dV = P_d[kept]^T dO[kept]`` and ``dK = dS[kept]^T Q[kept]``; all four
      GEMMs shrink by ``k / L``. Drawn in the forward pass, the op saves only
      ``P[kept]`` and ``Q[kept]`` (with ``K`` and ``V``).
    * ``"contracted"``: on the ``S`` key/value rows, the axis that ``O = P V``
      and ``dQ = dS K`` contract. The exact VJP is a sum of one contribution
      per key ``j`` (row ``j`` of ``dV`` and ``dK``, the term ``dS[:, j] K_j``
      of ``dQ``), and ``dS[:, j]`` needs only column ``j`` of ``dP`` and
      ``rowsum(dO * O)``, so the kept keys' contributions are computed exactly
      and scaled; all four GEMMs shrink by ``k / S``. Drawn in the forward
      pass, the op saves ``P[:, kept]``, ``K[kept]``, ``V[kept]``, ``Q`` and the
      output ``O`` (which the ``rowsum`` needs).

    The query-row placement is the default: it saves less (no ``O``), and in
    measurements on random inputs its gradient variance was equal or lower
    (``dQ``'s clearly lower when attention is peaked, where dropping keys
    misses the few that matter) at slightly lower cost.

    One sketch serves every batch and head index. A projection (rank-k)
    sketch has no kept rows: it is applied densely (to ``dO``'s query rows, or
    as ``dV = S P^T dO``, ``dK = S dS^T Q``, ``dQ = dS S K`` on the key axis) and
    the full-size products run; the FLOPs say so.

    Importance weights: query rows use ``a_i = ||dO_i||`` (no cheap ``||J_i||``);
    key rows use ``a_j = sqrt(sum_i P_d,ij^2 ||dO_i||^2)``, the Cauchy-Schwarz
    bound of ``||dV_j||`` (``O(L S)``, no GEMM).

    Gradients do not flow into ``attn_mask``. A query row that the mask
    excludes entirely gets zero probabilities (and output), where PyTorch's
    reference implementation gives NaN.
    """

    name = "scaled_dot_product_attention"
    default_placement = "cotangent"

    def forward(self, query, key, value):
        self._check(query, key, value)
        xp = array_module(query, key, value)
        scale = self.params["scale"]
        self.scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)

        scores = (query @ _swap(key)) * query.dtype.type(self.scale)
        scores = self._apply_mask(scores)
        # A causal mask leaves every query row at least its first key.
        user_mask = self.params["attn_mask"] is not None
        probs = _masked_softmax(scores, user_mask).astype(query.dtype, copy=False)
        keep = None
        dropout_p = self.params["dropout_p"]
        if dropout_p > 0:
            keep = keep_mask(probs.shape, dropout_p, self.params["generator"], probs)
        output = self._dropped(probs, keep) @ value

        self.placement = self.placement or self.default_placement
        if self.placement not in ("contracted", "cotangent"):
            raise ValueError(f"{self.name}: unknown placement {self.placement!r}")
        if self.recording:
            self._save_for_backward(query, key, value, probs, keep, output)
        return xp.ascontiguousarray(output)

    def _check(self, query, key, value):
        name = self.name
        for label, array in (("query", query), ("key", key), ("value", value)):
            if array.ndim < 2:
                raise ShapeError(
                    f"{name}: {label} must be (..., tokens, features), got {array.shape}"
                )
        if query.shape[-1] != key.shape[-1]:
            raise ShapeError(
                f"{name}: query of shape {query.shape} and key of shape {key.shape} differ in "
                "the feature axis"
            )
        if key.shape[-2] != value.shape[-2]:
            raise ShapeError(
                f"{name}: key of shape {key.shape} and value of shape {value.shape} differ in "
                "the token axis"
            )
        try:
            np.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        except ValueError:
            raise ShapeError(
                f"{name}: batch shapes of query {query.shape}, key {key.shape} and value "
                f"{value.shape} cannot be broadcast"
            ) from None

    def _apply_mask(self, scores):
        xp = array_module(scores)
        mask = self.params["attn_mask"]
        length, source = scores.shape[-2:]
        if self.params["is_causal"]:
            mask = xp.tril(xp.ones((length, source), dtype=bool))
        if mask is None:
            return scores
        try:
            np.broadcast_shapes(mask.shape, scores.shape)
        except ValueError:
            raise ShapeError(
                f"{self.name}: attn_mask of shape {mask.shape} does not broadcast to the "
                f"attention scores of shape {scores.shape}"
            ) from None
        if mask.dtype == bool:
            return xp.where(mask, scores, -np.inf)  # True means "take part"
        return scores + mask.astype(scores.dtype, copy=False)

    def _dropped(self, probs, keep):
        """``P_d = P * M / (1 - p)`` (or ``P`` without dropout)."""
        if keep is None:
            return probs
        dropout_p = self.params["dropout_p"]
        scale = 0.0 if dropout_p == 1.0 else 1.0 / (1.0 - dropout_p)
        return probs * keep * probs.dtype.type(scale)

    def _save_for_backward(self, query, key, value, probs, keep, output):
        needs_query, needs_key, _ = self.needs_input_grad
        needs_scores = needs_query or needs_key
        saved = {
            "query": query if needs_key else None,
            "key": key if needs_query else None,
            "value": value if needs_scores else None,
            "probs": probs,
            "keep": keep,
            "output": None,
        }
        if self.sketch is not None and self.placement == "contracted" and needs_scores:
            saved["output"] = output  # rowsum(dO * O) replaces rowsum(dP * P)
        if self.wants_forward_sample():
            row_axis = -2 if self.placement == "cotangent" else -1
            size = probs.shape[row_axis]
            self.sample = self.draw_sample(size)
            if self.sample.is_diagonal:
                saved = self._restrict(saved, self.sample.indices, self.placement)
        self.save(**saved)

    @staticmethod
    def _restrict(arrays, indices, placement):
        """The kept query rows (``"cotangent"``) or key rows (``"contracted"``) of each array."""
        if placement == "cotangent":
            axes = {"query": -2, "probs": -2, "keep": -2}
        else:
            axes = {"key": -2, "value": -2, "probs": -1, "keep": -1}
        restricted = dict(arrays)
        for name, axis in axes.items():
            array = arrays[name]
            if array is not None:
                xp = array_module(array)
                restricted[name] = xp.take(array, xp.asarray(indices), axis=axis)
        return restricted

    def _saved(self):
        names = ("query", "key", "value", "probs", "keep", "output")
        return {name: getattr(self, name) for name in names}

    # -- the shared core ---------------------------------------------------------

    def _core(self, d_out, arrays, delta=None, key_scales=None):
        """``(dQ, dK, dV)`` before batch reduction, from (possibly restricted) arrays.

        ``delta`` is ``rowsum(dP * P)`` when given (else formed from ``dP``);
        ``key_scales`` multiplies each key column's contribution (a sketch's
        ``1/p_j``).
        """
        xp = array_module(d_out)
        needs_query, needs_key, needs_value = self.needs_input_grad
        probs, keep = arrays["probs"], arrays["keep"]
        dropped = self._dropped(probs, keep)
        if key_scales is not None:
            key_scales = xp.asarray(key_scales, dtype=d_out.dtype)
            dropped = dropped * key_scales
        grad_query = grad_key = grad_value = None
        if needs_value:
            grad_value = _swap(dropped) @ d_out  # dV = P_d^T dO
        if needs_query or needs_key:
            d_probs = d_out @ _swap(arrays["value"])  # dP = dO V^T
            if keep is not None:
                d_probs = self._dropped(d_probs, keep)
            # dS = P * (dP - rowsum(dP * P)) * scale
            if delta is None:  # whole rows of P: the fused softmax VJP
                d_scores = _softmax_vjp(probs, d_probs)
                d_scores *= d_out.dtype.type(self.scale)
            else:
                d_scores = probs * (d_probs - delta) * d_out.dtype.type(self.scale)
            if key_scales is not None:
                d_scores = d_scores * key_scales
            if needs_query:
                grad_query = d_scores @ arrays["key"]  # dQ = dS K
            if needs_key:
                grad_key = _swap(d_scores) @ arrays["query"]  # dK = dS^T Q
        return grad_query, grad_key, grad_value

    def _reduced(self, grads):
        return tuple(
            None if grad is None else sum_to(grad, shape)
            for grad, shape in zip(grads, self.input_shapes, strict=True)
        )

    def _sizes(self):
        """(batch, L, S, E, Ev), batch being the product of the broadcast batch axes."""
        length, value_features = self.output_shape[-2:]
        source = self.input_shapes[1][-2]
        batch = int(np.prod(self.output_shape[:-2]))
        return batch, length, source, self.input_shapes[0][-1], value_features

    def _flops(self, length, source):
        """FLOPs of the core on ``length`` query rows and ``source`` key rows."""
        batch, _, _, features, value_features = self._sizes()
        needs_query, needs_key, needs_value = self.needs_input_grad
        gemm = 2 * batch * length * source
        flops = gemm * value_features if needs_value else 0
        if needs_query or needs_key:
            flops += gemm * value_features + 4 * batch * length * source  # dP, then dS
            flops += gemm * features * (int(needs_query) + int(needs_key))
        return flops

    # -- exact -------------------------------------------------------------------

    def vjp(self, cotangent):
        return self._reduced(self._core(cotangent, self._saved()))

    def vjp_flops(self):
        _, length, source, _, _ = self._sizes()
        return self._flops(length, source)

    # -- sampled -----------------------------------------------------------------

    def sampled_vjp(self, cotangent):
        if self.placement == "cotangent":
            return self._query_row_vjp(cotangent)
        return self._key_row_vjp(cotangent)

    def _draw(self, size, weigh):
        """The forward-drawn sample, or one drawn now (importance) with ``weigh()``."""
        if self.sample is not None:
            return self.sample, self._saved()
        sample = self.draw_sample(size, weights=weigh() if self.sketch.needs_cotangent else None)
        arrays = self._saved()
        if sample.is_diagonal:
            arrays = self._restrict(arrays, sample.indices, self.placement)
        return sample, arrays

    def _query_row_vjp(self, cotangent):
        _, length, source, _, _ = self._sizes()
        row_axis = cotangent.ndim - 2
        xp = array_module(cotangent)
        sample, arrays = self._draw(length, lambda: xp.sqrt(_squared_norms_along(cotangent, -2)))
        if not sample.is_diagonal:
            sketched = sample.apply(cotangent, axis=row_axis)
            self._sampled_flops = self.vjp_flops() + sample.apply_flops(cotangent.shape, row_axis)
            return self._reduced(self._core(sketched, arrays))

        compact = sample.compress(cotangent, axis=row_axis)  # the kept rows of S dO
        grad_query, grad_key, grad_value = self._core(compact, arrays)
        if grad_query is not None:
            grad_query = sample.expand(grad_query, axis=row_axis)
        self._sampled_flops = self._flops(sample.kept, source)
        return self._reduced((grad_query, grad_key, grad_value))

    def _key_row_weights(self, cotangent):
        """``a_j = sqrt(sum_i P_d,ij^2 ||dO_i||^2)`` over every batch index."""
        saved = self._saved()
        dropped = self._dropped(saved["probs"], saved["keep"]).astype(np.float64)
        row_norms = (cotangent.astype(np.float64) ** 2).sum(axis=-1, keepdims=True)
        weighted = dropped * dropped * row_norms
        return array_module(weighted).sqrt(weighted.reshape(-1, weighted.shape[-1]).sum(axis=0))

    def _key_row_vjp(self, cotangent):
        _, length, source, features, value_features = self._sizes()
        sample, arrays = self._draw(source, lambda: self._key_row_weights(cotangent))
        if not sample.is_diagonal:
            return self._key_projection_vjp(cotangent, sample, arrays)

        delta = None
        if arrays["output"] is not None:
            delta = (cotangent * arrays["output"]).sum(axis=-1, keepdims=True)  # rowsum(dO O)
        grad_query, grad_key, grad_value = self._core(
            cotangent, arrays, delta=delta, key_scales=sample.scales
        )
        key_axis = cotangent.ndim - 2
        if grad_key is not None:
            grad_key = sample.expand(grad_key, axis=key_axis)
        if grad_value is not None:
            grad_value = sample.expand(grad_value, axis=key_axis)
        batch = int(np.prod(self.output_shape[:-2]))
        delta_flops = 2 * batch * length * value_features if delta is not None else 0
        self._sampled_flops = self._flops(length, sample.kept) + delta_flops
        return self._reduced((grad_query, grad_key, grad_value))

    def _key_projection_vjp(self, cotangent, sample, arrays):
        """``dV = S P^T dO``, ``dK = S dS^T Q``, ``dQ = dS (S K)``: full size, unbiased."""
        key_axis = cotangent.ndim - 2
        sketched = dict(arrays)
        flops = self.vjp_flops()
        if arrays["key"] is not None:
            sketched["key"] = sample.apply(arrays["key"], axis=arrays["key"].ndim - 2)
            flops += sample.apply_flops(arrays["key"].shape, arrays["key"].ndim - 2)
        grads = list(self._core(cotangent, sketched))
        for index in (1, 2):
            if grads[index] is not None:
                flops += sample.apply_flops(grads[index].shape, key_axis)
                grads[index] = sample.apply(grads[index], axis=grads[index].ndim - 2)
        self._sampled_flops = flops
        return self._reduced(tuple(grads))


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    generator=None,
) -> Tensor:
    """``softmax(query @ key^T * scale + mask) @ value`` over (..., L, E) tensors, as in torch.

    ``attn_mask`` is boolean (True: take part) or additive float, broadcast to
    (..., L, S); ``is_causal`` masks keys after each query (``tril`` of an
    L x S matrix of ones). Dropout of the attention weights draws its mask from
    ``generator`` (None, an int seed or a numpy Generator; see
    :mod:`rbprop.ops.dropout`).
    """
    dropout_p = check_probability("scaled_dot_product_attention", dropout_p)
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give attn_mask or is_causal, not both")
    tensors = [as_tensor(value_) for value_ in (query, key, value)]
    mask = None
    if attn_mask is not None:
        mask = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
        mask = array_module(tensors[0].data).asarray(mask)
    return record(
        ScaledDotProductAttention,
        *tensors,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=bool(is_causal),
        scale=scale,
        generator=generator,
    )
