"""Gradient mode and the reverse pass over the recorded graph.

The graph is made of primitive instances (see :mod:`rbprop.primitive`): each
recorded op remembers, per input, an *edge* to the op that produced it, to the
leaf tensor it came from, or ``None`` when that input needs no gradient. Edges
never hold the inputs' arrays, so an op keeps alive only what it saved for its
own VJP.

``backward`` sorts the graph iteratively (a chain of any length works, no
recursion), runs each op's exact or sampled VJP once all its consumers have
contributed, accumulates into leaves' ``.grad`` and, unless ``retain_graph``,
frees what each op saved as soon as its VJP has run. A cotangent may travel
row-sparse between ops (:mod:`rbprop.rowsparse`); leaves always get it dense.
"""

from __future__ import annotations

import contextlib
import threading

from . import cost
from .rowsparse import densify

_state = threading.local()


def grad_enabled() -> bool:
    """Whether new ops are being recorded for differentiation."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def set_grad_enabled(enabled: bool):
    """Turn recording on or off inside the block, restoring the old mode after."""
    previous = grad_enabled()
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def no_grad():
    """Context manager in which ops are computed but not recorded."""
    return set_grad_enabled(False)


def enable_grad():
    """Context manager in which ops are recorded (undoes an outer ``no_grad``)."""
    return set_grad_enabled(True)


def topological_order(root_op) -> list:
    """Ops reachable from ``root_op``, each before every op that produced its inputs.

    A depth-first search with an explicit stack; reversed post-order is a valid
    topological order of the reverse pass.
    """
    post_order = []
    visited = {id(root_op)}
    stack = [(root_op, iter(root_op.producer_ops()))]
    while stack:
        op, producers = stack[-1]
        for producer in producers:
            if id(producer) not in visited:
                visited.add(id(producer))
                stack.append((producer, iter(producer.producer_ops())))
                break
        else:
            stack.pop()
            post_order.append(op)
    post_order.reverse()
    return post_order


def run_backward(root, cotangent, retain_graph: bool) -> None:
    """Propagate ``cotangent`` (an array shaped like ``root``) back to the leaves."""
    from .tensor import accumulate_grad

    root_op = root.op
    if root_op is None:
        accumulate_grad(root, cotangent)
        return

    pending = {root_op: cotangent}
    order = topological_order(root_op)
    sampling = any(op.sketch is not None for op in order)
    with no_grad():
        for op in order:
            op_cotangent = pending.pop(op, None)
            if op_cotangent is None:
                # Every consumer returned a zero (None) gradient for this op's
                # output: nothing flows back through it, but it is still freed.
                if sampling:  # a sketch kept no row: the exact pass would have paid
                    cost.record_vjp(op.name, 0, op.vjp_flops(), sampled=op.sketch is not None)
                if not retain_graph:
                    op.release()
                continue
            input_grads = op.run_vjp(op_cotangent)
            for edge, grad in zip(op.edges, input_grads, strict=True):
                if edge is None or grad is None:
                    continue
                if hasattr(edge, "run_vjp"):
                    earlier = pending.get(edge)
                    pending[edge] = grad if earlier is None else earlier + grad
                else:
                    accumulate_grad(edge, densify(grad))
            if not retain_graph:
                op.release()
