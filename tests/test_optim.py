"""Optimizers against updates computed by hand, clipping, the schedule and state dicts."""

import math

import numpy as np
import pytest

import rbprop as rb
from rbprop import optim
from rbprop.nn import Parameter

GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-0.25, 0.75, 1.0]), np.array([1.0, 1.0, -3.0])]
START = np.array([1.0, -2.0, 0.5])


def run(optimizer_class, steps=3, **settings):
    """Parameter values after each step, feeding ``GRADS`` in turn (float64)."""
    param = Parameter(START.copy())
    optimizer = optimizer_class([param], **settings)
    values = []
    for grad in GRADS[:steps]:
        param.grad = rb.tensor(grad.copy())
        optimizer.step()
        values.append(param.numpy().copy())
    return values


def test_plain_sgd():
    values = run(optim.SGD, lr=0.1)
    expected = START - 0.1 * GRADS[0]
    np.testing.assert_allclose(values[0], expected)
    np.testing.assert_allclose(values[1], expected - 0.1 * GRADS[1])


def test_sgd_with_momentum_and_weight_decay():
    lr, momentum, decay = 0.1, 0.9, 0.01
    values = run(optim.SGD, lr=lr, momentum=momentum, weight_decay=decay)
    p = START.copy()
    g1 = GRADS[0] + decay * p  # first step: the buffer is the gradient itself
    buffer = g1
    p = p - lr * buffer
    np.testing.assert_allclose(values[0], p)
    g2 = GRADS[1] + decay * p
    buffer = momentum * buffer + g2
    p = p - lr * buffer
    np.testing.assert_allclose(values[1], p)


def test_sgd_with_nesterov_momentum():
    lr, momentum = 0.1, 0.9
    values = run(optim.SGD, lr=lr, momentum=momentum, nesterov=True)
    buffer = GRADS[0]
    p = START - lr * (GRADS[0] + momentum * buffer)
    np.testing.assert_allclose(values[0], p)
    buffer = momentum * buffer + GRADS[1]
    p = p - lr * (GRADS[1] + momentum * buffer)
    np.testing.assert_allclose(values[1], p)


def adam_by_hand(lr, beta1, beta2, eps, decay, decoupled):
    p, m, v = START.copy(), np.zeros(3), np.zeros(3)
    values = []
    for t, grad in enumerate(GRADS, start=1):
        if decoupled:
            p = p * (1 - lr * decay)
        else:
            grad = grad + decay * p
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        values.append(p.copy())
    return values


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_adam(decay):
    values = run(optim.Adam, lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=decay)
    expected = adam_by_hand(0.01, 0.8, 0.9, 1e-6, decay, decoupled=False)
    np.testing.assert_allclose(values, expected, rtol=1e-12)


def test_adamw_decays_weights_decoupled_from_the_gradient():
    values = run(optim.AdamW, lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    expected = adam_by_hand(0.01, 0.8, 0.9, 1e-6, 0.1, decoupled=True)
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    assert optim.AdamW([Parameter(START)]).param_groups[0]["weight_decay"] == 1e-2


@pytest.mark.parametrize(
    "optimizer_class, settings",
    [(optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}), (optim.AdamW, {})],
)
def test_gradients_are_never_modified_in_place(optimizer_class, settings):
    param = Parameter(START.copy())
    optimizer = optimizer_class([param], **settings)
    for grad in GRADS:
        param.grad = rb.tensor(grad.copy())
        held = param.grad.data
        optimizer.step()
        np.testing.assert_array_equal(held, grad)


def test_parameter_groups_and_skipped_parameters():
    first, second, idle = Parameter(START.copy()), Parameter(START.copy()), Parameter(START)
    optimizer = optim.SGD([{"params": [first]}, {"params": [second, idle], "lr": 1.0}], lr=0.1)
    first.grad = rb.tensor(np.ones(3))
    second.grad = rb.tensor(np.ones(3))
    optimizer.step()
    np.testing.assert_allclose(first.numpy(), START - 0.1)
    np.testing.assert_allclose(second.numpy(), START - 1.0)
    np.testing.assert_array_equal(idle.numpy(), START)
    optimizer.zero_grad()
    assert first.grad is None and second.grad is None
    with pytest.raises(ValueError, match="two groups"):
        optim.SGD([{"params": [first]}, {"params": [first]}], lr=0.1)
    with pytest.raises(TypeError, match="require gradients"):
        optim.SGD([rb.tensor([1.0])], lr=0.1)


def test_clip_grad_norm_scales_new_gradient_tensors():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(1))
    a.grad, b.grad = rb.tensor(np.array([3.0, 0.0])), rb.tensor(np.array([4.0]))
    old = a.grad.data
    norm = optim.clip_grad_norm_([a, b], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(a.grad.numpy(), [3.0 / (5.0 + 1e-6), 0.0])
    np.testing.assert_allclose(b.grad.numpy(), [4.0 / (5.0 + 1e-6)])
    np.testing.assert_array_equal(old, [3.0, 0.0])
    assert optim.clip_grad_norm_([a, b], max_norm=10.0) == pytest.approx(1.0, rel=1e-5)


def test_warmup_cosine_schedule():
    param = Parameter(START)
    optimizer = optim.SGD([param], lr=1.0)
    schedule = optim.WarmupCosine(optimizer, total_steps=10, warmup_steps=2, min_ratio=0.1)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(10):
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[:2] == [0.5, 1.0]
    for step in range(2, 10):
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 2) / 8))
        assert rates[step] == pytest.approx(0.1 + 0.9 * cosine)
    assert rates[10] == pytest.approx(0.1)


def test_state_dict_round_trip_continues_identically():
    def trained_pair():
        param = Parameter(START.astype(np.float32))
        optimizer = optim.Adam([param], lr=0.1)
        return param, optimizer

    param, optimizer = trained_pair()
    param.grad = rb.tensor(GRADS[0].astype(np.float32))
    optimizer.step()
    state = optimizer.state_dict()
    clone, clone_optimizer = trained_pair()
    clone.data[...] = param.data
    clone_optimizer.load_state_dict(state)
    for target, opt in ((param, optimizer), (clone, clone_optimizer)):
        target.grad = rb.tensor(GRADS[1].astype(np.float32))
        opt.step()
    np.testing.assert_array_equal(param.numpy(), clone.numpy())
    assert clone_optimizer.state_dict()["state"][0]["step"] == 2


def test_load_state_dict_with_wrong_shapes_changes_nothing():
    param = Parameter(START.copy())
    optimizer = optim.Adam([param])
    param.grad = rb.tensor(GRADS[0])
    optimizer.step()
    state = optimizer.state_dict()
    state["state"][0]["exp_avg"] = np.zeros(5)
    before = optimizer.state_dict()
    with pytest.raises(ValueError, match="exp_avg.*shape"):
        optimizer.load_state_dict(state)
    np.testing.assert_array_equal(
        optimizer.state_dict()["state"][0]["exp_avg"], before["state"][0]["exp_avg"]
    )
