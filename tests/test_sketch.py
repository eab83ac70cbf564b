"""Sketches on their own: spec parsing, unbiasedness, compress/expand, variance formulas.

Statistical checks use a fixed seed and tolerances of a few standard errors of
the Monte Carlo estimate, so they are deterministic and still catch a wrong
scale or a wrong formula.
"""

import math

import numpy as np
import pytest

from rbprop import sketch
from rbprop.sketch import (
    Bernoulli,
    DiagonalSample,
    Importance,
    ProjectionSample,
    RankK,
    UniformK,
    parse,
    water_filling,
)

FAMILIES = [
    ("bernoulli", lambda r: Bernoulli(r)),
    ("uniform", lambda r: UniformK(r)),
    ("rank", lambda r: RankK(r)),
    ("rank_gaussian", lambda r: RankK(r, kind="gaussian")),
    ("importance", lambda r: Importance(r)),
]


def _draw(chosen, size, rng, weights=None):
    if chosen.needs_cotangent and weights is None:
        weights = np.linspace(0.1, 2.0, size)
    return chosen.draw(size, rng, weights=weights)


# -- parse ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("bernoulli:0.25", Bernoulli(0.25)),
        ("uniform:0.5", UniformK(0.5)),
        ("rank:0.1", RankK(0.1)),
        ("rank:0.1:gaussian", RankK(0.1, kind="gaussian")),
        ("rank:0.1:orthogonal", RankK(0.1)),
        ("importance:1", Importance(1.0)),
        ("  Bernoulli:0.5 ", Bernoulli(0.5)),
        ("uniform:1e-1", UniformK(0.1)),
    ],
)
def test_parse_every_family(spec, expected):
    parsed = parse(spec)
    assert parsed == expected
    assert type(parsed) is type(expected)


def test_parse_exact_and_round_trip():
    assert parse("exact") is None
    assert parse("EXACT") is None
    for spec in ("bernoulli:0.25", "uniform:0.5", "rank:0.1", "rank:0.1:gaussian", "importance:1"):
        assert parse(spec).spec() == spec
        assert parse(parse(spec).spec()) == parse(spec)
    already = Bernoulli(0.3)
    assert parse(already) is already


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dropout:0.5", "invalid sketch spec"),
        ("bernoulli", "invalid sketch spec"),
        ("bernoulli:0", r"\(0, 1\]"),
        ("bernoulli:1.5", r"\(0, 1\]"),
        ("uniform:-0.2", r"\(0, 1\]"),
        ("importance:nan", r"\(0, 1\]"),
        ("rank:inf", r"\(0, 1\]"),
        ("bernoulli:half", "not a number"),
        ("bernoulli:0.5:gaussian", "invalid sketch spec"),
        ("rank:0.5:cauchy", "invalid sketch spec"),
        ("rank:0.5:gaussian:1", "invalid sketch spec"),
        ("", "invalid sketch spec"),
    ],
)
def test_parse_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError, match="spec must be a string"):
        parse(0.5)


@pytest.mark.parametrize("ratio", [0, 0.0, -1, 1.0000001, float("nan"), float("inf")])
def test_constructors_reject_ratios_outside_unit_interval(ratio):
    for _, make in FAMILIES:
        with pytest.raises(ValueError, match=r"keep_ratio must lie in \(0, 1\]"):
            make(ratio)


def test_constructors_reject_bad_types_kinds_and_placements():
    with pytest.raises(TypeError, match="must be a number"):
        Bernoulli("0.5")
    with pytest.raises(TypeError, match="must be a number"):
        UniformK(True)
    with pytest.raises(ValueError, match="kind must be"):
        RankK(0.5, kind="sparse")
    with pytest.raises(ValueError, match="placement must be"):
        Bernoulli(0.5, placement="rows")
    assert Bernoulli(0.5, placement="cotangent").placement == "cotangent"


def test_drawn_in_forward_flags():
    assert Bernoulli(0.5).drawn_in_forward
    assert UniformK(0.5).drawn_in_forward
    assert RankK(0.5).drawn_in_forward
    assert RankK(0.5, kind="gaussian").drawn_in_forward
    assert not Importance(0.5).drawn_in_forward
    assert Importance(0.5).needs_cotangent
    assert not Bernoulli(0.5).needs_cotangent


def test_importance_draw_needs_weights_of_the_right_length():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="needs the weights"):
        Importance(0.5).draw(4, rng)
    with pytest.raises(ValueError, match="3 weights for an axis of length 4"):
        Importance(0.5).draw(4, rng, weights=np.ones(3))


# -- unbiasedness: E[S] = I ----------------------------------------------------


@pytest.mark.parametrize(("family", "make"), FAMILIES)
def test_expected_sketch_is_identity(family, make):
    size, draws = 7, 4000
    rng = np.random.default_rng(1)
    chosen = make(0.4)
    weights = rng.uniform(0.2, 3.0, size)
    matrices = np.stack([_draw(chosen, size, rng, weights).dense() for _ in range(draws)])
    mean = matrices.mean(axis=0)
    stderr = matrices.std(axis=0, ddof=1) / math.sqrt(draws)
    identity = np.eye(size)
    varying = stderr > 0
    assert np.all(np.abs(mean - identity)[varying] <= 5 * stderr[varying])
    # Entries that never vary must be exact (the off-diagonal of diagonal sketches).
    assert np.allclose(mean[~varying], identity[~varying], atol=1e-12)
    # The test has teeth: a sketch scaled by 1.2 would fail it.
    assert np.any(np.abs(1.2 * mean - identity)[varying] > 5 * 1.2 * stderr[varying])


def test_uniform_keeps_exactly_k_and_bernoulli_about_rn():
    rng = np.random.default_rng(2)
    for size in (1, 5, 10, 33):
        sample = UniformK(0.3).draw(size, rng)
        assert sample.kept == math.ceil(0.3 * size)
        assert np.all(np.diff(sample.indices) > 0)
        assert np.allclose(sample.scales, size / sample.kept)
    kept = [Bernoulli(0.25).draw(1000, rng).kept for _ in range(50)]
    assert abs(np.mean(kept) - 250) < 5 * math.sqrt(1000 * 0.25 * 0.75 / 50)


def test_rank_basis_is_orthonormal_and_gaussian_is_scaled():
    rng = np.random.default_rng(3)
    sample = RankK(0.25).draw(12, rng)
    assert sample.kept == 3
    assert np.allclose(sample.basis.T @ sample.basis, np.eye(3))
    assert math.isclose(sample.scale, 4.0)
    gaussian = RankK(0.25, kind="gaussian").draw(12, rng)
    assert math.isclose(gaussian.scale, 1 / 3)
    full = RankK(1.0).draw(6, rng)
    assert np.allclose(full.dense(), np.eye(6))


# -- compress / expand / project -------------------------------------------------


@pytest.mark.parametrize(("family", "make"), FAMILIES)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_compress_expand_project_match_the_dense_matrix(family, make, axis):
    rng = np.random.default_rng(4)
    array = rng.standard_normal((5, 6, 4))
    size = array.shape[axis]
    sample = _draw(make(0.5), size, rng, weights=rng.uniform(0.1, 1.0, size))
    dense = sample.dense()
    # S v along ``axis``: contract S's second index with that axis.
    expected = np.moveaxis(np.tensordot(dense, array, axes=([1], [axis])), 0, axis)
    compact = sample.compress(array, axis)
    assert compact.shape[axis] == sample.kept
    assert np.allclose(sample.expand(compact, axis), expected)
    assert np.allclose(sample.apply(array, axis), expected)
    projected = sample.project(array, axis)
    if sample.is_diagonal:
        assert np.array_equal(projected, np.take(array, sample.indices, axis=axis))
        shape = [1] * 3
        shape[axis] = sample.kept
        assert np.allclose(compact, projected * sample.scales.reshape(shape))
    else:
        basis_t = np.moveaxis(np.tensordot(sample.basis.T, array, axes=([1], [axis])), 0, axis)
        assert np.allclose(projected, basis_t)
        assert np.allclose(compact, sample.scale * projected)


@pytest.mark.parametrize("axis", [0, 1])
def test_expand_of_wide_and_thin_slices(axis):
    # Rows of 40 are assigned, columns of length 1 are gathered: both scatter the same.
    rng = np.random.default_rng(14)
    array = rng.standard_normal((6, 40))
    for chosen in (UniformK(0.5), Bernoulli(0.3), UniformK(1.0)):
        sample = chosen.draw(array.shape[axis], rng)
        compact = sample.compress(array, axis)
        expected = np.zeros_like(array)
        index = [slice(None), slice(None)]
        index[axis] = sample.indices
        expected[tuple(index)] = compact
        assert np.array_equal(sample.expand(compact, axis), expected)


def test_compress_keeps_float32():
    rng = np.random.default_rng(5)
    array = rng.standard_normal((8, 3)).astype(np.float32)
    for _, make in FAMILIES:
        sample = _draw(make(0.5), 8, rng)
        assert sample.compress(array, 0).dtype == np.float32
        assert sample.apply(array, 0).dtype == np.float32


# -- water filling and the importance sketch -------------------------------------


def test_water_filling_properties():
    rng = np.random.default_rng(6)
    weights = rng.lognormal(0.0, 2.0, 200)
    weights[:10] = 0.0
    for budget in (1.0, 7.5, 40.0, 150.0):
        probabilities = water_filling(weights, budget)
        assert math.isclose(probabilities.sum(), budget, rel_tol=1e-9)
        assert np.all((probabilities >= 0) & (probabilities <= 1))
        assert np.all(probabilities[weights == 0] == 0)
        below_cap = (probabilities < 1) & (weights > 0)
        ratios = probabilities[below_cap] / weights[below_cap]
        assert np.allclose(ratios, ratios[0])  # proportional to the weights
        capped = probabilities == 1
        if capped.any():  # every capped weight is at least every uncapped one
            assert weights[capped].min() >= weights[below_cap].max()
    # Budget at least the number of positive weights: every one of them is kept.
    assert np.array_equal(water_filling(np.array([0.0, 2.0, 1e-9]), 2.0), [0.0, 1.0, 1.0])
    assert np.allclose(water_filling(np.ones(8), 2.0), 0.25)


def test_water_filling_rejects_bad_weights():
    with pytest.raises(ValueError, match="finite and non-negative"):
        water_filling(np.array([1.0, -1.0]), 1.0)
    with pytest.raises(ValueError, match="finite and non-negative"):
        water_filling(np.array([1.0, np.nan]), 1.0)


def _diagonal_variance(probabilities, squared):
    """``sum_i (1/p_i - 1) a_i^2``: the added variance of a diagonal Bernoulli sketch."""
    return float(np.sum((1.0 / probabilities - 1.0) * squared))


def test_importance_is_optimal_among_feasible_probabilities():
    rng = np.random.default_rng(7)
    size, keep_ratio = 64, 0.25
    budget = keep_ratio * size
    norms = rng.lognormal(0.0, 1.5, size)  # skewed per-index contributions ||x_i||
    contributions = norms[:, None] * rng.standard_normal((size, 3)) / math.sqrt(3)
    squared = np.sum(contributions**2, axis=1)
    best = Importance(keep_ratio).added_variance(contributions)
    assert math.isclose(best, _diagonal_variance(water_filling(np.sqrt(squared), budget), squared))
    assert best < Bernoulli(keep_ratio).added_variance(contributions)
    # Many random feasible vectors with the same expected budget do worse.
    for _ in range(500):
        other = water_filling(rng.lognormal(0.0, rng.uniform(0.1, 3.0), size), budget)
        assert math.isclose(other.sum(), budget)
        assert best <= _diagonal_variance(other, squared) + 1e-9
    # So do small feasible perturbations (shift mass between two uncapped indices).
    optimal = water_filling(np.sqrt(squared), budget)
    free = np.flatnonzero(optimal < 0.9)
    for _ in range(200):
        i, j = rng.choice(free, 2, replace=False)
        step = 0.05 * min(optimal[i], optimal[j])
        moved = optimal.copy()
        moved[i] += step
        moved[j] -= step
        assert best <= _diagonal_variance(moved, squared)


# -- measured variance against each family's formula -----------------------------


def _measured_added_variance(chosen, jacobian_t, cotangent, draws, rng, weights=None):
    """Mean and standard error of ``||J^T (S - I) v||^2`` over ``draws`` sketches."""
    exact = jacobian_t @ cotangent
    errors = np.empty(draws)
    for draw in range(draws):
        sample = chosen.draw(cotangent.size, rng, weights=weights)
        errors[draw] = np.sum((jacobian_t @ sample.apply(cotangent, 0) - exact) ** 2)
    return errors.mean(), errors.std(ddof=1) / math.sqrt(draws)


@pytest.mark.parametrize("family", ["bernoulli", "uniform", "importance"])
@pytest.mark.parametrize("identity", [True, False])
def test_measured_variance_matches_diagonal_formulas(family, identity):
    rng = np.random.default_rng(8)
    size, keep_ratio = 20, 0.3
    cotangent = rng.standard_normal(size) * rng.lognormal(0.0, 1.0, size)
    jacobian_t = np.eye(size) if identity else rng.standard_normal((6, size))
    contributions = (jacobian_t * cotangent).T  # x_i = v_i J_i, one row per index
    chosen = {"bernoulli": Bernoulli, "uniform": UniformK, "importance": Importance}[family](
        keep_ratio
    )
    weights = np.linalg.norm(contributions, axis=1) if family == "importance" else None
    mean, stderr = _measured_added_variance(chosen, jacobian_t, cotangent, 20000, rng, weights)
    predicted = chosen.added_variance(contributions)
    assert abs(mean - predicted) <= 5 * stderr
    assert stderr < 0.05 * predicted  # enough draws to tell a 20% error apart


@pytest.mark.parametrize("kind", ["orthogonal", "gaussian"])
def test_measured_variance_matches_rank_formula_for_identity(kind):
    rng = np.random.default_rng(9)
    size, keep_ratio = 16, 0.25
    cotangent = rng.standard_normal(size)
    chosen = RankK(keep_ratio, kind=kind)
    mean, stderr = _measured_added_variance(chosen, np.eye(size), cotangent, 20000, rng)
    predicted = chosen.added_variance(np.sum(cotangent**2), size)
    assert abs(mean - predicted) <= 5 * stderr
    assert stderr < 0.05 * predicted


def test_uniform_formula_is_zero_when_every_index_is_kept():
    contributions = np.random.default_rng(10).standard_normal((5, 3))
    assert UniformK(1.0).added_variance(contributions) == 0.0
    assert Bernoulli(1.0).added_variance(contributions) == 0.0
    assert RankK(1.0).added_variance(3.0, 5) == 0.0


def test_samples_record_their_sizes():
    sample = DiagonalSample(5, [1, 3], [2.0, 2.0])
    assert sample.kept == 2 and sample.size == 5
    assert sample.apply_flops((5, 4), 0) == 8
    projection = ProjectionSample(5, np.ones((5, 2)), 0.5)
    assert projection.kept == 2
    assert np.allclose(projection.dense(), 0.5 * np.ones((5, 5)) * 2)
    assert {None, "cotangent", "contracted"} <= set(sketch.PLACEMENTS)
