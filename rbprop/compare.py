"""Exact against sampled VJP, one primitive at a time: bias, variance, FLOPs, seconds.

:func:`compare_op` runs one primitive on random inputs, computes its exact VJP
for a fixed random cotangent ``u``, then draws the sampled VJP many times (each
draw a fresh forward and backward pass in its own ``sampled`` block, so sketches
drawn in the forward pass are redrawn too) and reports:

* the bias test: per gradient element ``z = |mean - exact| / stderr``, its
  maximum, and the mean of ``z^2`` (close to 1 for an unbiased VJP);
* the measured variance ``E||g - exact||^2`` (summed over every element of
  every input's gradient) next to the theoretical one;
* FLOPs, bytes saved for backward and median backward seconds, exact and sampled.

The theoretical variance needs no formula per op. A sampled VJP is linear in
the sketch: ``g(S) = sum_ij S_ij C_ij``, where ``C_ij`` is what the op returns
when the cotangent slice ``j`` is routed through index ``i``. Running the op
with hand-made samples gives the pieces each family's formula needs:

* diagonal families (Bernoulli, uniform, importance) need the per-index
  contributions ``x_i = C_ii = g(e_i e_i^T)`` (``n`` runs); their variance is the
  sketch's ``added_variance(x)``, for importance with the probabilities the op
  actually used (the optimum, with exact weights ``||x_i||``, is reported too);
* rank-k sketches are rotation invariant, so
  ``E[S_ij S_kl] = alpha (d_ik d_jl + d_il d_jk) + beta d_ij d_kl`` and
  ``E||g||^2 = alpha sum_ij <C_ij, C_ij + C_ji> + beta ||g_exact||^2``; the sum is
  ``1/2 sum_ij ||D_ij||^2`` with ``D_ij = g(E_ij + E_ji)`` (``n(n+1)/2`` runs).

This module also drives ``rbprop compare`` (:func:`add_compare_arguments`,
:func:`run_compare`) and lends its op registry and timers to ``bench/``.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import functional
from .autograd import topological_order
from .backend import to_numpy
from .cost import CostMeter
from .ops import elementwise, linalg, reduction, shape
from .sampling import sampled
from .sketch import (
    PLACEMENTS,
    Bernoulli,
    DiagonalSample,
    Importance,
    ProjectionSample,
    RankK,
    Sketch,
    UniformK,
    parse,
    water_filling,
)
from .tensor import Tensor

#: Theory runs the op once per index (diagonal) or per pair of indices (rank);
#: beyond these sizes it is skipped and the report says why.
MAX_CONTRIBUTION_INDICES = 1024
MAX_CONTRIBUTION_ELEMENTS = 20_000_000
MAX_RANK_INDICES = 64


# -- the registry of ops ------------------------------------------------------


@dataclass(frozen=True)
class OpCase:
    """How to exercise one primitive: its inputs and the call that records it.

    ``build(rng, shape)`` returns the inputs by name (float64 arrays, plus
    integer or boolean ``constants`` that get no gradient); ``apply(**tensors)``
    records the op. ``primitive`` is the recorded op's name (the policy key);
    ``parameters`` name inputs that a model would hold as parameters (not
    counted in the bytes saved for backward).
    """

    name: str
    default_shape: tuple
    shape_help: str
    build: Callable
    apply: Callable
    primitive: str = ""
    parameters: tuple = ()
    constants: tuple = ()
    placements: bool = False

    @property
    def op_name(self) -> str:
        return self.primitive or self.name


def _normal(rng, shape):
    return rng.standard_normal(shape)


def _positive(rng, shape):
    return np.abs(rng.standard_normal(shape)) + 0.5


def _unary_case(name, function, inputs=_normal, primitive="", default_shape=(12, 5)):
    return OpCase(
        name,
        default_shape,
        "shape of x",
        lambda rng, shape: {"x": inputs(rng, shape)},
        lambda x: function(x),
        primitive=primitive,
    )


def _binary_case(name, function, second=_normal):
    return OpCase(
        name,
        (12, 5),
        "shape of x and y",
        lambda rng, shape: {"x": _normal(rng, shape), "y": second(rng, shape)},
        lambda x, y: function(x, y),
    )


def _signed_away_from_zero(rng, shape):
    return np.sign(rng.standard_normal(shape)) * (np.abs(rng.standard_normal(shape)) + 0.5)


def _pow_inputs(rng, shape):
    return {"x": _positive(rng, shape), "y": rng.uniform(0.5, 2.0, shape)}


def _where_inputs(rng, shape):
    return {
        "condition": rng.random(shape) < 0.5,
        "x": _normal(rng, shape),
        "y": _normal(rng, shape),
    }


def _linear_inputs(rng, shape):
    rows, in_features, out_features = shape
    return {
        "x": _normal(rng, (rows, in_features)),
        "weight": _normal(rng, (out_features, in_features)) / math.sqrt(in_features),
        "bias": _normal(rng, (out_features,)),
    }


def _matmul_inputs(rng, shape):
    *batch, rows, inner, columns = shape
    return {
        "a": _normal(rng, (*batch, rows, inner)),
        "b": _normal(rng, (*batch, inner, columns)) / math.sqrt(inner),
    }


def _two_halves(rng, shape):
    return {"x": _normal(rng, shape), "y": _normal(rng, shape)}


def _core_cases() -> list[OpCase]:
    ew, red, sh = elementwise, reduction, shape
    return [
        OpCase(
            "linear",
            (16, 12, 10),
            "rows, in_features, out_features",
            _linear_inputs,
            lambda x, weight, bias: linalg.linear(x, weight, bias),
            parameters=("weight", "bias"),
            placements=True,
        ),
        OpCase(
            "matmul",
            (16, 12, 10),
            "[batch..., ] rows, inner, columns",
            _matmul_inputs,
            lambda a, b: linalg.matmul(a, b),
            placements=True,
        ),
        _binary_case("add", ew.add),
        _binary_case("sub", ew.subtract),
        _binary_case("mul", ew.multiply),
        _binary_case("div", ew.divide, second=_signed_away_from_zero),
        OpCase("pow", (12, 5), "shape of x and y", _pow_inputs, lambda x, y: ew.power(x, y)),
        _binary_case("maximum", ew.maximum),
        _binary_case("minimum", ew.minimum),
        OpCase(
            "where",
            (12, 5),
            "shape of condition, x and y",
            _where_inputs,
            lambda condition, x, y: ew.where(condition, x, y),
            constants=("condition",),
        ),
        _unary_case("neg", ew.negative),
        _unary_case("exp", ew.exp),
        _unary_case("log", ew.log, inputs=_positive),
        _unary_case("sqrt", ew.sqrt, inputs=_positive),
        _unary_case("abs", ew.abs, inputs=_signed_away_from_zero),
        _unary_case("tanh", ew.tanh),
        _unary_case("sigmoid", ew.sigmoid),
        _unary_case("relu", ew.relu),
        _unary_case("gelu", ew.gelu),
        _unary_case("gelu_tanh", lambda x: ew.gelu(x, approximate="tanh"), primitive="gelu"),
        _unary_case("clip", lambda x: ew.clip(x, -0.5, 0.5)),
        _unary_case("sum", lambda x: red.sum(x, axis=-1)),
        _unary_case("sum_rows", lambda x: red.sum(x, axis=0), primitive="sum"),
        _unary_case("mean", lambda x: red.mean(x, axis=-1)),
        _unary_case("max", lambda x: red.max(x, axis=-1)),
        _unary_case("min", lambda x: red.min(x, axis=-1)),
        _unary_case("logsumexp", lambda x: red.logsumexp(x, axis=-1)),
        _unary_case("softmax", lambda x: red.softmax(x, axis=-1)),
        _unary_case("log_softmax", lambda x: red.log_softmax(x, axis=-1)),
        _unary_case("reshape", lambda x: sh.reshape(x, (-1, 2 * x.shape[-1]))),
        _unary_case("transpose", lambda x: sh.transpose(x)),
        _unary_case("getitem", lambda x: x[np.array([0, 2, 2, 5, 7]) % x.shape[0]]),
        _unary_case("pad", lambda x: sh.pad(x, 1)),
        OpCase(
            "broadcast_to",
            (12, 5),
            "shape of the result (x has one row)",
            lambda rng, shape: {"x": _normal(rng, (1,) + tuple(shape[1:])), "rows": shape[0]},
            lambda x, rows: sh.broadcast_to(x, (rows,) + x.shape[1:]),
            constants=("rows",),
        ),
        OpCase(
            "concatenate",
            (6, 5),
            "shape of each of x and y",
            _two_halves,
            lambda x, y: sh.concatenate([x, y], axis=0),
        ),
        OpCase(
            "stack",
            (12, 5),
            "shape of each of x and y",
            _two_halves,
            lambda x, y: sh.stack([x, y]),
        ),
    ]


def _conv_inputs(rng, shape):
    batch, channels, height, width, out_channels, kernel = shape
    fan_in = channels * kernel * kernel
    return {
        "x": _normal(rng, (batch, channels, height, width)),
        "weight": _normal(rng, (out_channels, channels, kernel, kernel)) / math.sqrt(fan_in),
        "bias": _normal(rng, (out_channels,)),
    }


def _attention_inputs(rng, shape):
    *batch, length, dim = shape
    return {name: _normal(rng, (*batch, length, dim)) for name in ("query", "key", "value")}


def _layer_norm_inputs(rng, shape):
    return {
        "x": _normal(rng, shape),
        "weight": 1.0 + 0.1 * _normal(rng, shape[-1:]),
        "bias": 0.1 * _normal(rng, shape[-1:]),
    }


def _cross_entropy_inputs(rng, shape):
    rows, classes = shape
    return {"logits": _normal(rng, shape), "target": rng.integers(0, classes, rows)}


def _functional_cases() -> list[OpCase]:
    """Cases for the neural-network functions that ``rbprop.functional`` provides."""
    f = functional
    wanted = {
        "conv2d": lambda: OpCase(
            "conv2d",
            (2, 3, 6, 6, 4, 3),
            "batch, channels, height, width, out_channels, kernel",
            _conv_inputs,
            lambda x, weight, bias: f.conv2d(x, weight, bias, padding=1),
            parameters=("weight", "bias"),
            placements=True,
        ),
        "scaled_dot_product_attention": lambda: OpCase(
            "scaled_dot_product_attention",
            (2, 6, 4),
            "[batch..., ] length, dim",
            _attention_inputs,
            lambda query, key, value: f.scaled_dot_product_attention(query, key, value),
            placements=True,
        ),
        "layer_norm": lambda: OpCase(
            "layer_norm",
            (12, 8),
            "shape of x (normalised over the last axis)",
            _layer_norm_inputs,
            lambda x, weight, bias: f.layer_norm(x, x.shape[-1:], weight, bias),
            parameters=("weight", "bias"),
        ),
        "max_pool2d": lambda: _unary_case(
            "max_pool2d", lambda x: f.max_pool2d(x, 2), default_shape=(2, 3, 6, 6)
        ),
        "avg_pool2d": lambda: _unary_case(
            "avg_pool2d", lambda x: f.avg_pool2d(x, 2), default_shape=(2, 3, 6, 6)
        ),
        "cross_entropy": lambda: OpCase(
            "cross_entropy",
            (12, 5),
            "rows, classes",
            _cross_entropy_inputs,
            lambda logits, target: f.cross_entropy(logits, target),
            constants=("target",),
        ),
    }
    return [make() for name, make in wanted.items() if hasattr(f, name)]


def available_ops() -> dict[str, OpCase]:
    """Every op ``compare_op`` knows, by name (functional ops once they exist)."""
    return {case.name: case for case in _core_cases() + _functional_cases()}


def make_inputs(case: OpCase, shape=None, seed: int = 0, dtype=np.float64) -> dict:
    """Random inputs for ``case`` (floating ones cast to ``dtype``)."""
    shape = tuple(case.default_shape if shape is None else shape)
    try:
        arrays = case.build(np.random.default_rng(seed), shape)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"compare: op {case.name!r} takes a shape of the form ({case.shape_help}), "
            f"got {shape}: {error}"
        ) from None
    return {
        name: array.astype(dtype) if name not in case.constants else array
        for name, array in arrays.items()
    }


# -- running the op -----------------------------------------------------------


def _leaves(case, arrays):
    return {
        name: array if name in case.constants else Tensor(array, requires_grad=True)
        for name, array in arrays.items()
    }


def _differentiable(case, arrays):
    return [name for name in arrays if name not in case.constants]


def _target_ops(output, op_name):
    if output.op is None:
        return []
    return [op for op in topological_order(output.op) if op.name == op_name]


def forward(case, arrays, policy=None, seed=None):
    """Record ``case`` on fresh leaves (sampled under ``policy``); (output, leaves)."""
    leaves = _leaves(case, arrays)
    if policy is None:
        return case.apply(**leaves), leaves
    with sampled(policy, seed=seed):
        return case.apply(**leaves), leaves


def _gradient_vector(case, arrays, leaves):
    parts = []
    for name in _differentiable(case, arrays):
        grad = leaves[name].grad
        parts.append(
            np.zeros(arrays[name].size) if grad is None else to_numpy(grad.data).reshape(-1)
        )
    return np.concatenate(parts).astype(np.float64)


def gradient(case, arrays, cotangent, policy=None, seed=None):
    """All input gradients of one backward pass, flattened into one float64 vector."""
    output, leaves = forward(case, arrays, policy, seed)
    output.backward(cotangent)
    return _gradient_vector(case, arrays, leaves)


def _owner(array):
    while getattr(array, "base", None) is not None and hasattr(array.base, "nbytes"):
        array = array.base
    return array


def saved_bytes(case, arrays, policy=None, seed=None) -> int:
    """Bytes the op's recorded instances keep for backward (parameters not counted)."""
    output, leaves = forward(case, arrays, policy, seed)
    parameters = {id(leaves[name].data) for name in case.parameters}
    owners = {}
    for op in _target_ops(output, case.op_name):
        for array in op.saved_arrays().values():
            owner = _owner(array)
            if id(array) not in parameters and id(owner) not in parameters:
                owners[id(owner)] = int(owner.nbytes)
    return sum(owners.values())


def median_backward_seconds(case, arrays, cotangent, policy=None, repeats=5, seed=0) -> float:
    """Median wall-clock seconds of the backward pass (after one untimed warm-up).

    Every run records a fresh forward pass (untimed, with its own sketch seed)
    and times only ``backward``.
    """
    timings = []
    for run in range(repeats + 1):
        output, _ = forward(case, arrays, policy, seed=[seed, 7919, run])
        start = time.perf_counter()
        output.backward(cotangent)
        if run:
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def backward_flops(case, arrays, cotangent, policy=None, seed=None) -> tuple[int, int]:
    """(FLOPs spent, exact-equivalent FLOPs) of the op's VJPs in one backward pass."""
    output, _ = forward(case, arrays, policy, seed)
    with CostMeter() as meter:
        output.backward(cotangent)
    cost = meter.per_op.get(case.op_name)
    return (cost.flops, cost.exact_equivalent_flops) if cost else (0, 0)


# -- sketches used to take the op apart ------------------------------------------


class _Recorder(Sketch):
    """Wraps a sketch and records the axis length (and weights) of every draw."""

    def __init__(self, inner: Sketch):
        super().__init__(inner.keep_ratio, inner.placement)
        self.inner = inner
        self.needs_cotangent = inner.needs_cotangent
        self.family = inner.family
        self.draws: list = []

    def __getattr__(self, name):
        # Anything else an op asks of its sketch (``kind`` of a rank sketch, ...).
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def draw(self, size, rng, weights=None):
        kept_weights = None if weights is None else to_numpy(weights).astype(np.float64).copy()
        self.draws.append((size, kept_weights))
        return self.inner.draw(size, rng, weights=weights)


class _Given(Sketch):
    """A "sketch" whose every draw is one given sample (to read off ``g(S)``)."""

    family = "given"

    def __init__(self, sample, placement):
        super().__init__(1.0, placement)
        self.sample = sample

    def draw(self, size, rng, weights=None):
        if size != self.sample.size:
            raise RuntimeError(f"compare: axis of length {size}, expected {self.sample.size}")
        return self.sample


def _given_gradient(case, arrays, cotangent, op_name, sample, placement):
    return gradient(case, arrays, cotangent, policy={op_name: _Given(sample, placement)})


def contributions(case, arrays, cotangent, size, placement=None):
    """Per-index contributions ``x_i = g(e_i e_i^T)``: one row per sketched index."""
    rows = [
        _given_gradient(
            case, arrays, cotangent, case.op_name, DiagonalSample(size, [i], [1.0]), placement
        )
        for i in range(size)
    ]
    return np.stack(rows)


def _pair_sum(case, arrays, cotangent, size, rows, placement):
    """``sum_ij <C_ij, C_ij + C_ji> = 1/2 sum_ij ||D_ij||^2`` with ``D_ij = C_ij + C_ji``.

    ``D_ii = 2 x_i``; for ``i < j``, ``g((e_i + e_j)(e_i + e_j)^T) = x_i + x_j + D_ij``.
    """
    total = 2.0 * float(np.sum(rows**2))
    for i in range(size):
        for j in range(i + 1, size):
            basis = np.zeros((size, 1))
            basis[[i, j], 0] = 1.0
            sample = ProjectionSample(size, basis, 1.0)
            both = _given_gradient(case, arrays, cotangent, case.op_name, sample, placement)
            total += float(np.sum((both - rows[i] - rows[j]) ** 2))
    return total


def rank_moment_coefficients(sketch: RankK, size: int) -> tuple[float, float]:
    """``(alpha, beta)`` with ``E[S_ij S_kl] = alpha (d_ik d_jl + d_il d_jk) + beta d_ij d_kl``.

    Gaussian ``S = G G^T / k``: Isserlis' theorem gives ``alpha = 1/k``, ``beta = 1``.
    Orthogonal ``S = (n/k) P`` with ``P`` a uniformly random rank-``k`` projection:
    ``E[P A P] = a A + b tr(A) I`` with ``a + b = k(k+2) / (n(n+2))`` (from the Beta
    law of ``P_11``) and ``a + b n = k/n`` (from the trace), so
    ``b = k(n-k) / (n(n-1)(n+2))``; then ``alpha = (n/k)^2 b``,
    ``beta = (n/k)^2 (a - b)``.
    """
    kept = min(size, math.ceil(sketch.keep_ratio * size))
    if sketch.kind == "gaussian":
        return 1.0 / kept, 1.0
    if kept == size:
        return 0.0, 1.0
    b = kept * (size - kept) / (size * (size - 1) * (size + 2))
    a = kept * (kept + 2) / (size * (size + 2)) - b
    scale = (size / kept) ** 2
    return scale * b, scale * (a - b)


@dataclass
class Theory:
    """The theoretical added variance, or None with the reason."""

    variance: float | None = None
    optimal: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def theoretical_variance(case, arrays, cotangent, sketch, recorder, exact) -> Theory:
    """The added variance ``E||g - exact||^2`` that ``sketch``'s formula predicts."""
    sizes = [size for size, _ in recorder.draws]
    if len(sizes) != 1:
        return Theory(note=f"no formula: the op drew {len(sizes)} sketches in one backward pass")
    size = sizes[0]
    if size > MAX_CONTRIBUTION_INDICES or size * exact.size > MAX_CONTRIBUTION_ELEMENTS:
        return Theory(note=f"skipped: {size} sketched indices are too many to take apart")
    placement = sketch.placement
    rows = contributions(case, arrays, cotangent, size, placement)
    if isinstance(sketch, RankK):
        if size > MAX_RANK_INDICES:
            return Theory(note=f"skipped: rank formula needs n(n+1)/2 runs, n = {size}")
        alpha, beta = rank_moment_coefficients(sketch, size)
        pair_sum = _pair_sum(case, arrays, cotangent, size, rows, placement)
        exact_norm = float(np.sum(exact**2))
        variance = alpha * pair_sum + (beta - 1.0) * exact_norm
        return Theory(
            variance,
            note="alpha sum_ij <C_ij, C_ij + C_ji> + (beta - 1) ||g||^2 (rotation invariance)",
        )
    if isinstance(sketch, Importance):
        weights = recorder.draws[0][1]
        probabilities = water_filling(weights, sketch.keep_ratio * size)
        squared = np.sum(rows**2, axis=1)
        if np.any((probabilities == 0) & (squared > 0)):
            return Theory(
                math.inf, sketch.added_variance(rows), "an index with p_i = 0 contributes"
            )
        kept = probabilities > 0
        variance = float(np.sum((1.0 / probabilities[kept] - 1.0) * squared[kept]))
        return Theory(
            variance,
            optimal=sketch.added_variance(rows),
            note="sum_i (1/p_i - 1) ||x_i||^2 with the op's p_i; optimal: p_i from ||x_i||",
        )
    if isinstance(sketch, Bernoulli | UniformK):
        formula = (
            "(1/p - 1) sum_i ||x_i||^2"
            if isinstance(sketch, Bernoulli)
            else "(n/k - 1) n/(n-1) sum_i ||x_i - mean x||^2"
        )
        return Theory(sketch.added_variance(rows), note=formula)
    return Theory(note=f"no formula for the {sketch.family} family")


# -- the comparison -------------------------------------------------------------


class _Moments:
    """Running per-element mean and sum of squared deviations (Welford)."""

    def __init__(self, size):
        self.count = 0
        self.mean = np.zeros(size)
        self.squares = np.zeros(size)

    def add(self, values):
        self.count += 1
        delta = values - self.mean
        self.mean += delta / self.count
        self.squares += delta * (values - self.mean)

    def stderr(self):
        return np.sqrt(self.squares / max(self.count - 1, 1) / self.count)


def bias_statistics(mean, stderr, exact, tolerance=1e-9) -> dict:
    """z-scores of ``mean - exact`` against the standard error, element by element.

    An element whose draws never varied has no standard error. If it differs
    from the exact value it is counted in ``bias_fixed_mismatches``: a bug when
    the sampled VJP is deterministic there (keep ratio 1), or an index kept with
    a probability too small to be drawn in ``draws`` tries (importance sketches
    give ``p_i`` proportional to tiny weights); the count says which to suspect.
    """
    error = np.abs(mean - exact)
    varying = stderr > tolerance * (1.0 + np.abs(exact))
    z = error[varying] / stderr[varying]
    fixed_mismatch = int(
        np.count_nonzero(error[~varying] > tolerance * (1.0 + np.abs(exact[~varying])))
    )
    return {
        "bias_z_max": float(z.max(initial=0.0)),
        "bias_z2_mean": float(np.mean(z**2)) if z.size else 0.0,
        "bias_elements": int(exact.size),
        "bias_varying_elements": int(z.size),
        "bias_fixed_mismatches": fixed_mismatch,
    }


def _resolve(op, sketch, placement):
    cases = available_ops()
    if op not in cases:
        raise ValueError(f"compare: unknown op {op!r}; known ops: {', '.join(sorted(cases))}")
    case = cases[op]
    chosen = parse(sketch) if isinstance(sketch, str) else sketch
    if chosen is None:
        raise ValueError("compare: needs a sketch (bernoulli:R, uniform:R, ...), not 'exact'")
    if not isinstance(chosen, Sketch):
        raise TypeError(f"compare: sketch must be a Sketch or a spec string, got {sketch!r}")
    chosen = copy.copy(chosen)
    if placement is not None:
        if placement not in PLACEMENTS[1:]:
            names = ", ".join(repr(name) for name in PLACEMENTS[1:])
            raise ValueError(f"compare: placement must be one of {names}, got {placement!r}")
        if not case.placements:
            raise ValueError(
                f"compare: op {op!r} has one placement (its leading axis); "
                f"placement {placement!r} applies to linear, matmul, conv2d and attention"
            )
        chosen.placement = placement
    return case, chosen


def compare_op(
    op: str,
    sketch,
    draws: int = 200,
    seed: int = 0,
    shape=None,
    placement: str | None = None,
    repeats: int = 5,
    dtype=np.float64,
    theory: bool = True,
) -> dict:
    """Compare ``op``'s exact and sampled VJPs on random inputs (see the module docstring).

    ``op`` is a name of :func:`available_ops`; ``sketch`` a
    :class:`~rbprop.sketch.Sketch` or a spec string; ``shape`` the op's sizes
    (their meaning is the case's ``shape_help``; small defaults); ``placement``
    (``"contracted"`` or ``"cotangent"``) applies to ops with two placements.
    Each of the ``draws`` sampled VJPs is a fresh forward and backward pass with
    its own sketch seed; seconds are medians over ``repeats`` backward passes.
    ``theory=False`` skips the theoretical variance (it costs ``n`` extra passes,
    ``n(n+1)/2`` for rank sketches). Returns a JSON-ready dict.
    """
    if draws < 2:
        raise ValueError(f"compare: needs at least 2 draws, got {draws}")
    case, chosen = _resolve(op, sketch, placement)
    arrays = make_inputs(case, shape, seed, dtype)
    probe, _ = forward(case, arrays)
    if not _target_ops(probe, case.op_name):
        raise ValueError(f"compare: {op!r} recorded no op named {case.op_name!r}")
    cotangent = np.random.default_rng([seed, 1]).standard_normal(probe.shape).astype(dtype)
    exact = gradient(case, arrays, cotangent)

    recorder = _Recorder(chosen)
    moments = _Moments(exact.size)
    squared_errors, flops = [], []
    for draw in range(draws):
        policy = {case.op_name: recorder if draw == 0 else chosen}
        output, leaves = forward(case, arrays, policy, seed=[seed, 2, draw])
        if draw == 0:
            placement_used = _target_ops(output, case.op_name)[0].placement or "leading axis"
        with CostMeter() as meter:
            output.backward(cotangent)
        values = _gradient_vector(case, arrays, leaves)
        moments.add(values)
        squared_errors.append(float(np.sum((values - exact) ** 2)))
        flops.append(meter.per_op[case.op_name].flops)

    measured = float(np.mean(squared_errors))
    measured_stderr = float(np.std(squared_errors, ddof=1) / math.sqrt(draws))
    predicted = (
        theoretical_variance(case, arrays, cotangent, chosen, recorder, exact)
        if theory
        else Theory(note="not computed")
    )
    exact_flops = backward_flops(case, arrays, cotangent)[0]
    policy = {case.op_name: chosen}
    exact_seconds = median_backward_seconds(case, arrays, cotangent, None, repeats, seed)
    sampled_seconds = median_backward_seconds(case, arrays, cotangent, policy, repeats, seed)
    exact_bytes = saved_bytes(case, arrays)
    sampled_bytes = saved_bytes(case, arrays, policy, seed=[seed, 3])

    report = {
        "op": op,
        "primitive": case.op_name,
        "sketch": chosen.spec(),
        "placement": placement_used,
        "draws": draws,
        "seed": seed,
        "dtype": np.dtype(dtype).name,
        "shapes": {name: list(np.shape(array)) for name, array in arrays.items()},
        "output_shape": list(probe.shape),
        "sketched_axis_length": recorder.draws[0][0] if recorder.draws else None,
    }
    report.update(bias_statistics(moments.mean, moments.stderr(), exact))
    report.update(
        {
            "exact_gradient_norm_squared": float(np.sum(exact**2)),
            "measured_variance": measured,
            "measured_variance_stderr": measured_stderr,
            "theoretical_variance": predicted.variance,
            "theoretical_variance_formula": predicted.note,
            "optimal_variance": predicted.optimal,
            "variance_ratio": _ratio(measured, predicted.variance),
            "variance_z": _variance_z(measured, measured_stderr, predicted.variance),
            "exact_flops": int(exact_flops),
            "sampled_flops": float(np.mean(flops)),
            "flops_ratio": _ratio(float(np.mean(flops)), exact_flops),
            "exact_seconds": exact_seconds,
            "sampled_seconds": sampled_seconds,
            "seconds_ratio": _ratio(sampled_seconds, exact_seconds),
            "repeats": repeats,
            "exact_saved_bytes": exact_bytes,
            "sampled_saved_bytes": sampled_bytes,
            "saved_bytes_ratio": _ratio(sampled_bytes, exact_bytes),
        }
    )
    return report


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or not denominator or math.isinf(denominator):
        return None
    return float(numerator) / float(denominator)


def _variance_z(measured, stderr, predicted):
    """``(measured - theoretical) / stderr``: how many standard errors apart."""
    if predicted is None or math.isinf(predicted):
        return None
    # Some sketches make ||g - exact||^2 the same in every draw (Bernoulli at p = 1/2:
    # (1/p - 1)^2 = 1); then only rounding separates measured from predicted.
    if math.isclose(measured, predicted, rel_tol=1e-9, abs_tol=1e-300):
        return 0.0
    return (measured - predicted) / stderr if stderr else math.inf


def _finite(value):
    """JSON has no infinities: write them as the strings "inf" and "-inf"."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# -- command line ---------------------------------------------------------------


def add_compare_arguments(parser) -> None:
    """Options of ``rbprop compare``."""
    parser.add_argument("--op", required=True, help="op name (e.g. linear, matmul, exp, softmax)")
    parser.add_argument("--sketch", required=True, help="bernoulli:R, uniform:R, rank:R, ...")
    parser.add_argument("--draws", type=int, default=200, help="sampled VJPs to draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and sketches")
    parser.add_argument(
        "--placement",
        choices=PLACEMENTS[1:],
        default=None,
        help="where the sketch sits for linear, matmul, conv2d, attention (default: the op's)",
    )
    parser.add_argument(
        "--shape", default=None, help="comma-separated sizes (their meaning depends on the op)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed backward passes each")
    parser.add_argument("--no-theory", action="store_true", help="skip the variance formula")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write JSON here")


def _parse_shape(text):
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"compare: --shape must be comma-separated integers, got {text!r}"
        ) from None


def format_report(report: dict) -> str:
    """The comparison as a readable two-column table."""

    def show(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value)

    rows = [
        ("op", f"{report['op']} (primitive {report['primitive']})"),
        ("sketch", f"{report['sketch']} on {report['placement']}"),
        ("inputs", ", ".join(f"{k} {tuple(v)}" for k, v in report["shapes"].items())),
        ("sketched axis length", report["sketched_axis_length"]),
        ("draws", report["draws"]),
        ("bias: max |z| over elements", report["bias_z_max"]),
        ("bias: mean z^2 (about 1)", report["bias_z2_mean"]),
        ("elements (varying)", f"{report['bias_elements']} ({report['bias_varying_elements']})"),
        ("never varied, differ from exact", report["bias_fixed_mismatches"]),
        ("||exact||^2", report["exact_gradient_norm_squared"]),
        (
            "variance measured",
            f"{show(report['measured_variance'])} +- {show(report['measured_variance_stderr'])}",
        ),
        ("variance theoretical", report["theoretical_variance"]),
        ("  formula", report["theoretical_variance_formula"] or "n/a"),
        ("variance optimal (importance)", report["optimal_variance"]),
        ("measured / theoretical", report["variance_ratio"]),
        ("FLOPs exact / sampled", f"{report['exact_flops']} / {show(report['sampled_flops'])}"),
        ("FLOPs ratio", report["flops_ratio"]),
        (
            "backward seconds exact / sampled",
            f"{show(report['exact_seconds'])} / {show(report['sampled_seconds'])}",
        ),
        ("seconds ratio", report["seconds_ratio"]),
        (
            "saved bytes exact / sampled",
            f"{report['exact_saved_bytes']} / {report['sampled_saved_bytes']}",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {show(value)}" for label, value in rows)


def run_compare(args) -> int:
    """``rbprop compare``: print the table and write the JSON if asked."""
    report = compare_op(
        args.op,
        args.sketch,
        draws=args.draws,
        seed=args.seed,
        shape=_parse_shape(args.shape),
        placement=args.placement,
        repeats=args.repeats,
        theory=not args.no_theory,
    )
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(_finite(report), handle, indent=2, allow_nan=False)
            handle.write("\n")
    return 0
