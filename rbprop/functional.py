"""Neural-network functions with ``torch.nn.functional``'s names and signatures."""

from __future__ import annotations

from .ops.attention import scaled_dot_product_attention
from .ops.conv import avg_pool2d, conv2d, max_pool2d
from .ops.dropout import dropout
from .ops.elementwise import gelu, relu, sigmoid, tanh
from .ops.linalg import linear
from .ops.loss import cross_entropy
from .ops.norm import batch_norm, layer_norm
from .ops.reduction import log_softmax as _log_softmax
from .ops.reduction import softmax as _softmax


def softmax(input, dim=-1):  # noqa: A002 - torch's argument name
    """Softmax along ``dim``."""
    return _softmax(input, axis=dim)


def log_softmax(input, dim=-1):  # noqa: A002 - torch's argument name
    """Log-softmax along ``dim``."""
    return _log_softmax(input, axis=dim)


__all__ = [
    "avg_pool2d",
    "batch_norm",
    "conv2d",
    "cross_entropy",
    "dropout",
    "gelu",
    "layer_norm",
    "linear",
    "log_softmax",
    "max_pool2d",
    "relu",
    "scaled_dot_product_attention",
    "sigmoid",
    "softmax",
    "tanh",
]
