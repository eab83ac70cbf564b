"""The cross-entropy kernels against their numpy twins, and the op built on them."""

import numpy as np
import pytest

import rbprop as rb
from rbprop import functional as F
from rbprop.check import gradcheck
from rbprop.kernels import cross_entropy as ce
from rbprop.primitive import ShapeError
from rbprop.rowsparse import RowSparse, densify
from rbprop.sketch import Bernoulli, Importance, UniformK

DTYPES = [np.float32, np.float64]
SHAPES = [(1, 1), (7, 3), (13, 10), (5, 1), (0, 4)]
REDUCTIONS = ["mean", "sum", "none"]
SMOOTHINGS = [0.0, 0.1]


def _tolerances(dtype):
    return {"rtol": 2e-6, "atol": 2e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-14}


def _logits(rng, shape, dtype, extreme=False):
    """Normal logits; ``extreme`` puts +-1e4 and -inf entries in most rows."""
    logits = 3 * rng.standard_normal(shape)
    if extreme and shape[0] and shape[1] > 1:
        rows = np.arange(0, shape[0], 2)
        logits[rows, rng.integers(0, shape[1], rows.size)] = 1e4
        logits[np.arange(1, shape[0], 2), 0] = -1e4
        logits[np.arange(1, shape[0], 4), 1] = 1e4
        logits[np.arange(1, shape[0], 3), -1] = -np.inf
    return logits.astype(dtype)


def _assert_same(result, expected, dtype):
    if expected is None:
        assert result is None
        return
    assert result.dtype == expected.dtype and result.shape == expected.shape
    np.testing.assert_allclose(result, expected, **_tolerances(dtype))


def _float64_losses(logits, target, smoothing):
    """Row losses straight from the definition, in float64."""
    logits = logits.astype(np.float64)
    largest = logits.max(axis=1, keepdims=True)
    log_probs = logits - largest - np.log(np.exp(logits - largest).sum(axis=1, keepdims=True))
    picked = log_probs[np.arange(len(target)), target]
    return -(1 - smoothing) * picked - smoothing * log_probs.mean(axis=1)


# -- forward -------------------------------------------------------------------------------


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_kernel_matches_twin(rng, shape, dtype, smoothing, extreme):
    logits = _logits(rng, shape, dtype, extreme)
    target = rng.integers(0, shape[1], shape[0])
    for reduction in REDUCTIONS:
        for keep_probs, keep_norms in [(False, False), (True, False), (False, True)]:
            arguments = (logits, target, smoothing, reduction, keep_probs, keep_norms)
            results = ce.cross_entropy_forward(*arguments)
            expected = ce.cross_entropy_forward_reference(*arguments)
            for result, twin in zip(results, expected, strict=True):
                _assert_same(result, twin, dtype)
            assert results[0].dtype == dtype
            assert results[0].shape == ((shape[0],) if reduction == "none" else ())


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_forward_kernel_matches_the_definition(rng, smoothing):
    logits = _logits(rng, (9, 5), np.float64)
    target = rng.integers(0, 5, 9)
    output, probs, norms = ce.cross_entropy_forward(logits, target, smoothing, "none", True, True)
    np.testing.assert_allclose(output, _float64_losses(logits, target, smoothing), rtol=1e-13)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, softmax, rtol=1e-13)
    targets = np.full((9, 5), smoothing / 5)
    targets[np.arange(9), target] += 1 - smoothing
    np.testing.assert_allclose(norms, np.linalg.norm(softmax - targets, axis=1), rtol=1e-12)


def test_forward_special_values_follow_the_twin():
    logits = np.array(
        [[1e4, -1e4, 0.0], [-np.inf, 2.0, 1.0], [-np.inf, -np.inf, -np.inf], [np.nan, 0.0, 1.0]]
    )
    target = np.array([0, 0, 1, 2])
    for smoothing in SMOOTHINGS:
        with np.errstate(invalid="ignore"):  # -inf - -inf in the all -inf row
            losses, probs, _ = ce.cross_entropy_forward(logits, target, smoothing, "none", True)
            twin, twin_probs, _ = ce.cross_entropy_forward_reference(
                logits, target, smoothing, "none", True
            )
        np.testing.assert_array_equal(np.isnan(losses), np.isnan(twin))
        np.testing.assert_allclose(losses, twin, rtol=1e-13)
        np.testing.assert_allclose(probs, twin_probs, rtol=1e-13)
        assert losses[0] == pytest.approx(smoothing / 3 * 3e4)  # exp(-1e4) underflows
        assert losses[1] == np.inf  # the label's class has probability zero
        assert np.isnan(losses[2]) and np.isnan(losses[3])


def test_mean_of_no_rows_is_nan():
    for forward in (ce.cross_entropy_forward, ce.cross_entropy_forward_reference):
        output, _, _ = forward(np.ones((0, 3)), np.zeros(0, dtype=int))
        assert output.shape == () and np.isnan(output)


# -- backward ------------------------------------------------------------------------------


def _cotangent(rng, reduction, rows, dtype):
    shape = (rows,) if reduction == "none" else ()
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_kernel_matches_twin(rng, shape, dtype, smoothing):
    logits = _logits(rng, shape, dtype, extreme=True)
    target = rng.integers(0, shape[1], shape[0])
    probs = ce.cross_entropy_forward(logits, target, smoothing, keep_probs=True)[1]
    kept = np.flatnonzero(rng.random(shape[0]) < 0.5)
    scales = rng.uniform(1, 3, kept.size)
    for reduction in REDUCTIONS:
        cotangent = _cotangent(rng, reduction, shape[0], dtype)
        for rows, row_scales in [(None, None), (kept, None), (kept, scales), (kept[:0], None)]:
            arguments = (probs, target, cotangent, smoothing, reduction, rows, row_scales)
            grad = ce.cross_entropy_backward(*arguments)
            _assert_same(grad, ce.cross_entropy_backward_reference(*arguments), dtype)
            assert grad.shape == (shape[0] if rows is None else rows.size, shape[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kept_rows_are_the_scaled_rows_of_the_full_gradient(rng, reduction):
    logits = rng.standard_normal((11, 7))
    target = rng.integers(0, 7, 11)
    probs = ce.cross_entropy_forward(logits, target, 0.1, keep_probs=True)[1]
    cotangent = _cotangent(rng, reduction, 11, np.float64)
    full = ce.cross_entropy_backward(probs, target, cotangent, 0.1, reduction)
    kept, scales = np.array([0, 4, 5, 10]), np.array([2.0, 0.5, 3.0, 1.5])
    compact = ce.cross_entropy_backward(probs, target, cotangent, 0.1, reduction, kept, scales)
    np.testing.assert_allclose(compact, full[kept] * scales[:, None], rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_match_contiguous_ones(rng, dtype):
    wide = _logits(rng, (9, 10), dtype)
    logits = wide[:, ::2]  # not contiguous
    target = rng.integers(0, 5, 18)[::2]
    output, probs, norms = ce.cross_entropy_forward(logits, target, 0.1, "none", True, True)
    contiguous = ce.cross_entropy_forward(np.ascontiguousarray(logits), target.copy(), 0.1, "none")
    _assert_same(output, contiguous[0], dtype)
    fortran_probs = np.asfortranarray(probs)
    cotangent = rng.standard_normal(18).astype(dtype)[::2]
    grad = ce.cross_entropy_backward(fortran_probs, target, cotangent, 0.1, "none")
    _assert_same(
        grad, ce.cross_entropy_backward(probs, target, cotangent.copy(), 0.1, "none"), dtype
    )


@pytest.mark.parametrize("label_dtype", [np.uint8, np.int32, np.uint64])
def test_any_integer_labels(rng, label_dtype):
    logits = _logits(rng, (6, 4), np.float64)
    target = rng.integers(0, 4, 6)
    expected = ce.cross_entropy_forward(logits, target, 0.1, "none", True)
    labels = target.astype(label_dtype)
    output, probs, _ = ce.cross_entropy_forward(logits, labels, 0.1, "none", True)
    np.testing.assert_array_equal(output, expected[0])
    grad = ce.cross_entropy_backward(probs, labels, np.ones(6), 0.1, "none", np.array([1, 3]))
    np.testing.assert_array_equal(
        grad, ce.cross_entropy_backward(probs, target, np.ones(6), 0.1, "none")[[1, 3]]
    )
    with pytest.raises(ValueError, match="from 0 to 9"):
        ce.cross_entropy_forward(logits, np.array([0, 9, 1, 1, 2, 3], dtype=label_dtype))


def test_other_dtypes_go_to_the_twins(rng):
    logits = rng.standard_normal((5, 3)).astype(np.float16)
    target = rng.integers(0, 3, 5).astype(np.uint8)
    output, probs, _ = ce.cross_entropy_forward(logits, target, 0.0, "sum", True)
    expected, expected_probs, _ = ce.cross_entropy_forward_reference(
        logits, target, 0.0, "sum", True
    )
    assert output.dtype == np.float16 and probs.dtype == np.float16
    np.testing.assert_array_equal(output, expected)
    grad = ce.cross_entropy_backward(probs, target, np.float16(2), 0.0, "sum")
    np.testing.assert_array_equal(
        grad, ce.cross_entropy_backward_reference(probs, target, np.float16(2), 0.0, "sum")
    )


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("forward", [ce.cross_entropy_forward, ce.cross_entropy_forward_reference])
def test_forward_errors_name_the_op_and_values(forward):
    logits = np.zeros((4, 3))
    with pytest.raises(
        ValueError, match=r"cross_entropy: labels must lie in \[0, 3\).*from 0 to 3"
    ):
        forward(logits, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"from -2 to 2"):
        forward(logits, np.array([0, -2, 2, 1]))
    with pytest.raises(ValueError, match=r"\[0, 0\).*from 0 to 0"):
        forward(np.zeros((2, 0)), np.zeros(2, dtype=int))
    with pytest.raises(TypeError, match="cross_entropy: target must hold integer class labels"):
        forward(logits, np.zeros(4))
    with pytest.raises(ShapeError, match=r"cross_entropy: target of shape \(3,\)"):
        forward(logits, np.zeros(3, dtype=int))
    with pytest.raises(ShapeError, match=r"cross_entropy: input must be \(N, C\) logits"):
        forward(np.zeros(4), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="cross_entropy: reduction"):
        forward(logits, np.zeros(4, dtype=int), 0.0, "avg")


@pytest.mark.parametrize(
    "backward", [ce.cross_entropy_backward, ce.cross_entropy_backward_reference]
)
def test_backward_errors_name_the_op_and_values(backward):
    probs, target, cotangent = np.full((4, 3), 1 / 3), np.array([0, 1, 2, 1]), np.array(1.0)
    with pytest.raises(ValueError, match=r"cross_entropy_backward: labels.*from 0 to 5"):
        backward(probs, np.array([0, 5, 2, 1]), cotangent)
    with pytest.raises(IndexError, match=r"kept rows must lie in \[0, 4\).*from 1 to 4"):
        backward(probs, target, cotangent, kept=np.array([1, 4]))
    with pytest.raises(IndexError, match=r"from -1 to 2"):
        backward(probs, target, cotangent, kept=np.array([-1, 2]))
    with pytest.raises(ShapeError, match=r"kept_scales of shape \(1,\) for 2 kept rows"):
        backward(probs, target, cotangent, kept=np.array([1, 2]), kept_scales=np.ones(1))
    with pytest.raises(TypeError, match="kept must be a 1-D array of row indices"):
        backward(probs, target, cotangent, kept=np.array([1.0]))
    with pytest.raises(ShapeError, match=r"cotangent of shape \(4,\) for the 'sum' reduction"):
        backward(probs, target, np.ones(4), reduction="sum")
    with pytest.raises(ShapeError, match=r"cotangent of shape \(\) for the 'none' reduction"):
        backward(probs, target, cotangent, reduction="none")


def test_op_errors_name_the_op_and_values(rng):
    logits = rb.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    with pytest.raises(ValueError, match=r"cross_entropy: labels must lie in \[0, 3\)"):
        F.cross_entropy(logits, np.array([0, 1, 7, 1]))


# -- the op --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_op_gradient_in_float64(rng, reduction, smoothing):
    logits = rb.tensor(rng.standard_normal((7, 5)), requires_grad=True)
    target = rng.integers(0, 5, 7)
    assert gradcheck(lambda a: F.cross_entropy(a, target, reduction, smoothing), [logits])


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_agrees_with_the_twins(rng, monkeypatch, dtype):
    logits = rng.standard_normal((9, 4)).astype(dtype)
    target = rng.integers(0, 4, 9)

    def loss_and_grad():
        x = rb.tensor(logits, requires_grad=True)
        loss = F.cross_entropy(x, target, label_smoothing=0.1)
        loss.backward()
        return loss.data, x.grad.data

    compiled = loss_and_grad()
    monkeypatch.setenv("RBPROP_DISABLE_NUMBA", "1")
    for result, twin in zip(compiled, loss_and_grad(), strict=True):
        _assert_same(result, twin, dtype)


def _recorded(rng, reduction, sketch, rows=10, classes=4):
    logits = rb.tensor(rng.standard_normal((rows, classes)), requires_grad=True)
    target = rng.integers(0, classes, rows)
    with rb.sampled({"cross_entropy": sketch}, seed=5):
        output = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
    return output.op, target


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sampled_vjp_is_row_sparse_on_the_kept_rows(rng, reduction):
    op, target = _recorded(rng, reduction, UniformK(0.5))
    cotangent = _cotangent(rng, reduction, 10, np.float64)
    (grad,) = op.run_vjp(cotangent)
    sample = op.draw_sample(10)
    assert isinstance(grad, RowSparse)
    np.testing.assert_array_equal(grad.indices, sample.indices)
    assert op.sampled_vjp_flops() == 2 * sample.kept * 4
    exact = ce.cross_entropy_backward_reference(op.probs, target, cotangent, 0.1, reduction)
    expected = sample.apply(exact, axis=0)
    np.testing.assert_allclose(densify(grad), expected, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("sketch", [Bernoulli(0.5), Importance(0.5), UniformK(0.5)])
def test_row_sparse_cotangent_meets_the_sample_on_common_rows(rng, sketch):
    op, _ = _recorded(rng, "none", sketch)
    values = rng.standard_normal(4)
    sparse = RowSparse(np.array([1, 2, 6, 9]), values, (10,))
    (from_sparse,) = op.run_vjp(sparse)
    assert op.sampled_vjp_flops() == 2 * from_sparse.kept * 4
    (from_dense,) = op.run_vjp(sparse.dense())  # the same draw: it depends on the seed only
    np.testing.assert_allclose(densify(from_sparse), densify(from_dense), rtol=1e-13)
    assert set(from_sparse.indices) <= {1, 2, 6, 9}


def test_exact_vjp_of_a_row_sparse_cotangent_works_on_its_rows(rng):
    logits = rb.tensor(rng.standard_normal((10, 4)), requires_grad=True)
    op = F.cross_entropy(logits, rng.integers(0, 4, 10), "none", 0.1).op
    sparse = RowSparse(np.array([0, 3, 4, 8]), rng.standard_normal(4), (10,))
    (from_sparse,) = op.run_vjp(sparse)
    assert isinstance(from_sparse, RowSparse) and op.sampled_vjp_flops() == 2 * 4 * 4
    np.testing.assert_array_equal(from_sparse.indices, sparse.indices)
    (from_dense,) = op.run_vjp(sparse.dense())
    np.testing.assert_allclose(densify(from_sparse), from_dense, rtol=1e-13, atol=1e-16)
