"""ONNX legalization for bfloat16 / float16 graphs: compute each op in float32, store in low precision.

onnxruntime's CPU provider has almost no bfloat16 kernels (not even ``Mul``) and few float16
ones, so a bf16 model's graph (or its training step) exported as it is does not load. This pass
rewrites every op that reads or makes a bfloat16 / float16 tensor to read float32 casts of its
low-precision inputs, compute in float32, and cast its low-precision results back: the graph's
inputs, outputs and stored tensors keep their dtypes (a bf16 parameter stays a bf16 input and
output of the training step), and every op's result is rounded to bf16 where torch rounds it.
That is how torch computes bf16 on the CPU too (float32 arithmetic, one rounding per op), so
onnxruntime agrees with the torch graph to float32 rounding noise. Casts themselves
(``_to_copy``, ``convert_element_type``) translate to ONNX ``Cast``, which supports bf16, and
are left alone. The export runs it (``legalized_copy``) only on graphs with such tensors.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, fake_eval, fake_mode_of
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass

aten = torch.ops.aten
LOW = (torch.bfloat16, torch.float16)
CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}


def _low(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype in LOW
    if isinstance(value, (list, tuple)):
        return any(_low(v) for v in value)
    return False


@register_pass
class UpcastLowPrecision(PassBase):
    """Every bf16 / fp16 op computed in float32 between casts (in place; see the module docstring)."""

    name = "upcast_low_precision"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not any(_low(n.meta.get("val")) for n in gm.graph.nodes):
            return PassResult(gm, False)
        fake = fake_mode_of(gm)
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target in CASTS or node.target is operator.getitem:
                continue
            old = node.meta.get("val")
            low_inputs = [a for a in node.all_input_nodes if _low(a.meta.get("val"))]
            low_kw = node.kwargs.get("dtype") in LOW
            if not low_inputs and not low_kw and not _low(old):
                continue
            for a in low_inputs:
                with graph.inserting_before(node):
                    up = self._cast(graph, fake, a, torch.float32, node)
                node.replace_input_with(a, up)
            if low_kw:
                node.kwargs = {**node.kwargs, "dtype": torch.float32}
            if fake is not None:
                node.meta["val"] = fake_eval(fake, node.target, node.args, node.kwargs)
            if isinstance(old, torch.Tensor) and old.dtype in LOW:
                self._cast_back(graph, fake, node, old.dtype)
            elif isinstance(old, (list, tuple)):
                for user in list(node.users):
                    if user.target is operator.getitem and _low(old[user.args[1]]):
                        if fake is not None:
                            user.meta["val"] = node.meta["val"][user.args[1]]
                        self._cast_back(graph, fake, user, old[user.args[1]].dtype)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    @staticmethod
    def _cast(graph: fx.Graph, fake: Any, x: fx.Node, dtype: torch.dtype, like: fx.Node) -> fx.Node:
        cast = graph.call_function(aten._to_copy.default, (x,), {"dtype": dtype})
        if fake is not None:
            cast.meta["val"] = fake_eval(fake, aten._to_copy.default, (x,), {"dtype": dtype})
        for key in (META_KEY, "nn_module_stack", "custom"):
            if key in like.meta:
                cast.meta[key] = dict(like.meta[key]) if isinstance(like.meta[key], dict) else like.meta[key]
        return cast

    def _cast_back(self, graph: fx.Graph, fake: Any, node: fx.Node, dtype: torch.dtype) -> None:
        with graph.inserting_after(node):
            down = self._cast(graph, fake, node, dtype, node)
        node.replace_all_uses_with(down, delete_user_cb=lambda u: u is not down)
