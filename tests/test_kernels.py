"""Every numba kernel against its numpy twin, on random inputs of awkward sizes.

Agreement is checked in float32 (rtol 1e-5) and float64 (rtol 1e-12), with an
absolute tolerance of the same size relative to the largest entry, since sums
taken in a different order differ by rounding, most visibly where terms cancel.
Beyond agreement: col2im is the adjoint of im2col, scatter-add the adjoint of
gather, the backward kernels are the VJPs of the forward ones (central
differences along a random direction, float64), and water-filling's
probabilities have the properties that define them.
"""

import numpy as np
import pytest

from rbprop.backend import gpu_available
from rbprop.kernels import conv, dispatch, gather, importance, layernorm, pool, softmax
from rbprop.kernels.dispatch import use_numba
from rbprop.primitive import ShapeError
from rbprop.sketch import water_filling as sketch_water_filling

DTYPES = [np.float32, np.float64]
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_close(actual, expected):
    """Same dtype and shape, and equal within the dtype's tolerance."""
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.dtype.kind not in "fc":
        np.testing.assert_array_equal(actual, expected)
        return
    rtol = RTOL[np.dtype(expected.dtype)]
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def random(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def directional_check(forward, backward, x, cotangent, rng, eps=1e-6):
    """``<v, (f(x + eps d) - f(x - eps d)) / (2 eps)> == <J^T v, d>`` for a random ``d``."""
    direction = rng.standard_normal(x.shape)
    difference = (forward(x + eps * direction) - forward(x - eps * direction)) / (2 * eps)
    expected = float(np.vdot(cotangent, difference))
    actual = float(np.vdot(backward(cotangent), direction))
    assert abs(actual - expected) <= 1e-6 * max(1.0, abs(expected)), (actual, expected)


# ----------------------------------------------------------------------------- convolution

# (input shape NCHW, kh, kw, stride, padding): 1x1 images, kernel = input size,
# strides 2 and 3, padding, non-square kernels and images, C = 1, N = 1.
CONV_CASES = [
    ((2, 3, 7, 5), 3, 3, 1, 1),
    ((1, 1, 1, 1), 1, 1, 1, 0),
    ((2, 2, 1, 1), 3, 3, 1, 1),
    ((1, 4, 5, 6), 5, 6, 1, 0),
    ((3, 1, 8, 9), 3, 2, 2, 0),
    ((2, 2, 10, 7), 4, 3, 3, (2, 1)),
    ((1, 3, 6, 11), 2, 5, (2, 3), (0, 2)),
]
CONV_IDS = [f"{shape}-k{kh}x{kw}-s{s}-p{p}" for shape, kh, kw, s, p in CONV_CASES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "kh", "kw", "stride", "padding"), CONV_CASES, ids=CONV_IDS)
def test_im2col_and_col2im_match_twins(rng, dtype, shape, kh, kw, stride, padding):
    x = random(rng, shape, dtype)
    cols = conv.im2col(x, kh, kw, stride, padding)
    assert_close(cols, conv.im2col_reference(x, kh, kw, stride, padding))

    cotangent = random(rng, cols.shape, dtype)
    image = conv.col2im(cotangent, shape, kh, kw, stride, padding)
    assert_close(image, conv.col2im_reference(cotangent, shape, kh, kw, stride, padding))


@pytest.mark.parametrize(("shape", "kh", "kw", "stride", "padding"), CONV_CASES, ids=CONV_IDS)
def test_col2im_is_the_adjoint_of_im2col(rng, shape, kh, kw, stride, padding):
    x = random(rng, shape, np.float64)
    cols = conv.im2col(x, kh, kw, stride, padding)
    cotangent = random(rng, cols.shape, np.float64)
    for lower, scatter in (
        (conv.im2col, conv.col2im),
        (conv.im2col_reference, conv.col2im_reference),
    ):
        left = np.vdot(lower(x, kh, kw, stride, padding), cotangent)
        right = np.vdot(x, scatter(cotangent, shape, kh, kw, stride, padding))
        assert abs(left - right) <= 1e-12 * max(1.0, abs(left))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("shape", "kh", "kw", "stride", "padding"), CONV_CASES, ids=CONV_IDS)
def test_row_lowering_matches_the_full_one(rng, dtype, keep, shape, kh, kw, stride, padding):
    x = random(rng, shape, dtype)
    full = conv.im2col_reference(x, kh, kw, stride, padding)
    rows = np.sort(rng.choice(full.shape[0], size=int(keep * full.shape[0]), replace=False))

    kept = conv.im2col_rows(x, rows, kh, kw, stride, padding)
    assert_close(kept, full[rows])
    assert_close(conv.im2col_rows_reference(x, rows, kh, kw, stride, padding), full[rows])

    # col2im_rows is col2im of a cols matrix that is zero outside the kept rows.
    compact = random(rng, (rows.size, full.shape[1]), dtype)
    zero_filled = np.zeros_like(full)
    zero_filled[rows] = compact
    expected = conv.col2im_reference(zero_filled, shape, kh, kw, stride, padding)
    assert_close(conv.col2im_rows(compact, rows, shape, kh, kw, stride, padding), expected)
    twin = conv.col2im_rows_reference(compact, rows, shape, kh, kw, stride, padding)
    assert_close(twin, expected)

    # The kernel sorts rows it is given out of order (kept indices need not be sorted).
    shuffled = rng.permutation(rows.size)
    scattered = conv.col2im_rows(compact[shuffled], rows[shuffled], shape, kh, kw, stride, padding)
    assert_close(scattered, expected)


def test_conv_kernels_reject_bad_arguments(rng):
    x = random(rng, (1, 2, 4, 4), np.float32)
    with pytest.raises(ShapeError, match="im2col: kernel"):
        conv.im2col(x, 5, 5, 1, 0)
    with pytest.raises(ShapeError, match="NCHW"):
        conv.im2col(x[0], 3, 3)
    with pytest.raises(IndexError, match="im2col_rows: rows must lie in"):
        conv.im2col_rows(x, np.array([0, 16]), 3, 3, 1, 1)
    with pytest.raises(ShapeError, match="col2im: cols must have shape"):
        conv.col2im(np.zeros((3, 18), np.float32), x.shape, 3, 3, 1, 1)
    with pytest.raises(TypeError, match="stride"):
        conv.im2col(x, 3, 3, "2")


# ----------------------------------------------------------------------------- gather / scatter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (1, 1), (6, 5), (3, 1, 4), (2, 5, 3, 2)])
def test_gather_and_scatter_match_twins(rng, dtype, shape):
    x = random(rng, shape, dtype)
    for axis in range(len(shape)):
        size = shape[axis]
        for kept in sorted({0, 1, size // 2, size}):
            indices = rng.choice(size, size=kept, replace=False)
            scales = rng.uniform(0.5, 4.0, size=kept)
            for scale in (scales, None):
                gathered = gather.gather_scaled(x, indices, scale, axis)
                assert_close(gathered, gather.gather_scaled_reference(x, indices, scale, axis))

            # Repeated indices must accumulate, not overwrite.
            repeated = np.concatenate([indices, indices[: (kept + 1) // 2]])
            compact = random(rng, shape[:axis] + (repeated.size,) + shape[axis + 1 :], dtype)
            scattered = gather.scatter_add(compact, repeated, size, axis)
            assert_close(scattered, gather.scatter_add_reference(compact, repeated, size, axis))


def test_scatter_add_is_the_adjoint_of_gather(rng):
    x = random(rng, (4, 9, 3), np.float64)
    indices = np.array([7, 1, 1, 4])
    compact = random(rng, (4, 4, 3), np.float64)
    left = np.vdot(gather.gather_scaled(x, indices, None, axis=1), compact)
    right = np.vdot(x, gather.scatter_add(compact, indices, 9, axis=1))
    assert abs(left - right) <= 1e-12 * max(1.0, abs(left))


@pytest.mark.parametrize("size", [0, 1, 5, 16383, 16384, 16385, 100_003])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_compact_mask_matches_flatnonzero(rng, size, density):
    mask = rng.random(size) < density
    indices = gather.compact_mask(mask)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, gather.compact_mask_reference(mask))
    np.testing.assert_array_equal(indices, np.flatnonzero(mask))


def test_compact_mask_flattens_and_wants_booleans(rng):
    mask = rng.random((3, 4, 5)) < 0.5
    np.testing.assert_array_equal(gather.compact_mask(mask), np.flatnonzero(mask))
    with pytest.raises(TypeError, match="compact_mask: mask must be boolean"):
        gather.compact_mask(np.ones(3))


def test_gather_kernels_reject_bad_arguments(rng):
    x = random(rng, (4, 3), np.float32)
    with pytest.raises(IndexError, match="gather_scaled: indices must lie in"):
        gather.gather_scaled(x, [0, 4])
    with pytest.raises(IndexError, match="gather_scaled"):
        gather.gather_scaled(x, [-1])
    with pytest.raises(ShapeError, match="2 scales for 1 indices"):
        gather.gather_scaled(x, [1], [1.0, 2.0])
    with pytest.raises(ShapeError, match="scatter_add: 2 indices for 4 compact slices"):
        gather.scatter_add(x, [0, 1], 5)


# ----------------------------------------------------------------------------- water-filling


def _weights(rng, kind, size):
    if kind == "exponential":
        return rng.exponential(size=size)
    if kind == "heavy-tailed":
        return rng.lognormal(0.0, 3.0, size=size)
    if kind == "sparse":
        return rng.exponential(size=size) * (rng.random(size) < 0.2)
    # Halving weights cap one index per pass: the kernel's sorting fallback.
    return 0.5 ** np.arange(size, dtype=np.float64)


@pytest.mark.parametrize("kind", ["exponential", "heavy-tailed", "sparse", "geometric"])
@pytest.mark.parametrize("size", [1, 2, 7, 1000, 20_001])
def test_water_filling_matches_twin_and_sketch(rng, kind, size):
    weights = _weights(rng, kind, size)
    for budget in (0.5, 1, 0.1 * size, 0.25 * size, 0.9 * size):
        with np.errstate(over="ignore"):  # tiny tails overflow the level: they never fit
            expected = sketch_water_filling(weights, budget)
        for probabilities in (
            importance.water_filling(weights, budget),
            importance.water_filling(weights, budget, max_passes=0),
            importance.water_filling_reference(weights, budget),
        ):
            assert_close(probabilities, expected)

        single = weights.astype(np.float32)
        assert_close(
            importance.water_filling(single, budget),
            importance.water_filling_reference(single, budget),
        )


@pytest.mark.parametrize("kind", ["exponential", "heavy-tailed", "sparse"])
def test_water_filling_properties(rng, kind):
    weights = _weights(rng, kind, 5000)
    positive = weights > 0
    for budget in (10.0, 500.0, 900.5, 1250.5):
        probabilities = importance.water_filling(weights, budget)
        assert np.all((probabilities >= 0) & (probabilities <= 1))
        assert np.all(probabilities[~positive] == 0)
        if positive.sum() <= budget:
            assert np.all(probabilities[positive] == 1)
            continue
        assert abs(probabilities.sum() - budget) <= 1e-9 * budget

        # Below the cap, p is one common multiple c of the weight; capped ones
        # outweigh every uncapped one.
        uncapped = positive & (probabilities < 1)
        ratios = probabilities[uncapped] / weights[uncapped]
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)
        capped = probabilities == 1
        if capped.any():
            assert weights[capped].min() >= weights[uncapped].max()
            assert ratios[0] * weights[capped].min() >= 1 - 1e-12

    # At most `budget` positive weights: every one of them is kept.
    sparse = np.array([0.0, 3.0, 0.0, 1e-9])
    np.testing.assert_array_equal(importance.water_filling(sparse, 2.0), [0, 1, 0, 1])


def test_water_filling_rejects_bad_weights():
    for weights in ([1.0, -1.0], [np.nan, 1.0], [np.inf, 1.0]):
        for kernel in (importance.water_filling, importance.water_filling_reference):
            with pytest.raises(ValueError, match="finite and non-negative"):
                kernel(np.array(weights), 1.0)
    with pytest.raises(ValueError, match="budget must be positive"):
        importance.water_filling(np.ones(3), 0.0)


# ----------------------------------------------------------------------------- softmax

ROW_SHAPES = [(1, 1), (3, 7), (2, 3, 5), (1, 257), (64, 10), (5,), (0, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_softmax_kernels_match_twins(rng, dtype, shape):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    cotangent = random(rng, shape, dtype)

    probabilities = softmax.softmax(x)
    assert_close(probabilities, softmax.softmax_reference(x))
    log_probabilities = softmax.log_softmax(x)
    assert_close(log_probabilities, softmax.log_softmax_reference(x))
    if x.size:
        assert_close(probabilities.sum(axis=-1), np.ones(shape[:-1], dtype))

    assert_close(
        softmax.softmax_backward(probabilities, cotangent),
        softmax.softmax_backward_reference(probabilities, cotangent),
    )
    assert_close(
        softmax.log_softmax_backward(log_probabilities, cotangent),
        softmax.log_softmax_backward_reference(log_probabilities, cotangent),
    )


def test_softmax_survives_large_logits():
    x = np.array([[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4]], dtype=np.float32)
    assert np.all(np.isfinite(softmax.softmax(x)))
    assert_close(softmax.log_softmax(x), softmax.log_softmax_reference(x))


def test_softmax_backwards_are_vjps(rng):
    x = rng.standard_normal((4, 6))
    cotangent = rng.standard_normal((4, 6))
    directional_check(
        softmax.softmax,
        lambda v: softmax.softmax_backward(softmax.softmax(x), v),
        x,
        cotangent,
        rng,
    )
    directional_check(
        softmax.log_softmax,
        lambda v: softmax.log_softmax_backward(softmax.log_softmax(x), v),
        x,
        cotangent,
        rng,
    )


# ----------------------------------------------------------------------------- layer norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 3, 5), (0, 4), (300, 64), (6,)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_kernels_match_twins(rng, dtype, shape, affine):
    x = (2 * rng.standard_normal(shape) + 1).astype(dtype)
    cotangent = random(rng, shape, dtype)
    weight = random(rng, shape[-1:], dtype) if affine else None
    bias = random(rng, shape[-1:], dtype) if affine else None

    outputs = layernorm.layer_norm_forward(x, weight, bias, 1e-5)
    expected = layernorm.layer_norm_forward_reference(x, weight, bias, 1e-5)
    for actual, wanted in zip(outputs, expected, strict=True):
        assert_close(actual, wanted)

    _, mean, rstd = expected
    grads = layernorm.layer_norm_backward(cotangent, x, weight, mean, rstd)
    wanted_grads = layernorm.layer_norm_backward_reference(cotangent, x, weight, mean, rstd)
    for actual, wanted in zip(grads, wanted_grads, strict=True):
        assert_close(actual, wanted)


def test_layer_norm_backward_is_the_vjp(rng):
    x = rng.standard_normal((5, 8))
    weight, bias = rng.standard_normal(8), rng.standard_normal(8)
    cotangent = rng.standard_normal((5, 8))
    _, mean, rstd = layernorm.layer_norm_forward(x, weight, bias)
    dx, dweight, dbias = layernorm.layer_norm_backward(cotangent, x, weight, mean, rstd)

    directional_check(
        lambda value: layernorm.layer_norm_forward(value, weight, bias)[0],
        lambda v: dx,
        x,
        cotangent,
        rng,
    )
    directional_check(
        lambda value: layernorm.layer_norm_forward(x, value, bias)[0],
        lambda v: dweight,
        weight,
        cotangent,
        rng,
    )
    directional_check(
        lambda value: layernorm.layer_norm_forward(x, weight, value)[0],
        lambda v: dbias,
        bias,
        cotangent,
        rng,
    )


def test_layer_norm_rejects_mismatched_parameters(rng):
    x = random(rng, (3, 4), np.float32)
    with pytest.raises(ShapeError, match="layer_norm: weight of shape"):
        layernorm.layer_norm_forward(x, np.ones(5, np.float32))


# ----------------------------------------------------------------------------- pooling

# (input shape, kernel_size, stride, padding): stride None means the kernel size.
POOL_CASES = [
    ((2, 3, 7, 5), 3, 2, 1),
    ((1, 1, 1, 1), 1, None, 0),
    ((2, 2, 4, 6), (4, 6), 1, 0),
    ((1, 2, 5, 5), (3, 2), (3, 2), (1, 1)),
    ((2, 1, 6, 6), 2, None, 1),
    ((1, 3, 9, 8), 3, 3, 0),
]
POOL_IDS = [f"{shape}-k{k}-s{s}-p{p}" for shape, k, s, p in POOL_CASES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "kernel", "stride", "padding"), POOL_CASES, ids=POOL_IDS)
def test_pool_kernels_match_twins(rng, dtype, shape, kernel, stride, padding):
    x = random(rng, shape, dtype)
    geometry = (kernel, stride, padding)
    pooled, positions = pool.max_pool2d(x, *geometry)
    wanted, wanted_positions = pool.max_pool2d_reference(x, *geometry)
    assert_close(pooled, wanted)
    assert_close(positions, wanted_positions)

    cotangent = random(rng, pooled.shape, dtype)
    assert_close(
        pool.max_pool2d_backward(cotangent, positions, shape, *geometry),
        pool.max_pool2d_backward_reference(cotangent, positions, shape, *geometry),
    )
    for include in (True, False):
        arguments = (*geometry, include)
        assert_close(pool.avg_pool2d(x, *arguments), pool.avg_pool2d_reference(x, *arguments))
        assert_close(
            pool.avg_pool2d_backward(cotangent, shape, *arguments),
            pool.avg_pool2d_backward_reference(cotangent, shape, *arguments),
        )


def test_max_pool_positions_are_small_and_ties_go_first():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 3, 2] = 1.0
    _, positions = pool.max_pool2d(x, 2)
    assert positions.dtype == np.uint8
    np.testing.assert_array_equal(positions[0, 0], [[0, 0], [0, 2]])
    np.testing.assert_array_equal(pool.max_pool2d_reference(x, 2)[1], positions)
    assert pool.max_pool2d(np.zeros((1, 1, 16, 16)), 16)[1].dtype == np.int32


@pytest.mark.parametrize(("shape", "kernel", "stride", "padding"), POOL_CASES, ids=POOL_IDS)
def test_pool_backwards_are_vjps(rng, shape, kernel, stride, padding):
    x = rng.standard_normal(shape)
    geometry = (kernel, stride, padding)
    _, positions = pool.max_pool2d(x, *geometry)
    cotangent = rng.standard_normal(positions.shape)
    directional_check(
        lambda value: pool.max_pool2d(value, *geometry)[0],
        lambda v: pool.max_pool2d_backward(v, positions, shape, *geometry),
        x,
        cotangent,
        rng,
    )
    for include in (True, False):
        arguments = (*geometry, include)
        directional_check(
            lambda value, arguments=arguments: pool.avg_pool2d(value, *arguments),
            lambda v, arguments=arguments: pool.avg_pool2d_backward(v, shape, *arguments),
            x,
            cotangent,
            rng,
        )


def test_max_pool_backward_drops_maxima_in_the_padding():
    # An all -inf window has its maximum in the padding: no pixel gets its cotangent.
    x = np.full((1, 1, 3, 3), -np.inf)
    _, positions = pool.max_pool2d_reference(x, 2, 2, 1)
    cotangent = np.ones(positions.shape)
    grad = pool.max_pool2d_backward(cotangent, positions, x.shape, 2, 2, 1)
    assert_close(grad, pool.max_pool2d_backward_reference(cotangent, positions, x.shape, 2, 2, 1))
    assert grad.sum() == 1.0  # only window (1, 1) has its first tap inside the image


def test_pool_rejects_too_much_padding(rng):
    with pytest.raises(ValueError, match="max_pool2d: padding"):
        pool.max_pool2d(random(rng, (1, 1, 4, 4), np.float32), 2, 1, 2)


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_prefers_numba_for_float_numpy_arrays(monkeypatch):
    single, double = np.ones(3, np.float32), np.ones(3)
    assert use_numba(single) and use_numba(double)
    assert not use_numba(single, double)
    assert not use_numba(np.ones(3, np.float16))
    assert not use_numba(np.ones(3, np.int64))
    monkeypatch.setenv("RBPROP_DISABLE_NUMBA", "1")
    assert not use_numba(double)


def test_disabling_numba_routes_every_kernel_to_its_twin(rng, monkeypatch):
    monkeypatch.setenv("RBPROP_DISABLE_NUMBA", "1")

    def refuse(*args):
        raise AssertionError("a numba kernel ran although RBPROP_DISABLE_NUMBA=1")

    for module, kernel in (
        (conv, "_im2col_rows_numba"),
        (gather, "_compact_mask_numba"),
        (importance, "_water_filling_numba"),
        (softmax, "_normalize_rows_numba"),
        (layernorm, "_layer_norm_forward_numba"),
        (pool, "_max_pool_numba"),
    ):
        monkeypatch.setattr(module, kernel, refuse)
    x = random(rng, (1, 1, 4, 4), np.float32)
    assert_close(conv.im2col(x, 2, 2), conv.im2col_reference(x, 2, 2))
    np.testing.assert_array_equal(gather.compact_mask(x.ravel() > 0), np.flatnonzero(x > 0))
    assert_close(
        importance.water_filling(np.abs(x), 3), importance.water_filling_reference(np.abs(x), 3)
    )
    assert_close(softmax.softmax(x), softmax.softmax_reference(x))
    assert_close(layernorm.layer_norm_forward(x)[0], layernorm.layer_norm_forward_reference(x)[0])
    assert_close(pool.max_pool2d(x, 2)[0], pool.max_pool2d_reference(x, 2)[0])


def test_other_dtypes_go_to_the_twins_and_keep_their_dtype(rng):
    x = random(rng, (1, 2, 3, 3), np.float16)
    assert conv.im2col(x, 2, 2).dtype == np.float16
    assert softmax.softmax(x).dtype == np.float16
    assert gather.gather_scaled(x, [1], [2.0], axis=1).dtype == np.float16


def test_parallel_launches_match_twins(rng, monkeypatch):
    # Inputs here are small, so launch() would keep them on one thread: force the threads.
    monkeypatch.setattr(dispatch, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setenv("RBPROP_KERNEL_THREADS", "2")  # kernels use one thread by default
    image = random(rng, (3, 4, 9, 8), np.float64)
    cols = conv.im2col(image, 3, 3, 2, 1)
    assert_close(cols, conv.im2col_reference(image, 3, 3, 2, 1))
    assert_close(
        conv.col2im(cols, image.shape, 3, 3, 2, 1),
        conv.col2im_reference(cols, image.shape, 3, 3, 2, 1),
    )
    rows = np.arange(0, cols.shape[0], 3)
    assert_close(conv.im2col_rows(image, rows, 3, 3, 2, 1), cols[rows])
    assert_close(
        conv.col2im_rows(cols[rows], rows, image.shape, 3, 3, 2, 1),
        conv.col2im_rows_reference(cols[rows], rows, image.shape, 3, 3, 2, 1),
    )

    matrix = random(rng, (40, 600), np.float64)
    indices = np.array([3, 3, 0, 39, 17])
    assert_close(
        gather.gather_scaled(matrix, indices, np.arange(5.0)),
        gather.gather_scaled_reference(matrix, indices, np.arange(5.0)),
    )
    assert_close(
        gather.scatter_add(matrix[:5], indices, 40),
        gather.scatter_add_reference(matrix[:5], indices, 40),
    )
    mask = matrix > 0.5
    np.testing.assert_array_equal(gather.compact_mask(mask), np.flatnonzero(mask))
    weights = np.abs(matrix).ravel()
    assert_close(
        importance.water_filling(weights, 1000.0),
        importance.water_filling_reference(weights, 1000.0),
    )

    assert_close(softmax.softmax(matrix), softmax.softmax_reference(matrix))
    assert_close(softmax.log_softmax(matrix), softmax.log_softmax_reference(matrix))
    cotangent = random(rng, matrix.shape, np.float64)
    assert_close(
        softmax.softmax_backward(matrix, cotangent),
        softmax.softmax_backward_reference(matrix, cotangent),
    )
    forward = layernorm.layer_norm_forward(matrix, matrix[0], matrix[1])
    for actual, wanted in zip(
        forward, layernorm.layer_norm_forward_reference(matrix, matrix[0], matrix[1]), strict=True
    ):
        assert_close(actual, wanted)
    _, mean, rstd = forward
    for actual, wanted in zip(
        layernorm.layer_norm_backward(cotangent, matrix, matrix[0], mean, rstd),
        layernorm.layer_norm_backward_reference(cotangent, matrix, matrix[0], mean, rstd),
        strict=True,
    ):
        assert_close(actual, wanted)

    pooled, positions = pool.max_pool2d(image, 3, 2, 1)
    assert_close(positions, pool.max_pool2d_reference(image, 3, 2, 1)[1])
    assert_close(
        pool.max_pool2d_backward(pooled, positions, image.shape, 3, 2, 1),
        pool.max_pool2d_backward_reference(pooled, positions, image.shape, 3, 2, 1),
    )
    assert_close(pool.avg_pool2d(image, 3, 2, 1), pool.avg_pool2d_reference(image, 3, 2, 1))
    assert_close(
        pool.avg_pool2d_backward(pooled, image.shape, 3, 2, 1),
        pool.avg_pool2d_backward_reference(pooled, image.shape, 3, 2, 1),
    )


# ----------------------------------------------------------------------------- GPU twins


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="cupy with a CUDA device is not available")
def test_twins_run_on_cupy_and_match_the_cpu_kernels(rng):
    import cupy

    x = random(rng, (2, 3, 7, 6), np.float64)
    on_gpu = cupy.asarray(x)
    rows = np.array([0, 5, 11, 40])
    cols = conv.im2col(x, 3, 2, 2, 1)

    def check(gpu_result, cpu_result):
        assert_close(cupy.asnumpy(gpu_result), cpu_result)

    check(conv.im2col(on_gpu, 3, 2, 2, 1), cols)
    check(
        conv.col2im(cupy.asarray(cols), x.shape, 3, 2, 2, 1),
        conv.col2im(cols, x.shape, 3, 2, 2, 1),
    )
    check(conv.im2col_rows(on_gpu, cupy.asarray(rows), 3, 2, 2, 1), cols[rows])
    check(
        conv.col2im_rows(cupy.asarray(cols[rows]), cupy.asarray(rows), x.shape, 3, 2, 2, 1),
        conv.col2im_rows(cols[rows], rows, x.shape, 3, 2, 2, 1),
    )
    indices = cupy.asarray([2, 0, 2])
    check(
        gather.gather_scaled(on_gpu, indices, cupy.ones(3), 1),
        gather.gather_scaled(x, [2, 0, 2], np.ones(3), 1),
    )
    check(
        gather.scatter_add(on_gpu, indices, 5, axis=1), gather.scatter_add(x, [2, 0, 2], 5, axis=1)
    )
    check(gather.compact_mask(on_gpu > 0), gather.compact_mask(x > 0))
    check(importance.water_filling(cupy.abs(on_gpu), 30), importance.water_filling(np.abs(x), 30))
    check(softmax.log_softmax(on_gpu), softmax.log_softmax(x))
    check(layernorm.layer_norm_forward(on_gpu)[0], layernorm.layer_norm_forward(x)[0])
    check(pool.max_pool2d(on_gpu, 3, 2, 1)[1], pool.max_pool2d(x, 3, 2, 1)[1])
    check(pool.avg_pool2d(on_gpu, 3, 2, 1, False), pool.avg_pool2d(x, 3, 2, 1, False))
