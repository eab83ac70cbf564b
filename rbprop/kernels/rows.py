"""Meeting two sets of kept rows: the rows both keep, and one's values gathered on them.

A sampled ``linear`` with its batch rows sketched gets a cotangent that may
itself be row-sparse (kept rows ``r`` and their values), draws a diagonal
sample (kept rows ``s``, scales ``1/p``), and hands its input gradient to a
producer that reads only some rows. Each meeting is the same small job:

    common = s ∩ r                       (both sorted, duplicate-free)
    out[k] = values[position of common[k] in r] * scales[position in s]

In numpy that is ``intersect1d`` (a concatenation and a sort), a ``take`` and a
broadcast product: several calls of a few microseconds each, and tens of
microseconds each with the caches cold after a large matrix product, for a
result of a few dozen rows. :func:`meet_rows` does it as one merge of the two
sorted index arrays in one compiled call. It dispatches to numba for
float32/float64 numpy values and to :func:`meet_rows_reference` otherwise
(cupy arrays, other dtypes, ``RBPROP_DISABLE_NUMBA=1``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..backend import array_module
from ..primitive import ShapeError
from .dispatch import index_range_error, use_numba

_NO_SCALES = np.empty(0, np.float64)
_NO_ROWS = np.empty(0, np.int64)


# Status codes of the kernel (the dispatcher raises the matching error).
_OK, _OUTSIDE, _WANTED_UNSORTED, _ROWS_UNSORTED = 0, 1, 2, 3


@numba.njit(cache=True)
def _strictly_increasing(indices):
    for position in range(1, indices.size):  # noqa: SIM110 (numba compiles the loop)
        if indices[position] <= indices[position - 1]:
            return False
    return True


@numba.njit(cache=True)
def _meet_rows_numba(wanted, scales, rows, dense, values):
    """``(status, common, wanted positions, gathered values)``.

    ``dense``: ``values`` holds every row (``rows`` is ignored). ``values`` is
    2-D; an empty ``scales`` means no scaling.
    """
    count = values.shape[0]
    common = np.empty(wanted.size, np.int64)
    positions = np.empty(wanted.size, np.int64)
    sources = np.empty(wanted.size, np.int64)
    if not _strictly_increasing(wanted):
        return _WANTED_UNSORTED, common[:0], positions[:0], values[:0]
    kept = 0
    if dense:  # row i is at position i
        for position in range(wanted.size):
            row = wanted[position]
            if row < 0 or row >= count:
                return _OUTSIDE, common[:0], positions[:0], values[:0]
            common[kept] = row
            positions[kept] = position
            sources[kept] = row
            kept += 1
    else:  # merge the two sorted lists
        if not _strictly_increasing(rows):
            return _ROWS_UNSORTED, common[:0], positions[:0], values[:0]
        left = 0
        right = 0
        while left < wanted.size and right < rows.size:
            if wanted[left] < rows[right]:
                left += 1
            elif wanted[left] > rows[right]:
                right += 1
            else:
                common[kept] = wanted[left]
                positions[kept] = left
                sources[kept] = right
                kept += 1
                left += 1
                right += 1
    out = np.empty((kept, values.shape[1]), values.dtype)
    for k in range(kept):
        source = sources[k]
        if scales.size:
            scale = values.dtype.type(scales[positions[k]])
            for column in range(values.shape[1]):
                out[k, column] = values[source, column] * scale
        else:
            for column in range(values.shape[1]):
                out[k, column] = values[source, column]
    return _OK, common[:kept].copy(), positions[:kept].copy(), out


def meet_rows_reference(wanted, rows, values, scales=None):
    """numpy twin of :func:`meet_rows`."""
    wanted, rows = _checked(wanted, rows, values, scales)
    xp = array_module(values)
    if wanted.size > 1 and not (np.diff(wanted) > 0).all():
        raise _unsorted_error("wanted", wanted)
    if rows is not None and rows.size > 1 and not (np.diff(rows) > 0).all():
        raise _unsorted_error("rows", rows)
    if rows is None:
        if wanted.size and (int(wanted.min()) < 0 or int(wanted.max()) >= values.shape[0]):
            raise _range_error(wanted, values)
        common, positions, sources = wanted, np.arange(wanted.size), wanted
    else:
        common, positions, sources = np.intersect1d(
            wanted, rows, assume_unique=True, return_indices=True
        )
    out = xp.take(values, xp.asarray(sources), axis=0)
    if scales is not None:
        factors = xp.asarray(np.asarray(scales)[positions], dtype=values.dtype)
        out = out * factors.reshape((-1,) + (1,) * (values.ndim - 1))
    return common.astype(np.int64), positions.astype(np.int64), out


def meet_rows(wanted, rows, values, scales=None):
    """The rows of ``wanted`` that ``values`` holds, and those values (times ``scales``).

    ``wanted`` is a sorted, duplicate-free int64 array of row indices (a
    sample's kept rows, say); ``values`` holds rows ``rows`` (sorted,
    duplicate-free) or, with ``rows=None``, every row ``0..len(values)-1``.
    ``scales``, one per wanted row, multiplies each gathered row. Returns
    ``(common, positions, gathered)``: the sorted rows in both, their positions
    in ``wanted``, and ``values`` on those rows (scaled), of shape
    ``(len(common),) + values.shape[1:]``.
    """
    if not use_numba(values) or not values.flags.c_contiguous:
        return meet_rows_reference(wanted, rows, values, scales)
    wanted, rows = _checked(wanted, rows, values, scales)
    flat = (
        values
        if values.ndim == 2
        else values.reshape(values.shape[0], math.prod(values.shape[1:]))
    )
    status, common, positions, gathered = _meet_rows_numba(
        wanted,
        _NO_SCALES if scales is None else np.asarray(scales, dtype=np.float64),
        rows if rows is not None else _NO_ROWS,
        rows is None,
        flat,
    )
    if status == _OUTSIDE:
        raise _range_error(wanted, values)
    if status == _WANTED_UNSORTED:
        raise _unsorted_error("wanted", wanted)
    if status == _ROWS_UNSORTED:
        raise _unsorted_error("rows", rows)
    return common, positions, gathered.reshape((common.size,) + values.shape[1:])


def _checked(wanted, rows, values, scales):
    wanted = _index_array("wanted", wanted)
    if values.ndim < 1:
        raise ShapeError(f"meet_rows: values must have a row axis, got shape {values.shape}")
    if rows is not None:
        rows = _index_array("rows", rows)
        if rows.size != values.shape[0]:
            raise ShapeError(
                f"meet_rows: {rows.size} row indices for values of shape {values.shape}"
            )
    if scales is not None and np.shape(scales) != wanted.shape:
        raise ShapeError(
            f"meet_rows: scales of shape {np.shape(scales)} for {wanted.size} wanted rows"
        )
    return wanted, rows


def _index_array(argument, indices):
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        raise TypeError(
            f"meet_rows: {argument} must be a 1-D integer array, got shape {indices.shape} "
            f"and dtype {indices.dtype}"
        )
    return indices.astype(np.int64, copy=False)


def _unsorted_error(argument, indices):
    return ValueError(
        f"meet_rows: {argument} must be sorted and duplicate-free, got {indices[:8]}"
        + (" ..." if indices.size > 8 else "")
    )


def _range_error(wanted, values):
    where = f" for values of shape {values.shape}"
    return index_range_error("meet_rows", "wanted rows", wanted, values.shape[0], where)
