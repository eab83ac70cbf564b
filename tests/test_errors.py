"""Bad input raises errors that name the op and the shapes involved."""

import numpy as np
import pytest

import rbprop as rb
from rbprop.primitive import ShapeError


def ones(*shape, requires_grad=False):
    return rb.tensor(np.ones(shape), requires_grad=requires_grad)


def test_matmul_inner_mismatch():
    with pytest.raises(ShapeError, match=r"matmul.*\(3, 4\).*\(5, 2\)"):
        ones(3, 4) @ ones(5, 2)
    with pytest.raises(ShapeError, match=r"matmul.*\(3, 4\).*\(5,\)"):
        rb.matmul(ones(3, 4), ones(5))
    with pytest.raises(ShapeError, match=r"matmul.*\(6,\).*\(5, 2\)"):
        ones(6) @ ones(5, 2)


def test_matmul_batch_mismatch():
    with pytest.raises(ShapeError, match=r"matmul.*\(2, 3, 4\).*\(3, 4, 2\)"):
        ones(2, 3, 4) @ ones(3, 4, 2)


def test_matmul_of_a_scalar():
    with pytest.raises(ShapeError, match=r"matmul.*\(\).*\(3,\)"):
        rb.matmul(ones(), ones(3))


@pytest.mark.parametrize(
    "op,name",
    [
        (lambda a, b: a + b, "add"),
        (lambda a, b: a - b, "sub"),
        (lambda a, b: a * b, "mul"),
        (lambda a, b: a / b, "div"),
        (lambda a, b: a**b, "pow"),
        (rb.maximum, "maximum"),
        (rb.minimum, "minimum"),
    ],
)
def test_broadcasting_mismatch(op, name):
    with pytest.raises(ShapeError, match=rf"{name}.*\(3, 4\).*\(5,\)"):
        op(ones(3, 4, requires_grad=True), ones(5))


def test_where_broadcasting_mismatch():
    with pytest.raises(ShapeError, match=r"where.*\(3, 4\).*\(2, 4\)"):
        rb.where(np.ones((3, 4), dtype=bool), ones(3, 4), ones(2, 4))


def test_broadcast_to_mismatch():
    with pytest.raises(ShapeError, match=r"broadcast_to.*\(3, 2\).*\(3, 4\)"):
        rb.broadcast_to(ones(3, 2), (3, 4))


def test_linear_mismatch():
    with pytest.raises(ShapeError, match=r"linear.*\(2, 3\).*\(5, 4\)"):
        rb.linear(ones(2, 3), ones(5, 4))
    with pytest.raises(ShapeError, match=r"linear.*\(4,\).*\(5, 4\)"):
        rb.linear(ones(2, 4), ones(5, 4), ones(4))
    with pytest.raises(ShapeError, match=r"linear.*\(5, 4, 1\)"):
        rb.linear(ones(2, 4), ones(5, 4, 1))


def test_reshape_impossible():
    with pytest.raises(ShapeError, match=r"reshape.*\(3, 4\).*\(5, -1\)"):
        ones(3, 4).reshape(5, -1)
    with pytest.raises(ShapeError, match=r"reshape.*\(3, 4\).*\(13,\)"):
        rb.reshape(ones(3, 4), 13)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda x: x.sum(axis=5), "sum"),
        (lambda x: x.mean(axis=(0, -4)), "mean"),
        (lambda x: x.max(axis=3), "max"),
        (lambda x: x.min(axis=-4), "min"),
        (lambda x: rb.logsumexp(x, axis=3), "logsumexp"),
        (lambda x: rb.softmax(x, axis=3), "softmax"),
        (lambda x: rb.log_softmax(x, axis=-4), "log_softmax"),
        (lambda x: x.transpose(0, 1, 3), "transpose"),
        (lambda x: x.swapaxes(0, 7), "swapaxes"),
        (lambda x: rb.concatenate([x, x], axis=3), "concatenate"),
    ],
)
def test_bad_axis(call, name):
    with pytest.raises(np.exceptions.AxisError, match=rf"{name}: axis .*\(2, 3, 4\)"):
        call(ones(2, 3, 4))


def test_repeated_axis():
    with pytest.raises(ValueError, match=r"sum: repeated axis"):
        ones(2, 3).sum(axis=(1, -1))


def test_concatenate_and_stack_mismatch():
    with pytest.raises(ShapeError, match=r"concatenate.*\(2, 5\).*\(2, 3\)"):
        rb.concatenate([ones(2, 3), ones(2, 5)], axis=0)
    with pytest.raises(ShapeError, match=r"stack.*\(2, 3\).*\(3, 2\)"):
        rb.stack([ones(2, 3), ones(3, 2)])


def test_index_out_of_range():
    with pytest.raises(IndexError, match=r"getitem.*\(2, 3\)"):
        ones(2, 3)[5]


def test_backward_of_a_non_scalar_needs_a_cotangent():
    y = ones(3, 4, requires_grad=True) * 2.0
    with pytest.raises(RuntimeError, match=r"backward.*cotangent.*\(3, 4\).*output of mul"):
        y.backward()


def test_backward_with_a_cotangent_of_the_wrong_shape():
    y = ones(3, 4, requires_grad=True) * 2.0
    with pytest.raises(ValueError, match=r"backward.*cotangent of shape \(4, 3\).*\(3, 4\)"):
        y.backward(np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 4\).*output of mul"):
        y.backward(rb.tensor(np.ones((4, 3))))


def test_int_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match=r"requires_grad.*dtype int64.*\(3,\)"):
        rb.tensor(np.arange(3, dtype=np.int64)).requires_grad_()


def test_bad_arguments_name_the_op():
    with pytest.raises(ValueError, match="gelu: approximate"):
        rb.gelu(ones(2), approximate="fast")
    with pytest.raises(ValueError, match="clip"):
        rb.clip(ones(2))
    with pytest.raises(ValueError, match=r"pad: pad_width"):
        rb.pad(ones(2), ((-1, 0),))
