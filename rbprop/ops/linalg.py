"""Bilinear primitives: ``matmul`` (batched, broadcasting) and ``linear``.

For ``Y = X W^T + b`` (linear) and ``Y = A @ B`` (matmul) the sketch can sit in
two places:

* ``"contracted"`` (the default): on the rows of ``X``/``A`` and of the
  cotangent ``V``, the axis that ``dW = V^T X`` and ``dB = A^T V`` contract.
  ``dW = V^T S X`` keeps ``k`` rows of both, and ``dX = S V W`` is nonzero on
  those rows only. A data-independent sketch is drawn in the forward pass, which
  then saves only ``X[kept]`` (or ``Q^T X`` for a rank-k sketch) instead of ``X``.
* ``"weight"``: the same rows, but only in the weight gradient:
  ``dW = V^T S X`` (and ``dB = A^T S V``) as above, while the input gradient
  ``dX = V W`` stays exact. Saves the same memory and half the arithmetic at
  most, and its noise does not compound through the layers below (each input
  gradient is exact), which is what training deep models wants.
* ``"cotangent"``: on the output features (columns of ``V``): ``dX = V S W``
  contracts over ``k`` features and only ``k`` rows of ``dW`` are nonzero.

The importance sketch needs ``V`` and is drawn in backward. Its weights are
``a_i = ||v_i|| * ||J_i||`` with ``||J_i||^2`` the squared norm of what row ``i``
meets in each needed gradient (for the ``dX`` part an isotropic estimate
``||W||_F^2 / out`` is used, which keeps the cost linear in the size of ``V``).
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import array_module
from ..kernels.products import rows_product
from ..kernels.rows import meet_rows
from ..primitive import Primitive, ShapeError, sum_to
from ..rowsparse import RowSparse
from ..tensor import Tensor, as_tensor, record

#: Placements that sketch the rows of the contracted axis (see the module docstring).
ROW_PLACEMENTS = ("contracted", "weight")


def _squared_norms(array, axis):
    """Sum of squares over every axis but ``axis``, one float64 value per index.

    ``einsum`` reduces in the array's own dtype without a float64 copy (these are
    sampling weights: float32 rounding does not matter, a full extra pass would).
    """
    letters = "".join(chr(ord("a") + dim) for dim in range(array.ndim))
    squares = array_module(array).einsum(f"{letters},{letters}->{letters[axis]}", array, array)
    return squares.astype(np.float64)


def _squared_total(array) -> float:
    """``||array||_F^2`` as a Python float, without a float64 copy of the array."""
    flat = array.reshape(-1)
    return float(array_module(array).dot(flat, flat))


class Linear(Primitive):
    """``y = x @ weight.T + bias`` with ``weight`` of shape ``(out, in)`` (PyTorch's layout)."""

    name = "linear"
    default_placement = "contracted"

    def forward(self, x, weight, bias=None):
        if weight.ndim != 2:
            raise ShapeError(f"linear: weight must be 2-D (out, in), got shape {weight.shape}")
        if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
            raise ShapeError(
                f"linear: input of shape {x.shape} does not match weight of shape "
                f"{weight.shape} (expected last input axis {weight.shape[1]})"
            )
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ShapeError(
                f"linear: bias of shape {bias.shape} for a weight of shape {weight.shape}"
            )
        rows = x.reshape(-1, x.shape[-1])
        output = rows @ weight.T
        if bias is not None:
            output += bias
        self.placement = self.placement or self.default_placement
        if self.placement not in ROW_PLACEMENTS + ("cotangent",):
            raise ValueError(f"linear: unknown placement {self.placement!r}")
        self._save_for_backward(rows, weight)
        return output.reshape(x.shape[:-1] + (weight.shape[0],))

    def _save_for_backward(self, rows, weight):
        needs_x, needs_weight = self.needs_input_grad[:2] if self.recording else (False, False)
        saved_rows = rows if needs_weight else None
        if self.recording and self.placement in ROW_PLACEMENTS and self.wants_forward_sample():
            # Draw now: the backward pass will read only the kept rows (or Q^T x).
            self.sample = self.draw_sample(rows.shape[0])
            if saved_rows is not None:
                saved_rows = self.sample.project(rows, axis=0)
        self.save(rows=saved_rows, weight=weight if needs_x else None)

    # -- exact -----------------------------------------------------------------

    def accepts_row_sparse(self) -> bool:
        """Row-sparse cotangents stay compact, except on the feature placement."""
        return bool(self.output_shape) and (self.sketch is None or self.placement != "cotangent")

    def _tokens_per_row(self) -> int:
        """Rows of the flattened ``(rows, in)`` view per index of the leading axis."""
        return math.prod(self.input_shapes[0][1:-1])

    def _flat_rows(self, leading):
        """Indices of the flattened rows that the leading-axis indices ``leading`` cover."""
        tokens = self._tokens_per_row()
        if tokens == 1:
            return leading
        return (leading[:, None] * tokens + np.arange(tokens)).reshape(-1)

    def rows_read(self):
        """The kept batch rows, when a diagonal sketch drawn in forward sits on them.

        With the "contracted" placement, ``dW``, ``db`` and ``dX`` all read the
        cotangent on the sketch's kept rows only.
        """
        sample = self.sample
        if self.placement != "contracted" or sample is None or not sample.is_diagonal:
            return None
        tokens = self._tokens_per_row()
        return sample.indices if tokens == 1 else np.unique(sample.indices // tokens)

    def _unread_rows_skipped(self, values, rows_kept):
        """``values`` (at flattened rows ``rows_kept``, None: all) without rows nobody reads.

        The input's producer may read only some rows of this op's input gradient
        (:meth:`Primitive.rows_read`); ``dX`` rows outside them would be computed
        and thrown away. Returns the remaining values and their rows. Batched
        inputs (several rows per leading index) are left whole.
        """
        producer = self.edges[0] if self.edges else None
        if not isinstance(producer, Primitive) or self._tokens_per_row() != 1:
            return values, rows_kept
        read = producer.rows_read()
        if read is None:
            return values, rows_kept
        both, _, selected = meet_rows(read, rows_kept, values)
        return selected, both

    def row_sparse_vjp(self, cotangent: RowSparse):
        """The exact VJP of a row-sparse cotangent: GEMMs over its kept rows only."""
        v = cotangent.values.reshape(-1, cotangent.shape[-1])
        flat = self._flat_rows(cotangent.indices)
        rows, in_features, out_features = self._sizes()
        grad_x = grad_weight = grad_bias = None
        if self.needs_input_grad[0] and self._tokens_per_row() == 1:
            read, rows_read = self._unread_rows_skipped(v, flat)
            grad_x = RowSparse(rows_read, read @ self.weight, self.input_shapes[0])
        elif self.needs_input_grad[0]:
            values = (v @ self.weight).reshape((cotangent.kept,) + self.input_shapes[0][1:])
            grad_x = RowSparse(cotangent.indices, values, self.input_shapes[0])
        if self.needs_input_grad[1]:
            xp = array_module(v)
            grad_weight = rows_product(v, xp.take(self.rows, xp.asarray(flat), axis=0))
        if self._needs_bias_grad():
            grad_bias = _column_sums(v)
        self._sampled_flops = self.vjp_flops() * len(flat) // max(rows, 1)
        return self._with_bias(grad_x, grad_weight, grad_bias)

    def vjp(self, cotangent):
        v = cotangent.reshape(-1, cotangent.shape[-1])
        grad_x = self._input_grad(v @ self.weight) if self.needs_input_grad[0] else None
        grad_weight = v.T @ self.rows if self.needs_input_grad[1] else None
        grad_bias = _column_sums(v) if self._needs_bias_grad() else None
        return self._with_bias(grad_x, grad_weight, grad_bias)

    def _needs_bias_grad(self):
        return len(self.needs_input_grad) > 2 and self.needs_input_grad[2]

    def _with_bias(self, grad_x, grad_weight, grad_bias):
        if len(self.input_shapes) > 2:
            return grad_x, grad_weight, grad_bias
        return grad_x, grad_weight

    def _input_grad(self, rows_grad):
        return rows_grad.reshape(self.input_shapes[0])

    def _sizes(self):
        out_features, in_features = self.input_shapes[1]
        rows = math.prod(self.input_shapes[0][:-1])
        return rows, in_features, out_features

    def vjp_flops(self):
        rows, in_features, out_features = self._sizes()
        gemm = 2 * rows * in_features * out_features
        flops = gemm * (int(self.needs_input_grad[0]) + int(self.needs_input_grad[1]))
        return flops + (rows * out_features if self._needs_bias_grad() else 0)

    # -- sampled ---------------------------------------------------------------

    def sampled_vjp(self, cotangent):
        if self.placement in ROW_PLACEMENTS:
            return self._contracted_vjp(cotangent)
        return self._feature_vjp(cotangent.reshape(-1, cotangent.shape[-1]))

    def _importance_weights(self, v, axis):
        needs_x, needs_weight = self.needs_input_grad[:2]
        v_norms = _squared_norms(v, axis)
        other = 0.0
        if axis == 0:  # row i meets x_i (for dW) and, roughly, W (for a sketched dX)
            if needs_weight:
                other = other + _squared_norms(self.rows, 0)
            if needs_x and self.placement != "weight":
                other = other + _squared_total(self.weight) / v.shape[1]
        else:  # feature j meets W_j (for dX) and, roughly, x (for dW)
            if needs_x:
                other = other + _squared_norms(self.weight, 0)
            if needs_weight:
                other = other + _squared_total(self.rows) / v.shape[0]
        return array_module(v).sqrt(v_norms * other)

    def _contracted_vjp(self, cotangent):
        """``dW = V^T S X``, ``db = 1^T S V`` and ``dX = S V W`` (or ``V W``: "weight").

        ``S`` keeps rows of the flattened ``(rows, out)`` cotangent. A row-sparse
        cotangent meets the sample on the rows both keep; with a 2-D input the
        input gradient stays row-sparse on those rows.
        """
        sparse = cotangent if isinstance(cotangent, RowSparse) else None
        sample = self.sample
        if sparse is not None and (sample is None or not sample.is_diagonal):
            cotangent = sparse.dense()  # drawn in backward, or a projection: the dense path
            sparse = None
        v = cotangent.reshape(-1, cotangent.shape[-1]) if sparse is None else None
        if sample is None:
            sample = self.draw_sample(v.shape[0], weights=self._importance_weights(v, 0))
        if not sample.is_diagonal:
            return self._projected_vjp(v, sample)

        xp = array_module(cotangent if sparse is None else sparse.values)
        rows, in_features, out_features = self._sizes()
        if sparse is None:
            cotangent_rows = None
            values = v
        else:  # the cotangent's kept rows, in the flattened (rows, out) view
            cotangent_rows = self._flat_rows(sparse.indices)
            values = sparse.values.reshape(-1, out_features)
        # The rows both keep, and S v on them.
        common, in_sample, compact = meet_rows(
            sample.indices, cotangent_rows, values, sample.scales
        )
        kept = len(common)
        grad_x = grad_weight = grad_bias = None
        flops = 0
        if self.needs_input_grad[0]:
            if self.placement == "weight":  # exact: dX = V W on the cotangent's own rows
                own_rows = None if sparse is None else self._flat_rows(sparse.indices)
                read, rows_read = self._unread_rows_skipped(values, own_rows)
                grad_x = self._row_product(read @ self.weight, rows_read, rows)
            else:
                read, rows_read = self._unread_rows_skipped(compact, common)
                grad_x = self._row_product(read @ self.weight, rows_read, rows)
            flops += 2 * read.shape[0] * in_features * out_features
        if self.needs_input_grad[1]:
            kept_rows = self.rows if sample is self.sample else sample.project(self.rows, axis=0)
            if kept != sample.kept:
                kept_rows = xp.take(kept_rows, xp.asarray(in_sample), axis=0)
            grad_weight = rows_product(compact, kept_rows)
            flops += 2 * kept * in_features * out_features
        if self._needs_bias_grad():
            grad_bias = _column_sums(compact)
            flops += kept * out_features
        self._sampled_flops = flops
        return self._with_bias(grad_x, grad_weight, grad_bias)

    def _row_product(self, product, rows_kept, rows):
        """The input gradient from its nonzero flattened rows.

        ``rows_kept`` is a sorted index array of flattened rows, or None (every
        row). A 2-D input gets a row-sparse gradient; a batched one gets the
        dense array.
        """
        shape = self.input_shapes[0]
        if rows_kept is None:
            return product.reshape(shape)
        if self._tokens_per_row() == 1:
            return RowSparse(rows_kept, product, shape)
        xp = array_module(product)
        full = xp.zeros((rows, product.shape[1]), dtype=product.dtype)
        full[xp.asarray(rows_kept)] = product
        return full.reshape(shape)

    def _projected_vjp(self, v, sample):
        """The contracted placement with a rank-k sketch ``S = Q Q^T``: no kept rows."""
        xp = array_module(v)
        kept_rows = self.rows if sample is self.sample else None
        if kept_rows is None and self.rows is not None:
            kept_rows = sample.project(self.rows, axis=0)
        compact = sample.compress(v, axis=0)  # k x out: Q^T v (scaled)
        rows, in_features, out_features = self._sizes()
        kept = sample.kept
        grad_x = grad_weight = grad_bias = None
        flops = 2 * rows * kept * (out_features + in_features)
        if self.needs_input_grad[0] and self.placement == "weight":
            grad_x = self._input_grad(v @ self.weight)  # exact: dX = V W
            flops += 2 * rows * in_features * out_features
        elif self.needs_input_grad[0]:
            grad_x = self._input_grad(sample.expand(compact @ self.weight, axis=0))
            flops += 2 * kept * in_features * out_features
        if self.needs_input_grad[1]:
            grad_weight = rows_product(compact, kept_rows)
            flops += 2 * kept * in_features * out_features
        if self._needs_bias_grad():
            grad_bias = _sum_rows(sample, compact, xp)
            flops += kept * out_features
        self._sampled_flops = flops
        return self._with_bias(grad_x, grad_weight, grad_bias)

    def _feature_vjp(self, v):
        weights = self._importance_weights(v, 1) if self.sketch.needs_cotangent else None
        sample = self.draw_sample(v.shape[1], weights=weights)
        compact = sample.compress(v, axis=1)  # rows x k
        rows, in_features, out_features = self._sizes()
        kept = sample.kept
        grad_x = grad_weight = grad_bias = None
        flops = 0
        if self.needs_input_grad[0]:
            grad_x = self._input_grad(compact @ sample.project(self.weight, axis=0))
            flops += 2 * rows * kept * in_features
        if self.needs_input_grad[1]:
            grad_weight = sample.expand(compact.T @ self.rows, axis=0)
            flops += 2 * rows * kept * in_features
        if self._needs_bias_grad():
            grad_bias = sample.expand(compact.sum(axis=0), axis=0)
            flops += rows * kept
        if not sample.is_diagonal:
            flops += 2 * kept * out_features * (rows + 2 * in_features)
        self._sampled_flops = flops
        return self._with_bias(grad_x, grad_weight, grad_bias)


def _column_sums(rows):
    """``1^T rows``, the bias gradient, as one BLAS product.

    numpy's ``sum(axis=0)`` walks a tall (rows, features) array far slower than
    ``ones @ rows``: 0.03-0.17 ms against 0.15-0.25 ms on (6400, 64..192) float32.
    """
    xp = array_module(rows)
    return xp.ones(rows.shape[0], dtype=rows.dtype) @ rows


def _sum_rows(sample, compact, xp):
    """``1^T S v`` from the compact ``S v``: a plain sum, or ``(Q^T 1)^T c``."""
    if sample.is_diagonal:
        return _column_sums(compact)
    return xp.asarray(sample.basis.sum(axis=0), dtype=compact.dtype) @ compact


class MatMul(Primitive):
    """``a @ b`` for arrays of rank 2 or more, batch axes broadcast as in numpy.

    Rank-1 operands are promoted by :func:`matmul` with reshapes. Placements as
    in the module docstring: ``"contracted"`` sketches axis -2 of ``a`` (the rows
    that ``a^T @ v`` contracts), ``"cotangent"`` sketches axis -1 of the output.
    """

    name = "matmul"
    default_placement = "contracted"

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ShapeError(f"matmul: operands must have rank >= 2, got {a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2]:
            raise ShapeError(
                f"matmul: shapes {a.shape} and {b.shape} do not align "
                f"({a.shape[-1]} != {b.shape[-2]})"
            )
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ShapeError(
                f"matmul: batch shapes {a.shape[:-2]} and {b.shape[:-2]} of operands "
                f"{a.shape} and {b.shape} cannot be broadcast"
            ) from None
        self.placement = self.placement or self.default_placement
        if self.placement not in ROW_PLACEMENTS + ("cotangent",):
            raise ValueError(f"matmul: unknown placement {self.placement!r}")
        needs_a, needs_b = self.needs_input_grad if self.recording else (False, False)
        saved_a = a if needs_b else None
        if self.recording and self.placement in ROW_PLACEMENTS and self.wants_forward_sample():
            self.sample = self.draw_sample(a.shape[-2])
            if saved_a is not None:
                saved_a = self.sample.project(a, axis=a.ndim - 2)
        self.save(a=saved_a, b=b if needs_a or self.placement == "cotangent" else None)
        return a @ b

    def vjp(self, cotangent):
        xp = array_module(cotangent)
        grad_a = grad_b = None
        if self.needs_input_grad[0]:
            grad_a = sum_to(cotangent @ xp.swapaxes(self.b, -1, -2), self.input_shapes[0])
        if self.needs_input_grad[1]:
            grad_b = sum_to(xp.swapaxes(self.a, -1, -2) @ cotangent, self.input_shapes[1])
        return grad_a, grad_b

    def _gemm_flops(self, rows, inner, cols):
        batch = math.prod(self.output_shape[:-2])
        return 2 * batch * rows * inner * cols

    def vjp_flops(self):
        n, m = self.input_shapes[0][-2:]
        p = self.input_shapes[1][-1]
        gemm = self._gemm_flops(n, m, p)
        return gemm * (int(self.needs_input_grad[0]) + int(self.needs_input_grad[1]))

    def sampled_vjp(self, cotangent):
        if self.placement in ROW_PLACEMENTS:
            return self._contracted_vjp(cotangent)
        return self._column_vjp(cotangent)

    def _importance_weights(self, v, axis):
        norms = _squared_norms(v, axis)
        other = 0.0
        if axis == v.ndim - 2:
            if self.needs_input_grad[1]:
                other = other + _squared_norms(self.a, self.a.ndim - 2)
            if self.needs_input_grad[0] and self.placement != "weight":
                other = other + _squared_total(self.b) / v.shape[-1]
        else:
            if self.needs_input_grad[0]:
                other = other + _squared_norms(self.b, self.b.ndim - 1)
            if self.needs_input_grad[1]:
                other = other + _squared_total(self.a) / v.shape[-2]
        return array_module(v).sqrt(norms * other)

    def _contracted_vjp(self, v):
        xp = array_module(v)
        row_axis = v.ndim - 2
        sample = self.sample
        if sample is None:
            sample = self.draw_sample(v.shape[row_axis], self._importance_weights(v, row_axis))
            kept_a = None if self.a is None else sample.project(self.a, axis=self.a.ndim - 2)
        else:
            kept_a = self.a
        compact = sample.compress(v, axis=row_axis)
        n, m = self.input_shapes[0][-2:]
        p = self.input_shapes[1][-1]
        grad_a = grad_b = None
        flops = 0
        if self.needs_input_grad[0] and self.placement == "weight":
            grad_a = sum_to(v @ xp.swapaxes(self.b, -1, -2), self.input_shapes[0])  # exact
            flops += self._gemm_flops(n, p, m)
        elif self.needs_input_grad[0]:
            partial = compact @ xp.swapaxes(self.b, -1, -2)
            grad_a = sum_to(sample.expand(partial, axis=row_axis), self.input_shapes[0])
            flops += self._gemm_flops(sample.kept, p, m)
        if self.needs_input_grad[1]:
            grad_b = sum_to(xp.swapaxes(kept_a, -1, -2) @ compact, self.input_shapes[1])
            flops += self._gemm_flops(sample.kept, m, p)
        if not sample.is_diagonal:
            flops += self._gemm_flops(n, sample.kept, m + p)
        self._sampled_flops = flops
        return grad_a, grad_b

    def _column_vjp(self, v):
        xp = array_module(v)
        column_axis = v.ndim - 1
        weights = self._importance_weights(v, column_axis) if self.sketch.needs_cotangent else None
        sample = self.draw_sample(v.shape[column_axis], weights=weights)
        compact = sample.compress(v, axis=column_axis)  # ... x n x k
        n, m = self.input_shapes[0][-2:]
        p = self.input_shapes[1][-1]
        grad_a = grad_b = None
        flops = 0
        if self.needs_input_grad[0]:
            kept_b = sample.project(self.b, axis=self.b.ndim - 1)  # ... x m x k
            grad_a = sum_to(compact @ xp.swapaxes(kept_b, -1, -2), self.input_shapes[0])
            flops += self._gemm_flops(n, sample.kept, m)
        if self.needs_input_grad[1]:
            partial = xp.swapaxes(self.a, -1, -2) @ compact
            grad_b = sum_to(sample.expand(partial, axis=column_axis), self.input_shapes[1])
            flops += self._gemm_flops(m, n, sample.kept)
        if not sample.is_diagonal:
            flops += self._gemm_flops(m + n, p, sample.kept)
        self._sampled_flops = flops
        return grad_a, grad_b


def matmul(a, b) -> Tensor:
    """numpy's ``matmul``: rank-1 operands are promoted and the added axis removed."""
    from .shape import reshape

    a, b = as_tensor(a), as_tensor(b, like=a if isinstance(a, Tensor) else None)
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul: operands must not be scalars, got {a.shape} and {b.shape}")
    left = reshape(a, (1,) + a.shape) if a.ndim == 1 else a
    right = reshape(b, b.shape + (1,)) if b.ndim == 1 else b
    if left.shape[-1] != right.shape[-2]:
        raise ShapeError(
            f"matmul: shapes {a.shape} and {b.shape} do not align "
            f"({a.shape[-1]} != {right.shape[-2]})"
        )
    product = record(MatMul, left, right)
    if a.ndim == 1:
        product = reshape(product, product.shape[:-2] + product.shape[-1:])
    if b.ndim == 1:
        product = reshape(product, product.shape[:-1])
    return product


def linear(input, weight, bias=None) -> Tensor:  # noqa: A002 - torch's argument name
    """``input @ weight.T + bias`` (``torch.nn.functional.linear``)."""
    inputs = (input, weight) if bias is None else (input, weight, bias)
    return record(Linear, *(as_tensor(value) for value in inputs))
