"""LoRA-FA: structure and roles (A frozen), match count, parity with a plain PyTorch reference
of the formula and with peft's LoRA (LoRA-FA is LoRA with A frozen), A gets no gradient, exact
merge, ONNX export, and a verified training step (B only) run by torch and, exported, by
onnxruntime."""

from __future__ import annotations

import math

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import find_layers, get_tensor

from method_helpers import (QVD, assert_loss_falls, check_merge, check_onnx_merged_and_unmerged, check_structure,
                            check_training_export, compiled_fixture, created_ops, llama_paths, lm_loss, peft_model, run)
from models import tiny_gpt2, tiny_llama

LLAMA = dict(targets=["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
GPT2 = dict(targets=["c_attn"], r=4, alpha=8)


class ReferenceLoRAFA(torch.nn.Module):
    """The formula, written out: ``base(x) + (alpha / r) · (x Aᵀ) Bᵀ``."""

    def __init__(self, base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base, self.a, self.b, self.scaling = base, a, b, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.a.T) @ self.b.T


def _reference(make, cm) -> torch.nn.Module:
    model = make()
    for path, rec in cm.adapters().items():
        a = get_tensor(cm.graph_module, rec["tensors"]["A"]).detach()
        b = get_tensor(cm.graph_module, rec["tensors"]["B"]).detach()
        model.set_submodule(path, ReferenceLoRAFA(model.get_submodule(path), a, b, rec["scaling"]))
    return model.eval()


def _constants(cm) -> dict:
    # A is adapter-const (regenerated from the seed, not in adapter_state_dict): give it to peft
    return {f"base_model.model.{rec['tensors']['A']}": get_tensor(cm.graph_module, rec["tensors"]["A"])
            for rec in cm.adapters().values()}


llama = compiled_fixture("llama", [gp.LoRAFA(**LLAMA, init="random")])
gpt2 = compiled_fixture("gpt2", [gp.LoRAFA(**GPT2, init="random")])


def test_structure_roles_and_match_count(llama):
    check_structure(llama, llama_paths(*QVD), "insert_lora_fa", "lora_fa[q_proj,v_proj,down_proj]")
    roles = llama.roles()
    for path, rec in llama.adapters().items():
        assert created_ops(llama, path) == ["linear", "linear", "mul", "add"]
        assert rec["tensors"] == {"A": f"{path}.lora_A.weight", "B": f"{path}.lora_B.weight"}
        assert roles[rec["tensors"]["A"]] == gp.Role.ADAPTER_CONST
        assert roles[rec["tensors"]["B"]] == gp.Role.ADAPTER
        assert not get_tensor(llama.graph_module, rec["tensors"]["A"]).requires_grad
    # only B trains: q 32x4, v 16x4, down 32x4 per layer
    assert llama.num_parameters(trainable_only=True) == 2 * (128 + 64 + 128)
    assert set(llama.adapter_state_dict()) == {f"{p}.lora_B.weight" for p in llama.adapters()}


def test_a_is_kaiming_from_the_seed_and_b_starts_at_zero(llama):
    from graphpeft.passes.adapters.layer_rewrite import layer_generator

    layer = next(l for l in find_layers(llama.graph_module) if l.path == "model.layers.1.mlp.down_proj")
    expected = torch.empty(4, 64)
    torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=layer_generator(0, layer))
    assert torch.equal(get_tensor(llama.graph_module, f"{layer.path}.lora_A.weight"), expected)
    assert gp.LoRAFA(targets=["q_proj"]).init == "default"  # B zero: the identity at the start
    with pytest.warns(gp.GraphPeftWarning, match="lora_fa: r=64 on .* is larger than the layer"):  # as PEFT allows
        gp.Plan([gp.LoRAFA(targets=["k_proj"], r=64)]).resolve(find_layers(llama.graph_module))
    assert gp.Plan.from_dict([{"lora_fa": {**LLAMA, "init": "random"}}]) == llama.plan


@pytest.mark.parametrize("arch,make", [("llama", tiny_llama), ("gpt2", tiny_gpt2)])
def test_matches_the_formula(arch, make, request, parity):
    cm = request.getfixturevalue(arch)
    with torch.no_grad():
        diff = (run(cm, arch) - run(_reference(make, cm), arch)).abs().max().item()
    assert parity.record(f"lora_fa {arch} vs formula", diff) < 1e-5


def test_matches_peft_lora_with_the_same_factors(llama, parity):
    from peft import LoraConfig

    pm = peft_model("llama", LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA["targets"]), llama, _constants(llama))
    with torch.no_grad():
        diff = (run(llama, "llama") - run(pm, "llama")).abs().max().item()
    assert parity.record("lora_fa llama vs peft LoRA", diff) < 1e-5


def test_a_gets_no_gradient(llama):
    params = dict(llama.graph_module.named_parameters())
    for p in params.values():
        p.grad = None
    lm_loss(llama, "llama").backward()
    for path, rec in llama.adapters().items():
        assert params[rec["tensors"]["A"]].grad is None
        assert params[rec["tensors"]["B"]].grad is not None and params[rec["tensors"]["B"]].grad.abs().sum() > 0
    assert all(p.grad is None for n, p in params.items() if n not in llama.trainable_parameters())
    for p in params.values():
        p.grad = None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_exact_and_matches_peft(arch, request):
    from peft import LoraConfig

    cm = request.getfixturevalue(arch)
    merged = check_merge(cm, arch)
    rule = LLAMA if arch == "llama" else GPT2
    config = LoraConfig(r=4, lora_alpha=8, target_modules=rule["targets"], fan_in_fan_out=arch == "gpt2")
    peft_merged = peft_model(arch, config, cm, _constants(cm)).merge_and_unload().state_dict()
    for rec in cm.adapters().values():
        torch.testing.assert_close(get_tensor(merged.graph_module, rec["weight"]), peft_merged[rec["weight"]])


def test_onnx_merged_and_unmerged(gpt2, tmp_path, parity):
    check_onnx_merged_and_unmerged(gpt2, tmp_path, parity, "lora_fa gpt2")


def test_training_step_in_torch_and_onnxruntime(llama, tmp_path, parity):
    a_before = {p: get_tensor(llama.graph_module, r["tensors"]["A"]).clone() for p, r in llama.adapters().items()}
    # the step trains B only, and its graph verifies (A, adapter-const, is read through stamped
    # get_attr nodes); AdamW, 3 steps compared
    result = check_training_export(llama, gp.optim.AdamW(lr=3e-2), tmp_path, steps=12, compared=3)
    assert set(result.step.signature.params) == {r["tensors"]["B"] for r in llama.adapters().values()}
    assert_loss_falls(result.torch_losses)
    for p, rec in llama.adapters().items():
        assert torch.equal(get_tensor(llama.graph_module, rec["tensors"]["A"]), a_before[p])
    loss_diff, param_diff = result.record(parity, "lora_fa llama")
    assert loss_diff < 1e-4 and param_diff < 1e-4
