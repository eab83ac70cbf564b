"""Convolution lowering (im2col) and its adjoint (col2im), for NCHW images.

A 2-D convolution with a ``kh x kw`` kernel becomes one matrix product once
every receptive field is laid out as a row:

    cols[(n, oh, ow), (c, i, j)] = x[n, c, oh * sh - ph + i, ow * sw - pw + j]

(zero where the index falls in the padding), so ``y = cols @ W.reshape(F, -1).T``.
``col2im`` is the adjoint of that linear map: it scatter-adds every entry of a
``cols``-shaped array back onto the pixel it was read from, which is what the
input gradient of a convolution needs.

A sampled convolution VJP keeps only some output positions (rows of ``cols``);
``im2col_rows`` lowers just those rows and ``col2im_rows`` scatters just those
rows back, so the full ``cols`` matrix is never built.

Each function dispatches to a numba kernel for float32/float64 numpy arrays
and to its ``*_reference`` numpy twin otherwise (cupy, other dtypes, or
``RBPROP_DISABLE_NUMBA=1``). A 1x1 window is the exception: lowering it is a
transposed copy of the (strided) image, which numpy's copy loop does faster
than the row-by-row kernels (0.3 ms against 2.2 ms for a 128 x 64 x 10 x 10
image, 0.6 against 2.2 ms for ``col2im``, 0.2 against 0.6 ms for a quarter of
the rows), so ``im2col``, ``im2col_rows`` and ``col2im`` send it to the twins.
``col2im_rows`` of increasing (so distinct) rows of an unpadded 1x1 window is
one fancy-indexed assignment (see ``_assign_single_taps``). ``scatter_columns``
writes the kept positions of a sampled pointwise convolution's channel-major
input gradient (see :mod:`rbprop.ops.conv`).
"""

from __future__ import annotations

import numba
import numpy as np

from ..backend import array_module
from ..primitive import ShapeError
from .dispatch import as_indices, as_pair, launch, use_numba


def conv_output_size(input_shape, kh: int, kw: int, stride=1, padding=0, name="im2col"):
    """``(OH, OW)`` with ``OH = (H + 2 ph - kh) // sh + 1`` (likewise ``OW``)."""
    if len(input_shape) != 4:
        raise ShapeError(f"{name}: input must be NCHW (4-D), got shape {tuple(input_shape)}")
    (sh, sw), (ph, pw) = as_pair(name, "stride", stride), as_pair(name, "padding", padding)
    if kh < 1 or kw < 1 or sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(
            f"{name}: kernel ({kh}, {kw}) and stride ({sh}, {sw}) must be positive and "
            f"padding ({ph}, {pw}) non-negative"
        )
    height, width = input_shape[2], input_shape[3]
    if height + 2 * ph < kh or width + 2 * pw < kw:
        raise ShapeError(
            f"{name}: kernel ({kh}, {kw}) is larger than the padded input "
            f"({height + 2 * ph}, {width + 2 * pw}) of shape {tuple(input_shape)}"
        )
    return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1


def _geometry(name, input_shape, kh, kw, stride, padding):
    """Output size, stride pair and padding pair, validated."""
    out_height, out_width = conv_output_size(input_shape, kh, kw, stride, padding, name)
    return (
        out_height,
        out_width,
        as_pair(name, "stride", stride),
        as_pair(name, "padding", padding),
    )


# ----------------------------------------------------------------------------- numba kernels


@numba.njit(cache=True)
def _lower_one_row(x, n, top, left, kh, kw, out_row):
    """Copy the receptive field whose top-left corner is (``top``, ``left``) into a row."""
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    column = 0
    if top >= 0 and top + kh <= height and left >= 0 and left + kw <= width:
        # Inside the image (most windows): a plain copy, no bounds to test.
        for c in range(channels):
            for i in range(kh):
                image_row = x[n, c, top + i]
                for j in range(kw):
                    out_row[column] = image_row[left + j]
                    column += 1
        return
    for c in range(channels):
        for i in range(kh):
            h = top + i
            for j in range(kw):
                w = left + j
                inside = 0 <= h < height and 0 <= w < width
                out_row[column] = x[n, c, h, w] if inside else 0.0
                column += 1


@numba.njit(cache=True, parallel=True)
def _im2col_rows_numba(x, rows, kh, kw, sh, sw, ph, pw, out_height, out_width, cols):
    plane = out_height * out_width
    for position in numba.prange(rows.shape[0]):
        row = rows[position]
        n = row // plane
        oh = (row - n * plane) // out_width
        ow = row - n * plane - oh * out_width
        _lower_one_row(x, n, oh * sh - ph, ow * sw - pw, kh, kw, cols[position])


@numba.njit(cache=True)
def _scatter_one_row(cols_row, n, top, left, kh, kw, image):
    """Add one lowered row back onto the receptive field it was read from in ``image[n]``."""
    channels, height, width = image.shape[1], image.shape[2], image.shape[3]
    column = 0
    if top >= 0 and top + kh <= height and left >= 0 and left + kw <= width:
        for c in range(channels):
            for i in range(kh):
                image_row = image[n, c, top + i]
                for j in range(kw):
                    image_row[left + j] += cols_row[column]
                    column += 1
        return
    for c in range(channels):
        for i in range(kh):
            h = top + i
            for j in range(kw):
                w = left + j
                if 0 <= h < height and 0 <= w < width:
                    image[n, c, h, w] += cols_row[column]
                column += 1


@numba.njit(cache=True, parallel=True)
def _col2im_rows_numba(
    cols, rows, image_bounds, kh, kw, sh, sw, ph, pw, out_height, out_width, image
):
    # rows are sorted, so image n owns positions image_bounds[n] to image_bounds[n + 1].
    plane = out_height * out_width
    for n in numba.prange(image.shape[0]):
        for position in range(image_bounds[n], image_bounds[n + 1]):
            rest = rows[position] - n * plane
            oh = rest // out_width
            ow = rest - oh * out_width
            _scatter_one_row(cols[position], n, oh * sh - ph, ow * sw - pw, kh, kw, image)


@numba.njit(cache=True, parallel=True)
def _scatter_columns_numba(values, columns, out):
    # One row per task: zero it, then write its kept entries (in cache by then).
    for r in numba.prange(out.shape[0]):
        out_row = out[r]
        out_row[:] = 0.0
        for j in range(columns.shape[0]):
            out_row[columns[j]] = values[r, j]


# ----------------------------------------------------------------------------- numpy twins


def _padded(x, ph, pw):
    xp = array_module(x)
    if ph == 0 and pw == 0:
        return x
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def _kernel_slice(offset, stride, count):
    """Positions ``offset + stride * o`` for ``o < count``, as a slice of the padded image."""
    return slice(offset, offset + stride * (count - 1) + 1, stride)


def _split_rows(rows, out_height, out_width):
    """Row numbers of ``cols`` as ``(n, oh, ow)``."""
    n, rest = divmod(rows, out_height * out_width)
    oh, ow = divmod(rest, out_width)
    return n, oh, ow


def im2col_reference(x, kh, kw, stride=1, padding=0):
    """numpy twin of :func:`im2col`: one strided slice per kernel offset ``(i, j)``."""
    xp = array_module(x)
    out_height, out_width, (sh, sw), (ph, pw) = _geometry(
        "im2col", x.shape, kh, kw, stride, padding
    )
    batch, channels = x.shape[:2]
    padded = _padded(x, ph, pw)

    # windows[n, oh, ow, c, i, j] = padded[n, c, oh * sh + i, ow * sw + j]
    windows = xp.empty((batch, out_height, out_width, channels, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = padded[:, :, _kernel_slice(i, sh, out_height), _kernel_slice(j, sw, out_width)]
            windows[..., i, j] = patch.transpose(0, 2, 3, 1)
    return windows.reshape(batch * out_height * out_width, channels * kh * kw)


def col2im_reference(cols, input_shape, kh, kw, stride=1, padding=0):
    """numpy twin of :func:`col2im`: adds back one strided slice per kernel offset."""
    xp = array_module(cols)
    out_height, out_width, (sh, sw), (ph, pw) = _geometry(
        "col2im", input_shape, kh, kw, stride, padding
    )
    batch, channels, height, width = input_shape
    _check_cols("col2im", cols, (batch * out_height * out_width, channels * kh * kw))

    padded = xp.zeros((batch, channels, height + 2 * ph, width + 2 * pw), dtype=cols.dtype)
    windows = cols.reshape(batch, out_height, out_width, channels, kh, kw)
    for i in range(kh):
        for j in range(kw):
            rows_slice, cols_slice = (
                _kernel_slice(i, sh, out_height),
                _kernel_slice(j, sw, out_width),
            )
            padded[:, :, rows_slice, cols_slice] += windows[..., i, j].transpose(0, 3, 1, 2)
    return xp.ascontiguousarray(padded[:, :, ph : ph + height, pw : pw + width])


def im2col_rows_reference(x, rows, kh, kw, stride=1, padding=0):
    """numpy twin of :func:`im2col_rows`: one fancy-indexed gather from the padded image.

    Tap ``(i, j)`` of row ``r`` reads ``padded[n_r, :, oh_r * sh + i, ow_r * sw + j]``;
    with the channel axis left as a slice, the gather copies whole channel
    vectors and gives ``(k, kh, kw, C)``, transposed to ``(k, C, kh, kw)`` after.
    """
    xp = array_module(x)
    out_height, out_width, (sh, sw), (ph, pw) = _geometry(
        "im2col_rows", x.shape, kh, kw, stride, padding
    )
    rows = as_indices("im2col_rows", "rows", rows, x.shape[0] * out_height * out_width, xp)
    channels = x.shape[1]
    n, oh, ow = _split_rows(rows, out_height, out_width)

    # Padded coordinates of every tap: h[r, i] = oh[r] * sh + i, w[r, j] = ow[r] * sw + j.
    h = oh[:, None] * sh + xp.arange(kh)[None, :]
    w = ow[:, None] * sw + xp.arange(kw)[None, :]
    # Advanced indices on both sides of the channel slice put their axes first.
    taps = _padded(x, ph, pw)[n[:, None, None], :, h[:, :, None], w[:, None, :]]
    by_channel = xp.ascontiguousarray(taps.transpose(0, 3, 1, 2))
    return by_channel.reshape(rows.size, channels * kh * kw)


def col2im_rows_reference(cols, rows, input_shape, kh, kw, stride=1, padding=0):
    """numpy twin of :func:`col2im_rows` (``rows`` must be distinct, as kept indices are).

    For a fixed kernel offset ``(i, j)`` distinct rows land on distinct pixels,
    so a plain fancy-indexed ``+=`` per offset adds every contribution once.
    """
    xp = array_module(cols)
    out_height, out_width, (sh, sw), (ph, pw) = _geometry(
        "col2im_rows", input_shape, kh, kw, stride, padding
    )
    batch, channels, height, width = input_shape
    rows = as_indices("col2im_rows", "rows", rows, batch * out_height * out_width, xp)
    _check_cols("col2im_rows", cols, (rows.size, channels * kh * kw))
    n, oh, ow = _split_rows(rows, out_height, out_width)

    padded = xp.zeros((batch, channels, height + 2 * ph, width + 2 * pw), dtype=cols.dtype)
    windows = cols.reshape(rows.size, channels, kh, kw)
    for i in range(kh):
        for j in range(kw):
            padded[n, :, oh * sh + i, ow * sw + j] += windows[:, :, i, j]
    return xp.ascontiguousarray(padded[:, :, ph : ph + height, pw : pw + width])


def scatter_columns_reference(values, columns, width):
    """numpy twin of :func:`scatter_columns`."""
    xp = array_module(values)
    columns = as_indices("scatter_columns", "columns", columns, width, xp)
    _check_cols("scatter_columns", values, (values.shape[0], columns.size))
    out = xp.zeros((values.shape[0], width), dtype=values.dtype)
    out[:, columns] = values
    return out


def _check_cols(name, cols, expected):
    if cols.ndim != 2 or tuple(cols.shape) != tuple(expected):
        raise ShapeError(f"{name}: cols must have shape {tuple(expected)}, got {cols.shape}")


# ----------------------------------------------------------------------------- dispatchers


def im2col(x, kh, kw, stride=1, padding=0):
    """Lower NCHW ``x`` to ``(N * OH * OW, C * kh * kw)``: rows ``(n, oh, ow)``, columns
    ``(c, i, j)``. ``stride`` and ``padding`` are ints or ``(rows, columns)`` pairs."""
    if not use_numba(x) or kh * kw == 1:
        return im2col_reference(x, kh, kw, stride, padding)
    out_height, out_width, (sh, sw), (ph, pw) = _geometry(
        "im2col", x.shape, kh, kw, stride, padding
    )
    batch, channels = x.shape[:2]
    rows = np.arange(batch * out_height * out_width)  # every row: the row kernel serves
    cols = np.empty((rows.size, channels * kh * kw), dtype=x.dtype)
    geometry = (kh, kw, sh, sw, ph, pw, out_height, out_width)
    launch(_im2col_rows_numba, cols.size, np.ascontiguousarray(x), rows, *geometry, cols)
    return cols


def col2im(cols, input_shape, kh, kw, stride=1, padding=0):
    """Adjoint of :func:`im2col`: scatter-add ``cols`` onto an image of ``input_shape``."""
    if not use_numba(cols) or kh * kw == 1:
        return col2im_reference(cols, input_shape, kh, kw, stride, padding)
    out_height, out_width, (sh, sw), (ph, pw) = _geometry(
        "col2im", input_shape, kh, kw, stride, padding
    )
    batch, channels = input_shape[:2]
    _check_cols("col2im", cols, (batch * out_height * out_width, channels * kh * kw))
    plane = out_height * out_width
    rows = np.arange(batch * plane)  # every row, so image n owns rows n * plane onwards
    image = np.zeros(tuple(input_shape), dtype=cols.dtype)
    geometry = (kh, kw, sh, sw, ph, pw, out_height, out_width)
    image_bounds = np.arange(batch + 1) * plane
    arguments = (np.ascontiguousarray(cols), rows, image_bounds, *geometry, image)
    launch(_col2im_rows_numba, cols.size, *arguments)
    return image


def im2col_rows(x, rows, kh, kw, stride=1, padding=0):
    """Rows ``rows`` of ``im2col(x, ...)`` (kept output positions), without the others."""
    if not use_numba(x) or kh * kw == 1:
        return im2col_rows_reference(x, rows, kh, kw, stride, padding)
    out_height, out_width, (sh, sw), (ph, pw) = _geometry(
        "im2col_rows", x.shape, kh, kw, stride, padding
    )
    rows = as_indices("im2col_rows", "rows", rows, x.shape[0] * out_height * out_width)
    cols = np.empty((rows.size, x.shape[1] * kh * kw), dtype=x.dtype)
    geometry = (kh, kw, sh, sw, ph, pw, out_height, out_width)
    launch(_im2col_rows_numba, cols.size, np.ascontiguousarray(x), rows, *geometry, cols)
    return cols


def _assign_single_taps(cols, rows, input_shape, sh, sw, out_height, out_width):
    """``col2im_rows`` of a 1x1 window without padding, for distinct ``rows``.

    Each row then reads one pixel per channel and no two rows read the same
    one, so the scatter is a plain fancy-indexed assignment: 0.3 ms against
    0.8 ms for the row kernel, for a quarter of the rows of a 128 x 64 x 10 x 10
    image.
    """
    n, oh, ow = _split_rows(rows, out_height, out_width)
    image = np.zeros(tuple(input_shape), dtype=cols.dtype)
    image[n, :, oh * sh, ow * sw] = cols  # advanced indices around a slice: (k, C)
    return image


def col2im_rows(cols, rows, input_shape, kh, kw, stride=1, padding=0):
    """Adjoint of :func:`im2col_rows`: scatter-add the kept rows ``cols`` onto an image.

    Equals ``col2im`` of a full ``cols`` that is zero outside ``rows``; ``rows``
    must be distinct (the numpy twin relies on it).
    """
    if not use_numba(cols):
        return col2im_rows_reference(cols, rows, input_shape, kh, kw, stride, padding)
    out_height, out_width, (sh, sw), (ph, pw) = _geometry(
        "col2im_rows", input_shape, kh, kw, stride, padding
    )
    batch, channels = input_shape[:2]
    rows = as_indices("col2im_rows", "rows", rows, batch * out_height * out_width)
    _check_cols("col2im_rows", cols, (rows.size, channels * kh * kw))
    if kh * kw == 1 and (ph, pw) == (0, 0) and np.all(rows[1:] > rows[:-1]):
        return _assign_single_taps(cols, rows, input_shape, sh, sw, out_height, out_width)
    if rows.size > 1 and np.any(rows[1:] < rows[:-1]):
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
    # Sorted rows: image n's rows start where the row numbers reach n * OH * OW.
    image_bounds = np.searchsorted(rows, np.arange(batch + 1) * (out_height * out_width))
    image = np.zeros(tuple(input_shape), dtype=cols.dtype)
    geometry = (kh, kw, sh, sw, ph, pw, out_height, out_width)
    launch(
        _col2im_rows_numba,
        cols.size,
        np.ascontiguousarray(cols),
        rows,
        image_bounds,
        *geometry,
        image,
    )
    return image


def scatter_columns(values, columns, width):
    """A (R, ``width``) array, zero but for column ``columns[j]``, which is ``values[:, j]``.

    ``columns`` must be distinct. A pointwise convolution's sampled input
    gradient is its kept positions (columns of the channel-major ``dX^T``)
    scattered this way: for a quarter of 10,368 columns of 128 rows, numpy's
    zeros and fancy assignment along the second axis took 0.86 ms, the kernel
    0.36 ms (one thread).
    """
    if not use_numba(values):
        return scatter_columns_reference(values, columns, width)
    columns = as_indices("scatter_columns", "columns", columns, width)
    _check_cols("scatter_columns", values, (values.shape[0], columns.size))
    out = np.empty((values.shape[0], width), dtype=values.dtype)
    launch(_scatter_columns_numba, out.size, values, columns, out)
    return out
