"""Gradient checks of matmul (2-D, batched, broadcast batch axes, 1-D operands)
and linear (with and without bias, 1-D, 2-D and 3-D inputs)."""

import numpy as np
import pytest

import rbprop as rb
from rbprop.check import gradcheck


def leaf(array):
    return rb.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def normal(rng, shape):
    return leaf(rng.standard_normal(shape))


MATMUL_SHAPES = [
    ((3, 4), (4, 5)),
    ((1, 1), (1, 1)),
    ((2, 3, 4), (2, 4, 5)),
    ((2, 3, 4), (4, 5)),
    ((3, 4), (2, 4, 5)),
    ((2, 1, 3, 4), (5, 4, 2)),
    ((7,), (7,)),
    ((4,), (4, 3)),
    ((4,), (2, 4, 3)),
    ((3, 4), (4,)),
    ((2, 3, 4), (4,)),
]


@pytest.mark.parametrize("left_shape,right_shape", MATMUL_SHAPES)
def test_matmul(rng, left_shape, right_shape):
    a, b = normal(rng, left_shape), normal(rng, right_shape)
    assert gradcheck(lambda x, y: x @ y, [a, b])
    assert gradcheck(rb.matmul, [a, b])
    expected = np.matmul(a.numpy(), b.numpy())
    result = a @ b
    assert result.shape == expected.shape
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-13)


def test_matmul_one_side_requires_grad(rng):
    constant = rb.tensor(rng.standard_normal((3, 4)))
    assert gradcheck(lambda y: constant @ y, [normal(rng, (2, 4, 5))])
    assert gradcheck(lambda x: x @ constant, [normal(rng, (5, 3))])


def test_numpy_array_on_the_left_of_matmul(rng):
    array = rng.standard_normal((3, 4))  # goes through Tensor.__rmatmul__
    assert gradcheck(lambda x: array @ x, [normal(rng, (4, 2))])


@pytest.mark.parametrize("input_shape", [(4,), (6, 4), (2, 3, 4), (2, 1, 3, 4)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(rng, input_shape, with_bias):
    x, weight, bias = normal(rng, input_shape), normal(rng, (5, 4)), normal(rng, (5,))
    inputs = [x, weight, bias] if with_bias else [x, weight]
    assert gradcheck(rb.linear, inputs)
    assert gradcheck(rb.functional.linear, inputs)
    expected = x.numpy() @ weight.numpy().T + (bias.numpy() if with_bias else 0.0)
    np.testing.assert_allclose(rb.linear(*inputs).numpy(), expected, rtol=1e-13)


def test_linear_with_constant_weight_or_input(rng):
    weight = rb.tensor(rng.standard_normal((3, 4)))
    assert gradcheck(
        lambda x, b: rb.linear(x, weight, b), [normal(rng, (5, 4)), normal(rng, (3,))]
    )
    x = rb.tensor(rng.standard_normal((2, 5, 4)))
    assert gradcheck(lambda w: rb.linear(x, w), [normal(rng, (3, 4))])
