"""Modules, layers and models: registration, paths, state dicts, layer maths, gradients."""

import math

import numpy as np
import pytest

import rbprop as rb
from rbprop import nn
from rbprop.check import gradcheck
from rbprop.cost import CostMeter
from rbprop.sampling import current_module


def float64_input(rng, *shape, requires_grad=True):
    return rb.tensor(rng.standard_normal(shape), requires_grad=requires_grad)


def swapped_parameter(owner, name, forward):
    """A function of one tensor that stands in for ``owner.name`` while ``forward`` runs."""
    original = getattr(owner, name)

    def run(value):
        object.__setattr__(owner, name, value)
        try:
            return forward()
        finally:
            object.__setattr__(owner, name, original)

    return run


# -- registration, traversal, paths ----------------------------------------------


def test_parameters_are_registered_in_order_with_dotted_names():
    nn.manual_seed(0)
    model = nn.MLP([6, 5, 3])
    names = [name for name, _ in model.named_parameters()]
    assert names == ["layers.1.weight", "layers.1.bias", "layers.3.weight", "layers.3.bias"]
    assert all(p.dtype == np.float32 and p.requires_grad for p in model.parameters())
    assert model.num_parameters() == 6 * 5 + 5 + 5 * 3 + 3


def test_paths_follow_the_tree_and_update_when_a_model_is_wrapped():
    model = nn.ViT(image_size=8, patch_size=4, width=8, depth=2, heads=2)
    assert model.path == ""
    assert model.blocks[1].attn.path == "blocks.1.attn"
    assert model.blocks[0].mlp[2].path == "blocks.0.mlp.2"
    wrapper = nn.Sequential(model)
    assert model.blocks[1].attn.path == "0.blocks.1.attn"
    assert [name for name, _ in wrapper.named_modules()][:3] == ["", "0", "0.patch_embed"]


def test_calling_a_module_runs_forward_inside_its_scope():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(current_module())
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Identity(), Probe())

        def forward(self, x):
            seen.append(current_module())
            return self.inner(x)

    Outer()(rb.tensor([1.0]))
    assert seen == ["", "inner.1"]


def test_a_policy_can_sample_only_the_ops_of_named_modules():
    nn.manual_seed(0)
    model = nn.ViT(image_size=8, patch_size=4, width=8, depth=2, heads=2)
    images = rb.tensor(np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32))
    with CostMeter() as meter, rb.sampled({"blocks.*.mlp/linear": "bernoulli:0.5"}, seed=0):
        model(images).sum().backward()
    linear = meter.per_op["linear"]
    # per block: in_proj, out_proj and two MLP linears; plus patch_embed and head
    assert linear.calls == 2 * 4 + 2
    assert linear.sampled_calls == 2 * 2


def test_train_eval_zero_grad_and_float64_casting():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5), nn.BatchNorm2d(2))
    assert all(module.training for module in model.modules())
    model.eval()
    assert not any(module.training for module in model.modules())
    model.train()
    assert model[1].training

    linear = nn.Linear(3, 2)
    linear(rb.tensor(np.ones((4, 3), dtype=np.float32))).sum().backward()
    assert linear.weight.grad is not None
    linear.zero_grad()
    assert linear.weight.grad is None
    linear.double()
    assert linear.weight.dtype == np.float64 and linear.bias.dtype == np.float64


def test_a_module_that_skips_super_init_gets_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.layer = nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match="super"):
        Broken()


# -- state dicts --------------------------------------------------------------------


def test_state_dict_round_trips_parameters_and_buffers():
    nn.manual_seed(0)
    source = nn.BagNet(width=8, depth=1, patch_size=5)
    source.stem[1].running_mean[...] = 0.25
    nn.manual_seed(1)
    target = nn.BagNet(width=8, depth=1, patch_size=5)
    state = source.state_dict()
    assert "stem.1.running_mean" in state and "stem.1.running_var" in state
    target.load_state_dict(state)
    for key, value in target.state_dict().items():
        np.testing.assert_array_equal(value, state[key])
    state["stem.1.running_mean"][...] = 7.0  # the state dict is a copy
    assert target.stem[1].running_mean[0] == np.float32(0.25)


def test_load_state_dict_with_a_wrong_shape_raises_and_changes_nothing():
    nn.manual_seed(0)
    model = nn.MLP([4, 3, 2])
    before = model.state_dict()
    bad = {key: np.full_like(value, 9.0) for key, value in before.items()}
    bad["layers.3.weight"] = np.zeros((2, 5), dtype=np.float32)
    with pytest.raises(nn.StateDictError, match=r"layers\.3\.weight.*\(2, 5\).*\(2, 3\)"):
        model.load_state_dict(bad)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])  # not even the good entries


def test_load_state_dict_refuses_missing_and_unexpected_keys_unless_not_strict():
    model = nn.MLP([4, 3, 2])
    state = model.state_dict()
    extra = dict(state, **{"layers.9.weight": np.zeros(1)})
    with pytest.raises(nn.StateDictError, match="unexpected keys.*layers.9.weight"):
        model.load_state_dict(extra)
    partial = dict(state)
    del partial["layers.1.bias"]
    with pytest.raises(nn.StateDictError, match="missing keys.*layers.1.bias"):
        model.load_state_dict(partial)
    result = model.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["layers.1.bias"]


# -- layers -----------------------------------------------------------------------


def test_linear_and_conv_initialisation_matches_pytorchs_bounds():
    nn.manual_seed(0)
    linear = nn.Linear(400, 300)
    bound = 1 / math.sqrt(400)
    weight = linear.weight.numpy()
    assert np.abs(weight).max() <= bound and np.abs(linear.bias.numpy()).max() <= bound
    # uniform on [-b, b] has standard deviation b / sqrt(3)
    assert abs(weight.std() - bound / math.sqrt(3)) < 0.02 * bound
    conv = nn.Conv2d(4, 8, 3)
    assert conv.weight.shape == (8, 4, 3, 3)
    assert np.abs(conv.weight.numpy()).max() <= 1 / math.sqrt(4 * 9)


def test_manual_seed_makes_initialisation_repeatable():
    nn.manual_seed(3)
    first = nn.MLP([5, 4, 2]).state_dict()
    nn.manual_seed(3)
    second = nn.MLP([5, 4, 2]).state_dict()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_linear_computes_x_wt_plus_b(rng):
    layer = nn.Linear(3, 2).double()
    x = rng.standard_normal((4, 3))
    expected = x @ layer.weight.numpy().T + layer.bias.numpy()
    np.testing.assert_allclose(layer(rb.tensor(x)).numpy(), expected)


def test_batchnorm_updates_running_statistics_in_training_and_uses_them_in_eval(rng):
    layer = nn.BatchNorm2d(3)
    x = (2.0 + 3.0 * rng.standard_normal((8, 3, 4, 4))).astype(np.float32)
    out = layer(rb.tensor(x)).numpy()
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    batch_mean = x.mean(axis=(0, 2, 3))
    batch_var = x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(layer.running_mean, 0.1 * batch_mean, rtol=1e-5)
    np.testing.assert_allclose(layer.running_var, 0.9 + 0.1 * batch_var, rtol=1e-5)
    layer.eval()
    frozen = layer.running_mean.copy()
    out = layer(rb.tensor(x)).numpy()
    expected = (x - frozen[:, None, None]) / np.sqrt(layer.running_var[:, None, None] + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(layer.running_mean, frozen)


def test_layernorm_dropout_flatten_activations(rng):
    x = rb.tensor(rng.standard_normal((2, 5, 6)))
    normalised = nn.LayerNorm(6).double()(x).numpy()
    np.testing.assert_allclose(normalised.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(normalised.std(axis=-1), 1.0, rtol=1e-4)
    dropout = nn.Dropout(0.5)
    assert dropout.eval()(x) is x
    kept = dropout.train()(x).numpy()
    assert set(np.unique(np.round(kept / x.numpy(), 6))) <= {0.0, 2.0}
    assert nn.Flatten()(x).shape == (2, 30)
    np.testing.assert_array_equal(nn.ReLU()(x).numpy(), np.maximum(x.numpy(), 0))
    assert nn.GELU()(x).shape == x.shape


def attention_reference(x, in_weight, in_bias, out_weight, out_bias, heads):
    """Multi-head self-attention written out in numpy."""
    batch, tokens, width = x.shape
    head_dim = width // heads
    q, k, v = np.split(x @ in_weight.T + in_bias, 3, axis=-1)

    def split(t):
        return t.reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3)

    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    merged = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, width)
    return merged @ out_weight.T + out_bias


def test_multihead_attention_matches_a_numpy_reference(rng):
    nn.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2).double()
    attention.in_proj.bias.data[...] = rng.standard_normal(24)
    x = rng.standard_normal((2, 5, 8))
    expected = attention_reference(
        x,
        attention.in_proj.weight.numpy(),
        attention.in_proj.bias.numpy(),
        attention.out_proj.weight.numpy(),
        attention.out_proj.bias.numpy(),
        heads=2,
    )
    np.testing.assert_allclose(attention(rb.tensor(x)).numpy(), expected, rtol=1e-10)
    # separate key/value inputs take the same path when they equal the query
    separate = attention(rb.tensor(x), rb.tensor(x), rb.tensor(x)).numpy()
    np.testing.assert_allclose(separate, expected, rtol=1e-10)


def test_transformer_block_gradients_match_central_differences(rng):
    nn.manual_seed(0)
    block = nn.TransformerBlock(8, 2, mlp_ratio=2).double()
    x = float64_input(rng, 2, 3, 8)
    gradcheck(block, [x], atol=1e-6, rtol=1e-5)
    for owner, name in [(block.attn.in_proj, "weight"), (block.norm2, "bias")]:
        parameter = getattr(owner, name)
        value = rb.tensor(parameter.numpy().copy(), requires_grad=True)
        gradcheck(
            swapped_parameter(owner, name, lambda: block(x.detach())),
            [value],
            atol=1e-6,
            rtol=1e-5,
        )


def test_bagnet_gradients_match_central_differences(rng):
    nn.manual_seed(0)
    model = nn.BagNet(in_channels=1, num_classes=3, width=4, depth=1, patch_size=3).double()
    images = float64_input(rng, 2, 1, 6, 6)
    gradcheck(model, [images], atol=1e-6, rtol=1e-5)
    stem = model.stem[0]
    value = rb.tensor(stem.weight.numpy().copy(), requires_grad=True)
    gradcheck(
        swapped_parameter(stem, "weight", lambda: model(images.detach())),
        [value],
        atol=1e-6,
        rtol=1e-5,
    )


# -- models -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, shape",
    [
        (lambda: nn.MLP([784, 32, 10]), (4, 1, 28, 28)),
        (lambda: nn.BagNet(1, 10, width=16, depth=2), (4, 1, 28, 28)),
        (lambda: nn.BagNet(3, 10, width=16, depth=2), (4, 3, 32, 32)),
        (lambda: nn.ViT(28, 4, 1, 10, width=16, depth=1, heads=2), (4, 1, 28, 28)),
        (lambda: nn.ViT(32, 4, 3, 10, width=16, depth=1, heads=2), (4, 3, 32, 32)),
    ],
)
def test_models_give_logits_and_gradients_for_every_parameter(model, shape):
    nn.manual_seed(0)
    net = model()
    images = rb.tensor(np.random.default_rng(0).random(shape).astype(np.float32))
    logits = net(images)
    assert logits.shape == (shape[0], 10) and logits.dtype == np.float32
    rb.functional.cross_entropy(logits, rb.tensor(np.arange(shape[0]))).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        assert np.all(np.isfinite(param.grad.numpy())), name


def test_vit_mean_pooling_averages_per_token_logits():
    nn.manual_seed(0)
    vit = nn.ViT(image_size=8, patch_size=4, width=8, depth=1, heads=2, pool="mean").double()
    images = rb.tensor(np.random.default_rng(0).random((3, 1, 8, 8)))
    tokens = vit.patch_embed(vit.patches(images))
    x = rb.concatenate([rb.broadcast_to(vit.cls_token, (3, 1, 8)), tokens], axis=1)
    features = vit.norm(vit.blocks[0](x + vit.pos_embed)).numpy()
    expected = features.mean(axis=1) @ vit.head.weight.numpy().T + vit.head.bias.numpy()
    np.testing.assert_allclose(vit(images).numpy(), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="pool"):
        nn.ViT(pool="max")


def test_vit_rejects_images_of_the_wrong_size():
    with pytest.raises(ValueError, match="not divisible"):
        nn.ViT(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="28x28"):
        nn.ViT(image_size=28)(rb.tensor(np.zeros((1, 1, 32, 32), dtype=np.float32)))
