"""``A^T B`` over a few rows: the weight gradient of a linear layer on its kept rows.

A sampled ``linear`` forms ``dW = V_k^T X_k`` from the ``k`` rows of the
cotangent and the input that its sketch keeps (and that the cotangent from the
layer above still holds). Deep in a network where several row sketches meet,
``k`` is often one or two. numpy's ``matmul`` does not call BLAS when the
contracted axis has length one: it falls back to a plain loop, which took
0.36 ms for a (512, 1) by (1, 784) float32 product, against 0.014 ms for the
kernel here, which writes each output row once as a sum of ``k`` scaled rows.
For ``k >= 3`` BLAS is faster (0.047 against 0.057 ms at ``k = 4``), so
:func:`rows_product` sends only ``k <= SMALL_ROWS`` to the kernel.
"""

from __future__ import annotations

import numba
import numpy as np

from ..primitive import ShapeError
from .dispatch import use_numba

#: Kept rows up to which the kernel is faster than BLAS.
SMALL_ROWS = 2


@numba.njit(cache=True)
def _rows_product_numba(left, right):
    rows, height = left.shape
    width = right.shape[1]
    if rows == 0:
        return np.zeros((height, width), left.dtype)
    out = np.empty((height, width), left.dtype)
    for target in range(height):  # the first row sets the output, the others add to it
        factor = left[0, target]
        for column in range(width):
            out[target, column] = factor * right[0, column]
    for row in range(1, rows):
        for target in range(height):
            factor = left[row, target]
            for column in range(width):
                out[target, column] += factor * right[row, column]
    return out


def rows_product_reference(left, right):
    """numpy twin of :func:`rows_product`."""
    _check(left, right)
    return left.T @ right


def _check(left, right):
    if left.ndim != 2 or right.ndim != 2 or left.shape[0] != right.shape[0]:
        raise ShapeError(
            f"rows_product: operands of shapes {left.shape} and {right.shape}; expected "
            "(k, m) and (k, n)"
        )


def rows_product(left, right):
    """``left.T @ right`` for ``left`` of shape ``(k, m)`` and ``right`` of shape ``(k, n)``.

    ``k <= SMALL_ROWS`` rows of float32/float64 numpy arrays of one dtype go to
    the kernel, everything else to BLAS through ``matmul``.
    """
    if left.ndim == 2 and left.shape[0] <= SMALL_ROWS and use_numba(left, right):
        _check(left, right)
        return _rows_product_numba(left, right)
    return rows_product_reference(left, right)
