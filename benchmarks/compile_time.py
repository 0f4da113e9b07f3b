"""Compile time of the training step against model depth, and where the time goes.

    python -m benchmarks.compile_time                  # depths 2, 4, 8, 16 (small Llama, hidden 256)
    python -m benchmarks.compile_time --layers 2 4     # other depths
    python -m benchmarks.compile_time --step-time      # also: step time, eager PEFT vs compiled (torch, ORT)
    python -m benchmarks.compile_time --qwen           # Qwen2-0.5B shape: the four phases and peak RSS
    python -m benchmarks.compile_time --qwen --release-torch   # same, torch's copy dropped before the load
    python -m benchmarks.compile_time --qwen --release-torch --no-prepack  # and no packed weight copies

For each depth: ``gp.compile`` (trace the model, insert LoRA r=8 on every linear layer), the
training-step compiler (``make_fx`` trace, then each training pass), the ONNX export (legalize,
capture as an ExportedProgram, translate, optimize, save) and loading the file into an
onnxruntime session. A warm-up run on a 1-layer model first pays the one-time costs (imports,
the exporter's op registry), which are reported apart. Self-contained: it does not use the
``benchmarks`` runner.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from typing import Any, Sequence

import torch

from .memory import status_mb  # VmHWM: this process's peak (ru_maxrss would include subprocesses)

HIDDEN = 256
VOCAB = 2048
BATCH, SEQ = 4, 128
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_llama(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=688, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def measure(layers: int, folder: str) -> dict[str, Any]:
    """Compile, train-compile and export one depth; seconds per phase and graph sizes."""
    import graphpeft as gp
    from graphpeft.backends.onnx import OnnxTrainer

    ids = batch()
    row: dict[str, Any] = {"layers": layers}
    t = time.perf_counter()
    cm = gp.compile(build_llama(layers), gp.Plan([gp.LoRA(targets=LINEAR, r=8, alpha=16)]), (ids,),
                    {"use_cache": False})
    row["model compile"] = time.perf_counter() - t
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), example_batch=(ids,))
    row["step trace"] = step.timings["trace"]
    row["passes"] = {k[len("pass:"):]: v for k, v in step.timings.items() if k.startswith("pass:")}
    row["step passes"] = sum(row["passes"].values())
    row["fx nodes"] = len(step.graph_module.graph.nodes)
    row["params"] = len(step.signature.params)
    path = os.path.join(folder, f"llama{layers}.onnx")
    res = step.export_onnx(path)
    for k, v in res.timings.items():
        row[f"export {k}"] = v
    row["onnx nodes"] = res.num_nodes
    t = time.perf_counter()
    OnnxTrainer(path)  # the first load also saves onnxruntime's optimized model beside the file
    row["ort load"] = time.perf_counter() - t
    t = time.perf_counter()
    OnnxTrainer(path)
    row["ort reload"] = time.perf_counter() - t  # from that saved model: not in the total
    phases = ["model compile", "step trace", "step passes"] + [f"export {k}" for k in res.timings] + ["ort load"]
    row["total"] = sum(row[p] for p in phases)
    row["phases"] = phases
    peak = step.memory_report()
    row["peak MiB"] = peak.peak_bytes / (1 << 20)
    return row


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line y = a + b x and its R^2."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


def compile_table(depths: Sequence[int]) -> list[dict[str, Any]]:
    folder = tempfile.mkdtemp(prefix="gp-compile-time-")
    t = time.perf_counter()
    measure(1, folder)
    warmup = time.perf_counter() - t
    rows = [measure(n, folder) for n in depths]
    phases = rows[0]["phases"]
    short = {"model compile": "compile", "step trace": "trace", "step passes": "passes",
             "export legalize": "legalize", "export capture": "capture", "export onnx_translate": "translate",
             "export onnx_optimize": "optimize", "export save": "save", "ort load": "ort load"}
    print(f"\nTraining-step compile time vs depth (Llama hidden {HIDDEN}, LoRA r=8 on all linear layers, "
          f"AdamW, batch {BATCH}x{SEQ}; seconds)")
    print(f"one-time warm-up (1-layer model: imports, exporter op registry): {warmup:.1f} s\n")
    head = ["layers", "fx nodes", "onnx nodes"] + [short.get(p, p) for p in phases] + ["total", "ms/fx node"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        cells = [str(r["layers"]), str(r["fx nodes"]), str(r["onnx nodes"])]
        cells += [f"{r[p]:.2f}" for p in phases]
        cells += [f"{r['total']:.2f}", f"{1000 * r['total'] / r['fx nodes']:.2f}"]
        print(" | ".join(cells))
    print("\nWhere the time goes (share of the total, summed over depths):")
    total = sum(r["total"] for r in rows)
    for p in phases:
        print(f"  {short.get(p, p):10s} {100 * sum(r[p] for r in rows) / total:5.1f} %")
    print("\nTraining passes (seconds, per depth):")
    for name in rows[0]["passes"]:
        print(f"  {name:34s} " + "  ".join(f"{r['passes'][name]:.3f}" for r in rows))
    xs = [r["layers"] for r in rows]
    a, b, r2 = _fit(xs, [r["total"] for r in rows])
    an, bn, r2n = _fit(xs, [r["fx nodes"] for r in rows])
    print(f"\nLinear fit: total = {a:.2f} s + {b:.2f} s/layer (R^2 = {r2:.4f}); "
          f"fx nodes = {an:.0f} + {bn:.0f}/layer (R^2 = {r2n:.4f})")
    print("Static peak memory of the step (MiB): " + ", ".join(f"{r['layers']}L {r['peak MiB']:.1f}" for r in rows))
    print("onnxruntime load from its saved optimized model (s): "
          + ", ".join(f"{r['layers']}L {r['ort reload']:.2f} (first {r['ort load']:.2f})" for r in rows))
    return rows


def measure_qwen(folder: str, release_torch: bool = False, prepack: bool = True, share: bool = True,
                 pack_once: bool = True) -> dict[str, Any]:
    """Issue 10's large case: a Qwen2-0.5B-shaped model (hidden 896, 24 layers, vocab 151936,
    random weights), LoRA r=16 on q/v, batch 1x128: compile, training compile, step export and
    onnxruntime load (first and from the saved optimized model), and this process's peak RSS
    against the weight bytes. Run it in a fresh process (``--qwen``) so the peak is its own.
    ``release_torch``: drop the torch model, compiled model and step once the file is written
    (its weights are on disk then), as a compile-then-train-in-onnxruntime run can. ``prepack``
    False: ``OnnxTrainer(prepack_weights=False)`` (no packed weight copies; slower steps).
    ``share`` (unless ``release_torch``): the session reads the frozen weights from the torch
    model (``OnnxTrainer(initializers=step.onnx_initializers())``), else its own copy from the
    file. ``pack_once`` False: ``export_onnx(pack_once_min_bytes=None)`` (each weight packed
    twice: forward and input gradient)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import graphpeft as gp
    from graphpeft.backends.onnx import OnnxTrainer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    weight_mib = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values()) / 2**20
    ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    row: dict[str, Any] = {"weights MiB": weight_mib}
    peak_model = status_mb("VmHWM")
    t = time.perf_counter()
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=16, alpha=32)]), (ids,),
                    {"use_cache": False})
    row["compile"] = time.perf_counter() - t
    hwm = {"model": peak_model, "compile": status_mb("VmHWM")}  # which phase sets the peak
    t = time.perf_counter()
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), example_batch=(ids,))
    row["training compile"] = time.perf_counter() - t
    hwm["training compile"] = status_mb("VmHWM")
    row["fx nodes"] = len(step.graph_module.graph.nodes)
    path = os.path.join(folder, "qwen.onnx")
    t = time.perf_counter()
    res = step.export_onnx(path, **({} if pack_once else {"pack_once_min_bytes": None}))
    row["step export"] = time.perf_counter() - t
    row["export phases"] = res.timings
    hwm["step export"] = status_mb("VmHWM")
    shared = step.onnx_initializers() if share and not release_torch else None
    if release_torch:
        import ctypes
        import gc

        del model, cm, step
        gc.collect()
        try:  # freed tensors below glibc's (adaptive) mmap threshold stay in its arenas otherwise
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        row["RSS after release MiB"] = status_mb("VmRSS")
    t = time.perf_counter()
    row["RSS before load MiB"] = status_mb("VmRSS")
    trainer = OnnxTrainer(path, prepack_weights=prepack, initializers=shared)
    row["ort load"] = time.perf_counter() - t
    hwm["ort load"] = status_mb("VmHWM")
    t = time.perf_counter()
    row["loss ort"] = trainer.step(ids)
    row["first step"] = time.perf_counter() - t
    hwm["first step"] = status_mb("VmHWM")
    t = time.perf_counter()
    trainer.step(ids)  # onnxruntime's memory pattern (with its arena) allocates from the second step on
    row["second step"] = time.perf_counter() - t
    hwm["second step"] = status_mb("VmHWM")
    del trainer
    t = time.perf_counter()
    OnnxTrainer(path, prepack_weights=prepack, initializers=shared)
    row["ort reload"] = time.perf_counter() - t
    hwm["ort reload"] = status_mb("VmHWM")
    row["total"] = row["compile"] + row["training compile"] + row["step export"] + row["ort load"]
    row["peak RSS MiB"] = status_mb("VmHWM")
    row["peak set by"] = next(k for k, v in hwm.items() if v >= row["peak RSS MiB"])
    row["peak RSS after"] = hwm
    print(f"\nQwen2-0.5B shape ({weight_mib:.0f} MiB of weights), LoRA q/v r=16, batch 1x128, "
          f"{row['fx nodes']} fx nodes, {res.num_nodes} ONNX nodes")
    for k in ("compile", "training compile", "step export", "ort load", "total", "ort reload"):
        print(f"  {k:18s} {row[k]:7.1f} s")
    print("  export phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.timings.items()))
    print(f"  peak RSS {row['peak RSS MiB']:.0f} MiB = {row['peak RSS MiB'] / weight_mib:.2f}x the weights; "
          f"first onnxruntime loss {row['loss ort']:.4f} (step {row['first step']:.1f} s, "
          f"second {row['second step']:.1f} s)")
    print(f"  the peak is set by: {row['peak set by']}")
    print("  peak RSS after each phase (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in hwm.items())
          + f"; RSS before the load {row['RSS before load MiB']:.0f}")
    print(f"  session weights: {'from the torch model' if shared else 'its own copy from the file'}; "
          f"each weight packed {'once' if pack_once else 'twice'}")
    if release_torch:
        print(f"  torch model released before the load: RSS then {row['RSS after release MiB']:.0f} MiB")
    return row


def step_time(repeats: int = 10, layers: int = 4) -> dict[str, float]:
    """Median ms per training step on the benchmark model of DESIGN.md (4 layers, batch 4x128,
    LoRA r=8 on all linear layers, AdamW): PEFT eager, graphpeft's compiled step in torch and
    in onnxruntime, interleaved."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    import graphpeft as gp
    from graphpeft.backends.onnx import OnnxTrainer

    ids = batch()
    peft_model = get_peft_model(build_llama(layers), LoraConfig(r=8, lora_alpha=16, target_modules=LINEAR,
                                                                lora_dropout=0.0))
    peft_model.train()
    peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

    def peft_step() -> None:
        peft_opt.zero_grad()
        logits = peft_model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        peft_opt.step()

    cm = gp.compile(build_llama(layers), gp.Plan([gp.LoRA(targets=LINEAR, r=8, alpha=16)]), (ids,),
                    {"use_cache": False})
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-4), example_batch=(ids,))
    path = os.path.join(tempfile.mkdtemp(prefix="gp-step-time-"), "train.onnx")
    step.export_onnx(path)
    trainer = OnnxTrainer(path)
    contenders = {"PEFT LoRA eager (torch.optim.AdamW)": peft_step,
                  "graphpeft compiled step, torch": lambda: step(ids),
                  "graphpeft compiled step, onnxruntime": lambda: trainer.step(ids)}
    from .harness import interleave

    out = {k: st.median for k, st in interleave(contenders, warmup=2, repeats=repeats).items()}
    print(f"\nStep time, Llama hidden {HIDDEN} x {layers} layers, batch {BATCH}x{SEQ}, LoRA r=8 all linear, "
          f"AdamW (median of {repeats}, interleaved; threads {torch.get_num_threads()})")
    base = out["PEFT LoRA eager (torch.optim.AdamW)"]
    for k, v in out.items():
        print(f"  {k:40s} {v:8.1f} ms   x{v / base:.2f}")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--step-time", action="store_true", help="also time one training step three ways")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--qwen", action="store_true", help="only the Qwen2-0.5B-shaped case (fresh process)")
    parser.add_argument("--release-torch", action="store_true",
                        help="--qwen: drop the torch model and step before the onnxruntime load")
    parser.add_argument("--no-prepack", action="store_true",
                        help="--qwen: OnnxTrainer(prepack_weights=False): no packed weight copies, slower steps")
    parser.add_argument("--file-weights", action="store_true",
                        help="--qwen: the session reads its own copy of the weights from the file (no initializers=)")
    parser.add_argument("--pack-twice", action="store_true",
                        help="--qwen: export_onnx(pack_once_min_bytes=None), the form before pack_once")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    for name in ("torch", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.qwen:
        measure_qwen(tempfile.mkdtemp(prefix="gp-compile-qwen-"), release_torch=args.release_torch,
                     prepack=not args.no_prepack, share=not args.file_weights, pack_once=not args.pack_twice)
        return
    compile_table(args.layers)
    if args.step_time:
        step_time(args.repeats)


if __name__ == "__main__":
    main()
