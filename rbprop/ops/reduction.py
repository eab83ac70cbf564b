"""Reductions and normalised exponentials: sum, mean, max, min, logsumexp, softmax.

A reduction that keeps the leading axis is row-local, so its sampled VJP runs
on the kept rows only. One that reduces the leading axis has a VJP that only
broadcasts (sum, mean) or routes (max, min) the cotangent: there the sketch is
applied to the cotangent first (``Primitive.sketched_cotangent_vjp``).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..kernels import softmax as softmax_kernels
from ..primitive import Primitive, normalize_axes, normalize_axis
from ..tensor import as_tensor, record


def _expand_reduced(array, axes, keepdims):
    """Re-insert the reduced axes (as length 1) when they were dropped."""
    if keepdims:
        return array
    xp = array_module(array)
    return xp.expand_dims(array, axes) if axes else array


class Reduction(Primitive):
    """Shared bookkeeping of reductions over ``axis`` with ``keepdims``."""

    def setup(self, x):
        self.axes = normalize_axes(self.name, self.params.get("axis"), x.ndim, x.shape)
        self.keepdims = bool(self.params.get("keepdims", False))
        self.row_local = x.ndim > 0 and 0 not in self.axes

    def sampled_vjp(self, cotangent):
        if self.row_local:
            return self.row_sampled_vjp(cotangent)
        return self.sketched_cotangent_vjp(cotangent)

    def reduced_count(self) -> int:
        return int(np.prod([self.input_shapes[0][axis] for axis in self.axes]))


class Sum(Reduction):
    name = "sum"

    def forward(self, x):
        self.setup(x)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def vjp(self, cotangent):
        xp = array_module(cotangent)
        expanded = _expand_reduced(cotangent, self.axes, self.keepdims)
        return (xp.broadcast_to(expanded, self.input_shapes[0]).copy(),)


class Mean(Reduction):
    name = "mean"

    def forward(self, x):
        self.setup(x)
        if self.reduced_count() == 0:
            raise ValueError(f"mean: empty reduction over axes {self.axes} of shape {x.shape}")
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def vjp(self, cotangent):
        xp = array_module(cotangent)
        expanded = _expand_reduced(cotangent, self.axes, self.keepdims) / self.reduced_count()
        return (xp.broadcast_to(expanded, self.input_shapes[0]).astype(cotangent.dtype),)

    def vjp_flops(self):
        return int(np.prod(self.input_shapes[0]))


class Extremum(Reduction):
    """Max or min; tied extremes share the cotangent equally (as numpy's amax would)."""

    def forward(self, x):
        self.setup(x)
        if x.size == 0:
            raise ValueError(f"{self.name}: reduction of an empty array of shape {x.shape}")
        reduce = x.max if self.name == "max" else x.min
        output = reduce(axis=self.axes, keepdims=self.keepdims)
        self.save(x=x, output=output)
        return output

    def vjp(self, cotangent):
        extreme = _expand_reduced(self.output, self.axes, self.keepdims)
        hits = (self.x == extreme).astype(cotangent.dtype)
        ties = hits.sum(axis=self.axes, keepdims=True)
        expanded = _expand_reduced(cotangent, self.axes, self.keepdims)
        return (hits * (expanded / ties),)

    def vjp_flops(self):
        return 3 * int(np.prod(self.input_shapes[0]))


class Max(Extremum):
    name = "max"


class Min(Extremum):
    name = "min"


class LogSumExp(Reduction):
    """``log sum exp x`` over ``axis``, shifted by the maximum for stability."""

    name = "logsumexp"

    def forward(self, x):
        self.setup(x)
        xp = array_module(x)
        shift = x.max(axis=self.axes, keepdims=True)
        shift = xp.where(xp.isfinite(shift), shift, 0)
        total = xp.exp(x - shift).sum(axis=self.axes, keepdims=True)
        output = xp.log(total) + shift
        self.save(x=x, output=output)
        return output if self.keepdims else output.squeeze(axis=self.axes)

    def vjp(self, cotangent):
        xp = array_module(cotangent)
        expanded = _expand_reduced(cotangent, self.axes, self.keepdims)
        return (expanded * xp.exp(self.x - self.output),)

    def vjp_flops(self):
        return 3 * int(np.prod(self.input_shapes[0]))


class Softmax(Primitive):
    """``exp(x - logsumexp(x))`` along one axis; VJP ``y * (v - sum(v * y))``."""

    name = "softmax"

    def forward(self, x):
        xp = array_module(x)
        self.axis = normalize_axis(self.name, self.params["axis"], x.ndim, x.shape)
        self.row_local = x.ndim > 1 and self.axis != 0
        if self.axis == x.ndim - 1:  # the fused kernel works on the last axis
            output = softmax_kernels.softmax(x)
        else:
            shifted = x - x.max(axis=self.axis, keepdims=True)
            exponentials = xp.exp(shifted)
            output = exponentials / exponentials.sum(axis=self.axis, keepdims=True)
        self.save(output=output)
        return output

    def vjp(self, cotangent):
        output = self.output
        if self.axis == output.ndim - 1:
            return (softmax_kernels.softmax_backward(output, cotangent),)
        inner = (cotangent * output).sum(axis=self.axis, keepdims=True)
        return (output * (cotangent - inner),)

    def sampled_vjp(self, cotangent):
        if self.row_local:
            return self.row_sampled_vjp(cotangent)
        return self.sketched_cotangent_vjp(cotangent)

    def vjp_flops(self):
        return 4 * int(np.prod(self.output_shape))


class LogSoftmax(Softmax):
    """``x - logsumexp(x)`` along one axis; VJP ``v - exp(y) * sum(v)``."""

    name = "log_softmax"

    def forward(self, x):
        xp = array_module(x)
        self.axis = normalize_axis(self.name, self.params["axis"], x.ndim, x.shape)
        self.row_local = x.ndim > 1 and self.axis != 0
        if self.axis == x.ndim - 1:  # the fused kernel works on the last axis
            output = softmax_kernels.log_softmax(x)
        else:
            shifted = x - x.max(axis=self.axis, keepdims=True)
            output = shifted - xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        self.save(output=output)
        return output

    def vjp(self, cotangent):
        xp = array_module(cotangent)
        if self.axis == self.output.ndim - 1:
            return (softmax_kernels.log_softmax_backward(self.output, cotangent),)
        total = cotangent.sum(axis=self.axis, keepdims=True)
        return (cotangent - xp.exp(self.output) * total,)


def sum(x, axis=None, keepdims=False):  # noqa: A001 - numpy's name
    return record(Sum, as_tensor(x), axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return record(Mean, as_tensor(x), axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001 - numpy's name
    return record(Max, as_tensor(x), axis=axis, keepdims=keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001 - numpy's name
    return record(Min, as_tensor(x), axis=axis, keepdims=keepdims)


def var(x, axis=None, keepdims=False):
    """Population variance (``ddof=0``), composed from mean and arithmetic."""
    x = as_tensor(x)
    centred = x - mean(x, axis=axis, keepdims=True)
    return mean(centred * centred, axis=axis, keepdims=keepdims)


def logsumexp(x, axis=None, keepdims=False):
    return record(LogSumExp, as_tensor(x), axis=axis, keepdims=keepdims)


def softmax(x, axis=-1):
    return record(Softmax, as_tensor(x), axis=axis)


def log_softmax(x, axis=-1):
    return record(LogSoftmax, as_tensor(x), axis=axis)
