"""Fused optimizer updates: one pass over parameter, gradient and state per step.

numpy spends three to five passes (and temporaries) on an SGD-with-momentum or
Adam update; these kernels read each element once and write it once. Scalars are
cast to the arrays' dtype first, so float32 updates round exactly as the numpy
twins (which follow numpy's rules for Python scalars) do: the two agree bit for
bit, which keeps training resumable whichever of them ran.
"""

from __future__ import annotations

import math

import numba

from ..backend import array_module
from .dispatch import use_numba


@numba.njit(cache=True)
def _sgd_momentum_numba(param, grad, buffer, lr, momentum, dampening, weight_decay, nesterov):
    param_flat, grad_flat, buffer_flat = param.reshape(-1), grad.reshape(-1), buffer.reshape(-1)
    for index in range(param_flat.size):
        step = grad_flat[index]
        if weight_decay != 0:
            step = step + weight_decay * param_flat[index]
        momentum_term = buffer_flat[index] * momentum + dampening * step
        buffer_flat[index] = momentum_term
        step = step + momentum * momentum_term if nesterov else momentum_term
        param_flat[index] = param_flat[index] - lr * step


def sgd_momentum_reference(param, grad, buffer, lr, momentum, dampening, weight_decay, nesterov):
    """In place: ``b = momentum b + (1 - dampening) g``; ``p -= lr * (g + momentum b or b)``.

    ``g`` includes ``weight_decay * p``; ``dampening`` here is ``1 - dampening``.
    """
    dtype = param.dtype.type
    step = grad + dtype(weight_decay) * param if weight_decay else grad
    buffer *= dtype(momentum)
    buffer += dtype(dampening) * step
    step = step + dtype(momentum) * buffer if nesterov else buffer
    param -= dtype(lr) * step


def sgd_momentum(param, grad, buffer, lr, momentum, dampening, weight_decay, nesterov):
    """Fused SGD-with-momentum step on ``param`` and ``buffer`` (both updated in place).

    ``dampening`` is the factor applied to the gradient (``1 - dampening`` in
    PyTorch's terms); every array must be C-contiguous for the compiled path.
    """
    arrays = (param, grad, buffer)
    if use_numba(*arrays) and all(array.flags.c_contiguous for array in arrays):
        dtype = param.dtype.type
        _sgd_momentum_numba(
            param, grad, buffer, dtype(lr), dtype(momentum), dtype(dampening),
            dtype(weight_decay), bool(nesterov),
        )  # fmt: skip
        return
    sgd_momentum_reference(param, grad, buffer, lr, momentum, dampening, weight_decay, nesterov)


@numba.njit(cache=True)
def _adam_numba(param, grad, exp_avg, exp_avg_sq, beta1, one_minus_beta1, beta2,
                one_minus_beta2, step_size, bias2_root, eps, weight_decay):  # fmt: skip
    param_flat, grad_flat = param.reshape(-1), grad.reshape(-1)
    avg_flat, avg_sq_flat = exp_avg.reshape(-1), exp_avg_sq.reshape(-1)
    for index in range(param_flat.size):
        gradient = grad_flat[index]
        if weight_decay != 0:
            gradient = gradient + weight_decay * param_flat[index]
        average = avg_flat[index] * beta1 + one_minus_beta1 * gradient
        average_sq = avg_sq_flat[index] * beta2 + one_minus_beta2 * (gradient * gradient)
        avg_flat[index] = average
        avg_sq_flat[index] = average_sq
        denominator = math.sqrt(average_sq) / bias2_root + eps
        param_flat[index] = param_flat[index] - step_size * (average / denominator)


def adam_reference(param, grad, exp_avg, exp_avg_sq, beta1, beta2, step_size, bias2_root, eps,
                   weight_decay):  # fmt: skip
    """In place: Adam's moment updates and ``p -= step_size * m / (sqrt(v) / bias2_root + eps)``.

    ``step_size`` is ``lr / (1 - beta1^t)`` and ``bias2_root`` is ``sqrt(1 - beta2^t)``;
    ``weight_decay`` is the L2 term added to the gradient (0 for decoupled decay).
    """
    dtype = param.dtype.type
    gradient = grad + dtype(weight_decay) * param if weight_decay else grad
    exp_avg *= dtype(beta1)
    exp_avg += dtype(1.0 - beta1) * gradient
    exp_avg_sq *= dtype(beta2)
    exp_avg_sq += dtype(1.0 - beta2) * (gradient * gradient)
    denominator = array_module(param).sqrt(exp_avg_sq) / dtype(bias2_root) + dtype(eps)
    param -= dtype(step_size) * (exp_avg / denominator)


def adam(param, grad, exp_avg, exp_avg_sq, beta1, beta2, step_size, bias2_root, eps,
         weight_decay):  # fmt: skip
    """Fused Adam step (see :func:`adam_reference`); updates param and moments in place."""
    arrays = (param, grad, exp_avg, exp_avg_sq)
    if use_numba(*arrays) and all(array.flags.c_contiguous for array in arrays):
        dtype = param.dtype.type
        _adam_numba(
            param, grad, exp_avg, exp_avg_sq, dtype(beta1), dtype(1.0 - beta1), dtype(beta2),
            dtype(1.0 - beta2), dtype(step_size), dtype(bias2_root), dtype(eps),
            dtype(weight_decay),
        )  # fmt: skip
        return
    adam_reference(
        param, grad, exp_avg, exp_avg_sq, beta1, beta2, step_size, bias2_root, eps, weight_decay
    )
