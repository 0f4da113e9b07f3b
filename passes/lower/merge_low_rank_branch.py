"""``linear(x, W, b) + linear(linear(x, A), B)`` → one GEMM on the merged weight ``W + B A``,
where the tokens make that cheaper (the cheapest association of LoRA's products).

A LoRA branch costs, besides the frozen GEMM, the thin GEMMs ``h = x Aᵀ`` and ``h Bᵀ`` and an add
of a (tokens × out) tensor in the forward, and ``(g B) A`` plus an add of a (tokens × in) tensor
in the backward. Forming ``W' = W + B A`` (out × r × in) instead, once in the forward and once in
the backward, removes ``h Bᵀ``, ``(g B) A`` and both adds (``graphpeft.training.low_rank_linear``
has the op and its backward). That pays when ``tokens · (in + out) > 2 · in · out``: large
batches on layers of moderate width. Thin GEMMs run far below a CPU's GEMM peak, so the saving
in time is larger than in FLOPs.

Only a branch without dropout (the branch reads the layer's own input), on a frozen float weight
stored on the graph (not one computed in the forward, as a dequantized weight: recomputing
``W'`` in the backward would keep it alive), is rewritten. Exact in real arithmetic; in floating
point the sum is rounded in another order (relative differences ~1e-7).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, GraphBuilder, Provenance, numel_hint, roles, val
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule
from graphpeft.training.low_rank_linear import merged_low_rank_linear

aten = torch.ops.aten


def _linear_parts(node: object) -> Optional[tuple]:
    """``(input, weight, bias)`` of an ``aten.linear`` node, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target != aten.linear.default:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    return args[0], args[1], args[2]


def _frozen_weight(gm: fx.GraphModule, node: object) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    role = roles(gm).get(str(node.target))
    v = val(node)
    return (role is not None and not role.trainable and isinstance(v, torch.Tensor) and v.dim() == 2
            and v.is_floating_point())


class MergeLowRankBranch(RewriteRule):
    """``add(linear(x, W, b), linear(linear(x, A), B))`` with ``W`` frozen → the merged op."""

    name = "merge_low_rank_branch"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target != aten.add.Tensor or len(node.args) != 2 or node.kwargs:
            return None
        for base, branch in (node.args, node.args[::-1]):
            base_parts, up_parts = _linear_parts(base), _linear_parts(branch)
            if base_parts is None or up_parts is None or up_parts[2] is not None:
                continue
            low_parts = _linear_parts(up_parts[0])
            if low_parts is None or low_parts[2] is not None or low_parts[0] is not base_parts[0]:
                continue
            origin = (node.meta.get(META_KEY) or {}).get("origin", "")
            return MatchResult.success(self.name, node, origin, base=base, up=branch, low=up_parts[0])
        return None

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        base, up, low = match.bindings["base"], match.bindings["up"], match.bindings["low"]
        x, weight, _ = _linear_parts(base)
        a, b = low.args[1], up.args[1]
        if not _frozen_weight(gm, weight):
            return "the layer's weight is not a frozen 2-d float tensor stored on the graph"
        if any(len(n.users) != 1 for n in (base, up, low)):
            return "a partial product is read elsewhere"
        va, vb, vw = val(a), val(b), val(weight)
        if not all(isinstance(v, torch.Tensor) and v.dim() == 2 for v in (va, vb)):
            return "the low-rank factors are not 2-d tensors with known shapes"
        out, inp = int(vw.shape[0]), int(vw.shape[1])
        if tuple(vb.shape)[0] != out or tuple(va.shape)[1] != inp or va.shape[0] != vb.shape[1]:
            return "the factors' shapes do not compose to the weight's"
        if len({vw.dtype, va.dtype, vb.dtype}) != 1:
            return "the weight and the factors differ in dtype"
        tokens = numel_hint(x) // inp if numel_hint(x) > 0 else -1
        if tokens * (inp + out) <= 2 * inp * out:
            return (f"{tokens} tokens: forming the merged {out}x{inp} weight twice costs more than the "
                    "thin products it saves")
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        add, base, up, low = match.node, match.bindings["base"], match.bindings["up"], match.bindings["low"]
        x, weight, bias = _linear_parts(base)
        prov = add.meta.get(META_KEY) or {}
        stamp = Provenance(MergeLowRankPass.name, self.name, prov.get("origin", ""), adapter=prov.get("adapter", ""),
                           part="lowered")
        stack = low.meta.get("nn_module_stack")
        g = GraphBuilder(gm, low.prev, stamp, module_stack=stack)  # h where A's product was
        detached = _detached(x) or g.call(aten.detach.default, x)
        h = g.call(aten.linear.default, detached, low.args[1])
        g = GraphBuilder(gm, add.prev, stamp, module_stack=stack)  # the output where the join was
        merged = g.call(merged_low_rank_linear, x, h, weight, bias, low.args[1], up.args[1])
        add.replace_all_uses_with(merged)
        for n in (add, up, low, base):
            gm.graph.erase_node(n)


def _detached(x: fx.Node) -> Optional[fx.Node]:
    """The ``detach(x)`` an earlier rewrite made (one node, so projections of ``x`` stay fusable)."""
    for u in x.users:
        if u.target == aten.detach.default and (u.meta.get(META_KEY) or {}).get("pass_name") == MergeLowRankPass.name:
            return u
    return None


@register_pass
class MergeLowRankPass(RewritePass):
    """Computes frozen linears and their low-rank branches through the merged weight where cheaper."""

    name = "merge_low_rank_branch"

    def __init__(self) -> None:
        super().__init__([MergeLowRankBranch()])
