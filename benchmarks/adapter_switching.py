"""Rapid adapter switching in fused mode: SHiRA's scatter against LoRA's unmerge/merge.

    python -m benchmarks.adapter_switching            # Llama hidden 512, 4 layers, r=16
    python -m benchmarks.adapter_switching --quick    # hidden 256, fewer repeats

One switch moves a model from adapter "a" fused into its weights to adapter "b" fused, on every
linear layer of every block: LoRA subtracts ``s·B_a A_a`` and adds ``s·B_b A_b`` (one GEMM per
layer each way, ``CompiledModel.fuse_adapter``), SHiRA scatters ``-v_a`` at its indices and
``+v_b`` at its own (``index_put_`` of ``r·(in + out)`` values). Both adapters have the same
parameter budget (SHiRA's ``r`` sizes it like a rank-``r`` LoRA). Contenders run interleaved
(A B A B ...), medians reported; PEFT's own merge/unmerge is timed beside them when installed,
and the unfused switch (``set_adapter``: the graph re-derived, no weights touched) for context.

Before timing, every fused model is checked against the same adapter run unfused. Writes
``benchmarks/results/adapter_switching.json`` (atomically) and prints a table and the ratio.
The SHiRA paper reports 5-16x faster loading than LoRA fusion on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch

from .harness import interleave

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_llama(hidden: int, layers: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _randomize(cm: Any, name: str, seed: int) -> None:
    # move the adapter off its identity init so fusing really changes the weights
    gen = torch.Generator().manual_seed(seed)
    state = cm.adapter_state_dict(name)
    cm.load_adapter_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in state.items()},
                               adapter_name=name)


def two_adapter_model(rule: Callable[..., Any], model: torch.nn.Module, ids: torch.Tensor, r: int) -> Any:
    """A compiled model with adapters "a" and "b" of one method on every linear layer."""
    import graphpeft as gp

    cm = gp.compile(model, [rule(targets=TARGETS, r=r)], (ids,), {"use_cache": False}, seed=1)
    cm.delete_adapter("default")
    for i, name in enumerate(("a", "b")):
        cm.add_adapter(name, [rule(targets=TARGETS, r=r)], seed=10 + i)
        _randomize(cm, name, 100 + i)
    return cm.eval()


def _logits(cm: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cm(ids, use_cache=False).logits


def check_fused(cm: Any, ids: torch.Tensor) -> float:
    """Largest difference between each adapter fused and the same adapter unfused."""
    worst = 0.0
    for name in ("a", "b"):
        cm.unfuse_adapter()
        cm.set_adapter(name)
        ref = _logits(cm, ids)
        cm.set_adapter([])
        cm.fuse_adapter(name)
        worst = max(worst, float((_logits(cm, ids) - ref).abs().max()))
    return worst


def switcher(cm: Any) -> Callable[[], None]:
    """One call = one switch of the fused adapter (a -> b, then b -> a ...)."""
    state = {"next": "b" if cm.fused_adapter == "a" else "a"}

    def step() -> None:
        cm.fuse_adapter(state["next"])  # unfuses the current one first
        state["next"] = "a" if state["next"] == "b" else "b"

    return step


def peft_switcher(config_cls: Any, model: torch.nn.Module, r: int, **config: Any) -> Callable[[], None]:
    """PEFT's way: unmerge the merged adapter, select the other, merge it."""
    from peft import get_peft_model

    pm = get_peft_model(model, config_cls(r=r, target_modules=TARGETS, **config), adapter_name="a")
    pm.add_adapter("b", config_cls(r=r, target_modules=TARGETS, **config))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".a." in n or ".b." in n or n.endswith((".a", ".b")):
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    tuner = pm.base_model
    tuner.set_adapter("a")
    tuner.merge_adapter()
    state = {"next": "b"}

    def step() -> None:
        with torch.no_grad():
            tuner.unmerge_adapter()
            tuner.set_adapter(state["next"])
            tuner.merge_adapter()
        state["next"] = "a" if state["next"] == "b" else "b"

    return step


def unfused_switcher(cm: Any) -> Callable[[], None]:
    state = {"next": "b"}

    def step() -> None:
        cm.set_adapter(state["next"])
        state["next"] = "a" if state["next"] == "b" else "b"

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="hidden 256, 10 repeats")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's merge/unmerge contenders")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default). On a loaded machine 1 gives stable "
                             "figures: a parallel GEMM then waits for a second core to be scheduled")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "adapter_switching.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.repeats = 256, 10
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    import graphpeft as gp

    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    shira = two_adapter_model(gp.SHiRA, build_llama(args.hidden, args.layers), ids, args.r)
    lora = two_adapter_model(gp.LoRA, build_llama(args.hidden, args.layers), ids, args.r)
    checks = {"shira": check_fused(shira, ids), "lora": check_fused(lora, ids)}
    contenders: dict[str, Callable[[], None]] = {"shira_scatter": switcher(shira), "lora_unmerge_merge": switcher(lora)}
    skipped: dict[str, str] = {}
    if not args.no_peft:
        try:
            from peft import LoraConfig, ShiraConfig

            contenders["peft_lora_unmerge_merge"] = peft_switcher(LoraConfig, build_llama(args.hidden, args.layers),
                                                                  args.r, lora_alpha=args.r)
            contenders["peft_shira_unmerge_merge"] = peft_switcher(ShiraConfig, build_llama(args.hidden, args.layers),
                                                                   args.r)
        except Exception as e:  # noqa: BLE001 - PEFT is an optional reference
            skipped["peft"] = f"{type(e).__name__}: {e}"
    unfused = two_adapter_model(gp.LoRA, build_llama(args.hidden, args.layers), ids, args.r)
    unfused.set_adapter("a")
    contenders["unfused_set_adapter"] = unfused_switcher(unfused)
    setup_s = time.perf_counter() - t0
    stats = interleave(contenders, warmup=3, repeats=args.repeats)
    ratio = stats["lora_unmerge_merge"].median / stats["shira_scatter"].median
    n_layers = args.layers * len(TARGETS)
    nnz = sum(int(t.numel()) for k, t in shira.adapter_state_dict("a").items())
    result = {
        "benchmark": "adapter_switching",
        "model": f"llama hidden {args.hidden}, {args.layers} layers, {n_layers} adapted linear layers",
        "r": args.r,
        "adapter_params": {"shira": nnz, "lora": sum(int(t.numel()) for t in lora.adapter_state_dict("a").values())},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "repeats": args.repeats,
        "median_ms": {k: round(v.median, 4) for k, v in stats.items()},
        "iqr_ms": {k: [round(v.p25, 4), round(v.p75, 4)] for k, v in stats.items()},
        "ratio_lora_over_shira": round(ratio, 2),
        "fused_vs_unfused_max_abs_diff": checks,
        "skipped": skipped,
        "setup_s": round(setup_s, 1),
    }
    _write_json(args.out, result)
    print(f"{result['model']}, r={args.r}, {args.repeats} interleaved switches each (medians, ms)")
    for k, v in stats.items():
        print(f"  {k:28s} {v.median:9.3f}   [{v.p25:.3f} .. {v.p75:.3f}]")
    print(f"LoRA unmerge/merge over SHiRA scatter: {ratio:.1f}x   (fused == unfused to {max(checks.values()):.1e})")
    if skipped:
        print(f"skipped: {skipped}")
    return result


def _write_json(path: str, data: dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".adapter_switching.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1:])
