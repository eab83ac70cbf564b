"""The models rbprop trains: an MLP, a BagNet (bag-of-local-features CNN) and a ViT.

All take images ``(N, C, H, W)`` and return logits ``(N, classes)``.
"""

from __future__ import annotations

import numpy as np

from ..ops.shape import broadcast_to, concatenate
from .layers import (
    GELU,
    BatchNorm2d,
    Conv2d,
    Flatten,
    LayerNorm,
    Linear,
    MultiheadAttention,
    ReLU,
    default_generator,
)
from .module import Module, ModuleList, Parameter, Sequential


def _activation(name: str) -> Module:
    if name == "relu":
        return ReLU()
    if name == "gelu":
        return GELU()
    raise ValueError(f"unknown activation {name!r}: expected 'relu' or 'gelu'")


class MLP(Module):
    """Fully connected layers ``widths[0] -> widths[1] -> ... -> widths[-1]``.

    The input is flattened to ``(N, widths[0])``; every layer but the last is
    followed by the activation. ``MLP([784, 512, 512, 10])`` is the default model.
    """

    def __init__(self, widths, activation: str = "relu", rng=None):
        super().__init__()
        widths = [int(width) for width in widths]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"MLP: need at least two positive widths, got {widths}")
        self.widths = widths
        layers = [Flatten()]
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(Linear(fan_in, fan_out, rng=rng))
            if index < len(widths) - 2:
                layers.append(_activation(activation))
        self.layers = Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class ConvBlock(Sequential):
    """``Conv2d -> BatchNorm2d -> ReLU`` (the convolution without bias: batch norm has one)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, rng=None):
        super().__init__(
            Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False, rng=rng),
            BatchNorm2d(out_channels),
            ReLU(),
        )


class BagNet(Module):
    """A bag-of-local-features CNN: every logit sees only a small patch of the image.

    A stem convolution (``patch_size`` x ``patch_size``, stride ``stride``) turns
    each patch into ``width`` features, ``depth`` blocks of 1x1 convolution +
    batch norm + ReLU transform them position by position (the receptive field
    stays the stem's patch), a 1x1 convolution gives class logits at every
    position, and the logits are averaged over positions. The defaults (11x11
    patches, stride 2: a 9x9 grid of patches on 28x28 images, 11x11 on 32x32)
    suit MNIST-like and CIFAR-like images alike.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 2,
        patch_size: int = 11,
        stride: int = 2,
        rng=None,
    ):
        super().__init__()
        self.patch_size, self.stride = patch_size, stride
        self.stem = ConvBlock(in_channels, width, patch_size, stride, rng=rng)
        self.blocks = Sequential(*(ConvBlock(width, width, 1, rng=rng) for _ in range(depth)))
        self.classifier = Conv2d(width, num_classes, 1, rng=rng)

    def forward(self, x):
        features = self.blocks(self.stem(x))
        logits = self.classifier(features)  # (N, classes, H', W'): one vote per patch
        return logits.mean(axis=(2, 3))


class TransformerBlock(Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 2.0, rng=None):
        super().__init__()
        hidden = int(round(width * mlp_ratio))
        self.norm1 = LayerNorm(width)
        self.attn = MultiheadAttention(width, heads, rng=rng)
        self.norm2 = LayerNorm(width)
        self.mlp = Sequential(
            Linear(width, hidden, rng=rng), GELU(), Linear(hidden, width, rng=rng)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(Module):
    """A vision transformer for small images.

    Non-overlapping ``patch_size`` patches are embedded by one linear map, a
    learned class token is prepended and learned position embeddings added;
    ``depth`` pre-norm blocks follow, then a layer norm and the linear head.
    With ``pool="cls"`` the head reads the class token; with ``pool="mean"`` it
    gives logits for every token and averages them (the same as applying it to
    the mean token). The second suits row-sampled VJPs much better: a sketch of
    the head's (and each block's) rows then drops tokens, not whole images.
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 4,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        pool: str = "cls",
        rng=None,
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"ViT: pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        if image_size % patch_size:
            raise ValueError(
                f"ViT: image_size {image_size} is not divisible by patch_size {patch_size}"
            )
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.grid = image_size // patch_size
        generator = rng if rng is not None else default_generator()
        self.patch_embed = Linear(in_channels * patch_size * patch_size, width, rng=rng)
        self.cls_token = Parameter(np.zeros((1, 1, width), dtype=np.float32))
        tokens = self.grid * self.grid + 1
        positions = 0.02 * generator.standard_normal((1, tokens, width))
        self.pos_embed = Parameter(positions.astype(np.float32))
        self.blocks = ModuleList(
            TransformerBlock(width, heads, mlp_ratio, rng=rng) for _ in range(depth)
        )
        self.norm = LayerNorm(width)
        self.head = Linear(width, num_classes, rng=rng)

    def patches(self, images):
        """``(N, C, H, W) -> (N, patches, C * p * p)``, patches in row-major order."""
        batch, channels, height, width = images.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(
                f"ViT: built for {self.image_size}x{self.image_size} images, got {height}x{width}"
            )
        p, grid = self.patch_size, self.grid
        blocks = images.reshape(batch, channels, grid, p, grid, p)
        blocks = blocks.transpose(0, 2, 4, 1, 3, 5)  # (N, rows, columns, C, p, p)
        return blocks.reshape(batch, grid * grid, channels * p * p)

    def forward(self, images):
        tokens = self.patch_embed(self.patches(images))
        cls = broadcast_to(self.cls_token, (tokens.shape[0], 1, self.width))
        x = concatenate([cls, tokens], axis=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        if self.pool == "cls":
            # Layer norm is per token: normalising the class token alone gives the same
            # features for the head and skips the other tokens' forward and backward.
            return self.head(self.norm(x[:, 0]))
        # mean(head(x_t)) = head(mean(x_t)), but per-token logits let a sketch of the
        # head's rows drop tokens rather than whole images
        return self.head(self.norm(x)).mean(axis=1)
