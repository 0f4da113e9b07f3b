"""Big models from the meta device: compile without weights, then load them (issue 15).

    python -m benchmarks.load_weights --shape 1b               # write a random checkpoint, load it
    python -m benchmarks.load_weights --shape 1b --quantize int8
    python -m benchmarks.load_weights --shape 7b               # compile on meta + memory report only
    python -m benchmarks.load_weights --shape tiny             # a quick check of the whole path

For ``--shape 1b`` (or ``tiny``) a folder of random safetensors shards in the ``save_pretrained``
layout (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) is written by a
process of its own, one shard at a time (the model never exists in full there either), under
``--folder`` (default: a temporary folder in /tmp, deleted afterwards unless ``--keep``). A fresh
process then builds the model under ``accelerate.init_empty_weights()``, compiles it with LoRA
(r=8 on q/v) on the meta device, plans its LoRA step on meta (``memory_report``), loads the folder
with ``cm.load_base_weights`` and runs one forward. The peak resident memory of that process
(``VmHWM`` of /proc/self/status, read in the process itself: ``ru_maxrss`` is inherited across
fork/exec) is reported against the checkpoint's weight bytes; the target is <= 1.3x.

For ``--shape 7b`` the same fresh process compiles on meta and plans the LoRA step at batch 1x256
(no weights are written or loaded).

Figures measured while other processes load the machine are not comparable between runs (peak
memory is; times are not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}
SHARD_BYTES = 2 * 2**30  # save_pretrained's shards are this order of size


def _config(shape: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **SHAPES[shape])


def _skeleton(shape: str) -> Any:
    """The model with its parameters on the meta device (buffers real: rotary inv_freq)."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        return LlamaForCausalLM(_config(shape)).eval()


def write_checkpoint(shape: str, folder: str, seed: int = 0) -> dict[str, Any]:
    """Random weights in the save_pretrained layout, generated and written one shard at a time."""
    specs = [(n, tuple(p.shape), p.dtype) for n, p in _skeleton(shape).state_dict().items()
             if not n.endswith("inv_freq")]
    return write_random_checkpoint(specs, folder, seed)


def write_random_checkpoint(specs: list[tuple[str, tuple, Any]], folder: str, seed: int = 0) -> dict[str, Any]:
    """Random tensors ``(name, shape, dtype)`` (N(0, 0.02) matrices, ones for vectors) written as
    a sharded safetensors folder with its index, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file

    shards: list[list[tuple[str, tuple, Any]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = torch.Size(spec[1]).numel() * torch.tensor([], dtype=spec[2]).element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    os.makedirs(folder, exist_ok=True)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen, dtype=dt) * 0.02 if len(s) > 1 else torch.ones(s, dtype=dt))
                   for n, s, dt in shard}
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: name for n in tensors})
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return {"shards": len(shards), "weight_bytes": total, "tensors": len(weight_map)}


def _plan(quantize: str | None) -> Any:
    import graphpeft as gp

    rules = [gp.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16)]
    if quantize:
        rules.append(gp.Quantize(targets="all-linear", dtype=quantize, group_size=64))
    return gp.Plan(rules)


def load_worker(shape: str, folder: str | None, quantize: str | None, seq: int) -> dict[str, Any]:
    """Fresh process: compile on meta, plan the LoRA step, then (with a folder) load and run."""
    import torch

    import graphpeft as gp

    from .memory import status_mb

    out: dict[str, Any] = {"shape": shape, "quantize": quantize, "rss_start_mb": status_mb("VmRSS")}
    t0 = time.perf_counter()
    model = _skeleton(shape)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (1, seq))
    cm = gp.compile(model, _plan(quantize), example_inputs=(ids,), example_kwargs={"use_cache": False})
    out["params"] = sum(p.numel() for p in model.parameters())
    out["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), example_batch=(ids, ids))
    report = step.memory_report()
    out["step_compile_s"] = time.perf_counter() - t0
    out["planned_step_peak_gb"] = report.peak_bytes / 1e9
    out["rss_after_meta_compile_mb"] = status_mb("VmRSS")
    del model
    if folder is None:
        out["peak_rss_mb"] = status_mb("VmHWM")
        return out
    t0 = time.perf_counter()
    load = cm.load_base_weights(folder)
    out["load_s"] = time.perf_counter() - t0
    out["peak_rss_load_mb"] = status_mb("VmHWM")
    out["rss_after_load_mb"] = status_mb("VmRSS")
    out["loaded_tensors"] = load.loaded
    out["held_bytes"] = load.bytes
    out["still_meta"] = len(load.still_meta)
    with torch.no_grad():
        logits = cm(ids[:, :8]).logits
    out["forward_finite"] = bool(torch.isfinite(logits).all())
    return out


def _run(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.load_weights", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--quantize", choices=["int8", "int4", "nf4"], default=None)
    parser.add_argument("--seq", type=int, default=None, help="tokens of the planned step (default 256; tiny 16)")
    parser.add_argument("--folder", default=None, help="where the random checkpoint is written (default: /tmp); "
                        "a folder that already holds one is loaded as it is")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--worker", choices=["write", "load"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seq = args.seq or (16 if args.shape == "tiny" else 256)
    if args.worker == "write":
        print(json.dumps(write_checkpoint(args.shape, args.folder)))
        return
    if args.worker == "load":
        print(json.dumps(load_worker(args.shape, args.folder, args.quantize, seq)))
        return
    common = ["--shape", args.shape, "--seq", str(seq)] + (["--quantize", args.quantize] if args.quantize else [])
    if args.shape == "7b":  # no weights: compile on meta and plan the step
        result = _run(["--worker", "load", *common])
        print(json.dumps(result, indent=2))
        return
    folder = args.folder or tempfile.mkdtemp(prefix=f"gp-{args.shape}-", dir="/tmp")
    index = os.path.join(folder, "model.safetensors.index.json")
    try:
        if os.path.isfile(index):  # a checkpoint written before (--keep): load it again
            with open(index, encoding="utf-8") as f:
                written = {"weight_bytes": json.load(f)["metadata"]["total_size"], "reused": folder}
        else:
            t0 = time.perf_counter()
            written = _run(["--worker", "write", "--shape", args.shape, "--folder", folder])
            written["write_s"] = time.perf_counter() - t0
        result = {**written, **_run(["--worker", "load", *common, "--folder", folder])}
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    result["peak_over_weight_bytes"] = result["peak_rss_load_mb"] * 2**20 / result["weight_bytes"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
