"""Where a training step's time goes, per op kind, for each executor side by side.

    python -m benchmarks.profile                       # LoRA step on the benchmark Llama
    python -m benchmarks.profile --case llama --steps 10 --top 15 --contenders peft_lora_eager,gp_step_torch,gp_step_ort

PyTorch contenders (eager peft, the compiled step in the torch executor) are profiled with
``torch.profiler`` (self CPU time per ATen op); the onnxruntime contender with onnxruntime's own
profiler (``SessionOptions.enable_profiling``: time per node, summed by ONNX op type). Each table
gives milliseconds per step by op kind and its share of the step, so the remaining gap to eager
is visible op by op. Profiling adds overhead: compare shares, and take step times from
``python -m benchmarks`` (interleaved, no profiler).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import tempfile
from typing import Any, Callable

import torch

from .cases import CASES, TRAIN, Case, _gp_training_step, _targets

log = logging.getLogger("benchmarks.profile")

#: operator namespaces counted (ATen ops by bare name; oneDNN's GEMM runs as ``mkldnn::`` under
#: ``graphpeft::onednn_mm`` in the torch executor)
OP_NAMESPACES = ("aten", "mkldnn", "graphpeft")

#: contenders this module knows how to profile
PROFILED = ("peft_lora_eager", "gp_step_torch", "gp_step_ort")


def profile_torch(step: Callable[[], Any], steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step of every op kind (ATen, oneDNN, graphpeft) while ``step()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    out: dict[str, float] = collections.Counter()
    for ev in prof.key_averages():  # self times: a graphpeft op's own time, its kernels' apart
        ns = ev.key.split("::")[0]
        if ns in OP_NAMESPACES:
            out[ev.key[len("aten::"):] if ns == "aten" else ev.key] += ev.self_cpu_time_total / 1000 / steps
    return dict(out)


def profile_ort(case: Case, steps: int) -> dict[str, float]:
    """Milliseconds per step by ONNX op type of the exported step run by onnxruntime."""
    import onnxruntime as ort

    from graphpeft.backends.onnx import OnnxTrainer

    _, step = _gp_training_step(case)
    folder = tempfile.mkdtemp(prefix="gp-profile-")
    path = os.path.join(folder, "train.onnx")
    step.export_onnx(path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(folder, "ort")
    trainer = OnnxTrainer(path, session_options=opts)
    batch = (*case.batch, *_targets(case))
    trainer.step(*batch)
    for _ in range(steps):
        trainer.step(*batch)
    trace = trainer.session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    out: dict[str, float] = collections.Counter()
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            out[ev.get("args", {}).get("op_name", "?")] += ev["dur"] / 1000 / (steps + 1)
    return dict(out)


def table(name: str, per_op: dict[str, float], top: int) -> str:
    total = sum(per_op.values()) or 1.0
    rows = sorted(per_op.items(), key=lambda kv: -kv[1])
    lines = [f"### {name}: {total:.1f} ms per step in ops", "", "| op | ms / step | share |", "|---|---:|---:|"]
    for op, ms in rows[:top]:
        lines.append(f"| `{op}` | {ms:.2f} | {100 * ms / total:.1f} % |")
    rest = sum(ms for _, ms in rows[top:])
    if rest:
        lines.append(f"| (other {len(rows) - top} kinds) | {rest:.2f} | {100 * rest / total:.1f} % |")
    return "\n".join(lines)


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="llama", choices=sorted(CASES))
    ap.add_argument("--quick", action="store_true", help="the smaller model of the case")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--contenders", default=",".join(PROFILED))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    case = CASES[args.case](args.quick)
    names = [n for n in args.contenders.split(",") if n]
    unknown = [n for n in names if n not in PROFILED]
    if unknown:
        ap.error(f"cannot profile {unknown}; known: {', '.join(PROFILED)}")
    sections = []
    for name in names:
        log.info("profiling %s ...", name)
        per_op = profile_ort(case, args.steps) if name == "gp_step_ort" else profile_torch(TRAIN[name](case), args.steps)
        sections.append(table(name, per_op, args.top))
    print("\n\n".join(sections))  # noqa: T201 - a command-line report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
