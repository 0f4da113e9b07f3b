"""bfloat16 models in onnxruntime (issue 12): a bf16 model's LoRA training step exported to ONNX
trains in ``OnnxTrainer`` (no numpy round trip: bf16 values are bound as onnxruntime values), its
inference graph runs in ``OnnxRunner``, also on an int8-quantized bf16 base. onnxruntime's CPU
provider has no bf16 kernels: the export computes each bf16 op in float32 between casts
(``upcast_low_precision``), rounding where torch rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import graphpeft as gp
from graphpeft.backends.onnx import OnnxRunner, OnnxTrainer
from graphpeft.passes.quantize.quantize_weights import quantized

from method_helpers import IDS, MODELS, compile_model
from models import tiny_llama


def bf16_llama() -> torch.nn.Module:
    return tiny_llama().to(torch.bfloat16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("quantize", [False, True], ids=["bf16", "bf16-int8"])
def test_bf16_training_step_in_onnxruntime(quantize: bool, tmp_path, parity) -> None:
    rules = [gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random")]
    if quantize:
        rules.append(gp.Quantize(targets="all-linear", dtype="int8", group_size=16))
    cm = compile_model("llama", rules, make=bf16_llama)
    assert all(p.dtype == torch.bfloat16 for p in cm.trainable_parameters().values())
    assert bool(quantized(cm.graph_module)) == quantize
    # executor="fx": the stored graph, which is what the export holds (the default torch runner
    # computes silu with ATen's kernel, one bf16 rounding instead of one per op: tests/test_silu_kernels.py)
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS,), executor="fx")
    path = tmp_path / "train.onnx"
    step.export_onnx(path)
    trainer = OnnxTrainer(path)
    torch_losses = [float(step(IDS)) for _ in range(3)]
    ort_losses = [float(trainer.step(IDS)) for _ in range(3)]
    name = "bf16" + (" int8" if quantize else "")
    loss_rel = parity.record(f"{name} lora train onnxruntime vs torch (loss, rel)",
                             max(abs(a - b) / abs(b) for a, b in zip(ort_losses, torch_losses)))
    assert loss_rel <= 1e-3, (torch_losses, ort_losses)
    ours, theirs = cm.adapter_state_dict(), trainer.adapter_state_dict()
    assert all(t.dtype == torch.bfloat16 for t in theirs.values())
    # parameters: equal up to a last-bit difference of a bf16 gradient on a few entries (float32
    # sums in another order round to the other neighbour), i.e. within 1% of each tensor's scale
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max() / ours[k].float().abs().max()) for k in ours)
    same = sum(int(torch.equal(ours[k], theirs[k])) for k in ours)
    parity.record(f"{name} lora train onnxruntime vs torch (params, rel to max)", worst)
    assert worst <= 1e-2 and same >= len(ours) - 2, (worst, same, len(ours))
    # relative to the parameters' norm (issue 12's measure): the few one-ulp entries are far below 1e-3
    flat = lambda sd: torch.cat([sd[k].float().flatten() for k in sorted(sd)])  # noqa: E731
    norm_rel = parity.record(f"{name} lora train onnxruntime vs torch (params, rel)", rel(flat(theirs), flat(ours)))
    assert norm_rel <= 1e-3, norm_rel


def test_bf16_inference_in_onnxruntime(tmp_path, parity) -> None:
    cm = compile_model("llama", [gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random"),
                                 gp.Quantize(targets=["down_proj"], dtype="nf4", group_size=16)], make=bf16_llama)
    path = tmp_path / "model.onnx"
    cm.export_onnx(path, merged=False)
    with torch.no_grad():
        expected = cm(IDS, **MODELS["llama"][1]).logits
    got = OnnxRunner(path).run(cm.flat_inputs(IDS, **MODELS["llama"][1]))[0]
    assert got.dtype.name == "bfloat16"
    err = parity.record("bf16 nf4 lora inference onnxruntime vs torch (rel)",
                        rel(torch.from_numpy(got.astype(np.float32)), expected.float()))
    # torch's fused CPU attention rounds inside the op; low_precision_attention writes it out with
    # the same roundings (without it: 4.4e-3, one bf16 rounding)
    assert err <= 1e-3, err


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_low_precision_attention_rounds_where_torch_rounds(mask: str) -> None:
    """The rewritten bf16 attention, run in torch, equals torch's fused CPU kernel bit for bit on 8
    keys (fewer than a vector: the kernel's exponentials are std::exp) and stays within 1e-3 on 64
    (the kernel's vectorized exp_u20 is an approximation), where the plain upcast is off by a
    bf16 rounding; is_causal calls are declined with the reason."""
    import torch.nn.functional as F

    from graphpeft.infra import PassContext
    from graphpeft.registry import PASSES

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m), F.scaled_dot_product_attention(q, k, v,
                                                                                                         is_causal=True)

    def inputs(n: int):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 4, n, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
        m = torch.ones(n, n, dtype=torch.bool).tril()
        return q, k, v, (m if mask == "bool" else torch.zeros(n, n).masked_fill(~m, float("-inf")).to(torch.bfloat16))

    gm = torch.export.export(Attn(), inputs(8), dynamic_shapes=({2: torch.export.Dim.AUTO},) * 3 +
                             ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)).module()
    p = PASSES["low_precision_attention"]()
    p(gm, PassContext(verify=False))
    assert p.match_count() == 1
    assert any("is_causal" in r.reason for r in p.results if not r.ok)
    for n in (8, 64):
        q, k, v, m = inputs(n)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        got = gm(q, k, v, m)[0]
        plain = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m if mask == "bool"
                                               else m.float()).to(torch.bfloat16)
        if n == 8:
            assert torch.equal(got, want) and not torch.equal(plain, want)
        else:
            assert rel(got, want) <= 1e-3 and rel(got, want) < rel(plain, want) / 2, (rel(got, want), rel(plain, want))
