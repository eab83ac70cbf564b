"""Loss primitives: ``cross_entropy`` over (N, C) logits with integer labels.

With label smoothing ``e``, row ``i``'s target distribution is
``q_i = (1 - e) onehot(y_i) + e / C`` and its loss is ``-sum_c q_ic log p_ic``
(``p = softmax(logits)``); its gradient with respect to the logits is
``p_i - q_i``. The reductions ``"mean"``, ``"sum"`` and ``"none"`` combine the
per-row losses, so the VJP is ``u_i (p_i - q_i)`` with a per-row cotangent
``u`` (``v / N``, ``v`` or ``v_i``).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module
from ..kernels.softmax import log_softmax
from ..primitive import Primitive, ShapeError
from ..tensor import Tensor, as_tensor, record

REDUCTIONS = ("mean", "sum", "none")


class CrossEntropy(Primitive):
    """Softmax cross-entropy of logits ``(N, C)`` against labels ``(N,)``.

    Sampled VJP, whatever the reduction: a sketch over the ``N`` rows of the
    per-row cotangent ``u``. Only the kept rows' gradients ``p_i - q_i`` are
    formed (scaled by the sketch), the rest are zero; a projection sketch
    has no kept rows and forms every row. Importance weights are exact:
    ``a_i = |u_i| * ||p_i - q_i||``, with the norms computed in the forward pass
    (which forms ``p`` anyway) when the importance sketch is active.
    """

    name = "cross_entropy"

    def forward(self, logits):
        target = self.params["target"]
        self._check(logits, target)
        reduction = self.params["reduction"]
        smoothing = self.params["label_smoothing"]
        self.row_local = reduction == "none"
        xp = array_module(logits)

        log_probs = log_softmax(logits)  # fused: x - max - log(sum(exp(x - max)))
        picked = xp.take_along_axis(log_probs, target[:, None], axis=1)[:, 0]
        losses = -(1 - smoothing) * picked
        if smoothing:
            losses = losses - smoothing * log_probs.mean(axis=1)
        if reduction == "mean":
            output = losses.mean()
        elif reduction == "sum":
            output = losses.sum()
        else:
            output = losses

        if self.recording:
            probs = xp.exp(log_probs)
            norms = None
            if self.sketch is not None and self.sketch.needs_cotangent:
                row_grads = self._row_gradients(probs, target)
                norms = xp.sqrt((row_grads.astype(np.float64) ** 2).sum(axis=1))
            self.save(probs=probs, target=target, gradient_norms=norms)
        return xp.asarray(output, dtype=logits.dtype)

    def _check(self, logits, target):
        if logits.ndim != 2:
            raise ShapeError(
                f"cross_entropy: input must be (N, C) logits, got shape {logits.shape}"
            )
        if not np.issubdtype(target.dtype, np.integer):
            raise TypeError(
                f"cross_entropy: target must hold integer class labels, got dtype "
                f"{target.dtype} (class-probability targets are not supported)"
            )
        if target.shape != logits.shape[:1]:
            raise ShapeError(
                f"cross_entropy: target of shape {target.shape} for input of shape "
                f"{logits.shape}; expected ({logits.shape[0]},)"
            )
        classes = logits.shape[1]
        if target.size and (int(target.min()) < 0 or int(target.max()) >= classes):
            raise ValueError(
                f"cross_entropy: labels must lie in [0, {classes}) for input of shape "
                f"{logits.shape}, got values from {int(target.min())} to {int(target.max())}"
            )

    def _row_gradients(self, probs, target):
        """``p_i - q_i`` for the rows given: d(row loss)/d(logits)."""
        xp = array_module(probs)
        smoothing = self.params["label_smoothing"]
        grads = probs - probs.dtype.type(smoothing / probs.shape[1])
        rows = xp.arange(probs.shape[0])
        grads[rows, target] -= probs.dtype.type(1 - smoothing)
        return grads

    def _row_cotangent(self, cotangent):
        """The cotangent of each row's loss: ``v / N`` (mean), ``v`` (sum) or ``v_i``."""
        xp = array_module(cotangent)
        rows = self.input_shapes[0][0]
        if self.params["reduction"] == "none":
            return cotangent
        share = cotangent / rows if self.params["reduction"] == "mean" else cotangent
        return xp.broadcast_to(share, (rows,))

    def vjp(self, cotangent):
        row_cotangent = self._row_cotangent(cotangent)
        return (self._row_gradients(self.probs, self.target) * row_cotangent[:, None],)

    def vjp_flops(self):
        rows, classes = self.input_shapes[0]
        return 2 * rows * classes

    def sampled_vjp(self, cotangent):
        xp = array_module(cotangent)
        row_cotangent = self._row_cotangent(cotangent)
        rows, classes = self.input_shapes[0]
        weights = None
        if self.sketch.needs_cotangent:
            weights = xp.abs(row_cotangent).astype(np.float64) * self.gradient_norms
        sample = self.draw_sample(rows, weights=weights)
        if not sample.is_diagonal:
            sketched = sample.apply(row_cotangent, axis=0)
            self._sampled_flops = self.vjp_flops() + sample.apply_flops((rows,), 0)
            return (self._row_gradients(self.probs, self.target) * sketched[:, None],)

        kept = xp.asarray(sample.indices)
        compact = sample.compress(row_cotangent, axis=0)  # u_i / p_i on the kept rows
        kept_grads = self._row_gradients(self.probs[kept], self.target[kept]) * compact[:, None]
        self._sampled_flops = 2 * sample.kept * classes
        return (sample.expand(kept_grads, axis=0),)


def cross_entropy(input, target, reduction="mean", label_smoothing=0.0) -> Tensor:  # noqa: A002
    """Softmax cross-entropy of ``input`` logits (N, C) against integer ``target`` (N,).

    Follows ``torch.nn.functional.cross_entropy`` for these arguments; class
    weights, ``ignore_index`` and probability targets are not supported.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}"
        )
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(
            f"cross_entropy: label_smoothing must lie in [0, 1], got {label_smoothing!r}"
        )
    logits = as_tensor(input)
    xp = array_module(logits.data)
    labels = target.data if isinstance(target, Tensor) else target
    labels = xp.asarray(labels)
    return record(
        CrossEntropy,
        logits,
        target=labels,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
    )
