"""Row-sparse cotangents: arithmetic, exact VJPs on kept rows, and sampled chains.

A sampled VJP on the batch rows hands its producer a :class:`RowSparse`
cotangent; row-local ops and ``linear`` then work on the kept rows only. These
tests pin that the compact path computes exactly what the dense definition
``J^T S v`` does, in float64, with the samples the ops actually drew.
"""

from __future__ import annotations

import numpy as np
import pytest

import rbprop
from rbprop import functional as F
from rbprop.autograd import topological_order
from rbprop.rowsparse import RowSparse, densify, restrict
from rbprop.sketch import Bernoulli, DiagonalSample, UniformK


def _sparse(rng, rows, kept, tail=(3,)):
    indices = np.sort(rng.choice(rows, size=kept, replace=False))
    return RowSparse(indices, rng.standard_normal((kept,) + tail), (rows,) + tail)


def test_dense_puts_values_on_their_rows_and_zeros_elsewhere():
    sparse = RowSparse([1, 3], np.array([[1.0, 2.0], [3.0, 4.0]]), (4, 2))
    np.testing.assert_array_equal(sparse.dense(), [[0, 0], [1, 2], [0, 0], [3, 4]])
    assert sparse.kept == 2 and sparse.ndim == 2 and sparse.dtype == np.float64
    assert densify(sparse).shape == (4, 2)
    plain = np.ones(3)
    assert densify(plain) is plain


@pytest.mark.parametrize("same_rows", [True, False])
def test_sum_of_row_sparse_cotangents_matches_dense_sum(same_rows):
    rng = np.random.default_rng(0)
    first = _sparse(rng, 10, 4)
    second = (
        RowSparse(first.indices, rng.standard_normal(first.values.shape), first.shape)
        if same_rows
        else _sparse(rng, 10, 5)
    )
    total = first + second
    assert isinstance(total, RowSparse)
    assert np.all(np.diff(total.indices) > 0)
    np.testing.assert_allclose(total.dense(), first.dense() + second.dense(), rtol=0, atol=0)


def test_dense_plus_row_sparse_in_either_order_leaves_the_operands_alone():
    rng = np.random.default_rng(1)
    sparse = _sparse(rng, 6, 2)
    dense = rng.standard_normal((6, 3))
    before = dense.copy()
    for total in (dense + sparse, sparse + dense):
        assert isinstance(total, np.ndarray)
        np.testing.assert_allclose(total, before + sparse.dense(), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(dense, before)


def test_adding_mismatched_shapes_names_both():
    sparse = RowSparse([0], np.ones((1, 2)), (3, 2))
    with pytest.raises(ValueError, match=r"\(3, 3\) and \(3, 2\)"):
        _ = sparse + np.ones((3, 3))
    with pytest.raises(ValueError, match=r"\(4, 2\) and \(3, 2\)"):
        _ = sparse + RowSparse([0], np.ones((1, 2)), (4, 2))


def test_restrict_keeps_rows_that_both_keep_with_their_positions():
    sample = DiagonalSample(10, [1, 4, 6, 9], [2.0, 2.0, 2.0, 2.0])
    common, in_sample, in_cotangent = restrict(sample, np.array([0, 4, 5, 9]))
    np.testing.assert_array_equal(common, [4, 9])
    np.testing.assert_array_equal(sample.indices[in_sample], [4, 9])
    np.testing.assert_array_equal(np.array([0, 4, 5, 9])[in_cotangent], [4, 9])
    everything = restrict(sample, None)
    np.testing.assert_array_equal(everything[0], sample.indices)


# -- exact VJPs of a row-sparse cotangent ----------------------------------------------


def _record(build, *shapes, seed=0):
    rng = np.random.default_rng(seed)
    inputs = [rbprop.tensor(rng.standard_normal(shape), requires_grad=True) for shape in shapes]
    return inputs, build(*inputs)


EXACT_CASES = {
    "relu": (lambda x: F.relu(x), [(8, 5)]),
    "gelu": (lambda x: F.gelu(x), [(8, 5)]),
    "mul with a broadcast operand": (lambda x, w: x * w, [(8, 5), (5,)]),
    "add with a broadcast operand": (lambda x, b: x + b, [(8, 5), (1, 5)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (5,), w, b), [(8, 5), (5,), (5,)]),
    "softmax": (lambda x: F.softmax(x, -1), [(8, 5)]),
    "sum over features": (lambda x: x.sum(axis=1, keepdims=True), [(8, 5)]),
    "linear": (lambda x, w, b: F.linear(x, w, b), [(8, 5), (4, 5), (4,)]),
    "linear on tokens": (lambda x, w: F.linear(x, w), [(8, 3, 5), (4, 5)]),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_vjp_of_row_sparse_cotangent_equals_dense(case):
    build, shapes = EXACT_CASES[case]
    inputs, output = _record(build, *shapes)
    rng = np.random.default_rng(3)
    sparse = _sparse(rng, output.shape[0], 3, tuple(output.shape[1:]))
    op = output.op
    sparse_grads = op.run_vjp(sparse)
    dense_grads = op.run_vjp(sparse.dense())
    for sparse_grad, dense_grad in zip(sparse_grads, dense_grads, strict=True):
        if dense_grad is None:
            continue
        np.testing.assert_allclose(densify(sparse_grad), dense_grad, rtol=1e-13, atol=1e-13)
    row_input = densify(sparse_grads[0])
    untouched = np.setdiff1d(np.arange(output.shape[0]), sparse.indices)
    assert np.all(row_input[untouched] == 0)


def test_row_local_op_returns_row_sparse_input_gradient():
    (x,), output = _record(lambda x: F.relu(x), (6, 4))
    grads = output.op.run_vjp(RowSparse([2, 5], np.ones((2, 4)), (6, 4)))
    assert isinstance(grads[0], RowSparse)
    np.testing.assert_array_equal(grads[0].indices, [2, 5])


def test_op_that_is_not_row_local_gets_the_dense_array():
    (x,), output = _record(lambda x: x.sum(axis=0), (6, 4))
    producer = output.op
    grads = producer.run_vjp(np.ones(4))
    assert isinstance(grads[0], np.ndarray)
    # A cotangent sparse along the rows of a transpose's output goes in dense.
    (y,), moved = _record(lambda y: y.T, (4, 6))
    grads = moved.op.run_vjp(RowSparse([1], np.ones((1, 4)), (6, 4)))
    np.testing.assert_array_equal(densify(grads[0])[:, 1], np.ones(4))


# -- sampled chains: the compact path equals J^T S v with the drawn samples --------------


def _mlp_reference(x, weights, biases, samples, cotangent, placement):
    """Dense float64 reverse pass of ``linear -> relu -> linear`` with diagonal sketches.

    ``samples[i]`` is the DiagonalSample layer ``i`` drew on its batch rows:
    ``dW = V^T S X``, ``db = 1^T S V`` and ``dX = S V W`` ("contracted") or
    ``dX = V W`` ("weight").
    """
    hidden_in = x @ weights[0].T + biases[0]
    hidden = np.maximum(hidden_in, 0)
    grads = {}
    sketched = samples[1].dense() @ cotangent
    grads["w1"], grads["b1"] = sketched.T @ hidden, sketched.sum(axis=0)
    passed = sketched if placement == "contracted" else cotangent
    hidden_grad = (passed @ weights[1]) * (hidden_in > 0)
    sketched = samples[0].dense() @ hidden_grad
    grads["w0"], grads["b0"] = sketched.T @ x, sketched.sum(axis=0)
    grads["x"] = (sketched if placement == "contracted" else hidden_grad) @ weights[0]
    return grads


@pytest.mark.parametrize("placement", ["contracted", "weight"])
@pytest.mark.parametrize("family", [Bernoulli, UniformK])
def test_sampled_mlp_gradient_equals_dense_composition_of_its_samples(family, placement):
    sketch = family(0.5, placement=placement)
    rng = np.random.default_rng(7)
    rows, width, hidden_width, classes = 16, 6, 5, 3
    x = rbprop.tensor(rng.standard_normal((rows, width)), requires_grad=True)
    weights = [
        rbprop.tensor(rng.standard_normal((hidden_width, width)), requires_grad=True),
        rbprop.tensor(rng.standard_normal((classes, hidden_width)), requires_grad=True),
    ]
    biases = [
        rbprop.tensor(rng.standard_normal(hidden_width), requires_grad=True),
        rbprop.tensor(rng.standard_normal(classes), requires_grad=True),
    ]
    cotangent = rng.standard_normal((rows, classes))
    with rbprop.sampled({"linear": sketch}, seed=11):
        output = F.linear(F.relu(F.linear(x, weights[0], biases[0])), weights[1], biases[1])
    linears = [op for op in topological_order(output.op) if op.name == "linear"][::-1]
    samples = [op.sample for op in linears]
    output.backward(cotangent)
    expected = _mlp_reference(
        x.data, [w.data for w in weights], [b.data for b in biases], samples, cotangent, placement
    )
    np.testing.assert_allclose(weights[0].grad.data, expected["w0"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(weights[1].grad.data, expected["w1"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(biases[0].grad.data, expected["b0"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(biases[1].grad.data, expected["b1"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x.grad.data, expected["x"], rtol=1e-12, atol=1e-12)


def test_sampled_relu_hands_a_row_sparse_gradient_on_kept_rows_only():
    rng = np.random.default_rng(4)
    x = rbprop.tensor(rng.standard_normal((32, 4)), requires_grad=True)
    with rbprop.sampled({"relu": Bernoulli(0.25)}, seed=2):
        hidden = F.relu(x)
    relu = hidden.op
    grads = relu.run_vjp(np.ones((32, 4)))
    assert isinstance(grads[0], RowSparse)
    assert 0 < grads[0].kept < 32
    # Rows a row-sparse cotangent already dropped stay dropped: only shared rows remain.
    incoming = RowSparse(np.arange(0, 32, 2), np.ones((16, 4)), (32, 4))
    again = relu.run_vjp(incoming)[0]
    assert set(again.indices.tolist()) <= set(range(0, 32, 2))
    np.testing.assert_array_equal(
        again.indices, np.intersect1d(grads[0].indices, incoming.indices)
    )


def test_sampled_gradient_is_bit_identical_for_the_same_seed():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 8))
    w0, w1 = rng.standard_normal((16, 8)), rng.standard_normal((4, 16))

    def gradients():
        weights = [rbprop.tensor(w0, requires_grad=True), rbprop.tensor(w1, requires_grad=True)]
        with rbprop.sampled({"linear": "bernoulli:0.25", "relu": "bernoulli:0.25"}, seed=3):
            output = F.linear(F.relu(F.linear(rbprop.tensor(x), weights[0])), weights[1])
        output.sum().backward()
        # The compounded sketches may leave the first layer no row (and no gradient).
        return [None if w.grad is None else w.grad.data for w in weights]

    first, second = gradients(), gradients()
    assert first[1] is not None
    for a, b in zip(first, second, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_per_row_cross_entropy_below_a_sampled_op_works_on_kept_rows():
    rng = np.random.default_rng(6)
    logits = rbprop.tensor(rng.standard_normal((12, 3)), requires_grad=True)
    target = rng.integers(0, 3, 12)
    scale = rbprop.tensor(rng.standard_normal(12))
    with rbprop.sampled({"mul": Bernoulli(0.5)}, seed=1):
        losses = F.cross_entropy(logits, target, reduction="none")
        weighted = losses * scale
    kept = weighted.op.draw_sample(12).indices
    weighted.sum().backward()
    dropped = np.setdiff1d(np.arange(12), kept)
    assert np.all(logits.grad.data[dropped] == 0)
    assert np.all(np.abs(logits.grad.data[kept]).sum(axis=1) > 0)


def test_linear_skips_input_gradient_rows_that_the_layer_below_never_reads():
    rng = np.random.default_rng(8)
    x = rbprop.tensor(rng.standard_normal((64, 6)))
    w0 = rbprop.tensor(rng.standard_normal((5, 6)), requires_grad=True)
    w1 = rbprop.tensor(rng.standard_normal((3, 5)), requires_grad=True)
    with rbprop.sampled({"linear": Bernoulli(0.5)}, seed=9):
        hidden = F.relu(F.linear(x, w0))
        output = F.linear(hidden, w1)
    lower = hidden.op.edges[0]
    assert lower.name == "linear"
    np.testing.assert_array_equal(hidden.op.rows_read(), lower.sample.indices)
    grad_hidden = output.op.run_vjp(np.ones((64, 3)))[0]
    assert isinstance(grad_hidden, RowSparse)
    expected = np.intersect1d(output.op.sample.indices, lower.sample.indices)
    np.testing.assert_array_equal(grad_hidden.indices, expected)
    # With the "weight" placement below, every row of dX is read: nothing is skipped.
    with rbprop.sampled({"linear": Bernoulli(0.5, placement="weight")}, seed=9):
        hidden = F.relu(F.linear(x, w0))
    assert hidden.op.rows_read() is None


def test_ops_no_gradient_reaches_still_count_their_exact_flops():
    from rbprop.cost import CostMeter

    rng = np.random.default_rng(10)
    x = rbprop.tensor(rng.standard_normal((4, 6)))
    weights = [
        rbprop.tensor(rng.standard_normal((5, 6)), requires_grad=True),
        rbprop.tensor(rng.standard_normal((3, 5)), requires_grad=True),
    ]

    def backward(policy):
        with CostMeter() as meter:
            with rbprop.sampled(policy, seed=0):
                output = F.linear(F.relu(F.linear(x, weights[0])), weights[1])
            top_kept = output.op.sample.kept if policy else None
            output.sum().backward()
        return meter, top_kept

    exact, _ = backward(None)
    sampled, top_kept = backward({"linear": Bernoulli(0.01)})
    assert top_kept == 0  # nothing flows below the top layer
    assert sampled.backward_flops == 0
    assert sampled.exact_backward_flops == exact.backward_flops
