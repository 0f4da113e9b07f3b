"""LoRA training step on a GPU: peft eager against graphpeft's compiled step, side by side.

    python -m benchmarks.gpu_step                       # Llama hidden 1024, 8 layers, bf16
    python -m benchmarks.gpu_step --hidden 256 --layers 4 --dtype float32 --device cpu

The same model, plan (LoRA r=16 on q/k/v/o and the MLP projections) and batch for every
contender: peft + ``torch.optim.AdamW`` eager, graphpeft's ``CompiledModel`` trained eagerly
(``torch.optim.AdamW``), graphpeft's compiled training step (forward, pruned backward and AdamW
as one graph) run as is, and the same step with ``executor="inductor"`` (``torch.compile``).
``--check`` first trains the three graphpeft contenders 3 SGD steps from one state in float32 and
prints their largest relative parameter difference (the timings are only worth reading if the
fused step computes the same update). Contenders run
interleaved (A B C D A B C D ...), each timing synchronised; medians and IQR in ms, ratios to
peft eager, and peak GPU memory per contender (``torch.cuda.max_memory_allocated``, reset before
each contender's first run). Writes ``benchmarks/results/gpu_step.json`` atomically and prints a
Markdown table. CI has no GPU: this is run by hand on a machine that has one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(hidden: int, layers: int, vocab: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=4096,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))


def eager_step(model: torch.nn.Module, params: list[torch.Tensor], ids: torch.Tensor) -> Callable[[], Any]:
    """A plain PyTorch training step (AdamW) of ``model`` on ``ids``."""
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> Any:
        loss = lm_loss(model(ids, use_cache=False).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def contenders(args: argparse.Namespace, ids: torch.Tensor) -> dict[str, Callable[[], Any]]:
    import graphpeft as gp
    from peft import LoraConfig, get_peft_model

    dtype = getattr(torch, args.dtype)
    out: dict[str, Callable[[], Any]] = {}

    pm = get_peft_model(build(args.hidden, args.layers, args.vocab, dtype, args.device),
                        LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, lora_dropout=0.0))
    out["peft_lora_eager"] = eager_step(pm, [p for p in pm.parameters() if p.requires_grad], ids)

    plan = gp.Plan([gp.LoRA(targets=TARGETS, r=args.r, alpha=2 * args.r)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = gp.compile(build(args.hidden, args.layers, args.vocab, dtype, args.device), plan, (ids,),
                        {"use_cache": False})
    cm.train()
    out["gp_lora_eager"] = eager_step(cm, list(cm.trainable_parameters().values()), ids)
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4))
    out["gp_step"] = lambda: step(ids)
    if args.torch_compile:
        # a second model: the step writes its updates into its CompiledModel
        cm2 = gp.compile(build(args.hidden, args.layers, args.vocab, dtype, args.device), plan, (ids,),
                         {"use_cache": False})
        fused = cm2.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), executor="inductor")
        out["gp_step_inductor"] = lambda: fused(ids)
    return out


def check(args: argparse.Namespace, ids: torch.Tensor, steps: int = 3) -> dict[str, float]:
    """Largest relative difference of the adapters after ``steps`` SGD (momentum) steps: eager
    loop and inductor-run step against the compiled step run as is (float32, one initial state).
    SGD, because AdamW's first step turns rounding-level differences of near-zero gradients into
    moves of ±lr and so measures nothing about the gradients."""
    import graphpeft as gp

    plan = gp.Plan([gp.LoRA(targets=TARGETS, r=args.r, alpha=2 * args.r, init="random")])
    results = {}
    for name in ("eager", "gp_step", "inductor"):
        cm = gp.compile(build(args.hidden, args.layers, args.vocab, torch.float32, args.device), plan, (ids,),
                        {"use_cache": False}, seed=1)
        if name == "eager":
            opt = torch.optim.SGD(list(cm.trainable_parameters().values()), lr=1e-2, momentum=0.9)
            for _ in range(steps):
                lm_loss(cm(ids, use_cache=False).logits, ids).backward()
                opt.step()
                opt.zero_grad()
        else:
            step = cm.compile_training("causal_lm", gp.optim.SGD(lr=1e-2, momentum=0.9),
                                       executor="inductor" if name == "inductor" else None)
            for _ in range(steps):
                step(ids)
        results[name] = {k: v.float() for k, v in cm.adapter_state_dict().items()}

    def rel(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)

    return {"eager_vs_step": rel(results["eager"], results["gp_step"]),
            "inductor_vs_step": rel(results["inductor"], results["gp_step"])}


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-torch-compile", dest="torch_compile", action="store_false")
    parser.add_argument("--check", action="store_true", help="check the contenders agree first (float32)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    checked = check(args, ids) if args.check else None
    if checked:
        print("relative parameter difference after 3 SGD steps (float32): "
              + ", ".join(f"{k} {v:.1e}" for k, v in checked.items()))
    t = time.perf_counter()
    runs = contenders(args, ids)
    setup_s = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in runs}
    peak: dict[str, float] = {}
    for name, fn in runs.items():  # warm-up (and compile) each, with its own memory peak
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            fn()
        sync()
        if cuda:
            peak[name] = torch.cuda.max_memory_allocated() / 2**20
    for _ in range(args.repeats):
        for name, fn in runs.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t) * 1e3)
    anchor = statistics.median(times["peft_lora_eager"])
    rows = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        rows.append({"contender": name, "median_ms": statistics.median(ts), "iqr_ms": q[2] - q[0],
                     "ratio_to_peft": statistics.median(ts) / anchor, "peak_mib": peak.get(name)})
    device = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    result = {"args": vars(args), "device": device, "torch": torch.__version__, "setup_s": setup_s, "rows": rows,
              "check": checked}
    folder = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(folder, "gpu_step.json"))
    print(f"{device}, torch {torch.__version__}, Llama hidden {args.hidden} x {args.layers} layers, "
          f"batch {args.batch}x{args.seq}, {args.dtype}, LoRA r={args.r} on {len(TARGETS)} projections")
    print("| contender | median ms | IQR ms | vs peft eager | peak MiB |\n|---|---:|---:|---:|---:|")
    for r in rows:
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"| {r['contender']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['ratio_to_peft']:.2f}× | {mem} |")


if __name__ == "__main__":
    main()
