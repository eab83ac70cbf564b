"""Sampled VJPs: unbiased for every core primitive and sketch family, with the right variance.

For each primitive of the elementwise, reduction, shape and linalg modules and
each sketch family, the Monte Carlo mean of the sampled gradients (a fresh
forward and backward pass per draw, so sketches drawn in the forward pass are
redrawn) must lie within 5 standard errors of the exact gradient, element by
element; elements that never vary must equal it. The variance of the linear
layer (both placements) and of row-local maps is checked against the formulas
of :mod:`rbprop.sketch`. Then: determinism, policy semantics, unbiasedness of
whole models, and the memory and FLOPs a forward-drawn sketch saves.
"""

import math

import numpy as np
import pytest

import rbprop
from rbprop import cost, functional
from rbprop.autograd import topological_order
from rbprop.ops import elementwise, linalg, reduction, shape
from rbprop.primitive import Primitive
from rbprop.sampling import module_scope
from rbprop.sketch import Bernoulli, Importance, RankK, UniformK

FAMILIES = {
    "bernoulli": Bernoulli(0.5),
    "uniform": UniformK(0.5),
    "rank": RankK(0.5),
    "rank_gaussian": RankK(0.5, kind="gaussian"),
    "importance": Importance(0.5),
}
DRAWS = 300


# -- Monte Carlo helpers ---------------------------------------------------------


def _leaves(arrays, constants):
    return {
        name: value if name in constants else rbprop.Tensor(value, requires_grad=True)
        for name, value in arrays.items()
    }


def _grads(leaves, constants):
    parts = []
    for name, leaf in leaves.items():
        if name in constants:
            continue
        grad = np.zeros(leaf.size) if leaf.grad is None else leaf.grad.numpy().reshape(-1)
        parts.append(grad.astype(np.float64))
    return np.concatenate(parts)


def gradient(fn, arrays, cotangent, constants=(), policy=None, seed=None):
    """All input gradients of one backward pass through ``fn``, as one flat vector."""
    leaves = _leaves(arrays, constants)
    if policy is None:
        output = fn(**leaves)
    else:
        with rbprop.sampled(policy, seed=seed):
            output = fn(**leaves)
    output.backward(cotangent)
    return _grads(leaves, constants)


def output_cotangent(fn, arrays, constants=(), seed=1):
    with rbprop.no_grad():
        shape_of_output = fn(**_leaves(arrays, constants)).shape
    return np.random.default_rng(seed).standard_normal(shape_of_output)


def draw_gradients(fn, arrays, policy, draws=DRAWS, constants=(), seed=0):
    """(exact gradient, draws x elements sampled gradients) for one cotangent."""
    cotangent = output_cotangent(fn, arrays, constants)
    exact = gradient(fn, arrays, cotangent, constants)
    samples = np.stack(
        [
            gradient(fn, arrays, cotangent, constants, policy, seed=[seed, draw])
            for draw in range(draws)
        ]
    )
    return exact, samples


def assert_unbiased(exact, samples, sigmas=5.0, must_vary=True):
    """``|mean - exact| <= sigmas * stderr`` element by element; fixed elements exact."""
    mean = samples.mean(axis=0)
    stderr = samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0])
    rounding = 1e-9 * (1.0 + np.abs(exact))
    varying = stderr > rounding
    assert varying.any() or not must_vary, "no element varied: the op was not sampled"
    error = np.abs(mean - exact)
    worst = np.max(error[varying] / stderr[varying], initial=0.0)
    assert np.all(error[varying] <= sigmas * stderr[varying] + rounding[varying]), (
        f"biased: max z = {worst:.2f}"
    )
    assert np.all(error[~varying] <= 1e-7 * (1.0 + np.abs(exact[~varying]))), (
        "an element with zero variance differs from the exact gradient"
    )
    # Projections on a few fixed directions average many elements, so they see a
    # small bias (a wrong scale, say) that no single element can.
    directions = [exact, np.random.default_rng(99).standard_normal(exact.size)]
    for direction in directions:
        projected = samples @ direction
        spread = projected.std(ddof=1) / math.sqrt(samples.shape[0])
        target = exact @ direction
        assert abs(projected.mean() - target) <= sigmas * spread + 1e-9 * (1 + abs(target)), (
            f"biased along a direction: z = {(projected.mean() - target) / spread:.2f}"
        )


# -- the primitives of the core modules -------------------------------------------


def _normal(*shape_):
    return lambda rng: rng.standard_normal(shape_)


def _positive(*shape_):
    return lambda rng: np.abs(rng.standard_normal(shape_)) + 0.5


def _away_from_zero(*shape_):
    def build(rng):
        return np.sign(rng.standard_normal(shape_)) * (np.abs(rng.standard_normal(shape_)) + 0.5)

    return build


def case(name, fn, constants=(), **inputs):
    """One test case: input builders by name, and the call that records the op."""
    return pytest.param(inputs, fn, tuple(constants), id=name)


ew, red, sh = elementwise, reduction, shape
CASES = [
    case("add", ew.add, x=_normal(8, 5), y=_normal(8, 5)),
    case("add_broadcast", ew.add, x=_normal(8, 5), y=_normal(5)),
    case("sub", ew.subtract, x=_normal(8, 5), y=_normal(1, 5)),
    case("mul", ew.multiply, x=_normal(8, 5), y=_normal(8, 5)),
    case("mul_broadcast", ew.multiply, x=_normal(8, 1), y=_normal(8, 5)),
    case("div", ew.divide, x=_normal(8, 5), y=_away_from_zero(8, 5)),
    case("pow", ew.power, x=_positive(8, 5), y=_normal(8, 5)),
    case("maximum", ew.maximum, x=_normal(8, 5), y=_normal(8, 5)),
    case("minimum", ew.minimum, x=_normal(8, 5), y=_normal(5)),
    case(
        "where",
        ew.where,
        constants=("condition",),
        condition=lambda rng: rng.random((8, 5)) < 0.5,
        x=_normal(8, 5),
        y=_normal(8, 5),
    ),
    case("neg", ew.negative, x=_normal(8, 5)),
    case("exp", ew.exp, x=_normal(8, 5)),
    case("exp_scalar", ew.exp, x=_normal()),
    case("exp_3d", ew.exp, x=_normal(4, 3, 2)),
    case("log", ew.log, x=_positive(8, 5)),
    case("sqrt", ew.sqrt, x=_positive(8, 5)),
    case("abs", ew.abs, x=_away_from_zero(8, 5)),
    case("tanh", ew.tanh, x=_normal(8, 5)),
    case("sigmoid", ew.sigmoid, x=_normal(8, 5)),
    case("relu", ew.relu, x=_normal(8, 5)),
    case("gelu", ew.gelu, x=_normal(8, 5)),
    case("gelu_tanh", lambda x: ew.gelu(x, approximate="tanh"), x=_normal(8, 5)),
    case("clip", lambda x: ew.clip(x, -0.5, 0.7), x=_normal(8, 5)),
    case("sum_rows", lambda x: red.sum(x, axis=-1), x=_normal(8, 5)),
    case("sum_leading", lambda x: red.sum(x, axis=0), x=_normal(8, 5)),
    case("sum_all", lambda x: red.sum(x), x=_normal(8, 5)),
    case("mean_rows", lambda x: red.mean(x, axis=1, keepdims=True), x=_normal(8, 5)),
    case("mean_leading", lambda x: red.mean(x, axis=(0, 2)), x=_normal(4, 3, 5)),
    case("max_rows", lambda x: red.max(x, axis=-1), x=_normal(8, 5)),
    case("max_leading", lambda x: red.max(x, axis=0), x=_normal(8, 5)),
    case("min_rows", lambda x: red.min(x, axis=1), x=_normal(8, 5)),
    case("logsumexp_rows", lambda x: red.logsumexp(x, axis=-1), x=_normal(8, 5)),
    case("logsumexp_leading", lambda x: red.logsumexp(x, axis=0), x=_normal(8, 5)),
    case("softmax_rows", lambda x: red.softmax(x, axis=-1), x=_normal(8, 5)),
    case("softmax_leading", lambda x: red.softmax(x, axis=0), x=_normal(8, 5)),
    case("softmax_vector", lambda x: red.softmax(x), x=_normal(8)),
    case("log_softmax_rows", lambda x: red.log_softmax(x, axis=-1), x=_normal(8, 5)),
    case("log_softmax_leading", lambda x: red.log_softmax(x, axis=0), x=_normal(8, 5)),
    case("reshape", lambda x: sh.reshape(x, (4, 10)), x=_normal(8, 5)),
    case("transpose", lambda x: sh.transpose(x, (2, 0, 1)), x=_normal(4, 3, 5)),
    case("broadcast_to", lambda x: sh.broadcast_to(x, (8, 5)), x=_normal(1, 5)),
    case("broadcast_columns", lambda x: sh.broadcast_to(x, (8, 5)), x=_normal(8, 1)),
    case("broadcast_new_axes", lambda x: sh.broadcast_to(x, (3, 4, 5)), x=_normal(5)),
    case("getitem_basic", lambda x: x[1:7, ::2], x=_normal(8, 5)),
    case("getitem_repeated", lambda x: x[np.array([0, 3, 3, 6, 7, 0])], x=_normal(8, 5)),
    case(
        "concatenate",
        lambda x, y: sh.concatenate([x, y], axis=0),
        x=_normal(4, 5),
        y=_normal(3, 5),
    ),
    case(
        "concatenate_columns",
        lambda x, y: sh.concatenate([x, y], axis=1),
        x=_normal(8, 2),
        y=_normal(8, 3),
    ),
    case("stack", lambda x, y: sh.stack([x, y], axis=1), x=_normal(8, 5), y=_normal(8, 5)),
    case("pad", lambda x: sh.pad(x, ((1, 2), (0, 1))), x=_normal(8, 5)),
    case("astype", lambda x: x.astype(np.float32).astype(np.float64), x=_normal(8, 5)),
    case(
        "linear",
        lambda x, weight, bias: linalg.linear(x, weight, bias),
        x=_normal(8, 5),
        weight=_normal(4, 5),
        bias=_normal(4),
    ),
    case(
        "linear_3d",
        lambda x, weight: linalg.linear(x, weight),
        x=_normal(2, 4, 5),
        weight=_normal(3, 5),
    ),
    case("matmul", linalg.matmul, a=_normal(8, 5), b=_normal(5, 4)),
    case("matmul_batched", linalg.matmul, a=_normal(2, 6, 3), b=_normal(3, 4)),
    case("matmul_broadcast", linalg.matmul, a=_normal(6, 3), b=_normal(2, 3, 4)),
    case("matmul_vector", linalg.matmul, a=_normal(6, 3), b=_normal(3)),
]

BILINEAR = [
    case(
        "linear",
        lambda x, weight, bias: linalg.linear(x, weight, bias),
        x=_normal(10, 6),
        weight=_normal(5, 6),
        bias=_normal(5),
    ),
    case(
        "linear_no_bias",
        lambda x, weight: linalg.linear(x, weight),
        x=_normal(3, 4, 6),
        weight=_normal(5, 6),
    ),
    case("matmul", linalg.matmul, a=_normal(10, 6), b=_normal(6, 5)),
    case("matmul_batched", linalg.matmul, a=_normal(2, 7, 3), b=_normal(2, 3, 4)),
]


def _arrays(inputs, seed=0):
    rng = np.random.default_rng(seed)
    return {name: build(rng) for name, build in inputs.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("inputs", "fn", "constants"), CASES)
def test_sampled_vjp_is_unbiased(inputs, fn, constants, family):
    arrays = _arrays(inputs)
    exact, samples = draw_gradients(fn, arrays, FAMILIES[family], constants=constants)
    # A scalar output is an axis of length 1: only Bernoulli and Gaussian sketches vary it.
    scalar = output_cotangent(fn, arrays, constants).ndim == 0
    assert_unbiased(
        exact, samples, must_vary=not scalar or family in ("bernoulli", "rank_gaussian")
    )


@pytest.mark.parametrize("placement", ["contracted", "cotangent"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(("inputs", "fn", "constants"), BILINEAR)
def test_bilinear_placements_are_unbiased(inputs, fn, constants, family, placement):
    sketch = type(FAMILIES[family])(0.4, placement=placement)
    if family == "rank_gaussian":
        sketch = RankK(0.4, kind="gaussian", placement=placement)
    elif family == "rank":
        sketch = RankK(0.4, placement=placement)
    exact, samples = draw_gradients(fn, _arrays(inputs), {"linear": sketch, "matmul": sketch})
    assert_unbiased(exact, samples)


def _primitive_names(module):
    return {
        value.name
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Primitive)
        and value.__module__ == module.__name__
        and "name" in vars(value)
    }


def test_every_core_primitive_has_a_case():
    recorded = set()
    for param in CASES:
        inputs, fn, constants = param.values
        leaves = _leaves(_arrays(inputs), constants)
        output = fn(**leaves)
        recorded |= {op.name for op in topological_order(output.op)}
    expected = set().union(*(_primitive_names(m) for m in (elementwise, reduction, shape, linalg)))
    # to_device needs a GPU: test_sampled_to_device covers it where one exists.
    assert expected - recorded == {"to_device"}


@pytest.mark.gpu
def test_sampled_to_device():
    if not rbprop.gpu_available():
        pytest.skip("needs cupy and a CUDA device")
    arrays = _arrays({"x": _normal(8, 5)})
    exact, samples = draw_gradients(lambda x: x.to("gpu").to("cpu"), arrays, Bernoulli(0.5))
    assert_unbiased(exact, samples)


@pytest.mark.parametrize("family", ["bernoulli", "uniform", "importance", "rank"])
def test_keep_ratio_one_gives_the_exact_gradient(family):
    sketch = {"bernoulli": Bernoulli, "uniform": UniformK, "importance": Importance}.get(
        family, RankK
    )(1.0)
    for param in CASES:
        inputs, fn, constants = param.values
        arrays = _arrays(inputs)
        cotangent = output_cotangent(fn, arrays, constants)
        exact = gradient(fn, arrays, cotangent, constants)
        sampled = gradient(fn, arrays, cotangent, constants, sketch, seed=3)
        # (astype rounds to float32, where Q Q^T equals I only to float32 precision.)
        tolerance = 1e-5 if param.id == "astype" else 1e-9
        assert np.allclose(sampled, exact, rtol=tolerance, atol=tolerance), param.id


# -- measured variance against the formulas ----------------------------------------


def _linear_contributions(x, weight, cotangent, placement, needs):
    """Per-index shares ``x_i`` of the exact gradient (dx, dW, db) of ``x W^T + b``.

    Contracted: row ``i`` contributes ``v_i W`` to row ``i`` of dx, ``v_i x_i^T``
    to dW and ``v_i`` to db. Cotangent: feature ``j`` contributes
    ``V[:, j] W[j]`` to dx, ``V[:, j]^T x`` to row ``j`` of dW and ``sum V[:, j]``
    to ``db_j``.
    """
    rows, out_features = cotangent.shape
    parts = []
    if placement == "contracted":
        for i in range(rows):
            grad_x = np.zeros_like(x)
            grad_x[i] = cotangent[i] @ weight
            pieces = {
                "x": grad_x,
                "weight": np.outer(cotangent[i], x[i]),
                "bias": cotangent[i],
            }
            parts.append(np.concatenate([pieces[name].ravel() for name in needs]))
    else:
        for j in range(out_features):
            grad_weight = np.zeros_like(weight)
            grad_weight[j] = cotangent[:, j] @ x
            grad_bias = np.zeros(out_features)
            grad_bias[j] = cotangent[:, j].sum()
            pieces = {
                "x": np.outer(cotangent[:, j], weight[j]),
                "weight": grad_weight,
                "bias": grad_bias,
            }
            parts.append(np.concatenate([pieces[name].ravel() for name in needs]))
    return np.stack(parts)


def _assert_variance(exact, samples, predicted):
    errors = np.sum((samples - exact) ** 2, axis=1)
    measured = errors.mean()
    stderr = errors.std(ddof=1) / math.sqrt(errors.size)
    assert abs(measured - predicted) <= 5 * stderr, (measured, stderr, predicted)
    assert stderr < 0.1 * predicted  # precise enough to see a 50% error


@pytest.mark.parametrize("placement", ["contracted", "cotangent"])
@pytest.mark.parametrize("family", ["bernoulli", "uniform", "importance"])
def test_linear_variance_matches_formula(family, placement):
    rng = np.random.default_rng(11)
    rows, in_features, out_features = 12, 5, 7
    x = rng.standard_normal((rows, in_features)) * rng.lognormal(0, 1, (rows, 1))
    weight = rng.standard_normal((out_features, in_features))
    bias = rng.standard_normal(out_features)
    # Importance weighs each index by the exact ||x_i|| only when one gradient is
    # needed (dW for rows, dx for features); otherwise its weights are estimates.
    if family == "importance":
        needs = ("weight",) if placement == "contracted" else ("x",)
    else:
        needs = ("x", "weight", "bias")
    arrays = {"x": x, "weight": weight, "bias": bias}
    constants = tuple(name for name in arrays if name not in needs)
    sketch = {"bernoulli": Bernoulli, "uniform": UniformK, "importance": Importance}[family](
        0.4, placement=placement
    )

    def fn(x, weight, bias):
        return linalg.linear(x, weight, bias)

    exact, samples = draw_gradients(fn, arrays, {"linear": sketch}, 3000, constants, seed=5)
    cotangent = output_cotangent(fn, arrays, constants)
    contributions = _linear_contributions(x, weight, cotangent, placement, needs)
    assert np.allclose(contributions.sum(axis=0), exact)
    _assert_variance(exact, samples, sketch.added_variance(contributions))


@pytest.mark.parametrize("family", ["bernoulli", "uniform"])
@pytest.mark.parametrize("op", ["exp", "tanh"])
def test_row_local_variance_matches_formula(op, family):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((10, 4))
    fn = getattr(elementwise, op)
    # (Keep ratio 1/2 would make ||g - exact||^2 the same in every draw: (2 - 1)^2 = 1.)
    sketch = {"bernoulli": Bernoulli, "uniform": UniformK}[family](0.3)
    exact, samples = draw_gradients(fn, {"x": x}, {op: sketch}, 3000, seed=6)
    # Row i contributes the i-th row of the exact gradient (and nothing else).
    rows = exact.reshape(x.shape)
    contributions = np.stack([np.where(np.arange(10)[:, None] == i, rows, 0.0) for i in range(10)])
    _assert_variance(exact, samples, sketch.added_variance(contributions))


@pytest.mark.parametrize("kind", ["orthogonal", "gaussian"])
def test_rank_variance_matches_formula_where_j_is_identity(kind):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((12, 3))
    sketch = RankK(0.25, kind=kind)
    exact, samples = draw_gradients(
        lambda x: shape.reshape(x, (12, 3)) * 1.0, {"x": x}, {"reshape": sketch}, 3000, seed=7
    )
    # The reshape's VJP is the identity on the (12 x 3) cotangent, sketched along its rows:
    # each column adds (n/k - 1) ||v_col||^2 (orthogonal) or (n + 1)/k ||v_col||^2 (gaussian).
    _assert_variance(exact, samples, sketch.added_variance(np.sum(exact**2), 12))


# -- determinism -----------------------------------------------------------------


def _mlp_arrays(seed=0, batch=16, inputs=6, hidden=10, classes=4):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, inputs)),
        "w1": rng.standard_normal((hidden, inputs)) / math.sqrt(inputs),
        "b1": 0.1 * rng.standard_normal(hidden),
        "w2": rng.standard_normal((classes, hidden)) / math.sqrt(hidden),
        "b2": 0.1 * rng.standard_normal(classes),
        "target": np.eye(classes)[rng.integers(0, classes, batch)],
    }


def mlp_loss(x, w1, b1, w2, b2, target):
    """Mean negative log-likelihood of a linear-relu-linear-log_softmax classifier."""
    hidden = functional.relu(linalg.linear(x, w1, b1))
    log_probabilities = functional.log_softmax(linalg.linear(hidden, w2, b2), dim=-1)
    return (log_probabilities * target).sum() * (-1.0 / x.shape[0])


MLP_CONSTANTS = ("x", "target")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_seed_gives_bit_identical_gradients(family):
    arrays = _mlp_arrays()
    sketch = FAMILIES[family]
    first = gradient(mlp_loss, arrays, None, MLP_CONSTANTS, sketch, seed=42)
    second = gradient(mlp_loss, arrays, None, MLP_CONSTANTS, sketch, seed=42)
    assert np.array_equal(first, second)
    # One other seed may give the same gradient by chance (a sketch on the scalar
    # loss drops it with probability 1 - r, zeroing every gradient); five may not.
    others = [
        gradient(mlp_loss, arrays, None, MLP_CONSTANTS, sketch, seed=s) for s in range(43, 48)
    ]
    assert any(not np.array_equal(first, other) for other in others)


# -- policy semantics ---------------------------------------------------------------


def _sketches(output):
    """(op name, sketch) of every op in the recorded graph."""
    return [(op.name, op.sketch) for op in topological_order(output.op)]


def _model(arrays):
    """Ops in three scopes: top level, ``encoder.block0`` and ``head``."""
    x = rbprop.tensor(arrays["x"])
    w1 = rbprop.tensor(arrays["w1"], requires_grad=True)
    w2 = rbprop.tensor(arrays["w2"], requires_grad=True)
    recorded = {}
    with module_scope("encoder"):
        with module_scope("encoder.block0"):
            hidden = linalg.linear(x, w1)
            recorded["encoder.block0/linear"] = hidden.op
            hidden = functional.relu(hidden)
            recorded["encoder.block0/relu"] = hidden.op
        hidden = functional.tanh(hidden)
        recorded["encoder/tanh"] = hidden.op
    with module_scope("head"):
        logits = linalg.linear(hidden, w2)
        recorded["head/linear"] = logits.op
    output = rbprop.exp(logits)
    recorded["/exp"] = output.op
    return output, recorded


def _resolved(policy, seed=0):
    with rbprop.sampled(policy, seed=seed):
        _, recorded = _model(_mlp_arrays())
    return {key: op.sketch for key, op in recorded.items()}


def test_policy_by_op_name_leaves_other_ops_exact():
    sketch = Bernoulli(0.5)
    resolved = _resolved({"linear": sketch})
    assert resolved["encoder.block0/linear"] == sketch
    assert resolved["head/linear"] == sketch
    assert resolved["encoder.block0/relu"] is None
    assert resolved["encoder/tanh"] is None
    assert resolved["/exp"] is None


def test_policy_by_module_path_covers_submodules():
    sketch = UniformK(0.5)
    resolved = _resolved({"encoder": sketch})
    assert resolved["encoder.block0/linear"] == sketch
    assert resolved["encoder.block0/relu"] == sketch
    assert resolved["encoder/tanh"] == sketch
    assert resolved["head/linear"] is None and resolved["/exp"] is None


def test_policy_wildcards_and_pairs():
    first, second = Bernoulli(0.5), UniformK(0.25)
    resolved = _resolved({"encoder.*": first})
    assert resolved["encoder.block0/relu"] == first
    assert resolved["encoder/tanh"] is None  # "encoder.*" does not match "encoder" itself
    resolved = _resolved({"encoder.block0/linear": first, "*/linear": second})
    assert resolved["encoder.block0/linear"] == first  # exact pair before a wildcard pair
    assert resolved["head/linear"] == second
    assert resolved["encoder.block0/relu"] is None


def test_policy_most_specific_key_wins():
    broad, deep, pair, by_name = Bernoulli(0.5), UniformK(0.5), RankK(0.5), Importance(0.5)
    resolved = _resolved({"encoder": broad, "encoder.block0": deep, "relu": by_name})
    assert resolved["encoder.block0/linear"] == deep  # deepest module
    assert resolved["encoder.block0/relu"] == deep  # module before op name
    assert resolved["encoder/tanh"] == broad
    resolved = _resolved({"encoder.block0": deep, "encoder/linear": pair, "exp": by_name})
    assert resolved["encoder.block0/linear"] == pair  # a pair before any module
    assert resolved["/exp"] == by_name  # outside modules, the op name


def test_policy_none_and_spec_strings():
    resolved = _resolved({"linear": "uniform:0.5", "head/linear": None})
    assert resolved["encoder.block0/linear"] == UniformK(0.5)
    assert resolved["head/linear"] is None
    resolved = _resolved("bernoulli:0.25")
    assert all(sketch == Bernoulli(0.25) for sketch in resolved.values())


def test_ops_outside_sampled_or_inside_exact_stay_exact():
    output, _ = _model(_mlp_arrays())
    assert all(sketch is None for _, sketch in _sketches(output))
    with rbprop.sampled(Bernoulli(0.5), seed=0), rbprop.exact():
        output, _ = _model(_mlp_arrays())
    assert all(sketch is None for _, sketch in _sketches(output))


def test_sampled_ops_get_distinct_seeds():
    with rbprop.sampled(Bernoulli(0.5), seed=0):
        output, _ = _model(_mlp_arrays())
    seeds = [op.seed for op in topological_order(output.op)]
    assert len(set(seeds)) == len(seeds)


def test_bad_policies_raise():
    with pytest.raises(TypeError, match="policy must be"), rbprop.sampled(3):
        pass
    with pytest.raises(TypeError, match="non-empty strings"), rbprop.sampled({"": Bernoulli(0.5)}):
        pass
    with pytest.raises(ValueError, match="invalid sketch spec"), rbprop.sampled({"linear": "x:1"}):
        pass


# -- whole models ----------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mlp_gradient_is_unbiased(family):
    arrays = _mlp_arrays()
    exact, samples = draw_gradients(
        mlp_loss, arrays, FAMILIES[family], draws=600, constants=MLP_CONSTANTS, seed=8
    )
    assert_unbiased(exact, samples)


def _attention_arrays(seed=0, batch=2, tokens=5, dim=4):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.standard_normal((batch, tokens, dim))}
    for name in ("wq", "wk", "wv", "wo"):
        arrays[name] = rng.standard_normal((dim, dim)) / math.sqrt(dim)
    arrays["target"] = rng.standard_normal((batch, tokens, dim))
    return arrays


def attention_loss(x, wq, wk, wv, wo, target):
    """A single-head attention block built from linear, matmul, softmax and shape ops."""
    query, key, value = linalg.linear(x, wq), linalg.linear(x, wk), linalg.linear(x, wv)
    scores = linalg.matmul(query, shape.swapaxes(key, -1, -2)) * (1.0 / math.sqrt(x.shape[-1]))
    mixed = linalg.matmul(reduction.softmax(scores, axis=-1), value)
    return (linalg.linear(mixed, wo) * target).sum()


def sdpa_loss(x, wq, wk, wv, wo, target):
    """The same block through ``functional.scaled_dot_product_attention``."""
    query, key, value = linalg.linear(x, wq), linalg.linear(x, wk), linalg.linear(x, wv)
    mixed = functional.scaled_dot_product_attention(query, key, value)
    return (linalg.linear(mixed, wo) * target).sum()


ATTENTION_CONSTANTS = ("x", "target")


@pytest.mark.parametrize("family", ["bernoulli", "uniform", "importance", "rank"])
def test_attention_block_gradient_is_unbiased(family):
    exact, samples = draw_gradients(
        attention_loss,
        _attention_arrays(),
        FAMILIES[family],
        draws=600,
        constants=ATTENTION_CONSTANTS,
        seed=9,
    )
    assert_unbiased(exact, samples)


@pytest.mark.parametrize("family", ["bernoulli", "importance"])
def test_sdpa_block_gradient_is_unbiased(family):
    if not hasattr(functional, "scaled_dot_product_attention"):
        pytest.skip("functional.scaled_dot_product_attention is not written yet")
    exact, samples = draw_gradients(
        sdpa_loss,
        _attention_arrays(),
        FAMILIES[family],
        draws=600,
        constants=ATTENTION_CONSTANTS,
        seed=10,
    )
    assert_unbiased(exact, samples)


# -- memory and FLOPs ----------------------------------------------------------------


def _linear_on_activation(policy, rows=512, in_features=64, out_features=32, seed=0):
    """Bytes a linear layer saves for backward when its input is an activation."""
    rng = np.random.default_rng(seed)
    x = rbprop.tensor(rng.standard_normal((rows, in_features)), requires_grad=True)
    weight = rbprop.tensor(rng.standard_normal((out_features, in_features)), requires_grad=True)
    bias = rbprop.tensor(rng.standard_normal(out_features), requires_grad=True)
    activation = x + 0.0  # not a leaf: what the layer keeps of it counts
    before = cost.saved_bytes.current
    if policy is None:
        output = linalg.linear(activation, weight, bias)
    else:
        with rbprop.sampled(policy, seed=seed):
            output = linalg.linear(activation, weight, bias)
    held = cost.saved_bytes.current - before
    with cost.CostMeter() as meter:
        output.backward(np.ones(output.shape))
    return held, meter.per_op["linear"]


@pytest.mark.parametrize("family", ["bernoulli", "uniform", "rank"])
def test_forward_drawn_contracted_sketch_saves_memory_and_flops(family):
    baseline = cost.saved_bytes.current
    exact_bytes, exact_cost = _linear_on_activation(None)
    assert exact_bytes == 512 * 64 * 8
    sketch = {"bernoulli": Bernoulli, "uniform": UniformK, "rank": RankK}[family](
        0.25, placement="contracted"
    )
    sampled_bytes, sampled_cost = _linear_on_activation({"linear": sketch})
    assert sampled_bytes <= 0.3 * exact_bytes
    assert cost.saved_bytes.current == baseline  # backward released everything
    assert exact_cost.sampled_calls == 0 and sampled_cost.sampled_calls == 1
    assert sampled_cost.exact_equivalent_flops == exact_cost.flops
    if family != "rank":  # (a rank sketch spends n k (in + out) more on forming Q^T v, Q c)
        assert 0.2 <= sampled_cost.flops / exact_cost.flops <= 0.3


@pytest.mark.parametrize("placement", ["contracted", "cotangent"])
def test_sampled_flops_scale_with_keep_ratio(placement):
    for keep_ratio in (0.5, 0.25, 0.125):
        sketch = UniformK(keep_ratio, placement=placement)
        _, sampled_cost = _linear_on_activation({"linear": sketch})
        ratio = sampled_cost.flops / sampled_cost.exact_equivalent_flops
        assert math.isclose(ratio, keep_ratio, rel_tol=0.02)


def test_backward_drawn_sketch_saves_no_memory():
    exact_bytes, _ = _linear_on_activation(None)
    importance_bytes, _ = _linear_on_activation({"linear": Importance(0.25)})
    cotangent_bytes, _ = _linear_on_activation({"linear": UniformK(0.25, placement="cotangent")})
    assert importance_bytes == exact_bytes
    assert cotangent_bytes == exact_bytes


def test_a_policy_dict_edited_between_blocks_takes_effect():
    from rbprop.sampling import _resolved_policy

    policy = {"linear": "bernoulli:0.5"}
    first = _resolved_policy(policy)
    assert _resolved_policy(policy) is first  # the same mapping, unchanged: reused
    assert _resolved_policy(dict(policy)) is not first  # another mapping: resolved anew
    policy["relu"] = "bernoulli:0.25"
    edited = _resolved_policy(policy)
    assert edited is not first
    assert edited.lookup("relu", "") == Bernoulli(0.25)
    policy["linear"] = None
    assert _resolved_policy(policy).lookup("linear", "") is None
