"""Exact against sampled backward, op by op: median seconds, FLOPs and bytes saved.

For each op (a 1024x1024 linear layer on a batch of 512 in both placements, a
batched matmul, conv2d, attention and a few row-local ops) and each sketch
(Bernoulli and uniform at keep ratios 1, 0.5, 0.25 and 0.1; rank and
importance at 0.25, or at every ratio with ``--all-families``), the script
records a fresh forward pass, times only ``backward`` (median of ``--repeats``
runs after warm-up runs, so numba compilation is excluded; exact and sampled
runs alternate) and prints a markdown table:

* ``seconds``: median wall-clock seconds of the backward pass;
* ``time ratio``: median over pairs of ``sampled / exact`` seconds, the exact
  backward pass timed right before each sampled one (the exact row gives the
  median of the exact medians);
* ``FLOPs ratio``: sampled over exact floating-point operations (engine count);
* ``saved MiB`` / ``bytes ratio``: what the op keeps for backward (parameters not
  counted); only sketches drawn in the forward pass on the contracted axis shrink it.

Usage: ``python bench/bench_ops.py [--quick] [--json PATH] [--ops linear,exp]
[--sketches uniform:0.25,bernoulli:0.25] [--repeats N] [--threads N]``.
``bench/run.py`` runs these functions together with the per-model benchmark.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import NamedTuple

import numpy as np
from bench_environment import describe, pin_threads

from rbprop.compare import available_ops, backward_flops, forward, make_inputs, saved_bytes
from rbprop.sketch import parse

BOTH_PLACEMENTS = ("contracted", "cotangent")
ROWS = (None,)  # row-local ops: the sketch has one place, the rows of the cotangent


class OpPlan(NamedTuple):
    """One op to benchmark: its name in ``rbprop.compare``, input shape and placements."""

    name: str
    shape: tuple
    placements: tuple


# Shapes follow rbprop.compare's registry (see its ``shape_help``).
FULL = (
    OpPlan("linear", (512, 1024, 1024), BOTH_PLACEMENTS),
    OpPlan("matmul", (8, 256, 256, 256), BOTH_PLACEMENTS),
    OpPlan("conv2d", (32, 32, 16, 16, 64, 3), BOTH_PLACEMENTS),
    OpPlan("scaled_dot_product_attention", (8, 256, 64), BOTH_PLACEMENTS),
    OpPlan("exp", (4096, 512), ROWS),
    OpPlan("tanh", (4096, 512), ROWS),
    OpPlan("relu", (4096, 512), ROWS),
    OpPlan("gelu", (4096, 512), ROWS),
    OpPlan("softmax", (4096, 512), ROWS),
    OpPlan("layer_norm", (4096, 512), ROWS),
)
QUICK = (
    FULL[0],
    OpPlan("conv2d", (16, 16, 16, 16, 32, 3), ("contracted",)),
    OpPlan("scaled_dot_product_attention", (4, 128, 64), ("contracted",)),
    OpPlan("exp", (2048, 512), ROWS),
)
KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
#: Families timed at every keep ratio, and those timed at 0.25 only (unless all_families).
MAIN_FAMILIES = ("bernoulli", "uniform")
EXTRA_FAMILIES = ("rank", "importance")


def sketch_specs(all_families: bool = False, extra_families=EXTRA_FAMILIES) -> list[str]:
    """Sketch specs to time: the main families at every keep ratio, the extra ones too."""
    specs = [f"{family}:{r:g}" for family in MAIN_FAMILIES for r in KEEP_RATIOS]
    extra_ratios = KEEP_RATIOS if all_families else (0.25,)
    specs += [f"{family}:{r:g}" for family in extra_families for r in extra_ratios]
    return specs


def with_placement(spec: str, placement):
    sketch = parse(spec)
    if placement is not None:
        sketch.placement = placement
    return sketch


def backward_seconds(case, arrays, cotangent, policy, seed) -> float:
    """Wall-clock seconds of one ``backward`` after a fresh (untimed) forward pass."""
    output, _ = forward(case, arrays, policy, seed=[seed])
    # No gc.collect() here: walking the heap evicts the caches, which slows the
    # (shorter) sampled pass more than the exact one. Collection is only held off.
    gc.disable()
    try:
        start = time.perf_counter()
        output.backward(cotangent)
        return time.perf_counter() - start
    finally:
        gc.enable()


def paired_timings(case, arrays, cotangent, policy, repeats, warmup) -> dict:
    """Exact and sampled backward passes timed alternately, ``repeats`` pairs.

    Alternating keeps a change in machine load (other processes, CPU frequency)
    from landing on one side only; the time ratio is the median over pairs of
    ``sampled / exact``, which a load spike spanning one pair does not move.
    """
    exact, sampled = [], []
    for run in range(warmup + repeats):
        exact_seconds = backward_seconds(case, arrays, cotangent, None, run)
        sampled_seconds = backward_seconds(case, arrays, cotangent, policy, run)
        if run >= warmup:
            exact.append(exact_seconds)
            sampled.append(sampled_seconds)
    return {
        "exact": statistics.median(exact),
        "sampled": statistics.median(sampled),
        "ratio": statistics.median(s / e for s, e in zip(sampled, exact, strict=True)),
    }


def bench_op(name, shape, placements, specs, repeats, warmup, dtype, log=print):
    """Rows of the table for one op, every placement and sketch (``log`` gets each line)."""
    case = available_ops()[name]
    arrays = make_inputs(case, shape, seed=0, dtype=dtype)
    probe, _ = forward(case, arrays)
    cotangent = np.random.default_rng(1).standard_normal(probe.shape).astype(dtype)
    del probe
    exact_flops = backward_flops(case, arrays, cotangent)[0]
    exact_bytes = saved_bytes(case, arrays)
    exact_timings, rows = [], []
    if placements == (None,):
        # Row-local ops have no cheaper rank-k path (S v is formed densely): see README.
        specs = [spec for spec in specs if not spec.startswith("rank")]
    for placement in placements:
        for spec in specs:
            policy = {case.op_name: with_placement(spec, placement)}
            timings = paired_timings(case, arrays, cotangent, policy, repeats, warmup)
            exact_timings.append(timings["exact"])
            flops = backward_flops(case, arrays, cotangent, policy, seed=[0])[0]
            kept_bytes = saved_bytes(case, arrays, policy, seed=[0])
            rows.append(
                _row(
                    name,
                    shape,
                    placement or "rows",
                    spec,
                    timings["sampled"],
                    timings["ratio"],
                    flops / exact_flops if exact_flops else None,
                    kept_bytes,
                    kept_bytes / exact_bytes if exact_bytes else None,
                )
            )
            rows[-1]["exact_seconds"] = timings["exact"]  # the paired exact runs' median
            log(_format(rows[-1]))
    exact_row = _row(
        name, shape, "-", "exact", statistics.median(exact_timings), 1.0, 1.0, exact_bytes, 1.0
    )
    log(_format(exact_row))
    return [exact_row] + rows


def bench_plan(plan, specs, repeats, warmup, dtype, log=print) -> list[dict]:
    """Rows for every op of ``plan`` (ops missing from rbprop.functional are logged, skipped)."""
    known = available_ops()
    rows = []
    for name, shape, placements in plan:
        if name not in known:
            log(f"| {name} | (not in rbprop.functional yet: skipped) |||||||")
            continue
        rows += bench_op(name, shape, placements, specs, repeats, warmup, dtype, log)
    return rows


def _row(op, shape, placement, sketch, seconds, time_ratio, flops_ratio, kept, bytes_ratio):
    return {
        "op": op,
        "shape": list(shape),
        "placement": placement,
        "sketch": sketch,
        "seconds": seconds,
        "time_ratio": time_ratio,
        "flops_ratio": flops_ratio,
        "saved_bytes": kept,
        "bytes_ratio": bytes_ratio,
    }


HEADER = (
    "| op | shape | placement | sketch | seconds | time ratio | FLOPs ratio | saved MiB "
    "| bytes ratio |\n|---|---|---|---|---:|---:|---:|---:|---:|"
)


def markdown_table(rows) -> str:
    """The rows as a markdown table, under :data:`HEADER`."""
    return "\n".join([HEADER] + [_format(row) for row in rows])


def _format(row) -> str:
    def ratio(value):
        return "n/a" if value is None else f"{value:.3f}"

    shape = "x".join(str(size) for size in row["shape"])
    return (
        f"| {row['op']} | {shape} | {row['placement']} | {row['sketch']} "
        f"| {row['seconds']:.5f} | {ratio(row['time_ratio'])} | {ratio(row['flops_ratio'])} "
        f"| {row['saved_bytes'] / 2**20:.2f} | {ratio(row['bytes_ratio'])} |"
    )


def _print_now(line: str) -> None:
    print(line, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer ops, sizes and repeats")
    parser.add_argument("--ops", default=None, help="comma-separated subset of the ops")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per cell first")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--all-families", action="store_true", help="rank and importance too")
    parser.add_argument(
        "--sketches", default=None, help="comma-separated specs instead of the default set"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: as is)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        pin_threads(args.threads, reexec=argv is None)

    plan = QUICK if args.quick else FULL
    if args.ops:
        wanted = args.ops.split(",")
        names = sorted({entry.name for entry in FULL})
        unknown = [name for name in wanted if name not in names]
        if unknown:
            parser.error(f"unknown ops {unknown}; choose from {names}")
        plan = [entry for entry in FULL if entry.name in wanted]
    repeats = args.repeats or (5 if args.quick else 9)
    specs = args.sketches.split(",") if args.sketches else sketch_specs(args.all_families)
    for spec in specs:
        parse(spec)  # a bad spec fails here, before any timing
    dtype = np.dtype(args.dtype)

    environment = describe()
    print(f"environment: {environment}")
    print(f"dtype {dtype}, median of {repeats} runs after {args.warmup} warm-up runs")
    print("(time ratio: median over pairs of sampled / exact, timed alternately)\n")
    print(HEADER, flush=True)
    rows = bench_plan(plan, specs, repeats, args.warmup, dtype, log=_print_now)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"environment": environment, "rows": rows}, handle, indent=2)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
