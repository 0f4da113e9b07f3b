"""Before merge: give the quantized weights of adapted layers back their float form.

``CompiledModel.merge`` runs this pass first (a merge preparation step): for every quantized
weight that a mergeable adapter will fold into, the stored tensors are dequantized (eagerly,
with the graph's own ops, so the float weight equals what the graph computed), registered under
the weight's original name, read through a plain ``get_attr`` again, and the dequantize subgraph
and the quantized tensors are removed. ``merge_adapters`` then folds ``W + ΔW`` as on any float
model, and :mod:`.requantize_merged` quantizes the result again unless the merge was asked for
float weights (``cm.merge(requantize=False)``). Weights of layers without a mergeable adapter
stay quantized.
"""

from __future__ import annotations

import torch.fx as fx

from graphpeft.graph import META_KEY, Role, adapters, graph_meta, register_tensor, remove_tensor
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import get_method, register_merge_step, register_pass

from .quantize_weights import dequantized_weight, quantized

#: ``gm.meta["graphpeft"]`` key: weight name -> the quantized record it had before merge
#: (what :mod:`.requantize_merged` quantizes again)
PENDING = "requantize_pending"


def restore_float(gm: fx.GraphModule, name: str) -> dict:
    """Put float weight ``name`` back in place of its dequantize subgraph(s); returns the
    quantized record it had (removed from the graph's records)."""
    weight = dequantized_weight(gm, name)
    rec = quantized(gm).pop(name)
    register_tensor(gm, name, weight, Role.FROZEN)
    nodes = {n.name: n for n in gm.graph.nodes}
    for out_name in rec["outputs"]:
        out = nodes[out_name]
        with gm.graph.inserting_before(out):
            attr = gm.graph.get_attr(name)
        if "val" in out.meta:
            attr.meta["val"] = out.meta["val"]
        out.replace_all_uses_with(attr)
        _erase_dead_chain(gm, out)
    for tensor in rec["tensors"].values():
        remove_tensor(gm, tensor)
    return rec


def _erase_dead_chain(gm: fx.GraphModule, out: fx.Node) -> None:
    stack, erased = [out], set()
    while stack:
        node = stack.pop()
        if node in erased or node.users or (node.meta.get(META_KEY) or {}).get("part") != "dequant":
            continue
        inputs = list(node.all_input_nodes)
        gm.graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)


@register_pass
class DequantizeForMerge(PassBase):
    """Float weights back for the quantized layers that mergeable adapters fold into (in place).

    ``ctx.options["requantize"]`` (default True) says whether :mod:`.requantize_merged`
    quantizes them again after the merge."""

    name = "dequantize_for_merge"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        recs = quantized(gm)
        if not recs:
            return PassResult(gm, False)
        folded = set()
        for rec in adapters(gm).values():
            method = get_method(rec["method"])
            if method is not None and method.mergeable:
                folded.add(rec["weight"])
        todo = [n for n in recs if n in folded]
        requantize = ctx.options.get("requantize", True)
        pending = graph_meta(gm).setdefault(PENDING, {})
        for name in todo:
            rec = restore_float(gm, name)
            if requantize:
                pending[name] = rec
        if not pending:
            graph_meta(gm).pop(PENDING, None)
        return PassResult(gm, bool(todo))


register_merge_step(DequantizeForMerge.name, before=True)
