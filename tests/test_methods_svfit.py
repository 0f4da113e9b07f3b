"""SVFit: structure, match count, roles (only the singular values train), the factors against an
independent SVD, the identity at init, parity with a plain PyTorch reference of the published
formulation (``W = W_e + U_r diag(σ) V_rᵀ``, σ trained) on Llama and GPT-2 (Conv1D), exact
merge, deterministic recompilation, ONNX (merged and unmerged) and a verified training step run
by torch and by onnxruntime."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.errors import PlanError
from graphpeft.graph import find_layers, get_tensor

from method_helpers import (QVD, assert_loss_falls, check_merge, check_onnx_merged_and_unmerged, check_structure,
                            check_training_export, compile_model, compiled_fixture, created_ops, llama_paths,
                            merged_weight_error, run, weight_out_in)
from models import tiny_gpt2, tiny_llama

LLAMA = dict(targets=["q_proj", "v_proj", "down_proj"], r=8)
GPT2 = dict(targets="all-linear")  # r=None: every singular value of every layer


class ReferenceSVFit(torch.nn.Module):
    """The published formulation: ``W = W_e + U_r diag(σ) V_rᵀ`` with the frozen residual
    ``W_e = W - U_r diag(σ₀) V_rᵀ`` and trained singular values ``σ`` (from an independent SVD;
    any sign convention gives the same weight, the singular vectors flip in pairs)."""

    def __init__(self, base: torch.nn.Module, r: int, sigma: torch.Tensor) -> None:
        super().__init__()
        w = weight_out_in(base).detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
        self.weight = ((w - (u * s) @ vh) + (u * sigma.double()) @ vh).float()
        self.bias = base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _reference(make, cm) -> torch.nn.Module:
    model = make()
    for path, rec in cm.adapters().items():
        sigma = get_tensor(cm.graph_module, rec["tensors"]["sigma"]).detach()
        model.set_submodule(path, ReferenceSVFit(model.get_submodule(path), rec["rank"], sigma))
    return model.eval()


llama = compiled_fixture("llama", [gp.SVFit(**LLAMA, init="random")])
gpt2 = compiled_fixture("gpt2", [gp.SVFit(**GPT2, init="random")])


def test_structure_roles_and_match_count(llama, gpt2):
    paths = llama_paths(*QVD)
    check_structure(llama, paths, "insert_svfit", "svfit[q_proj,v_proj,down_proj]")
    roles = llama.roles()
    for path, rec in llama.adapters().items():
        assert created_ops(llama, path) == ["sub", "linear", "mul", "linear", "add"]
        assert rec["tensors"] == {k: f"{path}.svfit_{k}" for k in ("U", "V", "sigma", "sigma0")}
        assert rec["rank"] == 8
        for k in ("U", "V", "sigma0"):
            assert roles[rec["tensors"][k]] == gp.Role.ADAPTER_CONST
        assert roles[rec["tensors"]["sigma"]] == gp.Role.ADAPTER
    g = llama.graph_module
    assert get_tensor(g, "model.layers.0.mlp.down_proj.svfit_U").shape == (32, 8)
    assert get_tensor(g, "model.layers.0.mlp.down_proj.svfit_V").shape == (8, 64)
    assert llama.num_parameters(trainable_only=True) == 6 * 8  # r singular values per layer
    assert set(llama.adapter_state_dict()) == {f"{p}.svfit_sigma" for p in paths}
    # r=None: every singular value, min(in, out) per layer (c_attn 32->96, c_fc 32->128 ...: 32)
    assert {rec["rank"] for rec in gpt2.adapters().values()} == {32}
    assert gpt2.num_parameters(trainable_only=True) == 8 * 32


def test_factors_init_identity_and_determinism(llama):
    fresh = compile_model("llama", [gp.SVFit(**LLAMA)])
    base = tiny_llama()
    with torch.no_grad():  # a fresh adapter is exactly the identity
        assert torch.equal(run(fresh, "llama"), run(base, "llama"))
    for path, rec in fresh.adapters().items():
        t = {k: get_tensor(fresh.graph_module, v).double() for k, v in rec["tensors"].items()}
        w = base.get_submodule(path).weight.detach().double()
        _, s, _ = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(t["sigma0"], s[:8], atol=1e-6, rtol=0)  # the top singular values
        assert torch.equal(t["sigma"], t["sigma0"])  # σ starts at σ₀
        torch.testing.assert_close(t["U"].T @ t["U"], torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(t["V"] @ t["V"].T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
        # U_r diag(σ₀) V_rᵀ is W's best rank-8 approximation
        u, s_, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close((t["U"] * t["sigma0"]) @ t["V"], (u[:, :8] * s_[:8]) @ vh[:8], atol=1e-5, rtol=0)
        # another compile (another init) recomputes the same constants, bit for bit
        for k in ("U", "V", "sigma0"):
            assert torch.equal(get_tensor(fresh.graph_module, rec["tensors"][k]),
                               get_tensor(llama.graph_module, rec["tensors"][k]))
    rule = gp.SVFit(targets=["q_proj"])
    assert (rule.r, rule.init) == (None, "default")


def test_rejections(llama, gpt2):
    layers = find_layers(llama.graph_module)
    with pytest.raises(PlanError, match="rank r=33 is larger"):
        gp.Plan([gp.SVFit(targets=["q_proj"], r=33)]).resolve(layers)
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.SVFit(targets=["embed_tokens"])]).resolve(layers)
    for bad, match in [(dict(r=0), "r must be a positive integer or null"), (dict(init="salt"), "init must be one of")]:
        with pytest.raises(PlanError, match=match):
            gp.SVFit(targets=["q_proj"], **bad)
    with pytest.raises(PlanError, match="tied weights"):
        gp.Plan([gp.SVFit(targets=["lm_head"])]).resolve(find_layers(gpt2.graph_module))
    assert gp.Plan.from_dict([{"svfit": {**LLAMA, "init": "random"}}]) == llama.plan
    assert gp.Plan.from_dict([{"svfit": {"targets": "all-linear", "r": None, "init": "random"}}]) == gpt2.plan


@pytest.mark.parametrize("arch,make", [("llama", tiny_llama), ("gpt2", tiny_gpt2)])
def test_matches_the_formula(arch, make, request, parity):
    cm = request.getfixturevalue(arch)
    with torch.no_grad():
        assert (run(cm, arch) - run(make(), arch)).abs().max().item() > 1e-2  # the adapter does something
        diff = (run(cm, arch) - run(_reference(make, cm), arch)).abs().max().item()
    assert parity.record(f"svfit {arch} vs formula", diff) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_exact(arch, request, parity):
    cm = request.getfixturevalue(arch)
    merged = check_merge(cm, arch, atol=1e-4)
    worst = merged_weight_error(cm, merged, lambda t, rec: (t["U"] * (t["sigma"] - t["sigma0"])) @ t["V"])
    assert parity.record(f"svfit {arch} merged weight vs W + ΔW", worst) < 1e-5


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    check_onnx_merged_and_unmerged(llama, tmp_path, parity, "svfit llama")


def test_training_step_in_torch_and_onnxruntime(gpt2, tmp_path, parity):
    # the step trains the singular values only (trainable_parameters); AdamW, 3 steps compared
    result = check_training_export(gpt2, gp.optim.AdamW(lr=0.1), tmp_path, steps=8, compared=3)
    assert_loss_falls(result.torch_losses)
    loss_diff, param_diff = result.record(parity, "svfit gpt2")
    assert loss_diff < 1e-4 and param_diff < 1e-4
