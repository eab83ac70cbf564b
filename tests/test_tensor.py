"""The Tensor type: construction and dtypes, conversion, requires_grad, operators,
and gradcheck itself (it must catch a wrong VJP and say where)."""

import numpy as np
import pytest

import rbprop as rb
from rbprop.check import GradcheckError, gradcheck
from rbprop.primitive import Primitive
from rbprop.tensor import record


def test_python_floats_become_float32():
    assert rb.tensor([1.0, 2.0]).dtype == np.float32
    assert rb.tensor([[1, 2.5]]).dtype == np.float32
    assert rb.tensor(1.5).dtype == np.float32


def test_arrays_keep_their_dtype():
    assert rb.tensor(np.zeros(3)).dtype == np.float64
    assert rb.tensor(np.zeros(3, dtype=np.float32)).dtype == np.float32
    assert rb.tensor(np.arange(3)).dtype == np.arange(3).dtype
    assert rb.tensor([1, 2]).dtype.kind == "i"
    assert rb.tensor([1.0], dtype=np.float64).dtype == np.float64
    assert rb.tensor(np.zeros(2), dtype=np.float32).dtype == np.float32


def test_float64_survives_arithmetic_with_python_numbers():
    x = rb.tensor(np.ones(3), requires_grad=True)
    assert (2.0 * x + 1.0).dtype == np.float64
    assert (x**2 / 3.0).dtype == np.float64
    y = rb.tensor([1.0, 2.0], requires_grad=True)
    assert (2.0 * y - 1.0).dtype == np.float32
    (y * 3.0).sum().backward()
    assert y.grad.dtype == np.float32


def test_tensor_from_a_tensor_shares_data():
    x = rb.tensor(np.arange(3.0))
    assert rb.tensor(x).data is x.data


def test_properties():
    x = rb.tensor(np.zeros((2, 3, 4)))
    assert x.shape == (2, 3, 4)
    assert x.ndim == 3
    assert x.size == 24
    assert len(x) == 2
    assert x.device == "cpu"
    assert x.is_leaf
    assert x.grad is None
    assert not x.requires_grad


def test_item_numpy_and_conversions():
    x = rb.tensor(np.array([[2.5]]))
    assert x.item() == 2.5
    assert float(x) == 2.5
    assert int(rb.tensor(np.array(3.0))) == 3
    assert isinstance(x.numpy(), np.ndarray)
    np.testing.assert_array_equal(np.asarray(x), [[2.5]])
    with pytest.raises(ValueError, match=r"item.*shape \(2,\)"):
        rb.tensor(np.zeros(2)).item()


def test_requires_grad_on_float_and_int():
    x = rb.tensor(np.zeros(3))
    assert x.requires_grad_() is x
    assert x.requires_grad
    x.requires_grad_(False)
    assert not x.requires_grad
    with pytest.raises(TypeError, match=r"dtype int"):
        rb.tensor(np.arange(3)).requires_grad_()
    with pytest.raises(TypeError, match=r"dtype int"):
        rb.tensor([1, 2], requires_grad=True)


def test_detach_cuts_the_graph():
    x = rb.tensor(np.ones(3), requires_grad=True)
    y = x * 2.0
    detached = y.detach()
    assert detached.is_leaf
    assert not detached.requires_grad
    assert np.shares_memory(detached.data, y.data)
    loss = (detached * x).sum()
    loss.backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0, 2.0])


def test_comparisons_are_elementwise_and_not_recorded():
    x = rb.tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    mask = x > 1.5
    assert mask.dtype == bool
    assert not mask.requires_grad
    np.testing.assert_array_equal(mask.numpy(), [False, True, True])
    np.testing.assert_array_equal((x == 2.0).numpy(), [False, True, False])
    np.testing.assert_array_equal((x <= 2.0).numpy(), [True, True, False])


def test_operators_match_numpy(rng):
    a, b = rng.uniform(0.5, 2.0, (3, 4)), rng.uniform(0.5, 2.0, (4,))
    x, y = rb.tensor(a), rb.tensor(b)
    for ours, theirs in [
        (x + y, a + b),
        (x - y, a - b),
        (x * y, a * b),
        (x / y, a / b),
        (x**y, a**b),
        (-x, -a),
        (abs(-x), a),
        (+x, a),
        (x @ y, a @ b),
        (1.0 - x, 1.0 - a),
        (2.0 / x, 2.0 / a),
        (b * x, b * a),
    ]:
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-14)


def test_numpy_array_on_the_left_defers_to_tensor():
    x = rb.tensor(np.ones(3), requires_grad=True)
    result = np.arange(3.0) * x
    assert isinstance(result, rb.Tensor)
    assert result.requires_grad


def test_repr_mentions_dtype_and_grad():
    x = rb.tensor(np.ones(2), requires_grad=True)
    assert "float64" in repr(x)
    assert "requires_grad=True" in repr(x)
    assert "op=mul" in repr(x * 2.0)


def test_astype_records_between_float_dtypes(rng):
    x = rb.tensor(rng.standard_normal(4), requires_grad=True)
    y = x.astype(np.float32)
    assert y.dtype == np.float32
    (y * 2.0).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad.numpy(), np.full(4, 2.0))
    assert x.astype(np.int32).dtype == np.int32


class WrongTanh(Primitive):
    """Deliberately wrong VJP (misses the factor 1 - tanh^2) to test gradcheck."""

    name = "wrong_tanh"

    def forward(self, x):
        return np.tanh(x)

    def vjp(self, cotangent):
        return (cotangent,)


def test_gradcheck_catches_a_wrong_vjp_and_names_it(rng):
    x = rb.tensor(rng.standard_normal((3, 4)), requires_grad=True)
    with pytest.raises(GradcheckError, match=r"wrong_tanh: input 0 of shape \(3, 4\)"):
        gradcheck(lambda a: record(WrongTanh, a), [x])
    assert gradcheck(lambda a: record(WrongTanh, a), [x], raise_exception=False) is False


def test_gradcheck_names_the_input_that_is_wrong(rng):
    x = rb.tensor(rng.standard_normal(3), requires_grad=True)
    y = rb.tensor(rng.standard_normal(3), requires_grad=True)
    with pytest.raises(GradcheckError, match=r"input 1 of shape \(3,\)"):
        gradcheck(lambda a, b: a * record(WrongTanh, b), [x, y])


def test_gradcheck_demands_float64_and_a_differentiable_input():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(rb.exp, [rb.tensor([1.0, 2.0], requires_grad=True)])
    with pytest.raises(ValueError, match="no input requires a gradient"):
        gradcheck(rb.exp, [rb.tensor(np.ones(2))])
