"""Sampled VJPs of shape and reduction ops that are not row-local touch only the kept rows.

For every such op (and the variants of indexing, reductions over axis 0, ...),
with Bernoulli, uniform-k and importance sketches:

1. the sampled VJP equals the definition ``J^T (S v)`` (the exact VJP of the
   dense sketched cotangent ``sample.apply(v)``) for the same draw: bit for bit
   where only data moves, to 1e-12 where sums are reordered;
2. it is unbiased: Monte Carlo mean within 5 standard errors of the exact VJP;
3. it never reads a dropped row: NaN written into the dropped rows of the
   cotangent changes nothing, and the FLOPs it reports grow linearly with the
   number of kept rows.
"""

import numpy as np
import pytest
from test_sampled import draw_gradients

import rbprop
from rbprop.ops import reduction as red
from rbprop.ops import shape as sh
from rbprop.primitive import _row_norms
from rbprop.sketch import Bernoulli, DiagonalSample, Importance, RankK, UniformK
from rbprop.tensor import record

FAMILIES = {
    "bernoulli": Bernoulli(0.5),
    "uniform": UniformK(0.5),
    "importance": Importance(0.5),
}
WITH_RANK = {**FAMILIES, "rank": RankK(0.5)}
DRAWS = 1000

INDEX = np.array([0, 3, 3, 6, 7, 0])
PAIR = np.array([[1, 4], [4, 0], [2, 2]])
COLUMNS = np.array([4, 0, 4, 2])
MASK = np.array([True, False, True, True, False, False, True, True])


def _ties(shape):
    """Small integers as floats: maxima and minima with ties along every axis."""
    return lambda rng: rng.integers(0, 3, shape).astype(np.float64)


def _normal(*shape):
    return lambda rng: rng.standard_normal(shape)


def case(name, fn, moves_only=True, **inputs):
    """``moves_only``: the VJP only moves data, so old and new agree bit for bit."""
    return pytest.param(fn, inputs, moves_only, id=name)


CASES = [
    case("reshape_flat", lambda x: sh.reshape(x, (40,)), x=_normal(8, 5)),
    case("reshape_regroup", lambda x: sh.reshape(x, (6, 4, 2)), x=_normal(4, 3, 4)),
    case("transpose_2d", lambda x: sh.transpose(x), x=_normal(8, 5)),
    case("transpose_3d", lambda x: sh.transpose(x, (2, 0, 1)), x=_normal(4, 3, 6)),
    case("transpose_1d", lambda x: sh.transpose(x), x=_normal(8)),
    case("swapaxes", lambda x: sh.swapaxes(x, 0, 1), x=_normal(4, 6, 2)),
    case(
        "broadcast_new_axes",
        lambda x: sh.broadcast_to(x, (6, 4, 5)),
        x=_normal(5),
        moves_only=False,
    ),
    case(
        "broadcast_leading",
        lambda x: sh.broadcast_to(x, (8, 5)),
        x=_normal(1, 5),
        moves_only=False,
    ),
    case(
        "broadcast_columns",
        lambda x: sh.broadcast_to(x, (8, 5)),
        x=_normal(8, 1),
        moves_only=False,
    ),
    case("getitem_slice", lambda x: x[1:7, ::2], x=_normal(8, 5)),
    case("getitem_int_first", lambda x: x[2], x=_normal(4, 6, 5)),
    case("getitem_ellipsis", lambda x: x[..., 1], x=_normal(6, 4, 3)),
    case("getitem_numpy_int", lambda x: x[np.int64(1), 1:5], x=_normal(3, 6, 2)),
    case("getitem_zero_d_array", lambda x: x[np.array(2)], x=_normal(4, 6)),
    case("getitem_repeated", lambda x: x[INDEX], x=_normal(8, 5)),
    case("getitem_list", lambda x: x[[1, 1, 2, 5, 1]], x=_normal(8, 3)),
    case("getitem_2d_index", lambda x: x[PAIR], x=_normal(5, 3)),
    case("getitem_two_arrays", lambda x: x[INDEX, COLUMNS[INDEX % 4]], x=_normal(8, 5)),
    case("getitem_columns", lambda x: x[:, COLUMNS], x=_normal(8, 5)),
    case("getitem_columns_3d", lambda x: x[:, :, COLUMNS], x=_normal(6, 2, 5)),
    case("getitem_int_and_array", lambda x: x[:, 1, COLUMNS], x=_normal(6, 3, 5)),
    case("getitem_apart", lambda x: x[1, :, COLUMNS], x=_normal(3, 4, 5)),
    case("getitem_mask", lambda x: x[MASK], x=_normal(8, 3)),
    case("getitem_mask_columns", lambda x: x[:, MASK[:5]], x=_normal(6, 5)),
    case("getitem_new_axis", lambda x: x[:, None, COLUMNS], x=_normal(6, 5)),
    case("getitem_scalar_boolean", lambda x: x[:, True], x=_normal(6, 5)),
    case(
        "concatenate",
        lambda x, y, z: sh.concatenate([x, y, z], axis=0),
        x=_normal(4, 5),
        y=_normal(1, 5),
        z=_normal(3, 5),
    ),
    case(
        "stack",
        lambda x, y, z: sh.stack([x, y, z]),
        x=_normal(4, 5),
        y=_normal(4, 5),
        z=_normal(4, 5),
    ),
    case("stack_more", lambda *xs: sh.stack(list(xs)), **{f"x{i}": _normal(3) for i in range(6)}),
    case("pad", lambda x: sh.pad(x, ((1, 2), (0, 1))), x=_normal(6, 5)),
    case("astype", lambda x: x.astype(np.float32), x=_normal(8, 5)),
    case("to_device", lambda x: record(sh.ToDevice, x, device="cpu"), x=_normal(8, 5)),
    case("sum_leading", lambda x: red.sum(x, axis=0), x=_normal(8, 5)),
    case("sum_leading_3d", lambda x: red.sum(x, axis=0), x=_normal(3, 6, 4)),
    case("sum_two_axes", lambda x: red.sum(x, axis=(0, 2)), x=_normal(3, 6, 4)),
    case("sum_keepdims", lambda x: red.sum(x, axis=0, keepdims=True), x=_normal(8, 5)),
    case("sum_all", lambda x: red.sum(x), x=_normal(8, 5)),
    case("mean_two_axes", lambda x: red.mean(x, axis=(0, 2)), x=_normal(3, 6, 4)),
    case("max_leading", lambda x: red.max(x, axis=0), x=_ties((5, 8))),
    case("min_two_axes", lambda x: red.min(x, axis=(0, 1)), x=_ties((3, 2, 8))),
    case("logsumexp_leading", lambda x: red.logsumexp(x, axis=0), x=_normal(5, 8)),
    case("logsumexp_two_axes", lambda x: red.logsumexp(x, axis=(0, 2)), x=_normal(3, 6, 4)),
    case("softmax_leading", lambda x: red.softmax(x, axis=0), x=_normal(8, 5), moves_only=False),
    case("softmax_vector", lambda x: red.softmax(x), x=_normal(8), moves_only=False),
    case(
        "log_softmax_leading",
        lambda x: red.log_softmax(x, axis=0),
        x=_normal(8, 5),
        moves_only=False,
    ),
    case("log_softmax_vector", lambda x: red.log_softmax(x), x=_normal(8), moves_only=False),
]


def _arrays(inputs, seed=0):
    rng = np.random.default_rng(seed)
    return {name: build(rng) for name, build in inputs.items()}


def _record(fn, arrays, sketch, seed=0):
    """The op ``fn`` records (its last), under ``sketch``, and the output's shape."""
    leaves = [rbprop.Tensor(array, requires_grad=True) for array in arrays.values()]
    with rbprop.sampled(sketch, seed=seed):
        output = fn(*leaves)
    return output.op


def _dense(grads, op):
    """Each input's gradient as a float64 array (zeros for None, row-sparse made dense)."""
    dense = []
    for grad, shape in zip(grads, op.input_shapes, strict=True):
        if grad is None:
            grad = np.zeros(shape)
        elif hasattr(grad, "dense"):
            grad = grad.dense()
        dense.append(np.asarray(grad, dtype=np.float64))
    return dense


def _dense_definition(op, cotangent):
    """``J^T (S v)``: the op's own draw (same seed and weights) applied densely, exact VJP."""
    rows = cotangent.reshape(1) if not op.output_shape else cotangent
    weights = _row_norms(rows) if op.sketch.needs_cotangent else None
    sample = op.draw_sample(rows.shape[0], weights=weights)
    return op.vjp(sample.apply(rows, axis=0).reshape(op.output_shape))


def _cotangent(op, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(op.output_shape).astype(op.dtype)


# -- 1. the same J^T (S v) as the dense definition, for the same draw ------------------


@pytest.mark.parametrize("family", list(WITH_RANK))
@pytest.mark.parametrize(("fn", "inputs", "moves_only"), CASES)
def test_kept_rows_vjp_equals_the_dense_definition(fn, inputs, moves_only, family):
    for seed in range(4):
        op = _record(fn, _arrays(inputs), WITH_RANK[family], seed=seed)
        cotangent = _cotangent(op, seed)
        new = _dense(op.sampled_vjp(cotangent), op)
        old = _dense(_dense_definition(op, cotangent), op)
        for new_grad, old_grad in zip(new, old, strict=True):
            assert new_grad.shape == old_grad.shape
            if moves_only:
                np.testing.assert_array_equal(new_grad, old_grad)
            else:
                scale = 1.0 + np.abs(old_grad).max(initial=0.0)
                np.testing.assert_allclose(new_grad, old_grad, rtol=0, atol=1e-12 * scale)


# -- 2. unbiased ----------------------------------------------------------------------


def assert_unbiased(exact, samples, sigmas=5.0):
    """The Monte Carlo mean lies within ``sigmas`` standard errors of ``exact``.

    Element by element, and along two fixed directions (the exact gradient and a
    random one), which average many elements and so see a small common bias (a
    wrong scale) that no single element can. An element that never varied must
    equal the exact one up to a relative ``13 / draws``: a row kept with
    probability ``p`` close to 1 is scaled by ``1 / p`` whenever it is seen, and a
    drop of probability ``q >= 13 / draws`` would have shown with ``1 - e^-13``.
    """
    draws = samples.shape[0]
    mean = samples.mean(axis=0)
    stderr = samples.std(axis=0, ddof=1) / np.sqrt(draws)
    scale = 1.0 + np.abs(exact).max(initial=0.0)
    varying = samples.max(axis=0) - samples.min(axis=0) > 1e-12 * scale
    error = np.abs(mean - exact)
    assert np.all(error[~varying] <= 13 / draws * np.abs(exact[~varying]) + 1e-12 * scale)
    worst = np.max(error[varying] / (stderr[varying] + 1e-300), initial=0.0)
    assert np.all(error[varying] <= sigmas * stderr[varying] + 1e-10 * scale), f"z = {worst:.2f}"
    for direction in (exact, np.random.default_rng(99).standard_normal(exact.size)):
        projected = samples @ direction
        spread = projected.std(ddof=1) / np.sqrt(draws)
        target = exact @ direction
        bound = sigmas * spread + 13 / draws * np.abs(exact) @ np.abs(direction) + 1e-10 * scale
        assert abs(projected.mean() - target) <= bound, "biased along a fixed direction"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("fn", "inputs", "moves_only"), CASES)
def test_kept_rows_vjp_is_unbiased(fn, inputs, moves_only, family):
    arrays = _arrays(inputs)
    names = list(arrays)

    def by_name(**tensors):
        return fn(*(tensors[name] for name in names))

    exact, samples = draw_gradients(by_name, arrays, FAMILIES[family], draws=DRAWS, seed=2)
    assert_unbiased(exact, samples)


# -- 3. dropped rows are never read ---------------------------------------------------


def _partial_sample(op, family, cotangent):
    """A draw of ``family`` over the output rows that keeps some rows and drops others."""
    rows = op.output_shape[0]
    weights = _row_norms(cotangent) if family.needs_cotangent else None
    for seed in range(100):
        sample = family.draw(rows, np.random.default_rng(seed), weights=weights)
        if 0 < sample.kept < rows:
            return sample
    raise AssertionError("no draw kept some rows and dropped others")


def _with_sample(op, sample):
    op.draw_sample = lambda size, weights=None: sample
    return op


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("fn", "inputs", "moves_only"), CASES)
def test_dropped_rows_are_never_read(fn, inputs, moves_only, family):
    op = _record(fn, _arrays(inputs), FAMILIES[family])
    if len(op.output_shape) == 0 or op.output_shape[0] == 1:
        pytest.skip("one output row: kept whole or dropped, nothing partial to check")
    cotangent = _cotangent(op)
    sample = _partial_sample(op, FAMILIES[family], cotangent)
    _with_sample(op, sample)
    clean = _dense(op.sampled_vjp(cotangent), op)

    poisoned = cotangent.copy()
    dropped = np.setdiff1d(np.arange(op.output_shape[0]), sample.indices)
    poisoned[dropped] = np.nan
    for grad, expected in zip(_dense(op.sampled_vjp(poisoned), op), clean, strict=True):
        assert np.all(np.isfinite(grad)), "a dropped row reached the gradient"
        np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize(("fn", "inputs", "moves_only"), CASES)
def test_reported_flops_grow_with_the_kept_rows(fn, inputs, moves_only):
    op = _record(fn, _arrays(inputs), UniformK(0.5))
    rows = op.output_shape[0] if op.output_shape else 1
    if rows < 4:
        pytest.skip("fewer than four output rows")
    cotangent = _cotangent(op)
    flops = {}
    for kept in (1, 2, 4):
        _with_sample(op, DiagonalSample(rows, np.arange(kept), np.full(kept, 2.0)))
        op.sampled_vjp(cotangent)
        flops[kept] = op.sampled_vjp_flops()
    assert flops[4] - flops[2] == 2 * (flops[2] - flops[1]) >= 0
    if not op.row_local:
        assert flops[1] > 0  # at least the scaling of the kept row
    if moves_only:
        assert flops[2] == 2 * flops[1]  # nothing is spent on the dropped rows
