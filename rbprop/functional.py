"""Neural-network functions with ``torch.nn.functional``'s names and signatures."""

from __future__ import annotations

from .ops.elementwise import gelu, relu, sigmoid, tanh
from .ops.linalg import linear
from .ops.reduction import log_softmax as _log_softmax
from .ops.reduction import softmax as _softmax


def softmax(input, dim=-1):  # noqa: A002 - torch's argument name
    """Softmax along ``dim``."""
    return _softmax(input, axis=dim)


def log_softmax(input, dim=-1):  # noqa: A002 - torch's argument name
    """Log-softmax along ``dim``."""
    return _log_softmax(input, axis=dim)


__all__ = ["gelu", "linear", "log_softmax", "relu", "sigmoid", "softmax", "tanh"]
