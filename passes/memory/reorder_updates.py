"""Reorder a training graph so each optimizer update runs as soon as its inputs exist.

PockEngine's operator reordering: traced naively, a training step computes every gradient and
only then updates, so all gradients are alive together at the end of the backward. Moving each
parameter's update right after the op that produces its gradient lets the gradient die at once.
graphpeft's steps keep or drop every update on the step's finite flag (loss, lr and every
gradient finite), so there the updates run right after that flag, at the end of the backward:
a functional step's update makes new tensors (up to 3x the gradient's bytes with AdamW) that
would otherwise wait, alive, for the flag. Graphs without such a flag get PockEngine's order.

Scheduling: the forward and backward keep their order. An update op (phase ``accumulate``,
``clip`` or ``optimizer``) that depends on a computed value runs right after the last such
value it needs is produced; update ops that only read inputs (the decayed weight, a momentum
buffer times beta, the bias corrections) run just before their first user, so hoisting never
makes them live longer. With gradient clipping every update waits for the global norm, which
needs every gradient: only the per-gradient norms move early then; likewise for the finite flag.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch.fx as fx

from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import UPDATE_PHASES, phase_of


def schedule(gm: fx.GraphModule, nodes: Optional[Sequence[fx.Node]] = None) -> list[fx.Node]:
    """The new node order (a topological order of ``gm.graph``). ``nodes``: the order to start
    from (default: the graph's own); its non-update nodes keep their relative order."""
    nodes = list(gm.graph.nodes) if nodes is None else list(nodes)
    output = nodes[-1]
    update = {n for n in nodes if phase_of(n) in UPDATE_PHASES}
    rest = [n for n in nodes if n not in update and n is not output]
    pos = {n: i for i, n in enumerate(rest)}
    ready: dict[fx.Node, int] = {}
    driven: dict[fx.Node, bool] = {}
    # updates are kept or dropped on the step's finite flag (a "check" value they read): none
    # runs before it, or its results would wait for the flag, alive beside the backward's values
    floor = max((pos[a] for n in update for a in n.all_input_nodes
                 if a not in update and a is not output and phase_of(a) == "check"), default=-1)
    for n in nodes:
        if n not in update:
            continue
        r, d = -1, False
        for a in n.all_input_nodes:
            if a in update:
                r, d = max(r, ready[a]), d or driven[a]
            else:
                r = max(r, pos[a])
                d = d or a.op not in ("placeholder", "get_attr")
        ready[n], driven[n] = (max(r, floor) if d else r), d
    at: dict[int, list[fx.Node]] = defaultdict(list)
    for n in nodes:
        if n in update and driven[n]:
            at[ready[n]].append(n)

    order: list[fx.Node] = []
    emitted: set[fx.Node] = set()

    def emit(root: fx.Node) -> None:
        # depth-first, inputs first (iterative: graphs have thousands of nodes)
        stack: list[tuple[fx.Node, bool]] = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if n in emitted:
                continue
            if expanded:
                emitted.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            for a in reversed(n.all_input_nodes):
                if a in update and a not in emitted:
                    stack.append((a, False))

    for i, n in enumerate(rest):
        for a in n.all_input_nodes:  # a forward op may read an update-phase value (micro-batch weights)
            if a in update and a not in emitted:
                emit(a)
        emitted.add(n)
        order.append(n)
        for u in at.get(i, ()):
            emit(u)
    for n in nodes:
        if n in update and n not in emitted:
            emit(n)
    order.append(output)
    return order


@register_pass
class ReorderUpdates(PassBase):
    """Moves each update to where its inputs (gradient, finite flag) exist (same ops, new order); in place."""

    name = "reorder_updates"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = list(gm.graph.nodes)
        order = schedule(gm)
        if order == before:
            return PassResult(gm, False)
        output = order[-1]
        for n in order[:-1]:
            output.prepend(n)
        return PassResult(gm, True)
