"""Exact gradients of composed models against independent numpy references.

Each test writes the model's forward pass in plain numpy, derives its backward
pass by hand (the chain rule written out layer by layer), and requires
rbprop's gradients for every input and parameter to agree to float64
precision. The models: a two-hidden-layer MLP with softmax cross-entropy, and
a pre-norm attention block (layer norm, two heads, causal mask, residual).
"""

import numpy as np

import rbprop as rb


def leaf(array):
    return rb.tensor(np.asarray(array, dtype=np.float64), requires_grad=True)


def assert_close(ours, reference):
    """Agreement to float64 precision, relative to the size of the reference."""
    scale = max(float(np.abs(reference).max()), 1e-300)
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-12 * scale)


# -- MLP: tanh -> relu -> softmax cross-entropy ---------------------------------


def mlp_reference(x, labels, w1, b1, w2, b2, w3, b3):
    """Loss and gradients of mean_i -log softmax(f(x_i))[labels_i], by hand."""
    rows = x.shape[0]
    pre1 = x @ w1.T + b1
    hidden1 = np.tanh(pre1)
    pre2 = hidden1 @ w2.T + b2
    hidden2 = np.maximum(pre2, 0.0)
    logits = hidden2 @ w3.T + b3
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(rows), labels].mean()

    # d loss / d logits = (softmax - one_hot) / rows
    one_hot = np.zeros_like(logits)
    one_hot[np.arange(rows), labels] = 1.0
    d_logits = (np.exp(log_probs) - one_hot) / rows
    d_w3, d_b3 = d_logits.T @ hidden2, d_logits.sum(axis=0)
    d_pre2 = (d_logits @ w3) * (pre2 > 0)  # relu' = 1[pre > 0]
    d_w2, d_b2 = d_pre2.T @ hidden1, d_pre2.sum(axis=0)
    d_pre1 = (d_pre2 @ w2) * (1.0 - hidden1**2)  # tanh' = 1 - tanh^2
    d_w1, d_b1 = d_pre1.T @ x, d_pre1.sum(axis=0)
    d_x = d_pre1 @ w1
    return loss, [d_x, d_w1, d_b1, d_w2, d_b2, d_w3, d_b3]


def mlp_rbprop(x, labels, w1, b1, w2, b2, w3, b3):
    hidden1 = rb.tanh(rb.linear(x, w1, b1))
    hidden2 = rb.relu(hidden1 @ w2.T + b2)  # matmul, transpose and broadcast add
    logits = rb.linear(hidden2, w3, b3)
    log_probs = rb.log_softmax(logits, axis=-1)
    return -log_probs[np.arange(x.shape[0]), labels].mean()


def test_mlp_gradients_match_the_reference(rng):
    rows, features, width1, width2, classes = 16, 10, 12, 9, 5
    arrays = [
        rng.standard_normal((rows, features)),
        rng.standard_normal((width1, features)) / np.sqrt(features),
        0.1 * rng.standard_normal(width1),
        rng.standard_normal((width2, width1)) / np.sqrt(width1),
        0.1 * rng.standard_normal(width2),
        rng.standard_normal((classes, width2)) / np.sqrt(width2),
        0.1 * rng.standard_normal(classes),
    ]
    labels = rng.integers(0, classes, rows)
    labels[:3] = 2  # repeated labels in the integer index

    reference_loss, reference_grads = mlp_reference(arrays[0], labels, *arrays[1:])
    inputs = [leaf(array) for array in arrays]
    loss = mlp_rbprop(inputs[0], labels, *inputs[1:])
    loss.backward()

    np.testing.assert_allclose(loss.item(), reference_loss, rtol=1e-13)
    for tensor, reference in zip(inputs, reference_grads, strict=True):
        assert_close(tensor.grad.numpy(), reference)


# -- attention block: x + W_o attn(LN(x)) --------------------------------------

EPS = 1e-5


def split_heads(array, heads):
    batch, tokens, width = array.shape
    return array.reshape(batch, tokens, heads, width // heads).transpose(0, 2, 1, 3)


def merge_heads(array):
    batch, heads, tokens, head_width = array.shape
    return array.transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_width)


def attention_reference(x, upstream, gamma, beta, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    """Loss sum(upstream * block(x)) and its gradients, by hand."""
    tokens = x.shape[1]
    head_width = x.shape[2] // heads
    causal = np.tril(np.ones((tokens, tokens), dtype=bool))

    # Layer norm: xhat = (x - mean) / sqrt(var + eps), normed = gamma * xhat + beta.
    centred = x - x.mean(axis=-1, keepdims=True)
    std = np.sqrt((centred**2).mean(axis=-1, keepdims=True) + EPS)
    xhat = centred / std
    normed = gamma * xhat + beta
    q = split_heads(normed @ wq.T + bq, heads)
    k = split_heads(normed @ wk.T + bk, heads)
    v = split_heads(normed @ wv.T + bv, heads)
    scores = np.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(head_width), -1e9)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    context = merge_heads(weights @ v)
    output = x + context @ wo.T + bo
    loss = float((upstream * output).sum())

    flat = x.shape[2]
    d_out = upstream  # for both the residual and the output projection
    d_wo = d_out.reshape(-1, flat).T @ context.reshape(-1, flat)
    d_bo = d_out.sum(axis=(0, 1))
    d_context = split_heads(d_out @ wo, heads)
    d_weights = d_context @ v.swapaxes(-1, -2)
    d_v = weights.swapaxes(-1, -2) @ d_context
    # softmax VJP: s * (g - sum(g * s)); masked scores get nothing through where.
    d_scores = weights * (d_weights - (d_weights * weights).sum(axis=-1, keepdims=True))
    d_scores = np.where(causal, d_scores, 0.0) / np.sqrt(head_width)
    d_q = merge_heads(d_scores @ k)
    d_k = merge_heads(d_scores.swapaxes(-1, -2) @ q)
    d_v = merge_heads(d_v)

    def projection_grads(d_projected):
        return (
            d_projected.reshape(-1, flat).T @ normed.reshape(-1, flat),
            d_projected.sum(axis=(0, 1)),
        )

    d_wq, d_bq = projection_grads(d_q)
    d_wk, d_bk = projection_grads(d_k)
    d_wv, d_bv = projection_grads(d_v)
    d_normed = d_q @ wq + d_k @ wk + d_v @ wv
    d_gamma = (d_normed * xhat).sum(axis=(0, 1))
    d_beta = d_normed.sum(axis=(0, 1))
    # Layer-norm VJP: (g - mean(g) - xhat * mean(g * xhat)) / std with g = gamma * d_normed.
    g = d_normed * gamma
    d_x_norm = (
        g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)
    ) / std
    d_x = d_out + d_x_norm
    grads = [d_x, d_gamma, d_beta, d_wq, d_bq, d_wk, d_bk, d_wv, d_bv, d_wo, d_bo]
    return loss, grads


def attention_rbprop(x, upstream, gamma, beta, wq, bq, wk, bk, wv, bv, wo, bo, heads):
    batch, tokens, width = x.shape
    head_width = width // heads
    causal = np.tril(np.ones((tokens, tokens), dtype=bool))

    mean = x.mean(axis=-1, keepdims=True)
    variance = rb.var(x, axis=-1, keepdims=True)
    normed = (x - mean) / rb.sqrt(variance + EPS) * gamma + beta

    def heads_of(weight, bias):
        projected = rb.linear(normed, weight, bias)
        return projected.reshape(batch, tokens, heads, head_width).permute(0, 2, 1, 3)

    q, k, v = heads_of(wq, bq), heads_of(wk, bk), heads_of(wv, bv)
    scores = rb.where(causal, q @ k.swapaxes(-1, -2) / np.sqrt(head_width), -1e9)
    context = rb.softmax(scores, axis=-1) @ v
    context = context.transpose(0, 2, 1, 3).reshape(batch, tokens, width)
    output = x + rb.linear(context, wo, bo)
    return (output * upstream).sum()


def test_attention_block_gradients_match_the_reference(rng):
    batch, tokens, width, heads = 2, 5, 8, 2
    scale = 1.0 / np.sqrt(width)
    x = rng.standard_normal((batch, tokens, width))
    upstream = rng.standard_normal((batch, tokens, width))
    parameters = [1.0 + 0.1 * rng.standard_normal(width), 0.1 * rng.standard_normal(width)]
    for _ in range(4):  # q, k, v and output projections
        parameters += [
            scale * rng.standard_normal((width, width)),
            0.1 * rng.standard_normal(width),
        ]

    reference_loss, reference_grads = attention_reference(x, upstream, *parameters, heads=heads)
    inputs = [leaf(x)] + [leaf(array) for array in parameters]
    loss = attention_rbprop(inputs[0], rb.tensor(upstream), *inputs[1:], heads=heads)
    loss.backward()

    np.testing.assert_allclose(loss.item(), reference_loss, rtol=1e-12)
    # The key bias gets no gradient (softmax ignores a shift shared by a row), so its
    # reference is rounding noise: compare it on the scale of the other gradients.
    overall = max(float(np.abs(reference).max()) for reference in reference_grads)
    for tensor, reference in zip(inputs, reference_grads, strict=True):
        np.testing.assert_allclose(
            tensor.grad.numpy(), reference, rtol=1e-10, atol=1e-12 * overall
        )
