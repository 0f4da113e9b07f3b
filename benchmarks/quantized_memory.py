"""Memory of a LoRA step on a quantized base (issue 12 targets), measured in fresh processes.

    python -m benchmarks.quantized_memory                     # Qwen2-0.5B shape: fp32 vs int4 base, measured
    python -m benchmarks.quantized_memory --bases fp32,int4,int4+embed8
    python -m benchmarks.quantized_memory --shape 7b --plan-only --bases fp32,int4,int4+embed8
    python -m benchmarks.quantized_memory --shape tiny        # a quick check of the whole path
    python -m benchmarks.quantized_memory --bases int4 --live # + live tensor bytes of one op-by-op run
    python -m benchmarks.quantized_memory --shape 7b --plan-only --bases int4+embed4+head4 --memory-budget 5800

Model: a ``transformers`` Qwen2 of the Qwen2-0.5B shape (hidden 896, 24 layers, intermediate 4864,
14 heads, 2 KV heads, vocab 151936, tied embeddings; 494 M parameters, random weights), LoRA r=8 on
every linear layer but the head (QLoRA's recipe), AdamW, batch 1 x 128. ``--shape 7b`` is the
Llama-7B shape of ``benchmarks.load_weights`` at batch 1 x 256.

Bases (``--bases``): ``fp32`` (no quantization), ``int8`` / ``int4`` / ``nf4`` (``gp.Quantize`` on
all linear layers but the head, group 64), and ``+embed8`` / ``+embed4`` (the input embedding too,
int8 / int4: its rows are gathered quantized and dequantized after the gather), ``+head8`` /
``+head4`` (an untied output head too).

The fp32 model never exists in full: each worker builds the model under
``accelerate.init_empty_weights()``, compiles it and its LoRA step on the meta device (the
step's plan: ``memory_report()``), then loads a random checkpoint with ``load_base_weights``,
which quantizes each weight as it is read. The checkpoint (fp32 safetensors shards) is written
once by a process of its own, one shard at a time, and shared by the workers.

Measured (``VmRSS`` / ``VmHWM`` of /proc/self/status, read in the worker: ``ru_maxrss`` is
inherited across exec): ``rss_meta`` after the meta compile and plan (imports and graphs), then
the weights are loaded and one untimed step runs (the step traces again for real tensors), the
peak mark is reset (``/proc/self/clear_refs``) and ``--steps`` steps run. **step memory** = peak
RSS during those steps - ``rss_meta``: the weights, the adapters and their optimizer state, and
the step's working memory (activations, gradients, dequantized weights), without the process's
imports and graphs. The plan's peak (``memory_report().peak_bytes``) counts the same things.

Figures measured while other processes load the machine are comparable for memory, not for time.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

log = logging.getLogger(__name__)

#: model shapes: (transformers class, config, batch tokens)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(arch="qwen2", seq=16, config=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, tie_word_embeddings=True)),
    "qwen0.5b": dict(arch="qwen2", seq=128, config=dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "7b": dict(arch="llama", seq=256, config=dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)),
}
GROUP = 64


def _skeleton(shape: str) -> Any:
    """The model with its parameters on meta (buffers real), tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = SHAPES[shape]
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if spec["arch"] == "qwen2" else (LlamaConfig,
                                                                                            LlamaForCausalLM)
    with init_empty_weights():
        model = model_cls(config_cls(max_position_embeddings=2048, **spec["config"])).eval()
    model.tie_weights()  # init_empty_weights leaves the head untied; the checkpoint stores it once
    return model


def plan_rules(base: str, tied: bool = False) -> list[Any]:
    """The rules of ``base``: LoRA r=8 on all linear layers but the head, and the quantization
    (``+embed``: the embedding, and the head too when it is tied to it)."""
    import graphpeft as gp

    rules = [gp.LoRA(targets="all-linear", r=8, alpha=16)]
    dtype, *extras = base.split("+")
    if dtype != "fp32":
        rules.append(gp.Quantize(targets="all-linear", dtype=dtype, group_size=GROUP))
    for extra in extras:
        bits = {"8": "int8", "4": "int4"}[extra[-1]]
        target = {"embed": ["embed_tokens", "lm_head"] if tied else ["embed_tokens"], "head": ["lm_head"]}[extra[:-1]]
        rules.append(gp.Quantize(targets=target, dtype=bits, group_size=GROUP))
    return rules


def write_checkpoint(shape: str, folder: str, seed: int = 0) -> dict[str, Any]:
    """Random fp32 weights in the save_pretrained layout, made and written one shard at a time
    (a tied tensor once, under its first name)."""
    import torch

    from .load_weights import write_random_checkpoint

    model = _skeleton(shape)
    seen: set[int] = set()
    specs = []
    for name, p in model.state_dict(keep_vars=True).items():
        if name.endswith("inv_freq") or id(p) in seen:
            continue
        seen.add(id(p))
        specs.append((name, tuple(p.shape), torch.float32))
    return write_random_checkpoint(specs, folder, seed)


def worker(shape: str, base: str, folder: Optional[str], steps: int, seq: int, live: bool = False,
           budget_mb: Optional[float] = None) -> dict[str, Any]:
    """Fresh process: compile on meta, plan the step; with a folder, load, run and measure
    (``live``: also the peak of live tensor storages of one op-by-op run, ``measure_memory``, to
    tell the graph's memory from what the allocator keeps; ``budget_mb``: the step's
    ``memory_budget``, met by rematerialization)."""
    import torch

    import graphpeft as gp
    from graphpeft.passes.quantize.quantize_weights import quantization_report

    from .memory import reset_peak, status_mb

    out: dict[str, Any] = {"shape": shape, "base": base, "seq": seq, "rss_imports_mb": status_mb("VmRSS")}
    vocab = SHAPES[shape]["config"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq), generator=gen)
    t0 = time.perf_counter()
    model = _skeleton(shape)
    out["params"] = sum(p.numel() for p in model.parameters())
    cm = gp.compile(model, gp.Plan(plan_rules(base, SHAPES[shape]["config"]["tie_word_embeddings"])), example_inputs=(ids,), example_kwargs={"use_cache": False})
    del model
    budget = None if budget_mb is None else int(budget_mb * 2**20)
    out["memory_budget_mb"] = budget_mb
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), example_batch=(ids, ids), memory_budget=budget)
    out["compile_s"] = time.perf_counter() - t0
    report = step.memory_report()
    out["planned_peak_mb"] = report.peak_bytes / 2**20
    out["planned_mb"] = {k: v / 2**20 for k, v in report.totals.items()}
    q = quantization_report(cm.graph_module)
    out["quantized_weights"] = q["weights"]
    out["quantized_mb"], out["quantized_float_mb"] = q["bytes"] / 2**20, q["float_bytes"] / 2**20
    gc.collect()
    out["rss_meta_mb"] = status_mb("VmRSS")
    if folder is None:
        out["peak_rss_mb"] = status_mb("VmHWM")
        return out
    t0 = time.perf_counter()
    load = step.load_base_weights(folder)
    out["load_s"] = time.perf_counter() - t0
    out["held_mb"] = load.bytes / 2**20
    gc.collect()
    out["rss_loaded_mb"] = status_mb("VmRSS")
    t0 = time.perf_counter()
    losses = [float(step(ids, ids))]  # traces the step again for real tensors
    out["first_step_s"] = time.perf_counter() - t0
    gc.collect()
    if live:
        from graphpeft.passes.memory.measure_memory import measure_memory

        measured = measure_memory(step.graph_for(ids, ids), step.flat_inputs(ids, ids))
        out["live_peak_mb"], out["live_peak_node"] = measured.peak_bytes / 2**20, measured.peak_node
        gc.collect()
        out["rss_after_live_mb"] = status_mb("VmRSS")
    out["peak_reset"] = reset_peak()
    out["rss_before_steps_mb"] = status_mb("VmRSS")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(float(step(ids, ids)))
        times.append(time.perf_counter() - t0)
    peak = status_mb("VmHWM")
    out["peak_steps_mb"] = peak
    out["step_memory_mb"] = peak - out["rss_meta_mb"]
    out["step_extra_mb"] = peak - out["rss_before_steps_mb"]
    out["step_s"] = sorted(times)[len(times) // 2]
    out["losses"] = losses
    return out


def _run(args: list[str], env: Optional[dict] = None) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quantized_memory", *args], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    ref = next((r for r in rows if r.get("base") == "fp32" and "error" not in r), None)
    lines = ["| base | quantized weights: MiB (fp32 MiB) | plan peak MiB | step memory MiB (ratio to fp32) "
             "| peak RSS MiB | step extra MiB | step s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('base')} | error: {r['error']} | | | | | |")
            continue
        ratio = lambda k: f" ({r[k] / ref[k]:.3f}x)" if ref and r.get(k) and ref.get(k) else ""  # noqa: E731
        mem = f"{r['step_memory_mb']:,.0f}{ratio('step_memory_mb')}" if "step_memory_mb" in r else "—"
        lines.append(f"| {r['base']} | {r['quantized_mb']:,.0f} ({r['quantized_float_mb']:,.0f}) | "
                     f"{r['planned_peak_mb']:,.0f}{ratio('planned_peak_mb')} | {mem} | "
                     f"{r.get('peak_steps_mb', r.get('peak_rss_mb', 0)):,.0f} | "
                     f"{r.get('step_extra_mb', 0):,.0f} | {r.get('step_s', 0):.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen0.5b")
    ap.add_argument("--bases", default="fp32,int4", help="comma-separated (fp32, int8, int4, nf4, +embed8 ...)")
    ap.add_argument("--seq", type=int, default=None, help="tokens of the batch (default: the shape's)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--plan-only", action="store_true", help="compile on meta and plan; load and run nothing")
    ap.add_argument("--folder", default=None, help="checkpoint folder (default: a temporary one in /tmp, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None,
                    help="run the workers with glibc's MALLOC_MMAP_THRESHOLD_ fixed to this many bytes")
    ap.add_argument("--live", action="store_true",
                    help="also measure the live tensor bytes of one op-by-op run (slow: the graph runs in Python)")
    ap.add_argument("--memory-budget", type=float, default=None,
                    help="compile each step with this memory_budget (MiB): rematerialization; refused when unreachable")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--worker", choices=["write", "step"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", default="fp32", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    seq = a.seq or SHAPES[a.shape]["seq"]
    if a.worker == "write":
        print(json.dumps(write_checkpoint(a.shape, a.folder)))
        return
    if a.worker == "step":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(worker(a.shape, a.base, a.folder, a.steps, seq, a.live, a.memory_budget)))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    env = dict(os.environ)
    if a.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
    folder = None if a.plan_only else (a.folder or tempfile.mkdtemp(prefix=f"gp-q-{a.shape}-", dir="/tmp"))
    rows = []
    try:
        if folder and not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
            log.info("writing a random checkpoint to %s", folder)
            log.info("%s", _run(["--worker", "write", "--shape", a.shape, "--folder", folder]))
        for base in a.bases.split(","):
            t0 = time.time()
            args = ["--worker", "step", "--shape", a.shape, "--base", base, "--seq", str(seq), "--steps", str(a.steps),
                    *(["--live"] if a.live else []),
                    *(["--memory-budget", str(a.memory_budget)] if a.memory_budget is not None else [])]
            row = _run(args + (["--folder", folder] if folder else []), env)
            row.setdefault("base", base)
            log.info("%s (%.0f s): %s", base, time.time() - t0, json.dumps(row))
            rows.append(row)
    finally:
        if folder and not a.keep and not a.folder:
            shutil.rmtree(folder, ignore_errors=True)
    from .memory import emit

    emit(rows, a.json, table(rows))


if __name__ == "__main__":
    main()
