"""Reductions and normalised exponentials: sum, mean, max, min, logsumexp, softmax.

A reduction (or softmax) that keeps the leading axis is row-local, so its
sampled VJP runs on the kept rows only (``Primitive.row_sampled_vjp``). The
others sketch the output's leading axis too and work on the ``k`` kept rows of
``S v`` (each already scaled by ``1/p_i``) through
:func:`rbprop.ops.shape.leading_axis_sampled_vjp`:

* ``sum``, ``mean`` over axes that include axis 0: the output's leading axis is
  the first input axis ``a`` not reduced; each kept row is broadcast over the
  reduced axes into slice ``i`` of axis ``a`` of a zero gradient (``mean``
  divides the kept rows by the count first);
* ``max``, ``min``, ``logsumexp`` over such axes: the same, with the weights
  (ties shared, ``exp(x - y)``) computed on the kept slices of ``x`` only;
* ``softmax``, ``log_softmax`` over axis 0: the gradient is dense (every row
  of the output depends on every input row), but the sum over the softmax axis
  reads the kept rows only: ``y * (S v - sum_kept(S v * y))`` and
  ``S v - exp(y) * sum_kept(S v)``; dropped rows cost one product each.

With ``keepdims`` the output's leading axis has length 1 and, like a scalar
output, is one row, kept whole or dropped. A projection (rank-k) sketch has no
kept rows: ``S v`` is formed densely and the exact VJP runs (its FLOPs say so).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..kernels import softmax as softmax_kernels
from ..primitive import Primitive, normalize_axes, normalize_axis
from ..sketch import DiagonalSample
from ..tensor import as_tensor, record
from .shape import kept_slices_gradient, leading_axis_sampled_vjp


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
        """``J^T S v`` on the kept rows only (see the module docstring)."""
        if self.row_local:
            return self.row_sampled_vjp(cotangent)
        return leading_axis_sampled_vjp(self, cotangent)

    def reduced_count(self) -> int:
        return int(np.prod([self.input_shapes[0][axis] for axis in self.axes]))

    def kept_rows_vjp(self, indices, compact):
        """Input gradient from output rows ``indices`` holding ``compact``, and its FLOPs.

        Reached only without ``keepdims`` and with axis 0 reduced: the output's
        leading axis is then the first unreduced input axis ``a``, and output row
        ``i`` is the reduction of slice ``i`` of axis ``a``. ``compact`` is given to
        :meth:`kept_slices_vjp` with the reduced axes back as length 1.
        """
        shape = self.input_shapes[0]
        axis = next(dim for dim in range(len(shape)) if dim not in self.axes)
        # The output's axes are the unreduced ones in order, so this only inserts 1s.
        kept_shape = tuple(
            len(indices) if dim == axis else 1 if dim in self.axes else size
            for dim, size in enumerate(shape)
        )
        grad, flops = self.kept_slices_vjp(axis, indices, compact.reshape(kept_shape))
        return (grad,), flops

    def kept_slices_vjp(self, axis, indices, compact):
        """The input gradient, nonzero on slices ``indices`` of ``axis`` only, and its FLOPs.

        ``compact`` holds the kept rows of ``S v`` as slices of that axis, with the
        reduced axes of length 1. Sum: each kept row broadcast over its slice.
        """
        return self._broadcast_into_slices(axis, indices, compact), 0

    def _broadcast_into_slices(self, axis, indices, compact):
        # Written with the kept axis outermost: one contiguous block per kept slice.
        moved = array_module(compact).moveaxis(compact, axis, 0)
        return kept_slices_gradient(self.input_shapes[0], axis, indices, moved, compact.dtype)

    def _kept_slices(self, array, axis, indices):
        """Slices ``indices`` of ``array`` along ``axis`` (``take``: fast on any axis)."""
        xp = array_module(array)
        return xp.take(array, xp.asarray(indices), axis=axis)

    def _scatter_slices(self, block, axis, indices):
        """``block`` (the kept slices of the gradient) put back into zeros along ``axis``."""
        size = self.input_shapes[0][axis]
        return DiagonalSample(size, indices, np.ones(len(indices))).expand(block, axis=axis)


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

    def kept_slices_vjp(self, axis, indices, compact):
        scaled = (compact / self.reduced_count()).astype(compact.dtype)
        return self._broadcast_into_slices(axis, indices, scaled), int(compact.size)


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

    def kept_slices_vjp(self, axis, indices, compact):
        # Only the kept slices of x are compared with their extreme.
        extreme = self._kept_slices(_expand_reduced(self.output, self.axes, False), axis, indices)
        hits = (self._kept_slices(self.x, axis, indices) == extreme).astype(compact.dtype)
        ties = hits.sum(axis=self.axes, keepdims=True)
        block = hits * (compact / ties)
        return self._scatter_slices(block, axis, indices), 3 * int(hits.size)


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

    def kept_slices_vjp(self, axis, indices, compact):
        # d logsumexp / dx = exp(x - y), on the kept slices of x only.
        xp = array_module(compact)
        kept_x = self._kept_slices(self.x, axis, indices)
        weights = xp.exp(kept_x - self._kept_slices(self.output, axis, indices))
        block = compact * weights
        return self._scatter_slices(block, axis, indices), 3 * int(kept_x.size)


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
        """``J^T S v``: kept rows only along trailing axes, a kept-rows sum along axis 0."""
        if self.row_local:
            return self.row_sampled_vjp(cotangent)
        return leading_axis_sampled_vjp(self, cotangent)

    def vjp_flops(self):
        return 4 * int(np.prod(self.output_shape))

    def kept_rows_vjp(self, indices, compact):
        """Along axis 0 (the output's rows): ``y * (u - sum_0(u * y))`` with ``u = S v``.

        ``u`` is zero off the kept rows, so the sum reads the kept rows only; a
        dropped row's gradient is ``-y * sum``, one product per element.
        """
        xp = array_module(compact)
        kept = xp.asarray(indices)
        kept_output = self.output[kept]
        inner = (compact * kept_output).sum(axis=0, keepdims=True)
        grad = self.output * -inner
        grad[kept] = kept_output * (compact - inner)
        return (grad,), int(self.output.size) + 4 * int(compact.size)


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

    def kept_rows_vjp(self, indices, compact):
        """Along axis 0 (the output's rows): ``u - exp(y) * sum_0(u)`` with ``u = S v``.

        The sum reads the kept rows only; every row pays ``exp(y) * sum`` and the
        kept ones add their ``u``.
        """
        xp = array_module(compact)
        total = compact.sum(axis=0, keepdims=True)
        grad = xp.exp(self.output)
        grad *= -total
        grad[xp.asarray(indices)] += compact
        return (grad,), 2 * int(self.output.size) + 2 * int(compact.size)


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
