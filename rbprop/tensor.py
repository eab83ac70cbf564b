"""The Tensor: an array, an optional gradient, and the op that produced it.

``Tensor.data`` is a plain numpy or cupy array. Operators and methods follow
numpy's names and call primitives through :func:`record`, which computes the
forward result and, when gradient mode is on and an input requires a gradient,
keeps the primitive as a node of the graph.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import cost, sampling
from .autograd import grad_enabled, run_backward
from .backend import array_module, device_of, is_array, to_device, to_numpy


class Tensor:
    """An n-dimensional array that can record the ops applied to it."""

    __array_priority__ = 1000  # numpy defers to Tensor's reflected operators

    def __init__(self, data, requires_grad: bool = False, op=None):
        if not is_array(data):
            data = np.asarray(data)
        self.data = data
        self.grad: Tensor | None = None
        self.op = op
        self._requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # -- properties ---------------------------------------------------------

    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, flag: bool) -> None:
        self.requires_grad_(flag)

    def requires_grad_(self, flag: bool = True) -> Tensor:
        """Mark this tensor as needing a gradient (floating dtypes only); returns self."""
        if flag and not np.issubdtype(self.data.dtype, np.floating):
            raise TypeError(
                f"requires_grad: only floating-point tensors can require gradients, "
                f"got dtype {self.data.dtype} with shape {self.shape}"
            )
        if not flag and self.op is not None:
            raise RuntimeError("requires_grad_: use detach() to stop gradients of a non-leaf")
        self._requires_grad = bool(flag)
        return self

    @property
    def is_leaf(self) -> bool:
        return self.op is None

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def device(self) -> str:
        return device_of(self.data)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        op = f", op={self.op.name}" if self.op is not None else ""
        body = np.array2string(to_numpy(self.data), separator=", ", prefix="tensor(")
        return f"tensor({body}, dtype={self.dtype}{grad}{op})"

    # -- conversion ---------------------------------------------------------

    def numpy(self):
        """The data as a numpy array (a copy for GPU tensors)."""
        return to_numpy(self.data)

    def item(self):
        """The single value of a one-element tensor as a Python number."""
        if self.size != 1:
            raise ValueError(f"item: only one-element tensors convert, got shape {self.shape}")
        return to_numpy(self.data).reshape(()).item()

    def detach(self) -> Tensor:
        """A new leaf sharing the data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device: str) -> Tensor:
        """A copy on ``"cpu"`` or ``"gpu"`` (recorded: gradients flow back)."""
        from .ops.shape import ToDevice

        if device == self.device:
            return self
        return record(ToDevice, self, device=device)

    def astype(self, dtype) -> Tensor:
        """A copy converted to ``dtype`` (recorded when both dtypes are floating)."""
        from .ops.shape import AsType

        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.floating):
            return Tensor(self.data.astype(dtype))
        return record(AsType, self, dtype=dtype)

    def __array__(self, dtype=None, copy=None):
        array = to_numpy(self.data)
        return array if dtype is None else array.astype(dtype)

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __bool__(self) -> bool:
        return bool(self.item())

    # -- differentiation ----------------------------------------------------

    def backward(self, cotangent=None, retain_graph: bool = False) -> None:
        """Accumulate ``d(self)/d(leaf)^T cotangent`` into every leaf's ``.grad``.

        Gradients add up across calls (set ``.grad = None`` or use an optimizer's
        ``zero_grad`` between steps). ``cotangent`` may be omitted only for a
        one-element tensor. The graph's saved arrays are freed afterwards unless
        ``retain_graph`` is true.
        """
        if not self.requires_grad:
            raise RuntimeError(
                f"backward: tensor of shape {self.shape} does not require a gradient "
                "(no input of the ops that made it requires one)"
            )
        made_by = f" (the output of {self.op.name})" if self.op is not None else ""
        if cotangent is None:
            if self.size != 1:
                raise RuntimeError(
                    "backward: a cotangent is needed for a non-scalar tensor of shape "
                    f"{self.shape}{made_by}"
                )
            xp = array_module(self.data)
            cotangent = xp.ones(self.shape, dtype=self.dtype)
        else:
            cotangent = cotangent.data if isinstance(cotangent, Tensor) else cotangent
            xp = array_module(self.data)
            cotangent = xp.asarray(cotangent, dtype=self.dtype)
            if cotangent.shape != self.data.shape:
                raise ValueError(
                    f"backward: cotangent of shape {cotangent.shape} for a tensor of shape "
                    f"{self.shape}{made_by}"
                )
        run_backward(self, cotangent, retain_graph)

    # -- operators ----------------------------------------------------------

    def __add__(self, other):
        return _binary("Add", self, other)

    def __radd__(self, other):
        return _binary("Add", other, self)

    def __sub__(self, other):
        return _binary("Sub", self, other)

    def __rsub__(self, other):
        return _binary("Sub", other, self)

    def __mul__(self, other):
        return _binary("Mul", self, other)

    def __rmul__(self, other):
        return _binary("Mul", other, self)

    def __truediv__(self, other):
        return _binary("Div", self, other)

    def __rtruediv__(self, other):
        return _binary("Div", other, self)

    def __pow__(self, other):
        return _binary("Pow", self, other)

    def __rpow__(self, other):
        return _binary("Pow", other, self)

    def __matmul__(self, other):
        from .ops.linalg import matmul

        return matmul(self, other)

    def __rmatmul__(self, other):
        from .ops.linalg import matmul

        return matmul(other, self)

    def __neg__(self):
        from .ops.elementwise import Neg

        return record(Neg, self)

    def __pos__(self):
        return self

    def __abs__(self):
        from .ops.elementwise import Abs

        return record(Abs, self)

    def __getitem__(self, index):
        from .ops.shape import getitem

        return getitem(self, index)

    def _compare(self, other, ufunc):
        other_data = other.data if isinstance(other, Tensor) else other
        return Tensor(ufunc(self.data, other_data))

    def __lt__(self, other):
        return self._compare(other, np.less)

    def __le__(self, other):
        return self._compare(other, np.less_equal)

    def __gt__(self, other):
        return self._compare(other, np.greater)

    def __ge__(self, other):
        return self._compare(other, np.greater_equal)

    def __eq__(self, other):  # elementwise, as in numpy
        return self._compare(other, np.equal)

    def __ne__(self, other):
        return self._compare(other, np.not_equal)

    __hash__ = object.__hash__

    # -- numpy-style methods --------------------------------------------------

    def sum(self, axis=None, keepdims=False):
        from .ops.reduction import sum as sum_

        return sum_(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        from .ops.reduction import mean

        return mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False):
        from .ops.reduction import max as max_

        return max_(self, axis=axis, keepdims=keepdims)

    def min(self, axis=None, keepdims=False):
        from .ops.reduction import min as min_

        return min_(self, axis=axis, keepdims=keepdims)

    def var(self, axis=None, keepdims=False):
        from .ops.reduction import var

        return var(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        from .ops.shape import reshape

        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return reshape(self, shape)

    def flatten(self):
        return self.reshape(-1)

    def transpose(self, *axes):
        from .ops.shape import transpose

        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return transpose(self, axes or None)

    def permute(self, *axes):
        return self.transpose(*axes)

    def swapaxes(self, axis1, axis2):
        from .ops.shape import swapaxes

        return swapaxes(self, axis1, axis2)

    @property
    def T(self):  # noqa: N802 - numpy's name
        return self.transpose()

    def exp(self):
        from .ops.elementwise import exp

        return exp(self)

    def log(self):
        from .ops.elementwise import log

        return log(self)

    def sqrt(self):
        from .ops.elementwise import sqrt

        return sqrt(self)

    def tanh(self):
        from .ops.elementwise import tanh

        return tanh(self)

    def sigmoid(self):
        from .ops.elementwise import sigmoid

        return sigmoid(self)

    def relu(self):
        from .ops.elementwise import relu

        return relu(self)

    def clip(self, a_min=None, a_max=None):
        from .ops.elementwise import clip

        return clip(self, a_min, a_max)

    def argmax(self, axis=None):
        return Tensor(array_module(self.data).argmax(self.data, axis=axis))


def tensor(data, requires_grad: bool = False, dtype=None, device: str | None = None) -> Tensor:
    """Make a leaf tensor from array-like ``data``.

    Python numbers and lists of floats become float32 (the training default);
    an ndarray keeps its dtype (float64 stays float64).
    """
    if isinstance(data, Tensor):
        data = data.data
    if is_array(data):
        array = data if dtype is None else data.astype(dtype)
    else:
        array = np.asarray(data, dtype=dtype)
        if dtype is None and array.dtype == np.float64:
            array = array.astype(np.float32)
    if device is not None:
        array = to_device(array, device)
    return Tensor(array, requires_grad=requires_grad)


def as_tensor(value, like=None) -> Tensor:
    """``value`` as a Tensor; a Python number takes ``like``'s dtype and device."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, numbers.Number) and like is not None:
        xp = array_module(like.data)
        dtype = like.dtype if np.issubdtype(like.dtype, np.inexact) else None
        return Tensor(xp.asarray(value, dtype=dtype))
    if is_array(value):
        return Tensor(value)
    return tensor(value)


def _binary(op_class_name: str, left, right):
    from .ops import elementwise

    like = left if isinstance(left, Tensor) else right
    return record(
        getattr(elementwise, op_class_name), as_tensor(left, like), as_tensor(right, like)
    )


def record(op_class, *inputs, **params) -> Tensor:
    """Run ``op_class`` forward on ``inputs`` and record it when a gradient is needed."""
    tensors = [value if isinstance(value, Tensor) else as_tensor(value) for value in inputs]
    recording = grad_enabled() and any(t.requires_grad for t in tensors)
    op = op_class(**params)
    op.recording = recording
    op.input_shapes = tuple(t.shape for t in tensors)
    if recording:
        op.needs_input_grad = tuple(t.requires_grad for t in tensors)
        sampling.configure(op)

    output = op.forward(*(t.data for t in tensors))
    if not recording:
        return Tensor(output)

    op.output_shape = tuple(output.shape)
    op.dtype = output.dtype
    op.edges = tuple(
        (t.op if t.op is not None else t) if t.requires_grad else None for t in tensors
    )
    parameters = {id(t.data) for t in tensors if t.is_leaf and t.requires_grad}
    for array in op.saved_arrays().values():
        if id(array) not in parameters:
            cost.saved_bytes.hold(array)
            op._held.append(array)
    return Tensor(output, requires_grad=True, op=op)


def accumulate_grad(leaf: Tensor, grad) -> None:
    """Add ``grad`` into ``leaf.grad`` (never in place: earlier arrays stay valid)."""
    if tuple(grad.shape) != leaf.shape:
        raise ValueError(
            f"backward: gradient of shape {tuple(grad.shape)} for a leaf of shape {leaf.shape}"
        )
    if grad.dtype != leaf.dtype:
        grad = grad.astype(leaf.dtype)
    if leaf.grad is None:
        leaf.grad = Tensor(grad)
    else:
        leaf.grad = Tensor(leaf.grad.data + grad)
