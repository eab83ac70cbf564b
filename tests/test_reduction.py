"""Gradient checks of the reductions and normalised exponentials.

Covers axis None / int / tuple / negative, keepdims, and 0-d and 1-d inputs.
Inputs to max and min are distinct values spaced far more than the
finite-difference step apart, so there is no tie (no kink) within reach.
"""

import numpy as np
import pytest

import rbprop as rb
from rbprop.check import gradcheck

AXES = [
    ((3, 4, 5), None),
    ((3, 4, 5), 0),
    ((3, 4, 5), 1),
    ((3, 4, 5), -1),
    ((3, 4, 5), (0, 2)),
    ((3, 4, 5), (-1, -3)),
    ((3, 4, 5), (0, 1, 2)),
    ((7,), 0),
    ((7,), None),
    ((1, 6), -2),
    ((), None),
]


def leaf(array):
    return rb.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def distinct(rng, shape):
    """Values that are a shuffled grid with spacing 0.1 (no ties within 1e-6)."""
    size = int(np.prod(shape))
    return leaf(rng.permutation(size).reshape(shape) * 0.1 - 0.05 * size)


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("shape,axis", AXES)
def test_sum_and_mean(rng, shape, axis, keepdims):
    x = leaf(rng.standard_normal(shape))
    assert gradcheck(lambda a: rb.sum(a, axis=axis, keepdims=keepdims), [x])
    assert gradcheck(lambda a: a.sum(axis=axis, keepdims=keepdims), [x])
    assert gradcheck(lambda a: rb.mean(a, axis=axis, keepdims=keepdims), [x])
    assert gradcheck(lambda a: a.mean(axis=axis, keepdims=keepdims), [x])


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("shape,axis", AXES)
def test_max_and_min(rng, shape, axis, keepdims):
    x = distinct(rng, shape)
    assert gradcheck(lambda a: rb.max(a, axis=axis, keepdims=keepdims), [x])
    assert gradcheck(lambda a: a.max(axis=axis, keepdims=keepdims), [x])
    assert gradcheck(lambda a: rb.min(a, axis=axis, keepdims=keepdims), [x])
    assert gradcheck(lambda a: a.min(axis=axis, keepdims=keepdims), [x])


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("shape,axis", AXES)
def test_var_and_logsumexp(rng, shape, axis, keepdims):
    x = leaf(rng.standard_normal(shape))
    if shape:  # the variance of a single number is constant
        assert gradcheck(lambda a: rb.var(a, axis=axis, keepdims=keepdims), [x])
        assert gradcheck(lambda a: a.var(axis=axis, keepdims=keepdims), [x])
    assert gradcheck(lambda a: rb.logsumexp(a, axis=axis, keepdims=keepdims), [x])


@pytest.mark.parametrize("shape,axis", AXES)
def test_forward_values_match_numpy(rng, shape, axis):
    values = rng.standard_normal(shape)
    x = leaf(values)
    for ours, theirs in [
        (rb.sum, np.sum),
        (rb.mean, np.mean),
        (rb.max, np.max),
        (rb.min, np.min),
        (rb.var, np.var),
    ]:
        for keepdims in (False, True):
            expected = theirs(values, axis=axis, keepdims=keepdims)
            result = ours(x, axis=axis, keepdims=keepdims)
            assert result.shape == np.shape(expected)
            np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-14)
    expected = np.log(np.sum(np.exp(values), axis=axis))
    np.testing.assert_allclose(rb.logsumexp(x, axis=axis).numpy(), expected, rtol=1e-12)


def test_logsumexp_is_stable_for_large_inputs():
    x = leaf([[1000.0, 1000.0], [-1000.0, -1001.0]])
    result = rb.logsumexp(x, axis=1)
    np.testing.assert_allclose(
        result.numpy(), [1000.0 + np.log(2.0), -1000.0 + np.log1p(np.exp(-1.0))]
    )
    result.sum().backward()
    expected = [[0.5, 0.5], [1 / (1 + np.exp(-1.0)), 1 - 1 / (1 + np.exp(-1.0))]]
    np.testing.assert_allclose(x.grad.numpy(), expected)


def test_max_ties_share_the_cotangent():
    x = leaf([[3.0, 1.0, 3.0], [0.0, 2.0, 1.0]])
    rb.max(x, axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])


SOFTMAX_AXES = [
    ((6,), 0),
    ((6,), -1),
    ((4, 5), 0),
    ((4, 5), 1),
    ((4, 5), -1),
    ((4, 5), -2),
    ((2, 3, 4), 1),
    ((2, 3, 4), -3),
    ((1, 1), -1),
]


@pytest.mark.parametrize("shape,axis", SOFTMAX_AXES)
def test_softmax_and_log_softmax(rng, shape, axis):
    x = leaf(2.0 * rng.standard_normal(shape))
    assert gradcheck(lambda a: rb.softmax(a, axis=axis), [x])
    assert gradcheck(lambda a: rb.log_softmax(a, axis=axis), [x])
    assert gradcheck(lambda a: rb.functional.softmax(a, dim=axis), [x])
    assert gradcheck(lambda a: rb.functional.log_softmax(a, dim=axis), [x])


@pytest.mark.parametrize("shape,axis", SOFTMAX_AXES)
def test_softmax_values(rng, shape, axis):
    values = 50.0 * rng.standard_normal(shape)
    shifted = values - values.max(axis=axis, keepdims=True)
    expected = np.exp(shifted) / np.exp(shifted).sum(axis=axis, keepdims=True)
    x = leaf(values)
    np.testing.assert_allclose(rb.softmax(x, axis=axis).numpy(), expected, rtol=1e-12, atol=1e-300)
    log_expected = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    np.testing.assert_allclose(rb.log_softmax(x, axis=axis).numpy(), log_expected, rtol=1e-12)
