"""Channel-major arrays: conv2d's output layout, and the kernels that keep it.

``conv2d`` returns (N, C, H, W) arrays laid out as (C, N, H, W) in memory, and
the batch-norm kernels keep that layout (see :mod:`rbprop.ops.conv`). Values
never depend on the layout: every path must give what it gives on C-contiguous
arrays, to rounding; the channel-row kernels (batch norm, ``scatter_columns``)
must agree with their numpy twins on awkward sizes, on one thread and on two.
"""

import numpy as np
import pytest
from test_nn_ops import conv2d_reference, normal, with_placement

import rbprop as rb
from rbprop import functional as F
from rbprop.check import gradcheck
from rbprop.kernels import batchnorm, conv, dispatch
from rbprop.ops.conv import channel_major, is_channel_major

TOLERANCE = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}


def _assert_agree(actual, expected, dtype):
    assert actual.dtype == expected.dtype == np.dtype(dtype)
    assert actual.shape == expected.shape
    tolerance = TOLERANCE[np.dtype(dtype)]
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


def _channel_major_planes(array):
    """An (N, C, S) array with the same values, laid out as (C, N, S)."""
    return np.ascontiguousarray(array.transpose(1, 0, 2)).transpose(1, 0, 2)


def _is_channel_major_planes(array):
    return array.transpose(1, 0, 2).flags.c_contiguous


# -- the batch-norm kernels on channel rows ----------------------------------------------------


BATCH_NORM_SHAPES = [(4, 3, 5), (2, 7, 13), (7, 1, 3), (3, 4, 1), (5, 2, 9)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", BATCH_NORM_SHAPES)
def test_batch_norm_kernels_on_channel_major_arrays_match_twins(rng, shape, dtype):
    x = _channel_major_planes((3 * rng.standard_normal(shape) + 1).astype(dtype))
    cotangent = _channel_major_planes(rng.standard_normal(shape).astype(dtype))
    weight, bias = (rng.standard_normal(shape[1]).astype(dtype) for _ in range(2))

    mean, variance = batchnorm.batch_norm_statistics(x)
    expected_mean, expected_variance = batchnorm.batch_norm_statistics_reference(x)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(variance, expected_variance, rtol=1e-12, atol=1e-12)

    mean = mean.astype(dtype)
    rstd = (1 / np.sqrt(variance + 1e-5)).astype(dtype)
    for affine in ((weight, bias), (None, None)):
        output = batchnorm.batch_norm_normalize(x, mean, rstd, *affine)
        assert _is_channel_major_planes(output)
        _assert_agree(
            output, batchnorm.batch_norm_normalize_reference(x, mean, rstd, *affine), dtype
        )
    for centring in (True, False):
        for gain in (weight, None):
            arguments = (cotangent, x, mean, rstd, gain, centring)
            compiled = batchnorm.batch_norm_backward(*arguments)
            assert _is_channel_major_planes(compiled[0])
            expected = batchnorm.batch_norm_backward_reference(*arguments)
            for actual, wanted in zip(compiled, expected, strict=True):
                _assert_agree(actual, wanted, dtype)
            assert batchnorm.batch_norm_backward(*arguments, input_grad=False)[0] is None
    only_dx = (cotangent, None, None, rstd, weight, False)
    compiled = batchnorm.batch_norm_backward(*only_dx)
    assert compiled[1:] == (None, None) and _is_channel_major_planes(compiled[0])
    _assert_agree(compiled[0], batchnorm.batch_norm_backward_reference(*only_dx)[0], dtype)


def test_batch_norm_backward_of_mixed_layouts_follows_the_input(rng):
    shape = (3, 4, 5)
    x, cotangent = rng.standard_normal(shape), rng.standard_normal(shape)
    mean, variance = batchnorm.batch_norm_statistics(x)
    rstd, weight = 1 / np.sqrt(variance + 1e-5), rng.standard_normal(4)
    expected = batchnorm.batch_norm_backward_reference(cotangent, x, mean, rstd, weight)
    for x_layout, v_layout in (
        (_channel_major_planes, np.ascontiguousarray),
        (np.ascontiguousarray, _channel_major_planes),
    ):
        compiled = batchnorm.batch_norm_backward(
            v_layout(cotangent), x_layout(x), mean, rstd, weight
        )
        assert _is_channel_major_planes(compiled[0]) == (x_layout is _channel_major_planes)
        for actual, wanted in zip(compiled, expected, strict=True):
            _assert_agree(actual, wanted, np.float64)


def test_channel_row_kernels_match_twins_on_every_thread(rng, monkeypatch):
    monkeypatch.setattr(dispatch, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setenv("RBPROP_KERNEL_THREADS", "2")
    x = _channel_major_planes(rng.standard_normal((5, 3, 7)))
    cotangent = _channel_major_planes(rng.standard_normal((5, 3, 7)))
    statistics = batchnorm.batch_norm_statistics(x)
    for actual, expected in zip(
        statistics, batchnorm.batch_norm_statistics_reference(x), strict=True
    ):
        np.testing.assert_allclose(actual, expected, rtol=1e-12)
    mean, rstd = statistics[0], 1 / np.sqrt(statistics[1] + 1e-5)
    arguments = (cotangent, x, mean, rstd, rng.standard_normal(3), True)
    for actual, expected in zip(
        batchnorm.batch_norm_backward(*arguments),
        batchnorm.batch_norm_backward_reference(*arguments),
        strict=True,
    ):
        _assert_agree(actual, expected, np.float64)
    values, columns = rng.standard_normal((3, 4)), np.array([6, 0, 3, 8])
    np.testing.assert_array_equal(
        conv.scatter_columns(values, columns, 9),
        conv.scatter_columns_reference(values, columns, 9),
    )


# -- scatter_columns -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,width,kept", [(5, 13, 4), (1, 1, 1), (3, 7, 0), (6, 9, 9)])
def test_scatter_columns_matches_the_twin(rng, dtype, rows, width, kept):
    columns = rng.permutation(width)[:kept]  # distinct, in no order
    values = rng.standard_normal((rows, kept)).astype(dtype)
    scattered = conv.scatter_columns(values, columns, width)
    assert scattered.dtype == dtype
    np.testing.assert_array_equal(
        scattered, conv.scatter_columns_reference(values, columns, width)
    )
    np.testing.assert_array_equal(scattered[:, columns], values)
    others = np.setdiff1d(np.arange(width), columns)
    assert not scattered[:, others].any()


def test_scatter_columns_rejects_bad_arguments(rng):
    values = rng.standard_normal((2, 3))
    with pytest.raises(IndexError, match=r"scatter_columns: columns must lie in \[0, 4\)"):
        conv.scatter_columns(values, np.array([0, 1, 4]), 4)
    with pytest.raises(rb.ShapeError, match=r"scatter_columns: cols must have shape \(2, 2\)"):
        conv.scatter_columns(values, np.array([0, 1]), 4)


# -- conv2d and the ops after it ---------------------------------------------------------------


def test_conv2d_output_is_channel_major(rng):
    for x_shape, w_shape, stride in (
        ((2, 3, 7, 6), (4, 3, 3, 2), 2),
        ((3, 4, 5, 2), (6, 4, 1, 1), 1),
    ):
        x, weight = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
        output = F.conv2d(x, weight, stride=stride).numpy()
        assert is_channel_major(output)
        expected = conv2d_reference(x, weight, None, (stride, stride), (0, 0))
        np.testing.assert_allclose(output, expected, rtol=1e-12, atol=1e-12)


def _block(x, w1, w2, gamma, beta):
    """A BagNet in miniature: strided stem conv, batch norm, ReLU, a 1x1 conv, batch norm."""
    hidden = F.relu(F.batch_norm(F.conv2d(x, w1, stride=2), None, None, gamma, beta, True))
    return F.batch_norm(F.conv2d(hidden, w2), None, None, gamma, beta, training=True)


def test_conv_batch_norm_chain_gradcheck(rng):
    x = normal(rng, 3, 2, 7, 6)
    w1, w2 = normal(rng, 5, 2, 3, 3), normal(rng, 5, 5, 1, 1)
    gamma, beta = normal(rng, 5), normal(rng, 5)
    assert gradcheck(_block, [x, w1, w2, gamma, beta])


def _gradients(fn, arrays, cotangent, sketch=None):
    tensors = [rb.tensor(array, requires_grad=True) for array in arrays]
    if sketch is None:
        output = fn(*tensors)
    else:
        with rb.sampled(sketch, seed=4):
            output = fn(*tensors)
    output.backward(cotangent)
    return [output.numpy()] + [tensor.grad.numpy() for tensor in tensors]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "spec",
    [None, "bernoulli:0.5:contracted", "uniform:0.5:weight", "bernoulli:0.5:cotangent"],
)
@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 2)])
def test_conv2d_values_do_not_depend_on_layouts(rng, dtype, spec, kernel, stride):
    # Inputs and cotangent C-contiguous or channel-major: the same outputs and gradients
    # (the sketch is drawn from the same seed), and a channel-major input gradient.
    x = rng.standard_normal((3, 4, 7, 5)).astype(dtype)
    weight = rng.standard_normal((6, 4, kernel, kernel)).astype(dtype)
    bias = rng.standard_normal(6).astype(dtype)
    fn = lambda a, w, b: F.conv2d(a, w, b, stride=stride)  # noqa: E731
    cotangent = rng.standard_normal(fn(x, weight, bias).shape).astype(dtype)
    sketch = None if spec is None else with_placement(*spec.rsplit(":", 1))
    expected = _gradients(fn, [x, weight, bias], cotangent, sketch)
    for layout_x, layout_v in ((channel_major, np.ascontiguousarray), (channel_major,) * 2):
        results = _gradients(fn, [layout_x(x), weight, bias], layout_v(cotangent), sketch)
        for actual, wanted in zip(results, expected, strict=True):
            _assert_agree(actual, wanted, dtype)
    if kernel == 1 and spec in (None, "bernoulli:0.5:contracted"):
        assert is_channel_major(results[1])  # the input gradient, layout of the output


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chain_agrees_with_the_numpy_twins(rng, monkeypatch, dtype):
    arrays = [
        rng.standard_normal(shape).astype(dtype)
        for shape in ((4, 2, 9, 8), (5, 2, 3, 3), (5, 5, 1, 1), (5,), (5,))
    ]
    cotangent = rng.standard_normal((4, 5, 4, 3)).astype(dtype)
    compiled = _gradients(_block, arrays, cotangent)
    monkeypatch.setenv("RBPROP_DISABLE_NUMBA", "1")
    for actual, expected in zip(compiled, _gradients(_block, arrays, cotangent), strict=True):
        _assert_agree(actual, expected, dtype)


@pytest.mark.parametrize("pool", [F.max_pool2d, F.avg_pool2d])
def test_pools_of_channel_major_inputs(rng, pool):
    x = rng.standard_normal((3, 4, 7, 6))
    cotangent = rng.standard_normal(pool(x, 3, 2, 1).shape)
    fn = lambda a: pool(a, 3, 2, 1)  # noqa: E731
    expected = _gradients(fn, [x], cotangent)
    results = _gradients(fn, [channel_major(x)], channel_major(cotangent))
    for actual, wanted in zip(results, expected, strict=True):
        _assert_agree(actual, wanted, np.float64)
