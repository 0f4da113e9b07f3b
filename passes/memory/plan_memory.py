"""Static memory planning of a training graph: liveness in graph order -> peak bytes.

Every op that allocates (not a view, not an in-place write) holds its bytes from the op that
makes it to the last op that reads it or any view of it; graph inputs and stored tensors are
held for the whole step, graph outputs from their op to the end. The sizes come from the fake
tensors in ``node.meta["val"]``. The peak is split into weights, activations, gradients and
optimizer state (see :class:`graphpeft.training.MemoryReport`), and the same graph is also
measured in the order it was traced, which shows what ``reorder_updates`` saved.

An analysis pass: it stores the report in ``gm.meta["graphpeft"]["memory"]``, which
``TrainingStep.memory_report()`` returns.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch.fx as fx

from graphpeft.graph import alias_source, graph_meta, tensor_bytes
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import MEMORY_CATEGORIES, ORDER_KEY, TRAINING_META, MemoryReport, phase_of, signature_of


#: bytes a (fake) tensor value, or a tuple of them, occupies
nbytes = tensor_bytes


def _categories(gm: fx.GraphModule) -> dict[fx.Node, str]:
    if graph_meta(gm).get(TRAINING_META) is None:  # not a training graph: tensors are weights, the rest activations
        return {n: "weights" if n.op == "get_attr" else "activations" for n in gm.graph.nodes}
    sig = signature_of(gm)
    kind_of_input = {"param": "weights", "state": "optimizer_state", "lr": "optimizer_state", "batch": "activations"}
    nodes = list(gm.graph.nodes)
    out_args = nodes[-1].args[0]
    new_params = {a for a in out_args[1:1 + len(sig.params)] if isinstance(a, fx.Node)}
    cats: dict[fx.Node, str] = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, sig.inputs):
        cats[node] = kind_of_input.get(spec.kind, "activations")
    for n in nodes:
        if n in cats or n.op == "output":
            continue
        if n.op == "get_attr":
            cats[n] = "weights"
            continue
        phase = phase_of(n)
        if n in new_params:
            cats[n] = "weights"
        elif phase in ("forward", "loss"):
            cats[n] = "activations"
        elif phase in ("backward", "accumulate", "clip"):
            cats[n] = "gradients"
        else:
            cats[n] = "optimizer_state"
    return cats


def liveness(order: Sequence[fx.Node], cats: dict[fx.Node, str]) -> dict[str, Any]:
    """Peak and breakdown of the tensors of ``order`` (a topological order of one graph)."""
    index = {n: i for i, n in enumerate(order)}
    end_index = len(order)
    root: dict[fx.Node, fx.Node] = {}
    for n in order:
        src = alias_source(n)
        root[n] = root.get(src, src) if src is not None else n
    last: dict[fx.Node, int] = {}
    for n in order:
        if n.op in ("placeholder", "get_attr"):
            last[root[n]] = end_index
        for a in n.all_input_nodes:
            r = root.get(a, a)
            last[r] = max(last.get(r, 0), end_index if n.op == "output" else index[n])
    sizes: dict[fx.Node, int] = {}
    for n in order:
        if root[n] is n and n.op != "output":
            sizes[n] = nbytes(n.meta.get("val"))
    delta = {c: [0] * (end_index + 2) for c in MEMORY_CATEGORIES}
    for n, size in sizes.items():
        if not size:
            continue
        start = 0 if n.op in ("placeholder", "get_attr") else index[n]
        stop = max(last.get(n, index[n]), start)
        c = cats.get(n, "activations")
        delta[c][start] += size
        delta[c][stop + 1] -= size
    live = {c: 0 for c in MEMORY_CATEGORIES}
    timeline: list[int] = []
    by_cat: list[dict[str, int]] = []
    for i in range(end_index):
        for c in MEMORY_CATEGORIES:
            live[c] += delta[c][i]
        by_cat.append(dict(live))
        timeline.append(sum(live.values()))
    peak_i = max(range(len(timeline)), key=timeline.__getitem__) if timeline else 0
    totals = {c: 0 for c in MEMORY_CATEGORIES}
    for n, size in sizes.items():
        if n.op in ("placeholder", "get_attr"):
            totals[cats.get(n, "activations")] += size
    return {
        "peak": timeline[peak_i] if timeline else 0,
        "peak_node": order[peak_i].name if order else "",
        "at_peak": by_cat[peak_i] if by_cat else {},
        "category_peaks": {c: max((b[c] for b in by_cat), default=0) for c in MEMORY_CATEGORIES},
        "totals": totals,
        "timeline": timeline,
        "by_category": by_cat,
    }


def plan_memory(gm: fx.GraphModule) -> MemoryReport:
    """The :class:`MemoryReport` of a training graph, in its current order and in trace order."""
    cats = _categories(gm)
    order = list(gm.graph.nodes)
    now = liveness(order, cats)
    traced_order: Optional[int] = None
    if all(ORDER_KEY in n.meta for n in order):
        traced = sorted(order[:-1], key=lambda n: n.meta[ORDER_KEY]) + [order[-1]]
        traced_order = liveness(traced, cats)["peak"] if traced != order else now["peak"]
    report = MemoryReport(peak_bytes=now["peak"], peak_node=now["peak_node"], at_peak=now["at_peak"],
                          category_peaks=now["category_peaks"], totals=now["totals"],
                          trace_order_peak_bytes=traced_order, num_nodes=len(order), timeline=now["timeline"])
    # fields of newer MemoryReports (set only where the class has them)
    extra: dict[str, Any] = {
        "timeline_by_category": {c: [b[c] for b in now["by_category"]] for c in MEMORY_CATEGORIES},
        "node_names": [n.name for n in order],
    }
    meta = graph_meta(gm)
    schedule = meta.get("schedule")
    if schedule is not None:
        extra["unscheduled_peak_bytes"] = schedule.get("before")
    remat = meta.get("remat")
    if meta.get("memory_budget") is not None:
        extra["memory_budget"] = int(meta["memory_budget"])
    if remat is not None:
        extra.update(memory_budget=remat["budget"], peak_before_remat_bytes=remat["peak_before"],
                     recomputed=list(remat["recomputed"]), recomputed_gemms=list(remat.get("recomputed_gemms", [])),
                     recomputed_gemm_flops=int(remat.get("recomputed_gemm_flops", 0)))
    for key, value in extra.items():
        if hasattr(report, key):
            setattr(report, key, value)
    return report


@register_pass
class PlanMemory(PassBase):
    """Computes the static memory plan of a training graph (analysis; changes nothing)."""

    name = "plan_memory"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph_meta(gm)["memory"] = plan_memory(gm)
        return PassResult(gm, False)
