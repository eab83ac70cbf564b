"""Seconds per training step of MLP, BagNet and ViT: rbprop exact, rbprop sampled, PyTorch.

One process, one run: for each model on mnist5k shapes (batch 128, 1x28x28
images, 10 classes) it times a full training step (forward with the
cross-entropy loss, backward, SGD-with-momentum update) for rbprop with exact
VJPs, rbprop with a sketch on every linear and conv2d op, and PyTorch on the
CPU with the same architecture, shapes and thread count. Each step is cut into
its parts, timed separately:

* ``forward``: the model and the loss, recorded for backward;
* ``backward``: ``loss.backward()``;
* ``optimizer``: ``zero_grad()`` and ``step()``;
* ``step``: the three together.

Each figure is the median over ``--steps`` steps after ``--warmup`` steps
(which also absorb numba's compile time; take at least two, since SGD's fused
momentum kernel first runs at the second step); ``step`` is the median of the step
totals, not the sum of the parts' medians. Exact and sampled rbprop steps
alternate, and ``sampled / exact`` is the median over those pairs of the
ratio, so a change in machine load moves both sides. PyTorch runs in a block
of its own after them: its thread pool and OpenBLAS's spin for a while after
each call, and alternating them would make each engine pay for the other's
spinning threads.

PyTorch is optional; without it the PyTorch rows are skipped with a message
saying how to install the CPU build.

    python bench/bench_models.py [--sketch bernoulli:0.25] [--placement weight]
        [--steps 15] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from bench_environment import (
    TORCH_INSTALL_HINT,
    blas_threads,
    load_torch_first,
    pin_threads,
    torch_version,
)

import rbprop as rb
from rbprop import functional as F
from rbprop import optim
from rbprop.nn import manual_seed
from rbprop.train import build_model, default_config

BATCH, CHANNELS, SIZE, CLASSES = 128, 1, 28, 10
MODELS = ("mlp", "bagnet", "vit")
PARTS = ("forward", "backward", "optimizer", "step")


def make_batch(batch: int = BATCH, seed: int = 0):
    """Random images ``(batch, 1, 28, 28)`` in [0, 1) and integer labels: mnist5k's shapes."""
    rng = np.random.default_rng(seed)
    images = rng.random((batch, CHANNELS, SIZE, SIZE), dtype=np.float32)
    return images, rng.integers(0, CLASSES, batch)


def build_rbprop(name: str, seed: int = 0):
    """The model ``rbprop train --model NAME`` trains, with its default sizes."""
    manual_seed(seed)
    return build_model(default_config(model=name), (CHANNELS, SIZE, SIZE), CLASSES)


def sketch_policy(sketch_spec: str, placement: str | None = None):
    """The policy sampling every linear and conv2d op, or None for ``exact``."""
    sketch = rb.sketch.parse(sketch_spec)
    if sketch is None:
        return None
    if placement:
        sketch.placement = placement
    return {"linear": sketch, "conv2d": sketch}


def medians(step_parts: list[dict]) -> dict:
    """Median seconds of each part over the timed steps."""
    return {part: statistics.median(step[part] for step in step_parts) for part in PARTS}


def _rbprop_trainer(name: str):
    model = build_rbprop(name)
    model.train()
    return model, optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def timed_step(optimizer, compute_loss) -> dict:
    """One training step of either engine (same optimizer interface); seconds of each part.

    The optimizer part is ``zero_grad`` plus ``step``; the forward part computes
    the loss, the backward part runs ``loss.backward()``.
    """
    start = time.perf_counter()
    optimizer.zero_grad()
    forward_start = time.perf_counter()
    loss = compute_loss()
    backward_start = time.perf_counter()
    loss.backward()
    update_start = time.perf_counter()
    optimizer.step()
    end = time.perf_counter()
    return {
        "forward": backward_start - forward_start,
        "backward": update_start - backward_start,
        "optimizer": (forward_start - start) + (end - update_start),
        "step": end - start,
    }


def rbprop_step(model, optimizer, x, y, policy, seed) -> dict:
    """One rbprop training step (sampled inside ``policy`` when given); seconds of each part."""

    def compute_loss():
        if policy is None:
            return F.cross_entropy(model(x), y)
        with rb.sampled(policy, seed=seed):
            return F.cross_entropy(model(x), y)

    return timed_step(optimizer, compute_loss)


def time_rbprop(name, sketch_spec, images, labels, steps, warmup, placement=None) -> dict:
    """Exact and sampled training steps, alternating; medians and paired ratios.

    Both kinds of step train one model with one optimizer, as a training loop
    does. With a model and an optimizer each, every step would first bring the
    other one's parameters, gradients and momenta (8 MB for the MLP) back into
    the cache, which no training loop pays: measured interleaved in one process,
    that made the MLP's optimizer part 0.12-0.14 ms instead of 0.10-0.11 ms and
    its sampled/exact step ratio 0.62-0.63 instead of 0.61. PyTorch, timed in a
    block of its own, keeps its one model in cache too.

    Returns ``{"exact": medians, "sampled": medians, "sampled_over_exact": ratios}``,
    the ratios being, per part, the median over steps of sampled / exact seconds.
    """
    trainer = _rbprop_trainer(name)
    policy = sketch_policy(sketch_spec, placement)
    x, y = rb.tensor(images), rb.tensor(labels)
    exact, sampled = [], []
    for step in range(warmup + steps):
        exact_parts = rbprop_step(*trainer, x, y, None, step)
        sampled_parts = rbprop_step(*trainer, x, y, policy, step)
        if step >= warmup:
            exact.append(exact_parts)
            sampled.append(sampled_parts)
    ratios = {
        part: statistics.median(s[part] / e[part] for s, e in zip(sampled, exact, strict=True))
        for part in PARTS
    }
    return {"exact": medians(exact), "sampled": medians(sampled), "sampled_over_exact": ratios}


def build_torch(name: str, twin):
    """A PyTorch model of the same architecture and sizes as the rbprop model ``twin``."""
    import torch
    from torch import nn as tnn

    if name == "mlp":
        return tnn.Sequential(
            tnn.Flatten(),
            tnn.Linear(784, 512),
            tnn.ReLU(),
            tnn.Linear(512, 512),
            tnn.ReLU(),
            tnn.Linear(512, CLASSES),
        )
    if name == "bagnet":

        def block(cin, cout, kernel, stride=1):
            return [
                tnn.Conv2d(cin, cout, kernel, stride, bias=False),
                tnn.BatchNorm2d(cout),
                tnn.ReLU(),
            ]

        width = twin.classifier.weight.shape[1]
        layers = block(CHANNELS, width, twin.patch_size, twin.stride)
        for _ in range(len(twin.blocks)):
            layers += block(width, width, 1)
        layers += [tnn.Conv2d(width, CLASSES, 1)]

        class TorchBagNet(tnn.Module):
            def __init__(self):
                super().__init__()
                self.body = tnn.Sequential(*layers)

            def forward(self, x):
                return self.body(x).mean(dim=(2, 3))

        return TorchBagNet()

    class Block(tnn.Module):
        def __init__(self, width=64, heads=4, hidden=128):
            super().__init__()
            self.norm1, self.norm2 = tnn.LayerNorm(width), tnn.LayerNorm(width)
            self.heads = heads
            self.in_proj, self.out_proj = tnn.Linear(width, 3 * width), tnn.Linear(width, width)
            self.mlp = tnn.Sequential(
                tnn.Linear(width, hidden), tnn.GELU(), tnn.Linear(hidden, width)
            )

        def forward(self, x):
            batch, tokens, width = x.shape
            qkv = self.in_proj(self.norm1(x)).reshape(batch, tokens, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            x = x + self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, width))
            return x + self.mlp(self.norm2(x))

    class TorchViT(tnn.Module):
        def __init__(self, width, depth, patch, heads, hidden, pool):
            super().__init__()
            self.pool = pool
            self.patch, self.grid = patch, SIZE // patch
            self.embed = tnn.Linear(CHANNELS * patch * patch, width)
            self.cls = tnn.Parameter(torch.zeros(1, 1, width))
            self.pos = tnn.Parameter(0.02 * torch.randn(1, self.grid**2 + 1, width))
            self.blocks = tnn.Sequential(*(Block(width, heads, hidden) for _ in range(depth)))
            self.norm, self.head = tnn.LayerNorm(width), tnn.Linear(width, CLASSES)

        def forward(self, images):
            batch, p, g = images.shape[0], self.patch, self.grid
            patches = images.reshape(batch, CHANNELS, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
            tokens = self.embed(patches.reshape(batch, g * g, -1))
            x = torch.cat([self.cls.expand(batch, 1, -1), tokens], dim=1) + self.pos
            features = self.norm(self.blocks(x))
            if self.pool == "cls":
                return self.head(features[:, 0])
            return self.head(features).mean(dim=1)

    block = twin.blocks[0]
    return TorchViT(
        twin.width, len(twin.blocks), twin.patch_size, block.attn.num_heads,
        block.mlp[0].weight.shape[0], twin.pool,
    )  # fmt: skip


def torch_step(model, optimizer, x, y) -> dict:
    """One PyTorch training step; seconds of each part."""
    import torch

    return timed_step(optimizer, lambda: torch.nn.functional.cross_entropy(model(x), y))


def time_torch(name, images, labels, steps, warmup, threads) -> dict:
    """Median seconds of each part of a PyTorch training step, on ``threads`` threads."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_torch(name, build_rbprop(name))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    timed = []
    for step in range(warmup + steps):
        parts = torch_step(model, optimizer, x, y)
        if step >= warmup:
            timed.append(parts)
    return medians(timed)


def bench_model(
    name, sketch_spec, images, labels, *, steps, warmup, threads, placement=None, with_torch=True
) -> dict:
    """One model's figures: rbprop exact and sampled, PyTorch (None without it) and ratios."""
    rbprop_timings = time_rbprop(name, sketch_spec, images, labels, steps, warmup, placement)
    reference = time_torch(name, images, labels, steps, warmup, threads) if with_torch else None
    exact = rbprop_timings["exact"]
    return {
        "model": name,
        "batch": int(images.shape[0]),
        "steps": steps,
        "sketch": sketch_spec,
        "placement": placement or "op default",
        "exact": exact,
        "sampled": rbprop_timings["sampled"],
        "torch": reference,
        "sampled_over_exact": rbprop_timings["sampled_over_exact"],
        "exact_over_torch": None if reference is None else exact["step"] / reference["step"],
    }


def bench_models(names, sketch_spec, *, batch=BATCH, log=print, **options) -> list[dict]:
    """:func:`bench_model` (``options``: its keyword arguments) for each model, one batch."""
    images, labels = make_batch(batch)
    rows = []
    for name in names:
        row = bench_model(name, sketch_spec, images, labels, **options)
        rows.append(row)
        torch_ms = "-" if row["torch"] is None else f"{1e3 * row['torch']['step']:.1f}"
        log(
            f"{name}: step ms {1e3 * row['exact']['step']:.1f} exact, "
            f"{1e3 * row['sampled']['step']:.1f} {sketch_spec}, {torch_ms} PyTorch"
        )
    return rows


def markdown_table(rows) -> str:
    """One line per model and engine: the parts in ms and the step's ratios."""
    lines = [
        "| model | run | forward ms | backward ms | optimizer ms | step ms "
        "| step / rbprop exact | step / PyTorch |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        torch_step_seconds = row["torch"]["step"] if row["torch"] else None
        runs = [
            ("rbprop exact", row["exact"], 1.0),
            (f"rbprop {row['sketch']}", row["sampled"], row["sampled_over_exact"]["step"]),
        ]
        if row["torch"]:
            runs.append(("PyTorch", row["torch"], row["torch"]["step"] / row["exact"]["step"]))
        for label, parts, over_exact in runs:
            over_torch = None if torch_step_seconds is None else parts["step"] / torch_step_seconds
            cells = " | ".join(f"{1e3 * parts[part]:.2f}" for part in PARTS)
            lines.append(
                f"| {row['model']} | {label} | {cells} | {over_exact:.3f} | {_ratio(over_torch)} |"
            )
    return "\n".join(lines)


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--sketch", default="bernoulli:0.25")
    parser.add_argument(
        "--placement",
        default=None,
        help="placement of the sketch (contracted, weight, cotangent); default: each op's own",
    )
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=None, help="BLAS and PyTorch threads")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not args.no_torch:
        load_torch_first()  # before any rbprop kernel starts OpenMP (bench_environment)
    if args.threads is not None:
        pin_threads(args.threads, reexec=argv is None)
    threads = blas_threads() or 1
    with_torch = not args.no_torch and torch_version() is not None
    if not args.no_torch and not with_torch:
        print(f"PyTorch is not installed: its rows are skipped ({TORCH_INSTALL_HINT}).")
    names = args.models.split(",")
    rows = bench_models(
        names,
        args.sketch,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        threads=threads,
        placement=args.placement,
        with_torch=with_torch,
    )

    print(
        f"\nTraining step, batch {args.batch}, {threads} thread(s), median of {args.steps} steps\n"
    )
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"threads": threads, "batch": args.batch, "rows": rows}, handle, indent=2)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
