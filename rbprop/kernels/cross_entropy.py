"""Softmax cross-entropy with integer labels, forward and backward, one compiled pass each.

For logits ``x`` of shape ``(N, C)``, labels ``y`` and label smoothing ``e``,
row ``i`` has, with ``m_i = max_c x_ic`` subtracted for stability,

    log p_ic = (x_ic - m_i) - log sum_c exp(x_ic - m_i)
    q_i      = (1 - e) onehot(y_i) + e / C
    loss_i   = -sum_c q_ic log p_ic = -(1 - e) log p_iy - e mean_c log p_ic

and the reduction ``"mean"``, ``"sum"`` or ``"none"`` combines the losses. The
gradient of ``loss_i`` with respect to row ``i`` of the logits is ``p_i - q_i``,
so the VJP of the reduced output with cotangent ``v`` is ``u_i (p_i - q_i)``,
with ``u_i = v / N``, ``v`` or ``v_i``.

In numpy this is about ten calls per direction (max, shift, exp, sum, log,
gather, mean, ... and for the labels' range, min and max). On small batches
(a (128, 10) classifier head) each costs tens of microseconds with the caches
cold after the model's large products, so the numba kernels do a direction in
one call, row by row:

* the forward pass shifts, exponentiates and sums a row, picks the label's
  log-probability, adds the smoothing term, writes the row's loss and, when
  the VJP will need them, ``p = exp(x - m) / sum exp(x - m)`` and the norms
  ``||p_i - q_i||`` (the importance sketch's weights); it checks the labels'
  range on the way, instead of separate min and max reductions;
* the backward pass writes ``u_i s_k (p_i - q_i)`` for every row, or for a
  list of kept rows ``i = kept[k]`` with per-row scales ``s_k`` (a diagonal
  sketch of the rows), without gathering ``p`` and ``y`` first.

Elementwise steps run in the logits' dtype (as the twins do); sums and the
row losses in float64. The kernels run on one thread: a head's few thousand
elements would not pay for a parallel loop's start-up. numba's ``math.exp`` is
a scalar libm call (about 3 ns an element, half of the forward kernel's time
on a (128, 10) head), several times slower than numpy's vectorised ``np.exp``,
so on large inputs the forward kernel's lead shrinks: with warm caches, forward
kernel against twin took 0.01 against 0.04 ms on (128, 10) float32 logits,
0.43 against 1.2 ms on (1280, 100) and 14 against 18 ms on (4096, 1000); in
float64 the twin won on (1280, 100), 0.67 against 0.89 ms. The dispatchers do
not switch on size.

Each function dispatches to numba for float32/float64 numpy logits with numpy
integer labels and to its ``*_reference`` numpy twin otherwise (cupy arrays,
other dtypes, or ``RBPROP_DISABLE_NUMBA=1``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..backend import array_module
from ..primitive import ShapeError
from .dispatch import index_range_error, use_numba

REDUCTIONS = ("mean", "sum", "none")

# A cotangent or scale shared by every row: the kernels broadcast length-1 arrays.
_SHARED = np.ones(1)

# ----------------------------------------------------------------------------- numba kernels
#
# The kernels allocate their outputs and return them: a numpy allocation from
# Python is one more call paying the cold-cache price. ``error_model="numpy"``
# lets the mean of no rows be 0 / 0 = NaN instead of raising.


@numba.njit(cache=True, error_model="numpy")
def _forward_numba(logits, target, smoothing, divisor, keep_probs, keep_norms):
    """``(bad labels, losses, reduced, probs, norms)`` for ``(N, C)`` logits.

    ``losses`` are the row losses and ``reduced`` their sum divided by
    ``divisor`` (a 0-d array), both in the logits' dtype; ``probs`` is ``p``
    (no rows unless ``keep_probs``) and ``norms`` is ``||p_i - q_i||`` in float64
    (empty unless ``keep_norms``, which needs ``keep_probs``). A label outside
    ``[0, C)`` stops the pass (the caller raises) before it is read.
    """
    rows, classes = logits.shape
    losses = np.empty(rows, logits.dtype)
    reduced = np.empty((), logits.dtype)
    probs = np.empty((rows if keep_probs else 0, classes), logits.dtype)
    norms = np.empty(rows if keep_norms else 0)
    on_label = 1.0 - smoothing
    total_loss = 0.0
    for r in range(rows):
        label = target[r]
        if label < 0 or label >= classes:
            return 1, losses, reduced, probs, norms
        row = logits[r]
        largest = row[0]
        for c in range(1, classes):
            largest = max(largest, row[c])

        exp_total = 0.0
        shifted_total = 0.0
        for c in range(classes):
            shifted = row[c] - largest
            shifted_total += shifted
            exponential = math.exp(shifted)
            exp_total += exponential
            if keep_probs:
                probs[r, c] = exponential
        log_total = math.log(exp_total)

        # -(1 - e) log p_y - e mean_c log p_c, with log p_c = (x_c - m) - log_total
        loss = -on_label * ((row[label] - largest) - log_total)
        if smoothing != 0.0:
            loss -= smoothing * (shifted_total / classes - log_total)
        losses[r] = loss
        total_loss += loss

        if keep_probs:
            inverse = 1.0 / exp_total
            for c in range(classes):
                probs[r, c] = probs[r, c] * inverse
        if keep_norms:
            norms[r] = _row_gradient_norm(probs[r], label, smoothing)
    reduced[()] = total_loss / divisor
    return 0, losses, reduced, probs, norms


@numba.njit(cache=True)
def _row_gradient_norm(probs_row, label, smoothing):
    """``||p - q||`` in float64 for one row of probabilities and its label."""
    classes = probs_row.shape[0]
    off_label = smoothing / classes
    squares = 0.0
    for c in range(classes):
        gradient = probs_row[c] - off_label
        if c == label:
            gradient -= 1.0 - smoothing
        squares += gradient * gradient
    return math.sqrt(squares)


@numba.njit(cache=True)
def _write_row_gradient(probs_row, label, scale, smoothing, out_row):
    """``out = scale (p - q)`` on one row: ``q = e / C``, plus ``1 - e`` on the label."""
    off_label = smoothing / probs_row.shape[0]
    for c in range(probs_row.shape[0]):
        out_row[c] = scale * (probs_row[c] - off_label)
    out_row[label] = scale * (probs_row[label] - off_label - (1.0 - smoothing))


@numba.njit(cache=True)
def _backward_all_rows_numba(probs, target, cotangent, factor, smoothing):
    """``(status, grad)``: ``grad_i = factor u_i (p_i - q_i)`` for every row; status 0, or 1
    (a bad label).

    ``cotangent`` holds ``u_i`` per row, or one value for all rows (length 1).
    """
    rows, classes = probs.shape
    grad = np.empty_like(probs)
    step = 1 if cotangent.shape[0] > 1 else 0
    for r in range(rows):
        label = target[r]
        if label < 0 or label >= classes:
            return 1, grad
        _write_row_gradient(probs[r], label, factor * cotangent[r * step], smoothing, grad[r])
    return 0, grad


@numba.njit(cache=True)
def _backward_kept_rows_numba(probs, target, kept, kept_scales, cotangent, factor, smoothing):
    """``(status, grad)``: ``grad_k = factor s_k u_i (p_i - q_i)`` with ``i = kept[k]``;
    status 0, or 1 (a bad label), or 2 (a kept row outside ``[0, N)``).

    ``kept_scales`` holds ``s_k`` per kept row, or one for all (length 1);
    ``cotangent`` holds ``u_i`` per row of ``probs``, or one for all.
    """
    rows, classes = probs.shape
    grad = np.empty((kept.shape[0], classes), probs.dtype)
    cotangent_step = 1 if cotangent.shape[0] > 1 else 0
    scale_step = 1 if kept_scales.shape[0] > 1 else 0
    for k in range(kept.shape[0]):
        row = kept[k]
        if row < 0 or row >= rows:
            return 2, grad
        label = target[row]
        if label < 0 or label >= classes:
            return 1, grad
        scale = factor * kept_scales[k * scale_step] * cotangent[row * cotangent_step]
        _write_row_gradient(probs[row], label, scale, smoothing, grad[k])
    return 0, grad


# ----------------------------------------------------------------------------- checks


def _check_inputs(name, scores, target, what="logits"):
    """Shapes and dtypes of ``(N, C)`` logits (or probabilities) and ``(N,)`` integer labels."""
    if scores.ndim != 2:
        raise ShapeError(f"{name}: input must be (N, C) {what}, got shape {scores.shape}")
    if target.dtype.kind not in "iu":
        raise TypeError(
            f"{name}: target must hold integer class labels, got dtype "
            f"{target.dtype} (class-probability targets are not supported)"
        )
    if target.shape != scores.shape[:1]:
        raise ShapeError(
            f"{name}: target of shape {target.shape} for input of shape "
            f"{scores.shape}; expected ({scores.shape[0]},)"
        )


def _check_reduction(name, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _label_range_error(name, scores, target):
    """The error for labels outside ``[0, C)``, naming the values found."""
    low, high = int(target.min()), int(target.max())
    return ValueError(
        f"{name}: labels must lie in [0, {scores.shape[1]}) for input of shape "
        f"{scores.shape}, got values from {low} to {high}"
    )


def _check_label_range(name, scores, target):
    """The twins' range check (the kernels check as they go)."""
    if target.size and (int(target.min()) < 0 or int(target.max()) >= scores.shape[1]):
        raise _label_range_error(name, scores, target)


def _check_cotangent(name, cotangent, reduction, rows):
    expected = (rows,) if reduction == "none" else ()
    shape = tuple(getattr(cotangent, "shape", ()))  # a Python float has none
    if shape != expected:
        raise ShapeError(
            f"{name}: cotangent of shape {shape} for the {reduction!r} "
            f"reduction of {rows} rows; expected {expected}"
        )


def _check_kept(name, kept, kept_scales):
    if kept is None:
        if kept_scales is not None:
            raise ValueError(f"{name}: kept_scales given without kept rows")
        return
    if kept.ndim != 1 or kept.dtype.kind not in "iu":
        raise TypeError(
            f"{name}: kept must be a 1-D array of row indices, got shape {kept.shape} "
            f"and dtype {kept.dtype}"
        )
    if kept_scales is not None and tuple(kept_scales.shape) != kept.shape:
        raise ShapeError(
            f"{name}: kept_scales of shape {tuple(kept_scales.shape)} for {kept.size} kept rows"
        )


def _kept_rows_error(name, kept, rows):
    return index_range_error(name, "kept rows", kept, rows)


# ----------------------------------------------------------------------------- numpy twins


def row_gradients_reference(probs, target, label_smoothing=0.0):
    """``p_i - q_i`` for every row: d(loss_i)/d(logits_i), in ``probs``' dtype."""
    xp = array_module(probs)
    grads = probs - probs.dtype.type(label_smoothing / probs.shape[1])
    grads[xp.arange(probs.shape[0]), target] -= probs.dtype.type(1 - label_smoothing)
    return grads


def cross_entropy_forward_reference(
    logits, target, label_smoothing=0.0, reduction="mean", keep_probs=False, keep_norms=False
):
    """numpy twin of :func:`cross_entropy_forward`."""
    name = "cross_entropy"
    _check_inputs(name, logits, target)
    _check_reduction(name, reduction)
    _check_label_range(name, logits, target)
    xp = array_module(logits)
    rows = logits.shape[0]
    if logits.shape[1] == 0:  # no classes (and so no rows): max has nothing to reduce
        shifted = exps = logits
        totals = xp.ones((rows, 1), dtype=logits.dtype)
    else:
        shifted = logits - logits.max(axis=1, keepdims=True)
        exps = xp.exp(shifted)
        totals = exps.sum(axis=1, keepdims=True)
    log_probs = shifted - xp.log(totals)

    picked = xp.take_along_axis(log_probs, target[:, None], axis=1)[:, 0]
    losses = -(1 - label_smoothing) * picked
    if label_smoothing and rows:
        losses = losses - label_smoothing * log_probs.mean(axis=1)
    if reduction == "none":
        output = losses
    elif reduction == "sum":
        output = losses.sum()
    else:
        output = losses.mean() if rows else math.nan
    output = xp.asarray(output, dtype=logits.dtype)

    probs = norms = None
    if keep_probs or keep_norms:
        probs = exps / totals
    if keep_norms:
        grads = row_gradients_reference(probs, target, label_smoothing).astype(np.float64)
        norms = xp.sqrt((grads**2).sum(axis=1))
    return output, probs, norms


def cross_entropy_backward_reference(
    probs, target, cotangent, label_smoothing=0.0, reduction="mean", kept=None, kept_scales=None
):
    """numpy twin of :func:`cross_entropy_backward`."""
    name = "cross_entropy_backward"
    xp = array_module(probs)
    _check_inputs(name, probs, target, "probabilities")
    _check_reduction(name, reduction)
    cotangent = xp.asarray(cotangent)
    _check_cotangent(name, cotangent, reduction, probs.shape[0])
    kept = None if kept is None else xp.asarray(kept)
    kept_scales = None if kept_scales is None else xp.asarray(kept_scales)
    _check_kept(name, kept, kept_scales)
    _check_label_range(name, probs, target)
    rows = probs.shape[0]

    # u_i: v / N, v, or v_i, one per row
    row_cotangent = cotangent / max(rows, 1) if reduction == "mean" else cotangent
    row_cotangent = xp.broadcast_to(row_cotangent, (rows,)).astype(probs.dtype, copy=False)
    if kept is None:
        return row_gradients_reference(probs, target, label_smoothing) * row_cotangent[:, None]

    if kept.size and (int(kept.min()) < 0 or int(kept.max()) >= rows):
        raise _kept_rows_error(name, kept, rows)
    scales = row_cotangent[kept]
    if kept_scales is not None:
        scales = scales * kept_scales.astype(probs.dtype, copy=False)
    grads = row_gradients_reference(probs[kept], target[kept], label_smoothing)
    return grads * scales[:, None]


# ----------------------------------------------------------------------------- dispatchers


def cross_entropy_forward(
    logits, target, label_smoothing=0.0, reduction="mean", keep_probs=False, keep_norms=False
):
    """``(output, probs, norms)``: the reduced cross-entropy and what its VJP needs.

    ``output`` has the logits' dtype (a 0-d array for ``"mean"`` and ``"sum"``,
    the ``(N,)`` row losses for ``"none"``; the mean of no rows is NaN).
    ``probs`` is ``softmax(logits)`` when ``keep_probs`` or ``keep_norms``, else
    None; ``norms`` is ``||p_i - q_i||`` per row in float64 when ``keep_norms``,
    else None. Labels outside ``[0, C)`` raise a ValueError naming their range.
    """
    if not use_numba(logits) or type(target) is not np.ndarray:
        return cross_entropy_forward_reference(
            logits, target, label_smoothing, reduction, keep_probs, keep_norms
        )
    name = "cross_entropy"
    _check_inputs(name, logits, target)
    _check_reduction(name, reduction)
    keep_probs = keep_probs or keep_norms
    divisor = float(logits.shape[0]) if reduction == "mean" else 1.0
    bad_labels, losses, reduced, probs, norms = _forward_numba(
        logits, target, float(label_smoothing), divisor, keep_probs, keep_norms
    )
    if bad_labels:
        raise _label_range_error(name, logits, target)
    output = losses if reduction == "none" else reduced
    return output, probs if keep_probs else None, norms if keep_norms else None


def _kernel_serves_backward(probs, target, cotangent, reduction, kept, kept_scales) -> bool:
    """Whether the numba kernels take these arguments (else the twin does)."""
    if not use_numba(probs) or type(target) is not np.ndarray:
        return False
    if reduction == "none" and not use_numba(probs, cotangent):
        return False
    if reduction != "none" and not isinstance(cotangent, (np.ndarray, np.generic, float, int)):
        return False
    return all(extra is None or type(extra) is np.ndarray for extra in (kept, kept_scales))


def cross_entropy_backward(
    probs, target, cotangent, label_smoothing=0.0, reduction="mean", kept=None, kept_scales=None
):
    """VJP of :func:`cross_entropy_forward` from its ``probs``: ``u_i (p_i - q_i)``.

    ``cotangent`` is that of the forward output (0-d for ``"mean"`` and ``"sum"``,
    ``(N,)`` for ``"none"``), giving ``u_i = v / N``, ``v`` or ``v_i``. Returns
    every row, ``(N, C)``; or, given ``kept`` (row indices) and optionally
    ``kept_scales`` (one per kept row), the ``(len(kept), C)`` rows
    ``s_k u_i (p_i - q_i)`` with ``i = kept[k]``: a diagonal sketch of the rows
    applied without gathering the kept rows of ``probs`` first.
    """
    if not _kernel_serves_backward(probs, target, cotangent, reduction, kept, kept_scales):
        return cross_entropy_backward_reference(
            probs, target, cotangent, label_smoothing, reduction, kept, kept_scales
        )
    name = "cross_entropy_backward"
    _check_inputs(name, probs, target, "probabilities")
    _check_reduction(name, reduction)
    rows = probs.shape[0]
    _check_cotangent(name, cotangent, reduction, rows)
    _check_kept(name, kept, kept_scales)

    if reduction == "none":
        factor, row_cotangent = 1.0, cotangent
    else:  # one u for every row
        factor = float(cotangent) / max(rows, 1) if reduction == "mean" else float(cotangent)
        row_cotangent = _SHARED
    smoothing = float(label_smoothing)
    if kept is None:
        status, grad = _backward_all_rows_numba(probs, target, row_cotangent, factor, smoothing)
    else:
        scales = _SHARED if kept_scales is None else kept_scales
        status, grad = _backward_kept_rows_numba(
            probs, target, kept, scales, row_cotangent, factor, smoothing
        )
    if status == 1:
        raise _label_range_error(name, probs, target)
    if status == 2:
        raise _kept_rows_error(name, kept, rows)
    return grad
