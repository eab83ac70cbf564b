"""The attention fast paths: packed multi-head self-attention, in-place scaled softmax, GELU.

* :func:`rbprop.ops.attention.packed_self_attention` must equal splitting the
  packed projection into heads, :func:`scaled_dot_product_attention` and
  merging the heads, in value and in every VJP, exact or sampled (with one
  seed both draw the same sketch, so the sampled gradients agree exactly);
* the softmax kernels' ``scale`` and ``out`` arguments (in place included) and
  ``gelu_backward``'s ``output`` argument must match their numpy twins on
  awkward sizes, and the GELU one the float64 derivative;
* glibc's allocator settings are applied (or declined) without error.
"""

import math

import numpy as np
import pytest

import rbprop as rb
from rbprop import functional as F
from rbprop import nn
from rbprop.check import gradcheck
from rbprop.kernels import dispatch, gelu, softmax
from rbprop.ops.attention import PackedSelfAttention, packed_self_attention
from rbprop.primitive import ShapeError
from rbprop.sketch import Bernoulli, Importance, RankK, UniformK

RTOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol = RTOL[np.dtype(expected.dtype)]
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# -- softmax with a scale, in place ---------------------------------------------------------

ROW_SHAPES = [(1, 1), (3, 7), (2, 3, 5), (1, 257), (64, 50), (5,), (0, 4)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_scaled_softmax_kernels_match_twins(rng, dtype, shape):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    cotangent = rng.standard_normal(shape).astype(dtype)
    scale = 0.3

    probabilities = softmax.softmax(x, scale=scale)
    assert_close(probabilities, softmax.softmax_reference(x, scale))
    assert_close(probabilities, softmax.softmax_reference(x * dtype(scale)))
    in_place = x.copy()
    assert softmax.softmax(in_place, scale=scale, out=in_place) is in_place
    assert_close(in_place, probabilities)

    expected = softmax.softmax_backward_reference(probabilities, cotangent, scale)
    assert_close(expected, scale * softmax.softmax_backward_reference(probabilities, cotangent))
    assert_close(softmax.softmax_backward(probabilities, cotangent, scale=scale), expected)
    overwritten = cotangent.copy()
    result = softmax.softmax_backward(probabilities, overwritten, scale=scale, out=overwritten)
    assert result is overwritten
    assert_close(overwritten, expected)


def test_softmax_writes_into_a_strided_out_and_checks_its_arguments(rng):
    x = rng.standard_normal((6, 9)).astype(np.float32)
    wide = np.zeros((6, 18), np.float32)
    out = wide[:, ::2]  # not contiguous: the kernel writes a buffer, then copies
    assert softmax.softmax(x, scale=2.0, out=out) is out
    assert_close(out, softmax.softmax_reference(x, 2.0))
    assert np.all(wide[:, 1::2] == 0)
    for kernel in (softmax.softmax, softmax.softmax_reference):
        with pytest.raises(ValueError, match="scale must be positive"):
            kernel(x, scale=0.0)
        with pytest.raises(ShapeError, match=r"out of shape \(6, 8\)"):
            kernel(x, out=np.empty((6, 8), np.float32))


def test_scaled_softmax_backward_is_the_vjp(rng):
    x, cotangent, direction = (rng.standard_normal((4, 6)) for _ in range(3))
    eps, scale = 1e-6, 0.7
    change = softmax.softmax(x + eps * direction, scale) - softmax.softmax(
        x - eps * direction, scale
    )
    numeric = np.vdot(cotangent, change) / (2 * eps)
    probabilities = softmax.softmax(x, scale)
    analytic = np.vdot(softmax.softmax_backward(probabilities, cotangent, scale), direction)
    assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic))


# -- GELU's backward from the forward's output ------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (0, 4), (1001,)])
def test_gelu_backward_from_output_matches_twins(rng, dtype, shape):
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    if x.size >= 6:
        x.reshape(-1)[:6] = [0.0, 1e-7, -1e-7, 1e-30, -20.0, 6.0]  # the ratio's edge cases
    cotangent = rng.standard_normal(shape).astype(dtype)
    output = gelu.gelu(x)
    result = gelu.gelu_backward(cotangent, x, output)
    assert_close(result, gelu.gelu_backward_reference(cotangent, x, output))
    assert_close(result, gelu.gelu_backward(cotangent, x))
    with pytest.raises(ShapeError, match="output of shape"):
        gelu.gelu_backward(cotangent, x, output[..., :0])


def test_gelu_backward_from_output_is_accurate():
    x = np.linspace(-12, 12, 20_001)
    phi_cdf = 0.5 * (1 + np.array([math.erf(value / math.sqrt(2)) for value in x]))
    derivative = phi_cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    single = x.astype(np.float32)
    ones = np.ones_like(single)
    assert np.abs(gelu.gelu_backward(ones, single, gelu.gelu(single)) - derivative).max() <= 2e-7
    double = gelu.gelu_backward(np.ones_like(x), x, gelu.gelu(x))
    assert np.abs(double - derivative).max() <= 1e-14


# -- packed multi-head self-attention ----------------------------------------------------------


def split_reference(packed, heads, **options):
    """The same attention through reshapes, ``scaled_dot_product_attention`` and a merge."""
    batch, tokens, features = packed.shape
    parts = packed.reshape(batch, tokens, 3, heads, features // (3 * heads))
    parts = parts.transpose(2, 0, 3, 1, 4)
    attended = F.scaled_dot_product_attention(parts[0], parts[1], parts[2], **options)
    return attended.transpose(0, 2, 1, 3).reshape(batch, tokens, features // 3)


def packed_input(rng, batch=3, tokens=7, heads=2, head_dim=4, dtype=np.float64):
    values = rng.standard_normal((batch, tokens, 3 * heads * head_dim)).astype(dtype)
    return rb.tensor(values, requires_grad=True)


def masks(rng, batch=3, heads=2, tokens=7):
    boolean = rng.random((batch, 1, tokens, tokens)) > 0.3
    boolean[..., 0] = True
    return [
        {},
        {"is_causal": True},
        {"attn_mask": boolean},
        {"attn_mask": rng.standard_normal((heads, tokens, tokens))},
        {"dropout_p": 0.3, "generator": 5},
        {"scale": 0.4},
        {"scale": -0.2},
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_attention_equals_the_split_heads(rng, dtype):
    heads = 2
    for options in masks(rng):
        packed = packed_input(rng, heads=heads, dtype=dtype)
        output = packed_self_attention(packed, heads, **options)
        assert isinstance(output.op, PackedSelfAttention)
        cotangent = rng.standard_normal(output.shape).astype(dtype)
        output.backward(cotangent)
        packed_grad, packed.grad = packed.grad.numpy(), None
        expected = split_reference(packed, heads, **options)
        expected.backward(cotangent)
        assert_close(output.numpy(), expected.numpy())
        assert_close(packed_grad, packed.grad.numpy())


def test_packed_attention_gradcheck(rng):
    packed = packed_input(rng, batch=2, tokens=4, heads=2, head_dim=3)
    assert gradcheck(lambda p: packed_self_attention(p, 2), [packed])
    assert gradcheck(lambda p: packed_self_attention(p, 2, is_causal=True), [packed])


SKETCHES = {
    "bernoulli_rows": Bernoulli(0.5),
    "uniform_keys": UniformK(0.5, placement="contracted"),
    "importance_rows": Importance(0.5),
    "importance_keys": Importance(0.5, placement="contracted"),
    "rank_rows": RankK(0.5),
    "rank_keys": RankK(0.5, placement="contracted"),
}


@pytest.mark.parametrize("name", sorted(SKETCHES))
def test_sampled_packed_attention_matches_the_split_heads(rng, name):
    heads, policy = 2, {"scaled_dot_product_attention": SKETCHES[name]}
    packed = packed_input(rng, batch=3, tokens=8, heads=heads)
    cotangent = rng.standard_normal((3, 8, packed.shape[-1] // 3))
    gradients = []
    for attention in (packed_self_attention, split_reference):
        with rb.sampled(policy, seed=11):
            output = attention(packed, heads)
        output.backward(cotangent)
        gradients.append(packed.grad.numpy())
        packed.grad = None
    exact = packed_self_attention(packed, heads)
    exact.backward(cotangent)
    assert not np.allclose(gradients[0], packed.grad.numpy())  # the sketch did act
    np.testing.assert_allclose(gradients[0], gradients[1], rtol=1e-10, atol=1e-12)


def test_packed_attention_errors(rng):
    packed = packed_input(rng, heads=2)
    with pytest.raises(ShapeError, match=r"3 \* heads \* head_dim.*5 heads"):
        packed_self_attention(packed, 5)
    with pytest.raises(ShapeError, match=r"attn_mask of shape \(4, 7, 7\)"):
        packed_self_attention(packed, 2, attn_mask=np.ones((4, 7, 7), bool))
    with pytest.raises(ShapeError, match=r"attn_mask of shape \(2, 3, 2, 7, 7\)"):
        packed_self_attention(packed, 2, attn_mask=np.ones((2, 3, 2, 7, 7), bool))
    with pytest.raises(ValueError, match="not both"):
        packed_self_attention(packed, 2, attn_mask=np.ones((7, 7), bool), is_causal=True)


def test_multihead_self_attention_records_one_packed_op():
    nn.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2)
    x = rb.tensor(np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32))
    names = []
    op = attention(x).op
    while op is not None:
        names.append(type(op).__name__)
        inputs = [edge for edge in op.edges if hasattr(edge, "run_vjp")]
        op = inputs[0] if inputs else None
    assert names == ["Linear", "PackedSelfAttention", "Linear"]


# -- the allocator -----------------------------------------------------------------------------


def test_keep_freed_memory_answers_whether_it_applied(monkeypatch):
    assert dispatch.keep_freed_memory() in (True, False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert dispatch.keep_freed_memory() is False  # glibc's own variable wins


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("RBPROP_KEEP_FREED_MEMORY", "0")
    assert dispatch.keep_freed_memory() is False


def test_importing_rbprop_leaves_the_allocator_alone():
    import subprocess
    import sys

    # keep_freed_memory reaches mallopt through ctypes.CDLL: importing must not call it.
    code = (
        "import rbprop.kernels.dispatch as d, unittest.mock as m\n"
        "import importlib\n"
        "with m.patch('ctypes.CDLL') as cdll:\n"
        "    importlib.reload(d)\n"
        "    assert not cdll.called, 'import called into the C library'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
