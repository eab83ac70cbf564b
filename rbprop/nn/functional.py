"""``rbprop.nn.functional``: the functions of :mod:`rbprop.functional`, by PyTorch's path."""

from ..functional import *  # noqa: F403 - a re-export under a second name
from ..functional import __all__  # noqa: F401
