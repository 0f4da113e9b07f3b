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

from method_helpers import (IDS, assert_loss_falls, check_merge, check_onnx, check_provenance, compile_model,
                            created_ops, randomize, run)
from models import tiny_gpt2, tiny_llama

LLAMA = dict(targets=["q_proj", "v_proj", "down_proj"], r=8)
GPT2 = dict(targets="all-linear")  # r=None: every singular value of every layer


def _rows(module: torch.nn.Module) -> torch.Tensor:
    # GPT-2's Conv1D stores (in, out)
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


class ReferenceSVFit(torch.nn.Module):
    """The published formulation: ``W = W_e + U_r diag(σ) V_rᵀ`` with the frozen residual
    ``W_e = W - U_r diag(σ₀) V_rᵀ`` and trained singular values ``σ`` (from an independent SVD;
    any sign convention gives the same weight, the singular vectors flip in pairs)."""

    def __init__(self, base: torch.nn.Module, r: int, sigma: torch.Tensor) -> None:
        super().__init__()
        w = _rows(base).detach().double()
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


def train_torch_and_onnx(cm, lr: float, tmp_path, steps: int = 8, compared: int = 3):
    """A verified training step (AdamW) trained ``steps`` times by torch, and the same step
    exported and trained ``compared`` times from the same start by onnxruntime; cm is restored
    afterwards. Returns (torch losses, onnxruntime losses, max relative difference of the
    parameters after ``compared`` steps of each, step). Only the first steps are compared:
    AdamW's early steps are ``lr·sign(g)``-like, so a gradient entry near zero whose sign differs
    in the last float32 bit moves its parameter by up to ``2·lr`` and the runs drift apart."""
    from graphpeft.backends.onnx import OnnxTrainer

    saved = cm.adapter_state_dict()
    try:
        step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=lr), example_batch=(IDS,))  # verify=True
        step.export_onnx(tmp_path / "train.onnx")
        torch_losses = []
        for i in range(steps):
            torch_losses.append(float(step(IDS)))
            if i + 1 == compared:
                trained = cm.adapter_state_dict()
        trainer = OnnxTrainer(tmp_path / "train.onnx")
        ort_losses = [float(trainer.step(IDS)) for _ in range(compared)]
        ort = trainer.adapter_state_dict()
        diff = max(float((ort[k] - trained[k]).abs().max() / trained[k].abs().max().clamp_min(1.0)) for k in trained)
        return torch_losses, ort_losses, diff, step
    finally:
        cm.load_adapter_state_dict(saved)


@pytest.fixture(scope="module")
def llama():
    cm = compile_model("llama", [gp.SVFit(**LLAMA, init="random")])
    randomize(cm)
    return cm


@pytest.fixture(scope="module")
def gpt2():
    cm = compile_model("gpt2", [gp.SVFit(**GPT2, init="random")])
    randomize(cm)
    return cm


def test_structure_roles_and_match_count(llama, gpt2):
    paths = [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert sorted(llama.adapters()) == sorted(paths)
    assert sum(line.startswith("  + ") for line in llama.explain().splitlines()) == 6
    check_provenance(llama, "insert_svfit", "svfit[q_proj,v_proj,down_proj]")
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
    worst = 0.0
    for rec in cm.adapters().values():
        t = {k: get_tensor(cm.graph_module, v).detach().double() for k, v in rec["tensors"].items()}
        delta = (t["U"] * (t["sigma"] - t["sigma0"])) @ t["V"]
        w = get_tensor(cm.graph_module, rec["weight"]).detach().double()
        expected = w + (delta.T if rec["fan_in_fan_out"] else delta)
        worst = max(worst, float((get_tensor(merged.graph_module, rec["weight"]).double() - expected).abs().max()))
    assert parity.record(f"svfit {arch} merged weight vs W + ΔW", worst) < 1e-5


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    parity.record("svfit llama onnxruntime unmerged", check_onnx(llama, str(tmp_path / "svfit.onnx"), merged=False))
    parity.record("svfit llama onnxruntime merged", check_onnx(llama, str(tmp_path / "svfit_m.onnx"), merged=True))


def test_training_step_in_torch_and_onnxruntime(gpt2, tmp_path, parity):
    torch_losses, ort_losses, diff, step = train_torch_and_onnx(gpt2, lr=0.1, tmp_path=tmp_path)
    assert set(step.signature.params) == set(gpt2.trainable_parameters())  # the singular values only
    assert_loss_falls(torch_losses)
    parity.record("svfit gpt2 train loss first", torch_losses[0])
    parity.record("svfit gpt2 train loss last", torch_losses[-1])
    loss_diff = max(abs(a - b) for a, b in zip(ort_losses, torch_losses))
    assert parity.record("svfit gpt2 train onnxruntime vs torch (loss)", loss_diff) < 1e-4
    assert parity.record("svfit gpt2 train onnxruntime vs torch (params, rel)", diff) < 1e-4
