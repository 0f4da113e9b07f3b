"""NOLA: structure, match count, shared seeded bases, identity init, parity with a plain PyTorch
reference of the official code's layer on Llama and GPT-2, exact merge, ONNX export, training
(the step, its verified graph and its ONNX export), and adapter files of coefficients only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import graphpeft as gp
from graphpeft.errors import PlanError
from graphpeft.graph import get_tensor, iter_created
from graphpeft.passes.adapters.insert_nola import random_bases

from method_helpers import (MODELS, QVD, assert_loss_falls, check_merge, check_onnx_merged_and_unmerged,
                            check_structure, check_training_export, compile_model, compiled_fixture, created_ops,
                            llama_paths, run)
from models import tiny_llama

# Llama: q_proj 32->32, v_proj 32->16, down_proj 64->32; k = 24 and l = 12 bases of rank 4
LLAMA = dict(targets=["q_proj", "v_proj", "down_proj"], r=4, num_basis_A=24, num_basis_B=12, alpha=8)
GPT2 = dict(targets=["c_attn", "mlp.c_proj"], r=4, num_basis_A=24, num_basis_B=12, alpha=8)

# cm.initial_state: the adapter tensors as compiled (default init), before randomize
llama = compiled_fixture("llama", [gp.NOLA(**LLAMA)])
gpt2 = compiled_fixture("gpt2", [gp.NOLA(**GPT2)])


def reference(arch: str, cm: gp.CompiledModel) -> torch.nn.Module:
    """The base model with each adapted layer's output hooked as the official ``NOLALinear``
    pair computes it: ``A = A₀ + Σ αᵢ Aᵢ``, ``B = Σ βⱼ Bⱼ`` (einsum, as its ``GenerateParams``),
    ``y + (alpha / r) · B(A(x))``; tensors from ``cm``, nothing from graphpeft's code."""
    model = MODELS[arch][0]()
    state = cm.adapter_state_dict(include_constants=True)
    for rec in cm.adapters().values():
        t = {k: state[v] for k, v in rec["tensors"].items()}
        a = t["A0"] + torch.einsum("b,boi->oi", t["alpha"], t["bases_A"])
        b = torch.einsum("b,boi->oi", t["beta"], t["bases_B"])
        scale = rec["config"]["alpha"] / rec["config"]["r"]

        def hook(module, args, out, a=a, b=b, scale=scale):
            return out + F.linear(F.linear(args[0], a), b) * scale

        model.get_submodule(rec["layer"]).register_forward_hook(hook)
    return model


def test_structure_roles_and_match_count(llama):
    paths = llama_paths(*QVD)
    check_structure(llama, paths, "insert_nola", "nola[q_proj,v_proj,down_proj]")
    mix = ["view", "unsqueeze", "mm", "view"]
    assert created_ops(llama, paths[1]) == mix + ["add"] + mix + ["linear", "linear", "mul", "add"]
    roles = llama.roles()
    # bases shared by shape: A by (k, r, in) for in 32 and 64, B by (l, out, r) for out 32 and 16
    bases = sorted(k for k in roles if k.startswith("nola_basis"))
    assert bases == ["nola_basis_A_24x4x32", "nola_basis_A_24x4x64", "nola_basis_B_12x16x4", "nola_basis_B_12x32x4"]
    assert all(roles[k] == gp.Role.ADAPTER_CONST for k in bases)
    assert roles["model.layers.0.self_attn.q_proj.nola_A0"] == gp.Role.ADAPTER_CONST
    assert get_tensor(llama.graph_module, "nola_basis_B_12x16x4").shape == (12, 16, 4)
    for p in paths:
        reads = [n.target for n in iter_created(llama.graph_module, p) if n.op == "get_attr"]
        assert sorted(reads) == sorted(llama.adapters()[p]["tensors"].values())
    sd = llama.adapter_state_dict()  # the coefficients only: every constant is regenerated
    assert sorted({k.rsplit(".", 1)[1] for k in sd}) == ["nola_alpha", "nola_beta"] and len(sd) == 12
    assert sd["model.layers.1.mlp.down_proj.nola_alpha"].shape == (24,)
    assert llama.num_parameters(trainable_only=True) == 6 * (24 + 12)  # k + l per layer, whatever its size


def test_defaults_constants_and_identity_init(llama):
    fresh = gp.NOLA(targets=["q_proj"])  # the official LLaMA-2 scripts: r 16, 512 bases each, alpha 4
    assert (fresh.r, fresh.num_basis_A, fresh.num_basis_B, fresh.alpha, fresh.dropout, fresh.init) == \
        (16, 512, 512, 4.0, 0.0, "default")
    assert not any(v.any() for v in llama.initial_state.values())  # α = β = 0: the identity ...
    consts = llama.adapter_state_dict(include_constants=True)
    saved = llama.adapter_state_dict()
    try:
        llama.load_adapter_state_dict(llama.initial_state)
        with torch.no_grad():
            assert (run(llama, "llama") - run(tiny_llama(), "llama")).abs().max().item() < 1e-6
        # ... which still trains: β's gradient runs through A₀ x
        loss = run(llama, "llama").logsumexp(-1).mean()
        beta = llama.trainable_parameters()["model.layers.0.self_attn.q_proj.nola_beta"]
        assert torch.autograd.grad(loss, beta)[0].abs().max() > 0
    finally:
        llama.load_adapter_state_dict(saved)
    # bases uniform in [-1, 1] / sqrt(k); A₀ Kaiming-uniform (bound 1 / sqrt(in)), per layer
    basis = consts["nola_basis_A_24x4x32"]
    assert basis.abs().max() <= 1 / math.sqrt(24) and basis.abs().max() > 0.9 / math.sqrt(24)
    a0 = [consts[f"model.layers.{i}.self_attn.q_proj.nola_A0"] for i in (0, 1)]
    assert all(t.abs().max() <= 1 / math.sqrt(32) for t in a0) and not torch.equal(a0[0], a0[1])
    assert torch.equal(random_bases((24, 4, 32), 0), basis)  # drawn from projection_prng_key ...
    assert not torch.equal(random_bases((24, 4, 32), 1), basis)  # ... and only from it


def test_rejections(llama):
    layers = gp.find_layers(llama.graph_module)
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.NOLA(targets=["embed_tokens"])]).resolve(layers)
    for bad, match in [({"r": 0}, "r must be"), ({"num_basis_A": -1}, "num_basis_A"), ({"dropout": 1.0}, "dropout"),
                       ({"init": "zeros"}, "init"), ({"alpha": "big"}, "alpha")]:
        with pytest.raises(PlanError, match=match):
            gp.NOLA(targets=["q_proj"], **bad)
    v_proj = next(l for l in layers if l.path.endswith("0.self_attn.v_proj"))  # 32 -> 16
    assert "rank r=32 is larger" in gp.NOLA(targets=["v_proj"], r=32).check(v_proj)
    # more bases than entries of a factor would only build large useless constants
    assert "num_basis_B=65 exceeds the 64 entries of B" in gp.NOLA(targets=["v_proj"], r=4, num_basis_A=8,
                                                                   num_basis_B=65).check(v_proj)
    # the defaults (r 16, 512 bases each) fit a 32 -> 32 layer exactly, not the 16 outputs of v_proj
    q_proj = next(l for l in layers if l.path.endswith("0.self_attn.q_proj"))
    assert gp.NOLA(targets=["q_proj"]).check(q_proj) is None
    assert "num_basis_B=512 exceeds the 256 entries" in gp.NOLA(targets=["v_proj"]).check(v_proj)
    assert gp.Plan.from_dict([{"nola": LLAMA}]) == llama.plan


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reference_parity(arch, request, parity):
    cm = request.getfixturevalue(arch)
    ref = reference(arch, cm).eval()
    with torch.no_grad():
        ours, theirs, base = run(cm, arch), run(ref, arch), run(MODELS[arch][0](), arch)
    assert (ours - base).abs().max().item() > 0.05  # the adapters do something
    assert parity.record(f"nola {arch} vs plain PyTorch reference", (ours - theirs).abs().max().item()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_exact(arch, request, parity):
    cm = request.getfixturevalue(arch)
    merged = check_merge(cm, arch)
    with torch.no_grad():
        parity.record(f"nola {arch} merged vs unmerged", (run(merged, arch) - run(cm, arch)).abs().max().item())
    state = cm.adapter_state_dict(include_constants=True)
    base = MODELS[arch][0]()
    for rec in cm.adapters().values():  # W + (alpha / r) · B A, in the weight's own layout
        t = {k: state[v] for k, v in rec["tensors"].items()}
        a = t["A0"] + torch.einsum("b,boi->oi", t["alpha"], t["bases_A"])
        b = torch.einsum("b,boi->oi", t["beta"], t["bases_B"])
        delta = (b @ a) * rec["scaling"]
        expected = base.get_parameter(rec["weight"]) + (delta.T if rec["fan_in_fan_out"] else delta)
        torch.testing.assert_close(get_tensor(merged.graph_module, rec["weight"]), expected)


def test_adapter_file_holds_coefficients_only(llama, tmp_path):
    llama.save_adapter(tmp_path / "nola")
    # another compile seed: the constants are regenerated the same from projection_prng_key
    other = compile_model("llama", [gp.NOLA(**LLAMA)], seed=3)
    consts = llama.adapter_state_dict(include_constants=True)
    assert all(torch.equal(v, consts[k]) for k, v in other.adapter_state_dict(include_constants=True).items()
               if "nola_basis" in k or k.endswith("nola_A0"))
    gp.load_adapter(other, tmp_path / "nola")
    with torch.no_grad():
        assert (run(other, "llama") - run(llama, "llama")).abs().max().item() == 0


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    check_onnx_merged_and_unmerged(llama, tmp_path, parity, "nola llama")


def test_training_step_loss_falls_verifies_and_runs_in_onnxruntime(gpt2, tmp_path, parity):
    # the step trains α and β only (trainable_parameters); onnxruntime runs all 12 AdamW steps
    result = check_training_export(gpt2, gp.optim.AdamW(lr=0.05), tmp_path, steps=12, compared=12)
    assert_loss_falls(result.torch_losses, by=0.05)
    diff = parity.record("nola gpt2 12 adamw steps onnxruntime vs torch", result.param_diff)
    assert diff < 1e-5 and result.loss_diff < 1e-5
