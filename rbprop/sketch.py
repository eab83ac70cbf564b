"""Sketches: random linear maps ``S`` with ``E[S] = I`` that sampled VJPs apply.

A :class:`Sketch` is a recipe (family and keep ratio); :meth:`Sketch.draw` turns
it into a :class:`Sample`, one realised ``S`` over an axis of length ``n``.
Samples come in two shapes:

* :class:`DiagonalSample`, ``S = diag(m_i / p_i)``: kept indices and their
  scales. ``compress`` gathers the kept slices (scaled), ``expand`` scatters them
  back, so the VJP can run on the ``k`` kept slices only.
* :class:`ProjectionSample`, ``S = scale * Q Q^T`` with ``Q`` of shape ``n x k``:
  ``compress`` is ``scale * Q^T v`` and ``expand`` is ``Q c``.

In both, ``S v = expand(compress(v))`` and ``project`` is ``compress`` without
the scale (what a forward pass saves of the other operand of a bilinear op).

Sketches drawn independently of the data (every family except
:class:`Importance`) can be drawn in the forward pass, which lets an op save only
what its sampled VJP will read.

``draw`` takes its randomness from a numpy ``Generator`` or from a
:class:`SeedStream`, the counter-based stream a recorded op draws from (one
64-bit seed per op, see :mod:`rbprop.sampling`): Bernoulli, uniform and
importance draws read its uniforms directly, rank-k draws its Gaussian matrix
from a numpy ``Generator`` seeded with the same seed.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import array_module, to_numpy
from .kernels.draws import fresh_seed, keep_indices, uniforms

PLACEMENTS = (None, "cotangent", "contracted", "weight")


class SeedStream:
    """The random numbers of one sketch draw, all from one 64-bit ``seed``.

    Uniform ``i`` is a hash of the seed and ``i`` (:mod:`rbprop.kernels.draws`),
    so a draw builds no generator object; :meth:`generator` gives a numpy
    ``Generator`` on the same seed for the draws that need one (Gaussian
    matrices). ``seed=None`` takes 64 fresh bits from the operating system.
    """

    __slots__ = ("seed",)

    def __init__(self, seed=None):
        self.seed = fresh_seed() if seed is None else seed

    def uniforms(self, size: int):
        """``size`` float64 uniforms in ``[0, 1)``."""
        return uniforms(self.seed, size)

    def keep(self, size: int, probabilities):
        """Indices kept with probability ``p_i`` (one float or ``size`` of them), and ``1/p_i``."""
        return keep_indices(self.seed, size, probabilities)

    def generator(self) -> np.random.Generator:
        """A numpy ``Generator`` (PCG64) seeded with this stream's seed."""
        return np.random.Generator(np.random.PCG64(self.seed))


def _keep(rng, size: int, probabilities):
    """Kept indices and ``1/p_i`` of independent Bernoulli(p_i) trials, from either source."""
    if isinstance(rng, SeedStream):
        return rng.keep(size, probabilities)
    indices = np.flatnonzero(rng.random(size) < probabilities)
    if np.ndim(probabilities):
        return indices, 1.0 / probabilities[indices]
    return indices, np.full(indices.size, 1.0 / probabilities)


def _generator(rng) -> np.random.Generator:
    return rng.generator() if isinstance(rng, SeedStream) else rng


class Sketch:
    """Base class: a family of unbiased random sketches with a keep ratio."""

    family = "sketch"
    needs_cotangent = False

    def __init__(self, keep_ratio: float, placement: str | None = None):
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float, np.floating)):
            raise TypeError(
                f"{type(self).__name__}: keep_ratio must be a number, got {keep_ratio!r}"
            )
        if not 0.0 < float(keep_ratio) <= 1.0 or math.isnan(float(keep_ratio)):
            raise ValueError(
                f"{type(self).__name__}: keep_ratio must lie in (0, 1], got {keep_ratio!r}"
            )
        if placement not in PLACEMENTS:
            raise ValueError(
                f"{type(self).__name__}: placement must be 'cotangent', 'contracted', "
                f"'weight' or None (the op's default), got {placement!r}"
            )
        self.keep_ratio = float(keep_ratio)
        self.placement = placement

    @property
    def drawn_in_forward(self) -> bool:
        """Whether the sketch is independent of the data (so the forward pass may draw it)."""
        return not self.needs_cotangent

    def draw(self, size: int, rng, weights=None):
        """One realised sample over an axis of ``size``, from ``rng``: a numpy ``Generator``
        or a :class:`SeedStream`."""
        raise NotImplementedError(f"{type(self).__name__}.draw is not written")

    def spec(self) -> str:
        return f"{self.family}:{self.keep_ratio:g}"

    def __repr__(self) -> str:
        extra = f", placement={self.placement!r}" if self.placement else ""
        return f"{type(self).__name__}({self.keep_ratio:g}{extra})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.keep_ratio, self.placement))


class Bernoulli(Sketch):
    """Keep each index independently with probability ``p = keep_ratio``; scale ``1/p``."""

    family = "bernoulli"

    def draw(self, size, rng, weights=None):
        indices, scales = _keep(rng, size, self.keep_ratio)
        return DiagonalSample(size, indices, scales)

    def added_variance(self, contributions):
        """``E||J^T (S - I) v||^2 = (1/p - 1) sum_i ||x_i||^2``, ``x_i = v_i J_i``.

        ``contributions`` has one row per sketched index: that index's share
        ``x_i`` of the exact VJP ``J^T v = sum_i x_i``.
        """
        rows = _as_rows(contributions)
        return (1.0 / self.keep_ratio - 1.0) * float(np.sum(rows**2))


class UniformK(Sketch):
    """Keep exactly ``k = ceil(r n)`` indices drawn without replacement; scale ``n/k``."""

    family = "uniform"

    def draw(self, size, rng, weights=None):
        kept = min(size, math.ceil(self.keep_ratio * size))
        if kept in (0, size):
            indices = np.arange(kept)
        elif isinstance(rng, SeedStream):
            # The k smallest of n i.i.d. uniforms: a uniformly random k-subset.
            indices = np.sort(np.argpartition(rng.uniforms(size), kept - 1)[:kept])
        else:
            indices = np.sort(rng.choice(size, size=kept, replace=False))
        return DiagonalSample(size, indices, np.full(kept, size / max(kept, 1)))

    def added_variance(self, contributions):
        """``(n/k - 1) n/(n-1) sum_i ||x_i - mean(x)||^2`` (sampling without replacement)."""
        rows = _as_rows(contributions)
        size = rows.shape[0]
        kept = min(size, math.ceil(self.keep_ratio * size))
        if size <= 1 or kept == size:
            return 0.0
        centred = rows - rows.mean(axis=0)
        return (size / kept - 1.0) * size / (size - 1) * float(np.sum(centred**2))


class RankK(Sketch):
    """``S = (n/k) Q Q^T`` for a uniformly random ``k``-dimensional subspace.

    ``kind="gaussian"`` uses ``S = G G^T / k`` with ``G`` standard normal instead:
    still unbiased, with more variance.
    """

    family = "rank"

    def __init__(self, keep_ratio, kind: str = "orthogonal", placement=None):
        super().__init__(keep_ratio, placement)
        if kind not in ("orthogonal", "gaussian"):
            raise ValueError(f"RankK: kind must be 'orthogonal' or 'gaussian', got {kind!r}")
        self.kind = kind

    def draw(self, size, rng, weights=None):
        kept = min(size, math.ceil(self.keep_ratio * size))
        gaussian = _generator(rng).standard_normal((size, kept))
        if self.kind == "gaussian":
            return ProjectionSample(size, gaussian, 1.0 / kept)
        # QR of a Gaussian matrix, signs fixed by R's diagonal, is Haar-distributed.
        basis, upper = np.linalg.qr(gaussian)
        basis *= np.sign(np.where(np.diag(upper) == 0, 1.0, np.diag(upper)))
        return ProjectionSample(size, basis, size / kept)

    def spec(self) -> str:
        suffix = ":gaussian" if self.kind == "gaussian" else ""
        return f"rank:{self.keep_ratio:g}{suffix}"

    def __repr__(self) -> str:
        extra = f", placement={self.placement!r}" if self.placement else ""
        return f"RankK({self.keep_ratio:g}, kind={self.kind!r}{extra})"

    def __hash__(self) -> int:
        return hash(("RankK", self.keep_ratio, self.kind, self.placement))

    def added_variance(self, cotangent_norm_squared, size):
        """``(n/k - 1) ||v||^2`` for ``J = I`` (orthogonal kind)."""
        kept = min(size, math.ceil(self.keep_ratio * size))
        if self.kind == "gaussian":
            # E||G G^T v / k||^2 - ||v||^2 = (n + 1) / k * ||v||^2 for Gaussian G.
            return (size + 1) / kept * float(cotangent_norm_squared)
        return (size / kept - 1.0) * float(cotangent_norm_squared)


class Importance(Sketch):
    """Bernoulli with ``p_i = min(1, c a_i)``, ``sum_i p_i = r n``: least added variance.

    ``a_i`` are the weights given to :meth:`draw` (``|v_i| ||J_i||``). Among
    diagonal unbiased sketches with ``k`` expected nonzeros, the added variance
    ``sum_i (1/p_i - 1) a_i^2`` is minimised by these probabilities: the KKT
    conditions of ``min sum a_i^2 / p_i`` s.t. ``sum p_i = k``, ``0 < p_i <= 1``
    give ``p_i = min(1, a_i / sqrt(lambda))``. Needs the cotangent, so it is drawn
    in the backward pass.
    """

    family = "importance"
    needs_cotangent = True

    def probabilities(self, weights):
        """``p_i = min(1, c a_i)`` with ``sum p_i = r n`` (water-filling, O(n log n))."""
        return water_filling(to_numpy(weights), self.keep_ratio * np.asarray(weights).size)

    def draw(self, size, rng, weights=None):
        if weights is None:
            raise ValueError(
                "Importance: drawing needs the weights |v_i| ||J_i|| of the cotangent"
            )
        weights = to_numpy(weights).astype(np.float64).reshape(-1)
        if weights.size != size:
            raise ValueError(f"Importance: {weights.size} weights for an axis of length {size}")
        probabilities = water_filling(weights, self.keep_ratio * size)
        indices, scales = _keep(rng, size, probabilities)
        return DiagonalSample(size, indices, scales)

    def added_variance(self, contributions):
        """``sum_i (1/p_i - 1) ||x_i||^2`` with ``p`` from the weights ``a_i = ||x_i||``."""
        rows = _as_rows(contributions)
        squared = np.sum(rows**2, axis=1)
        probabilities = water_filling(np.sqrt(squared), self.keep_ratio * rows.shape[0])
        positive = probabilities > 0
        return float(np.sum((1.0 / probabilities[positive] - 1.0) * squared[positive]))


def _as_rows(contributions):
    """Per-index contributions as a float64 matrix with one row per index."""
    rows = to_numpy(contributions).astype(np.float64)
    return rows.reshape(rows.shape[0], -1) if rows.ndim else rows.reshape(1, 1)


def water_filling(weights, budget: float):
    """Probabilities ``min(1, c w_i)`` summing to ``budget`` (or 1 on every ``w_i > 0``).

    Sort the weights in decreasing order; if the ``t`` largest are capped at 1,
    the rest share ``budget - t`` in proportion to their weights, so
    ``c_t = (budget - t) / sum_{i >= t} w_(i)``. The right ``t`` is the smallest
    one for which the first uncapped weight stays below the cap: ``c_t w_(t) <= 1``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("importance weights must be finite and non-negative")
    positive = int(np.count_nonzero(weights))
    if positive <= budget:
        return (weights > 0).astype(np.float64)
    descending = np.sort(weights)[::-1][:positive]
    tail_sums = np.cumsum(descending[::-1])[::-1]  # sum_{i >= t} w_(i)
    capped = np.arange(positive)
    scale = (budget - capped) / tail_sums
    fits = scale * descending <= 1.0 + 1e-12
    first = int(np.argmax(fits))
    return np.minimum(1.0, scale[first] * weights)


#: Arrays this large are compressed by the fused gather-and-scale kernel; below it,
#: the kernel's call overhead outweighs the pass it saves (measured in bench_kernels).
_FUSED_GATHER_SIZE = 1 << 16


class DiagonalSample:
    """``S = diag(s)`` with ``s`` nonzero (``scales``) only at ``indices``."""

    is_diagonal = True

    def __init__(self, size: int, indices, scales):
        self.size = int(size)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.scales = np.asarray(scales, dtype=np.float64)

    @property
    def kept(self) -> int:
        return int(self.indices.size)

    def _index_and_scale(self, array, axis):
        xp = array_module(array)
        shape = [1] * array.ndim
        shape[axis] = self.kept
        scales = xp.asarray(self.scales, dtype=array.dtype).reshape(shape)
        return xp.asarray(self.indices), scales

    def project(self, array, axis: int):
        """The kept slices along ``axis``, unscaled."""
        xp = array_module(array)
        return xp.take(array, xp.asarray(self.indices), axis=axis)

    def compress(self, array, axis: int):
        """The kept slices along ``axis``, each multiplied by its scale ``1/p_i``."""
        if array.size >= _FUSED_GATHER_SIZE:
            # One pass (gather and scale fused) beats take-then-scale on large arrays.
            from .kernels.gather import gather_scaled

            return gather_scaled(array, self.indices, self.scales, axis=axis)
        xp = array_module(array)
        indices, scales = self._index_and_scale(array, axis)
        compact = xp.take(array, indices, axis=axis)
        compact *= scales  # in place: ``take`` made a copy already
        return compact

    def expand(self, compact, axis: int):
        """Scatter compact slices back into zeros of length ``size`` along ``axis``."""
        xp = array_module(compact)
        if compact.ndim and math.prod(compact.shape[axis % compact.ndim + 1 :]) < 32:
            return self._expand_by_gather(compact, axis % compact.ndim, xp)
        shape = list(compact.shape)
        shape[axis] = self.size
        full = xp.zeros(shape, dtype=compact.dtype)
        index = [slice(None)] * compact.ndim
        index[axis] = xp.asarray(self.indices)
        full[tuple(index)] = compact
        return full

    def _expand_by_gather(self, compact, axis, xp):
        """``expand`` as one ``take`` from the compact slices, for thin slices.

        When the slices along ``axis`` are short (the last axis, say), assigning
        them through fancy indexing is strided, element-by-element work, several
        times slower than a gather; instead, append one zero slice and gather:
        index ``i`` reads its compact slice if kept, the zero slice (position
        ``k``) if not. Long contiguous slices (rows) are faster to assign.
        """
        positions = np.full(self.size, self.kept, dtype=np.int64)
        positions[self.indices] = np.arange(self.kept)
        zero_shape = list(compact.shape)
        zero_shape[axis] = 1
        padded = xp.concatenate([compact, xp.zeros(zero_shape, dtype=compact.dtype)], axis=axis)
        return xp.take(padded, xp.asarray(positions), axis=axis)

    def apply(self, array, axis: int):
        """``S v`` along ``axis``, as a dense array."""
        return self.expand(self.compress(array, axis), axis)

    def apply_flops(self, shape, axis: int) -> int:
        return math.prod(shape) // max(self.size, 1) * self.kept

    def dense(self):
        """``S`` as an ``n x n`` matrix (for tests and small studies)."""
        matrix = np.zeros((self.size, self.size))
        matrix[self.indices, self.indices] = self.scales
        return matrix


class ProjectionSample:
    """``S = scale * Q Q^T`` with ``Q`` of shape ``size x k``."""

    is_diagonal = False

    def __init__(self, size: int, basis, scale: float):
        self.size = int(size)
        self.basis = np.asarray(basis, dtype=np.float64)
        self.scale = float(scale)

    @property
    def kept(self) -> int:
        return int(self.basis.shape[1])

    def _basis_for(self, array):
        xp = array_module(array)
        return xp.asarray(self.basis, dtype=array.dtype)

    def project(self, array, axis: int):
        """``Q^T a`` along ``axis`` (the axis becomes length ``k``)."""
        xp = array_module(array)
        moved = xp.moveaxis(array, axis, 0)
        projected = self._basis_for(array).T @ moved.reshape(self.size, -1)
        return xp.moveaxis(projected.reshape((self.kept,) + moved.shape[1:]), 0, axis)

    def compress(self, array, axis: int):
        """``scale * Q^T a`` along ``axis``."""
        return self.project(array, axis) * array.dtype.type(self.scale)

    def expand(self, compact, axis: int):
        """``Q c`` along ``axis`` (the axis becomes length ``size``)."""
        xp = array_module(compact)
        moved = xp.moveaxis(compact, axis, 0)
        expanded = self._basis_for(compact) @ moved.reshape(self.kept, -1)
        return xp.moveaxis(expanded.reshape((self.size,) + moved.shape[1:]), 0, axis)

    def apply(self, array, axis: int):
        return self.expand(self.compress(array, axis), axis)

    def apply_flops(self, shape, axis: int) -> int:
        return 4 * math.prod(shape) * self.kept

    def dense(self):
        return self.scale * self.basis @ self.basis.T


_FAMILIES = {
    "bernoulli": Bernoulli,
    "uniform": UniformK,
    "rank": RankK,
    "importance": Importance,
}


def parse(spec: str):
    """A sketch from a spec string, or None for ``"exact"``.

    Specs: ``exact``, ``bernoulli:R``, ``uniform:R``, ``rank:R``,
    ``rank:R:gaussian``, ``importance:R``, with ``0 < R <= 1``.
    """
    if isinstance(spec, Sketch):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"sketch spec must be a string, got {spec!r}")
    text = spec.strip().lower()
    if text == "exact":
        return None
    parts = text.split(":")
    expected = "exact, bernoulli:R, uniform:R, rank:R, rank:R:gaussian or importance:R"
    if parts[0] not in _FAMILIES or len(parts) not in (2, 3):
        raise ValueError(f"invalid sketch spec {spec!r}: expected {expected}")
    try:
        keep_ratio = float(parts[1])
    except ValueError:
        raise ValueError(
            f"invalid sketch spec {spec!r}: keep ratio {parts[1]!r} is not a number"
        ) from None
    if len(parts) == 3:
        if parts[0] != "rank" or parts[2] not in ("gaussian", "orthogonal"):
            raise ValueError(f"invalid sketch spec {spec!r}: expected {expected}")
        return RankK(keep_ratio, kind=parts[2])
    return _FAMILIES[parts[0]](keep_ratio)
