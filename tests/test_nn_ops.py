"""Neural-network primitives: conv2d, pooling, layer/batch norm, cross-entropy,
attention and dropout.

Each op is checked three ways: its forward pass against a plain numpy
reference written here, its exact VJP by float64 central differences, and its
sampled VJPs for unbiasedness (the Monte Carlo mean over fixed-seed draws must
lie within 5 standard errors of the exact VJP, elementwise).
"""

import numpy as np
import pytest

import rbprop as rb
from rbprop import functional as F
from rbprop.check import gradcheck
from rbprop.cost import CostMeter, saved_bytes
from rbprop.ops.conv import col2im, im2col

SPECS = ["bernoulli:0.5", "uniform:0.5", "rank:0.5", "rank:0.5:gaussian", "importance:0.5"]


def leaf(array):
    return rb.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def normal(rng, *shape):
    return leaf(rng.standard_normal(shape))


# -- numpy references ----------------------------------------------------------


def conv2d_reference(x, weight, bias, stride, padding):
    """Direct loops over every output element."""
    (sh, sw), (ph, pw) = stride, padding
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_channels, _, kh, kw = weight.shape
    out_h = (padded.shape[2] - kh) // sh + 1
    out_w = (padded.shape[3] - kw) // sw + 1
    output = np.zeros((x.shape[0], out_channels, out_h, out_w))
    for n in range(x.shape[0]):
        for o in range(out_channels):
            for i in range(out_h):
                for j in range(out_w):
                    window = padded[n, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
                    output[n, o, i, j] = np.sum(window * weight[o])
            if bias is not None:
                output[n, o] += bias[o]
    return output


def pool_reference(x, kernel, stride, padding, reduce, fill):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    out_h = (padded.shape[2] - kh) // sh + 1
    out_w = (padded.shape[3] - kw) // sw + 1
    output = np.zeros(x.shape[:2] + (out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            window = padded[:, :, i * sh : i * sh + kh, j * sw : j * sw + kw]
            output[:, :, i, j] = reduce(window.reshape(x.shape[:2] + (-1,)), axis=-1)
    return output


def cross_entropy_reference(logits, target, smoothing):
    losses = []
    classes = logits.shape[1]
    for row, label in zip(logits, target, strict=True):
        log_norm = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        log_probs = row - log_norm
        losses.append(-(1 - smoothing) * log_probs[label] - smoothing / classes * log_probs.sum())
    return np.array(losses)


def attention_reference(q, k, v, mask=None, scale=None):
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("...le,...se->...ls", q, k) * scale
    if mask is not None and mask.dtype == bool:
        scores = np.where(mask, scores, -np.inf)
    elif mask is not None:
        scores = scores + mask
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("...ls,...sf->...lf", weights, v)


def numeric_gradient(fn, arrays, cotangent, eps=1e-6):
    """Central differences of ``<cotangent, fn(*arrays)>`` for every element of every array."""
    grads = []
    for index, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for position in np.ndindex(array.shape):
            shifted = [a.copy() for a in arrays]
            shifted[index][position] += eps
            plus = np.sum(fn(*shifted) * cotangent)
            shifted[index][position] -= 2 * eps
            minus = np.sum(fn(*shifted) * cotangent)
            grad[position] = (plus - minus) / (2 * eps)
        grads.append(grad)
    return grads


# -- the Monte Carlo bias check ------------------------------------------------


def with_placement(spec, placement):
    sketch = rb.sketch.parse(spec)
    sketch.placement = placement
    return sketch


def grads_of(fn, inputs, cotangent, sketch=None, seed=None):
    for tensor in inputs:
        tensor.grad = None
    if sketch is None:
        output = fn(*inputs)
    else:
        with rb.sampled(sketch, seed=seed):
            output = fn(*inputs)
    output.backward(cotangent)
    return [
        np.zeros(t.shape) if t.grad is None else t.grad.numpy() for t in inputs if t.requires_grad
    ]


def assert_unbiased(fn, inputs, sketch, draws=300, seed=0, sigmas=5.0):
    """The mean of ``draws`` sampled VJPs lies within ``sigmas`` standard errors of the exact VJP.

    The cotangent's entries have magnitudes in [0.5, 1.5], so that no row gets
    an importance probability too small to be drawn in ``draws`` tries. An
    element whose sampled value never varies must equal the exact value up to
    a relative ``13 / draws``: an outcome of probability ``q >= 13 / draws``
    would have shown up with probability ``1 - e^-13``, and an element that is
    always kept with scale ``1 / p`` (``p`` close to 1) is off by ``1 - p``.
    """
    rng = np.random.default_rng(seed)
    output_shape = fn(*inputs).shape
    cotangent = rng.choice([-1.0, 1.0], output_shape) * rng.uniform(0.5, 1.5, output_shape)
    exact = grads_of(fn, inputs, cotangent)
    draws_per_input = [[] for _ in exact]
    for draw in range(draws):
        grads = grads_of(fn, inputs, cotangent, sketch, seed=seed * 1_000_003 + draw)
        for collected, grad in zip(draws_per_input, grads, strict=True):
            collected.append(grad)
    for index, (expected, collected) in enumerate(zip(exact, draws_per_input, strict=True)):
        samples = np.stack(collected)
        mean = samples.mean(axis=0)
        stderr = samples.std(axis=0, ddof=1) / np.sqrt(draws)
        scale = np.abs(expected).max() + 1e-300
        constant = samples.max(axis=0) - samples.min(axis=0) <= 1e-12 * scale
        np.testing.assert_allclose(
            expected[constant],
            mean[constant],
            rtol=13 / draws,
            atol=1e-12 * scale,
            err_msg=f"{sketch!r}: input {index}: a sampled element that never varies is biased",
        )
        deviation = np.abs(mean - expected)[~constant]
        allowed = sigmas * stderr[~constant] + 1e-10 * scale
        worst = np.max(deviation / allowed) if deviation.size else 0.0
        assert np.all(deviation <= allowed), (
            f"{sketch!r}: input {index}: sampled mean off by up to {worst:.2f} x the allowed "
            f"{sigmas} standard errors"
        )


# -- conv2d ---------------------------------------------------------------------


CONV_CASES = [
    # x shape, weight shape, stride, padding
    ((2, 3, 7, 6), (4, 3, 3, 2), 2, 1),
    ((1, 2, 5, 5), (3, 2, 3, 3), 1, 0),
    ((2, 1, 6, 5), (2, 1, 1, 1), (2, 1), (0, 1)),
    ((1, 2, 4, 4), (2, 2, 2, 2), 2, 0),
]


def _as_pair(value):
    return (value, value) if isinstance(value, int) else value


@pytest.mark.parametrize("x_shape,w_shape,stride,padding", CONV_CASES)
def test_conv2d_forward_and_gradcheck(rng, x_shape, w_shape, stride, padding):
    x, weight, bias = normal(rng, *x_shape), normal(rng, *w_shape), normal(rng, w_shape[0])
    expected = conv2d_reference(
        x.numpy(), weight.numpy(), bias.numpy(), _as_pair(stride), _as_pair(padding)
    )
    result = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda a, w, b: F.conv2d(a, w, b, stride, padding), [x, weight, bias])
    assert gradcheck(lambda a, w: F.conv2d(a, w, None, stride, padding), [x, weight])


def test_conv2d_gradient_matches_reference_differences(rng):
    x, weight, bias = (
        rng.standard_normal((1, 2, 4, 5)),
        rng.standard_normal((3, 2, 2, 3)),
        rng.standard_normal(3),
    )
    stride, padding = (2, 1), (1, 1)
    cotangent = rng.standard_normal(conv2d_reference(x, weight, bias, stride, padding).shape)
    expected = numeric_gradient(
        lambda a, w, b: conv2d_reference(a, w, b, stride, padding), [x, weight, bias], cotangent
    )
    tensors = [leaf(x), leaf(weight), leaf(bias)]
    F.conv2d(*tensors, stride=stride, padding=padding).backward(cotangent)
    for tensor, grad in zip(tensors, expected, strict=True):
        np.testing.assert_allclose(tensor.grad.numpy(), grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("stride,padding", [((1, 1), (0, 0)), ((2, 1), (1, 2)), ((3, 2), (1, 0))])
def test_im2col_rows_and_col2im_adjoint(rng, stride, padding):
    # col2im is the adjoint of im2col: <im2col(x), c> = <x, col2im(c)>.
    x = rng.standard_normal((2, 3, 7, 6))
    cols = im2col(x, 3, 2, stride, padding)
    other = rng.standard_normal(cols.shape)
    back = col2im(other, x.shape, 3, 2, stride, padding)
    np.testing.assert_allclose(np.sum(cols * other), np.sum(x * back), rtol=1e-12)
    rows = np.array([cols.shape[0] - 1, 0, 5, 5])
    np.testing.assert_array_equal(im2col(x, 3, 2, stride, padding, rows=rows), cols[rows])
    distinct = rows[:3]
    only_kept = np.zeros_like(other)
    only_kept[distinct] = other[distinct]
    np.testing.assert_array_equal(
        col2im(other[distinct], x.shape, 3, 2, stride, padding, rows=distinct),
        col2im(only_kept, x.shape, 3, 2, stride, padding),
    )


def test_conv2d_errors_name_op_and_shapes(rng):
    x = rb.tensor(rng.standard_normal((1, 3, 5, 5)))
    with pytest.raises(rb.ShapeError, match=r"conv2d.*\(1, 3, 5, 5\).*3 channels.*\(4, 2, 3, 3\)"):
        F.conv2d(x, rb.tensor(rng.standard_normal((4, 2, 3, 3))))
    with pytest.raises(rb.ShapeError, match=r"conv2d: kernel \(7, 3\) is larger.*\(1, 3, 5, 5\)"):
        F.conv2d(x, rb.tensor(rng.standard_normal((4, 3, 7, 3))))
    with pytest.raises(rb.ShapeError, match=r"conv2d: input must be 4-D"):
        F.conv2d(rb.tensor(rng.standard_normal((3, 5, 5))), rb.tensor(np.ones((4, 3, 3, 3))))
    with pytest.raises(rb.ShapeError, match=r"conv2d: bias of shape \(3,\)"):
        F.conv2d(x, rb.tensor(np.ones((4, 3, 3, 3))), rb.tensor(np.ones(3)))
    with pytest.raises(ValueError, match="conv2d: stride"):
        F.conv2d(x, rb.tensor(np.ones((4, 3, 3, 3))), stride=0)


# -- pooling --------------------------------------------------------------------


POOL_CASES = [((3, 3), (2, 2), (1, 1)), ((2, 3), (2, 1), (1, 0)), ((2, 2), (2, 2), (0, 0))]


@pytest.mark.parametrize("kernel,stride,padding", POOL_CASES)
def test_pools_forward_and_gradcheck(rng, kernel, stride, padding):
    x = normal(rng, 2, 3, 7, 6)
    expected = pool_reference(x.numpy(), kernel, stride, padding, np.max, -np.inf)
    np.testing.assert_allclose(F.max_pool2d(x, kernel, stride, padding).numpy(), expected)
    assert gradcheck(lambda a: F.max_pool2d(a, kernel, stride, padding), [x])
    expected = pool_reference(x.numpy(), kernel, stride, padding, np.mean, 0.0)
    np.testing.assert_allclose(F.avg_pool2d(x, kernel, stride, padding).numpy(), expected)
    assert gradcheck(lambda a: F.avg_pool2d(a, kernel, stride, padding), [x])


def test_pool_stride_defaults_to_kernel_and_errors(rng):
    x = rb.tensor(rng.standard_normal((1, 2, 6, 4)))
    assert F.max_pool2d(x, 2).shape == (1, 2, 3, 2)
    assert F.avg_pool2d(x, (3, 2)).shape == (1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"max_pool2d: padding \(2, 2\) must be at most half"):
        F.max_pool2d(x, 3, padding=2)
    with pytest.raises(
        rb.ShapeError, match=r"avg_pool2d: kernel \(7, 1\) is larger.*\(1, 2, 6, 4\)"
    ):
        F.avg_pool2d(x, (7, 1))


# -- layer_norm and batch_norm --------------------------------------------------


@pytest.mark.parametrize("shape,normalized", [((3, 5), (5,)), ((2, 3, 4), (3, 4)), ((4, 4), 4)])
def test_layer_norm(rng, shape, normalized):
    sizes = (normalized,) if isinstance(normalized, int) else normalized
    x, weight, bias = normal(rng, *shape), normal(rng, *sizes), normal(rng, *sizes)
    axes = tuple(range(-len(sizes), 0))
    data = x.numpy()
    centred = data - data.mean(axis=axes, keepdims=True)
    x_hat = centred / np.sqrt((centred**2).mean(axis=axes, keepdims=True) + 1e-5)
    result = F.layer_norm(x, normalized, weight, bias)
    np.testing.assert_allclose(result.numpy(), x_hat * weight.numpy() + bias.numpy(), rtol=1e-12)
    assert gradcheck(lambda a, w, b: F.layer_norm(a, normalized, w, b), [x, weight, bias])
    assert gradcheck(lambda a: F.layer_norm(a, normalized, eps=1e-3), [x])
    assert gradcheck(lambda a, b: F.layer_norm(a, normalized, None, b), [x, bias])


def test_layer_norm_over_every_axis_and_errors(rng):
    x = normal(rng, 3, 4)
    assert gradcheck(lambda a: F.layer_norm(a, (3, 4)), [x])
    with pytest.raises(rb.ShapeError, match=r"layer_norm: input of shape \(3, 4\).*\(5,\)"):
        F.layer_norm(x, 5)
    with pytest.raises(rb.ShapeError, match=r"layer_norm: weight of shape \(3,\)"):
        F.layer_norm(x, 4, rb.tensor(np.ones(3)))


def batch_norm_reference(x, mean, var, weight, bias, eps=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x_hat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return x_hat * weight.reshape(shape) + bias.reshape(shape)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(rng, shape, training):
    x, weight, bias = normal(rng, *shape), normal(rng, 3), normal(rng, 3)
    running_mean, running_var = rng.standard_normal(3), rng.random(3) + 0.5
    axes = (0,) + tuple(range(2, len(shape)))
    data = x.numpy()
    mean = data.mean(axis=axes) if training else running_mean
    var = data.var(axis=axes) if training else running_var
    result = F.batch_norm(x, running_mean.copy(), running_var.copy(), weight, bias, training)
    expected = batch_norm_reference(data, mean, var, weight.numpy(), bias.numpy())
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-12)

    def fn(a, w, b):
        return F.batch_norm(a, running_mean.copy(), running_var.copy(), w, b, training)

    assert gradcheck(fn, [x, weight, bias])
    assert gradcheck(lambda a: F.batch_norm(a, running_mean, running_var, training=training), [x])


def test_batch_norm_updates_running_statistics_in_place(rng):
    data = rng.standard_normal((6, 3, 2, 2))
    running_mean, running_var = np.zeros(3), rb.tensor(np.ones(3))
    F.batch_norm(rb.tensor(data), running_mean, running_var, training=True, momentum=0.25)
    count = 6 * 2 * 2
    axes = (0, 2, 3)
    np.testing.assert_allclose(running_mean, 0.25 * data.mean(axis=axes))
    unbiased = data.var(axis=axes) * count / (count - 1)
    np.testing.assert_allclose(running_var.numpy(), 0.75 + 0.25 * unbiased)
    with pytest.raises(ValueError, match="more than one value per channel"):
        F.batch_norm(rb.tensor(np.ones((1, 3))), None, None, training=True)
    with pytest.raises(ValueError, match="eval mode"):
        F.batch_norm(rb.tensor(np.ones((2, 3))), None, None, training=False)
    with pytest.raises(rb.ShapeError, match=r"batch_norm: weight of shape \(2,\)"):
        F.batch_norm(rb.tensor(np.ones((2, 3))), None, None, rb.tensor(np.ones(2)), training=True)


# -- cross_entropy ----------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy(rng, reduction, smoothing):
    logits, target = normal(rng, 5, 4), rng.integers(0, 4, 5)
    losses = cross_entropy_reference(logits.numpy(), target, smoothing)
    expected = {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]
    result = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=smoothing)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12)
    assert gradcheck(lambda a: F.cross_entropy(a, target, reduction, smoothing), [logits])


def test_cross_entropy_errors(rng):
    logits = rb.tensor(rng.standard_normal((4, 3)))
    with pytest.raises(rb.ShapeError, match=r"cross_entropy: target of shape \(4, 1\).*\(4, 3\)"):
        F.cross_entropy(logits, np.zeros((4, 1), dtype=int))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*from 0 to 3"):
        F.cross_entropy(logits, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"from -1 to 2"):
        F.cross_entropy(logits, np.array([0, 1, 2, -1]))
    with pytest.raises(TypeError, match="integer class labels"):
        F.cross_entropy(logits, np.zeros(4))
    with pytest.raises(rb.ShapeError, match=r"input must be \(N, C\) logits"):
        F.cross_entropy(rb.tensor(np.ones(3)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(logits, np.zeros(4, dtype=int), reduction="avg")


# -- scaled_dot_product_attention ----------------------------------------------------


def test_attention_forward_and_gradcheck(rng):
    q, k, v = normal(rng, 2, 5, 3), normal(rng, 2, 4, 3), normal(rng, 2, 4, 6)
    sdpa = F.scaled_dot_product_attention
    np.testing.assert_allclose(
        sdpa(q, k, v).numpy(), attention_reference(q.numpy(), k.numpy(), v.numpy()), rtol=1e-12
    )
    assert gradcheck(sdpa, [q, k, v])
    assert gradcheck(lambda a, b, c: sdpa(a, b, c, scale=0.3), [q, k, v])
    boolean = rng.random((5, 4)) > 0.3
    boolean[:, 0] = True
    expected = attention_reference(q.numpy(), k.numpy(), v.numpy(), boolean)
    np.testing.assert_allclose(sdpa(q, k, v, attn_mask=boolean).numpy(), expected, rtol=1e-12)
    assert gradcheck(lambda a, b, c: sdpa(a, b, c, attn_mask=boolean), [q, k, v])
    additive = rng.standard_normal((2, 1, 4))
    expected = attention_reference(q.numpy(), k.numpy(), v.numpy(), additive)
    np.testing.assert_allclose(sdpa(q, k, v, attn_mask=additive).numpy(), expected, rtol=1e-12)
    assert gradcheck(lambda a, b, c: sdpa(a, b, c, attn_mask=additive), [q, k, v])


def test_attention_causal_broadcast_and_dropout(rng):
    sdpa = F.scaled_dot_product_attention
    q, k, v = normal(rng, 2, 3, 4, 5), normal(rng, 3, 4, 5), normal(rng, 1, 3, 4, 2)
    causal = np.tril(np.ones((4, 4), dtype=bool))
    expected = attention_reference(q.numpy(), k.numpy(), v.numpy(), causal)
    np.testing.assert_allclose(sdpa(q, k, v, is_causal=True).numpy(), expected, rtol=1e-12)
    assert gradcheck(lambda a, b, c: sdpa(a, b, c, is_causal=True), [q, k, v])
    assert gradcheck(lambda a, b, c: sdpa(a, b, c, dropout_p=0.4, generator=7), [q, k, v])
    dropped = sdpa(q, k, v, dropout_p=0.4, generator=7).numpy()
    np.testing.assert_array_equal(dropped, sdpa(q, k, v, dropout_p=0.4, generator=7).numpy())
    assert not np.allclose(dropped, sdpa(q, k, v).numpy())


def test_attention_fully_masked_row_and_errors(rng):
    sdpa = F.scaled_dot_product_attention
    q, k, v = normal(rng, 3, 2), normal(rng, 4, 2), normal(rng, 4, 3)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    output = sdpa(q, k, v, attn_mask=mask)
    np.testing.assert_array_equal(output.numpy()[1], 0.0)
    assert gradcheck(lambda a, b, c: sdpa(a, b, c, attn_mask=mask), [q, k, v])
    with pytest.raises(rb.ShapeError, match=r"query of shape \(3, 2\) and key of shape \(4, 3\)"):
        sdpa(q, normal(rng, 4, 3), v)
    with pytest.raises(rb.ShapeError, match=r"key of shape \(4, 2\) and value of shape \(5, 3\)"):
        sdpa(q, k, normal(rng, 5, 3))
    with pytest.raises(rb.ShapeError, match=r"attn_mask of shape \(2, 4\)"):
        sdpa(q, k, v, attn_mask=np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="not both"):
        sdpa(q, k, v, attn_mask=mask, is_causal=True)


# -- dropout ----------------------------------------------------------------------


def test_dropout(rng):
    x = normal(rng, 40, 50)
    output = F.dropout(x, 0.3, generator=1).numpy()
    kept = output != 0
    np.testing.assert_allclose(output[kept], x.numpy()[kept] / 0.7)
    assert abs(kept.mean() - 0.7) < 0.03
    np.testing.assert_array_equal(output, F.dropout(x, 0.3, generator=1).numpy())
    generator = np.random.default_rng(1)
    np.testing.assert_array_equal(output, F.dropout(x, 0.3, generator=generator).numpy())
    assert gradcheck(lambda a: F.dropout(a, 0.3, generator=5), [normal(rng, 3, 4)])
    assert F.dropout(x, 0.3, training=False) is x
    np.testing.assert_array_equal(F.dropout(x, 1.0).numpy(), 0.0)
    with pytest.raises(ValueError, match="dropout: dropout probability"):
        F.dropout(x, 1.5)


# -- sampled VJPs: unbiasedness ---------------------------------------------------------


def _conv_case(rng):
    inputs = [normal(rng, 3, 2, 5, 4), normal(rng, 3, 2, 3, 2), normal(rng, 3)]
    return (lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=1)), inputs


def _attention_case(rng, **options):
    inputs = [normal(rng, 2, 5, 3), normal(rng, 2, 6, 3), normal(rng, 2, 6, 4)]
    return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **options)), inputs


def _cases(rng):
    """(label, function, inputs, placements) for every op with a sampled VJP."""
    running = (rng.standard_normal(3), rng.random(3) + 0.5)
    mask = rng.random((5, 6)) > 0.3
    mask[:, 0] = True
    target = rng.integers(0, 4, 6)

    def batch_norm(training):
        def fn(x, w, b):
            return F.batch_norm(x, running[0].copy(), running[1].copy(), w, b, training)

        return fn, [normal(rng, 4, 3, 2, 2), normal(rng, 3), normal(rng, 3)]

    return {
        "conv2d": (*_conv_case(rng), ["contracted", "cotangent"]),
        "max_pool2d": (lambda x: F.max_pool2d(x, 3, 2, 1), [normal(rng, 3, 2, 5, 4)], [None]),
        "avg_pool2d": (
            lambda x: F.avg_pool2d(x, (2, 3), 1, (1, 0)),
            [normal(rng, 3, 2, 4, 4)],
            [None],
        ),
        "layer_norm": (
            lambda x, w, b: F.layer_norm(x, 4, w, b),
            [normal(rng, 5, 2, 4), normal(rng, 4), normal(rng, 4)],
            [None],
        ),
        "batch_norm_train": (*batch_norm(True), [None]),
        "batch_norm_eval": (*batch_norm(False), [None]),
        "cross_entropy_mean": (
            lambda x: F.cross_entropy(x, target, label_smoothing=0.1),
            [normal(rng, 6, 4)],
            [None],
        ),
        "cross_entropy_none": (
            lambda x: F.cross_entropy(x, target, reduction="none"),
            [normal(rng, 6, 4)],
            [None],
        ),
        "attention": (*_attention_case(rng, attn_mask=mask), ["contracted", "cotangent"]),
        "attention_dropout": (
            *_attention_case(rng, dropout_p=0.3, generator=11),
            ["contracted", "cotangent"],
        ),
        "dropout": (lambda x: F.dropout(x, 0.4, generator=3), [normal(rng, 5, 3)], [None]),
    }


CASE_NAMES = list(_cases(np.random.default_rng(0)))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_sampled_vjp_is_unbiased(case, spec):
    fn, inputs, placements = _cases(np.random.default_rng(1))[case]
    for placement in placements:
        assert_unbiased(fn, inputs, with_placement(spec, placement), draws=300, seed=2)


# -- sampled VJPs: the savings are real ---------------------------------------------------


def _backward_flops(fn, inputs, sketch):
    with CostMeter() as meter:
        grads_of(fn, inputs, np.ones(fn(*inputs).shape), sketch, seed=0)
    costs = next(iter(meter.per_op.values()))
    return costs.flops, costs.exact_equivalent_flops


@pytest.mark.parametrize(
    "case,placement",
    [
        ("conv2d", "contracted"),
        ("conv2d", "cotangent"),
        ("attention", "contracted"),
        ("attention", "cotangent"),
        ("layer_norm", None),
        ("batch_norm_train", None),
        ("cross_entropy_mean", None),
    ],
)
def test_uniform_sketch_halves_backward_flops(case, placement):
    fn, inputs, _ = _cases(np.random.default_rng(1))[case]
    flops, exact = _backward_flops(fn, inputs, with_placement("uniform:0.5", placement))
    assert 0.4 * exact <= flops <= 0.7 * exact  # k = ceil(n / 2) of small n


def _saved_by_forward(fn, inputs, sketch):
    before = saved_bytes.current
    if sketch is None:
        output = fn(*inputs)
    else:
        with rb.sampled(sketch, seed=0):
            output = fn(*inputs)
    held = saved_bytes.current - before
    ledger = sum(array.nbytes for array in output.op.saved_arrays().values())
    return held, ledger, output


def test_forward_drawn_contracted_sketch_saves_fewer_bytes(rng):
    # A patch-embedding convolution (kernel = stride): cols is as large as x,
    # so keeping half its rows halves what is saved. The input needs no
    # gradient, so it is not a parameter and its bytes count.
    x = rb.tensor(rng.standard_normal((4, 3, 8, 8)))
    weight = normal(rng, 5, 3, 2, 2)

    def patchify(a, w):
        return F.conv2d(a, w, stride=2)

    exact_held, exact_ledger, kept_alive = _saved_by_forward(patchify, [x, weight], None)
    sketch = with_placement("uniform:0.5", "contracted")
    held, ledger, kept_alive_too = _saved_by_forward(patchify, [x, weight], sketch)
    assert exact_ledger == x.data.nbytes and exact_held == x.data.nbytes
    assert ledger == held == x.data.nbytes // 2
    rank = with_placement("rank:0.25", "contracted")
    assert _saved_by_forward(patchify, [x, weight], rank)[1] == x.data.nbytes // 4

    # A 3x3 stride-1 convolution: cols is nine times x, so x itself is kept
    # (never more than the exact VJP saves).
    same = normal(rng, 5, 3, 3, 3)
    exact_held, _, kept = _saved_by_forward(
        lambda a, w: F.conv2d(a, w, padding=1), [x, same], None
    )
    held, _, kept_too = _saved_by_forward(
        lambda a, w: F.conv2d(a, w, padding=1), [x, same], sketch
    )
    assert held <= exact_held


def test_forward_drawn_attention_sketch_saves_fewer_bytes(rng):
    q, k, v = (rb.tensor(rng.standard_normal((2, 16, 4)), requires_grad=True) for _ in range(3))
    exact = _saved_by_forward(F.scaled_dot_product_attention, [q, k, v], None)[1]
    for placement in ("contracted", "cotangent"):
        sketch = with_placement("uniform:0.25", placement)
        sampled = _saved_by_forward(F.scaled_dot_product_attention, [q, k, v], sketch)[1]
        assert sampled < exact
    with rb.sampled("uniform:0.25", seed=0):
        assert F.scaled_dot_product_attention(q, k, v).op.placement == "cotangent"
