"""Counter-based draws (rbprop.kernels.draws), SeedStream sketches and block seeds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rbprop.kernels import draws
from rbprop.sampling import SampledContext, seed_key
from rbprop.sketch import Bernoulli, Importance, RankK, SeedStream, UniformK

SEEDS = [0, 1, 12345, 2**63 + 17, 2**64 - 1]
SIZES = [0, 1, 7, 128, 1001]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
def test_uniforms_kernel_matches_its_twin(seed, size):
    compiled = draws.uniforms(seed, size)
    twin = draws.uniforms_reference(seed, size)
    assert compiled.dtype == np.float64 and compiled.shape == (size,)
    np.testing.assert_array_equal(compiled, twin)
    assert np.all((compiled >= 0) & (compiled < 1))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", SIZES)
def test_keep_indices_kernel_matches_its_twin(seed, size):
    rng = np.random.default_rng(seed % 1000)
    varying = rng.random(size)
    varying[::3] = 0.0  # never kept
    for probabilities in (0.25, 1.0, varying):
        indices, scales = draws.keep_indices(seed, size, probabilities)
        twin_indices, twin_scales = draws.keep_indices_reference(seed, size, probabilities)
        np.testing.assert_array_equal(indices, twin_indices)
        np.testing.assert_array_equal(scales, twin_scales)
        assert indices.dtype == np.int64 and scales.dtype == np.float64
        assert np.all(np.diff(indices) > 0)
        expected_scales = 1.0 / np.broadcast_to(probabilities, (size,))[indices]
        np.testing.assert_array_equal(scales, expected_scales)


def test_disabled_numba_gives_the_same_draws(monkeypatch):
    compiled = draws.keep_indices(99, 500, 0.3)
    monkeypatch.setenv("RBPROP_DISABLE_NUMBA", "1")
    twin = draws.keep_indices(99, 500, 0.3)
    np.testing.assert_array_equal(compiled[0], twin[0])


def test_uniforms_are_uniform():
    # 10^6 uniforms: each of 100 bins holds 10^4 +- 100; chi-square with 99 degrees of
    # freedom has mean 99 and standard deviation 14, so 99 + 5 * 14 is a 5-sigma bound.
    values = draws.uniforms(2024, 10**6)
    counts = np.bincount((values * 100).astype(int), minlength=100)
    expected = values.size / 100
    chi_square = float(np.sum((counts - expected) ** 2 / expected))
    assert chi_square < 99 + 5 * math.sqrt(2 * 99)
    # Mean 1/2 and variance 1/12, each to 5 standard errors.
    assert abs(values.mean() - 0.5) < 5 * math.sqrt(1 / 12 / values.size)
    assert abs(values.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / values.size)


def test_neighbouring_streams_are_uncorrelated():
    # Op seeds of one block are consecutive SplitMix64 outputs; their uniforms must be
    # independent: lag-0 correlation across streams and lag-1 within a stream, 5 SE.
    context = SampledContext(None, 7)
    first, second = (draws.uniforms(context._next_seed(), 200_000) for _ in range(2))
    bound = 5 / math.sqrt(first.size)
    assert abs(np.corrcoef(first, second)[0, 1]) < bound
    assert abs(np.corrcoef(first[:-1], first[1:])[0, 1]) < bound


def test_bernoulli_keeps_each_index_with_its_probability():
    # 4000 draws of 50 indices at p = 0.3: each index's keep count is Binomial(4000, 0.3).
    size, trials, keep = 50, 4000, 0.3
    counts = np.zeros(size)
    for seed in range(trials):
        sample = Bernoulli(keep).draw(size, SeedStream(seed))
        counts[sample.indices] += 1
        np.testing.assert_array_equal(sample.scales, np.full(sample.kept, 1 / keep))
    standard_error = math.sqrt(trials * keep * (1 - keep))
    assert np.max(np.abs(counts - trials * keep)) < 5 * standard_error


def test_importance_keeps_each_index_with_its_probability():
    size, trials = 12, 4000
    weights = np.linspace(0.0, 3.0, size)
    probabilities = Importance(0.4).probabilities(weights)
    counts = np.zeros(size)
    for seed in range(trials):
        sample = Importance(0.4).draw(size, SeedStream(seed), weights=weights)
        counts[sample.indices] += 1
        np.testing.assert_allclose(sample.scales, 1 / probabilities[sample.indices])
    assert counts[0] == 0  # zero weight: never kept
    standard_error = np.sqrt(trials * probabilities * (1 - probabilities))
    assert np.all(np.abs(counts - trials * probabilities) <= 5 * standard_error + 1e-9)


def test_uniform_k_draws_every_subset_equally_often():
    # n = 5, k = 2: 10 subsets, 20000 draws; chi-square with 9 degrees of freedom.
    subsets = {pair: 0 for pair in itertools.combinations(range(5), 2)}
    trials = 20_000
    for seed in range(trials):
        sample = UniformK(0.4).draw(5, SeedStream(seed))
        assert sample.kept == 2
        subsets[tuple(sample.indices.tolist())] += 1
    expected = trials / len(subsets)
    chi_square = sum((count - expected) ** 2 / expected for count in subsets.values())
    assert chi_square < 9 + 5 * math.sqrt(2 * 9)


def test_uniform_k_keeps_all_or_none_at_the_edges():
    assert UniformK(1.0).draw(6, SeedStream(3)).indices.tolist() == list(range(6))
    assert UniformK(0.5).draw(0, SeedStream(3)).kept == 0


def test_rank_k_draws_from_a_generator_on_the_same_seed():
    first = RankK(0.5).draw(8, SeedStream(11))
    second = RankK(0.5).draw(8, np.random.Generator(np.random.PCG64(11)))
    np.testing.assert_array_equal(first.basis, second.basis)


def test_seed_stream_without_a_seed_draws_fresh_bits():
    assert SeedStream().seed != SeedStream().seed  # equal with probability 2^-64


def test_seed_key_of_ints_sequences_and_wide_ints():
    assert seed_key(5) == 5 and seed_key(np.int64(5)) == 5
    keys = {seed_key(seed) for seed in (5, [5], (5, 0), [0, 5], [5, 0, 0], 2**64 + 5, 2**70)}
    assert len(keys) == 7  # all different
    assert seed_key([3, 4]) == seed_key((3, np.int32(4)))


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3", [1, -2], [], object()])
def test_seed_key_rejects_bad_seeds(seed):
    with pytest.raises(TypeError, match="sampled: seed must be"):
        seed_key(seed)


def test_keep_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"draws: \(3,\) probabilities for an axis of length 4"):
        draws.keep_indices(1, 4, np.ones(3))
    with pytest.raises(ValueError, match="draws: seed must lie in"):
        draws.uniforms(-1, 4)
    with pytest.raises(TypeError, match="draws: seed must be an int"):
        draws.uniforms(0.5, 4)


def test_mix64_is_splitmix64():
    # SplitMix64 seeded with 0: its first outputs are mix64(k * gamma), k = 1, 2, ...
    outputs = [draws.mix64(k * draws.GOLDEN_GAMMA) for k in (1, 2, 3)]
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
