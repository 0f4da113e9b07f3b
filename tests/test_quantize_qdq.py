"""Quantized weights exported as standard ONNX ``DequantizeLinear`` nodes (issue 12 item 4):
``export_onnx(..., quantized_weights="qdq")`` for inference and training steps, run by
onnxruntime against the torch graph, and what keeps the packed form (nf4) with its reason."""

from __future__ import annotations

import os

import pytest
import torch

import graphpeft as gp
from graphpeft.backends.onnx import OnnxRunner, OnnxTrainer

from method_helpers import IDS, MODELS, compile_model

KW = MODELS["llama"][1]
#: the tiny Llama's linear layers that "all-linear" selects (2 blocks x 7)
N_LINEAR = 14


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _compiled(dtype: str) -> gp.CompiledModel:
    return compile_model("llama", [gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random"),
                                   gp.Quantize(targets="all-linear", dtype=dtype, group_size=16)])


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_inference_export_with_dequantize_linear(dtype: str, tmp_path, parity) -> None:
    import onnx

    cm = _compiled(dtype)
    packed, qdq = tmp_path / "packed.onnx", tmp_path / "qdq.onnx"
    cm.export_onnx(qdq, merged=False, quantized_weights="qdq")
    model = onnx.load(qdq)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == N_LINEAR
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dq[0].attribute} == {"axis": 1, "block_size": 16}
    assert next(o.version for o in model.opset_import if o.domain == "") >= 21
    inits = {i.name: i for i in model.graph.initializer}
    code = onnx.TensorProto.INT8 if dtype == "int8" else onnx.TensorProto.UINT4
    assert inits[dq[0].input[0]].data_type == code
    assert not [n for n in inits if n.endswith("_qdata")]  # the packed form is gone
    if dtype == "int4":  # 4-bit zero points instead of bytes; no unpacking ops
        cm.export_onnx(packed, merged=False)
        assert os.path.getsize(qdq) < os.path.getsize(packed)
    with torch.no_grad():
        expected = cm(IDS, **KW).logits
    got = torch.as_tensor(OnnxRunner(qdq).run(cm.flat_inputs(IDS, **KW))[0])
    assert parity.record(f"quantize {dtype} DequantizeLinear onnxruntime (rel)", rel(got, expected)) <= 1e-3


def test_training_step_export_with_dequantize_linear(tmp_path, parity) -> None:
    import onnx

    cm = _compiled("int4")
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.05), example_batch=(IDS,))
    path = tmp_path / "train.onnx"
    step.export_onnx(path, quantized_weights="qdq")
    assert sum(n.op_type == "DequantizeLinear" for n in onnx.load(path).graph.node) >= N_LINEAR
    trainer = OnnxTrainer(path)
    ours = [float(step(IDS)) for _ in range(3)]
    theirs = [float(trainer.step(IDS)) for _ in range(3)]
    err = parity.record("quantize int4 DequantizeLinear train onnxruntime (loss, rel)",
                        max(abs(a - b) / abs(a) for a, b in zip(ours, theirs)))
    assert err <= 1e-3, (ours, theirs)
    a, b = cm.adapter_state_dict(), trainer.adapter_state_dict()
    assert max(rel(b[k], a[k]) for k in a) <= 1e-3


def test_formats_without_a_standard_form_stay_packed(tmp_path, caplog) -> None:
    import logging

    cm = _compiled("nf4")
    path = tmp_path / "m.onnx"
    with caplog.at_level(logging.INFO, logger="graphpeft.backends.onnx.qdq"):
        cm.export_onnx(path, merged=False, quantized_weights="qdq")
    assert "nf4 has no standard ONNX form" in caplog.text
    with torch.no_grad():
        expected = cm(IDS, **KW).logits
    assert rel(torch.as_tensor(OnnxRunner(path).run(cm.flat_inputs(IDS, **KW))[0]), expected) <= 1e-3
    with pytest.raises(gp.ExportError, match="quantized_weights"):
        cm.export_onnx(tmp_path / "x.onnx", merged=False, quantized_weights="int4")
