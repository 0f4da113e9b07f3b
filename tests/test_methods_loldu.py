"""LoLDU: structure, match count, roles (only the diagonal and the scale train), the factors
against an independent LU, the identity at init, parity with a plain PyTorch reference of the
official formulation (residual weight ``W - σ₀·P L_r diag(z₀) U'_r`` plus ``σ·P L_r diag(z) U'_r``)
on Llama and GPT-2 (Conv1D), exact merge, deterministic recompilation, ONNX (merged and
unmerged) and a verified training step run by torch and by onnxruntime."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.errors import PlanError
from graphpeft.graph import find_layers, get_tensor

from method_helpers import (assert_loss_falls, check_merge, check_onnx_merged_and_unmerged, check_structure,
                            check_training_export, compile_model, compiled_fixture, created_ops, llama_paths,
                            merged_weight_error, run, weight_out_in)
from models import tiny_gpt2, tiny_llama

LLAMA = dict(targets="all-linear")  # 5 trainable numbers a layer: adapt all 14 linear layers
GPT2 = dict(targets=["c_attn", "mlp.c_proj"], r=8, alpha=2)


def _ldu(w: torch.Tensor, r: int):
    """``W = P L D U'`` written out (float64): LU with partial pivoting, then U = D U'."""
    p, lower, upper = torch.linalg.lu(w.double())
    d = torch.diagonal(upper)
    return p, lower[:, :r], d[:r], (upper / d[:, None])[:r]


class ReferenceLoLDU(torch.nn.Module):
    """The official formulation: the weight becomes ``W_res + σ·P L_r diag(z) U'_r`` with the
    residual ``W_res = W - σ₀·P L_r diag(z₀) U'_r`` (z₀ = D_r, σ₀ = alpha / r)."""

    def __init__(self, base: torch.nn.Module, r: int, scale0: float, z: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        w = weight_out_in(base).detach().double()
        p, lower, d, unit_upper = _ldu(w, r)
        self.residual = (w - scale0 * p @ lower @ torch.diag(d) @ unit_upper).float()
        self.update = (scale.double() * p @ lower @ torch.diag(z.double()) @ unit_upper).float()
        self.bias = base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.residual + self.update, self.bias)


def _reference(make, cm) -> torch.nn.Module:
    model = make()
    for path, rec in cm.adapters().items():
        t = {k: get_tensor(cm.graph_module, v).detach() for k, v in rec["tensors"].items()}
        r = rec["config"].get("r", 4)
        model.set_submodule(path, ReferenceLoLDU(model.get_submodule(path), r, rec["scaling"], t["z"], t["scale"]))
    return model.eval()


llama = compiled_fixture("llama", [gp.LoLDU(**LLAMA, init="random")])
gpt2 = compiled_fixture("gpt2", [gp.LoLDU(**GPT2, init="random")])


def test_structure_roles_and_match_count(llama):
    kinds = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    paths = llama_paths(*kinds)  # lm_head is the output head: not all-linear
    check_structure(llama, paths, "insert_loldu", "loldu[all-linear]")
    roles = llama.roles()
    for path, rec in llama.adapters().items():
        assert created_ops(llama, path) == ["mul", "sub", "linear", "mul", "linear", "add"]
        assert rec["tensors"] == {k: f"{path}.loldu_{k}" for k in ("L", "U", "z", "scale", "offset")}
        for k in ("L", "U", "offset"):
            assert roles[rec["tensors"][k]] == gp.Role.ADAPTER_CONST
        for k in ("z", "scale"):
            assert roles[rec["tensors"][k]] == gp.Role.ADAPTER
    g = llama.graph_module
    assert get_tensor(g, "model.layers.0.mlp.down_proj.loldu_L").shape == (32, 4)
    assert get_tensor(g, "model.layers.0.mlp.down_proj.loldu_U").shape == (4, 64)
    assert get_tensor(g, "model.layers.0.mlp.down_proj.loldu_scale").shape == (1,)
    # r + 1 = 5 trainable numbers per layer: the diagonal and the scaling factor
    assert llama.num_parameters(trainable_only=True) == 14 * 5
    assert set(llama.adapter_state_dict()) == {f"{p}.loldu_{k}" for p in paths for k in ("z", "scale")}


def test_factors_init_identity_and_determinism(llama):
    fresh = compile_model("llama", [gp.LoLDU(**LLAMA)])
    base = tiny_llama()
    with torch.no_grad():  # a fresh adapter is exactly the identity
        assert torch.equal(run(fresh, "llama"), run(base, "llama"))
    for path, rec in fresh.adapters().items():
        t = {k: get_tensor(fresh.graph_module, v) for k, v in rec["tensors"].items()}
        w = base.get_submodule(path).weight.detach().double()
        p, lower, d, unit_upper = _ldu(w, 4)
        torch.testing.assert_close(t["L"].double(), p @ lower, atol=1e-6, rtol=0)  # the permutation folded in
        torch.testing.assert_close(t["U"].double(), unit_upper, atol=1e-5, rtol=1e-5)
        assert torch.equal(t["z"], d.float()) and torch.equal(t["scale"], torch.tensor([0.25]))  # z = D_r, σ = 1/4
        assert torch.equal(t["offset"], t["z"] * t["scale"])
        assert torch.equal(torch.diagonal(t["U"][:, :4]), torch.ones(4))  # unit upper triangular
        # another compile (another init) recomputes the same constants, bit for bit
        for k in ("L", "U", "offset"):
            assert torch.equal(t[k], get_tensor(llama.graph_module, rec["tensors"][k]))
    rule = gp.LoLDU(targets=["q_proj"])
    assert (rule.r, rule.alpha, rule.init) == (4, 1.0, "default")  # minloldu's from_linear defaults


def test_rejections(llama, gpt2):
    layers = find_layers(llama.graph_module)
    with pytest.raises(PlanError, match="rank r=33 is larger"):
        gp.Plan([gp.LoLDU(targets=["q_proj"], r=33)]).resolve(layers)
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.LoLDU(targets=["embed_tokens"])]).resolve(layers)
    for bad, match in [(dict(r=0), "r must be a positive integer"), (dict(r=2.5), "r must be"),
                       (dict(init="uniform"), "init must be one of"), (dict(alpha="1"), "alpha must be a number")]:
        with pytest.raises(PlanError, match=match):
            gp.LoLDU(targets=["q_proj"], **bad)
    with pytest.raises(PlanError, match="tied weights"):
        gp.Plan([gp.LoLDU(targets=["lm_head"])]).resolve(find_layers(gpt2.graph_module))
    assert gp.Plan.from_dict([{"loldu": {**LLAMA, "init": "random"}}]) == llama.plan


@pytest.mark.parametrize("arch,make", [("llama", tiny_llama), ("gpt2", tiny_gpt2)])
def test_matches_the_official_formulation(arch, make, request, parity):
    cm = request.getfixturevalue(arch)
    with torch.no_grad():
        assert (run(cm, arch) - run(make(), arch)).abs().max().item() > 1e-2  # the adapter does something
        diff = (run(cm, arch) - run(_reference(make, cm), arch)).abs().max().item()
    assert parity.record(f"loldu {arch} vs formula", diff) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_exact(arch, request, parity):
    cm = request.getfixturevalue(arch)
    merged = check_merge(cm, arch, atol=1e-4)
    worst = merged_weight_error(cm, merged,
                                lambda t, rec: t["L"] @ torch.diag(t["z"] * t["scale"] - t["offset"]) @ t["U"])
    assert parity.record(f"loldu {arch} merged weight vs W + ΔW", worst) < 1e-5


def test_onnx_merged_and_unmerged(gpt2, tmp_path, parity):
    check_onnx_merged_and_unmerged(gpt2, tmp_path, parity, "loldu gpt2")


def test_training_step_in_torch_and_onnxruntime(llama, tmp_path, parity):
    # the step trains z and σ only (trainable_parameters); AdamW, 3 steps compared
    result = check_training_export(llama, gp.optim.AdamW(lr=0.1), tmp_path, steps=8, compared=3)
    assert_loss_falls(result.torch_losses)
    loss_diff, param_diff = result.record(parity, "loldu llama")
    assert loss_diff < 1e-4 and param_diff < 1e-4
