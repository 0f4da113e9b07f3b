"""Quantized bases in onnxruntime (issue 12): the exported training step keeps the backward's
second dequantization (export CSE and onnxruntime's CSE do not merge it into the forward's),
onnxruntime does not fold packed weights back to float, and int4 linear layers export as
``com.microsoft.MatMulNBits`` for inference."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

import graphpeft as gp
from graphpeft.backends.onnx import OnnxRunner, OnnxTrainer

from method_helpers import IDS, MODELS, compile_model

KW = MODELS["llama"][1]
#: the tiny Llama's linear layers that "all-linear" selects (2 blocks x 7)
N_LINEAR = 14
aten = torch.ops.aten


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _compiled(group_size: int = 16) -> gp.CompiledModel:
    return compile_model("llama", [gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random"),
                                   gp.Quantize(targets="all-linear", dtype="int4", group_size=group_size)])


def _ops(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def _float_initializer_bytes(model) -> int:
    from onnx import TensorProto, numpy_helper

    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer if i.data_type == TensorProto.FLOAT)


@pytest.fixture(scope="module")
def int4_step(tmp_path_factory):
    cm = _compiled()
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.05), example_batch=(IDS,))
    folder = tmp_path_factory.mktemp("qort")
    paths = {form: str(folder / f"{form}.onnx") for form in ("packed", "qdq")}
    for form, path in paths.items():
        step.export_onnx(path, quantized_weights=form)
    return cm, step, paths


def _unpacks(step) -> int:
    """The dequantizations of the torch step graph (one floor-divide per int4 unpacking)."""
    return sum(n.target is aten.div.Tensor_mode for n in step.graph_module.graph.nodes)


def test_export_keeps_the_backward_dequantization(int4_step) -> None:
    import onnx

    _, step, paths = int4_step
    chains = _unpacks(step)
    remat = sum(1 for n in step.graph_module.graph.nodes if (n.meta.get("graphpeft") or {}).get("remat")
                and n.target is aten.div.Tensor_mode)
    assert remat > 0 and chains > N_LINEAR  # forward and recomputed backward copies
    # the export's CSE merged the backward copy into the forward's (fewer Floors) before; each
    # int4 unpacking has two (the floor division by [16, 1], and the remainder by 16)
    assert _ops(onnx.load(paths["packed"]))["Floor"] == 2 * chains
    assert _ops(onnx.load(paths["qdq"]))["DequantizeLinear"] == chains


def test_onnxruntime_keeps_packed_weights_packed(int4_step, tmp_path) -> None:
    """onnxruntime's constant folding would expand each packed weight into a float initializer
    (measured: all of them, twice); sessions of packed graphs run without it."""
    import onnx
    import onnxruntime as ort

    _, _, paths = int4_step
    float_bytes = {}
    for skip, name in (([], "default"), (None, "graphpeft")):
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        OnnxTrainer(paths["packed"], session_options=opts, disabled_optimizers=skip)
        optimized = onnx.load(opts.optimized_model_filepath)
        float_bytes[name] = _float_initializer_bytes(optimized)
        if name == "graphpeft":
            assert _ops(optimized).get("Floor", 0) == _ops(onnx.load(paths["packed"]))["Floor"]
    assert float_bytes["graphpeft"] < float_bytes["default"] / 2, float_bytes


def test_training_steps_match_torch_without_the_merges(int4_step, parity) -> None:
    cm, step, paths = int4_step
    before = {k: v.clone() for k, v in cm.adapter_state_dict().items()}
    trainers = {form: OnnxTrainer(path) for form, path in paths.items()}
    ours = [float(step(IDS)) for _ in range(2)]
    for form, trainer in trainers.items():
        theirs = [float(trainer.step(IDS)) for _ in range(2)]
        err = parity.record(f"quantize int4 {form} train onnxruntime, no CSE/folding (loss, rel)",
                            max(abs(a - b) / abs(a) for a, b in zip(ours, theirs)))
        assert err <= 1e-3, (form, ours, theirs)
    cm.load_adapter_state_dict(before)


def test_matmul_nbits_inference_export(tmp_path, parity) -> None:
    import onnx

    cm = _compiled()
    nbits, qdq = tmp_path / "nbits.onnx", tmp_path / "qdq.onnx"
    cm.export_onnx(nbits, merged=False, quantized_weights="matmulnbits")
    cm.export_onnx(qdq, merged=False, quantized_weights="qdq")
    model = onnx.load(nbits)
    ops = _ops(model)
    assert ops.get("MatMulNBits") == N_LINEAR and "DequantizeLinear" not in ops
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and attrs["bits"] == 4 and attrs["block_size"] == 16
    inits = {i.name: i for i in model.graph.initializer}
    assert list(inits[node.input[1]].dims) == [attrs["N"], attrs["K"] // 16, 8]  # (N, blocks, block/2) bytes
    assert not [n for n in inits if n.endswith("_qdata")]
    assert os.path.getsize(nbits) < os.path.getsize(qdq)
    with torch.no_grad():
        expected = cm(IDS, **KW).logits
    got = torch.as_tensor(OnnxRunner(nbits).run(cm.flat_inputs(IDS, **KW))[0])
    assert parity.record("quantize int4 MatMulNBits onnxruntime (rel)", rel(got, expected)) <= 1e-3


def test_matmul_nbits_packing_matches_dequantization() -> None:
    """The codes and zero points MatMulNBits reads (low nibble first) give back our weight."""
    import onnx_ir as ir

    from graphpeft.backends.onnx.qdq import _nbits_initializers
    from graphpeft.passes.quantize.formats import EagerOps, dequantize, quantize

    torch.manual_seed(0)
    w = torch.randn(6, 96)  # 3 blocks of 32: an odd block count pads the zero points
    t = quantize(w, "int4", 32)
    rec = {"weight": "w", "shape": [6, 96], "group_size": 32, "dtype": "int4"}
    b, scale, zp = (v.const_value.numpy() for v in _nbits_initializers(ir.Graph([], [], nodes=[]), rec, t))
    codes = np.stack([b & 15, b >> 4], -1).reshape(6, 3, 32).astype(np.float32)
    zeros = np.stack([zp & 15, zp >> 4], -1).reshape(6, -1)[:, :3].astype(np.float32)
    got = (codes - zeros[..., None]) * scale.reshape(6, 3, 1)
    want = dequantize(EagerOps(), t, "int4", (6, 96), 32, torch.float32)
    assert np.array_equal(got.reshape(6, 96), want.numpy())


def test_matmul_nbits_falls_back_with_a_reason(tmp_path, caplog) -> None:
    import onnx

    cm = _compiled(group_size=8)  # MatMulNBits blocks are powers of two >= 16
    path = tmp_path / "m.onnx"
    with caplog.at_level(logging.INFO, logger="graphpeft.backends.onnx.qdq"):
        cm.export_onnx(path, merged=False, quantized_weights="matmulnbits")
    assert "power of two >= 16" in caplog.text
    assert _ops(onnx.load(path)).get("DequantizeLinear") == N_LINEAR
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.05), example_batch=(IDS,))
    with pytest.raises(gp.ExportError, match="inference"):
        step.export_onnx(tmp_path / "t.onnx", quantized_weights="matmulnbits")
