"""PyTorch executors on CPU: float32 ``mm`` / ``addmm`` → ``graphpeft::onednn_mm`` (oneDNN).

PyTorch runs float32 CPU GEMMs through MKL, which on AMD CPUs keeps to its AVX2 kernels; oneDNN
chooses by instruction set. On this machine (AMD EPYC, AVX-512) the benchmark Llama's step GEMMs
ran ~2.2× faster in oneDNN (:mod:`graphpeft.training.onednn_kernels`), and the inductor step went
from 0.79× to 0.49× of peft eager at one thread. Rewritten:

- ``mm(a, b)`` → ``onednn_mm(a, b)``;
- ``addmm(bias, a, b)`` with a 1-D bias and unit ``alpha`` / ``beta`` → ``onednn_mm(a, b, bias)``.

Only where oneDNN is faster: on a CPU where it is not (MKL takes AVX-512 on Intel CPUs) every
product is declined with that reason (``onednn_kernels.preferred``: measured once per process;
``GRAPHPEFT_ONEDNN=1`` / ``0`` decides instead).

Left alone, with the reason ``explain`` gives: anything not 2-D float32 on the CPU, products
of fewer than :data:`MIN_MULTIPLY_ADDS` multiply-adds (oneDNN's per-call cost), and
``addmm`` adding a whole matrix (the merged LoRA branch's ``base + (x A) Bᵀ``: oneDNN's add
post-op made the step slower than ATen's ``addmm`` there).

Executors: the default torch runner and the inductor executor apply it to their own copy of a
step graph (``graphpeft.training.runner.TORCH_EXECUTOR_LOWERING``,
``graphpeft.training.options.INDUCTOR_LOWERING``); exports and memory plans read the stored
graph. Exact up to rounding (another summation order).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, GraphBuilder, Provenance, val
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule
from graphpeft.training import onednn_kernels

aten = torch.ops.aten
#: products with fewer multiply-adds stay on MKL: oneDNN's fixed cost per call (~15 µs here)
#: made 64³ 3× slower; 128³ broke even, 512×256×8 ran 2.2× faster in oneDNN
MIN_MULTIPLY_ADDS = 1 << 19


def _cpu_float32_matrix(node: object) -> bool:
    v = val(node)
    return v is not None and v.dim() == 2 and v.dtype == torch.float32 and v.device.type == "cpu"


class MatmulToOneDNN(RewriteRule):
    """``mm(a, b)`` / ``addmm(bias, a, b)`` (1-D bias) → ``onednn_mm(a, b[, bias])``."""

    name = "matmul_to_onednn"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            return None
        origin = (node.meta.get(META_KEY) or {}).get("origin", "")
        if node.target is aten.mm.default:
            return MatchResult.success(self.name, node, origin, a=node.args[0], b=node.args[1], bias=None)
        bias, a, b = node.args[:3]
        return MatchResult.success(self.name, node, origin, a=a, b=b, bias=bias)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        node, b = match.node, match.bindings
        if not onednn_kernels.available():
            return "this PyTorch build has no oneDNN (torch.backends.mkldnn)"
        if not onednn_kernels.preferred():
            return (f"oneDNN is not faster than torch.mm (MKL) on this CPU (measured once per process; "
                    f"{onednn_kernels.ENV}=1 forces it)")
        if not all(_cpu_float32_matrix(n) for n in (b["a"], b["b"], node)):
            return "not a product of 2-D float32 CPU tensors"
        (m, k), n = val(b["a"]).shape, val(b["b"]).shape[1]
        if all(isinstance(d, int) for d in (m, k, n)) and m * k * n < MIN_MULTIPLY_ADDS:
            return f"{m}x{k}x{n} is too small: oneDNN's ~15 us per call exceed MKL's time"
        if b["bias"] is not None:
            if node.kwargs or len(node.args) != 3:
                return "addmm with alpha / beta"
            bias = val(b["bias"])
            if bias is None or bias.dim() != 1 or bias.dtype != torch.float32:
                return "addmm adds a whole matrix (ATen's addmm was faster than oneDNN's add post-op)"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        node, b = match.node, match.bindings
        part = (node.meta.get(META_KEY) or {}).get("part", "")
        g = GraphBuilder(gm, node, Provenance(OneDNNMatmul.name, self.name, match.origin, part=part))
        args = (b["a"], b["b"]) if b["bias"] is None else (b["a"], b["b"], b["bias"])
        node.replace_all_uses_with(g.call(torch.ops.graphpeft.onednn_mm.default, *args))


@register_pass
class OneDNNMatmul(RewritePass):
    """float32 CPU ``mm`` / ``addmm`` → oneDNN (``graphpeft::onednn_mm``; PyTorch executors)."""

    name = "onednn_matmul"
    sweep_dead_code = True  # the replaced products

    def __init__(self) -> None:
        super().__init__([MatmulToOneDNN()])


__all__ = ["OneDNNMatmul"]
