"""Grouped matrix products (mixture-of-experts layers) written out in plain ATen ops at trace time.

transformers 5.x computes its MoE experts (Mixtral, Qwen2-MoE, OLMoE ...) with
``torch.ops.transformers.grouped_mm_fallback`` (or ``aten._grouped_mm``): rows of ``x`` sorted
by expert, ``offs`` the cumulative row count per expert, ``out[i] = x[i] @ w[expert(i)]``. The
custom op is opaque: ``torch.func`` cannot differentiate it (its autograd function has no
``setup_context`` for functorch) and ``torch.onnx`` has no translation. Written as one matmul
per expert, selected by a row mask, it trains in torch and exports (inference and training) to
ONNX. The cost: every expert multiplies every routed row (``G`` times the grouped product's
FLOPs, one ``(rows, out)`` product at a time), which is what a static graph without
data-dependent shapes can do.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from .graph import GraphBuilder, Provenance

log = logging.getLogger(__name__)
aten = torch.ops.aten

__all__ = ["expand_grouped_mm"]


def _grouped_targets() -> set[Any]:
    targets: set[Any] = {aten._grouped_mm.default}
    ns = getattr(torch.ops, "transformers", None)
    op = getattr(ns, "grouped_mm_fallback", None) if ns is not None else None
    if op is not None:
        targets.add(op.default)
    return targets


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _expandable(node: fx.Node) -> bool:
    """``(x (S, K), w (G, K, N), offs (G,))`` with nothing else (no bias, no out_dtype)."""
    if len(node.args) != 3 or any(v is not None for v in node.kwargs.values()):
        return False
    x, w, offs = (_val(a) for a in node.args)
    return all(isinstance(v, torch.Tensor) for v in (x, w, offs)) and x.dim() == 2 and w.dim() == 3 \
        and offs.dim() == 1 and isinstance(w.shape[0], int)


def expand_grouped_mm(gm: fx.GraphModule) -> int:
    """Replace each grouped matmul by per-expert matmuls summed under row masks (in place);
    returns how many were replaced. Values are exact: each row gets one expert's product."""
    targets = _grouped_targets()
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in targets or not _expandable(node):
            continue
        x, w, offs = node.args
        b = GraphBuilder(gm, node.prev, Provenance("trace", "expand_grouped_mm"),
                         module_stack=node.meta.get("nn_module_stack"))
        # the expert of row i: how many group ends are <= i (rows are sorted by expert)
        first = b.call(aten.select.int, x, 1, 0)
        rows = b.call(aten.sub.Scalar, b.call(aten.cumsum.default, b.call(aten.ones_like.default, first,
                                                                          dtype=torch.int64), 0), 1)
        ends = b.call(aten._to_copy.default, offs, dtype=torch.int64)
        expert = b.call(aten.sum.dim_IntList, b.call(aten.ge.Tensor, b.call(aten.unsqueeze.default, rows, 1),
                                                     b.call(aten.unsqueeze.default, ends, 0)), [1])
        out = None
        for g in range(int(_val(w).shape[0])):
            mask = b.call(aten._to_copy.default, b.call(aten.unsqueeze.default, b.call(aten.eq.Scalar, expert, g), 1),
                          dtype=_val(x).dtype)
            part = b.call(aten.mul.Tensor, b.call(aten.mm.default, x, b.call(aten.select.int, w, 0, g)), mask)
            out = part if out is None else b.call(aten.add.Tensor, out, part)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        log.info("wrote %d grouped matmul(s) (mixture-of-experts) as per-expert matmuls", count)
    return count
