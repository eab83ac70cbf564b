"""The kept-rows kernels (meeting two row sets, products over a few rows) against their twins."""

import numpy as np
import pytest

from rbprop.kernels import rows as rows_kernel
from rbprop.kernels.products import rows_product, rows_product_reference
from rbprop.kernels.rows import meet_rows, meet_rows_reference
from rbprop.primitive import ShapeError


def _sorted_subset(rng, size, kept):
    return np.sort(rng.choice(size, size=kept, replace=False)).astype(np.int64)


def _by_definition(wanted, rows, values, scales):
    """A plain loop: row by row, what the kernel must return."""
    held = {
        int(row): position
        for position, row in enumerate(range(len(values)) if rows is None else rows)
    }
    common, positions, gathered = [], [], []
    for position, row in enumerate(wanted):
        if int(row) in held:
            common.append(int(row))
            positions.append(position)
            value = values[held[int(row)]]
            gathered.append(
                value * values.dtype.type(scales[position]) if scales is not None else value
            )
    shape = (len(common),) + values.shape[1:]
    return (
        np.array(common, np.int64),
        np.array(positions, np.int64),
        np.array(gathered, values.dtype).reshape(shape),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trailing", [(5,), (3, 2), (1,), ()])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_kernel_matches_twin_and_definition(rng, dtype, trailing, dense, scaled):
    size = 37
    for wanted_kept, rows_kept in [(0, 5), (9, 0), (9, 11), (37, 20), (13, 37), (1, 1)]:
        wanted = _sorted_subset(rng, size, wanted_kept)
        rows = None if dense else _sorted_subset(rng, size, rows_kept)
        count = size if dense else rows_kept
        values = rng.standard_normal((count,) + trailing).astype(dtype)
        scales = rng.uniform(1, 10, wanted_kept) if scaled else None
        got = meet_rows(wanted, rows, values, scales)
        twin = meet_rows_reference(wanted, rows, values, scales)
        expected = _by_definition(wanted, rows, values, scales)
        for part, twin_part, expected_part in zip(got, twin, expected, strict=True):
            assert part.dtype == expected_part.dtype and part.shape == expected_part.shape
            np.testing.assert_array_equal(part, twin_part)
            np.testing.assert_array_equal(part, expected_part)


def test_other_dtypes_and_strided_values_go_to_the_twin(rng):
    wanted, rows = np.array([1, 4, 6]), np.array([0, 4, 6, 9])
    values = rng.integers(0, 9, (4, 3))
    common, positions, gathered = meet_rows(wanted, rows, values)
    np.testing.assert_array_equal(common, [4, 6])
    np.testing.assert_array_equal(positions, [1, 2])
    np.testing.assert_array_equal(gathered, values[[1, 2]])
    strided = rng.standard_normal((4, 6))[:, ::2]
    np.testing.assert_array_equal(meet_rows(wanted, rows, strided)[2], strided[[1, 2]])


def test_numba_disabled_gives_the_twin(rng, monkeypatch):
    monkeypatch.setenv("RBPROP_DISABLE_NUMBA", "1")
    called = []
    monkeypatch.setattr(
        rows_kernel,
        "meet_rows_reference",
        lambda *a, **k: called.append(1) or meet_rows_reference(*a, **k),
    )
    meet_rows(np.array([0, 2]), None, rng.standard_normal((3, 2)))
    assert called


@pytest.mark.parametrize("meet", [meet_rows, meet_rows_reference])
def test_bad_arguments_name_the_kernel_and_values(rng, meet):
    values = rng.standard_normal((4, 3))
    with pytest.raises(IndexError, match=r"meet_rows: wanted rows must lie in \[0, 4\).*0 to 4"):
        meet(np.array([0, 4]), None, values)
    with pytest.raises(ValueError, match="meet_rows: wanted must be sorted and duplicate-free"):
        meet(np.array([2, 1]), None, values)
    with pytest.raises(ValueError, match="meet_rows: rows must be sorted and duplicate-free"):
        meet(np.array([1, 2]), np.array([0, 3, 3, 5]), values)
    with pytest.raises(ShapeError, match=r"meet_rows: 2 row indices for values of shape \(4, 3\)"):
        meet(np.array([1]), np.array([0, 1]), values)
    with pytest.raises(ShapeError, match=r"scales of shape \(3,\) for 2 wanted rows"):
        meet(np.array([1, 2]), None, values, np.ones(3))
    with pytest.raises(TypeError, match="wanted must be a 1-D integer array"):
        meet(np.array([1.0, 2.0]), None, values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 7])
def test_rows_product_matches_twin(rng, dtype, rows):
    left = rng.standard_normal((rows, 13)).astype(dtype)
    right = rng.standard_normal((rows, 6)).astype(dtype)
    got = rows_product(left, right)
    assert got.dtype == dtype and got.shape == (13, 6)
    expected = np.einsum("ki,kj->ij", left.astype(np.float64), right.astype(np.float64))
    tolerance = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(
        got, rows_product_reference(left, right), rtol=tolerance, atol=tolerance
    )
    if rows == 1:  # one row: each entry is one product, exactly
        np.testing.assert_array_equal(got, left[0][:, None] * right[0][None, :])


def test_rows_product_of_strided_operands(rng):
    left = rng.standard_normal((2, 10))[:, ::2]
    right = np.asfortranarray(rng.standard_normal((2, 4)))
    np.testing.assert_allclose(rows_product(left, right), left.T @ right, rtol=1e-14)


@pytest.mark.parametrize("product", [rows_product, rows_product_reference])
def test_rows_product_rejects_mismatched_rows(rng, product):
    with pytest.raises(
        ShapeError, match=r"rows_product: operands of shapes \(2, 3\) and \(1, 4\)"
    ):
        product(rng.standard_normal((2, 3)), rng.standard_normal((1, 4)))
