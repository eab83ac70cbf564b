"""Optimizers (SGD, Adam, AdamW), gradient clipping and a warm-up + cosine schedule.

They follow PyTorch's conventions: an optimizer takes an iterable of
parameters (or of dicts with ``"params"`` and per-group settings), reads each
parameter's gradient from ``p.grad`` (a Tensor), updates ``p.data`` in place and
keeps its per-parameter buffers in ``state``. Gradients are never modified in
place (other code may still hold them); :func:`clip_grad_norm_` replaces them.

``state_dict()`` / ``load_state_dict()`` give and take plain numbers and arrays
(parameters are referred to by their position), which is what checkpoints store.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import array_module, to_device, to_numpy
from .kernels.optim import adam, sgd_momentum
from .tensor import Tensor


class Optimizer:
    """Base class: parameter groups, per-parameter state, ``zero_grad`` and state dicts."""

    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        for group in groups:
            self.add_param_group(group)
        self.state: dict = {}

    def add_param_group(self, group: dict) -> None:
        """Add a group of parameters with its own settings (the defaults fill the rest)."""
        group = dict(group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        for name, value in self.defaults.items():
            group.setdefault(name, value)
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown settings {sorted(unknown)}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for param in group["params"]:
            if not isinstance(param, Tensor) or not param.requires_grad:
                raise TypeError(
                    f"{type(self).__name__}: can only optimize tensors that require gradients, "
                    f"got {param!r:.60}"
                )
            if id(param) in seen:
                raise ValueError(f"{type(self).__name__}: a parameter appears in two groups")
            seen.add(id(param))
        self.param_groups.append(group)

    def parameters(self):
        for group in self.param_groups:
            yield from group["params"]

    def zero_grad(self) -> None:
        """Forget every parameter's gradient (``p.grad = None``)."""
        for param in self.parameters():
            param.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.data
                if grad.shape != param.data.shape:
                    raise ValueError(
                        f"{type(self).__name__}: gradient of shape {grad.shape} for a parameter "
                        f"of shape {param.data.shape}"
                    )
                state = self.state.setdefault(id(param), {})
                self.update(param, grad.astype(param.dtype, copy=False), state, group)

    def update(self, param, grad, state: dict, group: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__}.update is not written")

    # -- state dicts ------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"param_groups": [settings + parameter indices], "state": {index: {...}}}``."""
        index_of = {id(p): i for i, p in enumerate(self.parameters())}
        groups = []
        for group in self.param_groups:
            settings = {k: _plain(v) for k, v in group.items() if k != "params"}
            settings["params"] = [index_of[id(p)] for p in group["params"]]
            groups.append(settings)
        state = {}
        for param in self.parameters():
            if id(param) in self.state:
                state[index_of[id(param)]] = {
                    name: to_numpy(value).copy() if hasattr(value, "shape") else value
                    for name, value in self.state[id(param)].items()
                }
        return {"param_groups": groups, "state": state}

    def check_state_dict(self, state_dict: dict) -> None:
        """Raise ValueError if ``state_dict`` does not fit these parameters (changes nothing)."""
        name = type(self).__name__
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: {len(groups or [])} parameter groups in the state, "
                f"{len(self.param_groups)} in the optimizer"
            )
        params = list(self.parameters())
        for saved, group in zip(groups, self.param_groups, strict=True):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: a group of {len(saved.get('params', ()))} "
                    f"parameters in the state, {len(group['params'])} in the optimizer"
                )
        for index, entries in state_dict.get("state", {}).items():
            if not 0 <= int(index) < len(params):
                raise ValueError(f"{name}.load_state_dict: state for unknown parameter {index}")
            shape = params[int(index)].shape
            for key, value in entries.items():
                if hasattr(value, "shape") and value.ndim and tuple(value.shape) != shape:
                    raise ValueError(
                        f"{name}.load_state_dict: {key!r} of parameter {index} has shape "
                        f"{tuple(value.shape)}, the parameter {shape}"
                    )

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore settings and buffers saved by :meth:`state_dict` (checked first)."""
        self.check_state_dict(state_dict)
        params = list(self.parameters())
        for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if isinstance(value, list) else value
        self.state = {}
        for index, entries in state_dict["state"].items():
            param = params[int(index)]
            self.state[id(param)] = {key: _restore(value, param) for key, value in entries.items()}


def _plain(value):
    """A group setting as a JSON-friendly value."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _restore(value, param):
    """A saved state entry placed like ``param`` (arrays get its device and dtype)."""
    if hasattr(value, "shape") and value.ndim:
        return to_device(np.array(value, dtype=param.dtype), param.device)
    if hasattr(value, "shape"):
        return value.item()
    return value


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov momentum and weight decay.

    PyTorch's update: ``g = grad + weight_decay * p``; with momentum
    ``b = momentum * b + (1 - dampening) * g`` (``b = g`` at the first step) and
    ``g = g + momentum * b`` (Nesterov) or ``g = b``; then ``p = p - lr * g``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"SGD: lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, "
                f"{weight_decay}"
            )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening 0")
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
            },
        )

    def update(self, param, grad, state, group):
        momentum = group["momentum"]
        buffer = state.get("momentum_buffer")
        if momentum and buffer is not None:
            # One fused pass (bit-identical to the numpy lines below it replaces).
            sgd_momentum(
                param.data, grad, buffer, group["lr"], momentum, 1.0 - group["dampening"],
                group["weight_decay"], group["nesterov"],
            )  # fmt: skip
            return
        if group["weight_decay"]:
            grad = grad + group["weight_decay"] * param.data
        if momentum:
            if buffer is None:
                buffer = grad.copy()
            else:
                buffer *= momentum
                buffer += (1.0 - group["dampening"]) * grad
            state["momentum_buffer"] = buffer
            grad = grad + momentum * buffer if group["nesterov"] else buffer
        param.data -= group["lr"] * grad


class Adam(Optimizer):
    """Adam (Kingma and Ba), with L2 weight decay added to the gradient as in PyTorch.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p = p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``.
    """

    decoupled_weight_decay = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"{type(self).__name__}: need lr, eps, weight_decay >= 0 and betas in [0, 1), "
                f"got lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        super().__init__(
            params,
            {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay},
        )

    def update(self, param, grad, state, group):
        xp = array_module(param.data)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        if group["weight_decay"]:
            if self.decoupled_weight_decay:
                param.data *= 1.0 - lr * group["weight_decay"]
            else:
                grad = grad + group["weight_decay"] * param.data
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(param.data)
            state["exp_avg_sq"] = xp.zeros_like(param.data)
        state["step"] += 1
        bias_correction1 = 1.0 - beta1 ** state["step"]
        bias_correction2 = 1.0 - beta2 ** state["step"]
        # One fused pass over parameter, gradient and moments (numpy twin elsewhere).
        adam(
            param.data, grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2,
            lr / bias_correction1, math.sqrt(bias_correction2), group["eps"], 0.0,
        )  # fmt: skip


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p = p (1 - lr * weight_decay)`` before the step."""

    decoupled_weight_decay = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def clip_grad_norm_(parameters, max_norm: float, eps: float = 1e-6) -> float:
    """Scale all gradients so that their joint Euclidean norm is at most ``max_norm``.

    Returns the norm before clipping. As in PyTorch the factor is
    ``max_norm / (norm + eps)``, applied only when it is below one. Gradients are
    replaced by new tensors, never scaled in place.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    with_grads = [p for p in parameters if p.grad is not None]
    if not with_grads:
        return 0.0
    squares = [
        float(array_module(p.grad.data).sum(p.grad.data.astype(np.float64) ** 2))
        for p in with_grads
    ]
    total = math.sqrt(sum(squares))
    factor = max_norm / (total + eps)
    if factor < 1.0:
        for param in with_grads:
            param.grad = Tensor(param.grad.data * param.grad.data.dtype.type(factor))
    return total


class WarmupCosine:
    """Linear warm-up to each group's base learning rate, then cosine decay.

    For the ``t``-th optimizer step (``t = 0, 1, ...``), with ``W`` warm-up steps
    and ``T`` steps in all:
    ``lr_t = base * (t + 1) / W`` while ``t < W``, then
    ``lr_t = base * (m + (1 - m) * (1 + cos(pi * (t - W) / (T - W))) / 2)``
    with ``m = min_ratio``. As in PyTorch, construction sets ``lr_0`` and
    :meth:`step` (called after ``optimizer.step()``) moves to the next step.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        min_ratio: float = 0.0,
    ):
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"WarmupCosine: need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                f"got {total_steps} and {warmup_steps}"
            )
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_ratio = float(min_ratio)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine

    def _apply(self) -> None:
        factor = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        self._apply()
