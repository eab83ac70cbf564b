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
from ..kernels.cross_entropy import REDUCTIONS, cross_entropy_backward, cross_entropy_forward
from ..primitive import Primitive
from ..rowsparse import RowSparse, restrict
from ..tensor import Tensor, as_tensor, record


class CrossEntropy(Primitive):
    """Softmax cross-entropy of logits ``(N, C)`` against labels ``(N,)``.

    Both directions are one compiled pass each (:mod:`rbprop.kernels.cross_entropy`).

    Sampled VJP, whatever the reduction: a sketch over the ``N`` rows of the
    per-row cotangent ``u``. Only the kept rows' gradients ``p_i - q_i`` are
    formed (scaled by the sketch) and returned row-sparse, the rest being zero;
    a projection sketch has no kept rows and forms every row. Importance
    weights are exact: ``a_i = |u_i| * ||p_i - q_i||``, with the norms computed
    in the forward pass (which forms ``p`` anyway) when the importance sketch
    is active.
    """

    name = "cross_entropy"

    def forward(self, logits):
        reduction = self.params["reduction"]
        self.row_local = reduction == "none"
        target = self.params["target"]
        keep_norms = self.recording and self.sketch is not None and self.sketch.needs_cotangent
        output, probs, norms = cross_entropy_forward(
            logits,
            target,
            self.params["label_smoothing"],
            reduction,
            keep_probs=self.recording,
            keep_norms=keep_norms,
        )
        if self.recording:
            self.save(probs=probs, target=target, gradient_norms=norms)
        return output

    def _row_cotangent(self, cotangent):
        """The cotangent of each row's loss: ``v / N`` (mean), ``v`` (sum) or ``v_i``."""
        xp = array_module(cotangent)
        rows = self.input_shapes[0][0]
        if self.params["reduction"] == "none":
            return cotangent
        share = cotangent / rows if self.params["reduction"] == "mean" else cotangent
        return xp.broadcast_to(share, (rows,))

    def _gradient(self, cotangent, reduction=None, kept=None, kept_scales=None):
        """``u_i s_k (p_i - q_i)`` on every row, or on the ``kept`` rows (see the kernel)."""
        return cross_entropy_backward(
            self.probs,
            self.target,
            cotangent,
            self.params["label_smoothing"],
            reduction or self.params["reduction"],
            kept=kept,
            kept_scales=kept_scales,
        )

    def vjp(self, cotangent):
        return (self._gradient(cotangent),)

    def vjp_flops(self):
        rows, classes = self.input_shapes[0]
        return 2 * rows * classes

    def row_sparse_vjp(self, cotangent: RowSparse):
        """The exact VJP of a row-sparse cotangent (``"none"`` only), on its kept rows.

        The kernel takes the kept rows' cotangents ``v_k`` as their scales, with a
        shared ``u = 1`` (the ``"sum"`` form), so no rows of ``p`` are gathered.
        """
        classes = self.input_shapes[0][1]
        self._sampled_flops = 2 * cotangent.kept * classes
        values = self._gradient(
            1.0, reduction="sum", kept=cotangent.indices, kept_scales=cotangent.values
        )
        return (RowSparse(cotangent.indices, values, self.input_shapes[0]),)

    def sampled_vjp(self, cotangent):
        # A per-row loss below a row-sampled op gets a row-sparse cotangent: a
        # vector, cheap to densify; its zero rows are left out of the kept rows.
        cotangent_rows = None
        if isinstance(cotangent, RowSparse):
            cotangent_rows, cotangent = cotangent.indices, cotangent.dense()
        xp = array_module(cotangent)
        rows, classes = self.input_shapes[0]
        weights = None
        if self.sketch.needs_cotangent:
            row_cotangent = self._row_cotangent(cotangent)
            weights = xp.abs(row_cotangent).astype(np.float64) * self.gradient_norms
        sample = self.draw_sample(rows, weights=weights)
        if not sample.is_diagonal:
            sketched = sample.apply(self._row_cotangent(cotangent), axis=0)
            self._sampled_flops = self.vjp_flops() + sample.apply_flops((rows,), 0)
            return (self._gradient(sketched, reduction="none"),)

        kept, kept_scales = sample.indices, sample.scales
        if cotangent_rows is not None:  # the rows both the sample and the cotangent keep
            kept, in_sample, _ = restrict(sample, cotangent_rows)
            kept_scales = kept_scales[in_sample]
        kept_grads = self._gradient(cotangent, kept=kept, kept_scales=kept_scales)
        self._sampled_flops = 2 * len(kept) * classes
        return (RowSparse(kept, kept_grads, self.input_shapes[0]),)


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
