"""``linear(h, W) * c`` → ``linear(h, W * c)`` where scaling the weight is cheaper.

LoRA (and its family) scales the branch output: ``lora_B(lora_A(x)) * alpha / r``. The product
is (tokens × out) while ``B`` is (out × r), so moving the constant onto ``B`` replaces two
elementwise passes over activation-sized tensors (the scaling in the forward and its gradient
in the backward) by two over a weight-sized one. Exact in real arithmetic; in floating point
the product is rounded in another order (relative differences ~1e-7).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, GraphBuilder, Provenance, numel_hint
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

aten = torch.ops.aten


class ScaleOntoWeight(RewriteRule):
    """``mul(linear(h, W), c)`` with a number ``c`` and no bias → ``linear(h, mul(W, c))``."""

    name = "scale_onto_weight"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target != aten.mul.Tensor or len(node.args) != 2:
            return None
        y, c = node.args
        if not isinstance(c, numbers.Number) or isinstance(c, bool) or not isinstance(y, fx.Node):
            return None
        if y.op != "call_function" or y.target != aten.linear.default:
            return None
        origin = (node.meta.get(META_KEY) or {}).get("origin", "")
        return MatchResult.success(self.name, node, origin, linear=y, scale=c)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        y: fx.Node = match.bindings["linear"]
        weight = y.args[1]
        if len(y.args) > 2 and y.args[2] is not None:
            return "the linear has a bias: the scale would have to go on both"
        if len(y.users) != 1:
            return "the unscaled product is used elsewhere"
        if not isinstance(weight, fx.Node) or numel_hint(weight) < 0 or numel_hint(y) < 0:
            return "shapes unknown (no meta['val'])"
        if numel_hint(weight) >= numel_hint(y):
            return f"the weight ({numel_hint(weight)} elements) is not smaller than the product ({numel_hint(y)})"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        mul, y = match.node, match.bindings["linear"]
        weight = y.args[1]
        prov = mul.meta.get(META_KEY) or {}
        g = GraphBuilder(gm, weight, Provenance(FoldLinearScale.name, self.name, prov.get("origin", ""),
                                                adapter=prov.get("adapter", ""), part=prov.get("part", "")),
                         module_stack=y.meta.get("nn_module_stack"))
        scaled = g.call(aten.mul.Tensor, weight, match.bindings["scale"])
        y.args = (y.args[0], scaled, *y.args[2:])
        mul.replace_all_uses_with(y)
        gm.graph.erase_node(mul)


@register_pass
class FoldLinearScale(RewritePass):
    """Moves a constant scale of a bias-free linear's output onto its (smaller) weight."""

    name = "fold_linear_scale"

    def __init__(self) -> None:
        super().__init__([ScaleOntoWeight()])
