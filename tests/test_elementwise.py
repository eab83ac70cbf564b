"""Gradient checks (float64, central differences) of the elementwise primitives.

Inputs are drawn away from the kinks of abs, relu, clip, maximum and minimum
so that central differences never straddle a point where the derivative jumps.
"""

import numpy as np
import pytest

import rbprop as rb
from rbprop.check import gradcheck

# Pairs of shapes that broadcast: equal, trailing, middle singleton, scalar, 0-d.
BROADCAST_PAIRS = [
    ((3, 4), (3, 4)),
    ((3, 1, 4), (2, 4)),
    ((2, 4), (3, 1, 4)),
    ((5, 1), (1, 3)),
    ((7,), ()),
    ((), (2, 3)),
    ((1,), (2, 1, 3)),
]


def leaf(array):
    return rb.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def normal(rng, shape):
    return leaf(rng.standard_normal(shape))


def away_from_zero(rng, shape, margin=0.1):
    """Values with |x| >= margin and random signs (no kink of abs/relu within eps)."""
    magnitude = rng.uniform(margin, 2.0, size=shape)
    return leaf(magnitude * rng.choice([-1.0, 1.0], size=shape))


def positive(rng, shape, low=0.5, high=2.0):
    return leaf(rng.uniform(low, high, size=shape))


def separated_pair(rng, left_shape, right_shape, gap=0.1):
    """Two arrays whose broadcast values differ by at least ``gap`` everywhere."""
    left = rng.standard_normal(left_shape)
    right = rng.standard_normal(right_shape)
    shape = np.broadcast_shapes(left_shape, right_shape)
    difference = np.broadcast_to(left, shape) - np.broadcast_to(right, shape)
    while np.min(np.abs(difference)) < gap:
        right = rng.standard_normal(right_shape)
        difference = np.broadcast_to(left, shape) - np.broadcast_to(right, shape)
    return leaf(left), leaf(right)


@pytest.mark.parametrize("left_shape,right_shape", BROADCAST_PAIRS)
@pytest.mark.parametrize(
    "op",
    [
        lambda a, b: a + b,
        lambda a, b: a - b,
        lambda a, b: a * b,
        rb.add,
        rb.subtract,
        rb.multiply,
    ],
    ids=["add", "sub", "mul", "rb.add", "rb.subtract", "rb.multiply"],
)
def test_arithmetic_broadcasting(rng, op, left_shape, right_shape):
    assert gradcheck(op, [normal(rng, left_shape), normal(rng, right_shape)])


@pytest.mark.parametrize("left_shape,right_shape", BROADCAST_PAIRS)
def test_div_broadcasting(rng, left_shape, right_shape):
    denominator = away_from_zero(rng, right_shape, margin=0.5)
    assert gradcheck(lambda a, b: a / b, [normal(rng, left_shape), denominator])
    assert gradcheck(rb.divide, [normal(rng, left_shape), denominator])


def test_operators_with_python_numbers(rng):
    x = away_from_zero(rng, (3, 5), margin=0.5)
    assert gradcheck(lambda a: 2.5 + a, [x])
    assert gradcheck(lambda a: 1.5 - a, [x])
    assert gradcheck(lambda a: a - 1.5, [x])
    assert gradcheck(lambda a: -3.0 * a, [x])
    assert gradcheck(lambda a: 2.0 / a, [x])
    assert gradcheck(lambda a: a / 4.0, [x])


def test_neg(rng):
    assert gradcheck(lambda a: -a, [normal(rng, (4, 3))])
    assert gradcheck(rb.negative, [normal(rng, (2, 3, 4))])


def test_pow_tensor_exponent_broadcasting(rng):
    base = positive(rng, (3, 4))
    exponent = normal(rng, (4,))
    assert gradcheck(lambda a, b: a**b, [base, exponent])
    assert gradcheck(rb.power, [positive(rng, (2, 1, 3)), normal(rng, (4, 1))])


@pytest.mark.parametrize("exponent", [2, 3, -1, -2, 0.5, 1.7])
def test_pow_scalar_exponent(rng, exponent):
    assert gradcheck(lambda a: a**exponent, [positive(rng, (3, 4))])


def test_pow_scalar_base(rng):
    assert gradcheck(lambda a: 2.0**a, [normal(rng, (3, 4))])


def test_pow_only_exponent_requires_grad(rng):
    base = rb.tensor(rng.uniform(0.5, 2.0, (5,)))
    assert gradcheck(lambda a, b: a**b, [base, normal(rng, (5,))])


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 4), (2, 3, 5)])
@pytest.mark.parametrize("op", [rb.exp, rb.tanh, rb.sigmoid], ids=["exp", "tanh", "sigmoid"])
def test_smooth_unary(rng, op, shape):
    assert gradcheck(op, [normal(rng, shape)])


@pytest.mark.parametrize("shape", [(), (7,), (3, 4), (2, 3, 5)])
def test_log_and_sqrt(rng, shape):
    assert gradcheck(rb.log, [positive(rng, shape)])
    assert gradcheck(rb.sqrt, [positive(rng, shape)])
    assert gradcheck(lambda a: a.log(), [positive(rng, shape)])
    assert gradcheck(lambda a: a.sqrt(), [positive(rng, shape)])


def test_sigmoid_extreme_inputs_stay_finite():
    x = leaf([-800.0, -30.0, 0.0, 30.0, 800.0])
    y = rb.sigmoid(x)
    assert np.all(np.isfinite(y.numpy()))
    y.sum().backward()
    assert np.all(np.isfinite(x.grad.numpy()))


@pytest.mark.parametrize("shape", [(), (9,), (3, 4), (2, 3, 5)])
def test_abs_and_relu_away_from_zero(rng, shape):
    assert gradcheck(rb.abs, [away_from_zero(rng, shape)])
    assert gradcheck(lambda a: abs(a), [away_from_zero(rng, shape)])
    assert gradcheck(rb.relu, [away_from_zero(rng, shape)])
    assert gradcheck(lambda a: a.relu(), [away_from_zero(rng, shape)])


def test_relu_gradient_is_the_mask():
    x = leaf([-2.0, -0.5, 0.5, 3.0])
    rb.relu(x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(), (11,), (3, 4)])
def test_gelu(rng, approximate, shape):
    x = leaf(3.0 * rng.standard_normal(shape))
    assert gradcheck(lambda a: rb.gelu(a, approximate=approximate), [x])


def test_gelu_values(rng):
    from math import erf, pi, sqrt, tanh

    values = rng.standard_normal(20)
    exact = rb.gelu(leaf(values)).numpy()
    expected = [0.5 * v * (1 + erf(v / sqrt(2))) for v in values]
    np.testing.assert_allclose(exact, expected, rtol=1e-13, atol=1e-15)
    approximate = rb.gelu(leaf(values), approximate="tanh").numpy()
    expected = [0.5 * v * (1 + tanh(sqrt(2 / pi) * (v + 0.044715 * v**3))) for v in values]
    np.testing.assert_allclose(approximate, expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("left_shape,right_shape", BROADCAST_PAIRS)
@pytest.mark.parametrize("op", [rb.maximum, rb.minimum], ids=["maximum", "minimum"])
def test_maximum_minimum_broadcasting(rng, op, left_shape, right_shape):
    assert gradcheck(op, list(separated_pair(rng, left_shape, right_shape)))


def test_maximum_with_number(rng):
    assert gradcheck(lambda a: rb.maximum(a, 0.0), [away_from_zero(rng, (4, 5))])
    assert gradcheck(lambda a: rb.minimum(1.0, a), [leaf(rng.uniform(1.2, 2.0, (3,)))])


def test_maximum_tie_splits_the_cotangent():
    x, y = leaf([1.0, 2.0, 3.0]), leaf([1.0, 5.0, 0.0])
    rb.maximum(x, y).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.5, 0.0, 1.0])
    np.testing.assert_array_equal(y.grad.numpy(), [0.5, 1.0, 0.0])


@pytest.mark.parametrize(
    "condition_shape,left_shape,right_shape",
    [((3, 4), (3, 4), (3, 4)), ((3, 1, 4), (2, 4), (3, 2, 1)), ((4,), (2, 4), ())],
)
def test_where(rng, condition_shape, left_shape, right_shape):
    condition = rng.random(condition_shape) > 0.5
    assert gradcheck(
        lambda a, b: rb.where(condition, a, b),
        [normal(rng, left_shape), normal(rng, right_shape)],
    )


def test_where_with_tensor_condition_and_number(rng):
    x = normal(rng, (4, 6))
    assert gradcheck(lambda a: rb.where(a > 0.0, a, 0.25), [x])
    assert gradcheck(lambda a: rb.where(a < 0.0, -1.0, a * a), [x])


def test_clip(rng):
    # Values in [-2, 2] kept at least 0.05 away from the bounds -1 and 0.5.
    values = rng.uniform(-2.0, 2.0, (6, 7))
    values = values[(np.abs(values + 1.0) > 0.05) & (np.abs(values - 0.5) > 0.05)]
    x = leaf(values)
    assert gradcheck(lambda a: rb.clip(a, -1.0, 0.5), [x])
    assert gradcheck(lambda a: a.clip(a_min=-1.0), [x])
    assert gradcheck(lambda a: a.clip(a_max=0.5), [x])


def test_clip_gradient_is_zero_outside():
    x = leaf([-3.0, -0.5, 0.2, 4.0])
    rb.clip(x, -1.0, 1.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 1.0, 1.0, 0.0])


def test_forward_values_match_numpy(rng):
    a = rng.standard_normal((3, 4))
    b = rng.uniform(0.5, 2.0, (4,))
    x, y = leaf(a), leaf(b)
    np.testing.assert_allclose((x / y).numpy(), a / b)
    np.testing.assert_allclose((y**x).numpy(), b**a)
    np.testing.assert_allclose(rb.sigmoid(x).numpy(), 1 / (1 + np.exp(-a)))
    np.testing.assert_allclose(rb.where(a > 0, x, y).numpy(), np.where(a > 0, a, b))
    np.testing.assert_allclose(rb.clip(x, -0.5, 0.5).numpy(), np.clip(a, -0.5, 0.5))
