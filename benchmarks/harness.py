"""Measurement helpers: interleaved timing (A B A B ...), medians, GEMM peak, FLOPs, peak RSS."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class Stats:
    """Timing summary of one contender (milliseconds)."""

    median: float
    p25: float
    p75: float
    minimum: float
    n: int

    @classmethod
    def of(cls, samples_s: list[float]) -> "Stats":
        ms = sorted(s * 1000 for s in samples_s)
        q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) >= 2 else [ms[0]] * 3
        return cls(statistics.median(ms), q[0], q[2], ms[0], len(ms))

    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75 - self.p25) / self.median if self.median else 0.0


def interleave(contenders: dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 10,
               progress: Optional[Callable[[str], None]] = None) -> dict[str, Stats]:
    """Time each contender ``repeats`` times, alternating them (A B A B ...) so drift in the
    machine's speed hits every contender alike; ``warmup`` untimed rounds first."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for i in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        if progress:
            progress(f"round {i + 1}/{repeats}")
    return {k: Stats.of(v) for k, v in samples.items()}


def gemm_peak_gflops(n: int = 1024, repeats: int = 10, kernel: str = "mkl") -> float:
    """Measured float32 GEMM throughput of this machine (the roofline the step times face).

    ``kernel``: ``"mkl"`` is ``torch.mm`` (PyTorch's CPU GEMM, MKL: the one eager PyTorch and peft
    use), ``"onednn"`` is ``graphpeft::onednn_mm`` (oneDNN, the one graphpeft's executors use
    where it is faster: on AMD CPUs MKL keeps to AVX2; 0 without oneDNN)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    if kernel == "onednn":
        from graphpeft.training import onednn_kernels

        if not onednn_kernels.available():
            return 0.0
        mm = onednn_kernels.onednn_mm
    else:
        mm = torch.mm
    for _ in range(3):
        mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, counted by torch's FlopCounterMode over the ops that run."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB).

    Reads ``VmHWM`` (the high-water mark of this process image) where Linux provides it:
    ``ru_maxrss`` of a process started by ``subprocess`` (vfork + exec) starts at its parent's
    peak, so a worker launched from a large runner would report the runner's memory.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(module: str, args: list[str], timeout: float = 600) -> dict:
    """Run ``python -m module args`` in a fresh process; it prints one JSON line last."""
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": "no result line"}
