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
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS,))
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
    # one bf16 rounding (2^-8 relative): torch's fused CPU attention rounds inside the op, the
    # ONNX graph computes it in float32 and rounds once
    assert err <= 1e-2, err
