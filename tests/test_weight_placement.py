"""The ``"weight"`` placement: sketched weight gradients, exact input gradients.

Checks that linear, matmul and conv2d keep ``dX`` exact under it, that their
weight gradients stay unbiased (Monte Carlo mean within 5 standard errors), and
that the forward pass saves only the kept rows, as the contracted placement does.
"""

import numpy as np
import pytest

import rbprop as rb
from rbprop import functional as F
from rbprop.sketch import Bernoulli, Importance, RankK, UniformK

DRAWS = 300

SKETCHES = [
    Bernoulli(0.5, placement="weight"),
    UniformK(0.5, placement="weight"),
    RankK(0.5, placement="weight"),
    Importance(0.5, placement="weight"),
]


def _linear(x, w):
    return F.linear(x, w)


def _matmul(x, w):
    return rb.matmul(x, w)


def _conv(x, w):
    return F.conv2d(x, w, stride=1, padding=1)


CASES = {
    "linear": (_linear, (6, 5), (4, 5)),
    "matmul": (_matmul, (2, 6, 5), (5, 3)),
    "conv2d": (_conv, (2, 2, 4, 4), (3, 2, 3, 3)),
}


def _grads(case, sketch, seed, x_data, w_data, cotangent):
    function = CASES[case][0]
    x = rb.tensor(x_data, requires_grad=True)
    w = rb.tensor(w_data, requires_grad=True)
    if sketch is None:
        output = function(x, w)
    else:
        with rb.sampled({case: sketch}, seed=seed):
            output = function(x, w)
    output.backward(cotangent)
    return x.grad.numpy(), w.grad.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sketch", SKETCHES, ids=lambda sketch: sketch.spec())
def test_input_gradient_exact_and_weight_gradient_unbiased(case, sketch):
    rng = np.random.default_rng(7)
    _, x_shape, w_shape = CASES[case]
    x_data, w_data = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    output_shape = CASES[case][0](rb.tensor(x_data), rb.tensor(w_data)).shape
    cotangent = rng.uniform(0.5, 1.5, output_shape) * rng.choice([-1.0, 1.0], output_shape)
    exact_x, exact_w = _grads(case, None, 0, x_data, w_data, cotangent)

    draws = []
    for seed in range(DRAWS):
        grad_x, grad_w = _grads(case, sketch, seed, x_data, w_data, cotangent)
        np.testing.assert_allclose(grad_x, exact_x, rtol=1e-12, atol=1e-12)
        draws.append(grad_w)
    draws = np.asarray(draws)
    mean, stderr = draws.mean(axis=0), draws.std(axis=0, ddof=1) / np.sqrt(DRAWS)
    varying = stderr > 1e-12
    assert np.all(np.abs(mean - exact_w)[varying] <= 5 * stderr[varying])
    np.testing.assert_allclose(mean[~varying], exact_w[~varying], rtol=13 / DRAWS, atol=1e-10)
    assert np.any(varying), "the sketch never varied the weight gradient"


def test_weight_placement_saves_only_kept_rows():
    rng = np.random.default_rng(0)
    x = rb.tensor(rng.standard_normal((512, 256)).astype(np.float32))
    w = rb.tensor(rng.standard_normal((128, 256)).astype(np.float32), requires_grad=True)
    before = rb.cost.saved_bytes.current
    exact = F.linear(x, w)
    exact_bytes = rb.cost.saved_bytes.current - before
    with rb.sampled({"linear": UniformK(0.25, placement="weight")}, seed=0):
        sampled = F.linear(x, w)
    sampled_bytes = rb.cost.saved_bytes.current - before - exact_bytes
    assert exact_bytes == x.data.nbytes
    assert sampled_bytes == x.data.nbytes // 4
    del exact, sampled


def test_attention_rejects_the_weight_placement():
    rng = np.random.default_rng(0)
    q = rb.tensor(rng.standard_normal((1, 3, 4)), requires_grad=True)
    with (
        pytest.raises(ValueError, match="scaled_dot_product_attention.*placement"),
        rb.sampled(Bernoulli(0.5, placement="weight"), seed=0),
    ):
        F.scaled_dot_product_attention(q, q, q)
