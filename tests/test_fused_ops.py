"""Ops that run on compiled kernels: the same results as on the numpy twins; their fast paths.

conv2d, pooling, layer and batch norm, attention and cross-entropy call the
kernels of :mod:`rbprop.kernels`; ``RBPROP_DISABLE_NUMBA=1`` sends the same calls
to the numpy twins (the path cupy arrays take). Forward values and gradients,
exact and sampled with a fixed seed, must agree between the two in float32 and
float64. The fast paths get their own checks: the pointwise (1x1) convolution,
layer norm over several axes under a row-sampled VJP (its saved statistics must
follow the kept rows), batch norm when only some inputs need a gradient, and
the batch-norm kernels against their twins.
"""

import math
import os

import numpy as np
import pytest
from test_nn_ops import assert_unbiased, conv2d_reference, normal, with_placement

import rbprop as rb
from rbprop import functional as F
from rbprop.check import gradcheck
from rbprop.kernels import batchnorm, conv, dispatch, gelu

TOLERANCE = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-11}


def _attention_mask():
    mask = np.ones((4, 5), dtype=bool)
    mask[1] = False  # a query that sees no key: zero output and gradient
    mask[2, 3:] = False
    return mask


# (label, function, input shapes); every input needs a gradient but the stem's image.
CASES = [
    ("conv2d", lambda x, w, b: F.conv2d(x, w, b, 2, 1), [(2, 3, 7, 6), (4, 3, 3, 2), (4,)]),
    (
        "conv2d_pointwise",
        lambda x, w, b: F.conv2d(x, w, b),
        [(2, 5, 4, 3), (3, 5, 1, 1), (3,)],
    ),
    ("conv2d_stem", lambda x, w: F.conv2d(x, w, stride=2), [(3, 1, 9, 9), (4, 1, 3, 3)]),
    ("max_pool2d", lambda x: F.max_pool2d(x, 3, 2, 1), [(2, 3, 7, 6)]),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, (2, 3), (2, 1), (1, 0)), [(2, 3, 7, 6)]),
    (
        "layer_norm",
        lambda x, w, b: F.layer_norm(x, (4, 5), w, b),
        [(3, 4, 5), (4, 5), (4, 5)],
    ),
    ("layer_norm_plain", lambda x: F.layer_norm(x, 8), [(6, 8)]),
    (
        "batch_norm_train",
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
        [(4, 3, 2, 3), (3,), (3,)],
    ),
    (
        "batch_norm_eval",
        lambda x, w, b: F.batch_norm(x, np.full(3, 0.2), np.full(3, 1.5), w, b),
        [(4, 3, 5), (3,), (3,)],
    ),
    (
        "attention_masked",
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_attention_mask()),
        [(2, 4, 3), (2, 5, 3), (2, 5, 2)],
    ),
    (
        "attention_causal",
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        [(2, 2, 5, 3), (2, 2, 5, 3), (2, 2, 5, 4)],
    ),
    (
        "cross_entropy",
        lambda x: F.cross_entropy(x, np.array([0, 3, 1, 1, 4, 2]), label_smoothing=0.1),
        [(6, 5)],
    ),
]
SAMPLED = [
    ("conv2d", "bernoulli:0.5:contracted"),
    ("conv2d", "importance:0.5:cotangent"),
    ("conv2d_pointwise", "bernoulli:0.5:contracted"),
    ("conv2d_pointwise", "uniform:0.5:cotangent"),
    ("conv2d_stem", "uniform:0.5:contracted"),
    ("layer_norm", "bernoulli:0.5"),
    ("layer_norm", "importance:0.5"),
    ("batch_norm_train", "bernoulli:0.5"),
    ("batch_norm_eval", "uniform:0.5"),
    ("attention_masked", "bernoulli:0.5:cotangent"),
    ("attention_causal", "uniform:0.5:contracted"),
    ("max_pool2d", "bernoulli:0.5"),
]
BY_LABEL = {case[0]: case for case in CASES}


def _sketch(spec):
    if spec is None:
        return None
    family, ratio, *placement = spec.split(":")
    return with_placement(f"{family}:{ratio}", placement[0] if placement else None)


def _run(label, dtype, spec, grad_flags=None):
    """Output and gradients of one case, on inputs drawn from a fixed seed."""
    _, fn, shapes = BY_LABEL[label]
    rng = np.random.default_rng(5)
    flags = grad_flags or [not (label == "conv2d_stem" and i == 0) for i in range(len(shapes))]
    inputs = [
        rb.tensor(rng.standard_normal(shape).astype(dtype), requires_grad=flag)
        for shape, flag in zip(shapes, flags, strict=True)
    ]
    sketch = _sketch(spec)
    if sketch is None:
        output = fn(*inputs)
    else:
        with rb.sampled(sketch, seed=3):
            output = fn(*inputs)
    cotangent = rng.standard_normal(output.shape).astype(dtype)
    output.backward(cotangent if output.shape else None)
    grads = [t.grad.numpy() for t in inputs if t.requires_grad and t.grad is not None]
    return [output.numpy()] + grads


def _assert_agree(compiled, twin, dtype):
    assert len(compiled) == len(twin)
    tolerance = TOLERANCE[np.dtype(dtype)]
    for actual, expected in zip(compiled, twin, strict=True):
        assert actual.dtype == expected.dtype == dtype
        scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
        np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label", [case[0] for case in CASES])
def test_exact_ops_agree_with_the_numpy_twins(monkeypatch, label, dtype):
    compiled = _run(label, dtype, None)
    monkeypatch.setenv("RBPROP_DISABLE_NUMBA", "1")
    _assert_agree(compiled, _run(label, dtype, None), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("label,spec", SAMPLED)
def test_sampled_ops_agree_with_the_numpy_twins(monkeypatch, label, spec, dtype):
    compiled = _run(label, dtype, spec)
    monkeypatch.setenv("RBPROP_DISABLE_NUMBA", "1")
    _assert_agree(compiled, _run(label, dtype, spec), dtype)


def test_pointwise_convolution_matches_the_reference_and_gradcheck(rng):
    x, weight, bias = normal(rng, 3, 4, 5, 2), normal(rng, 6, 4, 1, 1), normal(rng, 6)
    expected = conv2d_reference(x.numpy(), weight.numpy(), bias.numpy(), (1, 1), (0, 0))
    np.testing.assert_allclose(F.conv2d(x, weight, bias).numpy(), expected, rtol=1e-12)
    assert gradcheck(lambda a, w, b: F.conv2d(a, w, b), [x, weight, bias])
    assert gradcheck(lambda a, w: F.conv2d(a, w), [x, weight])


@pytest.mark.parametrize("spec", ["bernoulli:0.5", "importance:0.5"])
@pytest.mark.parametrize("placement", ["contracted", "cotangent"])
def test_pointwise_convolution_sampled_vjp_is_unbiased(spec, placement):
    rng = np.random.default_rng(1)
    inputs = [normal(rng, 2, 3, 3, 2), normal(rng, 4, 3, 1, 1), normal(rng, 4)]
    fn = lambda x, w, b: F.conv2d(x, w, b)  # noqa: E731
    assert_unbiased(fn, inputs, with_placement(spec, placement), draws=300, seed=2)


@pytest.mark.parametrize("spec", ["bernoulli:0.5", "importance:0.5"])
def test_layer_norm_over_two_axes_sampled_vjp_is_unbiased(spec):
    # The saved mean and rstd have shape (5, 1, 1): the kept-rows evaluation
    # must restrict them together with x, or the VJP reads other rows' statistics.
    rng = np.random.default_rng(1)
    inputs = [normal(rng, 5, 2, 3), normal(rng, 2, 3), normal(rng, 2, 3)]
    fn = lambda x, w, b: F.layer_norm(x, (2, 3), w, b)  # noqa: E731
    assert_unbiased(fn, inputs, rb.sketch.parse(spec), draws=300, seed=2)


def test_norms_with_only_some_gradients(rng):
    # Only the parameters need a gradient: the kernels' dx is skipped or dropped.
    x = rb.tensor(rng.standard_normal((4, 3, 5)))
    weight, bias = normal(rng, 3), normal(rng, 3)
    for training in (True, False):

        def fn(w, b, training=training):
            return F.batch_norm(x, np.zeros(3), np.ones(3), w, b, training=training)

        assert gradcheck(fn, [weight, bias])
        assert gradcheck(
            lambda b, training=training: F.batch_norm(
                x, np.zeros(3), np.ones(3), None, b, training=training
            ),
            [bias],
        )
    norm_weight, norm_bias = normal(rng, 5), normal(rng, 5)
    assert gradcheck(lambda w, b: F.layer_norm(x, 5, w, b), [norm_weight, norm_bias])
    assert gradcheck(lambda b: F.layer_norm(x, 5, None, b), [norm_bias])


# -- the batch-norm kernels ------------------------------------------------------------------


BATCH_NORM_SHAPES = [(4, 3, 5), (1, 2, 7), (7, 1, 13), (3, 4, 1), (2, 5, 3)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", BATCH_NORM_SHAPES)
def test_batch_norm_kernels_match_twins(rng, shape, dtype):
    x = (3 * rng.standard_normal(shape) + 1).astype(dtype)
    cotangent = rng.standard_normal(shape).astype(dtype)
    weight, bias = (rng.standard_normal(shape[1]).astype(dtype) for _ in range(2))
    tolerance = TOLERANCE[np.dtype(dtype)]

    mean, variance = batchnorm.batch_norm_statistics(x)
    expected_mean, expected_variance = batchnorm.batch_norm_statistics_reference(x)
    np.testing.assert_allclose(mean, expected_mean, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(variance, expected_variance, rtol=tolerance, atol=tolerance)

    mean = mean.astype(dtype)
    rstd = (1 / np.sqrt(variance + 1e-5)).astype(dtype)
    _assert_agree(
        [batchnorm.batch_norm_normalize(x, mean, rstd, weight, bias)],
        [batchnorm.batch_norm_normalize_reference(x, mean, rstd, weight, bias)],
        dtype,
    )
    for centring in (True, False):
        for affine in (weight, None):
            arguments = (cotangent, x, mean, rstd, affine, centring)
            compiled = batchnorm.batch_norm_backward(*arguments)
            _assert_agree(compiled, batchnorm.batch_norm_backward_reference(*arguments), dtype)
    only_dx = (cotangent, None, None, rstd, weight, False)
    compiled = batchnorm.batch_norm_backward(*only_dx)
    assert compiled[1:] == (None, None)
    _assert_agree(compiled[:1], batchnorm.batch_norm_backward_reference(*only_dx)[:1], dtype)
    assert batchnorm.batch_norm_backward(*arguments, input_grad=False)[0] is None


def test_batch_norm_kernels_match_twins_on_every_thread(rng, monkeypatch):
    # Small inputs stay on one thread; force the parallel loops (blocks of images).
    monkeypatch.setattr(dispatch, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setenv("RBPROP_KERNEL_THREADS", "2")
    x, cotangent = rng.standard_normal((9, 3, 4)), rng.standard_normal((9, 3, 4))
    statistics = batchnorm.batch_norm_statistics(x)
    for actual, expected in zip(
        statistics, batchnorm.batch_norm_statistics_reference(x), strict=True
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-12)
    mean, rstd = statistics[0], 1 / np.sqrt(statistics[1] + 1e-5)
    arguments = (cotangent, x, mean, rstd, rng.standard_normal(3), True)
    _assert_agree(
        batchnorm.batch_norm_backward(*arguments),
        batchnorm.batch_norm_backward_reference(*arguments),
        np.float64,
    )


def test_batch_norm_backward_is_the_vjp(rng):
    # Training mode: y = normalize(x, statistics(x)); the kernel's dx and dweight are
    # <v, dy> along random directions of x and of the weight.
    x, cotangent = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    weight, bias = rng.standard_normal(4), rng.standard_normal(4)

    def forward(x, weight):
        mean, variance = batchnorm.batch_norm_statistics(x)
        return batchnorm.batch_norm_normalize(x, mean, 1 / np.sqrt(variance + 1e-5), weight, bias)

    mean, variance = batchnorm.batch_norm_statistics(x)
    dx, dweight, dbias = batchnorm.batch_norm_backward(
        cotangent, x, mean, 1 / np.sqrt(variance + 1e-5), weight, centring=True
    )
    eps = 1e-6
    for direction_x, direction_w in (
        (rng.standard_normal(x.shape), 0 * weight),
        (0 * x, rng.standard_normal(4)),
    ):
        plus = forward(x + eps * direction_x, weight + eps * direction_w)
        minus = forward(x - eps * direction_x, weight - eps * direction_w)
        numeric = float(np.vdot(cotangent, (plus - minus) / (2 * eps)))
        analytic = float(np.vdot(dx, direction_x) + np.vdot(dweight, direction_w))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (numeric, analytic)
    np.testing.assert_allclose(dbias, cotangent.sum(axis=(0, 2)), rtol=1e-12)


def test_batch_norm_kernels_reject_bad_shapes(rng):
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(rb.ShapeError, match=r"batch_norm_statistics: input must be \(N, C, S\)"):
        batchnorm.batch_norm_statistics(x[0])
    with pytest.raises(rb.ShapeError, match=r"batch_norm_normalize: weight of shape \(2,\)"):
        batchnorm.batch_norm_normalize(x, np.zeros(3), np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="batch_norm_backward: the batch-statistics gradient"):
        batchnorm.batch_norm_backward(x, None, None, np.ones(3), None, centring=True)


# -- the GELU kernels ------------------------------------------------------------------------


def test_rational_erf_is_within_float32_rounding():
    grid = np.linspace(-6.0, 6.0, 48_001)
    exact = np.array([math.erf(value) for value in grid])
    approximate = np.array([gelu._erf_rational(value) for value in grid])
    assert np.abs(approximate - exact).max() <= 3e-8  # half a float32 ulp of 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (0, 4)])
def test_gelu_kernels_match_twins(rng, shape, dtype):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    cotangent = rng.standard_normal(shape).astype(dtype)
    _assert_agree([gelu.gelu(x)], [gelu.gelu_reference(x)], dtype)
    _assert_agree(
        [gelu.gelu_backward(cotangent, x)], [gelu.gelu_backward_reference(cotangent, x)], dtype
    )


def test_float32_gelu_is_as_accurate_as_numpy():
    # Largest errors against float64: 4.8e-7 (value) and 1.0e-7 (derivative); numpy's
    # float32 formulas give 6.8e-7 and 1.6e-7.
    x = np.linspace(-12, 12, 20_001)
    exact_phi = 0.5 * (1 + np.array([math.erf(value / math.sqrt(2)) for value in x]))
    exact_derivative = exact_phi + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    single = x.astype(np.float32)
    assert np.abs(gelu.gelu(single) - x * exact_phi).max() <= 1e-6
    assert (
        np.abs(gelu.gelu_backward(np.ones_like(single), single) - exact_derivative).max() <= 1e-6
    )
    edges = gelu.gelu(np.array([-50.0, np.inf, np.nan], np.float32))
    assert edges[0] == 0.0 and edges[1] == np.inf and np.isnan(edges[2])


def test_gelu_backward_is_the_vjp(rng):
    x, cotangent, direction = (rng.standard_normal(40) for _ in range(3))
    eps = 1e-6
    numeric = np.vdot(cotangent, (gelu.gelu(x + eps * direction) - gelu.gelu(x - eps * direction)))
    analytic = np.vdot(gelu.gelu_backward(cotangent, x), direction)
    assert abs(numeric / (2 * eps) - analytic) <= 1e-7 * max(1.0, abs(analytic))


# -- the single-tap scatter and the threading default ------------------------------------------


@pytest.mark.parametrize("stride", [1, 2, (2, 3)])
def test_col2im_rows_of_a_single_tap_matches_the_twin(rng, stride):
    shape = (3, 4, 7, 8)
    out_h, out_w = conv.conv_output_size(shape, 1, 1, stride)
    rows = np.flatnonzero(rng.random(shape[0] * out_h * out_w) < 0.4)
    cols = rng.standard_normal((rows.size, shape[1]))
    expected = conv.col2im_rows_reference(cols, rows, shape, 1, 1, stride)
    np.testing.assert_array_equal(conv.col2im_rows(cols, rows, shape, 1, 1, stride), expected)
    shuffled = rng.permutation(rows.size)  # not increasing: the row kernel instead
    np.testing.assert_allclose(
        conv.col2im_rows(cols[shuffled], rows[shuffled], shape, 1, 1, stride), expected
    )


def test_kernels_run_on_one_thread_unless_asked(monkeypatch):
    import numba

    assert os.environ.get("OMP_WAIT_POLICY")  # set (to PASSIVE unless given) on import
    monkeypatch.delenv("RBPROP_KERNEL_THREADS", raising=False)
    assert dispatch.kernel_threads() == 1
    monkeypatch.setenv("RBPROP_KERNEL_THREADS", "64")
    assert dispatch.kernel_threads() == numba.config.NUMBA_NUM_THREADS
    before = numba.get_num_threads()
    monkeypatch.setattr(dispatch, "PARALLEL_MIN_WORK", 0)
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    batchnorm.batch_norm_statistics(x)
    assert numba.get_num_threads() == before  # restored after the call
    for bad in ("0", "two"):
        monkeypatch.setenv("RBPROP_KERNEL_THREADS", bad)
        with pytest.raises(ValueError, match="RBPROP_KERNEL_THREADS must be a positive"):
            dispatch.kernel_threads()
