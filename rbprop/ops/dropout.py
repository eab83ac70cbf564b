"""Inverted dropout: zero each element with probability ``p``, scale the rest by ``1/(1-p)``.

Masks are drawn on the CPU with a :class:`numpy.random.Generator` (and moved to
the input's device), so a seed gives the same mask on numpy and cupy. Where no
generator is given, the module's default generator is used; :func:`manual_seed`
reseeds it.
"""

from __future__ import annotations

import numbers

import numpy as np

from ..backend import array_module
from ..primitive import Primitive
from ..tensor import Tensor, as_tensor, record

_default = {"generator": np.random.default_rng()}


def manual_seed(seed: int) -> None:
    """Reseed the generator that dropout uses when none is passed."""
    _default["generator"] = np.random.default_rng(seed)


def resolve_generator(generator) -> np.random.Generator:
    """A Generator from ``None`` (the module default), an int seed, or a Generator."""
    if generator is None:
        return _default["generator"]
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise TypeError(
        f"dropout: generator must be None, an int seed or a numpy Generator, got {generator!r}"
    )


def keep_mask(shape, p: float, generator, like):
    """Boolean mask, True with probability ``1 - p``, on the device of ``like``."""
    mask = resolve_generator(generator).random(shape) >= p
    return array_module(like).asarray(mask)


def check_probability(op_name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{op_name}: dropout probability must lie in [0, 1], got {p!r}")
    return float(p)


class Dropout(Primitive):
    """``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``; the VJP is ``v * m / (1 - p)``.

    Saves only the boolean mask. Row-local: the sampled VJP keeps batch rows
    (importance weights ``||v_i||``).
    """

    name = "dropout"
    row_local = True

    def forward(self, x):
        p = self.params["p"]
        keep = keep_mask(x.shape, p, self.params["generator"], x)
        output = x * keep * self._scale(x.dtype)
        self.save(keep=keep)
        return output

    def _scale(self, dtype):
        p = self.params["p"]
        return dtype.type(0.0 if p == 1.0 else 1.0 / (1.0 - p))

    def vjp(self, cotangent):
        return (cotangent * self.keep * self._scale(cotangent.dtype),)

    def vjp_flops(self):
        return 2 * int(np.prod(self.output_shape))


def dropout(input, p=0.5, training=True, generator=None) -> Tensor:  # noqa: A002
    """Inverted dropout as ``torch.nn.functional.dropout``; identity when not training.

    ``generator`` is a :class:`numpy.random.Generator`, an int seed, or None for
    the module default (see :func:`manual_seed`).
    """
    p = check_probability("dropout", p)
    x = as_tensor(input)
    if not training or p == 0.0:
        return x
    return record(Dropout, x, p=p, generator=generator)
