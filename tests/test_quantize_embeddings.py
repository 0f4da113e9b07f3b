"""gp.Quantize on embeddings and output heads (issue 12): quantized rows gathered then dequantized,
a big head dequantized a row block at a time, tied embeddings (Qwen2's embed_tokens / lm_head)
quantized once for both layers, on a real compile and on a meta compile loaded from safetensors."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import get_tensor
from graphpeft.passes.quantize import quantize_weights as qw

aten = torch.ops.aten
CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
KW = dict(example_inputs=(IDS,), example_kwargs={"use_cache": False})
TIED = "model.embed_tokens.weight"


def qwen(meta: bool = False) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = Qwen2ForCausalLM(Qwen2Config(**CFG)).eval()
        model.tie_weights()
        return model
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**CFG)).eval()


def rules(dtype: str = "int8") -> list[gp.Rule]:
    return [gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random"),
            gp.Quantize(targets="all-linear", dtype="int4", group_size=16),
            gp.Quantize(targets=["embed_tokens", "lm_head"], dtype=dtype, group_size=16)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """The tiny head (128 x 32 float32 = 16 KiB) read in 3 row blocks."""
    monkeypatch.setattr(qw, "CHUNK_BYTES", 6 * 1024)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def reference(cm: gp.CompiledModel) -> gp.CompiledModel:
    """The same model compiled without quantization, its weights replaced by the dequantized ones."""
    ref = gp.compile(qwen(), [r for r in cm.plan.rules if r.key != "quantize"], **KW)
    params = dict(ref.graph_module.named_parameters())
    with torch.no_grad():
        for name in qw.quantized(cm.graph_module):
            params[name].copy_(qw.dequantized_weight(cm.graph_module, name))
        for name, t in cm.trainable_parameters().items():
            params[name].copy_(t)
    return ref


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_tied_embedding_gathers_quantized_rows(dtype: str, tmp_path, parity) -> None:
    cm = gp.compile(qwen(), rules(dtype), **KW)
    gm = cm.graph_module
    rec = qw.quantized(gm)[TIED]
    assert rec["layers"] == ["model.embed_tokens", "lm_head"] and not rec["outputs"]
    assert [(f["form"], f["chunks"]) for f in rec["fused"]] == [("gather", 1), ("chunks", 3)]
    # structure: rows gathered from the stored codes; the float table never exists whole
    qdata = rec["tensors"]["qdata"]
    gathers = [n for n in gm.graph.nodes if n.target is aten.index_select.default]
    assert any(n.args[0].op == "get_attr" and n.args[0].target == qdata for n in gathers)
    assert not any(n.target is aten.embedding.default for n in gm.graph.nodes)
    whole = [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and n.op == "call_function"
             and n.meta["val"].is_floating_point() and n.meta["val"].numel() >= 128 * 32]
    assert not whole, whole
    assert get_tensor(gm, qdata).dtype == (torch.int8 if dtype == "int8" else torch.uint8)
    # numerics: the dequantize-then-float reference, exactly; the ONNX export in onnxruntime
    ref = reference(cm)
    with torch.no_grad():
        got, want = cm(IDS).logits, ref(IDS).logits
    assert rel(got, want) <= 1e-6
    if dtype == "int4":
        return  # the ONNX export and the training step take the same paths as int8
    from graphpeft.backends.onnx import OnnxRunner

    cm.export_onnx(tmp_path / "m.onnx", merged=False)
    ort = torch.as_tensor(OnnxRunner(tmp_path / "m.onnx").run(cm.flat_inputs(IDS))[0])
    assert parity.record(f"quantize tied embedding {dtype} onnxruntime (rel)", rel(ort, got)) <= 1e-3
    # training: the loss of the float reference; the adapters move, the base does not
    before = get_tensor(gm, qdata).clone()
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS, IDS))
    expected = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))
    a = float(step(IDS, IDS))
    assert abs(a - float(expected)) <= 1e-5 * float(expected), (a, float(expected))
    assert float(step(IDS, IDS)) < a and torch.equal(get_tensor(gm, qdata), before)


def test_quantizing_half_a_tied_pair_is_declined() -> None:
    cm = gp.compile(qwen(), [gp.Quantize(targets=["embed_tokens"], dtype="int8", group_size=16)], **KW)
    assert not qw.quantized(cm.graph_module)
    assert "lm_head" in cm.explain() and "tied" in cm.explain()


def test_nf4_embedding_dequantizes_the_whole_table() -> None:
    cm = gp.compile(qwen(), [gp.Quantize(targets=["embed_tokens", "lm_head"], dtype="nf4", group_size=16)], **KW)
    rec = qw.quantized(cm.graph_module)[TIED]
    assert rec["outputs"] and not rec["fused"]  # nf4's scalers are blocked across rows
    with torch.no_grad():
        assert rel(cm(IDS).logits, reference(cm)(IDS).logits) <= 1e-6


def test_meta_compile_loads_into_the_tied_quantized_embedding(tmp_path) -> None:
    real = qwen()
    real.save_pretrained(tmp_path)
    cm = gp.compile(qwen(meta=True), rules(), **KW)
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS, IDS))
    assert step.memory_report().peak_bytes > 0
    report = step.load_base_weights(tmp_path)
    assert report.converted[TIED] == "int8" and not report.still_meta
    # the same numbers as a compile from the real weights (adapters initialized alike)
    ref = gp.compile(real, rules(), **KW)
    with torch.no_grad():
        assert torch.equal(cm(IDS).logits, ref(IDS).logits)
    assert float(step(IDS, IDS)) > 0


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_head_fuses_with_the_loss_in_row_blocks(dtype: str) -> None:
    """A row-block (quantized) head and the causal-LM loss run as one op blocked over the vocabulary:
    no tokens x vocab logits in the step; same loss and updates as the unfused step. (int4's
    dequantization starts from a constant ``arange``: the block copies take it along.)"""
    fused = gp.compile(qwen(), rules(dtype), **KW)
    plain = gp.compile(qwen(), rules(dtype), **KW)
    a = fused.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS, IDS))
    b = plain.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS, IDS), fuse_head_loss=False)
    gm = a.graph_module
    qdata = qw.quantized(fused.graph_module)[TIED]["tensors"]["qdata"]
    # structure: each of the 3 row blocks dequantized twice (the second sweep is not merged by CSE)
    slices = [n for n in gm.graph.nodes if n.target is aten.slice.Tensor and n.args[0].op == "get_attr"
              and n.args[0].target == qdata]
    assert len(slices) == 6, len(slices)
    tokens = IDS.numel()
    big = [n.name for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
           and n.meta["val"].is_floating_point() and n.meta["val"].numel() >= tokens * 128]
    assert not big, big
    assert a.memory_report().peak_bytes < b.memory_report().peak_bytes
    # numerics: the unfused step's losses and updates
    for _ in range(3):
        la, lb = float(a(IDS, IDS)), float(b(IDS, IDS))
        assert abs(la - lb) <= 1e-6 * lb, (la, lb)
    pa, pb = fused.trainable_parameters(), plain.trainable_parameters()
    assert max(rel(pa[k], pb[k]) for k in pa) <= 1e-6


def test_quantized_head_fused_loss_trains_in_onnxruntime(tmp_path) -> None:
    from method_helpers import check_step_in_onnxruntime

    cm = gp.compile(qwen(), rules(), **KW)
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS,))
    check_step_in_onnxruntime(cm, step, IDS, tmp_path)
