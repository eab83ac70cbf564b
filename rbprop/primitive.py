"""The primitive interface: forward on raw arrays, exact VJP, sampled VJP, cost.

A primitive is a subclass of :class:`Primitive`. One instance is created per
call; when the call is recorded, the instance *is* the graph node. A subclass
writes, side by side:

* ``forward(*arrays)``: the result on raw numpy/cupy arrays; it stores what the
  VJP needs with ``self.save(name=array)``;
* ``vjp(cotangent)``: the exact vector-Jacobian product, one array (or None) per
  input, each reduced to its input's shape through :func:`sum_to`;
* ``sampled_vjp(cotangent)``: ``J^T S v`` for the sketch the active policy gave
  this op (see :mod:`rbprop.sampling`), doing proportionally less work;
* ``vjp_flops()``: the floating-point operations of the exact VJP.

Row-local ops (output row ``i`` depends only on input row ``i`` along the
leading axis: elementwise maps, reductions and normalisations over trailing
axes) get their sampled VJP for free: the exact VJP is evaluated on the kept
rows only (:meth:`Primitive.row_sampled_vjp`), and the gradients of inputs that
carry the row axis come back row-sparse (:class:`rbprop.rowsparse.RowSparse`).
A row-sparse cotangent reaching a row-local op is handled the same way, exact
or sampled, so a sketch drawn on the batch rows keeps the reverse pass working
on those rows only until an op that needs the dense array.
"""

from __future__ import annotations

import numpy as np

from . import cost
from .backend import array_module, to_numpy
from .rowsparse import RowSparse
from .sketch import SeedStream


class ShapeError(ValueError):
    """Raised when an op receives arrays whose shapes do not fit together."""


def sum_to(array, shape):
    """Sum ``array`` over the axes along which ``shape`` was broadcast to it.

    The single place where gradients of broadcasting ops are reduced back to
    the shape of their input (numpy's broadcasting rules, read backwards).
    """
    shape = tuple(shape)
    if array.shape == shape:
        return array
    lead = array.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + axis
        for axis, size in enumerate(shape)
        if size == 1 and array.shape[lead + axis] != 1
    )
    reduced = array.sum(axis=axes, keepdims=True) if axes else array
    if lead:
        reduced = reduced.reshape(reduced.shape[lead:])
    return reduced.reshape(shape)


def broadcast_shapes(op_name: str, *shapes) -> tuple:
    """The broadcast shape of ``shapes``, or a :class:`ShapeError` naming the op."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        listed = ", ".join(str(tuple(shape)) for shape in shapes)
        raise ShapeError(f"{op_name}: shapes {listed} cannot be broadcast together") from None


def normalize_axis(op_name: str, axis: int, ndim: int, shape=None) -> int:
    """A non-negative axis, or an error naming the op, the axis and the rank (or shape)."""
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{op_name}: axis must be an int, got {axis!r}")
    if not -ndim <= axis < max(ndim, 1):
        array = f"{ndim} dimensions" if shape is None else f"shape {tuple(shape)}"
        raise np.exceptions.AxisError(
            f"{op_name}: axis {axis} is out of bounds for an array of {array}"
        )
    return int(axis) % max(ndim, 1)


def normalize_axes(op_name: str, axis, ndim: int, shape=None) -> tuple:
    """``axis`` (None, an int or a sequence) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    axes = tuple(sorted(normalize_axis(op_name, a, ndim, shape) for a in axis))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{op_name}: repeated axis in {axis!r}")
    return axes


class Primitive:
    """Base class of every differentiable op (see the module docstring)."""

    name = "primitive"
    #: True when output row i (leading axis) depends only on input rows i.
    row_local = False

    def __init__(self, **params):
        self.params = params
        self.recording = False
        self.released = False
        self.edges: tuple = ()
        self.needs_input_grad: tuple = ()
        self.input_shapes: tuple = ()
        self.output_shape: tuple = ()
        self.dtype = None
        self.sketch = None
        self.placement = None
        self.sample = None
        self.seed = None
        self._saved_names: list[str] = []
        self._held: list = []

    # -- forward-side helpers -------------------------------------------------

    def forward(self, *arrays):
        raise NotImplementedError(f"{self.name}: forward is not written")

    def save(self, **arrays) -> None:
        """Keep arrays for the VJP (only when the call is being recorded)."""
        for name, array in arrays.items():
            setattr(self, name, array if self.recording else None)
            if name not in self._saved_names:
                self._saved_names.append(name)

    def saved_arrays(self) -> dict:
        """The arrays this op currently holds for its VJP, by name."""
        found = {}
        for name in self._saved_names:
            value = getattr(self, name, None)
            if hasattr(value, "nbytes"):
                found[name] = value
        return found

    def draw_sample(self, size: int, weights=None):
        """Draw this op's sketch over an axis of ``size``, from the op's own seed.

        The draw is a function of the seed alone (a :class:`rbprop.sketch.SeedStream`),
        whether it happens in the forward or the backward pass, so the same
        seed gives the same sketches whatever order the reverse pass visits the
        ops in. An op without a seed draws from fresh entropy.
        """
        return self.sketch.draw(size, SeedStream(self.seed), weights=weights)

    def wants_forward_sample(self) -> bool:
        """True when a data-independent sketch should be drawn in the forward pass."""
        return self.sketch is not None and self.sketch.drawn_in_forward

    # -- backward -----------------------------------------------------------

    def vjp(self, cotangent):
        raise NotImplementedError(f"{self.name}: the exact VJP is not written")

    def vjp_flops(self) -> int:
        """Floating-point operations of the exact VJP (0 for pure data movement)."""
        return 0

    def sampled_vjp(self, cotangent):
        """``J^T S v``; row-local ops inherit the kept-rows evaluation."""
        if self.row_local:
            return self.row_sampled_vjp(cotangent)
        raise NotImplementedError(f"{self.name}: no sampled VJP is written for this op")

    def accepts_row_sparse(self) -> bool:
        """Whether this op's VJPs take a :class:`RowSparse` cotangent as it is.

        Row-local ops do (their VJP runs on the kept rows); any other op gets
        the dense array. Ops that override it handle ``RowSparse`` themselves.
        """
        return self.row_local and bool(self.output_shape)

    def rows_read(self):
        """The sorted rows of the output cotangent this op's VJP will read, or None (all).

        An op below can skip computing gradient rows that nobody reads. Only ops
        that know it in advance say so: a ``linear`` whose sketch on the batch
        rows was drawn in the forward pass, and exact row-local ops whose one
        gradient goes to such an op (they read what their producer reads).
        """
        op = self
        for _ in range(64):  # a long chain of row-local ops is not worth walking
            producer = op._row_producer()
            if producer is None:
                return None
            if type(producer).rows_read is not Primitive.rows_read:
                return producer.rows_read()
            op = producer
        return None

    def _row_producer(self):
        """The producer an exact row-local op hands its only (row-aligned) gradient to."""
        if not self.row_local or self.sketch is not None or not self.output_shape:
            return None
        needing = [index for index, needed in enumerate(self.needs_input_grad) if needed]
        if len(needing) != 1 or not self.row_aligned(self.input_shapes[needing[0]]):
            return None
        producer = self.edges[needing[0]]
        return producer if isinstance(producer, Primitive) else None

    def sampled_vjp_flops(self) -> int:
        """Floating-point operations the last sampled VJP spent."""
        return getattr(self, "_sampled_flops", self.vjp_flops())

    def run_vjp(self, cotangent):
        """Run the exact or sampled VJP, check the result's shapes, report the cost.

        ``cotangent`` is an array or a :class:`RowSparse`; the gradients returned
        may be row-sparse too (the reverse pass densifies them where needed).
        """
        if self.released:
            raise RuntimeError(
                f"{self.name}: backward through a graph whose saved arrays were already freed; "
                "pass retain_graph=True to the first backward() to run it twice"
            )
        if tuple(cotangent.shape) != self.output_shape:
            raise ShapeError(
                f"{self.name}: cotangent of shape {tuple(cotangent.shape)} for an output of "
                f"shape {self.output_shape}"
            )
        if isinstance(cotangent, RowSparse) and not self.accepts_row_sparse():
            cotangent = cotangent.dense()
        exact_flops = self.vjp_flops()
        if self.sketch is None and isinstance(cotangent, RowSparse):
            grads = self.row_sparse_vjp(cotangent)
            cost.record_vjp(self.name, self.sampled_vjp_flops(), exact_flops, sampled=False)
        elif self.sketch is None:
            grads = self.vjp(cotangent)
            cost.record_vjp(self.name, exact_flops, exact_flops, sampled=False)
        else:
            grads = self.sampled_vjp(cotangent)
            cost.record_vjp(self.name, self.sampled_vjp_flops(), exact_flops, sampled=True)
        grads = tuple(grads)
        for index, (grad, shape) in enumerate(zip(grads, self.input_shapes, strict=True)):
            if grad is not None and tuple(grad.shape) != shape:
                raise ShapeError(
                    f"{self.name}: the VJP for input {index} has shape {tuple(grad.shape)}, "
                    f"expected {shape} (an internal error in this op)"
                )
        return grads

    def row_sparse_vjp(self, cotangent: RowSparse):
        """The exact VJP of a row-sparse cotangent, on its kept rows only (row-local ops)."""
        rows = self.output_shape[0]
        self._sampled_flops = self.vjp_flops() * cotangent.kept // max(rows, 1)
        return self._kept_rows_vjp(cotangent.indices, cotangent.values)

    def release(self) -> None:
        """Drop every saved array (after backward, unless the graph is retained)."""
        for array in self._held:
            cost.saved_bytes.release(array)
        self._held = []
        for name in self._saved_names:
            setattr(self, name, None)
        self.sample = None
        self.released = True

    def __del__(self):
        # A graph dropped without a backward pass gives its saved bytes back too
        # (the ledger in rbprop.cost would otherwise keep the arrays alive).
        if getattr(self, "_held", None):
            self.release()

    def producer_ops(self):
        """The recorded ops that produced this op's inputs."""
        return [edge for edge in self.edges if isinstance(edge, Primitive)]

    # -- the generic sampled VJP of row-local ops ----------------------------

    def row_sampled_vjp(self, cotangent):
        """``J^T S v`` with ``S`` on the leading (row) axis, computed on kept rows only.

        For a diagonal sketch the exact VJP runs on the ``k`` kept rows of the
        cotangent and of every saved array; the gradients of row-aligned inputs
        are returned row-sparse. A row-sparse cotangent keeps only the rows both
        it and the sample keep. A projection sketch has no kept rows: ``S v`` is
        formed densely and the exact VJP runs at full cost (its FLOPs say so).
        """
        rows = self.output_shape[0] if self.output_shape else 1
        sparse = cotangent if isinstance(cotangent, RowSparse) else None
        if not self.output_shape:
            cotangent = cotangent.reshape(1)
        weights = None
        if self.sketch.needs_cotangent:
            weights = _row_norms(cotangent) if sparse is None else _sparse_row_norms(sparse)
        sample = self.draw_sample(rows, weights=weights)
        if not sample.is_diagonal:
            dense = cotangent if sparse is None else sparse.dense()
            sketched = sample.apply(dense, axis=0).reshape(self.output_shape)
            self._sampled_flops = self.vjp_flops() + sample.apply_flops(dense.shape, 0)
            return self.vjp(sketched)
        if not self.output_shape:
            return self._scalar_row_sample(cotangent, sample)

        if sparse is None:  # S v on the kept rows: v_i / p_i
            indices, compact = sample.indices, sample.compress(cotangent, axis=0)
        else:  # S v on the rows both the sample and the cotangent keep
            from .kernels.rows import meet_rows  # the kernels import this module's errors

            indices, _, compact = meet_rows(
                sample.indices, sparse.indices, sparse.values, sample.scales
            )
        self._sampled_flops = self.vjp_flops() * len(indices) // max(rows, 1)
        return self._kept_rows_vjp(indices, compact)

    def _kept_rows_vjp(self, indices, compact):
        """The exact VJP of a cotangent whose rows ``indices`` hold ``compact``, zero elsewhere.

        Runs the VJP on those rows of the saved arrays only; gradients of inputs
        that carry the row axis come back as :class:`RowSparse`, the others
        (broadcast operands, parameters) as the dense sums over the kept rows.
        """
        if len(indices) == 0:
            return [None] * len(self.input_shapes)
        xp = array_module(compact)
        full_state = self._restrict_rows(xp.asarray(indices), self.output_shape[0])
        try:
            compact_grads = self.vjp(compact)
        finally:
            self._restore(full_state)
        grads = []
        for grad, shape in zip(compact_grads, self.input_shapes, strict=True):
            if grad is not None and self.row_aligned(shape):
                grad = RowSparse(indices, grad, shape)
            grads.append(grad)
        return grads

    def _scalar_row_sample(self, cotangent, sample):
        """A scalar output is one row: kept with its scale, or dropped (no gradient)."""
        self._sampled_flops = self.vjp_flops() * sample.kept
        if not sample.kept:
            return [None] * len(self.input_shapes)
        return self.vjp((cotangent * sample.scales[0]).reshape(self.output_shape))

    def row_aligned(self, shape) -> bool:
        """Whether an array of ``shape`` carries the output's leading (row) axis.

        Row-local ops other than the broadcasting elementwise ones take inputs
        whose leading axis is the row axis; elementwise ops refine this.
        """
        return bool(shape) and bool(self.output_shape) and shape[0] == self.output_shape[0]

    def _restrict_rows(self, kept, rows):
        """Swap saved arrays and shapes for their kept rows; return what to restore."""
        state = {"input_shapes": self.input_shapes, "output_shape": self.output_shape}
        for name, array in self.saved_arrays().items():
            if self.row_aligned(array.shape):
                state[name] = array
                setattr(self, name, array[kept])
        self.input_shapes = tuple(
            (len(kept),) + tuple(shape[1:]) if self.row_aligned(shape) else shape
            for shape in self.input_shapes
        )
        self.output_shape = (len(kept),) + tuple(self.output_shape[1:])
        return state

    def _restore(self, state):
        for name, value in state.items():
            setattr(self, name, value)

    # -- the sampled VJP of ops whose VJP only moves data ----------------------

    def sketched_cotangent_vjp(self, cotangent):
        """``J^T (S v)`` with ``S v`` formed first, along the output's leading axis.

        For ops whose VJP is pure data movement (reshape, transpose, sum, ...)
        there is no arithmetic to save, so the sketched cotangent is formed and
        moved exactly; the cost reported is that of forming ``S v``.
        """
        flat = cotangent.reshape(1) if not self.output_shape else cotangent
        weights = _row_norms(flat) if self.sketch.needs_cotangent else None
        sample = self.draw_sample(flat.shape[0], weights=weights)
        sketched = sample.apply(flat, axis=0).reshape(self.output_shape)
        self._sampled_flops = self.vjp_flops() + sample.apply_flops(flat.shape, 0)
        return self.vjp(sketched)


def _sparse_row_norms(sparse: RowSparse):
    """``_row_norms`` of a row-sparse cotangent: zero on the rows it does not keep."""
    norms = np.zeros(sparse.shape[0])
    norms[sparse.indices] = to_numpy(_row_norms(sparse.values))
    return norms


def _row_norms(cotangent):
    """Euclidean norm of each leading-axis slice (the importance sketch's weights)."""
    xp = array_module(cotangent)
    flat = cotangent.reshape(cotangent.shape[0], -1) if cotangent.ndim else cotangent.reshape(1, 1)
    # Reduced in the cotangent's dtype (no float64 copy): these are sampling weights.
    return xp.sqrt(xp.einsum("ij,ij->i", flat, flat).astype(np.float64))
