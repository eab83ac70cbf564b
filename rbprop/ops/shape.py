"""Shape primitives: reshape, transpose, broadcast_to, indexing, concatenate, stack, pad.

Their VJPs only move data (indexing's adds duplicates, broadcasting's sums), so
they cost no arithmetic beyond that. Their sampled VJPs sketch the output's
leading axis and move the ``k`` kept rows of ``S v`` only (each already scaled
by ``1/p_i``); the gradient buffer is zero-filled, and no copy or arithmetic
touches a dropped row. Per op, the sampled VJP moves:

* ``reshape``, ``transpose``: when the leading axis stays in place the op is
  row-local and the kept rows go to the same rows of the input
  (``Primitive.row_sampled_vjp``). Otherwise the kept rows are written into a
  zero buffer laid out like the output, which is returned as the input-shaped
  view (reshaped or transposed back), as the exact VJP returns its view;
* ``broadcast_to``: the kept rows are summed over the broadcast axes (a leading
  axis that was broadcast sums the kept rows only);
* ``getitem``: each kept output row goes to the input positions it was read
  from; integer-array indices scatter-add (repeated positions add up). A
  scalar boolean in the index is not covered: there ``S v`` is formed densely;
* ``concatenate``, ``stack`` along axis 0: each kept row goes to the one input
  it came from; an input with no kept row gets no gradient (None);
* ``pad`` of axis 0: the kept rows that are not padding go to their input rows;
* ``astype``: row-local (kept rows cast back); ``to_device``: the kept rows are
  moved back to the input's device and written into a zero gradient there.

A projection (rank-k) sketch has no kept rows: ``S v`` is dense, so it is
formed and the exact VJP moves all of it (its FLOPs say so). A scalar output
is one row: kept whole (scaled) or dropped, when the op returns no gradient.
:func:`leading_axis_sampled_vjp` holds these shared steps; the reductions of
:mod:`rbprop.ops.reduction` that reduce the leading axis use it too.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, to_device
from ..primitive import Primitive, ShapeError, _row_norms, normalize_axis, sum_to
from ..tensor import Tensor, as_tensor, record


def leading_axis_sampled_vjp(op, cotangent):
    """``J^T S v`` with ``S`` on the output's leading axis, moving the kept rows only.

    Draws ``op``'s sketch over the output's leading axis (weighted by the row
    norms of ``v`` when the sketch needs the cotangent) and hands the kept rows
    of ``S v`` to ``op.kept_rows_vjp(indices, compact)``, which returns the
    input gradients and the FLOPs it spent. A projection sample, a scalar output
    and a leading axis of length 1 take the exact VJP of ``S v`` instead (there
    is nothing smaller to work on); no kept row means no gradient (None).
    """
    rows = cotangent.reshape(1) if not op.output_shape else cotangent
    weights = _row_norms(rows) if op.sketch.needs_cotangent else None
    sample = op.draw_sample(rows.shape[0], weights=weights)
    if not sample.is_diagonal:
        # A projection has no kept rows: S v is dense and the exact VJP moves all of it.
        op._sampled_flops = op.vjp_flops() + sample.apply_flops(rows.shape, 0)
        return op.vjp(sample.apply(rows, axis=0).reshape(op.output_shape))
    if not sample.kept:
        op._sampled_flops = 0
        return [None] * len(op.input_shapes)

    compact = sample.compress(rows, axis=0)  # v_i / p_i on the kept rows
    if rows.shape[0] == 1:
        op._sampled_flops = op.vjp_flops() + int(compact.size)
        return op.vjp(compact.reshape(op.output_shape))
    grads, flops = op.kept_rows_vjp(sample.indices, compact)
    op._sampled_flops = int(compact.size) + int(flops)
    return grads


def kept_slices_gradient(shape, axis, indices, block, dtype):
    """A zero array of ``shape`` whose slices ``indices`` along ``axis`` hold ``block``.

    The buffer is allocated with ``axis`` outermost, so that each slice is one
    contiguous write rather than a strided one, and the result is its view with
    the axes in ``shape``'s order. Every element is written once: zero on the
    dropped slices, ``block`` on the kept ones (cheaper than zero-filling it all
    and then writing the kept slices again). ``block`` has the kept axis first
    and the others in order; it may broadcast.
    """
    xp = array_module(block)
    moved_shape = (shape[axis],) + tuple(size for dim, size in enumerate(shape) if dim != axis)
    buffer = xp.empty(moved_shape, dtype=dtype)
    dropped = np.ones(shape[axis], dtype=bool)
    dropped[indices] = False
    buffer[xp.asarray(dropped)] = 0
    buffer[xp.asarray(indices)] = block
    return xp.moveaxis(buffer, 0, axis) if axis else buffer


class DataMovement(Primitive):
    """A primitive whose VJP moves (or adds) entries without other arithmetic.

    Where the op keeps the leading axis in place (a reshape or transpose that
    leaves axis 0 alone, concatenation along another axis, ...), it is row-local
    and its sampled VJP moves the kept rows only (``Primitive.row_sampled_vjp``);
    otherwise :func:`leading_axis_sampled_vjp` sends each kept output row where
    ``kept_rows_vjp`` says.
    """

    def sampled_vjp(self, cotangent):
        """``J^T S v``, moving only the rows of ``v`` the sketch keeps (see the module)."""
        if self.row_local:
            return self.row_sampled_vjp(cotangent)
        return leading_axis_sampled_vjp(self, cotangent)

    def kept_rows_vjp(self, indices, compact):
        """Input gradients from output rows ``indices`` holding ``compact``, and the FLOPs."""
        raise NotImplementedError(f"{self.name}: no kept-rows VJP is written for this op")


class Reshape(DataMovement):
    name = "reshape"

    def forward(self, x):
        shape = self.params["shape"]
        try:
            output = x.reshape(shape)
            # Same leading length: row i occupies the same flat range before and after.
            self.row_local = x.ndim > 0 and output.ndim > 0 and output.shape[0] == x.shape[0]
            return output
        except ValueError:
            raise ShapeError(
                f"reshape: cannot reshape an array of shape {x.shape} ({x.size} elements) "
                f"into {tuple(shape)}"
            ) from None

    def vjp(self, cotangent):
        return (cotangent.reshape(self.input_shapes[0]),)

    def kept_rows_vjp(self, indices, compact):
        # Output row i is one flat range of the input: write the kept rows into a
        # zero buffer of the output's shape and return it reshaped (a view).
        buffer = kept_slices_gradient(self.output_shape, 0, indices, compact, compact.dtype)
        return (buffer.reshape(self.input_shapes[0]),), 0


class Transpose(DataMovement):
    name = "transpose"

    def forward(self, x):
        axes = self.params["axes"]
        if axes is None:
            axes = tuple(reversed(range(x.ndim)))
        axes = tuple(normalize_axis(self.name, axis, x.ndim, x.shape) for axis in axes)
        if sorted(axes) != list(range(x.ndim)):
            raise ValueError(
                f"transpose: axes {self.params['axes']} are not a permutation of the "
                f"{x.ndim} axes of an array of shape {x.shape}"
            )
        self.axes = axes
        self.row_local = x.ndim > 1 and axes[0] == 0
        return x.transpose(axes)

    def vjp(self, cotangent):
        return (cotangent.transpose(np.argsort(self.axes)),)

    def kept_rows_vjp(self, indices, compact):
        # The kept slices land at their transposed positions: a zero buffer laid out
        # like the output, transposed back (a view, as the exact VJP returns).
        buffer = kept_slices_gradient(self.output_shape, 0, indices, compact, compact.dtype)
        return (buffer.transpose(np.argsort(self.axes)),), 0


class BroadcastTo(DataMovement):
    name = "broadcast_to"

    def forward(self, x):
        shape = tuple(self.params["shape"])
        xp = array_module(x)
        try:
            return xp.broadcast_to(x, shape)
        except ValueError:
            raise ShapeError(
                f"broadcast_to: cannot broadcast shape {x.shape} to {shape}"
            ) from None

    def vjp(self, cotangent):
        return (sum_to(cotangent, self.input_shapes[0]),)

    def vjp_flops(self):
        return int(np.prod(self.output_shape))

    def kept_rows_vjp(self, indices, compact):
        input_shape = self.input_shapes[0]
        if len(input_shape) == len(self.output_shape) and input_shape[0] == self.output_shape[0]:
            # The leading axis is not broadcast: reduce each kept row, then put it back.
            reduced = sum_to(compact, (len(indices),) + tuple(input_shape[1:]))
            grad = kept_slices_gradient(input_shape, 0, indices, reduced, compact.dtype)
        else:
            reduced = grad = sum_to(compact, input_shape)  # sums the kept rows only
        # Summing m numbers into one takes m - 1 additions.
        return (grad,), int(compact.size) - int(reduced.size)


class GetItem(DataMovement):
    """``x[index]`` for basic and integer-array indices; the VJP scatter-adds."""

    name = "getitem"

    def forward(self, x):
        index = self.params["index"]
        try:
            output = x[index]
        except IndexError as error:
            raise IndexError(f"getitem: {error} (array of shape {x.shape})") from None
        self.advanced = _is_advanced(index)
        return output

    def vjp(self, cotangent):
        xp = array_module(cotangent)
        grad = xp.zeros(self.input_shapes[0], dtype=cotangent.dtype)
        if self.advanced:
            _scatter_add(grad, self.params["index"], cotangent)
        else:
            grad[self.params["index"]] = cotangent
        return (grad,)

    def vjp_flops(self):
        return int(np.prod(self.output_shape)) if self.advanced else 0

    def kept_rows_vjp(self, indices, compact):
        """Send kept output rows to the input positions they were read from.

        Basic indexing makes the output a view of the input, so the kept rows are
        written through that view of a zero gradient. With integer arrays, the
        output's leading axis is either the first axis of their broadcast shape
        (arrays first, or not next to each other: numpy puts that shape first)
        or a leading slice; the index is narrowed to the kept rows and the rows
        are scatter-added, so repeated positions add up.

        Not covered: a scalar boolean (``x[:, True]``), which adds an axis that
        no input axis matches; there ``S v`` is formed densely and the exact VJP
        moves it all (its FLOPs say so).
        """
        xp = array_module(compact)
        kept = xp.asarray(indices)
        parts = _expanded_index(self.params["index"], len(self.input_shapes[0]))
        if parts is None:
            sketched = xp.zeros(self.output_shape, dtype=compact.dtype)
            sketched[kept] = compact
            return self.vjp(sketched), self.vjp_flops()

        grad = xp.zeros(self.input_shapes[0], dtype=compact.dtype)
        arrays = [position for position, part in enumerate(parts) if _is_index_array(part)]
        if not arrays:
            grad[parts][kept] = compact  # a view of the gradient, shaped like the output
            return (grad,), 0

        # With an integer array present, integers index as arrays too (numpy's rule).
        advanced = [position for position, part in enumerate(parts) if not _is_basic(part)]
        adjacent = advanced == list(range(advanced[0], advanced[-1] + 1))
        if not adjacent or advanced[0] == 0:
            # Output row i reads entry i of the broadcast index arrays.
            broadcast = np.broadcast_shapes(*(np.shape(parts[p]) for p in advanced))
            narrowed = list(parts)
            for position in advanced:
                narrowed[position] = xp.broadcast_to(xp.asarray(parts[position]), broadcast)[kept]
            _scatter_add(grad, tuple(narrowed), compact)
            return (grad,), int(compact.size)

        # Adjacent arrays after a leading slice: output row i is row i of x[slice].
        leading = grad[parts[0]]
        rest = parts[1:]
        if advanced[0] == 1:
            # Kept rows as one more array in front of the others: still adjacent.
            depth = len(np.broadcast_shapes(*(np.shape(parts[p]) for p in advanced)))
            rows = kept.reshape((-1,) + (1,) * depth)
            _scatter_add(leading, (rows,) + rest, compact)
        else:
            kept_rows = xp.zeros((len(indices),) + leading.shape[1:], dtype=compact.dtype)
            _scatter_add(kept_rows, (slice(None),) + rest, compact)
            leading[kept] = kept_rows
        return (grad,), int(compact.size)


def _is_advanced(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(hasattr(part, "shape") or isinstance(part, (list, np.ndarray)) for part in parts)


def _is_index_array(part) -> bool:
    return hasattr(part, "ndim") and not isinstance(part, (int, np.integer))


def _is_basic(part) -> bool:
    return part is None or isinstance(part, slice)


def _expanded_index(index, ndim: int):
    """``index`` as a tuple in which every entry indexes one axis or adds one (None).

    Lists become arrays, boolean arrays their ``nonzero()`` integer arrays (one per
    axis they cover), 0-d integer arrays plain ints (numpy treats them so) and the
    Ellipsis the slices it stands for. None for an index holding a scalar boolean.
    """
    parts = []
    for part in index if isinstance(index, tuple) else (index,):
        if isinstance(part, list):
            part = np.asarray(part)
        if isinstance(part, (bool, np.bool_)) or (
            hasattr(part, "dtype") and part.dtype == bool and part.ndim == 0
        ):
            return None
        if hasattr(part, "dtype") and part.dtype == bool:
            parts.extend(part.nonzero())
        elif hasattr(part, "ndim") and part.ndim == 0:
            parts.append(int(part))
        else:
            parts.append(part)
    if any(part is Ellipsis for part in parts):
        at = next(position for position, part in enumerate(parts) if part is Ellipsis)
        covered = sum(1 for part in parts if part is not None and part is not Ellipsis)
        parts[at : at + 1] = [slice(None)] * (ndim - covered)
    return tuple(parts)


def _scatter_add(target, index, values):
    """``target[index] += values`` with repeated indices adding up."""
    xp = array_module(target)
    if xp is np:
        np.add.at(target, index, values)
    else:  # cupy spells it scatter_add
        import cupyx

        cupyx.scatter_add(target, index, values)


class Concatenate(DataMovement):
    name = "concatenate"

    def forward(self, *arrays):
        if not arrays:
            raise ValueError("concatenate: needs at least one array")
        axis = normalize_axis(self.name, self.params["axis"], arrays[0].ndim, arrays[0].shape)
        reference = arrays[0].shape
        for position, array in enumerate(arrays):
            if array.ndim != len(reference) or any(
                size != reference[dim] for dim, size in enumerate(array.shape) if dim != axis
            ):
                raise ShapeError(
                    f"concatenate: array {position} has shape {array.shape}, which does not "
                    f"match {reference} outside axis {axis}"
                )
        self.axis = axis
        self.row_local = axis != 0
        return array_module(*arrays).concatenate(arrays, axis=axis)

    def vjp(self, cotangent):
        xp = array_module(cotangent)
        bounds = np.cumsum([shape[self.axis] for shape in self.input_shapes])[:-1]
        return tuple(xp.split(cotangent, bounds, axis=self.axis))

    def kept_rows_vjp(self, indices, compact):
        # Along axis 0: kept row i belongs to the input whose rows [start, stop) hold it.
        grads = []
        start = 0
        for shape, needed in zip(self.input_shapes, self.needs_input_grad, strict=True):
            stop = start + shape[0]
            grads.append(_rows_into(shape, indices, compact, start, stop) if needed else None)
            start = stop
        return grads, 0


class Stack(DataMovement):
    name = "stack"

    def forward(self, *arrays):
        if not arrays:
            raise ValueError("stack: needs at least one array")
        shapes = {array.shape for array in arrays}
        if len(shapes) != 1:
            raise ShapeError(f"stack: arrays must share one shape, got {sorted(shapes)}")
        self.axis = normalize_axis(self.name, self.params["axis"], arrays[0].ndim + 1)
        self.row_local = self.axis != 0
        return array_module(*arrays).stack(arrays, axis=self.axis)

    def vjp(self, cotangent):
        xp = array_module(cotangent)
        return tuple(
            xp.take(cotangent, index, axis=self.axis) for index in range(len(self.input_shapes))
        )

    def kept_rows_vjp(self, indices, compact):
        # Along axis 0: output row j is input j, kept whole (already scaled) or dropped.
        grads = [None] * len(self.input_shapes)
        for position, row in enumerate(indices.tolist()):
            if self.needs_input_grad[row]:
                grads[row] = compact[position]
        return grads, 0


class Pad(DataMovement):
    """Constant padding with numpy's ``pad_width`` convention."""

    name = "pad"

    def forward(self, x):
        xp = array_module(x)
        widths = np.broadcast_to(np.asarray(self.params["pad_width"], dtype=int), (x.ndim, 2))
        if np.any(widths < 0):
            raise ValueError(
                f"pad: pad_width must be non-negative, got {self.params['pad_width']}"
            )
        self.widths = widths
        self.row_local = x.ndim > 0 and tuple(widths[0]) == (0, 0)
        return xp.pad(x, [tuple(pair) for pair in widths], constant_values=self.params["value"])

    def vjp(self, cotangent):
        index = tuple(
            slice(before, size - after)
            for (before, after), size in zip(self.widths, cotangent.shape, strict=True)
        )
        return (cotangent[index],)

    def kept_rows_vjp(self, indices, compact):
        # Axis 0 is padded: kept rows in [before, rows - after) are input rows, shifted.
        before, after = (int(width) for width in self.widths[0])
        trailing = tuple(
            slice(low, size - high)
            for (low, high), size in zip(self.widths[1:], compact.shape[1:], strict=True)
        )
        cropped = compact[(slice(None),) + trailing]  # a view: the kept rows' input part
        stop = self.output_shape[0] - after
        return (_rows_into(self.input_shapes[0], indices, cropped, before, stop),), 0


class ToDevice(DataMovement):
    name = "to_device"

    def forward(self, x):
        self.source = "cpu" if array_module(x) is np else "gpu"
        return to_device(x, self.params["device"])

    def vjp(self, cotangent):
        return (to_device(cotangent, self.source),)

    def kept_rows_vjp(self, indices, compact):
        # Only the kept rows travel back to the input's device.
        moved = to_device(compact, self.source)
        grad = kept_slices_gradient(self.input_shapes[0], 0, indices, moved, moved.dtype)
        return (grad,), 0


class AsType(DataMovement):
    name = "astype"

    def forward(self, x):
        self.input_dtype = x.dtype
        self.row_local = x.ndim > 0  # row i of the output is row i of the input, cast
        return x.astype(self.params["dtype"])

    def vjp(self, cotangent):
        return (cotangent.astype(self.input_dtype),)


def _rows_into(shape, indices, compact, start, stop):
    """A zero gradient of ``shape`` holding the kept rows in ``[start, stop)``, shifted by start.

    ``indices`` are the kept output rows and ``compact`` their values; None when
    none of them falls in the range (no gradient reaches that input).
    """
    inside = np.flatnonzero((indices >= start) & (indices < stop))
    if not inside.size:
        return None
    xp = array_module(compact)
    if inside[-1] - inside[0] + 1 == inside.size:
        rows = compact[inside[0] : inside[-1] + 1]  # contiguous (sorted samples): a view
    else:
        rows = compact[xp.asarray(inside)]
    return kept_slices_gradient(shape, 0, indices[inside] - start, rows, compact.dtype)


def reshape(x, shape):
    x = as_tensor(x)
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    return record(Reshape, x, shape=tuple(shape))


def transpose(x, axes=None):
    return record(Transpose, as_tensor(x), axes=None if axes is None else tuple(axes))


def permute(x, axes):
    return transpose(x, axes)


def swapaxes(x, axis1, axis2):
    x = as_tensor(x)
    axes = list(range(x.ndim))
    first = normalize_axis("swapaxes", axis1, x.ndim, x.shape)
    second = normalize_axis("swapaxes", axis2, x.ndim, x.shape)
    axes[first], axes[second] = axes[second], axes[first]
    return transpose(x, axes)


def broadcast_to(x, shape):
    return record(BroadcastTo, as_tensor(x), shape=tuple(shape))


def expand_dims(x, axis):
    x = as_tensor(x)
    axis = normalize_axis("expand_dims", axis, x.ndim + 1)
    return reshape(x, x.shape[:axis] + (1,) + x.shape[axis:])


def squeeze(x, axis=None):
    x = as_tensor(x)
    if axis is None:
        return reshape(x, tuple(size for size in x.shape if size != 1))
    axis = normalize_axis("squeeze", axis, x.ndim, x.shape)
    if x.shape[axis] != 1:
        raise ValueError(
            f"squeeze: axis {axis} of shape {x.shape} has length {x.shape[axis]}, not 1"
        )
    return reshape(x, x.shape[:axis] + x.shape[axis + 1 :])


def getitem(x, index):
    def plain(part):
        return part.data if isinstance(part, Tensor) else part

    index = tuple(plain(part) for part in index) if isinstance(index, tuple) else plain(index)
    return record(GetItem, as_tensor(x), index=index)


def concatenate(tensors, axis=0):
    tensors = [as_tensor(t) for t in tensors]
    return record(Concatenate, *tensors, axis=axis)


def stack(tensors, axis=0):
    tensors = [as_tensor(t) for t in tensors]
    return record(Stack, *tensors, axis=axis)


def pad(x, pad_width, value=0.0):
    return record(Pad, as_tensor(x), pad_width=pad_width, value=value)
