"""SLTrain: structure, match count, roles, the fixed random support, the official init, parity
with a plain PyTorch reference of ΔW = scaling·BA + S on Llama and GPT-2 (Conv1D), exact merge
(also in place, fused), adapter files, ONNX (merged and unmerged) and a verified training step
run by torch and by onnxruntime in which A, B and the sparse values all train."""

from __future__ import annotations

import math

import pytest
import torch

import graphpeft as gp
from graphpeft.adapter_io import read_adapter
from graphpeft.errors import PlanError
from graphpeft.graph import find_layers, get_tensor
from graphpeft.passes.adapters.insert_sltrain import init_tensors
from graphpeft.registry import get_method

from method_helpers import (IDS, MODELS, assert_loss_falls, check_merge, check_onnx_merged_and_unmerged,
                            check_structure, check_training_export, check_weight_join, compile_model,
                            compile_randomized, compiled_fixture, created_ops, llama_paths, main_output, run)
from models import tiny_llama

# q 32 -> 32: int(0.05 · 1024) = 51 sparse entries; v 32 -> 16: int(0.05 · 512) = 25
LLAMA = dict(targets=["q_proj", "v_proj"], r=2, alpha=4, density=0.05)
GPT2 = dict(targets=["c_attn"], r=2, alpha=4, density=0.05)


llama = compiled_fixture("llama", [gp.SLTrain(**LLAMA)])


def _tensors(cm, rec) -> dict[str, torch.Tensor]:
    return {k: get_tensor(cm.graph_module, v).detach().clone() for k, v in rec["tensors"].items()}


def reference_delta(t: dict[str, torch.Tensor], scaling: float, shape: torch.Size, fan_in_fan_out: bool) -> torch.Tensor:
    """ΔW = scaling · B A + S in the stored layout, written out in float64: S is zero except at
    the support (flat indices into the stored weight), where it holds the values."""
    low = scaling * (t["B"].double() @ t["A"].double())
    if fan_in_fan_out:
        low = low.T
    sparse = torch.zeros(shape, dtype=torch.float64).flatten()
    sparse[t["indices"]] = t["values"].double()  # distinct indices: assignment = accumulation
    return low + sparse.view(shape)


def reference_model(arch: str, cm: gp.CompiledModel) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The base model and its adapted weights W + ΔW (reference formula, cm's tensors)."""
    model = MODELS[arch][0]()
    params = dict(model.named_parameters())
    weights = {}
    for rec in cm.adapters().values():
        w = params[rec["weight"]].detach()
        weights[rec["weight"]] = (w.double() + reference_delta(_tensors(cm, rec), rec["scaling"], w.shape,
                                                               rec["fan_in_fan_out"])).float()
    return model, weights


def run_reference(arch: str, cm: gp.CompiledModel) -> torch.Tensor:
    model, weights = reference_model(arch, cm)
    with torch.no_grad():
        return main_output(torch.func.functional_call(model, weights, (IDS,), dict(MODELS[arch][1])))


def test_structure_roles_and_match_count(llama):
    paths = llama_paths("self_attn.q_proj", "self_attn.v_proj")
    check_structure(llama, paths, "insert_sltrain", "sltrain[q_proj,v_proj]")
    roles = llama.roles()
    for path in paths:
        rec = llama.adapters()[path]
        # ΔW is built beside the weight (scaling on A), then W + ΔW replaces W in the layer op
        assert created_ops(llama, path) == ["mul", "mm", "view", "index_put", "view", "add"]
        assert check_weight_join(llama, path).args[0].target == rec["weight"]  # merge re-points the op at W
        t = rec["tensors"]
        assert [roles[t[k]] for k in ("A", "B", "values", "indices")] == [gp.Role.ADAPTER] * 3 + [gp.Role.ADAPTER_CONST]
        idx = get_tensor(llama.graph_module, t["indices"])
        # a fixed support: sorted, distinct flat indices, int(δ · out · in) of them
        n_out, n_in = rec["out_features"], rec["in_features"]
        assert idx.dtype == torch.int64 and idx.shape == (int(0.05 * n_out * n_in),)
        assert torch.equal(idx, idx.unique()) and 0 <= idx.min() and idx.max() < n_out * n_in
        assert get_tensor(llama.graph_module, t["A"]).shape == (2, n_in)
        assert get_tensor(llama.graph_module, t["B"]).shape == (n_out, 2)
        assert rec["scaling"] == 2.0
    # per layer r·(in + out) + nnz: q 2·64 + 51, v 2·48 + 25
    assert llama.num_parameters(trainable_only=True) == 2 * (128 + 51 + 96 + 25)
    assert set(llama.adapter_state_dict()) == {f"{p}.sltrain_{k}" for p in paths for k in ("A", "B", "values")}


def test_defaults_init_and_rejections(llama):
    rule = gp.SLTrain(targets=["q_proj"])
    assert (rule.r, rule.alpha, rule.density, rule.init, rule.random_seed) == (8, 32.0, 0.03, "default", None)
    layers = find_layers(llama.graph_module)
    q = next(l for l in layers if l.path == "model.layers.0.self_attn.q_proj")
    # the official init of the factors (A Kaiming-uniform a=√5: bound 1/√in; B zero); S zero
    t = init_tensors(q, gp.SLTrain(**LLAMA), seed=0)
    assert t["A"].abs().max() <= 1 / math.sqrt(32) and t["A"].std() > 0.05
    assert not t["B"].any() and not t["values"].any()
    # init="uniform": the official pretraining init of the sparse values, U(±1/√in)
    u = init_tensors(q, gp.SLTrain(**LLAMA, init="uniform"), seed=0)
    assert 0 < u["values"].abs().max() <= 1 / math.sqrt(32) and torch.equal(u["indices"], t["indices"])
    # the support is drawn once from the seed: the same seed, the same support; another, another
    again = init_tensors(q, gp.SLTrain(**LLAMA, random_seed=5), seed=0)
    assert torch.equal(again["indices"], init_tensors(q, gp.SLTrain(**LLAMA, random_seed=5), seed=9)["indices"])
    assert not torch.equal(again["indices"], t["indices"])
    assert torch.equal(get_tensor(llama.graph_module, f"{q.path}.sltrain_indices"), t["indices"])
    # a fresh adapter (B = 0, S = 0) is the identity
    saved = llama.adapter_state_dict()
    fresh = {k: (v if k.endswith("sltrain_A") else torch.zeros_like(v)) for k, v in saved.items()}
    try:
        llama.load_adapter_state_dict(fresh)
        with torch.no_grad():
            assert torch.equal(run(llama, "llama"), run(tiny_llama(), "llama"))
    finally:
        llama.load_adapter_state_dict(saved)
    with pytest.raises(PlanError, match="rank r=33 is larger"):
        gp.Plan([gp.SLTrain(targets=["q_proj"], r=33)]).resolve(layers)
    with pytest.raises(PlanError, match="no sparse entry"):
        gp.Plan([gp.SLTrain(targets=["q_proj"], r=2, density=1e-4)]).resolve(layers)
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.SLTrain(targets=["embed_tokens"])]).resolve(layers)
    for bad, match in [(dict(r=0), "r must be a positive integer"), (dict(density=0.0), "density"),
                       (dict(density=1.0), "density"), (dict(alpha="4"), "alpha"), (dict(init="zero"), "init must be"),
                       (dict(random_seed=True), "random_seed")]:
        with pytest.raises(PlanError, match=match):
            gp.SLTrain(targets=["q_proj"], **bad)
    assert gp.Plan.from_dict([{"sltrain": LLAMA}]) == llama.plan


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_the_formula_and_merges_exactly(arch, llama, parity):
    if arch == "llama":
        cm = llama
    else:  # GPT-2's Conv1D: ΔW and its support live in the stored (in, out) layout
        cm = compile_randomized("gpt2", [gp.SLTrain(**GPT2)])
        assert all(rec["fan_in_fan_out"] for rec in cm.adapters().values())
    with torch.no_grad():
        ours = run(cm, arch)
        assert (ours - run(MODELS[arch][0](), arch)).abs().max().item() > 1e-2  # the adapters act
        diff = (ours - run_reference(arch, cm)).abs().max().item()
    assert parity.record(f"sltrain {arch} vs reference formula", diff) < 1e-5
    merged = check_merge(cm, arch)
    _, expected = reference_model(arch, cm)
    worst = 0.0
    for name, w in expected.items():
        got = get_tensor(merged.graph_module, name)
        torch.testing.assert_close(got, w, rtol=0, atol=1e-6)
        worst = max(worst, (got - w).abs().max().item())
    parity.record(f"sltrain {arch} merged weight vs W + sBA + S", worst)
    with torch.no_grad():
        parity.record(f"sltrain {arch} merged vs unmerged output", (run(merged, arch) - ours).abs().max().item())


def test_fused_switching_is_exact(llama):
    # fuse (W += ΔW by GEMM + scatter) and unfuse (W -= ΔW) in place, as the adapter bank does
    method = get_method("sltrain")
    gm = llama.graph_module
    for rec in llama.adapters().values():
        w0 = get_tensor(gm, rec["weight"]).detach().clone()
        expected = w0.double() + reference_delta(_tensors(llama, rec), rec["scaling"], w0.shape, False)
        with torch.no_grad():
            method.add_delta_(gm, rec, 1.0)
            torch.testing.assert_close(get_tensor(gm, rec["weight"]).double(), expected, rtol=0, atol=1e-6)
            method.add_delta_(gm, rec, -1.0)
            torch.testing.assert_close(get_tensor(gm, rec["weight"]), w0, rtol=0, atol=1e-6)
            get_tensor(gm, rec["weight"]).copy_(w0)


def test_adapter_file_round_trip_holds_the_support(llama, tmp_path):
    llama.save_adapter(tmp_path / "sltrain")
    _, state = read_adapter(tmp_path / "sltrain")
    assert {k for k in state if k.endswith("sltrain_indices")} == {r["tensors"]["indices"] for r in llama.adapters().values()}
    # another seed draws another support; loading the file brings this one back
    other = compile_model("llama", [gp.SLTrain(**LLAMA)], seed=1)
    rec = llama.adapters()["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(get_tensor(other.graph_module, rec["tensors"]["indices"]),
                           get_tensor(llama.graph_module, rec["tensors"]["indices"]))
    gp.load_adapter(other, tmp_path / "sltrain")
    with torch.no_grad():
        assert torch.equal(run(other, "llama"), run(llama, "llama"))


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    check_onnx_merged_and_unmerged(llama, tmp_path, parity, "sltrain llama")


def test_training_step_in_torch_and_onnxruntime(llama, tmp_path, parity):
    saved = llama.adapter_state_dict()
    indices = {r["tensors"]["indices"]: get_tensor(llama.graph_module, r["tensors"]["indices"]).clone()
               for r in llama.adapters().values()}
    # the step trains A, B and the values (trainable_parameters); onnxruntime runs all 8 AdamW steps
    result = check_training_export(llama, gp.optim.AdamW(lr=5e-2), tmp_path, steps=8, compared=8)
    assert_loss_falls(result.torch_losses)
    # the sparse values, B and A all trained (nearly every entry moved); the support did not
    for k in saved:
        assert (result.trained[k] != saved[k]).float().mean() > 0.9, k
    for name, idx in indices.items():
        assert torch.equal(get_tensor(llama.graph_module, name), idx)
    loss_diff, param_diff = result.record(parity, "sltrain llama", relative=False)
    assert loss_diff < 1e-4 and param_diff < 1e-4
