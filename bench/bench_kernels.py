"""Time every numba kernel of ``rbprop.kernels`` against its numpy twin.

Shapes are those of the models at batch 128 on 28x28 images (a 3x3 convolution
over 32 channels at 14x14, ViT-sized attention rows and layer norms, 2x2
pooling, sketches over 4096 rows). Each timing is the median of several runs
after a warm-up call, which also compiles the kernel (or loads it from numba's
on-disk cache), so compilation never enters the figures.

    python bench/bench_kernels.py                  # markdown table on stdout
    python bench/bench_kernels.py --repeats 9 --json kernels.json
    python bench/bench_kernels.py --scale 0.25     # a quick run on smaller inputs

``run()`` returns the rows, for a larger benchmark to include.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numba
import numpy as np

from rbprop.kernels import conv, gather, importance, layernorm, pool, softmax


def median_seconds(function, repeats: int) -> float:
    """Median wall-clock seconds of ``function()`` over ``repeats`` runs, after a warm-up."""
    function()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _cases(rng, dtype, scale):
    """``(kernel name, shape label, numba call, numpy-twin call)`` for every kernel."""
    batch = max(1, round(128 * scale))

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    image = normal(batch, 32, 14, 14)
    geometry = (3, 3, 1, 1)
    cols = conv.im2col(image, *geometry)
    rows = np.sort(rng.choice(cols.shape[0], size=cols.shape[0] // 4, replace=False))
    kept_cols = cols[rows]
    image_label = f"{image.shape} k3 s1 p1"
    rows_label = f"{image_label}, 25% rows"
    yield (
        "im2col",
        image_label,
        lambda: conv.im2col(image, *geometry),
        (lambda: conv.im2col_reference(image, *geometry)),
    )
    yield (
        "col2im",
        image_label,
        lambda: conv.col2im(cols, image.shape, *geometry),
        (lambda: conv.col2im_reference(cols, image.shape, *geometry)),
    )
    yield (
        "im2col_rows",
        rows_label,
        lambda: conv.im2col_rows(image, rows, *geometry),
        (lambda: conv.im2col_rows_reference(image, rows, *geometry)),
    )
    yield (
        "col2im_rows",
        rows_label,
        (lambda: conv.col2im_rows(kept_cols, rows, image.shape, *geometry)),
        lambda: conv.col2im_rows_reference(kept_cols, rows, image.shape, *geometry),
    )

    matrix = normal(max(8, 32 * batch), 512)
    kept = np.sort(rng.choice(matrix.shape[0], size=matrix.shape[0] // 4, replace=False))
    scales = np.full(kept.size, 4.0)
    wide = np.ascontiguousarray(matrix.T)
    compact = matrix[kept]
    matrix_label = f"{matrix.shape}, 25% rows"
    yield (
        "gather_scaled rows",
        matrix_label,
        (lambda: gather.gather_scaled(matrix, kept, scales, axis=0)),
        lambda: gather.gather_scaled_reference(matrix, kept, scales, axis=0),
    )
    yield (
        "gather_scaled columns",
        f"{wide.shape}, 25% columns",
        (lambda: gather.gather_scaled(wide, kept, scales, axis=1)),
        lambda: gather.gather_scaled_reference(wide, kept, scales, axis=1),
    )
    yield (
        "scatter_add rows",
        f"{compact.shape} -> {matrix.shape}",
        (lambda: gather.scatter_add(compact, kept, matrix.shape[0])),
        lambda: gather.scatter_add_reference(compact, kept, matrix.shape[0]),
    )

    mask = rng.random(max(1024, round(1_000_000 * scale))) < 0.25
    yield (
        "compact_mask",
        f"{mask.shape} bool, 25% true",
        lambda: gather.compact_mask(mask),
        (lambda: gather.compact_mask_reference(mask)),
    )
    weights = np.abs(rng.standard_normal(cols.shape[0]))
    budget = weights.size / 4
    yield (
        "water_filling",
        f"{weights.shape} float64, r=0.25",
        (lambda: importance.water_filling(weights, budget)),
        lambda: importance.water_filling_reference(weights, budget),
    )

    scores = normal(batch * 4 * 65, 65)
    cotangent = normal(*scores.shape)
    probabilities = softmax.softmax(scores)
    log_probabilities = softmax.log_softmax(scores)
    scores_label = f"{scores.shape}"
    yield (
        "softmax",
        scores_label,
        lambda: softmax.softmax(scores),
        (lambda: softmax.softmax_reference(scores)),
    )
    yield (
        "softmax_backward",
        scores_label,
        (lambda: softmax.softmax_backward(probabilities, cotangent)),
        lambda: softmax.softmax_backward_reference(probabilities, cotangent),
    )
    yield (
        "log_softmax",
        scores_label,
        lambda: softmax.log_softmax(scores),
        (lambda: softmax.log_softmax_reference(scores)),
    )
    yield (
        "log_softmax_backward",
        scores_label,
        (lambda: softmax.log_softmax_backward(log_probabilities, cotangent)),
        lambda: softmax.log_softmax_backward_reference(log_probabilities, cotangent),
    )

    tokens = normal(batch * 65, 64)
    weight, bias = normal(64), normal(64)
    token_cotangent = normal(*tokens.shape)
    _, mean, rstd = layernorm.layer_norm_forward(tokens, weight, bias)
    tokens_label = f"{tokens.shape}"
    yield (
        "layer_norm_forward",
        tokens_label,
        (lambda: layernorm.layer_norm_forward(tokens, weight, bias)),
        lambda: layernorm.layer_norm_forward_reference(tokens, weight, bias),
    )
    yield (
        "layer_norm_backward",
        tokens_label,
        (lambda: layernorm.layer_norm_backward(token_cotangent, tokens, weight, mean, rstd)),
        lambda: layernorm.layer_norm_backward_reference(
            token_cotangent, tokens, weight, mean, rstd
        ),
    )

    maps = normal(batch, 32, 28, 28)
    pooled, positions = pool.max_pool2d(maps, 2)
    pooled_cotangent = normal(*pooled.shape)
    maps_label = f"{maps.shape} k2 s2"
    yield (
        "max_pool2d",
        maps_label,
        lambda: pool.max_pool2d(maps, 2),
        (lambda: pool.max_pool2d_reference(maps, 2)),
    )
    yield (
        "max_pool2d_backward",
        maps_label,
        (lambda: pool.max_pool2d_backward(pooled_cotangent, positions, maps.shape, 2)),
        lambda: pool.max_pool2d_backward_reference(pooled_cotangent, positions, maps.shape, 2),
    )
    yield (
        "avg_pool2d",
        maps_label,
        lambda: pool.avg_pool2d(maps, 2),
        (lambda: pool.avg_pool2d_reference(maps, 2)),
    )
    yield (
        "avg_pool2d_backward",
        maps_label,
        (lambda: pool.avg_pool2d_backward(pooled_cotangent, maps.shape, 2)),
        lambda: pool.avg_pool2d_backward_reference(pooled_cotangent, maps.shape, 2),
    )


def run(repeats: int = 7, dtype=np.float32, scale: float = 1.0, seed: int = 0) -> list[dict]:
    """Median seconds of every kernel and of its numpy twin, one dict per kernel."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, shape, kernel, twin in _cases(rng, np.dtype(dtype), scale):
        kernel_seconds = median_seconds(kernel, repeats)
        twin_seconds = median_seconds(twin, repeats)
        rows.append(
            {
                "kernel": name,
                "shape": shape,
                "numba_seconds": kernel_seconds,
                "numpy_seconds": twin_seconds,
                "speedup": twin_seconds / kernel_seconds if kernel_seconds else math.inf,
            }
        )
    return rows


def markdown_table(rows) -> str:
    lines = [
        "| kernel | input | numba (ms) | numpy twin (ms) | speedup |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['kernel']} | {row['shape']} | {1e3 * row['numba_seconds']:.3f} "
            f"| {1e3 * row['numpy_seconds']:.3f} | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per kernel (median)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--scale", type=float, default=1.0, help="batch size = 128 * scale")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    arguments = parser.parse_args(argv)

    rows = run(arguments.repeats, np.dtype(arguments.dtype), arguments.scale)
    print(
        f"numba {numba.__version__}, {numba.get_num_threads()} threads "
        f"({numba.threading_layer()} layer), numpy {np.__version__}, {arguments.dtype}, "
        f"median of {arguments.repeats} runs"
    )
    print(markdown_table(rows))
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
