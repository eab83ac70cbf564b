"""Smoke test of the benchmark suite (``bench/run.py``) on tiny sizes.

Benchmarks are not timed in tests: these check that one run of the suite's
functions writes the expected files and JSON keys, that the verdict computes
pass and fail correctly from given figures, and that the PyTorch twins of the
models have the rbprop models' parameter counts. PyTorch is an optional
benchmark dependency: its parts are skipped where it is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

OP_ROW_KEYS = {
    "op",
    "shape",
    "placement",
    "sketch",
    "seconds",
    "time_ratio",
    "flops_ratio",
    "saved_bytes",
    "bytes_ratio",
}
MODEL_ROW_KEYS = {
    "model",
    "batch",
    "steps",
    "sketch",
    "placement",
    "exact",
    "sampled",
    "torch",
    "sampled_over_exact",
    "exact_over_torch",
}
PARTS = {"forward", "backward", "optimizer", "step"}


@pytest.fixture(scope="module")
def suite():
    """``bench/run.py`` as a module (the bench scripts import each other by plain name)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))
        import run

        yield run
    for name in ("run", "bench_ops", "bench_models", "bench_environment"):
        sys.modules.pop(name, None)


def tiny_settings(suite):
    from bench_environment import blas_threads

    return suite.Settings(
        plan=(
            suite.OpPlan("linear", (4, 8, 8), ("contracted", "cotangent")),
            suite.OpPlan("linear", (4, 512, 512), ("contracted",)),
            suite.OpPlan("exp", (4, 8), (None,)),
        ),
        specs=["bernoulli:0.25", "uniform:0.5"],
        op_repeats=1,
        op_warmup=1,
        models=("mlp",),
        batch=4,
        steps=1,
        step_warmup=1,
        placement=None,
        with_torch=HAVE_TORCH,
        threads=blas_threads() or 1,
    )


def test_suite_writes_markdown_json_and_plot(suite, tmp_path):
    results = suite.run_suite(tiny_settings(suite), log=lambda line: None)
    paths = suite.write_outputs(results, tmp_path, log=lambda line: None)

    saved = json.loads(paths["json"].read_text(encoding="utf-8"))
    expected = {"started", "environment", "settings", "ops", "ops_seconds", "models", "verdict"}
    assert expected | {"seconds", "load_average_at_end"} <= set(saved)
    assert {"python", "numpy", "numba", "torch", "cpus", "threads", "blas"} <= set(
        saved["environment"]
    )

    # Per op: an exact row plus one row per placement and sketch.
    assert len(saved["ops"]) == (1 + 2 * 2) + (1 + 2) + (1 + 2)
    for row in saved["ops"]:
        assert set(row) >= OP_ROW_KEYS
    assert {row["sketch"] for row in saved["ops"]} == {"exact", "bernoulli:0.25", "uniform:0.5"}

    (model,) = saved["models"]
    assert set(model) >= MODEL_ROW_KEYS
    assert set(model["exact"]) == set(model["sampled"]) == PARTS
    assert set(model["sampled_over_exact"]) == PARTS
    if HAVE_TORCH:
        assert set(model["torch"]) == PARTS and model["exact_over_torch"] > 0
    else:
        assert model["torch"] is None and model["exact_over_torch"] is None

    # Three exact-over-PyTorch targets, the one wide layer measured, the MLP step.
    figures = [check["figure"] for check in saved["verdict"]]
    assert len(figures) == 5
    assert figures[3].startswith("linear 4x512x512 backward")
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "## Verdict" in markdown and "## Per op" in markdown and "## Per model" in markdown
    assert ("plot" in paths) == HAVE_MATPLOTLIB == (tmp_path / "bench.png").exists()


def op_row(op, shape, placement, sketch, time_ratio):
    return {"op": op, "shape": list(shape), "placement": placement, "sketch": sketch,
            "time_ratio": time_ratio}  # fmt: skip


def model_row(name, exact_over_torch, sampled_step_over_exact):
    return {
        "model": name,
        "sketch": "bernoulli:0.25",
        "placement": "op default",
        "exact_over_torch": exact_over_torch,
        "sampled_over_exact": {"step": sampled_step_over_exact},
    }


def test_verdict_passes_and_fails_from_given_figures(suite):
    wide_linear, narrow_conv = (512, 1024, 1024), (32, 32, 16, 16, 64, 3)
    ops = [
        op_row("linear", wide_linear, "-", "exact", 1.0),
        op_row("linear", wide_linear, "contracted", "bernoulli:0.25", 0.39),
        op_row("linear", wide_linear, "contracted", "uniform:0.25", 0.9),  # other family
        op_row("linear", wide_linear, "cotangent", "bernoulli:0.25", 0.9),  # other placement
        op_row("linear", wide_linear, "contracted", "bernoulli:0.1", 0.9),  # other keep ratio
        op_row("linear", (512, 512, 512), "contracted", "bernoulli:0.25", 0.41),
        op_row("conv2d", (4, 512, 8, 8, 512, 3), "contracted", "bernoulli:0.25", 0.4),
        op_row("conv2d", narrow_conv, "contracted", "bernoulli:0.25", 0.9),  # 64 channels
        op_row("linear", (512, 256, 1024), "contracted", "bernoulli:0.25", 0.9),  # 256 in
        op_row("exp", (2048, 512), "rows", "bernoulli:0.25", 0.9),
    ]
    models = [
        model_row("mlp", 1.0, 0.66),
        model_row("bagnet", 1.6, 0.5),
        model_row("vit", None, 0.5),
    ]

    checks = suite.verdict(ops, models)

    outcome = [(check["figure"].split(" backward")[0], check["passed"]) for check in checks]
    assert outcome == [
        ("mlp exact training step / PyTorch", True),  # equal to the limit passes
        ("bagnet exact training step / PyTorch", False),
        ("vit exact training step / PyTorch", None),  # PyTorch absent: not measured
        ("linear 512x1024x1024", True),
        ("linear 512x512x512", False),
        ("conv2d 4x512x8x8x512x3", True),
        ("mlp training step, bernoulli:0.25 (op default) / exact", False),
    ]
    assert [check["limit"] for check in checks] == [1.0, 1.5, 1.5, 0.4, 0.4, 0.4, 0.65]
    summary = suite.verdict_markdown(checks).splitlines()[-1]
    assert summary == "3 of 7 targets met, 3 missed, 1 not measured."


def test_verdict_without_figures_reports_not_measured(suite):
    checks = suite.verdict([], [])
    assert len(checks) == 5  # three PyTorch ratios, the wide layers, the MLP sampled step
    assert all(check["passed"] is None and check["value"] is None for check in checks)


def test_layer_width(suite):
    assert suite.layer_width("linear", (512, 784, 512)) == 512
    assert suite.layer_width("conv2d", (2, 64, 8, 8, 512, 3)) == 64
    assert suite.layer_width("matmul", (8, 256, 256, 256)) is None


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch (an optional benchmark dependency) is absent")
@pytest.mark.parametrize("name", ["mlp", "bagnet", "vit"])
def test_torch_twin_has_the_same_parameters(suite, name):
    import bench_models
    import torch

    model = bench_models.build_rbprop(name)
    twin = bench_models.build_torch(name, model)
    assert sum(param.data.size for param in model.parameters()) == sum(
        param.numel() for param in twin.parameters()
    )
    with torch.no_grad():
        logits = twin(torch.zeros(2, 1, 28, 28))
    assert tuple(logits.shape) == (2, bench_models.CLASSES)


def test_busy_machine_note_when_load_and_threads_exceed_the_cpus(suite):
    quiet = {"load_average": [0.5, 0.5, 0.5], "cpus": 2, "threads": 1}
    assert suite.busy_machine_note(quiet) == ""
    assert suite.busy_machine_note({**quiet, "threads": 2}) == ""  # under one process
    busy = {**quiet, "load_average": [1.5, 1.0, 1.0], "threads": 2}
    assert "Busy machine" in suite.busy_machine_note(busy)
    assert suite.busy_machine_note({**quiet, "load_average": None}) == ""
    # One BLAS thread waits for no other: the load slows both sides of every ratio.
    assert suite.busy_machine_note({**quiet, "load_average": [5.0, 5.0, 5.0]}) == ""
