"""Moving kept slices in and out of compact form: gather-and-scale, scatter-add, compaction.

A diagonal sketch ``S = diag(s)`` with nonzeros at ``indices`` is applied along
one axis of an array in three steps, each a kernel here:

* :func:`compact_mask` turns a boolean keep-mask into the kept indices;
* :func:`gather_scaled` takes the kept slices and multiplies each by its scale,
  ``out[..., k, ...] = a[..., indices[k], ...] * scales[k]``, so the VJP runs on
  ``k`` slices instead of ``n``;
* :func:`scatter_add` puts compact slices back into zeros of the full length,
  ``out[..., indices[k], ...] += compact[..., k, ...]`` (repeated indices add up).

Every array is viewed as ``(outer, axis, inner)``, so one kernel serves any
axis. Each function dispatches to numba for float32/float64 (or boolean) numpy
arrays and to its ``*_reference`` numpy twin otherwise.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..backend import array_module
from ..primitive import ShapeError, normalize_axis
from .dispatch import add_at, as_indices, launch, numba_disabled, use_numba

# Inner elements per task of the scatter kernel: tasks own disjoint column blocks.
_SCATTER_BLOCK = 256
# Mask entries per task of the compaction kernel.
_COMPACT_CHUNK = 1 << 14


def _three_axes(shape, axis):
    """``shape`` seen as ``(outer, shape[axis], inner)``."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


# ----------------------------------------------------------------------------- numba kernels


@numba.njit(cache=True, parallel=True)
def _gather_scaled_numba(source, indices, scales, out):
    outer, kept, inner = out.shape
    if outer == 1:  # rows of a matrix: threads share the kept rows
        for k in numba.prange(kept):
            row = indices[k]
            scale = scales[k]
            for t in range(inner):
                out[0, k, t] = source[0, row, t] * scale
    else:  # an inner axis: threads share the outer slices
        for o in numba.prange(outer):
            for k in range(kept):
                row = indices[k]
                scale = scales[k]
                for t in range(inner):
                    out[o, k, t] = source[o, row, t] * scale


@numba.njit(cache=True, parallel=True)
def _scatter_add_numba(compact, indices, block, out):
    # Each task owns one block of inner columns of one outer slice, so repeated
    # indices accumulate without two threads writing the same element.
    outer, kept, inner = compact.shape
    blocks = (inner + block - 1) // block
    for task in numba.prange(outer * blocks):
        o = task // blocks
        start = (task - o * blocks) * block
        stop = min(inner, start + block)
        for k in range(kept):
            row = indices[k]
            for t in range(start, stop):
                out[o, row, t] += compact[o, k, t]


@numba.njit(cache=True, parallel=True)
def _compact_mask_numba(mask, chunk):
    # Two passes: count the kept entries of each chunk, then let each chunk write
    # its indices from the offset given by the counts of the chunks before it.
    # The writing loop has no branch: every index up to the chunk's last kept one
    # is written, and the position only advances past kept ones, so the others
    # are overwritten by the next kept index.
    size = mask.shape[0]
    chunks = (size + chunk - 1) // chunk
    counts = np.zeros(chunks + 1, dtype=np.int64)
    for c in numba.prange(chunks):
        kept = 0
        for i in range(c * chunk, min(size, (c + 1) * chunk)):
            kept += mask[i]
        counts[c + 1] = kept
    offsets = np.cumsum(counts)
    indices = np.empty(offsets[chunks], dtype=np.int64)
    for c in numba.prange(chunks):
        start = c * chunk
        last = min(size, start + chunk) - 1
        while last >= start and not mask[last]:
            last -= 1
        position = offsets[c]
        for i in range(start, last + 1):
            indices[position] = i
            position += mask[i]
    return indices


# ----------------------------------------------------------------------------- numpy twins


def _scales_for(name, xp, scales, kept, dtype):
    if scales is None:
        return None
    scales = xp.asarray(scales, dtype=dtype).reshape(-1)
    if scales.size != kept:
        raise ShapeError(f"{name}: {scales.size} scales for {kept} indices")
    return scales


def gather_scaled_reference(array, indices, scales=None, axis=0):
    """numpy twin of :func:`gather_scaled`: ``take`` along the axis, then a broadcast product."""
    xp = array_module(array)
    axis = normalize_axis("gather_scaled", axis, array.ndim, array.shape)
    indices = as_indices("gather_scaled", "indices", indices, array.shape[axis], xp)
    scales = _scales_for("gather_scaled", xp, scales, indices.size, array.dtype)
    taken = xp.take(array, indices, axis=axis)
    if scales is None:
        return taken
    shape = [1] * array.ndim
    shape[axis] = indices.size
    return taken * scales.reshape(shape)


def scatter_add_reference(compact, indices, size, axis=0):
    """numpy twin of :func:`scatter_add`: an unbuffered add (``np.add.at``) into zeros."""
    xp = array_module(compact)
    axis, indices = _scatter_arguments(compact, indices, size, axis, xp)
    shape = list(compact.shape)
    shape[axis] = size
    full = xp.zeros(shape, dtype=compact.dtype)
    return add_at(xp, full, (slice(None),) * axis + (indices,), compact)


def compact_mask_reference(mask):
    """numpy twin of :func:`compact_mask`: ``flatnonzero``."""
    xp = array_module(mask)
    _check_boolean(mask)
    return xp.flatnonzero(mask).astype(np.int64)


def _check_boolean(mask):
    if mask.dtype != np.bool_:
        raise TypeError(f"compact_mask: mask must be boolean, got dtype {mask.dtype}")


def _scatter_arguments(compact, indices, size, axis, xp):
    axis = normalize_axis("scatter_add", axis, compact.ndim, compact.shape)
    indices = as_indices("scatter_add", "indices", indices, size, xp)
    if indices.size != compact.shape[axis]:
        raise ShapeError(
            f"scatter_add: {indices.size} indices for {compact.shape[axis]} compact slices "
            f"along axis {axis} of shape {compact.shape}"
        )
    return axis, indices


# ----------------------------------------------------------------------------- dispatchers


def gather_scaled(array, indices, scales=None, axis=0):
    """The slices ``indices`` of ``array`` along ``axis``, each times its scale.

    ``out = take(array, indices, axis) * scales`` broadcast along ``axis``
    (``a[idx] * scale[:, None]`` for rows, ``a[:, idx] * scale[None, :]`` for
    columns); with ``scales=None`` the slices are only gathered.
    """
    if not use_numba(array):
        return gather_scaled_reference(array, indices, scales, axis)
    axis = normalize_axis("gather_scaled", axis, array.ndim, array.shape)
    indices = as_indices("gather_scaled", "indices", indices, array.shape[axis])
    scales = _scales_for("gather_scaled", np, scales, indices.size, array.dtype)
    if scales is None:
        scales = np.ones(indices.size, dtype=array.dtype)

    outer, length, inner = _three_axes(array.shape, axis)
    shape = list(array.shape)
    shape[axis] = indices.size
    out = np.empty(shape, dtype=array.dtype)
    source = np.ascontiguousarray(array).reshape(outer, length, inner)
    compact = out.reshape(outer, indices.size, inner)
    launch(_gather_scaled_numba, out.size, source, indices, scales, compact)
    return out


def scatter_add(compact, indices, size, axis=0):
    """Zeros of length ``size`` along ``axis`` with ``compact``'s slices added at ``indices``."""
    if not use_numba(compact):
        return scatter_add_reference(compact, indices, size, axis)
    axis, indices = _scatter_arguments(compact, indices, size, axis, np)
    shape = list(compact.shape)
    shape[axis] = size
    full = np.zeros(shape, dtype=compact.dtype)
    outer, kept, inner = _three_axes(compact.shape, axis)
    launch(
        _scatter_add_numba,
        compact.size,
        np.ascontiguousarray(compact).reshape(outer, kept, inner),
        indices,
        _SCATTER_BLOCK,
        full.reshape(outer, size, inner),
    )
    return full


def compact_mask(mask):
    """Flat int64 indices of the true entries of a boolean ``mask`` (``flatnonzero``)."""
    if numba_disabled() or type(mask) is not np.ndarray:
        return compact_mask_reference(mask)
    _check_boolean(mask)
    flat = np.ascontiguousarray(mask).reshape(-1)
    return launch(_compact_mask_numba, flat.size, flat, _COMPACT_CHUNK)
