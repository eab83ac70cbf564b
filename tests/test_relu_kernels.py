"""The ReLU kernels against their numpy twins: values, masks, layouts, special values."""

import numpy as np
import pytest

from rbprop.kernels import dispatch, relu
from rbprop.primitive import ShapeError


def _layouts(array):
    """``array`` C-contiguous, channel-major (axes 0 and 1 swapped in memory), Fortran
    order, and as a strided slice (not dense in any order)."""
    yield np.ascontiguousarray(array)
    if array.ndim >= 2:
        yield np.ascontiguousarray(array.swapaxes(0, 1)).swapaxes(0, 1)
    yield np.asfortranarray(array)
    if array.ndim >= 1:
        doubled = np.concatenate([array, array], axis=-1)
        yield doubled[..., ::2]


SHAPES = [(7,), (3, 5, 11), (4, 3, 2, 5), (0, 4), ()]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_kernels_match_twins_in_every_layout(rng, shape, dtype):
    values = rng.standard_normal(shape).astype(dtype)
    cotangent = rng.standard_normal(shape).astype(dtype)
    for x in _layouts(values):
        output, mask = relu.relu(x)
        expected_output, expected_mask = relu.relu_reference(x)
        assert output.dtype == dtype and mask.dtype == np.bool_
        np.testing.assert_array_equal(output, expected_output)
        np.testing.assert_array_equal(mask, expected_mask)
        if x.flags.c_contiguous or x.transpose(*reversed(range(x.ndim))).flags.c_contiguous:
            assert output.strides == x.strides  # dense inputs keep their layout
        for v in _layouts(cotangent):
            grad = relu.relu_backward(v, mask)
            assert grad.dtype == dtype
            np.testing.assert_array_equal(grad, relu.relu_backward_reference(v, mask))
            np.testing.assert_array_equal(grad, np.where(expected_mask, v, 0))


def test_channel_major_arrays_stay_channel_major(rng):
    x = np.ascontiguousarray(rng.standard_normal((4, 3, 5, 2)).transpose(1, 0, 2, 3))
    x = x.transpose(1, 0, 2, 3)  # (N, C, H, W) laid out as (C, N, H, W)
    output, mask = relu.relu(x)
    assert output.transpose(1, 0, 2, 3).flags.c_contiguous
    assert mask.transpose(1, 0, 2, 3).flags.c_contiguous
    grad = relu.relu_backward(np.ascontiguousarray(x), mask)  # another layout: follows mask
    assert grad.transpose(1, 0, 2, 3).flags.c_contiguous
    np.testing.assert_array_equal(grad, x * (x > 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_as_numpy_maximum_and_product(dtype):
    x = np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, -1.5, 2.5, 1e-30], dtype=dtype)
    output, mask = relu.relu(x)
    expected_output, expected_mask = relu.relu_reference(x)
    np.testing.assert_array_equal(output, expected_output)  # NaN == NaN here
    np.testing.assert_array_equal(np.signbit(output), np.signbit(expected_output))
    np.testing.assert_array_equal(mask, expected_mask)
    assert np.isnan(output[0]) and output[1] == 0 and output[2] == np.inf
    with np.errstate(invalid="ignore"):
        cotangent = np.array([1, np.nan, np.inf, 2, -3, 4, 5, -6], dtype=dtype)
        np.testing.assert_array_equal(
            relu.relu_backward(cotangent, mask), relu.relu_backward_reference(cotangent, mask)
        )


def test_relu_backward_is_the_vjp(rng):
    x, cotangent, direction = (rng.standard_normal(60) for _ in range(3))
    eps = 1e-7  # no element of x lies within eps of the kink
    assert np.abs(x).min() > 10 * eps
    _, mask = relu.relu(x)
    plus, minus = relu.relu(x + eps * direction)[0], relu.relu(x - eps * direction)[0]
    numeric = np.vdot(cotangent, (plus - minus) / (2 * eps))
    analytic = np.vdot(relu.relu_backward(cotangent, mask), direction)
    assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic))


def test_relu_kernels_on_two_threads(rng, monkeypatch):
    monkeypatch.setattr(dispatch, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setenv("RBPROP_KERNEL_THREADS", "2")
    x, cotangent = rng.standard_normal((9, 7)), rng.standard_normal((9, 7))
    output, mask = relu.relu(x)
    np.testing.assert_array_equal(output, np.maximum(x, 0))
    np.testing.assert_array_equal(relu.relu_backward(cotangent, mask), cotangent * (x > 0))


def test_relu_backward_rejects_bad_arguments(rng):
    cotangent = rng.standard_normal((2, 3))
    with pytest.raises(ShapeError, match=r"relu_backward: cotangent of shape \(2, 3\).*\(3, 2\)"):
        relu.relu_backward(cotangent, np.ones((3, 2), dtype=bool))
    with pytest.raises(TypeError, match="relu_backward: mask must be boolean"):
        relu.relu_backward(cotangent, np.ones((2, 3)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(9, 5), (13, 3, 4), (6,), (1, 1)])
def test_kept_rows_backward_matches_twin_and_the_dense_backward(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    _, mask = relu.relu(x)
    for kept in (0, 1, shape[0] // 2, shape[0]):
        rows = np.sort(rng.choice(shape[0], size=kept, replace=False))
        values = rng.standard_normal((kept,) + shape[1:]).astype(dtype)
        grad = relu.relu_backward_rows(values, mask, rows)
        assert grad.dtype == dtype and grad.shape == values.shape
        np.testing.assert_array_equal(grad, relu.relu_backward_rows_reference(values, mask, rows))
        dense = np.zeros(shape, dtype)
        dense[rows] = values
        np.testing.assert_array_equal(grad, relu.relu_backward(dense, mask)[rows])


def test_kept_rows_backward_of_a_channel_major_mask_uses_the_twin(rng):
    x = np.ascontiguousarray(rng.standard_normal((3, 4, 2, 2))).swapaxes(0, 1)
    _, mask = relu.relu(x)
    rows = np.array([0, 2])
    values = rng.standard_normal((2, 3, 2, 2))
    np.testing.assert_array_equal(
        relu.relu_backward_rows(values, mask, rows), values * (x[rows] > 0)
    )


@pytest.mark.parametrize("backward", [relu.relu_backward_rows, relu.relu_backward_rows_reference])
def test_kept_rows_backward_rejects_bad_arguments(rng, backward):
    mask = rng.standard_normal((5, 3)) > 0
    values = rng.standard_normal((2, 3))
    with pytest.raises(IndexError, match=r"relu_backward_rows: rows must lie in \[0, 5\).*7"):
        backward(values, mask, np.array([1, 7]))
    with pytest.raises(IndexError, match="from -1 to 2"):
        backward(values, mask, np.array([-1, 2]))
    with pytest.raises(ShapeError, match=r"values of shape \(2, 4\) for 2 rows"):
        backward(rng.standard_normal((2, 4)), mask, np.array([0, 1]))
    with pytest.raises(TypeError, match="rows must be a 1-D integer array"):
        backward(values, mask, np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="mask must be boolean"):
        backward(values, mask.astype(np.float64), np.array([0, 1]))
