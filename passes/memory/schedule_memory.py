"""Peak-memory scheduling: reorder a training graph so fewer tensors are alive at once.

A list scheduler over liveness (the classic greedy of memory-aware schedulers): starting from the
graph's inputs, it repeatedly runs the *ready* op (all its inputs computed) whose running changes
the live bytes the least: the bytes it allocates minus the bytes of the inputs it is the last
reader of. Ties keep the current order, so an op that neither allocates nor frees stays where it
was. The work is done on :func:`graphpeft.graph.to_networkx` of the graph (``bytes`` and
``alias_of`` on nodes); storages shared by views are freed when their last reader through any
view has run, and inputs, stored tensors and graph outputs are never freed.

What never moves relative to each other:

* random ops (``rand``, ``bernoulli``, dropout ...; ``torch.Tag.nondeterministic_seeded``) keep
  their order, so every random draw, and every dropout mask, is the same as before;
* an in-place op (``copy_``, ``sub_``) stays after the readers of its target that came before it
  and before the readers that came after it.

The update (phases ``accumulate``, ``clip``, ``optimizer``) is left to PockEngine's rule of
:mod:`.reorder_updates`: each update as soon as its gradient and the step's finite flag exist.
The scheduler treats a gradient the update reads as consumed when it is made.

The pass plans the peak of the new order (:func:`.plan_memory.liveness`) and keeps it only if it is
lower than the current one: it never makes the peak worse. The before/after peaks are recorded in
``gm.meta["graphpeft"]["schedule"]`` and appear in ``step.memory_report()``.
"""

from __future__ import annotations

import heapq
import logging
from typing import Any, Optional

import torch.fx as fx

from graphpeft.graph import graph_meta, is_mutation, is_random, to_networkx  # re-exported for rematerialize
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import UPDATE_PHASES, phase_of

from .plan_memory import _categories, liveness
from .reorder_updates import schedule as place_updates

log = logging.getLogger(__name__)

SCHEDULE_META = "schedule"


def ordering_edges(gm: fx.GraphModule, G: Any) -> list[tuple[fx.Node, fx.Node]]:
    """Extra (before, after) constraints besides data flow: random ops in order; in-place
    writes after earlier readers of their storage and before later ones."""
    nodes = list(gm.graph.nodes)
    edges: list[tuple[fx.Node, fx.Node]] = []
    randoms = [n for n in nodes if n.op == "call_function" and is_random(n)]
    edges += list(zip(randoms, randoms[1:]))
    by_name = {n.name: n for n in nodes}

    def root(n: fx.Node) -> fx.Node:
        a = G.nodes[n.name]["alias_of"]
        return by_name[a] if a is not None else n

    mutations = [n for n in nodes if is_mutation(n)]
    if mutations:
        index = {n: i for i, n in enumerate(nodes)}
        readers: dict[fx.Node, list[fx.Node]] = {}
        for n in nodes:
            for a in n.all_input_nodes:
                readers.setdefault(root(a), []).append(n)
        for m in mutations:
            target = m.args[0] if m.args and isinstance(m.args[0], fx.Node) else None
            if target is None:
                continue
            for r in readers.get(root(target), ()):
                if r is m or r.op == "output":
                    continue
                edges.append((r, m) if index[r] < index[m] else (m, r))
    return edges


def memory_schedule(gm: fx.GraphModule) -> list[fx.Node]:
    """A low-peak topological order of ``gm``'s nodes (see the module docstring)."""
    G = to_networkx(gm)
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    output = nodes[-1]
    update = {n for n in nodes if n.op == "call_function" and phase_of(n) in UPDATE_PHASES}
    head = [n for n in nodes if n.op in ("placeholder", "get_attr")]
    body = [n for n in nodes if n.op == "call_function" and n not in update]
    index = {n: i for i, n in enumerate(nodes)}
    body_set = set(body)

    # dependencies among body nodes (through update nodes a body node reads, e.g. micro-batch weights)
    memo: dict[fx.Node, frozenset[fx.Node]] = {}

    def body_ancestors(u: fx.Node) -> frozenset[fx.Node]:
        if u in memo:
            return memo[u]
        stack, seen, found = [u], set(), set()
        while stack:
            x = stack.pop()
            for a in x.all_input_nodes:
                if a in body_set:
                    found.add(a)
                elif a in update and a not in seen:
                    seen.add(a)
                    stack.append(a)
        memo[u] = frozenset(found)
        return memo[u]

    preds: dict[fx.Node, set[fx.Node]] = {n: set() for n in body}
    for n in body:
        for a in n.all_input_nodes:
            if a in body_set:
                preds[n].add(a)
            elif a in update:
                preds[n] |= body_ancestors(a)
    for a, b in ordering_edges(gm, G):
        if a in body_set and b in body_set:
            preds[b].add(a)
    succs: dict[fx.Node, list[fx.Node]] = {n: [] for n in body}
    for n, ps in preds.items():
        for p in ps:
            succs[p].append(n)

    # liveness bookkeeping by storage root
    def root(n: fx.Node) -> fx.Node:
        a = G.nodes[n.name]["alias_of"]
        return by_name[a] if a is not None else n

    size = {n: G.nodes[n.name]["bytes"] for n in nodes}
    pinned = {n for n in head}
    remaining: dict[fx.Node, set[fx.Node]] = {}
    in_roots: dict[fx.Node, set[fx.Node]] = {}
    for n in body:
        in_roots[n] = {root(a) for a in n.all_input_nodes}
        for r in in_roots[n]:
            remaining.setdefault(r, set()).add(n)
    for a in output.all_input_nodes:
        pinned.add(root(a))

    def score(n: fx.Node) -> int:
        s = size[n] if root(n) is n else 0
        for r in in_roots[n]:
            if r not in pinned and remaining[r] == {n}:
                s -= size[r]
        if root(n) is n and n not in pinned and not remaining.get(n):
            s -= size[n]  # read by nobody in the body (only by the update): dies at once
        return s

    waiting = {n: len(preds[n]) for n in body}
    version = {n: 0 for n in body}
    heap: list[tuple[tuple[int, int, int], int, fx.Node]] = []

    def push(n: fx.Node) -> None:
        # ops that free at least what they allocate run as soon as they are ready (the most
        # freeing first); the others keep the current order (running an allocation early only
        # lengthens its life)
        version[n] += 1
        s = score(n)
        key = (0, s, index[n]) if s <= 0 else (1, index[n], 0)
        heapq.heappush(heap, (key, version[n], n))

    for n in body:
        if waiting[n] == 0:
            push(n)
    order: list[fx.Node] = []
    done: set[fx.Node] = set()
    while heap:
        _, ver, n = heapq.heappop(heap)
        if ver != version[n] or n in done:
            continue
        done.add(n)
        order.append(n)
        for r in in_roots[n]:
            rest = remaining[r]
            rest.discard(n)
            if len(rest) == 1:
                (last,) = rest
                if last in body_set and waiting.get(last) == 0 and last not in done:
                    push(last)  # it now frees r: a better score
        for s in succs[n]:
            waiting[s] -= 1
            if waiting[s] == 0:
                push(s)
    if len(order) != len(body):  # a cycle in the constraints: keep the graph as it is
        log.warning("schedule_memory: constraints are cyclic; order kept")
        return nodes
    start = head + order + [n for n in nodes if n in update] + [output]
    return place_updates(gm, start)


def _is_topological(order: list[fx.Node], extra: list[tuple[fx.Node, fx.Node]]) -> bool:
    pos = {n: i for i, n in enumerate(order)}
    if any(pos[a] >= pos[n] for n in order for a in n.all_input_nodes):
        return False
    return all(pos[a] < pos[b] for a, b in extra)


@register_pass
class ScheduleMemory(PassBase):
    """Reorders the training graph to lower its planned peak (same ops; in place); keeps the
    current order when that is already as good."""

    name = "schedule_memory"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = list(gm.graph.nodes)
        cats = _categories(gm)
        peak_before = liveness(before, cats)["peak"]
        order = memory_schedule(gm)
        record: dict[str, Optional[int]] = {"before": peak_before, "after": peak_before}
        graph_meta(gm)[SCHEDULE_META] = record
        if order == before:
            return PassResult(gm, False)
        if not _is_topological(order, ordering_edges(gm, to_networkx(gm))):
            log.warning("schedule_memory: the new order is not topological; order kept")
            return PassResult(gm, False)
        peak_after = liveness(order, cats)["peak"]
        log.info("schedule_memory: planned peak %.2f MiB -> %.2f MiB", peak_before / 2**20, peak_after / 2**20)
        if peak_after >= peak_before:
            return PassResult(gm, False)
        record["after"] = peak_after
        output = order[-1]
        for n in order[:-1]:
            output.prepend(n)
        return PassResult(gm, True)
