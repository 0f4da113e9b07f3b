"""Rematerialization under a memory budget: recompute cheap forward values in the backward
instead of keeping them alive from the forward to the backward.

A training step's peak is usually the moment the backward starts: every forward value the
backward reads (the *saved* values) is alive together. Some of them are cheap to make again
from others (a ``silu`` from its input, a transposed copy from a projection's output), so the
graph can keep fewer, smaller values and recompute the rest right before the backward needs them.

What to keep is a minimum cut, the scheme of torch's min-cut partitioner
(``torch/_functorch/partitioners.py``), over :func:`graphpeft.graph.to_networkx` of the graph:

* every forward value ``v`` is split into ``v_in -> v_out`` with capacity = its bytes (cutting
  that edge = keeping ``v``); data edges ``u_out -> v_in`` are uncuttable;
* a forward value the backward reads gets ``v_out -> sink``; graph inputs and stored tensors
  are alive all step anyway (``source -> v_in``, capacity 0 to keep);
* an op that must never run twice is tied to the source (``source -> v_in``): random ops
  (dropout masks stay exactly the masks of the forward), expensive ones (``mm``, ``bmm``,
  ``convolution``, ``addmm``, attention kernels; matrix multiplies only priced in tier 3),
  collectives and in-place writes; views and
  ``getitem`` are never kept on their own (their storage is kept through what they view); an op
  reading a storage that some op writes in place is not recomputed either (it could read the
  written values).

``networkx.minimum_cut`` gives the cheapest set of values to keep; every forward value on the
sink side that the backward needs is recomputed: its op is duplicated into the backward right
before the first backward op that reads it (provenance ``rematerialize`` / ``recompute``,
``recompute_of`` naming the original), and the backward reads the copy. The forward original then
dies at its last forward use.

Three tiers, the first that meets the budget wins: (1) only pointwise ops, views and copies are
recomputed; (2) also reductions and other ops (``softmax``, ``mean``, ``embedding`` ...); (3) also
matrix multiplies (``mm``, ``bmm``, ``addmm``, ``baddbmm``: a frozen weight's GEMM remade from its
recomputable input, activation checkpointing found by the cut). Tier 3 prices a GEMM in the cut:
an edge ``source -> v_in`` of capacity ``price x FLOPs(v)`` is cut when ``v`` is recomputed, so the
cut minimizes kept bytes + price x recomputed FLOPs (torch's partitioner weighs its
``activation_memory_budget`` knapsack by runtime the same way). The price starts where no GEMM is
worth recomputing and falls by sqrt 2 until the budget is met, then bisects back towards fewer
FLOPs: the GEMMs with the most bytes saved per FLOP are recomputed first, and earlier ones
(their kept values live longest) are priced lower (the last at twice the first's price), so equal
layers turn over one at a time. Random ops, attention kernels, convolutions and collectives are never recomputed. A graph
already within the budget is left alone. A budget that no tier meets raises
:class:`~graphpeft.errors.GraphPeftError` naming the smallest feasible budget (the least peak any
tried cut reached).

The budget is the planned peak in bytes (:class:`~graphpeft.training.MemoryReport.peak_bytes`: weights,
inputs, activations, gradients and optimizer state). ``compile_training(..., memory_budget=...)``
puts it in ``gm.meta["graphpeft"]["memory_budget"]`` and adds this pass; the outcome
(recomputed values, peak before and after) is in ``gm.meta["graphpeft"]["remat"]`` and in
``step.memory_report()``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.errors import GraphPeftError
from graphpeft.graph import META_KEY, Provenance, graph_meta, is_mutation, is_random, tensor_bytes, to_networkx
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import ORDER_KEY, phase_of

from .plan_memory import _categories, liveness

log = logging.getLogger(__name__)

PASS_NAME = "rematerialize"
BUDGET_META = "memory_budget"
REMAT_META = "remat"
FORWARD_PHASES = ("forward", "loss")

aten = torch.ops.aten
#: ops never recomputed because they are expensive (the partitioner's compute-intensive set)
EXPENSIVE = {
    "mm", "bmm", "addmm", "baddbmm", "convolution", "_convolution", "conv2d", "conv1d", "linear", "matmul",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention", "_flash_attention_forward",
    "convolution_backward",
}
#: expensive ops tier 3 may recompute after all, priced by their FLOPs (attention kernels and
#: convolutions stay kept: their backward reads their own extra outputs)
GEMMS = {"mm", "bmm", "addmm", "baddbmm"}
#: how much dearer (at most) the last forward GEMM is priced than the first in tier 3 (1: twice)
POSITION_WEIGHT = 1.0
#: cheap ops (besides pointwise and views) recomputed already in tier 1
CHEAP = {"clone", "expand", "_to_copy", "full", "full_like", "zeros", "zeros_like", "ones", "ones_like",
         "scalar_tensor", "arange", "slice", "select", "alias", "_unsafe_view", "unsqueeze", "squeeze",
         "permute", "view", "reshape", "t", "transpose", "cat", "split", "split_with_sizes", "unbind"}


def _op_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))


def recomputable_gemm(node: fx.Node) -> bool:
    """Whether tier 3 may recompute ``node``: a matrix multiply of :data:`GEMMS` (deterministic on
    the same inputs; what it reads is checked like any other op's)."""
    return node.op == "call_function" and _op_name(node) in GEMMS and not is_random(node) and not is_mutation(node)


def never_recompute(node: fx.Node) -> Optional[str]:
    """Why ``node`` must not be recomputed (None when it may be)."""
    if node.op != "call_function":
        return "not an op"
    if is_random(node):
        return "random (its draws must stay those of the forward)"
    if is_mutation(node):
        return "writes in place"
    target = node.target
    namespace = getattr(target, "namespace", "")
    if namespace in ("c10d", "_c10d_functional", "c10d_functional"):
        return "collective"
    if _op_name(node) in EXPENSIVE:
        return "expensive (matrix multiply / convolution)"
    if target is not operator.getitem and not isinstance(target, torch._ops.OpOverload):
        return "not an aten op"
    return None


def _is_view_like(node: fx.Node, G: Any) -> bool:
    return node.target is operator.getitem or (G.nodes[node.name]["alias_of"] is not None and not is_mutation(node))


def _cheap(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ()) or ()
    return node.target is operator.getitem or torch.Tag.pointwise in tags or _op_name(node) in CHEAP


@dataclasses.dataclass
class RematPlan:
    """What the min-cut chose: forward values kept for the backward and values recomputed."""

    saved: list[fx.Node]
    recomputed: list[fx.Node]
    saved_bytes: int


def gemm_flops(node: fx.Node) -> int:
    """Multiply-add FLOPs of an ``mm`` / ``bmm`` / ``addmm`` / ``baddbmm`` node (2 x m x k x n per
    batch), from its inputs' and output's fake tensors; 0 when they are unknown."""
    a = node.args[1] if _op_name(node) in ("addmm", "baddbmm") else node.args[0]
    val, lhs = node.meta.get("val"), getattr(a, "meta", {}).get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(lhs, torch.Tensor):
        return 0
    return 2 * val.numel() * int(lhs.shape[-1])


def choose(gm: fx.GraphModule, tier: int = 2, gemm_cost: float = 0.0) -> RematPlan:
    """The min-cut choice of kept vs recomputed forward values (no rewrite). Tier 3 also lets
    :data:`GEMMS` be recomputed, each at ``gemm_cost`` bytes per FLOP in the cut."""
    import networkx as nx

    G = to_networkx(gm)
    nodes = list(gm.graph.nodes)
    fwd = [n for n in nodes if n.op == "call_function" and phase_of(n) in FORWARD_PHASES]
    fwd_set = set(fwd)
    inputs = [n for n in nodes if n.op in ("placeholder", "get_attr")]
    needed = {a for n in nodes if n.op == "call_function" and n not in fwd_set
              for a in n.all_input_nodes if a in fwd_set}
    # storages written in place somewhere: what reads them may see other values when run again
    def root(a: fx.Node) -> str:
        return G.nodes[a.name]["alias_of"] or a.name

    written = {root(m.args[0]) for m in nodes if is_mutation(m) and m.args and isinstance(m.args[0], fx.Node)}
    position = {n: k for k, n in enumerate(fwd)}
    H = nx.DiGraph()
    for n in inputs:
        H.add_edge("source", n.name + ".in")
        H.add_edge(n.name + ".in", n.name + ".out", capacity=0)
    for n in fwd:
        i, o = n.name + ".in", n.name + ".out"
        size = G.nodes[n.name]["bytes"]
        gemm = tier >= 3 and recomputable_gemm(n) and gemm_flops(n) > 0  # unknown shapes: kept
        banned = ((never_recompute(n) is not None and not gemm) or (tier < 2 and not _cheap(n))
                  or any(root(a) in written for a in n.all_input_nodes))
        if banned:
            H.add_edge("source", i)
        elif gemm:  # recomputing costs its FLOPs: the cut pays them when the GEMM lands on the sink side
            # earlier GEMMs a little cheaper: their saved values live longest, and equal layers then
            # become recomputable one at a time as the price falls (first layers first)
            weight = 1 + POSITION_WEIGHT * position[n] / len(fwd)
            H.add_edge("source", i, capacity=max(1, math.ceil(gemm_cost * weight * gemm_flops(n))))
        if _is_view_like(n, G) and not banned:
            H.add_edge(i, o)  # never kept on its own: keep what it views
        else:
            H.add_edge(i, o, capacity=size)
        for a in n.all_input_nodes:
            H.add_edge(a.name + ".out", i)
        if n in needed:
            H.add_edge(o, "sink")
    if not needed:
        return RematPlan([], [], 0)
    _, (reachable, _) = nx.minimum_cut(H, "source", "sink")
    saved = [n for n in fwd if n.name + ".in" in reachable and n.name + ".out" not in reachable]
    on_sink = {n for n in fwd if n.name + ".in" not in reachable}
    # what the backward needs from the sink side, with everything it is made from
    recompute: set[fx.Node] = set()
    stack = [n for n in needed if n in on_sink]
    while stack:
        n = stack.pop()
        if n in recompute:
            continue
        recompute.add(n)
        stack.extend(a for a in n.all_input_nodes if a in on_sink)
    # the kept bytes (in tier 3 the cut's value also holds the GEMMs' price)
    return RematPlan(saved, [n for n in fwd if n in recompute], sum(G.nodes[n.name]["bytes"] for n in saved))


def apply(gm: fx.GraphModule, plan: RematPlan) -> dict[fx.Node, fx.Node]:
    """Duplicate ``plan.recomputed`` into the backward right before their first backward reader;
    backward readers read the copies. Returns original -> copy."""
    recompute = set(plan.recomputed)
    copies: dict[fx.Node, fx.Node] = {}
    graph = gm.graph
    for b in list(graph.nodes):
        if b.op != "call_function" or phase_of(b) in FORWARD_PHASES:
            continue
        wanted = [a for a in b.all_input_nodes if a in recompute and a not in copies]
        # inputs first (an explicit stack: chains can be long)
        for start in wanted:
            stack: list[tuple[fx.Node, bool]] = [(start, False)]
            while stack:
                n, ready = stack.pop()
                if n in copies:
                    continue
                if not ready:
                    stack.append((n, True))
                    stack.extend((a, False) for a in n.all_input_nodes if a in recompute and a not in copies)
                    continue
                with graph.inserting_before(b):
                    c = graph.node_copy(n, lambda a: copies.get(a, a))
                c.meta = {k: v for k, v in n.meta.items() if k != META_KEY}
                if ORDER_KEY in b.meta:  # in trace order too, a copy runs right before its reader
                    c.meta[ORDER_KEY] = b.meta[ORDER_KEY] - 0.5
                prov = Provenance(PASS_NAME, rule="recompute", origin=str((n.meta.get(META_KEY) or {}).get("origin", "")),
                                  part=phase_of(n)).as_dict()
                prov["recompute_of"] = n.name
                c.meta[META_KEY] = prov
                copies[n] = c
        if any(a in copies for a in b.all_input_nodes):
            b.args, b.kwargs = fx.node.map_arg((b.args, b.kwargs), lambda a: copies.get(a, a))
    return copies


def undo(gm: fx.GraphModule, copies: dict[fx.Node, fx.Node]) -> None:
    """Inverse of :func:`apply` (the backward reads the originals again; copies erased)."""
    for orig, c in copies.items():
        c.replace_all_uses_with(orig)
    for c in reversed(list(copies.values())):
        gm.graph.erase_node(c)


#: geometric steps of the GEMM price (factor sqrt 2) and bisection steps after the first that meets
PRICE_STEP = math.sqrt(2.0)
REFINE_STEPS = 8


def gemm_prices(gm: fx.GraphModule) -> list[float]:
    """Prices (bytes per FLOP) tier 3 tries, highest first: from twice the largest output-bytes per
    FLOP of a forward GEMM (none is worth recomputing) down to 1/64 of the smallest."""
    ratios = [tensor_bytes(n.meta.get("val")) / f for n in gm.graph.nodes
              if n.op == "call_function" and phase_of(n) in FORWARD_PHASES and recomputable_gemm(n)
              and (f := gemm_flops(n)) > 0 and tensor_bytes(n.meta.get("val")) > 0]
    if not ratios:
        return []
    price, low, out = 2 * max(ratios), min(ratios) / 64, []
    while price >= low:
        out.append(price)
        price /= PRICE_STEP
    return out


def _peak(gm: fx.GraphModule) -> int:
    return liveness(list(gm.graph.nodes), _categories(gm))["peak"]


def _trial_peak(gm: fx.GraphModule, plan: RematPlan) -> int:
    """The planned peak with ``plan`` applied; ``gm`` is left as it was."""
    copies = apply(gm, plan)
    try:
        return _peak(gm)
    finally:
        undo(gm, copies)


class _BudgetSearch:
    """One run's search for a plan that meets ``budget``: the graph, the peak before, the least
    peak any tried plan reached (for the error) and the report record. The pass itself stays
    stateless: a new search per call."""

    def __init__(self, gm: fx.GraphModule, budget: int, before: int, record: dict[str, Any]) -> None:
        self.gm, self.budget, self.before, self.best, self.record = gm, budget, before, before, record

    def run(self) -> bool:
        """Tiers 1 and 2 (pointwise ops, then reductions), then the GEMM tier; True once one meets."""
        return any(self.meets(choose(self.gm, tier), tier) for tier in (1, 2)) or self.gemm_tier()

    def meets(self, plan: RematPlan, tier: int, gemm_cost: Optional[float] = None) -> bool:
        """Apply ``plan``; keep it when the planned peak meets the budget (recorded), else undo it."""
        if not plan.recomputed:
            return False
        gm = self.gm
        copies = apply(gm, plan)
        after = _peak(gm)
        log.info("rematerialize tier %d%s: %d values recomputed, planned peak %.2f -> %.2f MiB (budget %.2f MiB)",
                 tier, "" if gemm_cost is None else f" (GEMM price {gemm_cost:.3g} bytes/FLOP)", len(copies),
                 self.before / 2**20, after / 2**20, self.budget / 2**20)
        if after <= self.budget:
            sizes = to_networkx(gm).nodes
            gemms = [n for n in plan.recomputed if recomputable_gemm(n)]
            self.record.update(peak_after=after, tier=tier, recomputed=[n.name for n in plan.recomputed],
                               recomputed_bytes=sum(sizes[n.name]["bytes"] for n in plan.recomputed),
                               saved_bytes=plan.saved_bytes, recomputed_gemms=[n.name for n in gemms],
                               recomputed_gemm_flops=sum(gemm_flops(n) for n in gemms), gemm_cost=gemm_cost)
            return True
        self.best = min(self.best, after)
        undo(gm, copies)
        return False

    def gemm_tier(self) -> bool:
        """Tier 3: matrix multiplies become recomputable at a price in bytes per FLOP, lowered step
        by step from where no GEMM is worth recomputing (the least recompute first); the first price
        whose cut meets the budget is refined by bisection towards fewer recomputed FLOPs."""
        above = None  # the last price tried that did not meet the budget
        for price in gemm_prices(self.gm):
            plan = choose(self.gm, 3, price)
            if any(recomputable_gemm(n) for n in plan.recomputed):
                after = _trial_peak(self.gm, plan)
                if after <= self.budget:
                    price, plan = self.refine(above, price, plan)
                    return self.meets(plan, 3, gemm_cost=price)
                self.best = min(self.best, after)
            above = price
        return False

    def refine(self, above: Optional[float], price: float, plan: RematPlan) -> tuple[float, RematPlan]:
        """Bisect (geometrically) between a price that fails and one whose ``plan`` meets the
        budget: the highest meeting price found (the fewest recomputed FLOPs) and its plan."""
        if above is None:
            return price, plan
        for _ in range(REFINE_STEPS):
            mid = math.sqrt(above * price)
            candidate = choose(self.gm, 3, mid)
            if candidate.recomputed and _trial_peak(self.gm, candidate) <= self.budget:
                price, plan = mid, candidate
            else:
                above = mid
        return price, plan


@register_pass
class Rematerialize(PassBase):
    """Meets a memory budget by recomputing forward values in the backward (min-cut choice);
    in place. ``budget``: bytes of planned peak (default: ``gm.meta["graphpeft"]["memory_budget"]``;
    none -> the pass does nothing)."""

    name = PASS_NAME

    def __init__(self, budget: Optional[int] = None) -> None:
        self.budget = budget

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        budget = self.budget if self.budget is not None else graph_meta(gm).get(BUDGET_META)
        if budget is None:
            return PassResult(gm, False)
        budget = int(budget)
        before = _peak(gm)
        record: dict[str, Any] = {"budget": budget, "peak_before": before, "peak_after": before, "tier": 0,
                                  "recomputed": [], "recomputed_bytes": 0, "recomputed_gemms": [],
                                  "recomputed_gemm_flops": 0}
        graph_meta(gm)[REMAT_META] = record
        if before <= budget:
            log.info("rematerialize: planned peak %.2f MiB is within the budget %.2f MiB; nothing recomputed",
                     before / 2**20, budget / 2**20)
            return PassResult(gm, False)
        search = _BudgetSearch(gm, budget, before, record)
        if search.run():
            return PassResult(gm, True)
        best = search.best
        raise GraphPeftError(
            f"memory_budget={budget} bytes ({budget / 2**20:.2f} MiB) cannot be met: the planned peak is "
            f"{before / 2**20:.2f} MiB and the least any tier of recomputation reaches (pointwise ops, then "
            f"reductions, then matrix multiplies; never random, attention, convolution or in-place ops) is "
            f"{best / 2**20:.2f} MiB; the smallest feasible budget is {best} bytes ({best / 2**20:.2f} MiB)")
