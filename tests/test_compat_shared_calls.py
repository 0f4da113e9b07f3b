"""One adapter for a module called several times (issue 14): ALBERT applies one layer at every
depth; PEFT wraps the module once, so its adapter is used at each call. graphpeft puts a LoRA
branch at every call reading the same A and B. ``peft`` is the oracle."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn

import graphpeft as gp

aten = torch.ops.aten


class Twice(nn.Module):
    """The same Linear applied twice (and another once)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.shared(torch.tanh(self.shared(x))))


def _peft(model, cm, targets, **kw):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=targets, **kw))
    res = set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
    assert not res.unexpected_keys
    return pm.eval()


def test_layer_called_twice_is_one_layer_with_two_calls():
    model, x = Twice().eval(), torch.randn(3, 8)
    layers = gp.find_layers(gp.trace(model, (x,)).gm)
    shared = [l for l in layers if l.path == "shared"]
    assert len(shared) == 2 and all(len(l.calls) == 2 and l.tied_to == [] for l in shared)
    assert [l for l in layers if l.path == "out"][0].calls == []


def test_one_adapter_at_every_call_matches_peft():
    from graphpeft.backends.onnx import OnnxRunner

    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(3, 8)
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["shared", "out"], r=2, alpha=4, init="random")]), (x,))
    assert sorted(cm.adapters()) == ["out", "shared"]
    rec = cm.adapters()["shared"]
    assert len(rec["joins"]) == 2 and rec["join"] == rec["joins"][0]
    assert sorted(cm.trainable_parameters()) == ["out.lora_A.weight", "out.lora_B.weight", "shared.lora_A.weight",
                                                 "shared.lora_B.weight"]
    ops = [n.target for n in cm.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(aten.linear.default) == 3 + 2 * 3  # 3 base calls, a 2-linear branch at each
    pm = _peft(model, cm, ["shared", "out"])
    with torch.no_grad():
        assert (cm(x) - pm(x)).abs().max().item() == 0.0
        merged = cm.merge()
        assert (merged(x) - pm(x)).abs().max().item() < 1e-5
        assert [n.target for n in merged.graph_module.graph.nodes if n.op == "call_function"] == \
            [n.target for n in gp.trace(model, (x,)).gm.graph.nodes if n.op == "call_function"]
        with tempfile.TemporaryDirectory() as d:
            cm.export_onnx(os.path.join(d, "u.onnx"), merged=False)
            ort = OnnxRunner(os.path.join(d, "u.onnx")).run(cm.flat_inputs(x))[0]
            assert abs(ort - pm(x).numpy()).max() < 1e-5
    # trains: one gradient for the shared adapter, summed over its calls
    before = cm.trainable_parameters()["shared.lora_A.weight"].detach().clone()
    cm.compile_training("mse", gp.optim.SGD(lr=0.1))(x, torch.randn(3, 3))
    assert not torch.equal(before, cm.trainable_parameters()["shared.lora_A.weight"])


def test_named_adapters_and_fusing_on_shared_calls():
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(3, 8)
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["shared"], r=2, init="random")]), (x,))
    cm.add_adapter("b", gp.Plan([gp.LoRA(targets=["shared"], r=2, init="random")]), seed=1)
    with torch.no_grad():
        out_a = cm(x)
        cm.set_adapter("b")
        out_b = cm(x)
        assert (out_a - out_b).abs().max() > 1e-3
        cm.set_adapter("default")
        assert torch.equal(cm(x), out_a)
        cm.fuse_adapter("default")
        assert (cm(x) - out_a).abs().max().item() < 1e-5


def test_other_methods_refuse_with_a_reason():
    model, x = Twice().eval(), torch.randn(3, 8)
    with pytest.raises(gp.PlanError, match=r"called 2 times \(shared layers, as in ALBERT\); only LoRA"):
        gp.compile(model, gp.Plan([gp.IA3(targets=["shared"])]), (x,))


def test_tiny_albert_matches_peft():
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                          intermediate_size=24, max_position_embeddings=16)
    model, ids = AlbertModel(config).eval(), torch.randint(0, 50, (2, 5))
    targets = ["query", "value", "ffn"]
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=targets, r=2, alpha=4, init="random")]), (ids,))
    assert len(cm.adapters()) == 3 and all(len(r["joins"]) == 3 for r in cm.adapters().values())
    pm = _peft(model, cm, targets)
    with torch.no_grad():
        want = pm(ids).last_hidden_state
        got = cm(ids)
        got = got["last_hidden_state"] if isinstance(got, dict) else got[0]
        assert (got - want).abs().max().item() < 1e-5
        merged = cm.merge()(ids)
        merged = merged["last_hidden_state"] if isinstance(merged, dict) else merged[0]
        assert (merged - want).abs().max().item() < 1e-5
