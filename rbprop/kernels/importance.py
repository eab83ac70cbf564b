"""Water-filling: the keep probabilities of the importance sketch.

Given weights ``a_i >= 0`` and a budget ``k``, the probabilities
``p_i = min(1, c a_i)`` with ``sum_i p_i = k`` minimise the added variance
``sum_i (1/p_i - 1) a_i^2`` of a diagonal unbiased sketch. When at most ``k``
weights are positive, every positive one is kept (``p_i = 1``).

The numpy twin sorts the weights (O(n log n)). The numba kernel finds the
water level ``c`` without sorting: start from ``c_0 = k / sum_i a_i``; cap every
index with ``c a_i > 1``; the rest share what is left,
``c = (k - #capped) / sum_{uncapped} a_i``; repeat until the capped set stops
growing. Capping an index with ``c a_i >= 1`` never lowers ``c``, so the capped
set only grows and the loop ends at the sorted method's answer, usually after a
few passes over the data. A pathological spread of weights (each pass capping
one more) falls back to the sorted method after a bounded number of passes.
"""

from __future__ import annotations

import numba
import numpy as np

from ..backend import array_module
from .dispatch import NUMBA_DTYPES, launch, numba_disabled

# ``c a_i`` may exceed 1 by this much (rounding) before index ``i`` counts as capped.
_CAP_TOLERANCE = 1e-12
# Passes of the capping loop before the kernel falls back to sorting.
_MAX_PASSES = 30

_INVALID, _KEEP_POSITIVE, _SCALED = 0, 1, 2


def _output_dtype(weights):
    return weights.dtype if weights.dtype in NUMBA_DTYPES else np.dtype(np.float64)


def _check_budget(budget):
    budget = float(budget)
    if not budget > 0:
        raise ValueError(f"water_filling: budget must be positive, got {budget!r}")
    return budget


def _invalid_weights():
    return ValueError("water_filling: importance weights must be finite and non-negative")


# ----------------------------------------------------------------------------- numba kernels


@numba.njit(cache=True)
def _sorted_level_numba(weights, budget):
    """The water level ``c`` by sorting (the fallback; same rule as the numpy twin)."""
    ascending = np.sort(weights)
    size = ascending.shape[0]
    first_positive = size - np.count_nonzero(ascending)
    positives = ascending[first_positive:]
    tail_sums = np.cumsum(positives)  # tail_sums[m] = sum of the m + 1 smallest positives
    count = positives.shape[0]
    for capped in range(count):
        # The capped largest weights are at 1; the rest share budget - capped.
        largest_uncapped = positives[count - 1 - capped]
        scale = (budget - capped) / tail_sums[count - 1 - capped]
        if scale * largest_uncapped <= 1.0 + _CAP_TOLERANCE:
            return scale
    return 1.0 / positives[0]


@numba.njit(cache=True, parallel=True)
def _water_filling_numba(weights, budget, max_passes, probabilities):
    size = weights.shape[0]
    invalid = 0
    positive = 0
    total = 0.0
    for i in numba.prange(size):
        weight = weights[i]
        if not (weight >= 0.0 and weight < np.inf):  # NaN fails both comparisons
            invalid += 1
        elif weight > 0.0:
            positive += 1
            total += weight
    if invalid:
        return _INVALID
    if positive <= budget:
        for i in numba.prange(size):
            probabilities[i] = 1.0 if weights[i] > 0.0 else 0.0
        return _KEEP_POSITIVE

    scale = budget / total
    capped = 0
    converged = False
    for _ in range(max_passes):
        now_capped = 0
        uncapped_sum = 0.0
        for i in numba.prange(size):
            weight = weights[i]
            if scale * weight > 1.0 + _CAP_TOLERANCE:
                now_capped += 1
            else:
                uncapped_sum += weight
        if now_capped == capped:
            converged = True
            break
        capped = now_capped
        if uncapped_sum <= 0.0 or budget - capped <= 0.0:
            break  # only rounding gets here; the sorted method settles it
        scale = (budget - capped) / uncapped_sum
    if not converged:
        scale = _sorted_level_numba(weights.astype(np.float64), budget)

    for i in numba.prange(size):
        probabilities[i] = min(1.0, scale * weights[i])
    return _SCALED


# ----------------------------------------------------------------------------- numpy twin


def water_filling_reference(weights, budget):
    """numpy twin of :func:`water_filling`: sort the weights, then a vectorised search.

    With the weights in decreasing order ``a_(0) >= a_(1) >= ...``, capping the
    ``t`` largest leaves ``c_t = (k - t) / sum_{i >= t} a_(i)``; the answer is the
    smallest ``t`` whose first uncapped weight fits, ``c_t a_(t) <= 1``.
    """
    xp = array_module(weights)
    weights = xp.asarray(weights)
    dtype = _output_dtype(weights)
    budget = _check_budget(budget)
    values = weights.astype(np.float64)
    if bool(xp.any(values < 0)) or not bool(xp.all(xp.isfinite(values))):
        raise _invalid_weights()

    positive = int(xp.count_nonzero(values))
    if positive <= budget:
        return (values > 0).astype(dtype)
    descending = xp.sort(values.reshape(-1))[::-1][:positive]
    tail_sums = xp.cumsum(descending[::-1])[::-1]  # sum_{i >= t} a_(i)
    with np.errstate(over="ignore"):  # tiny tails overflow to inf: they never fit
        scales = (budget - xp.arange(positive)) / tail_sums
    first_fit = int(xp.argmax(scales * descending <= 1.0 + _CAP_TOLERANCE))
    return xp.minimum(1.0, scales[first_fit] * values).astype(dtype)


# ----------------------------------------------------------------------------- dispatcher


def water_filling(weights, budget, max_passes=_MAX_PASSES):
    """Probabilities ``min(1, c a_i)`` summing to ``budget`` (or 1 on every ``a_i > 0``).

    Float32 weights give float32 probabilities (the level ``c`` is found in
    float64); other inputs give float64. ``max_passes`` bounds the capping loop
    of the numba kernel before it sorts instead (tests set 0 to exercise that).
    """
    if numba_disabled() or array_module(weights) is not np:
        return water_filling_reference(weights, budget)
    weights = np.asarray(weights)
    if weights.dtype not in NUMBA_DTYPES:
        weights = weights.astype(np.float64)
    budget = _check_budget(budget)
    probabilities = np.empty(weights.shape, dtype=weights.dtype)
    status = launch(
        _water_filling_numba,
        weights.size,
        np.ascontiguousarray(weights).reshape(-1),
        budget,
        int(max_passes),
        probabilities.reshape(-1),
    )
    if status == _INVALID:
        raise _invalid_weights()
    return probabilities
