"""Shape primitives: reshape, transpose, broadcast_to, indexing, concatenate, stack, pad.

Their VJPs only move data (indexing's adds duplicates), so they cost no
arithmetic; their sampled VJP sketches the cotangent and moves it exactly
(``Primitive.sketched_cotangent_vjp``).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module, to_device
from ..primitive import Primitive, ShapeError, normalize_axis
from ..tensor import Tensor, as_tensor, record


class DataMovement(Primitive):
    """A primitive whose VJP moves (or adds) entries without other arithmetic.

    Where the op keeps the leading axis in place (a reshape or transpose that
    leaves axis 0 alone, concatenation along another axis, ...), it is row-local
    and its sampled VJP moves the kept rows only; otherwise ``S v`` is formed and
    moved whole.
    """

    def sampled_vjp(self, cotangent):
        if self.row_local:
            return self.row_sampled_vjp(cotangent)
        return self.sketched_cotangent_vjp(cotangent)


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
        from ..primitive import sum_to

        return (sum_to(cotangent, self.input_shapes[0]),)

    def vjp_flops(self):
        return int(np.prod(self.output_shape))

    def sampled_vjp(self, cotangent):
        """``sum_to(S v)`` with ``S`` on the output's leading axis, summing kept rows only."""
        from ..primitive import _row_norms, sum_to

        if not self.output_shape:
            return self.sketched_cotangent_vjp(cotangent)
        weights = _row_norms(cotangent) if self.sketch.needs_cotangent else None
        sample = self.draw_sample(self.output_shape[0], weights=weights)
        if not sample.is_diagonal:
            self._sampled_flops = self.vjp_flops() + sample.apply_flops(cotangent.shape, 0)
            return (sum_to(sample.apply(cotangent, axis=0), self.input_shapes[0]),)
        compact = sample.compress(cotangent, axis=0)
        self._sampled_flops = 2 * int(compact.size)  # scaling and summing the kept rows
        input_shape = self.input_shapes[0]
        if len(input_shape) == len(self.output_shape) and input_shape[0] == self.output_shape[0]:
            # The leading axis is not broadcast: reduce each kept row, then scatter back.
            reduced = sum_to(compact, (sample.kept,) + tuple(input_shape[1:]))
            return (sample.expand(reduced, axis=0),)
        return (sum_to(compact, input_shape),)  # the leading axis is summed away


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


def _is_advanced(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(hasattr(part, "shape") or isinstance(part, (list, np.ndarray)) for part in parts)


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


class ToDevice(DataMovement):
    name = "to_device"

    def forward(self, x):
        self.source = "cpu" if array_module(x) is np else "gpu"
        return to_device(x, self.params["device"])

    def vjp(self, cotangent):
        return (to_device(cotangent, self.source),)


class AsType(DataMovement):
    name = "astype"

    def forward(self, x):
        self.input_dtype = x.dtype
        return x.astype(self.params["dtype"])

    def vjp(self, cotangent):
        return (cotangent.astype(self.input_dtype),)


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
