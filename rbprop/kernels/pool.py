"""2-D max and average pooling over NCHW images, forward and backward.

Windows are ``kh x kw``, placed every ``(sh, sw)`` pixels on the image padded by
``(ph, pw)``: output ``(oh, ow)`` covers rows ``oh * sh - ph + i`` and columns
``ow * sw - pw + j`` for ``i < kh``, ``j < kw``, with ``OH = (H + 2 ph - kh) // sh + 1``.

* Max pooling ignores the padding (it acts as ``-inf``) and returns, with each
  maximum, its position ``i * kw + j`` inside the window (uint8 for windows of
  up to 255 pixels, so the backward keeps one byte per output); the first
  maximum in row-major window order wins ties. The backward adds each
  cotangent to the pixel its position names.
* Average pooling divides each window sum by ``kh * kw``, or, with
  ``count_include_pad=False``, by the number of real (unpadded) pixels in the
  window; the backward spreads each cotangent evenly over the same pixels.

The numba kernels run one ``(n, c)`` plane per iteration, in parallel over
planes, so backward adds never race. Each function dispatches to numba for
float32/float64 numpy arrays and to its ``*_reference`` numpy twin otherwise.
"""

from __future__ import annotations

import numba
import numpy as np

from ..backend import array_module
from ..primitive import ShapeError
from .conv import conv_output_size
from .dispatch import as_pair, launch, use_numba


def _geometry(name, input_shape, kernel_size, stride, padding):
    """``(kh, kw), (sh, sw), (ph, pw), (OH, OW)``, validated (stride defaults to the kernel)."""
    kh, kw = as_pair(name, "kernel_size", kernel_size)
    stride = (kh, kw) if stride is None else as_pair(name, "stride", stride)
    ph, pw = as_pair(name, "padding", padding)
    if 2 * ph > kh or 2 * pw > kw:
        raise ValueError(
            f"{name}: padding ({ph}, {pw}) must be at most half the kernel size ({kh}, {kw})"
        )
    out_size = conv_output_size(input_shape, kh, kw, stride, (ph, pw), name)
    return (kh, kw), stride, (ph, pw), out_size


def _position_dtype(kh, kw):
    """The smallest integer type that holds a position ``i * kw + j`` in the window."""
    return np.dtype(np.uint8) if kh * kw <= 255 else np.dtype(np.int32)


def _check_cotangent(name, cotangent, input_shape, out_size):
    expected = tuple(input_shape[:2]) + tuple(out_size)
    if tuple(cotangent.shape) != expected:
        raise ShapeError(
            f"{name}: cotangent of shape {cotangent.shape} does not match the pooled output "
            f"shape {expected} of an input of shape {tuple(input_shape)}"
        )


# ----------------------------------------------------------------------------- numba kernels


@numba.njit(cache=True)
def _inside(top, left, kh, kw, height, width):
    """Whether the window at (``top``, ``left``) lies wholly inside the image."""
    return top >= 0 and top + kh <= height and left >= 0 and left + kw <= width


@numba.njit(cache=True, parallel=True)
def _max_pool_numba(x, kh, kw, sh, sw, ph, pw, y, positions):
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    out_height, out_width = y.shape[2], y.shape[3]
    for plane in numba.prange(x.shape[0] * channels):
        image = x[plane // channels, plane % channels]
        pooled = y[plane // channels, plane % channels]
        where = positions[plane // channels, plane % channels]
        for oh in range(out_height):
            top = oh * sh - ph
            for ow in range(out_width):
                left = ow * sw - pw
                # The first tap inside the image starts the search; later taps
                # replace it only when strictly larger (the first maximum wins).
                if _inside(top, left, kh, kw, height, width):
                    best = image[top, left]
                    best_position = 0
                    for i in range(kh):
                        image_row = image[top + i]
                        for j in range(kw):
                            if image_row[left + j] > best:
                                best = image_row[left + j]
                                best_position = i * kw + j
                else:
                    best = -np.inf
                    best_position = -1
                    for i in range(max(0, -top), min(kh, height - top)):
                        for j in range(max(0, -left), min(kw, width - left)):
                            if best_position < 0 or image[top + i, left + j] > best:
                                best = image[top + i, left + j]
                                best_position = i * kw + j
                pooled[oh, ow] = best
                where[oh, ow] = best_position


@numba.njit(cache=True, parallel=True)
def _max_pool_backward_numba(cotangent, positions, kw, sh, sw, ph, pw, grad):
    channels = grad.shape[1]
    out_height, out_width = cotangent.shape[2], cotangent.shape[3]
    for plane in numba.prange(grad.shape[0] * channels):
        n = plane // channels
        c = plane - n * channels
        for oh in range(out_height):
            for ow in range(out_width):
                i, j = divmod(np.int64(positions[n, c, oh, ow]), kw)
                h, w = oh * sh - ph + i, ow * sw - pw + j
                # A maximum in the padding (all-NaN or -inf windows) has no pixel to reach.
                if 0 <= h < grad.shape[2] and 0 <= w < grad.shape[3]:
                    grad[n, c, h, w] += cotangent[n, c, oh, ow]


@numba.njit(cache=True)
def _window_divisor(top, left, kh, kw, height, width, count_include_pad):
    """``kh * kw``, or the number of real pixels in the window."""
    if count_include_pad:
        return kh * kw
    rows = min(top + kh, height) - max(top, 0)
    columns = min(left + kw, width) - max(left, 0)
    return rows * columns


@numba.njit(cache=True, parallel=True)
def _avg_pool_numba(x, kh, kw, sh, sw, ph, pw, count_include_pad, y):
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    out_height, out_width = y.shape[2], y.shape[3]
    for plane in numba.prange(x.shape[0] * channels):
        image = x[plane // channels, plane % channels]
        pooled = y[plane // channels, plane % channels]
        for oh in range(out_height):
            top = oh * sh - ph
            for ow in range(out_width):
                left = ow * sw - pw
                total = 0.0
                if _inside(top, left, kh, kw, height, width):
                    for i in range(kh):
                        image_row = image[top + i]
                        for j in range(kw):
                            total += image_row[left + j]
                else:
                    for h in range(max(top, 0), min(top + kh, height)):
                        for w in range(max(left, 0), min(left + kw, width)):
                            total += image[h, w]
                divisor = _window_divisor(top, left, kh, kw, height, width, count_include_pad)
                pooled[oh, ow] = total / divisor


@numba.njit(cache=True, parallel=True)
def _avg_pool_backward_numba(cotangent, kh, kw, sh, sw, ph, pw, count_include_pad, grad):
    channels, height, width = grad.shape[1], grad.shape[2], grad.shape[3]
    out_height, out_width = cotangent.shape[2], cotangent.shape[3]
    for plane in numba.prange(grad.shape[0] * channels):
        image_grad = grad[plane // channels, plane % channels]
        pooled_grad = cotangent[plane // channels, plane % channels]
        for oh in range(out_height):
            top = oh * sh - ph
            for ow in range(out_width):
                left = ow * sw - pw
                divisor = _window_divisor(top, left, kh, kw, height, width, count_include_pad)
                share = pooled_grad[oh, ow] / divisor
                if _inside(top, left, kh, kw, height, width):
                    for i in range(kh):
                        image_row = image_grad[top + i]
                        for j in range(kw):
                            image_row[left + j] += share
                else:
                    for h in range(max(top, 0), min(top + kh, height)):
                        for w in range(max(left, 0), min(left + kw, width)):
                            image_grad[h, w] += share


# ----------------------------------------------------------------------------- numpy twins


def _window_slices(i, j, stride, out_size):
    """The slice of the padded image that kernel offset ``(i, j)`` reads for every output."""
    (sh, sw), (out_height, out_width) = stride, out_size
    return (
        slice(None),
        slice(None),
        slice(i, i + sh * (out_height - 1) + 1, sh),
        slice(j, j + sw * (out_width - 1) + 1, sw),
    )


def _pad(xp, x, padding, value):
    (ph, pw) = padding
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def max_pool2d_reference(x, kernel_size, stride=None, padding=0):
    """numpy twin of :func:`max_pool2d`: all windows stacked on a last axis, then argmax."""
    xp = array_module(x)
    (kh, kw), stride, padding, out_size = _geometry(
        "max_pool2d", x.shape, kernel_size, stride, padding
    )
    padded = _pad(xp, x, padding, -np.inf)
    windows = xp.stack(
        [padded[_window_slices(i, j, stride, out_size)] for i in range(kh) for j in range(kw)],
        axis=-1,
    )
    positions = windows.argmax(axis=-1)
    pooled = xp.take_along_axis(windows, positions[..., None], axis=-1)[..., 0]
    return pooled, positions.astype(_position_dtype(kh, kw))


def max_pool2d_backward_reference(
    cotangent, positions, input_shape, kernel_size, stride=None, padding=0
):
    """numpy twin of :func:`max_pool2d_backward`: one strided slice per window offset.

    Offset ``(i, j)`` receives the cotangents whose window maximum sits there.
    """
    xp = array_module(cotangent)
    (kh, kw), stride, (ph, pw), out_size = _geometry(
        "max_pool2d_backward", input_shape, kernel_size, stride, padding
    )
    _check_max_backward(cotangent, positions, input_shape, out_size)
    batch, channels, height, width = input_shape
    padded = xp.zeros((batch, channels, height + 2 * ph, width + 2 * pw), dtype=cotangent.dtype)
    zero = xp.zeros((), dtype=cotangent.dtype)
    for i in range(kh):
        for j in range(kw):
            padded[_window_slices(i, j, stride, out_size)] += xp.where(
                positions == i * kw + j, cotangent, zero
            )
    return xp.ascontiguousarray(padded[:, :, ph : ph + height, pw : pw + width])


def _check_max_backward(cotangent, positions, input_shape, out_size):
    _check_cotangent("max_pool2d_backward", cotangent, input_shape, out_size)
    if positions.shape != cotangent.shape:
        raise ShapeError(
            f"max_pool2d_backward: positions of shape {positions.shape} do not match the "
            f"cotangent of shape {cotangent.shape}"
        )


def _avg_divisor(xp, input_shape, kernel, stride, padding, out_size, count_include_pad, dtype):
    """``kh * kw``, or per output the number of real pixels under its window."""
    if count_include_pad:
        return kernel[0] * kernel[1]
    ones = _pad(xp, xp.ones((1, 1) + tuple(input_shape[2:]), dtype=dtype), padding, 0)
    counts = xp.zeros(out_size, dtype=dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            counts += ones[_window_slices(i, j, stride, out_size)][0, 0]
    return counts


def avg_pool2d_reference(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """numpy twin of :func:`avg_pool2d`: a sum of strided slices, then the division."""
    xp = array_module(x)
    kernel, stride, padding, out_size = _geometry(
        "avg_pool2d", x.shape, kernel_size, stride, padding
    )
    padded = _pad(xp, x, padding, 0)
    total = xp.zeros(tuple(x.shape[:2]) + out_size, dtype=x.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            total += padded[_window_slices(i, j, stride, out_size)]
    divisor = _avg_divisor(
        xp, x.shape, kernel, stride, padding, out_size, count_include_pad, x.dtype
    )
    return total / divisor


def avg_pool2d_backward_reference(
    cotangent, input_shape, kernel_size, stride=None, padding=0, count_include_pad=True
):
    """numpy twin of :func:`avg_pool2d_backward`: each window's share added slice by slice."""
    xp = array_module(cotangent)
    kernel, stride, padding, out_size = _geometry(
        "avg_pool2d_backward", input_shape, kernel_size, stride, padding
    )
    _check_cotangent("avg_pool2d_backward", cotangent, input_shape, out_size)
    batch, channels, height, width = input_shape
    (ph, pw) = padding
    share = cotangent / _avg_divisor(
        xp, input_shape, kernel, stride, padding, out_size, count_include_pad, cotangent.dtype
    )
    padded = xp.zeros((batch, channels, height + 2 * ph, width + 2 * pw), dtype=cotangent.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            padded[_window_slices(i, j, stride, out_size)] += share
    return xp.ascontiguousarray(padded[:, :, ph : ph + height, pw : pw + width])


# ----------------------------------------------------------------------------- dispatchers


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """``(y, positions)``: window maxima of NCHW ``x`` and where in its window each lies.

    ``positions[n, c, oh, ow] = i * kw + j`` for the window offset ``(i, j)`` of the
    maximum; ``stride`` defaults to ``kernel_size``, as in PyTorch.
    """
    if not use_numba(x):
        return max_pool2d_reference(x, kernel_size, stride, padding)
    (kh, kw), (sh, sw), (ph, pw), out_size = _geometry(
        "max_pool2d", x.shape, kernel_size, stride, padding
    )
    shape = tuple(x.shape[:2]) + out_size
    pooled = np.empty(shape, dtype=x.dtype)
    positions = np.empty(shape, dtype=_position_dtype(kh, kw))
    geometry = (kh, kw, sh, sw, ph, pw)
    launch(_max_pool_numba, x.size, np.ascontiguousarray(x), *geometry, pooled, positions)
    return pooled, positions


def max_pool2d_backward(cotangent, positions, input_shape, kernel_size, stride=None, padding=0):
    """Gradient of :func:`max_pool2d`: each cotangent added to its window's maximum."""
    if not use_numba(cotangent):
        return max_pool2d_backward_reference(
            cotangent, positions, input_shape, kernel_size, stride, padding
        )
    (kh, kw), (sh, sw), (ph, pw), out_size = _geometry(
        "max_pool2d_backward", input_shape, kernel_size, stride, padding
    )
    _check_max_backward(cotangent, positions, input_shape, out_size)
    grad = np.zeros(tuple(input_shape), dtype=cotangent.dtype)
    launch(
        _max_pool_backward_numba,
        cotangent.size,
        np.ascontiguousarray(cotangent),
        np.ascontiguousarray(positions),
        kw,
        sh,
        sw,
        ph,
        pw,
        grad,
    )
    return grad


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    """Window means of NCHW ``x`` (``stride`` defaults to ``kernel_size``, as in PyTorch)."""
    if not use_numba(x):
        return avg_pool2d_reference(x, kernel_size, stride, padding, count_include_pad)
    (kh, kw), (sh, sw), (ph, pw), out_size = _geometry(
        "avg_pool2d", x.shape, kernel_size, stride, padding
    )
    pooled = np.empty(tuple(x.shape[:2]) + out_size, dtype=x.dtype)
    geometry = (kh, kw, sh, sw, ph, pw, bool(count_include_pad))
    launch(_avg_pool_numba, x.size, np.ascontiguousarray(x), *geometry, pooled)
    return pooled


def avg_pool2d_backward(
    cotangent, input_shape, kernel_size, stride=None, padding=0, count_include_pad=True
):
    """Gradient of :func:`avg_pool2d`: each cotangent spread evenly over its window."""
    if not use_numba(cotangent):
        return avg_pool2d_backward_reference(
            cotangent, input_shape, kernel_size, stride, padding, count_include_pad
        )
    (kh, kw), (sh, sw), (ph, pw), out_size = _geometry(
        "avg_pool2d_backward", input_shape, kernel_size, stride, padding
    )
    _check_cotangent("avg_pool2d_backward", cotangent, input_shape, out_size)
    grad = np.zeros(tuple(input_shape), dtype=cotangent.dtype)
    geometry = (kh, kw, sh, sw, ph, pw, bool(count_include_pad))
    launch(_avg_pool_backward_numba, grad.size, np.ascontiguousarray(cotangent), *geometry, grad)
    return grad
