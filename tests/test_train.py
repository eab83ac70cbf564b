"""``rbprop train`` / ``rbprop evaluate``: results file, checkpoints, bit-identical resume.

Runs use small models on the 8x8 digits so that each takes about a second.
"""

import json

import numpy as np
import pytest

from rbprop import nn, optim
from rbprop.checkpoint import CheckpointError, load_checkpoint, restore, save_checkpoint
from rbprop.cli import main
from rbprop.cost import CostMeter
from rbprop.sampling import sampled
from rbprop.train import sketch_policy

SMALL_MODELS = {
    "mlp": ["--model", "mlp", "--widths", "64,32,10"],
    "bagnet": ["--model", "bagnet", "--width", "8", "--depth", "1", "--patch-size", "3"],
    "vit": ["--model", "vit", "--width", "16", "--depth", "1", "--heads", "2"],
}


def train(tmp_path, name, *options):
    argv = [
        "train",
        "--dataset",
        "digits",
        "--batch-size",
        "128",
        "--no-progress",
        "--checkpoint",
        str(tmp_path / f"{name}.npz"),
        "--json",
        str(tmp_path / f"{name}.json"),
        *options,
    ]
    assert main(argv) == 0
    return json.loads((tmp_path / f"{name}.json").read_text())


def model_arrays(path):
    return load_checkpoint(path).model_state


@pytest.mark.parametrize(
    "model, sketch",
    [
        ("mlp", "exact"),
        ("mlp", "bernoulli:0.5"),
        ("mlp", "rank:0.5"),
        ("bagnet", "importance:0.5"),
        ("vit", "uniform:0.5"),
    ],
)
def test_resuming_continues_bit_identically(tmp_path, model, sketch):
    options = [*SMALL_MODELS[model], "--sketch", sketch, "--epochs", "2", "--seed", "3"]
    if model == "vit":
        options += ["--patch-size", "4"]
    straight = train(tmp_path, "straight", *options)
    train(tmp_path, "resumed", *options, "--stop-after", "1")
    assert load_checkpoint(tmp_path / "resumed.npz").extra["epoch"] == 1
    resumed = train(tmp_path, "resumed", *options, "--resume")

    first, second = model_arrays(tmp_path / "straight.npz"), model_arrays(tmp_path / "resumed.npz")
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    assert straight["train_loss"] == resumed["train_loss"]
    assert straight["test_accuracy"] == resumed["test_accuracy"]
    assert len(resumed["seconds_per_epoch"]) == 2


def test_results_file_and_evaluate_agree(tmp_path, capsys):
    results = train(
        tmp_path, "run", *SMALL_MODELS["mlp"], "--epochs", "2", "--sketch", "bernoulli:0.5"
    )
    for key in (
        "test_accuracy",
        "train_loss",
        "seconds_per_epoch",
        "backward_flops",
        "peak_saved_bytes",
    ):
        assert key in results
    assert len(results["train_loss"]) == 2 and results["test_accuracy"] > 0.3  # chance: 0.1
    assert 0 < results["backward_flops"] < results["exact_backward_flops"]
    assert results["peak_saved_bytes"] > 0

    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(tmp_path / "run.npz"),
                "--json",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["test_accuracy"] == results["test_accuracy"]
    assert "test accuracy" in capsys.readouterr().out


def test_resume_refuses_a_checkpoint_from_other_options(tmp_path):
    train(tmp_path, "run", *SMALL_MODELS["mlp"], "--epochs", "1")
    with pytest.raises(CheckpointError, match="lr"):
        train(tmp_path, "run", *SMALL_MODELS["mlp"], "--epochs", "2", "--lr", "0.5", "--resume")


def small_model_and_optimizer(seed):
    nn.manual_seed(seed)
    model = nn.BagNet(1, 10, width=4, depth=1, patch_size=3)
    optimizer = optim.Adam(model.parameters(), lr=0.01)
    for param in model.parameters():
        param.grad = param.detach() * 0 + 1
    optimizer.step()
    return model, optimizer


def test_a_truncated_checkpoint_raises_clearly_and_changes_nothing(tmp_path):
    model, optimizer = small_model_and_optimizer(0)
    path = tmp_path / "model.npz"
    save_checkpoint(path, model, optimizer, {"epoch": 1})
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])

    other, other_optimizer = small_model_and_optimizer(1)
    before = other.state_dict()
    optimizer_before = other_optimizer.state_dict()
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        restore(load_checkpoint(path), other, other_optimizer, path)
    for key, value in other.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    assert other_optimizer.state_dict()["state"].keys() == optimizer_before["state"].keys()


def test_a_checkpoint_for_another_model_changes_nothing(tmp_path):
    model, optimizer = small_model_and_optimizer(0)
    path = tmp_path / "model.npz"
    save_checkpoint(path, model, optimizer)
    nn.manual_seed(0)
    wider = nn.BagNet(1, 10, width=6, depth=1, patch_size=3)
    before = wider.state_dict()
    with pytest.raises(CheckpointError, match="shape"):
        restore(load_checkpoint(path), wider, None, path)
    for key, value in wider.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_checkpoints_are_written_atomically_and_round_trip(tmp_path):
    model, optimizer = small_model_and_optimizer(0)
    path = tmp_path / "model.npz"
    save_checkpoint(path, model, optimizer, {"epoch": 4})
    save_checkpoint(path, model, optimizer, {"epoch": 5})  # replaces the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]  # no temporary left
    checkpoint = load_checkpoint(path)
    assert checkpoint.extra == {"epoch": 5}
    clone, clone_optimizer = small_model_and_optimizer(1)
    restore(checkpoint, clone, clone_optimizer, path)
    for key, value in clone.state_dict().items():
        np.testing.assert_array_equal(value, model.state_dict()[key])
    assert clone_optimizer.state_dict()["state"][0]["step"] == 1


def test_sketch_scope_limits_sampling_to_named_modules():
    assert sketch_policy("exact") is None
    nn.manual_seed(0)
    vit = nn.ViT(image_size=8, patch_size=4, width=8, depth=1, heads=2)
    images = nn.Parameter(np.zeros((2, 1, 8, 8), dtype=np.float32))
    for scope, expected in [(None, 6), ("blocks.*.attn", 2), ("head,patch_embed", 2)]:
        with CostMeter() as meter, sampled(sketch_policy("uniform:0.5", scope), seed=0):
            vit(images).sum().backward()
        assert meter.per_op["linear"].sampled_calls == expected, scope
