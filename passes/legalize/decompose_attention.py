"""The fused CPU attention and its backward, as math for runtimes without those kernels.

The torch executor runs a training step's attention as ``_scaled_dot_product_flash_attention_for_cpu``
and its backward (one fused kernel each, the causal half of the scores skipped, only the output
and the row log-sum-exp kept for the backward). ONNX and ExecuTorch have no such ops (the
backward has no decomposition at all), so exports rewrite both here into the math form:

- forward: ``s = q kᵀ · scale`` (masked: causal ``-inf`` above the diagonal, a boolean mask's
  ``False`` to ``-inf``, a float mask added), ``lse = logsumexp(s)``, ``out = exp(s - lse) v``;
- backward (FlashAttention's): ``p = exp(s - lse)`` recomputed from the saved ``lse``,
  ``dv = pᵀ do``, ``dp = do vᵀ``, ``ds = p · (dp - rowsum(do · out))``, ``dq = ds k · scale``,
  ``dk = dsᵀ q · scale``.

A row every key of which is masked gets a zero output and zero gradients (its ``lse`` is
``-inf``), as the fused kernel gives. Only dropout-free attention is rewritten (the fused CPU
kernel takes no dropout in training graphs either); anything else raises an ``ExportError``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from graphpeft.errors import ExportError
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass

from .legalize_onnx import inline_decomposition

aten = torch.ops.aten
FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
PASS_NAME = "decompose_attention"

Tensor = torch.Tensor


def _scores(q: Tensor, k: Tensor, is_causal: bool, attn_mask: Optional[Tensor], scale: Optional[float]) -> tuple:
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        # an additive mask (a constant the runtime folds) rather than a masked fill: onnxruntime's
        # broadcasting Where over the scores made the causal step 1.18x slower than the Add
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s + torch.zeros(keep.shape, dtype=s.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return s, scale


def _probabilities(s: Tensor, lse: Tensor) -> Tensor:
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # a fully masked row: p = 0
    return torch.exp(s - finite.unsqueeze(-1))


def attention_forward(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, is_causal: bool = False, *,
                      attn_mask: Optional[Tensor] = None, scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """``_scaled_dot_product_flash_attention_for_cpu`` in math form: ``(out, logsumexp)``."""
    s, _ = _scores(q, k, is_causal, attn_mask, scale)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(_probabilities(s, lse), v), lse


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       dropout_p: float, is_causal: bool, *, attn_mask: Optional[Tensor] = None,
                       scale: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``_scaled_dot_product_flash_attention_for_cpu_backward`` in math form: ``(dq, dk, dv)``."""
    s, scale = _scores(q, k, is_causal, attn_mask, scale)
    p = _probabilities(s, lse)
    dv = torch.matmul(p.transpose(-2, -1), grad_out)
    dp = torch.matmul(grad_out, v.transpose(-2, -1))
    ds = p * (dp - (grad_out * out).sum(dim=-1, keepdim=True))
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-2, -1), q) * scale, dv


MATH = {FORWARD: attention_forward, BACKWARD: attention_backward}


@register_pass
class DecomposeAttention(PassBase):
    """Rewrites the fused CPU attention ops (forward and backward) into core ATen math; in place.

    ``ctx.options["decompose_attention"]`` receives the number of ops rewritten."""

    name = PASS_NAME

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from torch._decomp import core_aten_decompositions

        todo = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in MATH]
        table = core_aten_decompositions() if todo else None
        cache: dict = {}  # every layer's attention has the same shapes: traced once
        for node in todo:
            dropout = node.args[3] if node.target is FORWARD and len(node.args) > 3 else \
                node.args[6] if node.target is BACKWARD else 0.0
            if dropout:
                raise ExportError(f"{node.name}: fused attention with dropout {dropout} has no math form here; "
                                  "train without attention dropout to export")
            inline_decomposition(gm, node, MATH[node.target], PASS_NAME, rule="attention", table=table, cache=cache)
        ctx.options[self.name] = len(todo)
        return PassResult(gm, bool(todo))

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        from graphpeft.errors import VerificationError

        left = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in MATH]
        if left:
            raise VerificationError(f"decompose_attention left fused attention ops: {left[:10]}")


__all__ = ["DecomposeAttention", "attention_backward", "attention_forward"]
