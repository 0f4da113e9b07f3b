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

import functools
import logging
import os
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import register_flop_formula

Tensor = torch.Tensor
log = logging.getLogger(__name__)


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


#: ``GRAPHPEFT_ONEDNN=1`` / ``0``: use oneDNN's GEMMs / PyTorch's without measuring
ENV = "GRAPHPEFT_ONEDNN"
#: how much faster oneDNN must run the probe product to be chosen
MIN_SPEEDUP = 1.2


def _best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=None)
def _measured_faster(threads: int) -> bool:
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    mkl = _best_seconds(lambda: torch.mm(a, b))
    onednn = _best_seconds(lambda: onednn_mm(a, b))
    log.info("oneDNN %.3f ms vs torch.mm %.3f ms on a 512^3 product (%d threads): %s", onednn * 1e3, mkl * 1e3,
             threads, "oneDNN" if onednn * MIN_SPEEDUP <= mkl else "torch.mm")
    return onednn * MIN_SPEEDUP <= mkl


def preferred() -> bool:
    """Whether the executors should run float32 CPU GEMMs through oneDNN on this machine.

    oneDNN's gain is a CPU's: PyTorch's ``torch.mm`` is MKL, which keeps to AVX2 on AMD CPUs
    (oneDNN ran this machine's products ~2x faster) but takes AVX-512 on Intel ones, where the
    two are close. So it is measured, once per process and thread count: a 512³ product both
    ways, oneDNN chosen when at least :data:`MIN_SPEEDUP` times faster (a ~1 ms probe). The
    environment variable ``GRAPHPEFT_ONEDNN`` (``1`` / ``0``) decides without measuring."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1" and available()
    return available() and _measured_faster(torch.get_num_threads())


__all__ = ["ENV", "MIN_SPEEDUP", "available", "onednn_mm", "preferred"]
