"""Benchmark runner: every contender side by side, interleaved, with ratios to the anchors.

    python -m benchmarks            # full run (benchmark model of DESIGN.md, BERT, CNN)
    python -m benchmarks --quick    # smaller models and fewer repeats (< 5 minutes on 2 cores)

Writes ``benchmarks/results/results.json``, ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from typing import Any, Callable

import torch

from .cases import CASES, INFER, TRAIN
from .harness import count_flops, gemm_peak_gflops, interleave, run_isolated

log = logging.getLogger("benchmarks")

TRAIN_ANCHOR = "peft_lora_eager"
INFER_ANCHOR = "base"


def _build(table: dict[str, Callable], names: list[str], case) -> tuple[dict[str, Callable], dict[str, str]]:
    made, skipped = {}, {}
    for name in names:
        t0 = time.perf_counter()
        try:
            made[name] = table[name](case)
            made[name]()  # first call outside timing: compilation, allocation
        except Exception as e:  # noqa: BLE001 - one broken contender must not stop the run
            skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            made.pop(name, None)
        log.info("  built %s in %.1f s", name, time.perf_counter() - t0)
    return made, skipped


def _flops(step: Callable) -> int:
    try:
        return count_flops(step)
    except Exception:  # noqa: BLE001 - ORT and compiled callables are not countable
        return 0


def run_kind(kind: str, case, names: list[str], repeats: int, memory: bool, quick: bool, peak: float) -> dict:
    table = TRAIN if kind == "train" else INFER
    anchor = TRAIN_ANCHOR if kind == "train" else INFER_ANCHOR
    made, skipped = _build(table, names, case)
    stats = interleave(made, warmup=1, repeats=repeats)
    rows: dict[str, Any] = {}
    flops_ref = {}
    for name, fn in made.items():
        flops_ref[name] = _flops(fn) if not name.endswith("_ort") and "compiled" not in name else 0
    for name, s in stats.items():
        fl = flops_ref.get(name) or flops_ref.get(name.replace("_ort", "_torch")) or flops_ref.get(name.replace("_ort", ""), 0)
        row = {"median_ms": s.median, "p25_ms": s.p25, "p75_ms": s.p75, "spread": s.spread(), "n": s.n,
               "gflop": fl / 1e9}
        row["achieved_frac"] = (fl / (s.median / 1000) / 1e9 / peak) if fl else None
        if anchor in stats:
            row["ratio_vs_" + anchor] = s.median / stats[anchor].median
        if memory:
            row["memory"] = run_isolated("benchmarks.worker", ["--case", case.name, "--contender", name, "--steps", "3"]
                                         + (["--quick"] if quick else []))
        rows[name] = row
    return {"rows": rows, "skipped": skipped, "anchor": anchor}


def compile_time_markdown(depths: list[int]) -> str:
    """Trace + compile + ONNX export time of the training step against depth, as a table."""
    from .compile_time import _fit, compile_table

    rows = compile_table(depths)
    phases = [p for p in rows[0]["phases"]]
    head = ["layers", "fx nodes", "onnx nodes", *phases, "total s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join([str(r["layers"]), str(r["fx nodes"]), str(r["onnx nodes"]),
                                      *(f"{r[p]:.2f}" for p in phases), f"{r['total']:.2f}"]) + " |")
    a, b, r2 = _fit([r["layers"] for r in rows], [r["total"] for r in rows])
    out += ["", f"Linear fit: total = {a:.2f} s + {b:.2f} s/layer (R^2 = {r2:.3f})."]
    return "\n".join(out)


def to_markdown(results: dict) -> str:
    out = [f"Machine: {results['machine']}; torch {results['torch']}; threads {results['threads']}; "
           f"GEMM peak {results['gemm_peak_gflops']:.1f} GFLOP/s (torch.mm / MKL "
           f"{results.get('gemm_peak_mkl_gflops', float('nan')):.1f}, oneDNN "
           f"{results.get('gemm_peak_onednn_gflops', float('nan')):.1f}); quick={results['quick']}", ""]
    for case, kinds in results["cases"].items():
        for kind, res in kinds.items():
            anchor = res["anchor"]
            out.append(f"### {case} — {kind} (ratio vs {anchor})")
            out.append("")
            # peak RSS: fresh process, compile included; steps: RSS growth while stepping (after
            # building); plan: the static memory planner's peak for the step graph (graphpeft only)
            out.append("| contender | median ms | IQR ms | ratio | GFLOP | % of peak | peak RSS MB | steps +MB | plan MB |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for name, r in res["rows"].items():
                m = r.get("memory", {})
                mem, ready, planned = m.get("peak_rss_mb"), m.get("rss_ready_mb"), m.get("planned_peak_mb")
                grow = None if mem is None or ready is None else mem - ready
                frac = r.get("achieved_frac")
                out.append(f"| {name} | {r['median_ms']:.1f} | {r['p25_ms']:.1f}–{r['p75_ms']:.1f} | "
                           f"{r.get('ratio_vs_' + anchor, float('nan')):.2f} | {r['gflop']:.2f} | "
                           f"{'' if frac is None else f'{100 * frac:.0f}%'} | {'' if mem is None else f'{mem:.0f}'} | "
                           f"{'' if grow is None else f'{grow:.0f}'} | {'' if planned is None else f'{planned:.1f}'} |")
            for name, why in res["skipped"].items():
                out.append(f"| {name} | skipped: {why} | | | | | | | |")
            out.append("")
    if results.get("compile_time"):
        out.append("### compile time vs depth")
        out.append("")
        out.append(results["compile_time"])
    return "\n".join(out)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, k, r) for c, kinds in results["cases"].items() for k, r in kinds.items()]
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3 * len(panels)), squeeze=False)
    for (case, kind, res), (ax_t, ax_m) in zip(panels, axes):
        names = list(res["rows"])
        ax_t.barh(names, [res["rows"][n]["median_ms"] for n in names])
        ax_t.set_title(f"{case} {kind}: median step time (ms)")
        mems = [res["rows"][n].get("memory", {}).get("peak_rss_mb") or 0 for n in names]
        ax_m.barh(names, mems, color="tab:orange")
        ax_m.set_title(f"{case} {kind}: peak RSS (MB, fresh process)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer repeats")
    ap.add_argument("--cases", default="llama,bert,cnn")
    ap.add_argument("--train", default=",".join(TRAIN))
    ap.add_argument("--infer", default=",".join(INFER))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="fresh-process peak-memory run per contender (default: on, off with --quick)")
    ap.add_argument("--no-compile-time", action="store_true", help="skip the compile-time-vs-depth table")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    repeats = a.repeats or (5 if a.quick else 10)
    if a.memory is None:
        a.memory = not a.quick  # a fresh process per contender costs ~20 s each: too slow for --quick
    mkl_peak, onednn_peak = gemm_peak_gflops(kernel="mkl"), gemm_peak_gflops(kernel="onednn")
    peak = max(mkl_peak, onednn_peak)  # "% of peak": against the fastest GEMM kernel this machine has
    results: dict[str, Any] = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "gemm_peak_gflops": peak,
                               "gemm_peak_mkl_gflops": mkl_peak, "gemm_peak_onednn_gflops": onednn_peak,
                               "quick": a.quick,
                               "repeats": repeats, "cases": {}}
    for cname in a.cases.split(","):
        case = CASES[cname](a.quick)
        log.info("case %s", cname)
        results["cases"][cname] = {}
        for kind, names in (("train", a.train), ("infer", a.infer)):
            if names:
                results["cases"][cname][kind] = run_kind(kind, case, names.split(","), repeats,
                                                         a.memory, a.quick, peak)
    if not a.no_compile_time:
        results["compile_time"] = compile_time_markdown([2, 4] if a.quick else [2, 4, 8, 16])
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2)
    os.replace(os.path.join(a.out, "results.json.tmp"), os.path.join(a.out, "results.json"))
    md = to_markdown(results)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md + "\n")
    try:
        plot(results, os.path.join(a.out, "results.png"))
    except Exception as e:  # noqa: BLE001
        log.info("plot skipped: %s", e)
    sys.stdout.write(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
