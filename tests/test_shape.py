"""Gradient checks of the shape primitives: reshape, transpose, broadcast_to,
indexing (basic, integer-array with repeats, boolean), concatenate, stack, pad."""

import numpy as np
import pytest

import rbprop as rb
from rbprop.check import gradcheck


def leaf(array):
    return rb.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def normal(rng, shape):
    return leaf(rng.standard_normal(shape))


@pytest.mark.parametrize(
    "shape,target",
    [((3, 4), (12,)), ((3, 4), (2, -1)), ((2, 3, 4), (4, 1, 6)), ((), (1, 1)), ((5,), (5, 1))],
)
def test_reshape(rng, shape, target):
    x = normal(rng, shape)
    assert gradcheck(lambda a: rb.reshape(a, target), [x])
    assert gradcheck(lambda a: a.reshape(target), [x])
    assert gradcheck(lambda a: a.reshape(*target), [x])
    assert rb.reshape(x, target).shape == np.empty(shape).reshape(target).shape


def test_flatten_squeeze_expand_dims(rng):
    x = normal(rng, (2, 1, 3))
    assert gradcheck(lambda a: a.flatten(), [x])
    assert gradcheck(lambda a: rb.squeeze(a, 1), [x])
    assert gradcheck(lambda a: rb.squeeze(a), [x])
    assert gradcheck(lambda a: rb.expand_dims(a, -1), [x])
    assert rb.expand_dims(x, 0).shape == (1, 2, 1, 3)


@pytest.mark.parametrize(
    "shape,axes",
    [
        ((3, 4), None),
        ((2, 3, 4), None),
        ((2, 3, 4), (2, 0, 1)),
        ((2, 3, 4), (-1, 1, -3)),
        ((2, 3, 4, 5), (0, 2, 1, 3)),
        ((5,), None),
    ],
)
def test_transpose_and_permute(rng, shape, axes):
    x = normal(rng, shape)
    assert gradcheck(lambda a: rb.transpose(a, axes), [x])
    if axes is not None:
        assert gradcheck(lambda a: a.permute(*axes), [x])
        assert gradcheck(lambda a: rb.permute(a, axes), [x])
        assert rb.transpose(x, axes).shape == np.transpose(np.empty(shape), axes).shape


def test_transpose_property_and_swapaxes(rng):
    x = normal(rng, (2, 3, 4))
    assert gradcheck(lambda a: a.T, [x])
    assert x.T.shape == (4, 3, 2)
    assert gradcheck(lambda a: a.swapaxes(0, -1), [x])
    assert gradcheck(lambda a: rb.swapaxes(a, -2, 1), [x])
    assert rb.swapaxes(x, 0, 1).shape == (3, 2, 4)


@pytest.mark.parametrize(
    "shape,target",
    [((3, 1), (2, 3, 4)), ((4,), (3, 4)), ((), (2, 2)), ((1, 1), (5, 1)), ((2, 3), (2, 3))],
)
def test_broadcast_to(rng, shape, target):
    assert gradcheck(lambda a: rb.broadcast_to(a, target), [normal(rng, shape)])


BASIC_INDICES = [
    (slice(1, 4),),
    (slice(None, None, -1),),
    (slice(4, 0, -2), slice(None, None, -3)),
    (Ellipsis, 2),
    (-1,),
    (2, slice(1, None), 0),
    (None, slice(1, 3), Ellipsis, None),
    (slice(None), np.newaxis, slice(0, 5, 2)),
    (slice(-3, None), -2, slice(None, 1)),
]


@pytest.mark.parametrize("index", BASIC_INDICES, ids=repr)
def test_basic_indexing(rng, index):
    values = rng.standard_normal((5, 6, 3))
    assert gradcheck(lambda a: a[index], [leaf(values)])
    np.testing.assert_array_equal(leaf(values)[index].numpy(), values[index])


ADVANCED_INDICES = [
    np.array([0, 0, 3, 1, 0]),
    [4, 4, 4],
    np.array([[1, 1], [2, 0]]),
    (np.array([1, 1, 2]), slice(1, 4)),
    (np.array([1, 1, 2]), np.array([0, 0, 5])),
    (slice(None), np.array([5, -1, 5]), 1),
    (Ellipsis, np.array([2, 2, 0, 2])),
    np.array([True, False, True, True, False]),
    (slice(1, 3), np.array([True, False, False, True, True, True])),
]


@pytest.mark.parametrize("index", ADVANCED_INDICES, ids=repr)
def test_advanced_indexing_scatter_adds(rng, index):
    values = rng.standard_normal((5, 6, 3))
    assert gradcheck(lambda a: a[index], [leaf(values)])
    np.testing.assert_array_equal(leaf(values)[index].numpy(), values[index])


def test_repeated_integer_index_counts_repeats():
    x = leaf(np.arange(4.0))
    x[np.array([2, 2, 2, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [1.0, 0.0, 3.0, 0.0])


def test_boolean_mask_from_a_tensor_comparison(rng):
    x = normal(rng, (4, 5))
    assert gradcheck(lambda a: a[a > 0.0], [x])
    x.grad = None
    (x[x > 0.0] * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), 2.0 * (x.numpy() > 0))


def test_integer_tensor_as_index(rng):
    index = rb.tensor(np.array([3, 0, 3]))
    assert gradcheck(lambda a: a[index], [normal(rng, (4, 2))])


@pytest.mark.parametrize(
    "shapes,axis",
    [
        ([(3, 2), (3, 5)], -1),
        ([(1, 4), (3, 4), (2, 4)], 0),
        ([(2, 3, 1), (2, 3, 2)], 2),
        ([(6,)], 0),
    ],
)
def test_concatenate(rng, shapes, axis):
    inputs = [normal(rng, shape) for shape in shapes]
    assert gradcheck(lambda *parts: rb.concatenate(list(parts), axis=axis), inputs)


def test_concatenate_with_a_constant(rng):
    constant = rb.tensor(rng.standard_normal((2, 3)))
    assert gradcheck(
        lambda a: rb.concatenate([constant, a, constant], axis=0), [normal(rng, (1, 3))]
    )


@pytest.mark.parametrize(
    "shape,axis", [((3, 2), 0), ((3, 2), 1), ((3, 2), -1), ((), 0), ((4,), -2)]
)
def test_stack(rng, shape, axis):
    inputs = [normal(rng, shape) for _ in range(3)]
    assert gradcheck(lambda *parts: rb.stack(list(parts), axis=axis), inputs)
    assert rb.stack(inputs, axis=axis).shape == np.stack([np.empty(shape)] * 3, axis=axis).shape


@pytest.mark.parametrize(
    "shape,widths",
    [
        ((3, 2), ((1, 2), (0, 3))),
        ((3, 2), 2),
        ((2, 3, 4), ((0, 0), (1, 1), (2, 0))),
        ((5,), [(3, 1)]),
    ],
)
def test_pad(rng, shape, widths):
    x = normal(rng, shape)
    assert gradcheck(lambda a: rb.pad(a, widths), [x])
    assert gradcheck(lambda a: rb.pad(a, widths, value=-1.5), [x])
    np.testing.assert_array_equal(
        rb.pad(x, widths, value=2.0).numpy(), np.pad(x.numpy(), widths, constant_values=2.0)
    )
