"""Sketch policies: which recorded ops use a sampled VJP, with which sketch.

Inside ``with rbprop.sampled(policy, seed=0):`` every op recorded for
differentiation asks the policy for a sketch. ``policy`` is either one sketch
(every op is sampled) or a mapping whose keys are op names (``"linear"``),
module paths (``"blocks.0.mlp"``, with shell-style wildcards such as
``"blocks.*.attn"``) or ``"module_path/op_name"`` pairs, and whose values are
sketches, spec strings or ``None``. The most specific key wins: a pair, then
the deepest matching module, then the op name. What no key names stays exact.

Each recorded op gets its own 64-bit seed, a hash of the block's seed and the
op's place in record order, and draws its sketch from it alone (forward or
backward), so a backward pass draws the same sketches whatever order it visits
the ops in, and the same seed with the same inputs gives bit-identical sampled
gradients.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
from collections.abc import Mapping

import numpy as np

from .kernels.draws import GOLDEN_GAMMA, MASK64, fresh_seed, mix64
from .sketch import Sketch, parse

_state = threading.local()


def _contexts() -> list:
    if not hasattr(_state, "contexts"):
        _state.contexts = []
    return _state.contexts


def _module_stack() -> list:
    if not hasattr(_state, "modules"):
        _state.modules = []
    return _state.modules


@contextlib.contextmanager
def module_scope(path: str):
    """Mark ops recorded inside as belonging to the module at ``path``."""
    stack = _module_stack()
    stack.append(path)
    try:
        yield
    finally:
        stack.pop()


def current_module() -> str:
    """The dotted path of the innermost module being called ("" outside any)."""
    stack = _module_stack()
    return stack[-1] if stack else ""


class Policy:
    """A resolved sketch policy (see the module docstring for the key rules)."""

    def __init__(self, policy):
        self.default = None
        self.by_key: dict[str, Sketch | None] = {}
        self._resolved: dict[tuple[str, str], Sketch | None] = {}
        if policy is None or isinstance(policy, (Sketch, str)):
            self.default = parse(policy) if policy is not None else None
        elif isinstance(policy, Mapping):
            for key, value in policy.items():
                if not isinstance(key, str) or not key:
                    raise TypeError(f"sampled: policy keys must be non-empty strings, got {key!r}")
                self.by_key[key] = parse(value) if value is not None else None
        else:
            raise TypeError(
                f"sampled: policy must be a sketch, a spec string or a mapping, got {policy!r}"
            )

    def lookup(self, op_name: str, module_path: str):
        """The sketch for an op named ``op_name`` recorded inside ``module_path``."""
        if not self.by_key:
            return self.default
        key = (op_name, module_path)
        if key not in self._resolved:  # a model records the same few pairs every step
            self._resolved[key] = self._resolve(op_name, module_path)
        return self._resolved[key]

    def _resolve(self, op_name: str, module_path: str):
        for scope in _ancestors(module_path):
            key = f"{scope}/{op_name}"
            if key in self.by_key:
                return self.by_key[key]
            for pattern, sketch in self.by_key.items():
                if "/" in pattern and fnmatch.fnmatchcase(key, pattern):
                    return sketch
        for scope in _ancestors(module_path):
            if scope in self.by_key:
                return self.by_key[scope]
            for pattern, sketch in self.by_key.items():
                wildcard = "/" not in pattern and _is_pattern(pattern)
                if wildcard and fnmatch.fnmatchcase(scope, pattern):
                    return sketch
        return self.by_key.get(op_name, self.default)


def _ancestors(module_path: str):
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a`` (deepest first)."""
    parts = module_path.split(".") if module_path else []
    return [".".join(parts[:end]) for end in range(len(parts), 0, -1)]


def _is_pattern(key: str) -> bool:
    return any(char in key for char in "*?[")


class SampledContext:
    """The state of one ``sampled`` block: the policy and the source of op seeds.

    Op ``j`` recorded in the block (counting from 1) gets the 64-bit seed
    ``mix64(key + j * GOLDEN_GAMMA)``, SplitMix64's ``j``-th output for the
    block's key: a function of the block's seed and the op's record order only.
    The key is the block's seed (an int, folded to 64 bits by hashing) or 64
    fresh bits from the operating system when the seed is None.
    """

    def __init__(self, policy, seed):
        self.policy = _resolved_policy(policy)
        self._key = seed_key(seed)
        self._recorded = 0

    def configure(self, op) -> None:
        """Attach the policy's sketch (and a fresh seed) to a recorded op."""
        sketch = self.policy.lookup(op.name, current_module())
        if sketch is None:
            return
        op.sketch = sketch
        op.placement = sketch.placement
        op.seed = self._next_seed()

    def _next_seed(self) -> int:
        self._recorded += 1
        return mix64(self._key + self._recorded * GOLDEN_GAMMA)


def _resolved_policy(policy) -> Policy:
    """``policy`` as a :class:`Policy`, reusing the last one built from the same mapping.

    A training loop usually enters ``sampled`` every step with the same dict;
    resolving which key wins for each (op, module) pair anew each step would
    cost a few microseconds an op. The Policy built last in this thread is
    reused while the mapping is the same object holding the same keys and the
    same values (by identity), so editing the dict between steps takes effect.
    """
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, Mapping):
        return Policy(policy)
    items = tuple(policy.items())
    last = getattr(_state, "last_policy", None)
    if last is not None and last[0] is policy and _same_items(last[1], items):
        return last[2]
    resolved = Policy(policy)
    _state.last_policy = (policy, items, resolved)
    return resolved


def _same_items(old, new) -> bool:
    return len(old) == len(new) and all(
        old_key == new_key and old_value is new_value
        for (old_key, old_value), (new_key, new_value) in zip(old, new, strict=True)
    )


def seed_key(seed) -> int:
    """A ``sampled`` block's seed as a 64-bit key.

    ``seed`` is a non-negative int (any width), a sequence of them (such as
    ``[run_seed, step]``), or None for 64 fresh bits from the operating system.
    An int below 2^64 is its own key; anything else is hashed 64 bits at a time.
    """
    if seed is None:
        return fresh_seed()
    single = isinstance(seed, (int, np.integer))
    try:
        words = [seed] if single else list(seed)
    except TypeError:
        words = []
    if not words or not all(_is_seed_word(word) for word in words):
        raise TypeError(
            f"sampled: seed must be a non-negative int, a sequence of them, or None; got {seed!r}"
        )
    if single and int(seed) <= MASK64:
        return int(seed)
    key = mix64(len(words))
    for word in map(int, words):
        while True:  # each 64-bit chunk of the word, then a separator
            key = mix64(key + (word & MASK64) + GOLDEN_GAMMA)
            word >>= 64
            if not word:
                break
        key = mix64(key ^ GOLDEN_GAMMA)
    return key


def _is_seed_word(word) -> bool:
    return isinstance(word, (int, np.integer)) and not isinstance(word, bool) and word >= 0


@contextlib.contextmanager
def sampled(policy, seed=None):
    """Ops recorded inside use sampled VJPs as ``policy`` says (see module docstring)."""
    context = SampledContext(policy, seed)
    stack = _contexts()
    stack.append(context)
    try:
        yield context
    finally:
        stack.pop()


@contextlib.contextmanager
def exact():
    """Ops recorded inside use exact VJPs, even within a ``sampled`` block."""
    stack = _contexts()
    stack.append(None)
    try:
        yield
    finally:
        stack.pop()


def configure(op) -> None:
    """Give a newly recorded op its sketch, if a ``sampled`` block is active."""
    stack = _contexts()
    if stack and stack[-1] is not None:
        stack[-1].configure(op)
