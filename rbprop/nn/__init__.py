"""Neural-network modules: layers, containers and the MLP, BagNet and ViT models."""

from . import functional
from .layers import (
    GELU,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    Identity,
    LayerNorm,
    Linear,
    MultiheadAttention,
    ReLU,
    manual_seed,
)
from .models import MLP, BagNet, ConvBlock, TransformerBlock, ViT
from .module import Module, ModuleList, Parameter, Sequential, StateDictError

__all__ = [
    "GELU",
    "MLP",
    "BagNet",
    "BatchNorm2d",
    "Conv2d",
    "ConvBlock",
    "Dropout",
    "Flatten",
    "Identity",
    "LayerNorm",
    "Linear",
    "Module",
    "ModuleList",
    "MultiheadAttention",
    "Parameter",
    "ReLU",
    "Sequential",
    "StateDictError",
    "TransformerBlock",
    "ViT",
    "functional",
    "manual_seed",
]
