"""Seconds per training step of MLP, BagNet and ViT: rbprop exact, rbprop sampled, PyTorch.

One process, one run: for each model on mnist5k shapes (batch 128, 1x28x28
images, 10 classes) it times a full training step (forward, cross-entropy,
backward, SGD-with-momentum update) for rbprop with exact VJPs, rbprop with a
sketch on every linear and conv layer, and PyTorch on the CPU with the same
architecture, shapes and thread count. Each figure is the median of
``--steps`` steps after ``--warmup`` steps (which also absorb numba's compile
time). PyTorch is optional: ``pip install torch==2.13.0`` gives a CPU build;
without it the PyTorch column is skipped with a message.

    python bench/bench_models.py [--sketch bernoulli:0.25] [--steps 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import rbprop as rb
from rbprop import functional as F
from rbprop import nn, optim
from rbprop.train import build_model, default_config

BATCH, CHANNELS, SIZE, CLASSES = 128, 1, 28, 10


def build_rbprop(name: str, seed: int = 0):
    """The model ``rbprop train --model NAME`` trains, with its default sizes."""
    nn.manual_seed(seed)
    return build_model(default_config(model=name), (CHANNELS, SIZE, SIZE), CLASSES)


def rbprop_step_seconds(name, sketch_spec, images, labels, steps, warmup, placement=None):
    model = build_rbprop(name)
    model.train()
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sketch = rb.sketch.parse(sketch_spec)
    if sketch is not None and placement:
        sketch.placement = placement
    policy = None if sketch is None else {"linear": sketch, "conv2d": sketch}
    x, y = rb.tensor(images), rb.tensor(labels)
    timings = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        if policy is None:
            loss = F.cross_entropy(model(x), y)
        else:
            with rb.sampled(policy, seed=step):
                loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[warmup:])


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


def torch_step_seconds(name, images, labels, steps, warmup, threads):
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_torch(name, build_rbprop(name))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    timings = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[warmup:])


def blas_threads() -> int:
    try:
        from threadpoolctl import threadpool_info

        counts = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
        return max(counts) if counts else 1
    except ImportError:
        import os

        return os.cpu_count() or 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,bagnet,vit")
    parser.add_argument("--sketch", default="bernoulli:0.25")
    parser.add_argument(
        "--placement",
        default=None,
        help="placement of the sketch (contracted, weight, cotangent); default: each op's own",
    )
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    images = rng.random((BATCH, CHANNELS, SIZE, SIZE), dtype=np.float32)
    labels = rng.integers(0, CLASSES, BATCH)
    threads = blas_threads()
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
        print("PyTorch is not installed: its column is skipped (pip install torch==2.13.0).")

    rows = []
    for name in args.models.split(","):
        exact = rbprop_step_seconds(name, "exact", images, labels, args.steps, args.warmup)
        sampled = rbprop_step_seconds(
            name, args.sketch, images, labels, args.steps, args.warmup, args.placement
        )
        reference = (
            torch_step_seconds(name, images, labels, args.steps, args.warmup, threads)
            if have_torch
            else None
        )
        rows.append(
            {
                "model": name,
                "exact_seconds": exact,
                "sampled_seconds": sampled,
                "sketch": args.sketch,
                "placement": args.placement or "op default",
                "torch_seconds": reference,
                "exact_over_torch": None if reference is None else exact / reference,
                "sampled_over_exact": sampled / exact,
            }
        )

    print(f"\nTraining step, batch {BATCH}, {threads} thread(s), median of {args.steps} steps\n")
    print(
        f"| model | rbprop exact (ms) | rbprop {args.sketch} (ms) | PyTorch (ms) "
        "| exact / PyTorch | sampled / exact |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        torch_ms = "-" if row["torch_seconds"] is None else f"{1e3 * row['torch_seconds']:.1f}"
        ratio = "-" if row["exact_over_torch"] is None else f"{row['exact_over_torch']:.2f}"
        print(
            f"| {row['model']} | {1e3 * row['exact_seconds']:.1f} | "
            f"{1e3 * row['sampled_seconds']:.1f} | {torch_ms} | {ratio} | "
            f"{row['sampled_over_exact']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": threads, "batch": BATCH, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
