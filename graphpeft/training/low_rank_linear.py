"""A frozen linear plus its low-rank branch, computed through the merged weight, with the
backward a low-rank adapter needs (what ``passes/lower/merge_low_rank_branch.py`` emits).

``y = x Wᵀ + b + (x Aᵀ) Bᵀ`` (LoRA's form, the scale already on ``B``) costs, beyond the frozen
GEMM, two thin GEMMs over the tokens in the forward (``h = x Aᵀ``, ``h Bᵀ``), an add of a
(tokens × out) tensor, and in the backward ``(g B) A`` plus another add for the input gradient.
Through the merged weight ``W' = W + B A`` the product ``h Bᵀ`` and ``(g B) A`` disappear: ``y =
x W'ᵀ + b`` and ``∂x = g W'``, for forming ``W'`` (out × r × in) once in the forward and once
again in the backward (recomputed, not kept: it is as large as ``W``). That pays when the
tokens outnumber ``2·in·out/(in + out)``, which the pass checks.

Autograd must not differentiate through ``W'`` (that would be a full-size weight gradient, the
cost LoRA exists to avoid), so the op has its own backward: ``∂h = g B`` and ``∂B = gᵀ h``, with
``h`` computed outside the op from the *detached* input (its gradient flows to ``A`` only, as
``∂A = (∂h)ᵀ x``; the input's gradient through the branch is already in ``g W'``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx.traceback as fxt
import torch.nn.functional as F

from .trace_step import RECOMPUTE_KEY

Tensor = torch.Tensor


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class _MergedLowRankLinear(torch.autograd.Function):
    """``linear(x, W + B A, bias)`` with the low-rank adapter's gradients (see the module)."""

    @staticmethod
    def forward(x: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor) -> Tensor:
        return F.linear(x, torch.addmm(weight, b, a), bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, h, weight, bias, a, b = inputs
        ctx.save_for_backward(h, weight, a, b)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:  # type: ignore[override]
        h, weight, a, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:
            with fxt.annotate({RECOMPUTE_KEY: "merged low-rank weight"}):  # W' again: not kept (CSE too)
                merged = torch.addmm(weight, b, a)
            grad_x = torch.matmul(g, merged)
        grad_h = torch.matmul(g, b) if need[1] else None
        grad_bias = _rows(g).sum(0) if need[3] else None
        grad_b = torch.mm(_rows(g).t(), _rows(h)) if need[5] else None
        return grad_x, grad_h, None, grad_bias, None, grad_b


def merged_low_rank_linear(x: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor,
                           b: Tensor) -> Tensor:
    """``linear(x, weight, bias) + linear(h, b)`` for ``h = linear(x, a)`` (``h`` computed from a
    detached ``x`` by the caller), through the merged weight ``weight + b @ a``."""
    return _MergedLowRankLinear.apply(x, h, weight, bias, a, b)


__all__ = ["merged_low_rank_linear"]
