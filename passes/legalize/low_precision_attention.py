"""ONNX legalization: bf16 / fp16 attention computed as torch's CPU kernel computes it.

``upcast_low_precision`` computes each bf16 op in float32 and rounds its result once, which is
what torch does for plain ops. ``scaled_dot_product_attention`` is one op in an inference graph,
but torch's fused CPU kernel (``FlashAttentionKernel.cpp``) rounds *inside* it: the scores
``q k^T * scale (+ mask)``, their max and the exponentials are float32, the softmax's sum is
taken over the float32 exponentials, but the exponentials are rounded to bf16 before they meet
``v`` (its GEMM reads bf16 operands, float32 accumulation), and the output is divided by the
sum and rounded once. Upcasting the op whole skips the middle rounding: the bf16 output then
differs from torch's by about one bf16 rounding (0.4 % relative on the tiny Llama).

This pass writes the op out in that order (float32 ops between casts, the exponentials rounded
to the query's dtype): onnxruntime then matches torch to float32 summation-order noise. Exact
for key lengths up to the kernel's block (512 keys); longer keys are processed by the kernel
in blocks with a running max, whose roundings differ slightly. Runs before
``upcast_low_precision``, in the ONNX export only; float32 attention is left alone.

Rule ``attention`` (match -> check -> rewrite): matches ``aten.scaled_dot_product_attention``
with a bf16 / fp16 query; declines (with the reason) dropout, ``is_causal`` and grouped-query
(``enable_gqa``) calls, which keep the plain upcast.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from graphpeft.graph import GraphBuilder, Provenance, op_args
from graphpeft.infra import PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

aten = torch.ops.aten
LOW = (torch.bfloat16, torch.float16)


class LowPrecisionAttention(RewriteRule):
    """Match bf16/fp16 SDPA -> check its options -> rewrite to the kernel's rounding order."""

    name = "attention"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            return None
        q = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(q, torch.Tensor) or q.dtype not in LOW:
            return None
        return MatchResult.success(self.name, node)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        a = op_args(match.node)
        if a.get("dropout_p"):
            return "it has dropout (a random op: left to the plain upcast)"
        if a.get("is_causal"):
            return "is_causal=True (no mask tensor to read): left to the plain upcast"
        if a.get("enable_gqa"):
            return "enable_gqa=True (grouped keys): left to the plain upcast"
        vals = [x.meta.get("val") for x in (a["query"], a["key"], a["value"])]
        if any(v.dtype != vals[0].dtype for v in vals):
            return "query, key and value differ in dtype"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        node = match.node
        a = op_args(node)
        dtype = a["query"].meta["val"].dtype
        g = GraphBuilder(gm, node.prev, Provenance(LowPrecisionAttentionPass.name, self.name, "", part="legalize"),
                         node.meta.get("nn_module_stack"))
        f32 = lambda x: g.call(aten._to_copy.default, x, dtype=torch.float32)  # noqa: E731
        q, k, v = (f32(a[n]) for n in ("query", "key", "value"))
        scale = a.get("scale") or 1.0 / math.sqrt(a["query"].meta["val"].shape[-1])
        s = g.call(aten.mul.Tensor, g.call(aten.matmul.default, q, g.call(aten.transpose.int, k, -2, -1)), scale)
        mask = a.get("attn_mask")
        if mask is not None:
            if mask.meta["val"].dtype == torch.bool:
                s = g.call(aten.where.self, mask, s, g.call(aten.scalar_tensor.default, float("-inf"),
                                                            dtype=torch.float32))
            else:
                s = g.call(aten.add.Tensor, s, f32(mask))
        top = g.call(aten.amax.default, s, [-1], True)
        p = g.call(aten.exp.default, g.call(aten.sub.Tensor, s, top))
        total = g.call(aten.sum.dim_IntList, p, [-1], True)
        rounded = f32(g.call(aten._to_copy.default, p, dtype=dtype))  # the kernel's bf16 GEMM operand
        out = g.call(aten.mul.Tensor, g.call(aten.matmul.default, rounded, v), g.call(aten.reciprocal.default, total))
        out = g.call(aten._to_copy.default, out, dtype=dtype)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)


@register_pass
class LowPrecisionAttentionPass(RewritePass):
    """bf16 / fp16 ``scaled_dot_product_attention`` in torch's CPU rounding order (in place)."""

    name = "low_precision_attention"

    def __init__(self) -> None:
        super().__init__([LowPrecisionAttention()])

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = super().call(gm, ctx)
        if result.modified:
            gm.graph.lint()
            gm.recompile()
        return result
