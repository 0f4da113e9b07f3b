"""Trainable projections of one input as one GEMM: ``linear(x, A_i)`` → ``split(linear(x, cat(A_i)))``.

LoRA on q/k/v (or gate/up) puts three (two) rank-r ``A`` projections on the same hidden states.
Each is a thin GEMM that reads all of ``x``; their backward adds three weight-gradient GEMMs over
``x`` and three input-gradient GEMMs summed into one tensor. Concatenating the ``A`` factors
(tiny) makes each of those one wider GEMM: ``x`` is read once, the input gradient needs no sums.

Only trainable weights smaller than the input they share are fused (adapter factors, not full
base weights: concatenating those every step would copy more than it saves), only bias-free
linears, and only when they read the very same node: adapters with dropout draw
their own mask each, so they read different nodes and never fuse (the masks stay as they were).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, GraphBuilder, Provenance, numel_hint, roles, val
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

aten = torch.ops.aten


def _trainable_weight(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """The name of a bias-free linear's weight when it is a trainable tensor, else None."""
    if node.op != "call_function" or node.target != aten.linear.default:
        return None
    if len(node.args) > 2 and node.args[2] is not None:
        return None
    w = node.args[1]
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    role = roles(gm).get(str(w.target))
    return str(w.target) if role is not None and role.trainable else None


class ConcatenateProjections(RewriteRule):
    """Matches a node read by two or more trainable bias-free linears."""

    name = "concatenate_projections"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        linears = [u for u in node.users if _trainable_weight(gm, u) is not None and u.args[0] is node]
        if len(linears) < 2:
            return None
        origin = (linears[0].meta.get(META_KEY) or {}).get("origin", "")
        return MatchResult.success(self.name, node, origin, linears=linears)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        weights = [val(u.args[1]) for u in match.bindings["linears"]]
        if any(not isinstance(w, torch.Tensor) or w.dim() != 2 for w in weights):
            return "weights are not 2-d tensors with known shapes"
        if len({(w.shape[1], w.dtype) for w in weights}) != 1:
            return "the projections differ in input size or dtype"
        w_elems, x_elems = sum(int(w.numel()) for w in weights), numel_hint(match.node)
        if w_elems >= x_elems:
            return (f"the weights ({w_elems} elements) are not smaller than the shared input ({x_elems}): "
                    "concatenating them every step would cost more than reading the input again")
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        x, linears = match.node, match.bindings["linears"]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        linears = sorted(linears, key=order.__getitem__)
        first = linears[0]
        prov = first.meta.get(META_KEY) or {}
        origins = ",".join((u.meta.get(META_KEY) or {}).get("origin", "") for u in linears)
        anchor = first.prev  # build right before the first projection
        g = GraphBuilder(gm, anchor, Provenance(FuseSharedInputLinears.name, self.name, origins,
                                                adapter=prov.get("adapter", ""), part=prov.get("part", "")),
                         module_stack=first.meta.get("nn_module_stack"))
        weights = [g.attr(str(u.args[1].target)) for u in linears]
        sizes = [int(val(w).shape[0]) for w in weights]
        fused = g.call(aten.linear.default, x, g.call(aten.cat.default, weights, 0))
        parts = g.call(aten.split_with_sizes.default, fused, sizes, -1)
        for i, u in enumerate(linears):
            piece = g.call(operator.getitem, parts, i)
            u.replace_all_uses_with(piece)
        for u in linears:
            old_w = u.args[1]
            gm.graph.erase_node(u)
            if isinstance(old_w, fx.Node) and not old_w.users:
                gm.graph.erase_node(old_w)


@register_pass
class FuseSharedInputLinears(RewritePass):
    """Fuses trainable bias-free projections that read the same input into one GEMM."""

    name = "fuse_shared_input_linears"

    def __init__(self) -> None:
        super().__init__([ConcatenateProjections()])
