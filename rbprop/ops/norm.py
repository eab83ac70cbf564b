"""Normalisation primitives: ``layer_norm`` and ``batch_norm``.

Both compute ``x_hat = (x - mean) / sqrt(var + eps)`` (biased variance) and
then ``y = x_hat * weight + bias``. They differ in which axes the statistics
run over, and that decides their sampled VJP:

* ``layer_norm`` normalises each row over its trailing axes, so it is
  row-local along the batch axis and inherits the kept-rows evaluation;
* ``batch_norm`` in eval mode uses fixed running statistics: an affine map
  per channel, also row-local;
* ``batch_norm`` in training mode mixes every row of a channel through the
  batch statistics, but channels stay independent (its Jacobian is block
  diagonal over channels), so its sampled VJP sketches the channels and
  computes the VJP of the kept channels only.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..backend import array_module
from ..kernels.batchnorm import batch_norm_backward, batch_norm_normalize, batch_norm_statistics
from ..kernels.layernorm import layer_norm_backward, layer_norm_forward
from ..primitive import Primitive, ShapeError
from ..tensor import Tensor, as_tensor, record


def _split_affine(params, affine):
    """(weight, bias) from the optional trailing inputs, None where absent."""
    affine = list(affine)
    weight = affine.pop(0) if params["has_weight"] else None
    bias = affine.pop(0) if params["has_bias"] else None
    return weight, bias


class Normalization(Primitive):
    """Shared pieces: which inputs exist, and full-rank arrays carry the row axis."""

    def _needs(self, which: str) -> bool:
        """Whether the input named ``which`` ("x", "weight", "bias") needs a gradient."""
        order = ["x"] + [n for n in ("weight", "bias") if self.params[f"has_{n}"]]
        return which in order and bool(self.needs_input_grad[order.index(which)])

    def _grads(self, grad_x, grad_weight, grad_bias):
        grads = [grad_x]
        if self.params["has_weight"]:
            grads.append(grad_weight)
        if self.params["has_bias"]:
            grads.append(grad_bias)
        return tuple(grads)

    def row_aligned(self, shape) -> bool:
        """Only arrays of the input's rank carry the batch axis (not weights or statistics)."""
        return len(shape) == len(self.output_shape) and super().row_aligned(shape)


class LayerNorm(Normalization):
    """Normalise over the trailing ``len(normalized_shape)`` axes.

    ``dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))`` with ``g = v * weight``
    and means over the normalised axes; ``dweight = sum(v * x_hat)`` and
    ``dbias = sum(v)`` over the leading axes. Row-local when at least one
    leading axis exists; importance weights are ``||v_i||`` (rows).

    Forward and VJP are the fused kernels of :mod:`rbprop.kernels.layernorm`,
    with the normalised axes flattened into one. The op saves the input and
    the per-row ``mean`` and ``rstd`` (``x_hat`` is recomputed in the VJP, so no
    array of the input's size is created for backward). The statistics keep the
    input's rank, with the normalised axes of length 1, so that the kept-rows
    evaluation of the sampled VJP restricts them together with ``x``.
    """

    name = "layer_norm"

    def forward(self, x, *affine):
        weight, bias = _split_affine(self.params, affine)
        normalized = self.params["normalized_shape"]
        count = len(normalized)
        if x.ndim < count or tuple(x.shape[x.ndim - count :]) != normalized:
            raise ShapeError(
                f"layer_norm: input of shape {x.shape} does not end with normalized_shape "
                f"{normalized}"
            )
        for label, array in (("weight", weight), ("bias", bias)):
            if array is not None and tuple(array.shape) != normalized:
                raise ShapeError(
                    f"layer_norm: {label} of shape {array.shape} for normalized_shape {normalized}"
                )
        self.axes = tuple(range(x.ndim - count, x.ndim))
        self.row_local = x.ndim > count

        output, mean, rstd = layer_norm_forward(
            self._rows(x), _flat(weight), _flat(bias), self.params["eps"]
        )
        if self.recording:
            needs_x = self._needs("x")
            needs_x_hat = needs_x or self._needs("weight")
            statistics_shape = x.shape[: x.ndim - count] + (1,) * count
            self.save(
                x=x if needs_x_hat else None,
                mean=mean.reshape(statistics_shape) if needs_x_hat else None,
                rstd=rstd.reshape(statistics_shape) if needs_x_hat else None,
                weight=weight if needs_x else None,
            )
        return output.reshape(x.shape)

    def _rows(self, array):
        """``array`` with its normalised axes flattened into one last axis."""
        leading = array.shape[: array.ndim - len(self.axes)]
        return array.reshape(leading + (int(np.prod(self.params["normalized_shape"])),))

    def vjp(self, cotangent):
        leading = tuple(range(cotangent.ndim - len(self.axes)))
        grad_x = grad_weight = grad_bias = None
        if self._needs("x") or self._needs("weight"):
            statistics_shape = cotangent.shape[: len(leading)]
            # Without a saved weight (only dweight, dbias wanted) the kernel's dx,
            # computed for a weight of ones, is discarded.
            grad_x, grad_weight, grad_bias = layer_norm_backward(
                self._rows(cotangent),
                self._rows(self.x),
                _flat(self.weight),
                self.mean.reshape(statistics_shape),
                self.rstd.reshape(statistics_shape),
            )
            grad_x = grad_x.reshape(cotangent.shape) if self._needs("x") else None
            normalized = self.params["normalized_shape"]
            grad_weight = grad_weight.reshape(normalized) if self._needs("weight") else None
            grad_bias = grad_bias.reshape(normalized) if self._needs("bias") else None
        elif self._needs("bias"):
            grad_bias = cotangent.sum(axis=leading)
        return self._grads(grad_x, grad_weight, grad_bias)

    def vjp_flops(self):
        elements = int(np.prod(self.input_shapes[0]))
        flops = 8 * elements if self._needs("x") else 0
        flops += 2 * elements if self._needs("weight") else 0
        return flops + (elements if self._needs("bias") else 0)

    def sampled_vjp(self, cotangent):
        if self.row_local:
            return self.row_sampled_vjp(cotangent)
        return self.sketched_cotangent_vjp(cotangent)


def _flat(parameter):
    """A weight or bias of ``normalized_shape`` as the 1-D vector the kernels take."""
    return None if parameter is None else parameter.reshape(-1)


class BatchNorm(Normalization):
    """Normalise each channel (axis 1) over the batch and spatial axes.

    Training mode uses the batch statistics and updates the running ones in
    place: ``running = (1 - momentum) * running + momentum * batch`` with the
    unbiased batch variance, as PyTorch does. Its VJP, per channel with ``m``
    elements, is ``dx = weight * rstd * (v - sum(v)/m - x_hat * sum(v * x_hat)/m)``.
    Eval mode uses the running statistics: ``dx = weight * rstd * v``.

    Sampled VJP: eval mode is row-local (kept batch rows; importance weights
    ``||v_i||``). Training mode keeps channels: ``a_c = ||v_c|| * ||J_c||`` with
    ``||J_c||^2 <= (weight_c rstd_c)^2 + ||x_hat_c||^2 + m`` (the bound on each
    needed part: the centring projection has norm 1, ``dweight_c = v_c . x_hat_c``,
    ``dbias_c = v_c . 1``), with ``||x_hat_c||^2 = m (1 - eps rstd_c^2)``.

    Statistics, normalisation and VJP are the fused kernels of
    :mod:`rbprop.kernels.batchnorm`, on the input seen as (N, C, S). The op
    saves the input and the per-channel ``mean`` and ``rstd``; ``x_hat`` is
    recomputed in the VJP rather than kept.
    """

    name = "batch_norm"

    def forward(self, x, *affine):
        weight, bias = _split_affine(self.params, affine)
        if x.ndim < 2:
            raise ShapeError(f"batch_norm: input must be (N, C, ...), got shape {x.shape}")
        channels = x.shape[1]
        for label, array in (("weight", weight), ("bias", bias)):
            if array is not None and tuple(array.shape) != (channels,):
                raise ShapeError(
                    f"batch_norm: {label} of shape {array.shape} for an input of shape "
                    f"{x.shape} ({channels} channels)"
                )
        training = self.params["training"]
        self.row_local = not training
        self.reduced_axes = (0,) + tuple(range(2, x.ndim))
        xp = array_module(x)

        planes = _planes(x)
        if training:
            mean, variance = self._batch_statistics(planes)
        else:
            mean, variance = self._running_statistics(x)
        rstd = (1 / xp.sqrt(variance + self.params["eps"])).astype(x.dtype, copy=False)
        mean = mean.astype(x.dtype, copy=False)
        output = batch_norm_normalize(planes, mean, rstd, weight, bias).reshape(x.shape)

        if self.recording:
            needs_x = self._needs("x")
            needs_x_hat = self._needs("weight") or (training and needs_x)
            self.save(
                x=x if needs_x_hat else None,
                mean=mean if needs_x_hat else None,
                # The importance weights of training mode read rstd as well.
                rstd=rstd
                if needs_x or needs_x_hat or (training and self.sketch is not None)
                else None,
                weight=weight if needs_x else None,
            )
        return output

    def _batch_statistics(self, planes):
        count = planes.shape[0] * planes.shape[2]
        if count <= 1:
            raise ValueError(
                f"batch_norm: training needs more than one value per channel, got input "
                f"of shape {self.input_shapes[0]}"
            )
        # Biased variance: what the output is normalised by.
        mean, variance = batch_norm_statistics(planes)
        momentum = self.params["momentum"]
        for running, batch in (
            (self.params["running_mean"], mean),
            (self.params["running_var"], variance * (count / (count - 1))),  # unbiased
        ):
            if running is not None:
                running[...] = (1 - momentum) * running + momentum * batch
        return mean, variance

    def _running_statistics(self, x):
        mean, variance = self.params["running_mean"], self.params["running_var"]
        if mean is None or variance is None:
            raise ValueError("batch_norm: eval mode (training=False) needs running_mean and var")
        for label, array in (("running_mean", mean), ("running_var", variance)):
            if tuple(array.shape) != (x.shape[1],):
                raise ShapeError(
                    f"batch_norm: {label} of shape {array.shape} for an input of shape {x.shape}"
                )
        return mean, variance

    # -- exact -------------------------------------------------------------------

    def vjp(self, cotangent):
        return self._channel_grads(cotangent, self.x, self.mean, self.rstd, self.weight)

    def _channel_grads(self, v, x, mean, rstd, weight):
        """The VJP for the channels present in ``v`` (and in the per-channel arrays)."""
        centring = not self.row_local and self._needs("x")  # training: dx reads both sums
        grad_x = grad_weight = grad_bias = None
        # x is saved when x_hat is needed (dweight, or dx in training mode).
        if x is not None or self._needs("x"):
            grad_x, grad_weight, grad_bias = batch_norm_backward(
                _planes(v),
                None if x is None else _planes(x),
                mean,
                rstd,
                weight,
                centring=centring,
                input_grad=self._needs("x"),
            )
        if grad_x is not None:
            grad_x = grad_x.reshape(v.shape)
        if self._needs("bias") and grad_bias is None:  # no x_hat was needed: sum v alone
            grad_bias = v.sum(axis=self.reduced_axes)
        return self._grads(
            grad_x,
            grad_weight if self._needs("weight") else None,
            grad_bias if self._needs("bias") else None,
        )

    def vjp_flops(self):
        elements = int(np.prod(self.input_shapes[0]))
        if self.row_local:
            flops = elements if self._needs("x") else 0
            flops += 2 * elements if self._needs("weight") else 0
            return flops + (elements if self._needs("bias") else 0)
        # sum(v), sum(v * x_hat), then four operations an element for dx.
        flops = 3 * elements if self._needs("x") or self._needs("weight") else elements
        return flops + (4 * elements if self._needs("x") else 0)

    # -- sampled -----------------------------------------------------------------

    def sampled_vjp(self, cotangent):
        if self.row_local:
            return self.row_sampled_vjp(cotangent)
        channels = cotangent.shape[1]
        weights = self._channel_weights(cotangent) if self.sketch.needs_cotangent else None
        sample = self.draw_sample(channels, weights=weights)
        if not sample.is_diagonal:  # a projection mixes channels: no kept channel to restrict to
            sketched = sample.apply(cotangent, axis=1)
            self._sampled_flops = self.vjp_flops() + sample.apply_flops(cotangent.shape, 1)
            return self.vjp(sketched)

        xp = array_module(cotangent)
        kept = xp.asarray(sample.indices)
        compact = sample.compress(cotangent, axis=1)
        x = None if self.x is None else xp.take(self.x, kept, axis=1)
        mean = None if self.mean is None else self.mean[kept]
        rstd = None if self.rstd is None else self.rstd[kept]
        weight = None if self.weight is None else self.weight[kept]
        compact_grads = self._channel_grads(compact, x, mean, rstd, weight)
        self._sampled_flops = self.vjp_flops() * sample.kept // max(channels, 1)
        axes = [1] + [0] * (len(compact_grads) - 1)  # dx: channel axis 1; dweight, dbias: 0
        return tuple(
            None if grad is None else sample.expand(grad, axis=axis)
            for grad, axis in zip(compact_grads, axes, strict=True)
        )

    def _channel_weights(self, v):
        """``||v_c|| * ||J_c||`` per channel (see the class docstring)."""
        xp = array_module(v)
        moved = xp.moveaxis(v, 1, 0).reshape(v.shape[1], -1).astype(np.float64)
        count = moved.shape[1]
        meets = xp.zeros(v.shape[1])
        rstd = None if self.rstd is None else self.rstd.astype(np.float64)
        if self._needs("x"):
            gain = rstd if self.weight is None else self.weight.astype(np.float64) * rstd
            meets = meets + gain * gain
        if self._needs("weight"):
            meets = meets + count * (1 - self.params["eps"] * rstd * rstd)
        if self._needs("bias"):
            meets = meets + count
        return xp.sqrt((moved * moved).sum(axis=1) * meets)


def _planes(array):
    """An (N, C, ...) array seen as (N, C, S), every spatial position in S (1 for (N, C))."""
    return array.reshape(array.shape[0], array.shape[1], int(np.prod(array.shape[2:])))


def _affine_inputs(op_name, weight, bias):
    inputs = [as_tensor(value) for value in (weight, bias) if value is not None]
    return inputs, {"has_weight": weight is not None, "has_bias": bias is not None}


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5) -> Tensor:  # noqa: A002
    """Layer normalisation over the trailing ``normalized_shape`` axes (as in torch)."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(int(size) for size in normalized_shape)
    inputs, flags = _affine_inputs("layer_norm", weight, bias)
    return record(
        LayerNorm,
        as_tensor(input),
        *inputs,
        normalized_shape=normalized_shape,
        eps=float(eps),
        **flags,
    )


def _raw(array):
    """The array behind a running statistic (updated in place), or None."""
    if array is None:
        return None
    return array.data if isinstance(array, Tensor) else array


def batch_norm(
    input,  # noqa: A002 - torch's argument name
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
) -> Tensor:
    """Batch normalisation over axis 1 of ``(N, C, ...)`` inputs (``torch``'s signature).

    In training mode the batch statistics normalise the input and the running
    statistics, when given (numpy/cupy arrays or Tensors), are updated in place.
    ``momentum=None`` (cumulative averaging) is not supported.
    """
    if momentum is None or not 0 <= float(momentum) <= 1:
        raise ValueError(f"batch_norm: momentum must be a number in [0, 1], got {momentum!r}")
    running_mean, running_var = _raw(running_mean), _raw(running_var)
    for label, array in (("running_mean", running_mean), ("running_var", running_var)):
        if array is not None and not hasattr(array, "shape"):
            raise TypeError(f"batch_norm: {label} must be an array or a Tensor, got {array!r}")
    inputs, flags = _affine_inputs("batch_norm", weight, bias)
    return record(
        BatchNorm,
        as_tensor(input),
        *inputs,
        running_mean=running_mean,
        running_var=running_var,
        training=bool(training),
        momentum=float(momentum),
        eps=float(eps),
        **flags,
    )
