"""Layer normalisation over the last axis, forward and backward, fused per row.

Forward, for each row ``x`` of length ``D``:

    mean = sum_j x_j / D,   var = sum_j (x_j - mean)^2 / D,   rstd = 1 / sqrt(var + eps)
    xhat = (x - mean) * rstd,   y = xhat * weight + bias

Backward, with cotangent ``v`` and ``g = v * weight``:

    dx      = rstd * (g - mean_j(g) - xhat * mean_j(g * xhat))
    dweight = sum over rows of v * xhat,   dbias = sum over rows of v

The forward returns ``mean`` and ``rstd`` (one per row) for the backward,
which recomputes ``xhat`` from ``x`` instead of keeping it. The numba kernels
make one row's passes back to back, in parallel over rows, and sum in float64
(in any order: see ``_REASSOCIATE``);
the parameter gradients are summed per block of rows, then over blocks, so
threads never write the same element. To normalise over several trailing
axes, reshape them into one first. Each function dispatches to numba for
float32/float64 numpy arrays and to its ``*_reference`` numpy twin otherwise.
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
# Strict IEEE order keeps LLVM from vectorising a float64 sum over a row; letting
# it reassociate made the forward 5 times and the backward 2 times faster on
# (6400, 64) float32 rows, with results within a few float32 ulps. NaN and inf
# still propagate: the flags that assume them away (nnan, ninf) are not set.
# Without "contract" (fused multiply-add) y = x_hat * weight + bias rounds as
# numpy's twin does.
_REASSOCIATE = {"reassoc", "nsz", "arcp"}


@numba.njit(cache=True, fastmath=_REASSOCIATE, inline="always")
def row_mean_and_variance(x, r):
    """Mean and (biased) variance of row ``r`` of a 2-D array, in two passes.

    Two passes (the mean, then the centred squares) rather than one of sums
    and sums of squares, which cancels catastrophically when the mean is large.
    Shared by the layer-norm and channel-major batch-norm kernels.
    """
    length = x.shape[1]
    total = 0.0
    for j in range(length):
        total += x[r, j]
    row_mean = total / length
    squares = 0.0
    for j in range(length):
        centred = x[r, j] - row_mean
        squares += centred * centred
    return row_mean, squares / length


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _layer_norm_forward_numba(x, weight, bias, eps, y, mean, rstd):
    rows, length = x.shape
    for r in numba.prange(rows):
        row_mean, row_variance = row_mean_and_variance(x, r)
        row_rstd = 1.0 / math.sqrt(row_variance + eps)
        mean[r] = row_mean
        rstd[r] = row_rstd
        # The statistics read back in x's dtype, so that this loop runs in it.
        row_mean_x = mean[r]
        row_rstd_x = rstd[r]
        for j in range(length):
            y[r, j] = (x[r, j] - row_mean_x) * row_rstd_x * weight[j] + bias[j]


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _layer_norm_backward_numba(
    cotangent, x, weight, mean, rstd, blocks, dx, weight_parts, bias_parts
):
    rows, length = x.shape
    rows_per_block = (rows + blocks - 1) // blocks
    for block in numba.prange(blocks):
        weight_sums = weight_parts[block]
        bias_sums = bias_parts[block]
        for r in range(block * rows_per_block, min(rows, (block + 1) * rows_per_block)):
            row_mean = mean[r]
            row_rstd = rstd[r]
            # The first pass only reduces, the second only writes: mixing the parameter
            # sums into the first kept it from vectorising (0.52 against 0.40 ms on
            # (6400, 64) float32 rows).
            g_sum = 0.0
            g_xhat_sum = 0.0
            for j in range(length):
                xhat = (x[r, j] - row_mean) * row_rstd
                g = cotangent[r, j] * weight[j]
                g_sum += g
                g_xhat_sum += g * xhat
            g_mean = g_sum / length
            g_xhat_mean = g_xhat_sum / length
            for j in range(length):
                xhat = (x[r, j] - row_mean) * row_rstd
                v = cotangent[r, j]
                weight_sums[j] += v * xhat
                bias_sums[j] += v
                dx[r, j] = row_rstd * (v * weight[j] - g_mean - xhat * g_xhat_mean)


# ----------------------------------------------------------------------------- numpy twins


def _check_forward(x, weight, bias):
    if x.ndim < 1:
        raise ShapeError("layer_norm: needs at least one axis, got a 0-d array")
    if x.shape[-1] == 0:
        raise ShapeError(f"layer_norm: cannot normalise an empty last axis (shape {x.shape})")
    for name, parameter in (("weight", weight), ("bias", bias)):
        if parameter is not None and tuple(parameter.shape) != (x.shape[-1],):
            raise ShapeError(
                f"layer_norm: {name} of shape {tuple(parameter.shape)} does not match the last "
                f"axis of the input of shape {x.shape}"
            )


def _check_backward(cotangent, x, weight, mean, rstd):
    _check_forward(x, weight, None)
    if cotangent.shape != x.shape:
        raise ShapeError(
            f"layer_norm_backward: cotangent of shape {cotangent.shape} does not match the "
            f"input of shape {x.shape}"
        )
    for name, statistic in (("mean", mean), ("rstd", rstd)):
        if tuple(statistic.shape) != x.shape[:-1]:
            raise ShapeError(
                f"layer_norm_backward: {name} of shape {tuple(statistic.shape)} must have the "
                f"input's leading shape {x.shape[:-1]}"
            )


def layer_norm_forward_reference(x, weight=None, bias=None, eps=1e-5):
    """numpy twin of :func:`layer_norm_forward`."""
    _check_forward(x, weight, bias)
    xp = array_module(x)
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    rstd = 1.0 / xp.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
    y = centred * rstd
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False), mean[..., 0], rstd[..., 0].astype(x.dtype, copy=False)


def layer_norm_backward_reference(cotangent, x, weight, mean, rstd):
    """numpy twin of :func:`layer_norm_backward`."""
    _check_backward(cotangent, x, weight, mean, rstd)
    length = x.shape[-1]
    xhat = (x - mean[..., None]) * rstd[..., None]
    g = cotangent if weight is None else cotangent * weight
    g_mean = g.mean(axis=-1, keepdims=True)
    g_xhat_mean = (g * xhat).mean(axis=-1, keepdims=True)
    dx = rstd[..., None] * (g - g_mean - xhat * g_xhat_mean)
    dweight = (cotangent * xhat).reshape(-1, length).sum(axis=0)
    dbias = cotangent.reshape(-1, length).sum(axis=0)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- dispatchers


def _parameter(parameter, length, fill, dtype):
    if parameter is None:
        return np.full(length, fill, dtype=dtype)
    return np.ascontiguousarray(parameter, dtype=dtype)


def layer_norm_forward(x, weight=None, bias=None, eps=1e-5):
    """``(y, mean, rstd)``: layer norm of ``x`` over its last axis, and the row statistics.

    ``weight`` and ``bias`` (shape ``(D,)``) may be None (no affine part);
    ``mean`` and ``rstd`` have shape ``x.shape[:-1]``.
    """
    parameters = [p for p in (weight, bias) if p is not None]
    if not use_numba(x, *parameters):
        return layer_norm_forward_reference(x, weight, bias, eps)
    _check_forward(x, weight, bias)
    length = x.shape[-1]
    rows = np.ascontiguousarray(x).reshape(-1, length)
    y = np.empty(rows.shape, dtype=x.dtype)
    mean = np.empty(rows.shape[0], dtype=x.dtype)
    rstd = np.empty(rows.shape[0], dtype=x.dtype)
    if x.size:
        launch(
            _layer_norm_forward_numba,
            x.size,
            rows,
            _parameter(weight, length, 1.0, x.dtype),
            _parameter(bias, length, 0.0, x.dtype),
            float(eps),
            y,
            mean,
            rstd,
        )
    return y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


def layer_norm_backward(cotangent, x, weight, mean, rstd):
    """``(dx, dweight, dbias)`` from the cotangent ``v`` and the forward's ``mean``, ``rstd``.

    ``weight=None`` means no affine part (a weight of ones); ``dweight`` and
    ``dbias`` are returned either way, for the caller to keep or drop.
    """
    parameters = [] if weight is None else [weight]
    if not use_numba(cotangent, x, mean, rstd, *parameters):
        return layer_norm_backward_reference(cotangent, x, weight, mean, rstd)
    _check_backward(cotangent, x, weight, mean, rstd)
    length = x.shape[-1]
    rows = np.ascontiguousarray(x).reshape(-1, length)
    # Enough blocks to keep every thread busy; few enough that summing them is cheap.
    blocks = max(1, min(rows.shape[0], 4 * numba.get_num_threads()))
    dx = np.empty(rows.shape, dtype=x.dtype)
    weight_parts = np.zeros((blocks, length))
    bias_parts = np.zeros((blocks, length))
    if x.size:
        launch(
            _layer_norm_backward_numba,
            x.size,
            np.ascontiguousarray(cotangent).reshape(-1, length),
            rows,
            _parameter(weight, length, 1.0, x.dtype),
            np.ascontiguousarray(mean).reshape(-1),
            np.ascontiguousarray(rstd).reshape(-1),
            blocks,
            dx,
            weight_parts,
            bias_parts,
        )
    dweight = weight_parts.sum(axis=0).astype(x.dtype)
    dbias = bias_parts.sum(axis=0).astype(x.dtype)
    return dx.reshape(x.shape), dweight, dbias
