"""Counter-based uniform draws: a sketch's random numbers from one 64-bit seed.

Uniform ``i`` of the stream with seed ``s`` is SplitMix64's output for the
counter ``s + (i + 1) * 0x9E3779B97F4A7C15`` (mod 2^64): a 64-bit finaliser
(two xor-shift-multiply rounds and an xor-shift) whose top 53 bits, times
``2^-53``, give a float in ``[0, 1)``. SplitMix64 passes the BigCrush battery
as a generator, which is far more than keeping rows with given probabilities
asks. Being counter-based, a draw needs no generator object: building a numpy
``Generator`` costs 60 to 100 microseconds when a large matrix product has just
flushed the caches, more than the whole draw of a 128-row sketch here.

:func:`keep_indices` draws a Bernoulli sketch's kept indices and their scales
``1/p_i`` in one compiled pass; its numpy twin computes the same uniforms with
uint64 array arithmetic, so both give bit-identical draws.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from .dispatch import numba_disabled

MASK64 = (1 << 64) - 1
#: 2^64 / golden ratio: SplitMix64's counter increment.
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_UNIT = 1.0 / (1 << 53)


def fresh_seed() -> int:
    """64 fresh bits from the operating system: the seed when none is given."""
    return int.from_bytes(os.urandom(8), "little")


def mix64(value: int) -> int:
    """SplitMix64's finaliser of a Python int (taken mod 2^64): a 64-bit hash."""
    value &= MASK64
    value = ((value ^ (value >> 30)) * _MIX1) & MASK64
    value = ((value ^ (value >> 27)) * _MIX2) & MASK64
    return value ^ (value >> 31)


# ----------------------------------------------------------------------------- numba kernels


@numba.njit(cache=True, inline="always")
def _uniform_at(seed, index):
    value = seed + np.uint64(index + 1) * np.uint64(GOLDEN_GAMMA)
    value = (value ^ (value >> np.uint64(30))) * np.uint64(_MIX1)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(_MIX2)
    value = value ^ (value >> np.uint64(31))
    return np.float64(value >> np.uint64(11)) * _UNIT


@numba.njit(cache=True)
def _uniforms_numba(seed, size):
    out = np.empty(size, np.float64)
    for index in range(size):
        out[index] = _uniform_at(seed, index)
    return out


@numba.njit(cache=True)
def _keep_constant_numba(seed, size, probability):
    indices = np.empty(size, np.int64)
    kept = 0
    for index in range(size):
        if _uniform_at(seed, index) < probability:
            indices[kept] = index
            kept += 1
    scales = np.full(kept, 1.0 / probability) if kept else np.empty(0, np.float64)
    return indices[:kept].copy(), scales


@numba.njit(cache=True)
def _keep_varying_numba(seed, probabilities):
    size = probabilities.size
    indices = np.empty(size, np.int64)
    kept = 0
    for index in range(size):
        if _uniform_at(seed, index) < probabilities[index]:
            indices[kept] = index
            kept += 1
    scales = np.empty(kept, np.float64)
    for position in range(kept):
        scales[position] = 1.0 / probabilities[indices[position]]
    return indices[:kept].copy(), scales


# ----------------------------------------------------------------------------- numpy twins


def uniforms_reference(seed: int, size: int):
    """numpy twin of :func:`uniforms`."""
    counters = np.arange(1, size + 1, dtype=np.uint64)
    value = np.uint64(seed) + counters * np.uint64(GOLDEN_GAMMA)  # uint64 arrays wrap
    value = (value ^ (value >> np.uint64(30))) * np.uint64(_MIX1)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(_MIX2)
    value ^= value >> np.uint64(31)
    return (value >> np.uint64(11)).astype(np.float64) * _UNIT


def keep_indices_reference(seed: int, size: int, probabilities):
    """numpy twin of :func:`keep_indices`."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    indices = np.flatnonzero(uniforms_reference(seed, size) < probabilities)
    if probabilities.ndim:
        return indices, 1.0 / probabilities[indices]
    return indices, np.full(indices.size, 1.0 / probabilities if indices.size else 0.0)


# ----------------------------------------------------------------------------- dispatchers


def _checked_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"draws: seed must be an int, got {seed!r}")
    if not 0 <= int(seed) <= MASK64:
        raise ValueError(f"draws: seed must lie in [0, 2**64), got {seed}")
    return int(seed)


def uniforms(seed: int, size: int):
    """The first ``size`` uniforms in ``[0, 1)`` of the stream with 64-bit ``seed`` (float64)."""
    seed = _checked_seed(seed)
    if numba_disabled():
        return uniforms_reference(seed, size)
    return _uniforms_numba(np.uint64(seed), size)


def keep_indices(seed: int, size: int, probabilities):
    """Keep index ``i < size`` where uniform ``i`` is below ``p_i``: ``(indices, 1 / p_kept)``.

    ``probabilities`` is one float (every index) or an array of ``size``. The
    indices come sorted; the scales are float64.
    """
    constant = type(probabilities) is float
    if not (constant and type(seed) is int and 0 <= seed <= MASK64):  # else: the common call
        seed = _checked_seed(seed)
        if np.ndim(probabilities) and np.shape(probabilities) != (size,):
            raise ValueError(
                f"draws: {np.shape(probabilities)} probabilities for an axis of length {size}"
            )
        constant = np.ndim(probabilities) == 0
    if numba_disabled():
        return keep_indices_reference(seed, size, probabilities)
    if constant:
        return _keep_constant_numba(np.uint64(seed), size, float(probabilities))
    return _keep_varying_numba(np.uint64(seed), np.asarray(probabilities, dtype=np.float64))
