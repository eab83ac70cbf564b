"""Checks of derivatives: ``gradcheck`` (exact VJPs against central differences).

``gradcheck`` works in float64. For each input in turn it draws random
directions ``d`` and a random cotangent ``u`` and compares the VJP's directional
derivative ``<J^T u, d>`` with the central difference
``<u, f(x + eps d) - f(x - eps d)> / (2 eps)``, whose error is ``O(eps^2)``.
"""

from __future__ import annotations

import numpy as np

from .autograd import no_grad
from .backend import to_numpy
from .tensor import Tensor


class GradcheckError(AssertionError):
    """The VJP of an op disagrees with central differences."""


def _op_label(fn, output) -> str:
    if output.op is not None:
        return output.op.name
    return getattr(fn, "__name__", repr(fn))


def gradcheck(
    fn,
    inputs,
    eps: float = 1e-6,
    atol: float = 1e-7,
    rtol: float = 1e-6,
    directions: int = 3,
    seed: int = 0,
    raise_exception: bool = True,
) -> bool:
    """Check ``fn``'s VJPs at ``inputs`` (Tensors; those requiring grad are checked).

    Every checked input must be float64. Returns True, or raises
    :class:`GradcheckError` naming the op, the input and the mismatch (or returns
    False when ``raise_exception`` is false).
    """
    inputs = list(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires a gradient")
    for index in checked:
        if inputs[index].dtype != np.float64:
            raise TypeError(
                f"gradcheck: input {index} has dtype {inputs[index].dtype}; use float64 "
                "(central differences in float32 are too coarse to judge a VJP)"
            )
    rng = np.random.default_rng(seed)

    for tensor in inputs:
        if isinstance(tensor, Tensor):
            tensor.grad = None
    output = fn(*inputs)
    label = _op_label(fn, output)
    cotangent = rng.standard_normal(output.shape)
    output.backward(cotangent)
    analytic = {i: _grad_array(inputs[i]) for i in checked}

    def evaluate(index, shifted):
        trial = list(inputs)
        trial[index] = Tensor(shifted)
        with no_grad():
            value = fn(*trial)
        return float(np.sum(to_numpy(value.data) * cotangent))

    for index in checked:
        base = inputs[index].data
        for _ in range(directions):
            direction = rng.standard_normal(base.shape)
            plus = evaluate(index, base + eps * direction)
            minus = evaluate(index, base - eps * direction)
            numeric = (plus - minus) / (2 * eps)
            predicted = float(np.sum(analytic[index] * direction))
            if not abs(numeric - predicted) <= atol + rtol * abs(numeric):
                message = (
                    f"gradcheck: {label}: input {index} of shape {base.shape}: VJP gives "
                    f"directional derivative {predicted:.10g}, central differences give "
                    f"{numeric:.10g} (difference {abs(numeric - predicted):.3g})"
                )
                if raise_exception:
                    raise GradcheckError(message)
                return False
    return True


def _grad_array(tensor):
    if tensor.grad is None:
        return np.zeros(tensor.shape)
    return to_numpy(tensor.grad.data)


def __getattr__(name):
    """``compare_op`` lives in :mod:`rbprop.compare`; it is imported on first use.

    The lazy import keeps ``rbprop.check`` importable from anywhere in the package
    (``rbprop.compare`` imports the ops, which must never need this module).
    """
    if name == "compare_op":
        from .compare import compare_op

        return compare_op
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
