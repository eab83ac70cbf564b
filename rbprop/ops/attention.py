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
on whole rows are the fused kernels of :mod:`rbprop.kernels.softmax`; they
apply ``scale`` themselves and overwrite the scores (and ``dP``) in place, so
that no full-size (..., L, S) temporary is made for either step.

:class:`PackedSelfAttention` is the same op for multi-head self-attention on
the output of one ``E -> 3E`` projection: the heads are strided views into the
packed input, the output is written with the heads side by side, and the VJP
writes ``dQ``, ``dK`` and ``dV`` into one packed gradient, so no head split,
transpose or merge copies anything.
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


def _matmul(left, right, out=None):
    """``left @ right``, written into ``out`` (a strided view is fine) when one is given."""
    if out is None:
        return left @ right
    return array_module(left, right).matmul(left, right, out=out)


def _masked_softmax(scores, may_mask_whole_rows: bool, scale: float):
    """``softmax(scale * scores)`` over the last axis, in place; an all ``-inf`` row gives zeros.

    Only a mask can make a whole row ``-inf`` (where softmax is 0 / 0), so the
    rows are checked only when ``may_mask_whole_rows``; such rows are replaced
    by zeros before the softmax and their probabilities zeroed after it.
    """
    if may_mask_whole_rows:
        xp = array_module(scores)
        empty = xp.all(scores == -np.inf, axis=-1)
        if bool(empty.any()):
            probs = softmax(xp.where(empty[..., None], 0, scores), scale=scale)
            probs[empty] = 0
            return probs
    return softmax(scores, scale=scale, out=scores)


def _softmax_vjp(probs, d_probs, scale: float):
    """``scale * P * (dP - rowsum(dP * P))``, fused and in place in ``dP`` when shapes agree."""
    if probs.shape == d_probs.shape:
        return softmax_backward(probs, d_probs, scale=scale, out=d_probs)
    d_scores = probs * (d_probs - (d_probs * probs).sum(axis=-1, keepdims=True))
    d_scores *= d_scores.dtype.type(scale)
    return d_scores


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
        output = self._attend(query, key, value)
        return array_module(output).ascontiguousarray(output)

    def _needs(self) -> tuple:
        """Whether the query, the key and the value need a gradient."""
        return self.needs_input_grad

    def _attend(self, query, key, value, out=None):
        """``O = P_d V`` on (..., tokens, features) arrays, into ``out`` when given; saves."""
        scale = self.params["scale"]
        self.scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        length, source = query.shape[-2], key.shape[-2]
        mask = self._mask(length, source, array_module(query))
        dropout_p = self.params["dropout_p"]

        probs = self._probabilities(query @ _swap(key), mask).astype(query.dtype, copy=False)
        keep = None
        if dropout_p > 0:
            keep = keep_mask(probs.shape, dropout_p, self.params["generator"], probs)
        output = _matmul(self._dropped(probs, keep), value, out)

        self.placement = self.placement or self.default_placement
        if self.placement not in ("contracted", "cotangent"):
            raise ValueError(f"{self.name}: unknown placement {self.placement!r}")
        if self.recording:
            self._save_for_backward(query, key, value, probs, keep, output)
        return output

    def _mask(self, length, source, xp):
        """The user's mask, the causal one, or None."""
        if self.params["is_causal"]:
            return xp.tril(xp.ones((length, source), dtype=bool))
        return self.params["attn_mask"]

    def _probabilities(self, scores, mask):
        """``P = softmax(scale * scores + mask)``, overwriting the fresh array ``scores``.

        The softmax kernel applies a positive scale itself; an additive mask
        must be added after scaling, so there (and for a scale <= 0) the scores
        are scaled first.
        """
        additive = mask is not None and mask.dtype != bool
        folded = self.scale > 0 and not additive
        if not folded:
            scores *= scores.dtype.type(self.scale)
        scores = self._apply_mask(scores, mask)
        # A causal mask leaves every query row at least its first key.
        user_mask = self.params["attn_mask"] is not None
        return _masked_softmax(scores, user_mask, self.scale if folded else 1.0)

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

    def _apply_mask(self, scores, mask):
        if mask is None:
            return scores
        xp = array_module(scores)
        try:
            shape = np.broadcast_shapes(mask.shape, scores.shape)
        except ValueError:
            raise ShapeError(
                f"{self.name}: attn_mask of shape {mask.shape} does not broadcast to the "
                f"attention scores of shape {scores.shape}"
            ) from None
        if mask.dtype == bool:
            return xp.where(mask, scores, -np.inf)  # True means "take part"
        mask = mask.astype(scores.dtype, copy=False)
        if shape != scores.shape:  # the mask adds batch axes
            return scores + mask
        scores += mask
        return scores

    def _dropped(self, probs, keep):
        """``P_d = P * M / (1 - p)`` (or ``P`` without dropout)."""
        if keep is None:
            return probs
        dropout_p = self.params["dropout_p"]
        scale = 0.0 if dropout_p == 1.0 else 1.0 / (1.0 - dropout_p)
        return probs * keep * probs.dtype.type(scale)

    def _save_for_backward(self, query, key, value, probs, keep, output):
        needs_query, needs_key, _ = self._needs()
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

    def _core(self, d_out, arrays, delta=None, key_scales=None, outs=(None, None, None)):
        """``(dQ, dK, dV)`` before batch reduction, from (possibly restricted) arrays.

        ``delta`` is ``rowsum(dP * P)`` when given (else formed from ``dP``);
        ``key_scales`` multiplies each key column's contribution (a sketch's
        ``1/p_j``); ``outs`` are arrays (or views) to write dQ, dK and dV into.
        """
        xp = array_module(d_out)
        needs_query, needs_key, needs_value = self._needs()
        out_query, out_key, out_value = outs
        probs, keep = arrays["probs"], arrays["keep"]
        dropped = self._dropped(probs, keep)
        if key_scales is not None:
            key_scales = xp.asarray(key_scales, dtype=d_out.dtype)
            dropped = dropped * key_scales
        grad_query = grad_key = grad_value = None
        if needs_value:
            grad_value = _matmul(_swap(dropped), d_out, out_value)  # dV = P_d^T dO
        if needs_query or needs_key:
            d_probs = d_out @ _swap(arrays["value"])  # dP = dO V^T
            if keep is not None:
                d_probs = self._dropped(d_probs, keep)
            # dS = P * (dP - rowsum(dP * P)) * scale
            if delta is None:  # whole rows of P: the fused softmax VJP
                d_scores = _softmax_vjp(probs, d_probs, self.scale)
            else:
                d_scores = probs * (d_probs - delta) * d_out.dtype.type(self.scale)
            if key_scales is not None:
                d_scores = d_scores * key_scales
            if needs_query:
                grad_query = _matmul(d_scores, arrays["key"], out_query)  # dQ = dS K
            if needs_key:
                grad_key = _matmul(_swap(d_scores), arrays["query"], out_key)  # dK = dS^T Q
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
        needs_query, needs_key, needs_value = self._needs()
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
        batch = self._sizes()[0]
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


class PackedSelfAttention(ScaledDotProductAttention):
    """Multi-head self-attention on a packed ``(N, T, 3E)`` projection; output ``(N, T, E)``.

    Each token's row of the input holds its query, key and value, each as
    ``num_heads`` heads of ``E / num_heads`` features (the output layout of one
    ``E -> 3E`` linear map). The op is :class:`ScaledDotProductAttention` on the
    ``(N, heads, T, E / heads)`` heads, taken as strided views of the input;
    the output has the heads side by side (``(N, T, heads, E / heads)`` merged),
    and the exact VJP writes ``dQ``, ``dK`` and ``dV`` straight into the packed
    gradient. The sampled VJPs are the parent's, run on the same views.
    """

    def forward(self, packed):
        xp = array_module(packed)
        heads = self.params["num_heads"]
        if packed.ndim != 3 or packed.shape[-1] % (3 * heads):
            raise ShapeError(
                f"{self.name}: packed input must be (batch, tokens, 3 * heads * head_dim) "
                f"with {heads} heads, got shape {packed.shape}"
            )
        query, key, value = self._split(packed)
        batch, tokens, features = packed.shape
        self._check_mask((batch, heads, tokens, tokens))
        merged = xp.empty((batch, tokens, features // 3), dtype=packed.dtype)
        self._attend(query, key, value, out=self._heads(merged))
        return merged

    def _check_mask(self, scores_shape):
        """The mask may not add axes to the scores: the output has the input's batch."""
        mask = self.params["attn_mask"]
        if mask is None:
            return
        try:
            fits = np.broadcast_shapes(mask.shape, scores_shape) == scores_shape
        except ValueError:
            fits = False
        if not fits:
            raise ShapeError(
                f"{self.name}: attn_mask of shape {mask.shape} does not broadcast to the "
                f"attention scores of shape {scores_shape}"
            )

    def _head_dim(self) -> int:
        return self.input_shapes[0][-1] // (3 * self.params["num_heads"])

    def _split(self, packed):
        """Query, key and value heads ``(N, heads, T, head_dim)``: views of ``packed``."""
        batch, tokens, features = packed.shape
        heads = self.params["num_heads"]
        parts = packed.reshape(batch, tokens, 3, heads, features // (3 * heads))
        return tuple(parts[:, :, part].transpose(0, 2, 1, 3) for part in range(3))

    def _heads(self, merged):
        """``(N, T, E) -> (N, heads, T, head_dim)``, a view when ``merged`` is contiguous."""
        batch, tokens, _ = merged.shape
        heads = self.params["num_heads"]
        return merged.reshape(batch, tokens, heads, -1).transpose(0, 2, 1, 3)

    def _needs(self) -> tuple:
        return self.needs_input_grad * 3

    def _sizes(self):
        batch, tokens, _ = self.input_shapes[0]
        head_dim = self._head_dim()
        return batch * self.params["num_heads"], tokens, tokens, head_dim, head_dim

    def _reduced(self, grads):
        """The three head gradients in the packed layout (zeros where one is None)."""
        like = next((grad for grad in grads if grad is not None), None)
        if like is None:
            return (None,)
        packed = array_module(like).empty(self.input_shapes[0], dtype=like.dtype)
        for target, grad in zip(self._split(packed), grads, strict=True):
            target[...] = 0 if grad is None else grad
        return (packed,)

    def vjp(self, cotangent):
        packed = array_module(cotangent).empty(self.input_shapes[0], dtype=cotangent.dtype)
        self._core(self._heads(cotangent), self._saved(), outs=self._split(packed))
        return (packed,)

    def sampled_vjp(self, cotangent):
        return super().sampled_vjp(self._heads(cotangent))


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


def packed_self_attention(
    packed, num_heads, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, generator=None
) -> Tensor:
    """Multi-head self-attention on ``packed = x @ in_weight.T + in_bias`` of shape (N, T, 3E).

    The same as splitting ``packed`` into query, key and value, each into
    ``num_heads`` heads, calling :func:`scaled_dot_product_attention` on the
    ``(N, heads, T, E / heads)`` heads and merging the heads of its output back
    into ``(N, T, E)``, as one op that copies none of them. The other arguments
    are :func:`scaled_dot_product_attention`'s (a mask broadcasts to
    ``(N, heads, T, T)``).
    """
    dropout_p = check_probability("scaled_dot_product_attention", dropout_p)
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give attn_mask or is_causal, not both")
    packed = as_tensor(packed)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask
        mask = array_module(packed.data).asarray(mask)
    return record(
        PackedSelfAttention,
        packed,
        num_heads=int(num_heads),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=bool(is_causal),
        scale=scale,
        generator=generator,
    )
