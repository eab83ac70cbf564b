"""Layers: modules that hold parameters and call :mod:`rbprop.functional`.

Initialisation follows PyTorch's defaults, drawn from one module-level numpy
generator that :func:`manual_seed` resets (or from a generator passed as
``rng``): ``Linear`` and ``Conv2d`` weights are uniform in
``[-1/sqrt(fan_in), 1/sqrt(fan_in)]`` (Kaiming-uniform with ``a = sqrt(5)``),
and so are their biases; normalisation layers start as the identity.
Parameters are float32.
"""

from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from ..ops.attention import packed_self_attention
from .module import Module, Parameter

_generator = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Reset the generator that layers draw their initial parameters from."""
    global _generator
    _generator = np.random.default_rng(seed)


def default_generator() -> np.random.Generator:
    """The generator layers draw from when no ``rng`` is given."""
    return _generator


def _rng(rng):
    return rng if rng is not None else _generator


def uniform(shape, bound: float, rng=None) -> np.ndarray:
    """A float32 array uniform in ``[-bound, bound]``."""
    return _rng(rng).uniform(-bound, bound, size=shape).astype(np.float32)


def kaiming_uniform(shape, fan_in: int, rng=None) -> np.ndarray:
    """PyTorch's default weight init: ``gain * sqrt(3 / fan_in)`` with ``gain = sqrt(1/3)``."""
    return uniform(shape, 1.0 / math.sqrt(fan_in), rng)


def xavier_uniform(shape, fan_in: int, fan_out: int, rng=None) -> np.ndarray:
    """Glorot's uniform init: bound ``sqrt(6 / (fan_in + fan_out))``."""
    return uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)), rng)


def _pair(value, name: str) -> tuple:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 0 for v in pair):
        raise ValueError(f"Conv2d: {name} must be an int or a pair of ints >= 0, got {value!r}")
    return pair


class Linear(Module):
    """``y = x @ weight.T + bias``, weight of shape ``(out_features, in_features)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(kaiming_uniform((out_features, in_features), in_features, rng))
        bound = 1.0 / math.sqrt(in_features)
        self.bias = Parameter(uniform((out_features,), bound, rng)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution (cross-correlation) of ``(N, C, H, W)`` inputs, PyTorch's layout."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        rng=None,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        shape = (out_channels, in_channels, *self.kernel_size)
        self.weight = Parameter(kaiming_uniform(shape, fan_in, rng))
        bound = 1.0 / math.sqrt(fan_in)
        self.bias = Parameter(uniform((out_channels,), bound, rng)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


class BatchNorm2d(Module):
    """Batch normalisation over ``(N, H, W)`` per channel, with running statistics.

    Training mode normalises with the batch's statistics and updates
    ``running = (1 - momentum) * running + momentum * batch`` (the variance
    unbiased, as in PyTorch); evaluation mode uses the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype=np.float32))
        self.bias = Parameter(np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))

    def forward(self, x):
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class LayerNorm(Module):
    """Normalisation over the trailing ``normalized_shape`` axes, with a learned affine map."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape, self.eps = tuple(shape), eps
        self.weight = self.bias = None
        if elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, dtype=np.float32))
            self.bias = Parameter(np.zeros(self.normalized_shape, dtype=np.float32))

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """Zero each element with probability ``p`` in training mode (scaling the rest by 1/(1-p))."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        return F.dropout(x, p=self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLU(Module):
    """``max(x, 0)``."""

    def forward(self, x):
        return F.relu(x)


class GELU(Module):
    """``x * Phi(x)`` (``approximate="tanh"`` for the tanh formula)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, approximate=self.approximate)


class Identity(Module):
    """Returns its input."""

    def forward(self, x):
        return x


class Flatten(Module):
    """Merge axes ``start_dim`` to ``end_dim`` into one (by default all but the batch axis)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        start = self.start_dim % x.ndim
        end = self.end_dim % x.ndim
        merged = int(np.prod(x.shape[start : end + 1]))
        return x.reshape(x.shape[:start] + (merged,) + x.shape[end + 1 :])


class MultiheadAttention(Module):
    """Multi-head attention on batch-first ``(N, T, E)`` inputs.

    ``q, k, v`` come from one input projection ``in_proj`` (``E -> 3E``), are
    split into ``num_heads`` heads of ``E / num_heads`` features, go through
    :func:`rbprop.functional.scaled_dot_product_attention`, and the heads are
    merged by ``out_proj``. Self-attention (no ``key`` or ``value`` given) runs
    as one :func:`rbprop.ops.attention.packed_self_attention` op on the packed
    projection. Unlike PyTorch's module, ``forward`` returns only the
    output (no attention weights), and ``key``/``value`` default to ``query``.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, rng=None
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(
                f"MultiheadAttention: embed_dim {embed_dim} is not divisible by "
                f"num_heads {num_heads}"
            )
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.in_proj = Linear(embed_dim, 3 * embed_dim, bias=bias, rng=rng)
        self.in_proj.weight.data[...] = xavier_uniform(
            (3 * embed_dim, embed_dim), embed_dim, embed_dim, rng
        )
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, rng=rng)
        if bias:
            self.in_proj.bias.data[...] = 0.0
            self.out_proj.bias.data[...] = 0.0

    def _heads(self, x):
        """``(N, T, E) -> (N, heads, T, head_dim)``."""
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def _project(self, query, key, value):
        """Query, key and value heads, each from its third of ``in_proj``."""
        key = query if key is None else key
        value = key if value is None else value
        weight, bias = self.in_proj.weight, self.in_proj.bias
        projected = []
        for part, x in enumerate((query, key, value)):
            rows = slice(part * self.embed_dim, (part + 1) * self.embed_dim)
            part_bias = None if bias is None else bias[rows]
            projected.append(self._heads(F.linear(x, weight[rows], part_bias)))
        return tuple(projected)

    def forward(self, query, key=None, value=None, attn_mask=None, is_causal: bool = False):
        if query.ndim != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"MultiheadAttention: expected a (batch, tokens, {self.embed_dim}) query, "
                f"got shape {query.shape}"
            )
        dropout_p = self.dropout if self.training else 0.0
        if key is None and value is None:
            # One op on the packed projection: no head split, transpose or merge copies.
            merged = packed_self_attention(
                self.in_proj(query),
                self.num_heads,
                attn_mask=attn_mask,
                is_causal=is_causal,
                dropout_p=dropout_p,
            )
            return self.out_proj(merged)
        q, k, v = self._project(query, key, value)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p
        )
        batch, _, tokens, _ = attended.shape
        merged = attended.transpose(0, 2, 1, 3).reshape(batch, tokens, self.embed_dim)
        return self.out_proj(merged)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
