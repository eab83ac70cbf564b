"""Batch normalisation over the channel axis, forward and backward, fused per channel.

Arrays are seen as ``(N, C, S)``: batch, channels, and every spatial position
flattened into ``S`` (1 for ``(N, C)`` inputs). Each channel ``c`` has
``m = N * S`` values.

    mean_c = sum x / m,   var_c = sum (x - mean_c)^2 / m   (biased)
    y = (x - mean_c) * rstd_c * weight_c + bias_c,   rstd_c = 1 / sqrt(var_c + eps)

Backward, with cotangent ``v`` and ``x_hat = (x - mean_c) * rstd_c``:

    dbias_c = sum v,   dweight_c = sum v * x_hat
    dx = weight_c rstd_c (v - dbias_c / m - x_hat dweight_c / m)   (batch statistics)
    dx = weight_c rstd_c v                                          (fixed statistics)

numpy reduces over the batch and spatial axes of an NCHW array with strided
passes and temporaries; the numba kernels read the array once per pass in
memory order: the channel sums per block of images (in parallel over blocks,
in float64, then added up), the normalisation and ``dx`` per ``(n, c)`` plane.
The backward recomputes ``x_hat`` from ``x``, so nothing of the input's size is
kept besides ``x`` itself. On a (128, 64, 10, 10) float32 batch, forward plus
backward took 2.0 ms against 13 ms for the numpy expressions they replaced
(one thread).

Channel-major arrays, whose memory is laid out as (C, N, S) (convolutions
return them: see :mod:`rbprop.ops.conv`), take kernels over the (C, N*S)
matrix of channel rows instead, one channel per task, each pass after the
first reading the channel's rows from cache; their results keep the layout
(``dx`` follows ``x``). On a (128, 128, 81) float32 batch they took 0.31 ms
for the statistics and 0.65 ms for the backward, against 0.45 and 1.05 ms for
the (N, C, S) kernels (one thread; the normalisation takes 0.39 ms in both).
Each function dispatches to numba for float32/float64 numpy arrays and to its
``*_reference`` numpy twin otherwise.
"""

from __future__ import annotations

import numba
import numpy as np

from ..primitive import ShapeError
from .dispatch import launch, use_numba
from .layernorm import row_mean_and_variance

# Reassociating the float64 channel sums lets LLVM vectorise them (see the
# layer-norm kernels); NaN and inf still propagate (no nnan, ninf).
_REASSOCIATE = {"reassoc", "nsz", "arcp"}


# ----------------------------------------------------------------------------- numba kernels


# The channel sums read the array in memory order, one block of images per
# task, into per-block partial sums that are added up afterwards: reading one
# channel at a time jumps across the whole array and was three times slower on
# a (128, 64, 100) cotangent that was not in cache.


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _channel_sums_numba(x, blocks, partial_sums):
    batch, channels, size = x.shape
    images_per_block = (batch + blocks - 1) // blocks
    for block in numba.prange(blocks):
        for n in range(block * images_per_block, min(batch, (block + 1) * images_per_block)):
            for c in range(channels):
                total = 0.0
                for s in range(size):
                    total += x[n, c, s]
                partial_sums[block, c] += total


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _centred_squares_numba(x, mean, blocks, partial_sums):
    batch, channels, size = x.shape
    images_per_block = (batch + blocks - 1) // blocks
    for block in numba.prange(blocks):
        for n in range(block * images_per_block, min(batch, (block + 1) * images_per_block)):
            for c in range(channels):
                channel_mean = mean[c]
                total = 0.0
                for s in range(size):
                    centred = x[n, c, s] - channel_mean
                    total += centred * centred
                partial_sums[block, c] += total


@numba.njit(cache=True, parallel=True)
def _normalize_numba(x, mean, scale, bias, y):
    # y = (x - mean_c) * scale_c + bias_c, with scale_c = rstd_c * weight_c.
    batch, channels, size = x.shape
    for plane in numba.prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        channel_mean, channel_scale, channel_bias = mean[c], scale[c], bias[c]
        for s in range(size):
            y[n, c, s] = (x[n, c, s] - channel_mean) * channel_scale + channel_bias


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _gradient_sums_numba(cotangent, x, mean, rstd, blocks, partial_v, partial_v_x_hat):
    # sum(v) and sum(v * x_hat) per channel, in memory order (see _channel_sums_numba).
    batch, channels, size = x.shape
    images_per_block = (batch + blocks - 1) // blocks
    for block in numba.prange(blocks):
        for n in range(block * images_per_block, min(batch, (block + 1) * images_per_block)):
            for c in range(channels):
                channel_mean, channel_rstd = mean[c], rstd[c]
                total = 0.0
                total_x_hat = 0.0
                for s in range(size):
                    value = cotangent[n, c, s]
                    total += value
                    total_x_hat += value * ((x[n, c, s] - channel_mean) * channel_rstd)
                partial_v[block, c] += total
                partial_v_x_hat[block, c] += total_x_hat


@numba.njit(cache=True, parallel=True)
def _centred_grad_numba(cotangent, x, mean, rstd, gain, mean_v, mean_v_x_hat, dx):
    # dx = gain_c (v - mean(v)_c - x_hat mean(v x_hat)_c), gain_c = weight_c rstd_c.
    batch, channels, size = x.shape
    for plane in numba.prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        channel_mean, channel_rstd, channel_gain = mean[c], rstd[c], gain[c]
        shift, slope = mean_v[c], mean_v_x_hat[c]
        for s in range(size):
            x_hat = (x[n, c, s] - channel_mean) * channel_rstd
            dx[n, c, s] = channel_gain * (cotangent[n, c, s] - shift - x_hat * slope)


@numba.njit(cache=True, parallel=True)
def _scaled_grad_numba(cotangent, gain, dx):
    batch, channels, size = cotangent.shape
    for plane in numba.prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        channel_gain = gain[c]
        for s in range(size):
            dx[n, c, s] = channel_gain * cotangent[n, c, s]


# Channel-major arrays (memory laid out as (C, N, S), as convolutions leave their
# output: see rbprop.ops.conv) are seen as the (C, M) matrix of their channels,
# M = N * S, each channel one contiguous row. One task per channel then does
# every pass over its row back to back, the later passes reading it from cache
# (a row of 128 * 81 float32 values is 41 KB): the statistics take two passes
# and the backward's sums and dx two, against one sweep of the whole array per
# pass in the (N, C, S) kernels above.


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _row_statistics_numba(rows, mean, variance):
    for c in numba.prange(rows.shape[0]):
        mean[c], variance[c] = row_mean_and_variance(rows, c)


@numba.njit(cache=True, parallel=True)
def _row_normalize_numba(rows, mean, scale, bias, y):
    # y = (x - mean_c) * scale_c + bias_c, one channel row per task.
    channels, count = rows.shape
    for c in numba.prange(channels):
        channel_mean, channel_scale, channel_bias = mean[c], scale[c], bias[c]
        for m in range(count):
            y[c, m] = (rows[c, m] - channel_mean) * channel_scale + channel_bias


@numba.njit(cache=True, fastmath=_REASSOCIATE, inline="always")
def _channel_gradient_sums(cotangent, rows, c, channel_mean, channel_rstd):
    """``(sum_m v, sum_m v x_hat)`` over channel ``c``'s row of a channel-major array."""
    total = 0.0
    total_x_hat = 0.0
    for m in range(rows.shape[1]):
        value = cotangent[c, m]
        total += value
        total_x_hat += value * ((rows[c, m] - channel_mean) * channel_rstd)
    return total, total_x_hat


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _row_gradient_sums_numba(cotangent, rows, mean, rstd, sum_v, sum_v_x_hat):
    for c in numba.prange(rows.shape[0]):
        sum_v[c], sum_v_x_hat[c] = _channel_gradient_sums(cotangent, rows, c, mean[c], rstd[c])


@numba.njit(cache=True, parallel=True, fastmath=_REASSOCIATE)
def _row_centred_grad_numba(cotangent, rows, mean, rstd, gain, sum_v, sum_v_x_hat, means, dx):
    # Both sums of a channel, then its dx while its rows are in cache:
    # dx = gain_c (v - mean(v)_c - x_hat mean(v x_hat)_c), gain_c = weight_c rstd_c.
    channels, count = rows.shape
    for c in numba.prange(channels):
        channel_mean, channel_rstd, channel_gain = mean[c], rstd[c], gain[c]
        total, total_x_hat = _channel_gradient_sums(cotangent, rows, c, channel_mean, channel_rstd)
        sum_v[c] = total
        sum_v_x_hat[c] = total_x_hat
        # Stored in `means`, of the arrays' dtype, the two means round to that dtype
        # (as the (N, C, S) kernel takes them) and keep the loop below in it.
        means[0, c] = total / count
        means[1, c] = total_x_hat / count
        shift, slope = means[0, c], means[1, c]
        for m in range(count):
            x_hat = (rows[c, m] - channel_mean) * channel_rstd
            dx[c, m] = channel_gain * (cotangent[c, m] - shift - x_hat * slope)


@numba.njit(cache=True, parallel=True)
def _row_scaled_grad_numba(cotangent, gain, dx):
    channels, count = cotangent.shape
    for c in numba.prange(channels):
        channel_gain = gain[c]
        for m in range(count):
            dx[c, m] = channel_gain * cotangent[c, m]


# ----------------------------------------------------------------------------- checks


def _check(name, x, **per_channel):
    if x.ndim != 3:
        raise ShapeError(f"{name}: input must be (N, C, S), got shape {x.shape}")
    for label, array in per_channel.items():
        if array is not None and tuple(array.shape) != (x.shape[1],):
            raise ShapeError(
                f"{name}: {label} of shape {tuple(array.shape)} for an input of shape "
                f"{x.shape} ({x.shape[1]} channels)"
            )


def _per_channel(values):
    return values.reshape(1, -1, 1)


# ----------------------------------------------------------------------------- numpy twins


def batch_norm_statistics_reference(x):
    """numpy twin of :func:`batch_norm_statistics`."""
    _check("batch_norm_statistics", x)
    return x.mean(axis=(0, 2), dtype=np.float64), x.var(axis=(0, 2), dtype=np.float64)


def batch_norm_normalize_reference(x, mean, rstd, weight=None, bias=None):
    """numpy twin of :func:`batch_norm_normalize`."""
    _check("batch_norm_normalize", x, mean=mean, rstd=rstd, weight=weight, bias=bias)
    scale = rstd if weight is None else rstd * weight
    y = (x - _per_channel(mean)) * _per_channel(scale)
    if bias is not None:
        y = y + _per_channel(bias)
    return y.astype(x.dtype, copy=False)


def batch_norm_backward_reference(
    cotangent, x, mean, rstd, weight=None, centring=True, input_grad=True
):
    """numpy twin of :func:`batch_norm_backward`."""
    _check_backward(cotangent, x, mean, rstd, weight, centring)
    dtype = cotangent.dtype
    gain = _per_channel(rstd if weight is None else rstd * weight)
    if x is None:
        dx = (gain * cotangent).astype(dtype, copy=False) if input_grad else None
        return dx, None, None
    x_hat = (x - _per_channel(mean)) * _per_channel(rstd)
    sum_v = cotangent.sum(axis=(0, 2))
    sum_v_x_hat = (cotangent * x_hat).sum(axis=(0, 2))
    dx = None
    if input_grad and centring:
        count = cotangent.shape[0] * cotangent.shape[2]
        mean_v, mean_v_x_hat = _per_channel(sum_v / count), _per_channel(sum_v_x_hat / count)
        dx = (gain * (cotangent - mean_v - x_hat * mean_v_x_hat)).astype(dtype, copy=False)
    elif input_grad:
        dx = (gain * cotangent).astype(dtype, copy=False)
    return dx, sum_v_x_hat.astype(dtype, copy=False), sum_v.astype(dtype, copy=False)


def _check_backward(cotangent, x, mean, rstd, weight, centring):
    _check("batch_norm_backward", cotangent, rstd=rstd, weight=weight)
    if x is None:
        if centring:
            raise ValueError("batch_norm_backward: the batch-statistics gradient needs x and mean")
        return
    if x.shape != cotangent.shape:
        raise ShapeError(
            f"batch_norm_backward: cotangent of shape {cotangent.shape} does not match the "
            f"input of shape {x.shape}"
        )
    _check("batch_norm_backward", x, mean=mean)


# ----------------------------------------------------------------------------- dispatchers


def _blocks(batch):
    """Blocks of images for the channel sums: enough to keep every thread busy."""
    return max(1, min(batch, 4 * numba.get_num_threads()))


def _channel_rows(array):
    """The (C, N*S) matrix of a channel-major (N, C, S) array (a view), else None."""
    moved = array.transpose(1, 0, 2)
    if array.size == 0 or not moved.flags.c_contiguous:
        return None
    return moved.reshape(array.shape[1], -1)


def _as_channel_rows(array):
    """:func:`_channel_rows`, copying ``array`` into that layout when it is not in it."""
    rows = _channel_rows(array)
    if rows is None:
        rows = np.ascontiguousarray(array.transpose(1, 0, 2)).reshape(array.shape[1], -1)
    return rows


def _from_channel_rows(rows, shape):
    """The (N, C, S) view of the channel rows ``rows`` (C, N*S): channel-major."""
    batch, channels, size = shape
    return rows.reshape(channels, batch, size).transpose(1, 0, 2)


def batch_norm_statistics(x):
    """``(mean, var)`` per channel of ``x`` (N, C, S), biased, both float64 of shape (C,)."""
    if not use_numba(x):
        return batch_norm_statistics_reference(x)
    _check("batch_norm_statistics", x)
    count = x.shape[0] * x.shape[2]
    if count == 0:
        nothing = np.full(x.shape[1], np.nan)  # as numpy's mean of nothing
        return nothing, nothing.copy()
    rows = _channel_rows(x)
    if rows is not None:
        mean, variance = np.empty(x.shape[1]), np.empty(x.shape[1])
        launch(_row_statistics_numba, x.size, rows, mean, variance)
        return mean, variance
    x = np.ascontiguousarray(x)
    blocks = _blocks(x.shape[0])
    partial_sums = np.zeros((blocks, x.shape[1]))
    launch(_channel_sums_numba, x.size, x, blocks, partial_sums)
    mean = partial_sums.sum(axis=0) / count
    partial_sums[:] = 0.0
    launch(_centred_squares_numba, x.size, x, mean, blocks, partial_sums)
    return mean, partial_sums.sum(axis=0) / count


def batch_norm_normalize(x, mean, rstd, weight=None, bias=None):
    """``(x - mean_c) * rstd_c * weight_c + bias_c`` over ``x`` (N, C, S), in ``x``'s dtype.

    The result has ``x``'s layout when ``x`` is channel-major, else it is C-contiguous.
    """
    parameters = [p for p in (weight, bias) if p is not None]
    if not use_numba(x, mean, rstd, *parameters):
        return batch_norm_normalize_reference(x, mean, rstd, weight, bias)
    _check("batch_norm_normalize", x, mean=mean, rstd=rstd, weight=weight, bias=bias)
    scale = rstd if weight is None else rstd * weight
    bias = np.zeros_like(mean) if bias is None else bias
    rows = _channel_rows(x)
    if rows is not None:
        y_rows = np.empty_like(rows)
        launch(_row_normalize_numba, x.size, rows, mean, scale, bias, y_rows)
        return _from_channel_rows(y_rows, x.shape)
    y = np.empty(x.shape, dtype=x.dtype)
    launch(_normalize_numba, x.size, np.ascontiguousarray(x), mean, scale, bias, y)
    return y


def batch_norm_backward(cotangent, x, mean, rstd, weight=None, centring=True, input_grad=True):
    """``(dx, dweight, dbias)`` of :func:`batch_norm_normalize` for (N, C, S) arrays.

    ``centring=True`` is the training-mode gradient, through the batch
    statistics that ``mean`` and ``rstd`` came from; ``False`` treats them as
    constants (eval mode). ``x`` and ``mean`` may be None in eval mode when only
    ``dx`` is wanted; ``dweight`` and ``dbias`` are then None. ``dx`` is None
    when ``input_grad`` is False. ``dx`` is channel-major when ``x`` is (or, without
    ``x``, the cotangent), else C-contiguous.
    """
    arrays = [a for a in (cotangent, x, mean, rstd, weight) if a is not None]
    if not use_numba(*arrays):
        return batch_norm_backward_reference(
            cotangent, x, mean, rstd, weight, centring, input_grad
        )
    _check_backward(cotangent, x, mean, rstd, weight, centring)
    gain = rstd if weight is None else rstd * weight
    layout_of = cotangent if x is None else x
    if _channel_rows(layout_of) is not None:
        return _channel_major_backward(cotangent, x, mean, rstd, gain, centring, input_grad)

    cotangent = np.ascontiguousarray(cotangent)
    dx = np.empty(cotangent.shape, dtype=cotangent.dtype) if input_grad else None
    if x is None:
        if input_grad:
            launch(_scaled_grad_numba, dx.size, cotangent, gain, dx)
        return dx, None, None

    x = np.ascontiguousarray(x)
    blocks = _blocks(x.shape[0])
    partial_v = np.zeros((blocks, x.shape[1]))
    partial_v_x_hat = np.zeros((blocks, x.shape[1]))
    sums = (blocks, partial_v, partial_v_x_hat)
    launch(_gradient_sums_numba, x.size, cotangent, x, mean, rstd, *sums)
    sum_v, sum_v_x_hat = partial_v.sum(axis=0), partial_v_x_hat.sum(axis=0)
    if input_grad and centring:
        count = max(1, x.shape[0] * x.shape[2])
        mean_v = (sum_v / count).astype(x.dtype)
        mean_v_x_hat = (sum_v_x_hat / count).astype(x.dtype)
        statistics = (mean, rstd, gain, mean_v, mean_v_x_hat)
        launch(_centred_grad_numba, dx.size, cotangent, x, *statistics, dx)
    elif input_grad:
        launch(_scaled_grad_numba, dx.size, cotangent, gain, dx)
    return dx, sum_v_x_hat.astype(x.dtype), sum_v.astype(x.dtype)


def _channel_major_backward(cotangent, x, mean, rstd, gain, centring, input_grad):
    """:func:`batch_norm_backward` on channel rows, for channel-major (non-empty) arrays."""
    shape, channels = cotangent.shape, cotangent.shape[1]
    v_rows = _as_channel_rows(cotangent)
    dx_rows = np.empty_like(v_rows) if input_grad else None
    dx = None if dx_rows is None else _from_channel_rows(dx_rows, shape)
    if x is None:
        if input_grad:
            launch(_row_scaled_grad_numba, v_rows.size, v_rows, gain, dx_rows)
        return dx, None, None

    x_rows = _channel_rows(x)
    sum_v, sum_v_x_hat = np.empty(channels), np.empty(channels)
    if input_grad and centring:
        means = np.empty((2, channels), dtype=x.dtype)
        statistics = (mean, rstd, gain, sum_v, sum_v_x_hat, means)
        launch(_row_centred_grad_numba, x.size, v_rows, x_rows, *statistics, dx_rows)
    else:
        launch(_row_gradient_sums_numba, x.size, v_rows, x_rows, mean, rstd, sum_v, sum_v_x_hat)
        if input_grad:
            launch(_row_scaled_grad_numba, v_rows.size, v_rows, gain, dx_rows)
    return dx, sum_v_x_hat.astype(x.dtype), sum_v.astype(x.dtype)
