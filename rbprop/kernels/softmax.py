"""Softmax and log-softmax over the last axis, forward and backward, fused per row.

Forward, with ``m = max_j x_j`` subtracted for stability:

    softmax(x)_j     = exp(x_j - m) / sum_l exp(x_l - m)
    log_softmax(x)_j = x_j - m - log(sum_l exp(x_l - m))

Backward (VJP with cotangent ``v``), written in terms of the forward output:

    softmax:      dx_j = y_j (v_j - sum_l v_l y_l)
    log_softmax:  dx_j = v_j - exp(y_j) sum_l v_l

``softmax`` and ``softmax_backward`` also take a ``scale`` ``s`` (the forward,
for ``s > 0``, is then ``softmax(s x)``, formed as ``exp(s (x_j - m))``; the
backward multiplies ``dx`` by ``s``) and an ``out`` array, which may be the
input itself: attention scales its scores and overwrites them this way,
without a full-size temporary for either step.

numpy needs a temporary array per step (max, shift, exp, sum, divide); here
the numba kernels work row by row, in parallel over rows, into one output
buffer, and sum in float64 (the exponentials themselves go through numpy's
vectorised ``np.exp``, in place; see below). Arrays of any rank are treated as
rows of their last axis.
Each function dispatches to numba for float32/float64 numpy arrays and to its
``*_reference`` numpy twin otherwise.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..backend import array_module
from ..primitive import ShapeError
from .dispatch import launch, use_numba

# ----------------------------------------------------------------------------- numba kernels
#
# numba compiles ``math.exp`` to a scalar libm call (no vector exp without Intel's
# SVML), several times slower than numpy's SIMD ``np.exp``. So the forward and
# log-softmax backward run in three steps on one output buffer: a numba pass,
# ``np.exp`` in place, a numba pass. numpy alone allocates four temporaries.
#
# Strict IEEE order keeps LLVM from vectorising a float64 sum over a row; letting
# it reassociate made the softmax forward 1.5 and its backward 2.4 times faster on
# (128, 4, 50, 50) float32 scores. NaN and inf still propagate (no nnan, ninf).
_REASSOCIATE = {"reassoc", "nsz", "arcp"}


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _shift_by_row_max_numba(x, scale, out, row_max):
    """``out = s (x - max_j x)``, row by row, keeping the maxima (``out`` may be ``x``).

    ``s = 1`` gives ``x - max_j x`` exactly (a product by one is exact).
    """
    rows, length = x.shape
    for r in numba.prange(rows):
        largest = x[r, 0]
        for j in range(1, length):
            largest = max(largest, x[r, j])
        row_max[r] = largest
        for j in range(length):
            out[r, j] = (x[r, j] - largest) * scale


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _normalize_rows_numba(exps):
    """``exps /= sum_j exps``, row by row (the sum in float64)."""
    rows, length = exps.shape
    for r in numba.prange(rows):
        total = 0.0
        for j in range(length):
            total += exps[r, j]
        inverse = 1.0 / total
        for j in range(length):
            exps[r, j] *= inverse


@numba.njit(cache=True, fastmath=_REASSOCIATE)
def _row_total(values):
    """``sum_j values_j`` in float64, in any order."""
    total = 0.0
    for j in range(values.size):
        total += values[j]
    return total


@numba.njit(cache=True, parallel=True)
def _log_normalize_rows_numba(x, row_max, exps):
    """``exps = (x - m) - log(sum_j exps)`` where ``exps`` holds ``exp(x - m)``.

    Without reassociation, so that ``x - m`` is formed first: it is exact near
    the maximum, where ``x - (m + log(sum))`` would lose the small difference.
    """
    rows, length = x.shape
    for r in numba.prange(rows):
        log_total = math.log(_row_total(exps[r]))
        for j in range(length):
            exps[r, j] = (x[r, j] - row_max[r]) - log_total


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _softmax_backward_numba(probabilities, cotangent, scale, out):
    """``out = s y (v - sum_j v_j y_j)``, row by row (``out`` may be ``v``: read first)."""
    rows, length = probabilities.shape
    for r in numba.prange(rows):
        dot = 0.0
        for j in range(length):
            dot += cotangent[r, j] * probabilities[r, j]
        for j in range(length):
            out[r, j] = probabilities[r, j] * (cotangent[r, j] - dot) * scale


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _log_softmax_backward_numba(cotangent, out):
    """``out = v - out * sum_j v`` where ``out`` holds the probabilities ``exp(y)``."""
    rows, length = cotangent.shape
    for r in numba.prange(rows):
        total = 0.0
        for j in range(length):
            total += cotangent[r, j]
        for j in range(length):
            out[r, j] = cotangent[r, j] - out[r, j] * total


# ----------------------------------------------------------------------------- numpy twins


def _check(name, *arrays):
    if arrays[0].ndim < 1:
        raise ShapeError(f"{name}: needs at least one axis, got a 0-d array")
    for array in arrays[1:]:
        if array.shape != arrays[0].shape:
            raise ShapeError(
                f"{name}: cotangent of shape {array.shape} does not match the forward output "
                f"of shape {arrays[0].shape}"
            )


def softmax_reference(x, scale=1.0, out=None):
    """numpy twin of :func:`softmax`."""
    _check("softmax", x)
    scale = _positive_scale(scale)
    xp = array_module(x)
    if x.size == 0:
        return _written(xp.empty_like(x), out, "softmax")
    shifted = x - x.max(axis=-1, keepdims=True)
    if scale != 1.0:
        shifted = shifted * x.dtype.type(scale)
    shifted_exp = xp.exp(shifted)
    return _written(shifted_exp / shifted_exp.sum(axis=-1, keepdims=True), out, "softmax")


def log_softmax_reference(x):
    """numpy twin of :func:`log_softmax`."""
    _check("log_softmax", x)
    xp = array_module(x)
    if x.size == 0:
        return xp.empty_like(x)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def softmax_backward_reference(probabilities, cotangent, scale=1.0, out=None):
    """numpy twin of :func:`softmax_backward`."""
    _check("softmax_backward", probabilities, cotangent)
    dot = (cotangent * probabilities).sum(axis=-1, keepdims=True)
    grad = probabilities * (cotangent - dot)
    if scale != 1.0:
        grad = grad * probabilities.dtype.type(scale)
    return _written(grad, out, "softmax_backward")


def log_softmax_backward_reference(log_probabilities, cotangent):
    """numpy twin of :func:`log_softmax_backward`."""
    _check("log_softmax_backward", log_probabilities, cotangent)
    xp = array_module(log_probabilities)
    return cotangent - xp.exp(log_probabilities) * cotangent.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- dispatchers


def _rows(array):
    """A contiguous ``(rows, last axis)`` view of ``array``."""
    return np.ascontiguousarray(array).reshape(-1, array.shape[-1])


def _positive_scale(scale) -> float:
    scale = float(scale)
    if not 0.0 < scale < math.inf:
        raise ValueError(f"softmax: scale must be positive and finite, got {scale}")
    return scale


def _check_out(name, out, like):
    """An error naming the kernel when ``out`` cannot hold the result (shaped like ``like``)."""
    if out is None:
        return
    if out.shape != like.shape or out.dtype != like.dtype:
        raise ShapeError(
            f"{name}: out of shape {out.shape} and dtype {out.dtype} for a result of shape "
            f"{like.shape} and dtype {like.dtype}"
        )


def _written(result, out, name):
    """``result``, copied into ``out`` when one is given (the twins' ``out``)."""
    if out is None:
        return result
    _check_out(name, out, result)
    out[...] = result
    return out


def _output_rows(out, like):
    """Rows to write the result into: ``out``'s own memory when it is C-contiguous."""
    if out is not None and out.flags.c_contiguous:
        return out.reshape(-1, like.shape[-1])
    return np.empty((like.size // like.shape[-1], like.shape[-1]), dtype=like.dtype)


def _shifted_exp(x):
    """``(exp(x - m), x rows, m)`` with ``m`` the row maxima: the forward's first two steps."""
    rows = _rows(x)
    exps = np.empty(rows.shape, dtype=x.dtype)
    row_max = np.empty(rows.shape[0], dtype=x.dtype)
    launch(_shift_by_row_max_numba, rows.size, rows, x.dtype.type(1), exps, row_max)
    np.exp(exps, out=exps)
    return exps, rows, row_max


def softmax(x, scale=1.0, out=None):
    """``exp(s (x - m)) / sum exp(s (x - m))`` over the last axis: ``softmax(s x)``, ``s > 0``.

    ``out`` (shaped and typed like ``x``) receives the result and may be ``x``.
    """
    if not use_numba(x) or (out is not None and not use_numba(x, out)):
        return softmax_reference(x, scale, out)
    _check("softmax", x)
    _check_out("softmax", out, x)
    scale = _positive_scale(scale)
    if x.size == 0:
        return np.empty_like(x) if out is None else out
    if scale == 1.0 and out is None:
        exps, _, _ = _shifted_exp(x)
    else:
        exps = _output_rows(out, x)
        row_max = np.empty(exps.shape[0], dtype=x.dtype)
        # The scale in x's dtype: a float64 one made the pass twice as slow on float32.
        launch(_shift_by_row_max_numba, exps.size, _rows(x), x.dtype.type(scale), exps, row_max)
        np.exp(exps, out=exps)
    launch(_normalize_rows_numba, exps.size, exps)
    return _placed(exps, out, x.shape)


def _placed(rows, out, shape):
    """The result rows as an array of ``shape``, in ``out`` when one is given."""
    if out is None:
        return rows.reshape(shape)
    if not out.flags.c_contiguous:  # the rows are a buffer of their own (_output_rows)
        out[...] = rows.reshape(shape)
    return out


def log_softmax(x):
    """``x - m - log sum exp(x - m)`` over the last axis."""
    if not use_numba(x):
        return log_softmax_reference(x)
    _check("log_softmax", x)
    if x.size == 0:
        return np.empty_like(x)
    exps, rows, row_max = _shifted_exp(x)
    launch(_log_normalize_rows_numba, exps.size, rows, row_max, exps)
    return exps.reshape(x.shape)


def softmax_backward(probabilities, cotangent, scale=1.0, out=None):
    """VJP of softmax from its output ``y``: ``s y (v - sum(v y))`` over the last axis.

    ``scale`` ``s`` (any float) is the VJP of ``softmax(s x)`` with respect to
    ``x``; ``out`` receives the result and may be ``cotangent``.
    """
    arrays = (probabilities, cotangent) + (() if out is None else (out,))
    if not use_numba(*arrays):
        return softmax_backward_reference(probabilities, cotangent, scale, out)
    _check("softmax_backward", probabilities, cotangent)
    _check_out("softmax_backward", out, probabilities)
    if probabilities.size == 0:
        return np.empty_like(probabilities) if out is None else out
    rows = _output_rows(out, probabilities)
    launch(
        _softmax_backward_numba,
        rows.size,
        _rows(probabilities),
        _rows(cotangent),
        float(scale),
        rows,
    )
    return _placed(rows, out, probabilities.shape)


def log_softmax_backward(log_probabilities, cotangent):
    """VJP of log-softmax from its output ``y``: ``v - exp(y) * sum(v)`` over the last axis."""
    if not use_numba(log_probabilities, cotangent):
        return log_softmax_backward_reference(log_probabilities, cotangent)
    _check("log_softmax_backward", log_probabilities, cotangent)
    if log_probabilities.size == 0:
        return np.empty_like(log_probabilities)
    probabilities = np.exp(_rows(log_probabilities))
    launch(_log_softmax_backward_numba, probabilities.size, _rows(cotangent), probabilities)
    return probabilities.reshape(log_probabilities.shape)
