"""The recorded graph: deep chains, freeing saved arrays, retain_graph,
accumulation, no_grad, detach and shared subexpressions."""

import gc
import weakref

import numpy as np
import pytest

import rbprop as rb
from rbprop.autograd import topological_order
from rbprop.primitive import Primitive
from rbprop.tensor import record


def leaf(array):
    return rb.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def test_chain_of_20000_ops_backpropagates():
    x = leaf(np.ones(3))
    y = x
    for step in range(20_000):
        # Alternate ops so that the chain is not one repeated primitive.
        y = y * 1.0001 if step % 2 else y + 0.001
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.full(3, 1.0001**10_000), rtol=1e-12)


def test_chain_of_20000_ops_is_freed_without_recursion(rng):
    x = leaf(rng.standard_normal(4))
    y = x
    for _ in range(20_000):
        y = rb.tanh(y)
    reference = weakref.ref(y.op)
    del y
    gc.collect()
    assert reference() is None


def _small_graph(rng):
    """A graph whose intermediates are referenced only by what the ops saved."""
    x = leaf(rng.standard_normal((4, 5)))
    constant = rb.tensor(rng.standard_normal((4, 5)))
    exponential = rb.exp(x * constant)
    watched = weakref.ref(exponential.data)
    loss = (rb.tanh(exponential) * x).sum()
    return x, loss, watched


def test_backward_releases_saved_arrays(rng):
    before = rb.cost.saved_bytes.current
    x, loss, watched = _small_graph(rng)
    ops = topological_order(loss.op)
    assert {op.name for op in ops} == {"sum", "mul", "tanh", "exp"}
    assert any(op.saved_arrays() for op in ops)
    assert rb.cost.saved_bytes.current > before
    gc.collect()
    assert watched() is not None  # kept alive by exp's and tanh's saved arrays

    loss.backward()
    assert all(op.saved_arrays() == {} for op in ops)
    gc.collect()
    assert watched() is None
    assert rb.cost.saved_bytes.current == before
    assert x.grad is not None


def test_saved_bytes_counts_a_shared_buffer_once(rng):
    before = rb.cost.saved_bytes.current
    x = leaf(rng.standard_normal(1000))
    y = rb.exp(x)  # saves its output (8000 bytes)
    z = y * y  # saves the same buffer twice
    assert rb.cost.saved_bytes.current - before == 8000
    z.sum().backward()
    assert rb.cost.saved_bytes.current == before


def test_a_graph_dropped_without_backward_releases_its_arrays(rng):
    before = rb.cost.saved_bytes.current
    x, loss, watched = _small_graph(rng)
    assert rb.cost.saved_bytes.current > before
    del loss
    gc.collect()
    assert watched() is None
    assert rb.cost.saved_bytes.current == before


def test_second_backward_through_a_freed_graph_raises(rng):
    _, loss, _ = _small_graph(rng)
    loss.backward()
    with pytest.raises(RuntimeError, match=r"freed.*retain_graph"):
        loss.backward()


def test_retain_graph_allows_a_second_backward_that_accumulates(rng):
    x, loss, _ = _small_graph(rng)
    loss.backward(retain_graph=True)
    first = x.grad.numpy().copy()
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * first, rtol=1e-15)
    with pytest.raises(RuntimeError, match="freed"):
        loss.backward()


def test_gradients_accumulate_across_calls(rng):
    x = leaf(rng.standard_normal(5))
    (x * x).sum().backward()
    (3.0 * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy() + 3.0, rtol=1e-15)
    earlier = x.grad
    x.sum().backward()
    # The earlier gradient tensor is not modified in place.
    np.testing.assert_allclose(earlier.numpy(), 2 * x.numpy() + 3.0, rtol=1e-15)
    x.grad = None
    x.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.ones(5))


def test_backward_on_a_leaf():
    x = leaf([1.0, 2.0])
    x.backward(np.array([3.0, 4.0]))
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 4.0])


def test_backward_with_an_explicit_cotangent(rng):
    x = leaf(rng.standard_normal((2, 3)))
    cotangent = rng.standard_normal((2, 3))
    (x * 5.0).backward(cotangent)
    np.testing.assert_allclose(x.grad.numpy(), 5.0 * cotangent, rtol=1e-15)
    x.grad = None
    (x * 5.0).backward(rb.tensor(cotangent))
    np.testing.assert_allclose(x.grad.numpy(), 5.0 * cotangent, rtol=1e-15)


def test_no_grad_records_nothing(rng):
    x = leaf(rng.standard_normal(3))
    with rb.no_grad():
        y = rb.exp(x) * 2.0
        assert not rb.grad_enabled()
    assert rb.grad_enabled()
    assert not y.requires_grad
    assert y.op is None
    with rb.no_grad(), rb.enable_grad():
        assert (x * 2.0).op is not None
    with rb.set_grad_enabled(False):
        assert (x * 2.0).op is None


def test_ops_on_constants_are_not_recorded():
    y = rb.tensor(np.ones(3)) * 2.0
    assert y.op is None
    assert not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        y.sum().backward()


def test_diamond_sums_both_paths(rng):
    x = leaf(rng.standard_normal(4))
    shared = rb.exp(x)
    loss = (shared * 3.0 + rb.tanh(shared)).sum()
    loss.backward()
    exponential = np.exp(x.numpy())
    expected = exponential * (3.0 + 1.0 - np.tanh(exponential) ** 2)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-13)


def test_the_same_leaf_twice_in_one_op(rng):
    x = leaf(rng.standard_normal(4))
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy(), rtol=1e-15)


def test_leaf_used_by_many_ops_at_different_depths(rng):
    x = leaf(rng.standard_normal(3))
    y = x
    for _ in range(50):
        y = y * 0.5 + x
    y.sum().backward()
    # y_n = 0.5 y_{n-1} + x with y_0 = x: dy_n/dx = 0.5^n + sum_{i<n} 0.5^i
    expected = 0.5**50 + sum(0.5**i for i in range(50))
    np.testing.assert_allclose(x.grad.numpy(), np.full(3, expected), rtol=1e-14)


class StopGradient(Primitive):
    """Identity forward, no gradient (its VJP returns None for its input)."""

    name = "stop_gradient"

    def forward(self, x):
        return x.copy()

    def vjp(self, cotangent):
        return (None,)


def test_ops_behind_a_zero_gradient_are_freed_too(rng):
    before = rb.cost.saved_bytes.current
    x = leaf(rng.standard_normal(6))
    blocked = record(StopGradient, rb.exp(x))
    loss = (blocked * x).sum()
    exp_op = blocked.op.edges[0]
    assert exp_op.saved_arrays()
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), np.exp(x.numpy()), rtol=1e-15)
    assert exp_op.saved_arrays() == {}
    del blocked
    assert rb.cost.saved_bytes.current == before


def test_float32_training_default_flows_through_backward():
    x = rb.tensor([[0.5, -1.0], [2.0, 0.25]], requires_grad=True)
    weight = rb.tensor([[1.0, 2.0]], requires_grad=True)
    loss = rb.tanh(rb.linear(x, weight)).mean()
    loss.backward()
    assert loss.dtype == np.float32
    assert x.grad.dtype == np.float32
    assert weight.grad.dtype == np.float32
