"""Training-step memory, measured in fresh processes (issue 11).

    python -m benchmarks.memory                 # Llama hidden 256, 4 layers, vocab 2048, batch 4 x 256
    python -m benchmarks.memory --seq 128 --steps 3 --only eager_full,gp_lora
    python -m benchmarks.memory --worker gp_lora  # one contender, one JSON line (what the runner calls)
    python -m benchmarks.memory --sparse --only eager_norm,gp_norm   # sparse schemes (SPARSE_CONTENDERS)
    python -m benchmarks.memory --budget-time-ab 10  # LoRA at half its plan vs no budget: step times, alternating

Each contender runs in its own process: it builds its model (and compiles its step), runs one
step measured on its own (``first_step_extra_mb``: it includes one-time costs, torch's lazily made
buffers and the graph's runner), then the peak-RSS mark is reset (``/proc/self/clear_refs``: 5) and
``--steps`` steps run; the figure is the extra memory of those steps over the resident memory
right before them (``VmHWM`` - ``VmRSS``; ``ru_maxrss`` would be inherited from the runner, see
DESIGN traps). graphpeft contenders
also report their static plan (``step.memory_report()``) and the torch executor's measured peak
of live tensor storage (``memory_report(measure=True)``); the plan counts the weights and inputs the
process already holds before the step, so its comparable "extra" is the plan peak minus the
step's inputs (``plan_extra_mb``).

Contenders: eager full fine-tuning, eager last block + head, peft LoRA (all linear, r=8), graphpeft
LoRA (torch graph), graphpeft LoRA with ``memory_budget`` = half its unconstrained planned peak
(when that is infeasible, the smallest feasible budget the error names: reported as such),
graphpeft last block + head (torch graph), and the same with a ``memory_budget`` chosen the same way
as the LoRA one; ``--ort`` adds graphpeft LoRA in onnxruntime.

``--malloc-mmap-threshold BYTES`` runs every worker with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed
(e.g. 65536): tensors above it are mapped and unmapped, so freed memory goes back to the OS at
once. With glibc's default (a threshold that grows after the first large free, up to 32 MiB) freed
tensors stay in the heap and the process's peak exceeds its live tensors; measured here, the
graphpeft LoRA step's extra RSS fell from 209 to 131 MiB with the threshold fixed, within 3 % of
the plan's 127 MiB.

Figures measured while other processes load the machine are not comparable between runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)

CONTENDERS = ("eager_full", "eager_last_layer", "peft_lora_eager", "gp_lora", "gp_lora_budget_half", "gp_last_layer",
              "gp_last_layer_budget")
#: sparse schemes (issue 11 item 5), each as an eager PyTorch step and a graphpeft step (``--sparse``):
#: last2 = the last 2 blocks + final norm + head; norm = every norm weight; bias = every linear bias
#: (on the same Llama built with attention and MLP biases); rows = 25 % of the rows (largest norm) of
#: every linear weight of the last 2 blocks (eager: whole weights, gradient masked to those rows)
SPARSE_SCHEMES = ("last2", "norm", "bias", "rows")
SPARSE_CONTENDERS = tuple(f"{kind}_{s}" for s in SPARSE_SCHEMES for kind in ("eager", "gp"))


def _status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM`` ...) in MiB (0 when absent)."""
    return (_status_kb(key) or 0) / 1024


def reset_peak() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def case(seq: int = 256, layers: int = 4, bias: bool = False) -> Any:
    """The issue-11 model: Llama hidden 256, ``layers`` layers, vocab 2048, batch 4 x ``seq``
    (``bias``: its linear layers with biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .cases import LLAMA_LINEAR, Case

    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      attention_bias=bias, mlp_bias=bias)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)

    ids = torch.randint(0, cfg.vocab_size, (4, seq), generator=torch.Generator().manual_seed(0))
    return Case("llama", build, (ids,), {"use_cache": False}, LLAMA_LINEAR, "causal_lm",
                last_layer=(f"model.layers.{layers - 1}.", "model.norm.", "lm_head."))


def _gp_info(step: Any, **extra: Any) -> Callable[[], dict[str, Any]]:
    """What a graphpeft contender reports besides; called after the timed steps (measuring runs the
    graph once more, which must not warm the allocator for the steps being measured)."""
    return lambda: _gp_report(step, **extra)


def _gp_report(step: Any, measure: bool = True, **extra: Any) -> dict[str, Any]:
    report = step.memory_report(measure=measure)
    inputs = sum(report.totals.values())
    measured = report.measured_peak_bytes
    info = {"planned_mb": report.peak_bytes / 2**20, "measured_mb": measured / 2**20 if measured else None,
            "plan_vs_measured": report.plan_vs_measured, "plan_extra_mb": (report.peak_bytes - inputs) / 2**20,
            "nodes": report.num_nodes, "recomputed": len(report.recomputed),
            "recomputed_gemms": len(report.recomputed_gemms), "recomputed_gflop": report.recomputed_gemm_flops / 1e9}
    info.update(extra)
    return info


def _last_k(c: Any, k: int) -> tuple[str, ...]:
    layers = int(c.last_layer[0].split(".")[2]) + 1
    return (*(f"model.layers.{i}." for i in range(layers - k, layers)), "model.norm.", "lm_head.")


def _sparse(name: str, c: Any) -> tuple[Callable[[], Any], Callable[[], dict[str, Any]]]:
    """A sparse-scheme contender: ``eager_<scheme>`` or ``gp_<scheme>``."""
    import dataclasses

    from . import cases

    kind, scheme = name.split("_", 1)
    if scheme == "last2":
        c = dataclasses.replace(c, last_layer=_last_k(c, 2))
    if kind == "eager":
        eager = {"last2": cases.eager_last_layer, "norm": cases.eager_bias_norm, "bias": _eager_bias,
                 "rows": cases.eager_channel25_masked}[scheme]
        return eager(c), dict
    step, batch = cases._gp_sparse_step(c, {"last2": "last_layer", "norm": "bias_norm", "bias": "bias",
                                            "rows": "channel25"}[scheme])
    return (lambda: step(*batch)), _gp_info(step)


def _eager_bias(c: Any) -> Callable[[], Any]:
    from . import cases

    model = c.build().eval()
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(".bias"))
        if p.requires_grad:
            params.append(p)
    return cases._eager_step(model, c, params)


def make(name: str, c: Any) -> tuple[Callable[[], Any], Callable[[], dict[str, Any]]]:
    """The step callable of contender ``name`` on case ``c`` and what it reports besides."""
    from . import cases

    if name in SPARSE_CONTENDERS:
        return _sparse(name, c)
    if name in ("eager_full", "eager_last_layer", "peft_lora_eager"):
        return cases.TRAIN[name](c), dict
    import graphpeft as gp

    if name == "gp_last_layer":
        step, batch = cases._gp_sparse_step(c, "last_layer")
        return (lambda: step(*batch)), _gp_info(step)
    if name in ("gp_lora", "gp_lora_budget_half", "gp_lora_ort"):
        cm = cases._gp_compiled(c)
        batch = tuple(c.batch)
        opt = gp.optim.AdamW(lr=1e-4)
        if name == "gp_lora_ort":
            from graphpeft.backends.onnx import OnnxTrainer
            import tempfile

            step = cm.compile_training("causal_lm", opt, example_batch=batch)
            info = _gp_report(step, measure=False)  # the torch graph is not run in this process
            path = os.path.join(tempfile.mkdtemp(prefix="gp-mem-"), "train.onnx")
            step.export_onnx(path)
            trainer = OnnxTrainer(path)
            del step
            return (lambda: trainer.step(*batch)), lambda: info
        if name == "gp_lora":
            step = cm.compile_training("causal_lm", opt, example_batch=batch)
            return (lambda: step(*batch)), _gp_info(step)
        return _budget_half(lambda **kw: cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4),
                                                             example_batch=batch, **kw), batch)
    if name == "gp_last_layer_budget":
        return _budget_half(lambda **kw: cases._gp_sparse_step(c, "last_layer", **kw)[0],
                            cases._gp_sparse_step(c, "last_layer")[1])
    raise KeyError(f"unknown contender {name}; known: {CONTENDERS + ('gp_lora_ort',)}")


def _budget_half(compile_step: Callable[..., Any], batch: Any) -> tuple[Callable[[], Any], Callable[[], dict[str, Any]]]:
    """The step compiled with ``memory_budget`` = half its unconstrained plan, or, when that is
    infeasible, the smallest feasible budget the error names (reported as such)."""
    import graphpeft as gp

    unconstrained = compile_step().memory_report().peak_bytes
    budget, note = unconstrained // 2, "half"
    try:
        step = compile_step(memory_budget=budget)
    except gp.GraphPeftError as e:
        found = re.search(r"smallest feasible budget is (\d+) bytes", str(e))
        if found is None:
            raise
        budget, note = int(found.group(1)), "half infeasible; smallest feasible"
        step = compile_step(memory_budget=budget)
    return (lambda: step(*batch)), _gp_info(step, budget_mb=budget / 2**20, budget_note=note,
                                           budget_fraction=budget / unconstrained,
                                           unconstrained_planned_mb=unconstrained / 2**20)


def worker(name: str, seq: int, steps: int, layers: int) -> dict[str, Any]:
    """One contender: its first step measured on its own (one-time costs: torch's lazily created
    buffers, the graph's runner), then ``steps`` more, each figure the peak RSS over the RSS
    right before (the peak mark reset in between)."""
    import gc

    c = case(seq, layers, bias=name.endswith("_bias"))
    step, info = make(name, c)
    figures, times = [], []
    for run in (1, steps):
        gc.collect()
        resettable = reset_peak()
        before = _status_kb("VmRSS") or 0
        for _ in range(run):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        figures.append((before, _status_kb("VmHWM") or 0, resettable))
    (before1, peak1, _), (before, peak, resettable) = figures
    # *_mb figures are MiB; extra_mb: the steps after the first
    return {"contender": name, "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024,
            "extra_mb": (peak - before) / 1024 if resettable else None, "peak_reset": resettable,
            "first_step_extra_mb": (peak1 - before1) / 1024 if resettable else None,
            "step_ms": statistics.median(times[1:]) * 1000, "steps": steps, **info()}


def run(contenders: list[str], seq: int, steps: int, layers: int) -> list[dict[str, Any]]:
    from .harness import run_isolated

    rows = []
    for name in contenders:
        t0 = time.time()
        row = run_isolated("benchmarks.memory", ["--worker", name, "--seq", str(seq), "--steps", str(steps),
                                                 "--layers", str(layers)], timeout=1800)
        row.setdefault("contender", name)
        log.info("%s: %s (%.0f s)", name, row, time.time() - t0)
        rows.append(row)
    return rows


def budget_time_ab(seq: int, layers: int, repeats: int, threads: Optional[int] = None) -> str:
    """Step time of the LoRA step at half its planned peak over the unconstrained one, both
    compiled in this process and timed alternating (``harness.interleave``): a ratio that holds on
    a loaded machine better than times taken in separate processes."""
    import graphpeft as gp

    from . import cases
    from .harness import interleave

    if threads:
        torch.set_num_threads(threads)
    c = case(seq, layers)
    cm, batch = cases._gp_compiled(c), tuple(c.batch)
    plain = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), example_batch=batch)
    budget = plain.memory_report().peak_bytes // 2
    half = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), example_batch=batch, memory_budget=budget)
    stats = interleave({"no budget": lambda: plain(*batch), "half": lambda: half(*batch)}, repeats=repeats)
    report = half.memory_report()
    p, h = stats["no budget"].median, stats["half"].median
    return (f"LoRA step, alternating, {repeats} rounds, {torch.get_num_threads()} threads (load average "
            f"{os.getloadavg()[0]:.1f}): no budget "
            f"{p:.0f} ms, memory_budget = half ({budget / 2**20:.1f} MiB; planned {report.peak_bytes / 2**20:.1f}; "
            f"{len(report.recomputed_gemms)} GEMMs recomputed, {report.recomputed_gemm_flops / 1e9:.2f} GFLOP) "
            f"{h:.0f} ms: {h / p:.2f}x")


def table(rows: list[dict[str, Any]]) -> str:
    by = {r["contender"]: r for r in rows}

    def ratio(a: str, b: str, key: str = "extra_mb") -> str:
        x, y = by.get(a, {}).get(key), by.get(b, {}).get(key)
        return f"{x / y:.2f}x" if x and y else "n/a"

    lines = ["| step | extra MiB | first step extra MiB | ms | plan MiB | measured (live storage) MiB | plan/measured "
             "| plan extra MiB | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['contender']} | error: {r['error']} | | | | | | | |")
            continue
        f = lambda k, fmt="{:.1f}": fmt.format(r[k]) if r.get(k) is not None else ""  # noqa: E731
        note = ""
        if "budget_mb" in r:
            note = (f"budget {r['budget_mb']:.1f} MiB ({r['budget_note']}, {r['budget_fraction']:.2f} of "
                    f"{r['unconstrained_planned_mb']:.1f}); {r['recomputed']} values recomputed, "
                    f"{r.get('recomputed_gemms', 0)} of them GEMMs ({r.get('recomputed_gflop', 0):.2f} GFLOP)")
        lines.append(f"| {r['contender']} | {f('extra_mb')} | {f('first_step_extra_mb')} | {f('step_ms', '{:.0f}')} | "
                     f"{f('planned_mb')} | "
                     f"{f('measured_mb')} | {f('plan_vs_measured', '{:.3f}')} | {f('plan_extra_mb')} | {note} |")
    lines.append("")
    lines.append(f"graphpeft last block / eager full: {ratio('gp_last_layer', 'eager_full')}; "
                 f"graphpeft last block / eager last block: {ratio('gp_last_layer', 'eager_last_layer')}; "
                 f"graphpeft LoRA / peft LoRA: {ratio('gp_lora', 'peft_lora_eager')}; "
                 f"LoRA with budget / LoRA: {ratio('gp_lora_budget_half', 'gp_lora')}")
    lines.append("first steps: graphpeft last block / eager full: "
                 f"{ratio('gp_last_layer', 'eager_full', 'first_step_extra_mb')}, with its smallest budget "
                 f"{ratio('gp_last_layer_budget', 'eager_full', 'first_step_extra_mb')}; later steps, with the budget: "
                 f"{ratio('gp_last_layer_budget', 'eager_full')}")
    sparse = [f"{s} {ratio(f'gp_{s}', f'eager_{s}')}" for s in SPARSE_SCHEMES if f"gp_{s}" in by]
    if sparse:
        lines.append("sparse schemes, graphpeft / eager: " + "; ".join(sparse))
    gaps = [f"{r['contender']} {r['extra_mb'] / r['plan_extra_mb']:.2f}" for r in rows
            if r.get("extra_mb") and r.get("plan_extra_mb")]
    if gaps:
        lines.append("measured extra / plan extra: " + "; ".join(gaps))
    b, p = by.get("gp_lora_budget_half", {}), by.get("gp_lora", {})
    if b.get("step_ms") and p.get("step_ms"):
        lines.append(f"LoRA with budget step time / LoRA: {b['step_ms'] / p['step_ms']:.2f}x")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help="run one contender in this process and print one JSON line")
    ap.add_argument("--only", help="comma-separated contenders (default: all)")
    ap.add_argument("--ort", action="store_true", help="add graphpeft LoRA in onnxruntime (export takes a while)")
    ap.add_argument("--sparse", action="store_true", help="add the sparse schemes, eager and graphpeft")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None,
                    help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_ fixed to this many bytes")
    ap.add_argument("--budget-time-ab", type=int, metavar="ROUNDS", default=None,
                    help="time the LoRA step with memory_budget = half against no budget in one process, "
                         "alternating, ROUNDS rounds (and nothing else)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for --budget-time-ab")
    a = ap.parse_args(argv)
    if a.budget_time_ab:
        logging.basicConfig(level=logging.WARNING)
        print(budget_time_ab(a.seq, a.layers, a.budget_time_ab, a.threads))
        return
    if a.worker:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(worker(a.worker, a.seq, a.steps, a.layers)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if a.malloc_mmap_threshold is not None:  # inherited by the worker processes
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    names = a.only.split(",") if a.only else list(CONTENDERS) + (["gp_lora_ort"] if a.ort else []) + \
        (list(SPARSE_CONTENDERS) if a.sparse else [])
    rows = run(names, a.seq, a.steps, a.layers)
    emit(rows, a.json, table(rows))


def emit(rows: list[dict[str, Any]], json_path: Optional[str], text: str) -> None:
    """A benchmark's result rows into ``json_path`` (when given) and its table on stdout."""
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
