"""Elementwise primitives: arithmetic, transcendental maps and activations.

Each op broadcasts its inputs the numpy way. Its exact VJP is ``chain``, which
turns the cotangent into one broadcast-shaped cotangent per input; the shared
``sum_to`` then reduces each to its input's shape. All of them are row-local,
so their sampled VJP runs ``chain`` on the kept rows only (see
``Primitive.row_sampled_vjp``).
"""

from __future__ import annotations

import math

from ..backend import array_module
from ..kernels.gelu import gelu as fused_gelu
from ..kernels.gelu import gelu_backward as fused_gelu_backward
from ..kernels.relu import relu as fused_relu
from ..kernels.relu import relu_backward as fused_relu_backward
from ..kernels.relu import relu_backward_rows
from ..primitive import Primitive, broadcast_shapes, sum_to
from ..rowsparse import RowSparse
from ..tensor import Tensor, as_tensor, record


class Elementwise(Primitive):
    """Base of elementwise ops: ``compute`` forward, ``chain`` for the VJP."""

    row_local = True
    saves_inputs = True
    saves_output = False
    flops_per_element = 1

    def forward(self, *arrays):
        if len(arrays) > 1:
            broadcast_shapes(self.name, *(array.shape for array in arrays))
        output = self.compute(*arrays)
        self.save(
            operands=list(arrays) if self.saves_inputs else None,
            output=output if self.saves_output else None,
        )
        return output

    def saved_arrays(self):
        found = {}
        for index, array in enumerate(self.operands or []):
            found[f"operand{index}"] = array
        if self.output is not None:
            found["output"] = self.output
        return found

    def row_aligned(self, shape) -> bool:
        """Broadcast inputs carry the row axis only at full rank and full length."""
        return len(shape) == len(self.output_shape) and super().row_aligned(shape)

    def _restrict_rows(self, kept, rows):
        state = {
            "input_shapes": self.input_shapes,
            "output_shape": self.output_shape,
            "operands": self.operands,
            "output": self.output,
        }

        def restrict(array):
            return array[kept] if self.row_aligned(array.shape) else array

        if self.operands is not None:
            self.operands = [restrict(array) for array in self.operands]
        if self.output is not None:
            self.output = restrict(self.output)
        self.input_shapes = tuple(
            (len(kept),) + shape[1:] if self.row_aligned(shape) else shape
            for shape in self.input_shapes
        )
        self.output_shape = (len(kept),) + self.output_shape[1:]
        return state

    def vjp(self, cotangent):
        operands = self.operands if self.operands is not None else [None] * len(self.input_shapes)
        partial = self.chain(cotangent, *operands, self.output)
        return tuple(
            None if grad is None or not needed else sum_to(grad, shape)
            for grad, needed, shape in zip(
                partial, self.needs_input_grad, self.input_shapes, strict=True
            )
        )

    def vjp_flops(self):
        return self.flops_per_element * math.prod(self.output_shape)


class Add(Elementwise):
    name = "add"
    saves_inputs = False
    flops_per_element = 0

    def compute(self, x, y):
        return x + y

    def chain(self, v, x, y, out):
        return v, v


class Sub(Elementwise):
    name = "sub"
    saves_inputs = False
    flops_per_element = 1

    def compute(self, x, y):
        return x - y

    def chain(self, v, x, y, out):
        return v, -v


class Mul(Elementwise):
    name = "mul"
    flops_per_element = 2

    def compute(self, x, y):
        return x * y

    def chain(self, v, x, y, out):
        return v * y, v * x


class Div(Elementwise):
    name = "div"
    flops_per_element = 4

    def compute(self, x, y):
        return x / y

    def chain(self, v, x, y, out):
        v_over_y = v / y
        return v_over_y, -v_over_y * x / y


class Pow(Elementwise):
    """``x ** y``; the gradient for ``y`` uses ``log x`` (defined for ``x > 0``)."""

    name = "pow"
    saves_output = True
    flops_per_element = 5

    def compute(self, x, y):
        return x**y

    def chain(self, v, x, y, out):
        xp = array_module(x)
        grad_x = v * y * x ** (y - 1) if self.needs_input_grad[0] else None
        grad_y = None
        if self.needs_input_grad[1]:
            safe = xp.where(x > 0, x, 1)
            grad_y = v * out * xp.log(safe)
        return grad_x, grad_y


class Maximum(Elementwise):
    """Elementwise maximum; at ties each input gets half of the cotangent."""

    name = "maximum"
    flops_per_element = 3

    def compute(self, x, y):
        return array_module(x, y).maximum(x, y)

    def chain(self, v, x, y, out):
        share = (x > y) + 0.5 * (x == y)
        share = share.astype(v.dtype)
        return v * share, v * (1 - share)


class Minimum(Elementwise):
    """Elementwise minimum; at ties each input gets half of the cotangent."""

    name = "minimum"
    flops_per_element = 3

    def compute(self, x, y):
        return array_module(x, y).minimum(x, y)

    def chain(self, v, x, y, out):
        share = ((x < y) + 0.5 * (x == y)).astype(v.dtype)
        return v * share, v * (1 - share)


class Where(Elementwise):
    name = "where"
    flops_per_element = 2

    def compute(self, condition, x, y):
        return array_module(x, y).where(condition, x, y)

    def chain(self, v, condition, x, y, out):
        xp = array_module(v)
        zero = xp.zeros((), dtype=v.dtype)
        return None, xp.where(condition, v, zero), xp.where(condition, zero, v)


class Neg(Elementwise):
    name = "neg"
    saves_inputs = False

    def compute(self, x):
        return -x

    def chain(self, v, x, out):
        return (-v,)


class Exp(Elementwise):
    name = "exp"
    saves_inputs = False
    saves_output = True

    def compute(self, x):
        return array_module(x).exp(x)

    def chain(self, v, x, out):
        return (v * out,)


class Log(Elementwise):
    name = "log"

    def compute(self, x):
        return array_module(x).log(x)

    def chain(self, v, x, out):
        return (v / x,)


class Sqrt(Elementwise):
    name = "sqrt"
    saves_inputs = False
    saves_output = True
    flops_per_element = 2

    def compute(self, x):
        return array_module(x).sqrt(x)

    def chain(self, v, x, out):
        return (v * 0.5 / out,)


class Abs(Elementwise):
    name = "abs"

    def compute(self, x):
        return array_module(x).abs(x)

    def chain(self, v, x, out):
        return (v * array_module(x).sign(x),)


class Tanh(Elementwise):
    name = "tanh"
    saves_inputs = False
    saves_output = True
    flops_per_element = 3

    def compute(self, x):
        return array_module(x).tanh(x)

    def chain(self, v, x, out):
        return (v * (1 - out * out),)


class Sigmoid(Elementwise):
    name = "sigmoid"
    saves_inputs = False
    saves_output = True
    flops_per_element = 3

    def compute(self, x):
        xp = array_module(x)
        # 1 / (1 + exp(-x)) overflows for very negative x; this form never does.
        positive = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1 / (1 + positive), positive / (1 + positive)).astype(x.dtype)

    def chain(self, v, x, out):
        return (v * out * (1 - out),)


class Relu(Elementwise):
    """``max(x, 0)``; saves only the boolean mask ``x > 0`` (one byte an element)."""

    name = "relu"
    saves_inputs = False

    def compute(self, x):
        output, mask = fused_relu(x)  # one pass; -inf gives 0 as numpy's maximum does
        self.save(mask=mask)
        return output

    def forward(self, x):
        output = self.compute(x)
        self.save(operands=[self.mask], output=None)
        return output

    def chain(self, v, mask, out):
        return (fused_relu_backward(v, mask),)

    def row_sparse_vjp(self, cotangent: RowSparse):
        """``v * mask`` on the kept rows of a row-sparse ``v``: one pass, no gather of the mask."""
        self._sampled_flops = self.vjp_flops() * cotangent.kept // max(self.output_shape[0], 1)
        if not cotangent.kept:
            return (None,)
        values = relu_backward_rows(cotangent.values, self.mask, cotangent.indices)
        return (RowSparse(cotangent.indices, values, self.input_shapes[0]),)


class Gelu(Elementwise):
    """``x * Phi(x)``; ``approximate="tanh"`` uses the tanh formula as PyTorch does."""

    name = "gelu"
    flops_per_element = 12

    def compute(self, x):
        xp = array_module(x)
        if self.params.get("approximate", "none") == "tanh":
            inner = _TANH_SCALE * (x + 0.044715 * x**3)
            return (0.5 * x * (1 + xp.tanh(inner))).astype(x.dtype)
        return fused_gelu(x)  # x Phi(x), one pass (rbprop.kernels.gelu)

    def chain(self, v, x, out):
        if self.params.get("approximate", "none") != "tanh":
            return (fused_gelu_backward(v, x),)  # v (Phi(x) + x phi(x))
        xp = array_module(x)
        inner = _TANH_SCALE * (x + 0.044715 * x**3)
        tanh_inner = xp.tanh(inner)
        d_inner = _TANH_SCALE * (1 + 3 * 0.044715 * x**2)
        derivative = 0.5 * (1 + tanh_inner) + 0.5 * x * (1 - tanh_inner**2) * d_inner
        return ((v * derivative).astype(v.dtype),)


_TANH_SCALE = math.sqrt(2 / math.pi)


class Clip(Elementwise):
    """``clip(x, a_min, a_max)``; the gradient passes where ``a_min <= x <= a_max``."""

    name = "clip"

    def compute(self, x):
        return array_module(x).clip(x, self.params["a_min"], self.params["a_max"])

    def chain(self, v, x, out):
        inside = True
        if self.params["a_min"] is not None:
            inside = inside & (x >= self.params["a_min"])
        if self.params["a_max"] is not None:
            inside = inside & (x <= self.params["a_max"])
        return (v * inside,)


def _unary(op_class, x, **params) -> Tensor:
    return record(op_class, as_tensor(x), **params)


def _pair(x, y):
    like = x if isinstance(x, Tensor) else y if isinstance(y, Tensor) else None
    return as_tensor(x, like), as_tensor(y, like)


def add(x, y):
    return record(Add, *_pair(x, y))


def subtract(x, y):
    return record(Sub, *_pair(x, y))


def multiply(x, y):
    return record(Mul, *_pair(x, y))


def divide(x, y):
    return record(Div, *_pair(x, y))


def power(x, y):
    return record(Pow, *_pair(x, y))


def maximum(x, y):
    return record(Maximum, *_pair(x, y))


def minimum(x, y):
    return record(Minimum, *_pair(x, y))


def where(condition, x, y):
    """``x`` where ``condition`` holds, else ``y`` (``condition`` gets no gradient)."""
    condition = condition.data if isinstance(condition, Tensor) else condition
    x, y = _pair(x, y)
    condition = array_module(x.data).asarray(condition).astype(bool)
    return record(Where, Tensor(condition), x, y)


def negative(x):
    return _unary(Neg, x)


def exp(x):
    return _unary(Exp, x)


def log(x):
    return _unary(Log, x)


def sqrt(x):
    return _unary(Sqrt, x)


def abs(x):  # noqa: A001 - numpy's name
    return _unary(Abs, x)


def tanh(x):
    return _unary(Tanh, x)


def sigmoid(x):
    return _unary(Sigmoid, x)


def relu(x):
    return _unary(Relu, x)


def gelu(x, approximate: str = "none"):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _unary(Gelu, x, approximate=approximate)


def clip(x, a_min=None, a_max=None):
    if a_min is None and a_max is None:
        raise ValueError("clip: give a_min, a_max or both")
    return _unary(Clip, x, a_min=a_min, a_max=a_max)
