"""GPU (cupy) checks: the same code path gives the CPU's gradients on a CUDA device.

Skipped, with the reason, where cupy or a CUDA device is missing.
"""

import numpy as np
import pytest

import rbprop as rb

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not rb.gpu_available(), reason="cupy with a CUDA device is not available"),
]


def _mlp_grads(device):
    rng = np.random.default_rng(0)
    x = rb.tensor(rng.standard_normal((16, 8)), device=device)
    w1 = rb.tensor(rng.standard_normal((32, 8)), requires_grad=True, device=device)
    w2 = rb.tensor(rng.standard_normal((4, 32)), requires_grad=True, device=device)
    hidden = rb.relu(rb.linear(x, w1))
    loss = (rb.log_softmax(rb.linear(hidden, w2), axis=-1) ** 2).mean()
    loss.backward()
    return w1.grad.numpy(), w2.grad.numpy()


def test_gpu_gradients_match_cpu():
    for cpu_grad, gpu_grad in zip(_mlp_grads("cpu"), _mlp_grads("gpu"), strict=True):
        np.testing.assert_allclose(gpu_grad, cpu_grad, rtol=1e-10, atol=1e-12)


def test_gpu_sampled_gradients_match_cpu_draws():
    with rb.sampled("bernoulli:0.5", seed=3):
        cpu = _mlp_grads("cpu")
    with rb.sampled("bernoulli:0.5", seed=3):
        gpu = _mlp_grads("gpu")
    for cpu_grad, gpu_grad in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(gpu_grad, cpu_grad, rtol=1e-10, atol=1e-12)
