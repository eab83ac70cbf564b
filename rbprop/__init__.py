"""rbprop: reverse-mode autodiff in which every primitive has an exact and a sampled VJP.

Start with :func:`tensor`, differentiate with :meth:`Tensor.backward`, and wrap
the forward pass in :func:`sampled` to make the recorded ops use randomized
(unbiased, cheaper) vector-Jacobian products. See ``README.md`` for a tour.
"""

from . import cost, functional, sketch
from .autograd import enable_grad, grad_enabled, no_grad, set_grad_enabled
from .backend import gpu_available
from .ops.elementwise import (
    abs,
    add,
    clip,
    divide,
    exp,
    gelu,
    log,
    maximum,
    minimum,
    multiply,
    negative,
    power,
    relu,
    sigmoid,
    sqrt,
    subtract,
    tanh,
    where,
)
from .ops.linalg import linear, matmul
from .ops.reduction import log_softmax, logsumexp, max, mean, min, softmax, sum, var
from .ops.shape import (
    broadcast_to,
    concatenate,
    expand_dims,
    pad,
    permute,
    reshape,
    squeeze,
    stack,
    swapaxes,
    transpose,
)
from .primitive import Primitive, ShapeError
from .sampling import exact, sampled
from .tensor import Tensor, tensor

__version__ = "0.1.0"

__all__ = [
    "Primitive",
    "ShapeError",
    "Tensor",
    "abs",
    "add",
    "broadcast_to",
    "clip",
    "concatenate",
    "cost",
    "divide",
    "enable_grad",
    "exact",
    "exp",
    "expand_dims",
    "functional",
    "gelu",
    "gpu_available",
    "grad_enabled",
    "linear",
    "log",
    "log_softmax",
    "logsumexp",
    "matmul",
    "max",
    "maximum",
    "mean",
    "min",
    "minimum",
    "multiply",
    "negative",
    "no_grad",
    "pad",
    "permute",
    "power",
    "relu",
    "reshape",
    "sampled",
    "set_grad_enabled",
    "sigmoid",
    "sketch",
    "softmax",
    "sqrt",
    "squeeze",
    "stack",
    "subtract",
    "sum",
    "swapaxes",
    "tanh",
    "tensor",
    "transpose",
    "var",
    "where",
]
