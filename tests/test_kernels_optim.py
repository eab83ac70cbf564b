"""The fused optimizer kernels agree bit for bit with their numpy twins."""

import numpy as np
import pytest

from rbprop.kernels import optim as kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_sgd_momentum_matches_twin(dtype, nesterov, weight_decay):
    rng = np.random.default_rng(0)
    param, grad, buffer = (rng.standard_normal((7, 13)).astype(dtype) for _ in range(3))
    twin_param, twin_buffer = param.copy(), buffer.copy()
    arguments = (0.05, 0.9, 0.75, weight_decay, nesterov)
    kernels.sgd_momentum(param, grad, buffer, *arguments)
    kernels.sgd_momentum_reference(twin_param, grad, twin_buffer, *arguments)
    np.testing.assert_array_equal(param, twin_param)
    np.testing.assert_array_equal(buffer, twin_buffer)
    assert param.dtype == dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_adam_matches_twin(dtype, weight_decay):
    rng = np.random.default_rng(1)
    param, grad = (rng.standard_normal((5, 3, 4)).astype(dtype) for _ in range(2))
    exp_avg = rng.standard_normal(param.shape).astype(dtype)
    exp_avg_sq = np.abs(rng.standard_normal(param.shape)).astype(dtype)
    twin = [param.copy(), exp_avg.copy(), exp_avg_sq.copy()]
    arguments = (0.9, 0.999, 1e-3 / (1 - 0.9**4), np.sqrt(1 - 0.999**4), 1e-8, weight_decay)
    kernels.adam(param, grad, exp_avg, exp_avg_sq, *arguments)
    kernels.adam_reference(twin[0], grad, twin[1], twin[2], *arguments)
    for fused, plain in zip((param, exp_avg, exp_avg_sq), twin, strict=True):
        np.testing.assert_array_equal(fused, plain)


def test_non_contiguous_arrays_take_the_twin():
    rng = np.random.default_rng(2)
    param = rng.standard_normal((6, 4)).T  # a non-contiguous view, updated in place
    grad, buffer = np.ones_like(param), np.zeros_like(param)
    expected = param - 0.1 * grad
    kernels.sgd_momentum(param, grad, buffer, 0.1, 0.9, 1.0, 0.0, False)
    np.testing.assert_allclose(param, expected, rtol=0, atol=1e-15)
