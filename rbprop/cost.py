"""Cost accounting: floating-point operations of each VJP and bytes saved for backward.

Two ledgers live here.

* :class:`SavedBytes` counts the arrays that recorded ops keep alive for their
  backward pass. An array is counted once however many ops hold it (keyed by the
  buffer that owns its memory), and parameters (leaf tensors that require a
  gradient) are not counted, since the model holds them anyway. It tracks the
  current total and its peak.
* :class:`CostMeter` is a context manager that collects, per op name, the FLOPs
  that backward passes spend in exact and in sampled VJPs.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field


def _owner(array):
    """The array whose buffer ``array`` views (itself when it owns its memory)."""
    while getattr(array, "base", None) is not None and hasattr(array.base, "nbytes"):
        array = array.base
    return array


class SavedBytes:
    """Live and peak bytes of the arrays that recorded ops saved for backward."""

    def __init__(self):
        self._lock = threading.RLock()
        self._holders: dict[int, list] = {}  # id(owner) -> [owner, count]
        self.current = 0
        self.peak = 0

    def hold(self, array) -> None:
        owner = _owner(array)
        with self._lock:
            entry = self._holders.get(id(owner))
            if entry is None:
                self._holders[id(owner)] = [owner, 1]
                self.current += int(owner.nbytes)
                self.peak = max(self.peak, self.current)
            else:
                entry[1] += 1

    def release(self, array) -> None:
        owner = _owner(array)
        with self._lock:
            entry = self._holders.get(id(owner))
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._holders[id(owner)]
                self.current -= int(owner.nbytes)

    def reset_peak(self) -> None:
        """Start a new peak measurement from the current total."""
        with self._lock:
            self.peak = self.current


saved_bytes = SavedBytes()


@dataclass
class OpCost:
    """What one op name cost in the backward passes seen by a meter."""

    calls: int = 0
    exact_calls: int = 0
    sampled_calls: int = 0
    flops: int = 0
    exact_equivalent_flops: int = 0


@dataclass
class CostMeter:
    """Collects backward FLOPs per op while active (``with CostMeter() as meter:``).

    ``flops`` is what the VJPs actually spent; ``exact_equivalent_flops`` is what
    the exact VJPs of the same ops would have spent, so the ratio of the two is
    the arithmetic saved by sampling.
    """

    per_op: dict[str, OpCost] = field(default_factory=lambda: defaultdict(OpCost))

    def record(self, op_name: str, flops: int, exact_flops: int, sampled: bool) -> None:
        cost = self.per_op[op_name]
        cost.calls += 1
        cost.sampled_calls += int(sampled)
        cost.exact_calls += int(not sampled)
        cost.flops += int(flops)
        cost.exact_equivalent_flops += int(exact_flops)

    @property
    def backward_flops(self) -> int:
        return sum(cost.flops for cost in self.per_op.values())

    @property
    def exact_backward_flops(self) -> int:
        return sum(cost.exact_equivalent_flops for cost in self.per_op.values())

    def __enter__(self):
        _active_meters.append(self)
        return self

    def __exit__(self, *exc_info):
        _active_meters.remove(self)
        return False

    def table(self) -> str:
        """A plain-text table of the per-op costs."""
        lines = [f"{'op':<32}{'calls':>7}{'sampled':>9}{'GFLOP':>10}{'exact GFLOP':>13}"]
        for name, cost in sorted(self.per_op.items()):
            lines.append(
                f"{name:<32}{cost.calls:>7}{cost.sampled_calls:>9}"
                f"{cost.flops / 1e9:>10.4f}{cost.exact_equivalent_flops / 1e9:>13.4f}"
            )
        return "\n".join(lines)


_active_meters: list[CostMeter] = []


def record_vjp(op_name: str, flops: int, exact_flops: int, sampled: bool) -> None:
    """Report one VJP to every active meter."""
    for meter in _active_meters:
        meter.record(op_name, flops, exact_flops, sampled)
