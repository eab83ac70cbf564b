"""Row-sparse cotangents: a gradient that is nonzero on a few leading-axis rows only.

A sampled VJP along the leading (row) axis leaves a cotangent that is zero on
every dropped row. Writing those zeros out, and then reading them again in the
next op's VJP, costs as much memory traffic as the exact pass. Instead, the
reverse pass carries such a cotangent compactly as :class:`RowSparse`: the kept
row indices and the values of those rows. Ops that can work on kept rows
(row-local ops, ``linear``) take it as it is and return row-sparse gradients
themselves; any other op receives the dense array (:meth:`RowSparse.dense`),
and so do leaves.

This is an internal representation of the reverse pass: ``Tensor.grad`` is
always dense.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module


class RowSparse:
    """A cotangent of ``shape`` whose rows ``indices`` hold ``values``, all others zero.

    ``indices`` is a sorted, duplicate-free numpy int64 array (kept on the host
    even when ``values`` is a device array) and ``values`` has shape
    ``(len(indices),) + shape[1:]``.
    """

    __slots__ = ("indices", "values", "shape")
    # numpy defers ``ndarray + RowSparse`` to RowSparse.__radd__ instead of
    # building an object array.
    __array_ufunc__ = None

    def __init__(self, indices, values, shape):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.values = values
        self.shape = tuple(shape)

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def kept(self) -> int:
        return int(self.indices.size)

    def device_indices(self):
        """The row indices as an array of the values' module (numpy or cupy)."""
        return array_module(self.values).asarray(self.indices)

    def dense(self):
        """The full array, zeros on the rows that are not kept."""
        xp = array_module(self.values)
        full = xp.zeros(self.shape, dtype=self.values.dtype)
        full[self.device_indices()] = self.values
        return full

    def __add__(self, other):
        if isinstance(other, RowSparse):
            return self._add_sparse(other)
        if tuple(other.shape) != self.shape:
            raise ValueError(
                f"backward: adding gradients of shapes {tuple(other.shape)} and {self.shape}"
            )
        total = other.copy()  # ``other`` may be shared (an op can return one array twice)
        total[self.device_indices()] += self.values
        return total

    __radd__ = __add__

    def _add_sparse(self, other: RowSparse) -> RowSparse:
        if other.shape != self.shape:
            raise ValueError(
                f"backward: adding gradients of shapes {other.shape} and {self.shape}"
            )
        if np.array_equal(self.indices, other.indices):
            return RowSparse(self.indices, self.values + other.values, self.shape)
        union = np.union1d(self.indices, other.indices)
        xp = array_module(self.values)
        dtype = np.result_type(self.values.dtype, other.values.dtype)
        values = xp.zeros((union.size,) + self.shape[1:], dtype=dtype)
        # Indices are unique within each operand, so plain fancy-index adds are exact.
        values[xp.asarray(np.searchsorted(union, self.indices))] += self.values
        values[xp.asarray(np.searchsorted(union, other.indices))] += other.values
        return RowSparse(union, values, self.shape)

    def __repr__(self) -> str:
        return f"RowSparse(shape={self.shape}, kept={self.kept}, dtype={self.dtype})"


def densify(cotangent):
    """``cotangent`` as a dense array (unchanged when it already is one)."""
    return cotangent.dense() if isinstance(cotangent, RowSparse) else cotangent


def restrict(sample, kept_rows):
    """Intersect a diagonal sample with the rows a cotangent keeps.

    ``kept_rows`` is the sorted index array of a row-sparse cotangent's rows, or
    None for a dense cotangent (every row). Returns ``(indices,
    sample_positions, cotangent_positions)``: the sorted rows both keep, their
    positions in ``sample.indices`` and their positions among the cotangent's
    rows. Sample indices are sorted (every diagonal sketch draws them so).
    """
    if kept_rows is None:
        return sample.indices, np.arange(sample.kept), sample.indices
    common, in_sample, in_cotangent = np.intersect1d(
        sample.indices, kept_rows, assume_unique=True, return_indices=True
    )
    return common, in_sample, in_cotangent
