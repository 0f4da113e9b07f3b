"""float32 CPU matrix products through oneDNN, as a functional graph op, for the PyTorch executors.

PyTorch's float32 CPU ``mm`` / ``addmm`` call MKL's ``sgemm``. On an AMD CPU MKL does not take
its AVX-512 code path: on this machine's AMD EPYC (AVX-512) one core ran ``sgemm`` at ~100
GFLOP/s where oneDNN's ``brg_matmul`` (which picks its kernels by instruction set, not by vendor)
ran the same products at ~220 GFLOP/s, for every GEMM shape of the benchmark Llama's step.
``graphpeft::onednn_mm`` computes ``a @ b (+ bias)`` with oneDNN (PyTorch's own
``mkldnn::_linear_pointwise``, the kernel inductor uses for prepacked linears), taking any operand
layout: a plain or transposed dense operand goes as it is, any other view is copied dense first
(oneDNN's reference kernel handles odd strides at a few GFLOP/s). The ``onednn_matmul`` lowering
pass puts it into an executor's private copy of a step graph; the stored graph (exports, memory
plans) never holds it. Results equal ``torch.mm`` up to rounding (another summation order).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

Tensor = torch.Tensor


def _dense(t: Tensor) -> Tensor:
    """``t`` when oneDNN reads it directly (row-major or its transpose), else a dense copy."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


# defined with torch.library.define / impl rather than custom_op: ~6 µs less per call (the
# step makes ~150 calls)
torch.library.define("graphpeft::onednn_mm", "(Tensor a, Tensor b, Tensor? bias=None) -> Tensor")


def onednn_mm(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` (2-D float32 CPU tensors), plus ``bias`` (shape ``[b.shape[1]]``) when given,
    computed by oneDNN; a new row-major tensor. Nothing passed in is modified."""
    a, b = _dense(a), _dense(b)
    if bias is None and not a.is_contiguous():
        # oneDNN's linear copies a transposed ``a`` (a weight gradient's ``gᵀ``, tokens wide)
        # row-major; ``(bᵀ aᵀ)ᵀ`` copies ``bᵀ`` and the result instead when those are smaller
        other = (0 if b.t().is_contiguous() else b.numel()) + a.shape[0] * b.shape[1]
        if other < a.numel():
            return _linear(b.t(), a, None).t().contiguous()
    return _linear(a, b.t(), bias)


def _linear(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ wᵀ + bias`` by oneDNN (``x`` is read row-major, ``w`` in either dense order)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


torch.library.impl("graphpeft::onednn_mm", "CPU")(onednn_mm)


@torch.library.register_fake("graphpeft::onednn_mm")
def _(a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


@register_flop_formula(torch.ops.graphpeft.onednn_mm)
def _flops(a_shape: torch.Size, b_shape: torch.Size, *args: object, **kwargs: object) -> int:
    """FLOPs of one call for ``torch.utils.flop_counter`` (the benchmarks' GFLOP column)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def available() -> bool:
    """Whether this PyTorch build has oneDNN (``torch.backends.mkldnn``) for ``onednn_mm``."""
    return torch.backends.mkldnn.is_available()


__all__ = ["available", "onednn_mm"]
