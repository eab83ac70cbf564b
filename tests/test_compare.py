"""The per-op comparison (``rbprop.check.compare_op`` and ``rbprop compare``)."""

import argparse
import json
import math

import numpy as np
import pytest

from rbprop.compare import (
    add_compare_arguments,
    available_ops,
    compare_op,
    rank_moment_coefficients,
    run_compare,
)
from rbprop.sketch import RankK

FIELDS = {
    "op",
    "sketch",
    "placement",
    "draws",
    "shapes",
    "bias_z_max",
    "bias_z2_mean",
    "measured_variance",
    "measured_variance_stderr",
    "theoretical_variance",
    "variance_ratio",
    "exact_flops",
    "sampled_flops",
    "exact_seconds",
    "sampled_seconds",
    "exact_saved_bytes",
    "sampled_saved_bytes",
}


def _assert_consistent(report, z_limit=5.0):
    """Unbiased, and measured variance within ``z_limit`` standard errors of theory."""
    assert report["bias_z_max"] < 6.0
    assert report["bias_z2_mean"] < 3.0
    assert report["bias_fixed_mismatches"] == 0
    if report["theoretical_variance"] is not None:
        assert abs(report["variance_z"]) <= z_limit, report


def test_compare_op_is_exported_from_check():
    from rbprop.check import compare_op as exported

    assert exported is compare_op


def test_linear_importance_report_has_every_field():
    report = compare_op("linear", "importance:0.25", draws=200, repeats=2)
    assert set(report) >= FIELDS
    assert report["op"] == "linear" and report["sketch"] == "importance:0.25"
    assert report["placement"] == "contracted"  # linear's default
    assert report["shapes"] == {"x": [16, 12], "weight": [10, 12], "bias": [10]}
    assert report["sketched_axis_length"] == 16
    _assert_consistent(report)
    # The op's importance weights estimate ||J_i||, so they do no better than the optimum.
    assert report["theoretical_variance"] >= report["optimal_variance"] * (1 - 1e-12)
    assert 0.2 < report["flops_ratio"] < 0.35
    assert report["exact_seconds"] > 0 and report["sampled_seconds"] > 0
    json.dumps(report, allow_nan=False)


@pytest.mark.parametrize(
    ("op", "spec", "placement"),
    [
        ("linear", "bernoulli:0.3", "contracted"),
        ("linear", "uniform:0.3", "cotangent"),
        ("linear", "rank:0.3", "contracted"),
        ("linear", "rank:0.3:gaussian", "cotangent"),
        ("matmul", "importance:0.3", "cotangent"),
        ("exp", "rank:0.3:gaussian", None),
        ("softmax", "uniform:0.3", None),
        ("sum_rows", "bernoulli:0.3", None),
        ("getitem", "rank:0.5", None),
    ],
)
def test_measured_variance_matches_theory(op, spec, placement):
    report = compare_op(op, spec, draws=400, placement=placement, repeats=1)
    assert report["theoretical_variance"] is not None
    _assert_consistent(report)
    assert report["measured_variance_stderr"] < 0.15 * report["measured_variance"]


def test_forward_drawn_sketch_saves_bytes():
    report = compare_op("linear", "uniform:0.25", draws=10, shape=(64, 8, 4), repeats=1)
    assert report["saved_bytes_ratio"] == pytest.approx(0.25)
    assert report["flops_ratio"] == pytest.approx(0.25)


def test_every_registered_op_runs():
    for name in sorted(available_ops()):
        report = compare_op(name, "bernoulli:0.5", draws=20, repeats=1, theory=False)
        assert report["bias_z_max"] < 8.0 and report["bias_fixed_mismatches"] == 0, name
        # Data movement (forming S v first, then moving it) saves no arithmetic.
        if report["exact_flops"] > 0 and name not in ("getitem", "broadcast_to"):
            assert report["sampled_flops"] <= report["exact_flops"] * 0.75, name


def test_keep_ratio_one_is_exact_and_rare_indices_are_counted():
    report = compare_op("softmax", "uniform:1", draws=5, repeats=1)
    assert report["bias_varying_elements"] == 0
    assert report["bias_fixed_mismatches"] == 0
    assert report["measured_variance"] < 1e-20 and report["theoretical_variance"] == 0.0
    # An index kept with probability 6.5e-4 is never drawn in 50 tries: reported, not hidden.
    report = compare_op("sum", "importance:0.3", draws=50, repeats=1, theory=False)
    assert report["bias_fixed_mismatches"] > 0


def test_rank_moment_coefficients():
    for size, keep_ratio in ((10, 0.3), (7, 0.5), (16, 0.25)):
        kept = math.ceil(keep_ratio * size)
        alpha, beta = rank_moment_coefficients(RankK(keep_ratio), size)
        # For J = I: E||S v||^2 = (alpha (n + 1) + beta) ||v||^2 = (n/k) ||v||^2.
        assert alpha * (size + 1) + beta == pytest.approx(size / kept)
        assert alpha * (size + 1) + beta - 1 == pytest.approx(
            RankK(keep_ratio).added_variance(1.0, size)
        )
        alpha, beta = rank_moment_coefficients(RankK(keep_ratio, kind="gaussian"), size)
        assert (alpha, beta) == (1 / kept, 1.0)
    assert rank_moment_coefficients(RankK(1.0), 5) == (0.0, 1.0)


def test_rank_coefficients_match_monte_carlo():
    rng = np.random.default_rng(0)
    size, draws = 5, 20000
    sketch = RankK(0.4)
    products = np.zeros((size, size, size, size))
    for _ in range(draws):
        dense = sketch.draw(size, rng).dense()
        products += np.einsum("ij,kl->ijkl", dense, dense)
    products /= draws
    alpha, beta = rank_moment_coefficients(sketch, size)
    assert products[0, 1, 0, 1] == pytest.approx(alpha, abs=0.05 * alpha + 0.02)
    assert products[0, 0, 1, 1] == pytest.approx(beta, abs=0.05 * abs(beta) + 0.02)
    assert products[0, 0, 0, 0] == pytest.approx(2 * alpha + beta, rel=0.05)
    assert products[0, 1, 2, 3] == pytest.approx(0.0, abs=0.02)


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    path = tmp_path / "out.json"
    args = parser.parse_args(
        ["--op", "linear", "--sketch", "importance:0.25", "--draws", "50", "--json", str(path)]
    )
    assert run_compare(args) == 0
    printed = capsys.readouterr().out
    assert "bias: max |z|" in printed and "variance theoretical" in printed
    report = json.loads(path.read_text())
    assert set(report) >= FIELDS
    assert report["draws"] == 50


def test_cli_shape_and_placement(tmp_path):
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    args = parser.parse_args(
        [
            "--op",
            "matmul",
            "--sketch",
            "uniform:0.5",
            "--draws",
            "20",
            "--shape",
            "2,6,4,3",
            "--placement",
            "cotangent",
        ]
    )
    assert run_compare(args) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--op", "matmul", "--sketch", "uniform:0.5", "--placement", "rows"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"op": "convolve", "sketch": "bernoulli:0.5"}, ValueError, "unknown op"),
        ({"op": "exp", "sketch": "exact"}, ValueError, "not 'exact'"),
        ({"op": "exp", "sketch": "bernoulli:2"}, ValueError, r"\(0, 1\]"),
        ({"op": "exp", "sketch": 0.5}, TypeError, "Sketch or a spec"),
        ({"op": "exp", "sketch": "uniform:0.5", "placement": "cotangent"}, ValueError, "one"),
        ({"op": "linear", "sketch": "uniform:0.5", "placement": "rows"}, ValueError, "placement"),
        ({"op": "linear", "sketch": "uniform:0.5", "shape": (3, 4)}, ValueError, "takes a shape"),
        ({"op": "linear", "sketch": "uniform:0.5", "draws": 1}, ValueError, "at least 2"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        compare_op(**kwargs)
