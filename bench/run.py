"""The whole benchmark in one command: per op, per model, and a verdict on the targets.

    python bench/run.py [--quick] [--out DIR] [--threads N] [--placement weight] [--no-torch]

In one process and one run it measures

1. per op (``bench_ops``): exact against sampled backward, Bernoulli and
   uniform sketches at keep ratios 1, 0.5, 0.25 and 0.1, in both placements
   where an op has two: median seconds, paired time ratio, FLOPs ratio and
   saved-bytes ratio. The ops: linear layers 1024 and 512 wide on a batch of
   512, a 3x3 conv2d with 512 channels in and out, the 64-channel conv2d,
   a batched matmul, attention and ``exp`` (every op of ``bench_ops`` in the
   full run);
2. per model (``bench_models``): MLP, BagNet and ViT on mnist5k shapes at batch
   128, one training step cut into forward, backward and optimizer, for rbprop
   exact, rbprop with ``bernoulli:0.25`` on every linear and conv2d op, and
   PyTorch on the CPU with the same model, shapes and thread count (skipped,
   with a message, where PyTorch is not installed);

then writes ``DIR/bench.md`` (environment, verdict, tables), ``DIR/bench.json``
(every figure) and ``DIR/bench.png`` where matplotlib is installed.

The verdict checks the targets against the figures of this run: the exact
training step as a ratio to PyTorch's (MLP at most 1.0, BagNet and ViT at most
1.5), the sampled backward pass at keep ratio 0.25 as a ratio to the exact one
for linear and conv2d layers at least 512 wide (at most 0.4; Bernoulli, in the
ops' default contracted placement), and the MLP's sampled training step as a
ratio to its exact one (at most 0.65).

Every timing comes after untimed warm-up runs, which also absorb numba's
compile time. On 2 cores ``--quick`` takes about half a minute and the full
run about 3 minutes on a lightly loaded machine, and up to five times as long
on a busy one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import bench_models
import bench_ops
import numpy as np
from bench_environment import (
    TORCH_INSTALL_HINT,
    blas_threads,
    describe,
    describe_markdown,
    load_torch_first,
    pin_threads,
    torch_version,
)
from bench_ops import BOTH_PLACEMENTS, OpPlan

#: The layers the sampled-backward target is about: at least this many features or channels.
WIDE = 512
#: The ops of both runs whose sampled backward pass the verdict checks.
WIDE_OPS = (
    OpPlan("linear", (512, 1024, 1024), BOTH_PLACEMENTS),
    OpPlan("linear", (512, 512, 512), BOTH_PLACEMENTS),
    # 4 images of 8x8 give 256 rows of 512 * 9 columns: one exact backward pass
    # takes some 15-60 ms on 2 cores (more under load), so the run stays short.
    OpPlan("conv2d", (4, 512, 8, 8, 512, 3), BOTH_PLACEMENTS),
)


def _planned(plan, name) -> OpPlan:
    return next(entry for entry in plan if entry.name == name)


QUICK_PLAN = WIDE_OPS + (
    _planned(bench_ops.FULL, "conv2d"),
    _planned(bench_ops.FULL, "matmul"),
    _planned(bench_ops.QUICK, "scaled_dot_product_attention")._replace(placements=BOTH_PLACEMENTS),
    _planned(bench_ops.QUICK, "exp"),
)
FULL_PLAN = WIDE_OPS + tuple(entry for entry in bench_ops.FULL if entry not in WIDE_OPS)

#: The sketch of the per-model runs and of the verdict.
SKETCH = "bernoulli:0.25"
KEEP_RATIO = float(SKETCH.split(":")[1])
#: Upper limits of the verdict: exact step over PyTorch's, sampled over exact.
STEP_OVER_TORCH_LIMITS = {"mlp": 1.0, "bagnet": 1.5, "vit": 1.5}
WIDE_BACKWARD_LIMIT = 0.4
MLP_SAMPLED_STEP_LIMIT = 0.65


@dataclass
class Settings:
    """What one run measures, and how many times."""

    plan: tuple
    specs: list
    op_repeats: int
    op_warmup: int
    models: tuple
    batch: int
    steps: int
    step_warmup: int
    placement: str | None
    with_torch: bool
    threads: int
    dtype: str = "float32"


def settings_for(args, threads: int, with_torch: bool) -> Settings:
    """The quick or the full run, as the command line asks."""
    return Settings(
        plan=QUICK_PLAN if args.quick else FULL_PLAN,
        specs=bench_ops.sketch_specs(extra_families=()),
        op_repeats=args.repeats or (5 if args.quick else 15),
        op_warmup=1 if args.quick else 2,
        models=tuple(args.models.split(",")),
        batch=bench_models.BATCH,
        steps=args.steps or (7 if args.quick else 25),
        step_warmup=2 if args.quick else 3,
        placement=args.placement,
        with_torch=with_torch,
        threads=threads,
    )


def run_suite(settings: Settings, log=print) -> dict:
    """Every figure of one run: ``environment``, ``ops``, ``models``, ``verdict`` and timing."""
    started = time.perf_counter()
    results = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": describe(settings.threads),
        "settings": {**asdict(settings), "plan": [entry._asdict() for entry in settings.plan]},
    }
    log(f"per op: {len(settings.plan)} ops x {len(settings.specs)} sketches")
    log(bench_ops.HEADER)
    results["ops"] = bench_ops.bench_plan(
        settings.plan,
        settings.specs,
        settings.op_repeats,
        settings.op_warmup,
        np.dtype(settings.dtype),
        log=log,
    )
    results["ops_seconds"] = time.perf_counter() - started
    # The models start on a clean heap, not amid the per-op inputs' garbage.
    gc.collect()

    log(f"per model: {', '.join(settings.models)} at batch {settings.batch}")
    results["models"] = bench_models.bench_models(
        settings.models,
        SKETCH,
        batch=settings.batch,
        log=log,
        steps=settings.steps,
        warmup=settings.step_warmup,
        threads=settings.threads,
        placement=settings.placement,
        with_torch=settings.with_torch,
    )
    results["verdict"] = verdict(results["ops"], results["models"])
    results["seconds"] = time.perf_counter() - started
    results["load_average_at_end"] = describe(settings.threads)["load_average"]
    return results


# -- the verdict -------------------------------------------------------------------------


def layer_width(op: str, shape) -> int | None:
    """The narrower of a linear layer's features or a conv2d's channels; None for other ops."""
    if op == "linear":
        _, in_features, out_features = shape
        return min(in_features, out_features)
    if op == "conv2d":
        _, in_channels, _, _, out_channels, _ = shape
        return min(in_channels, out_channels)
    return None


def _check(figure: str, value, limit: float) -> dict:
    """One target: passed when ``value <= limit``, None (not measured) without a value."""
    return {
        "figure": figure,
        "value": value,
        "limit": limit,
        "passed": None if value is None else bool(value <= limit),
    }


def verdict(op_rows, model_rows) -> list[dict]:
    """The targets, each with its measured value, limit and pass (True, False or None)."""
    checks = []
    by_model = {row["model"]: row for row in model_rows}
    for model, limit in STEP_OVER_TORCH_LIMITS.items():
        row = by_model.get(model)
        value = None if row is None else row["exact_over_torch"]
        checks.append(_check(f"{model} exact training step / PyTorch", value, limit))

    for row in op_rows:
        width = layer_width(row["op"], row["shape"])
        if (
            width is not None
            and width >= WIDE
            and row["sketch"] == SKETCH
            and row["placement"] == "contracted"
        ):
            shape = "x".join(str(size) for size in row["shape"])
            figure = f"{row['op']} {shape} backward, {SKETCH} contracted / exact"
            checks.append(_check(figure, row["time_ratio"], WIDE_BACKWARD_LIMIT))
    if len(checks) == len(STEP_OVER_TORCH_LIMITS):
        figure = f"linear and conv2d >= {WIDE} wide backward, {SKETCH} contracted / exact"
        checks.append(_check(figure, None, WIDE_BACKWARD_LIMIT))

    row = by_model.get("mlp")
    value = None if row is None else row["sampled_over_exact"]["step"]
    sketch = SKETCH if row is None else f"{row['sketch']} ({row['placement']})"
    checks.append(_check(f"mlp training step, {sketch} / exact", value, MLP_SAMPLED_STEP_LIMIT))
    return checks


def verdict_markdown(checks) -> str:
    """The checks as a table, with a count of targets met, missed and not measured."""
    results = {True: "pass", False: "**FAIL**", None: "not measured"}
    lines = ["| figure | measured | limit | result |", "|---|---:|---:|---|"]
    for check in checks:
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        lines.append(
            f"| {check['figure']} | {value} | <= {check['limit']:g} | {results[check['passed']]} |"
        )
    failed = sum(check["passed"] is False for check in checks)
    missing = sum(check["passed"] is None for check in checks)
    lines.append("")
    lines.append(
        f"{len(checks) - failed - missing} of {len(checks)} targets met, {failed} missed, "
        f"{missing} not measured."
    )
    return "\n".join(lines)


# -- writing the results -----------------------------------------------------------------


def busy_machine_note(environment: dict) -> str:
    """A warning where other processes and our BLAS threads (two or more) want more cores.

    A BLAS call with several threads waits for all of them to be scheduled: on a
    busy 2-core machine a 1 ms product was measured taking 20-40 ms with two
    threads and 1 ms with one.
    """
    load, cpus, threads = environment["load_average"], environment["cpus"], environment["threads"]
    if not load or not cpus or not threads or threads < 2:
        return ""
    # Below one runnable process on average (often this suite's own previous run
    # fading out of the 1-minute average) the threads rarely wait.
    if load[0] < 1.0 or load[0] + threads <= cpus:
        return ""
    return (
        f"\n**Busy machine**: load average {load[0]} at the start, {threads} BLAS thread(s) "
        f"on {cpus} CPUs. Threads wait for one another, so the figures (the ratios to "
        "PyTorch above all) say more about the load than about the engines; rerun on a quiet "
        "machine or with `--threads 1`.\n"
    )


def report_markdown(results: dict, plot_note: str) -> str:
    """``bench.md``: environment, verdict, the per-op and the per-model tables."""
    settings = results["settings"]
    torch_note = (
        ""
        if settings["with_torch"]
        else f"\nPyTorch was not measured ({TORCH_INSTALL_HINT} to include it).\n"
    )
    return "\n".join(
        [
            "# rbprop benchmark",
            "",
            f"`{results.get('command', 'bench/run.py')}`: run {results['started']}, "
            f"{results['seconds']:.0f} s in all "
            f"(per op {results['ops_seconds']:.0f} s); "
            f"load average at the end {results['load_average_at_end']}.",
            "",
            "## Environment",
            "",
            describe_markdown(results["environment"]),
            busy_machine_note(results["environment"]),
            "## Verdict",
            "",
            "Targets checked against this run's figures (ratios of medians measured in the same "
            "process; the sampled/exact ratios are medians over alternating pairs).",
            "",
            verdict_markdown(results["verdict"]),
            "",
            "## Per op: exact against sampled backward",
            "",
            f"float32, median of {settings['op_repeats']} backward passes after "
            f"{settings['op_warmup']} warm-up pass(es); time ratio: median over pairs of "
            "sampled / exact seconds, timed alternately; FLOPs and bytes ratios: the engine's "
            "counts (exact row: 1).",
            "",
            bench_ops.markdown_table(results["ops"]),
            "",
            "## Per model: one training step",
            "",
            f"Batch {settings['batch']} of 1x28x28 images, 10 classes; SGD with momentum; "
            f"median of {settings['steps']} steps after {settings['step_warmup']} warm-up "
            f"steps, {settings['threads']} thread(s). The step column is the median of the "
            "step totals (not the sum of the parts' medians); the sampled run's ratio to exact "
            "is the median over alternating pairs.",
            torch_note,
            bench_models.markdown_table(results["models"]),
            "",
            "## Plot",
            "",
            plot_note,
            "",
        ]
    )


def plot(results: dict, path: Path) -> bool:
    """Time ratio against keep ratio per op, and step parts per model; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    models = results["models"]
    figure, axes = plt.subplots(
        1, 1 + len(models), figsize=(6 + 3.5 * len(models), 4.5), squeeze=False
    )
    _plot_ops(axes[0][0], results["ops"])
    for axis, row in zip(axes[0][1:], models, strict=True):
        _plot_model(axis, row)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _plot_ops(axis, rows) -> None:
    """Bernoulli sketches in the default placement: time ratio against keep ratio."""
    lines = {}
    for row in rows:
        if row["sketch"].startswith("bernoulli:") and row["placement"] in ("contracted", "rows"):
            label = f"{row['op']} {'x'.join(str(size) for size in row['shape'])}"
            keep_ratio = float(row["sketch"].split(":")[1])
            lines.setdefault(label, []).append((keep_ratio, row["time_ratio"]))
    for label, points in lines.items():
        points.sort()
        axis.plot(*zip(*points, strict=True), marker="o", label=label)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="time ratio = keep ratio")
    axis.axhline(
        WIDE_BACKWARD_LIMIT,
        color="red",
        linestyle="--",
        linewidth=0.8,
        label=f"target at keep {KEEP_RATIO:g}, layers >= {WIDE} wide",
    )
    axis.set_xlabel("keep ratio (Bernoulli, default placement)")
    axis.set_ylabel("sampled / exact backward seconds")
    axis.set_title("per op")
    axis.legend(fontsize=7)


def _plot_model(axis, row) -> None:
    """Stacked forward, backward and optimizer milliseconds of each run of one model."""
    runs = [("exact", row["exact"]), (row["sketch"], row["sampled"])]
    if row["torch"]:
        runs.append(("PyTorch", row["torch"]))
    bottoms = [0.0] * len(runs)
    for part in ("forward", "backward", "optimizer"):
        heights = [1e3 * parts[part] for _, parts in runs]
        axis.bar([label for label, _ in runs], heights, bottom=bottoms, label=part)
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights, strict=True)]
    axis.set_ylabel("ms per training step (median of each part)")
    axis.set_title(f"{row['model']}, batch {row['batch']}")
    axis.legend(fontsize=7)


def write_outputs(results: dict, out_dir: Path, log=print) -> dict:
    """Write bench.json, bench.png (with matplotlib) and bench.md; their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md"}
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
        handle.write("\n")
    if plot(results, out_dir / "bench.png"):
        paths["plot"] = out_dir / "bench.png"
        plot_note = "![time ratios per op and step parts per model](bench.png)"
    else:
        plot_note = "matplotlib is not installed: no plot (pip install matplotlib)."
        log(plot_note)
    paths["markdown"].write_text(report_markdown(results, plot_note), encoding="utf-8")
    return paths


# -- the command -------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer ops and repeats (~3 min)")
    parser.add_argument("--out", default="bench-results", help="folder for bench.md/json/png")
    parser.add_argument(
        "--threads", type=int, default=None, help="BLAS and PyTorch threads (default: as is)"
    )
    parser.add_argument(
        "--placement",
        default=None,
        choices=("contracted", "weight", "cotangent"),
        help="placement of the models' sketch (default: each op's own, contracted)",
    )
    parser.add_argument("--models", default=",".join(bench_models.MODELS))
    parser.add_argument("--repeats", type=int, default=None, help="timed backward passes per cell")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per run")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - set(bench_models.MODELS)
    if unknown:
        # Checked here, not after the per-op part has run for minutes.
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {bench_models.MODELS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_torch:
        load_torch_first()  # before any rbprop kernel starts OpenMP (bench_environment)
    if args.threads is not None:
        # From the command line, a process whose BLAS cannot be limited restarts itself.
        pin_threads(args.threads, reexec=argv is None)
    threads = blas_threads() or os.cpu_count() or 1
    with_torch = not args.no_torch and torch_version() is not None
    if not args.no_torch and not with_torch:
        print(f"PyTorch is not installed: its rows are skipped ({TORCH_INSTALL_HINT}).")
    settings = settings_for(args, threads, with_torch)

    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {line}", flush=True)

    results = run_suite(settings, log)
    given = sys.argv[1:] if argv is None else argv
    results["command"] = " ".join(["python", "bench/run.py", *given])
    paths = write_outputs(results, Path(args.out), log)
    print()
    print(paths["markdown"].read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
