"""RandLoRA: shared seeded bases (identical to peft's, dense and sparse), structure, match
count, parity with peft on Llama and GPT-2, exact merge (compared with peft's), ONNX export,
training (the step, its verified graph and its ONNX export), and PEFT folders both ways."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphpeft as gp
from graphpeft.errors import PlanError
from graphpeft.graph import get_tensor, iter_created, op_count
from graphpeft.infra import PassContext, PassManager, clone_graph_module
from graphpeft.passes.adapters.insert_randlora import InsertRandLoRA, shared_bases

from method_helpers import (IDS, QVD, assert_loss_falls, check_merge, check_onnx_merged_and_unmerged, check_structure,
                            check_training_export, compiled_fixture, created_ops, llama_paths, peft_model, run)
from models import tiny_gpt2, tiny_llama
from test_interop_peft import peft_saved

# Llama: q_proj 32->32 (in <= out), v_proj 32->16 and down_proj 64->32 (in > out); the bases are
# sized for (max out 32, max in 64): A (4, 1, 32), B (64, 8, 4). alpha 0.4: scaling 0.1.
LLAMA = dict(targets=["q_proj", "v_proj", "down_proj"], r=4, alpha=0.4)
GPT2 = dict(targets=["c_attn", "mlp.c_proj"], r=4, alpha=0.4)


def _peft_config(rule: dict, **kw):
    from peft import RandLoraConfig

    return RandLoraConfig(r=rule["r"], randlora_alpha=rule["alpha"], target_modules=rule["targets"], **kw)


def _shared(cm) -> dict:
    # peft keeps the bases at base_model.randlora_A / randlora_B
    return {f"base_model.{k}": get_tensor(cm.graph_module, k) for k in ("randlora_A", "randlora_B")}


def _diff(a, b, arch: str = "llama") -> float:
    with torch.no_grad():
        return (run(a, arch) - run(b, arch)).abs().max().item()


# cm.initial_state: the adapter tensors as compiled (default init), before randomize
llama = compiled_fixture("llama", [gp.RandLoRA(**LLAMA)])
gpt2 = compiled_fixture("gpt2", [gp.RandLoRA(**GPT2)])


def test_structure_roles_and_match_count(llama):
    paths = llama_paths(*QVD)
    check_structure(llama, paths, "insert_randlora", "randlora[q_proj,v_proj,down_proj]")
    ops = {p.rsplit(".", 1)[-1]: created_ops(llama, p) for p in paths[:3]}
    scale = ["unsqueeze", "mul", "unsqueeze", "mul", "view"]
    # q (in 32 <= out 32): B sliced to 32 rows; the input meets the scaled small bases first
    assert ops["q_proj"] == ["slice"] + scale + ["reshape", "linear", "linear", "mul", "add"]
    # v (32 -> 16): A sliced to 16 columns, B to 32 rows and 4 bases; the large bases come first
    large_first = ["reshape", "t", "linear", "t", "linear", "mul", "add"]
    assert ops["v_proj"] == ["slice", "slice", "slice"] + scale + large_first
    assert ops["down_proj"] == scale + large_first  # the largest layer: no slice
    roles = llama.roles()
    assert roles["randlora_A"] == roles["randlora_B"] == gp.Role.ADAPTER_CONST
    assert get_tensor(llama.graph_module, "randlora_A").shape == (4, 1, 32)
    assert get_tensor(llama.graph_module, "randlora_B").shape == (64, 8, 4)
    for p in paths:  # each adapter reads the shared bases through its own stamped get_attr node
        reads = [n.target for n in iter_created(llama.graph_module, p) if n.op == "get_attr"]
        assert sorted(reads) == sorted([f"{p}.randlora_lambda", f"{p}.randlora_gamma", "randlora_A", "randlora_B"])
    sd = llama.adapter_state_dict()
    assert "randlora_A" not in sd and len(sd) == 12  # constants are regenerated, not saved
    assert sd["model.layers.0.self_attn.q_proj.randlora_lambda"].shape == (4, 8)  # (r, ceil(32 / 4))
    assert sd["model.layers.0.self_attn.v_proj.randlora_gamma"].shape == (4, 16)  # (n, min(in, out))
    # per layer r·n + n·d: q 32 + 256, v 16 + 64, down 32 + 256
    assert llama.num_parameters(trainable_only=True) == 2 * (288 + 80 + 288)


@pytest.mark.parametrize("variant", [{}, {"sparse": True}, {"very_sparse": True}])
def test_bases_equal_peft(llama, variant):
    from peft import get_peft_model

    pm = get_peft_model(tiny_llama(), _peft_config(LLAMA, projection_prng_key=3 if variant else 0, **variant))
    theirs = [pm.base_model.randlora_A["default"], pm.base_model.randlora_B["default"]]
    if variant:  # the generator alone (the compiled path is the same call, checked on the fixture)
        ours = list(shared_bases(4, 32, 64, 3, **variant))
        assert all(t.unique().numel() == 3 for t in ours)  # ternary, normalised by their std
    else:
        ours = list(_shared(llama).values())
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_defaults_and_identity_init(llama):
    from peft import get_peft_model

    fresh = gp.RandLoRA(targets=["q_proj"])
    assert (fresh.r, fresh.alpha, fresh.dropout, fresh.projection_prng_key, fresh.sparse, fresh.very_sparse) == \
        (32, 640, 0.0, 0, False, False)  # peft's defaults
    assert fresh.scaling == 20.0
    # our default init (λ = 0, γ = 1/max(n, d)) is peft's, and it is the identity
    pm = get_peft_model(tiny_llama(), _peft_config(LLAMA))
    init = {k.removeprefix("base_model.model.").replace(".default", ""): v.detach()
            for k, v in pm.named_parameters() if "randlora_" in k}
    ours = llama.initial_state
    assert set(init) == set(ours) and all(torch.equal(ours[k], init[k]) for k in init)
    gamma = ours["model.layers.0.self_attn.v_proj.randlora_gamma"]
    assert torch.equal(gamma, torch.full((4, 16), 1 / 16))
    saved = llama.adapter_state_dict()
    try:
        llama.load_adapter_state_dict(init)
        assert _diff(llama, tiny_llama()) < 1e-6
    finally:
        llama.load_adapter_state_dict(saved)


def test_rejections(llama):
    layers = gp.find_layers(llama.graph_module)
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.RandLoRA(targets=["embed_tokens"])]).resolve(layers)
    with pytest.raises(PlanError, match="same r, projection_prng_key"):
        InsertRandLoRA([gp.RandLoRA(targets=["q_proj"], r=4), gp.RandLoRA(targets=["k_proj"], r=8)])
    for bad, match in [({"r": 0}, "r must be"), ({"dropout": 1.0}, "dropout"), ({"sparse": "yes"}, "sparse"),
                       ({"init": "zeros"}, "init"), ({"projection_prng_key": 1.5}, "projection_prng_key")]:
        with pytest.raises(PlanError, match=match):
            gp.RandLoRA(targets=["q_proj"], **bad)
    assert gp.Plan.from_dict([{"randlora": LLAMA}]) == llama.plan


@pytest.mark.parametrize("arch,rule", [("llama", LLAMA), ("gpt2", GPT2)])
def test_peft_parity(arch, rule, request, parity):
    cm = request.getfixturevalue(arch)
    pm = peft_model(arch, _peft_config(rule, fan_in_fan_out=arch == "gpt2"), cm, _shared(cm))
    assert _diff(cm, tiny_llama() if arch == "llama" else tiny_gpt2(), arch) > 0.05  # the adapters do something
    assert parity.record(f"randlora {arch} vs peft", _diff(cm, pm, arch)) < 1e-5


@pytest.mark.parametrize("arch,rule", [("llama", LLAMA), ("gpt2", GPT2)])
def test_merge_is_exact_and_matches_peft(arch, rule, request, parity):
    cm = request.getfixturevalue(arch)
    merged = check_merge(cm, arch)
    parity.record(f"randlora {arch} merged vs unmerged", _diff(merged, cm, arch))
    assert "randlora_A" not in merged.roles()
    pm = peft_model(arch, _peft_config(rule, fan_in_fan_out=arch == "gpt2"), cm, _shared(cm))
    peft_merged = pm.merge_and_unload().state_dict()
    worst = 0.0
    for rec in cm.adapters().values():
        ours = get_tensor(merged.graph_module, rec["weight"])
        torch.testing.assert_close(ours, peft_merged[rec["weight"]])
        worst = max(worst, (ours - peft_merged[rec["weight"]]).abs().max().item())
    parity.record(f"randlora {arch} merged weights vs peft merge_and_unload", worst)


def test_merging_one_layer_keeps_the_shared_bases(llama):
    gm = clone_graph_module(llama.graph_module)
    path = "model.layers.0.self_attn.v_proj"
    before = op_count(gm)
    branch_ops = len(created_ops(llama, path))
    gm = PassManager().run(gm, [gp.passes.MergeAdapters([path]), gp.passes.RemoveDeadCode()], PassContext()).gm
    assert op_count(gm) == before - branch_ops
    assert "randlora_B" in gp.graph.roles(gm) and path not in gp.graph.adapters(gm)
    assert f"{path}.randlora_lambda" not in gp.graph.roles(gm)
    with torch.no_grad():
        expected = llama.graph_module(*llama.example_inputs)
        got = gm(*llama.example_inputs)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-5


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    check_onnx_merged_and_unmerged(llama, tmp_path, parity, "randlora llama")


def test_training_step_loss_falls_verifies_and_runs_in_onnxruntime(gpt2, tmp_path, parity):
    # the step trains λ and γ only (trainable_parameters); onnxruntime runs all 12 AdamW steps
    result = check_training_export(gpt2, gp.optim.AdamW(lr=0.05), tmp_path, steps=12, compared=12)
    assert_loss_falls(result.torch_losses, by=0.05)
    diff = parity.record("randlora gpt2 12 adamw steps onnxruntime vs torch", result.param_diff)
    assert diff < 1e-5 and result.loss_diff < 1e-5


# --- PEFT folders -----------------------------------------------------------------------------------


def test_export_loads_into_peft(llama, tmp_path, parity):
    from peft import PeftModel

    gp.export_peft(llama, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["randlora_alpha"], config["save_projection"]) == \
        ("RANDLORA", 4, 0.4, True)
    state = load_file(tmp_path / "adapter_model.safetensors")
    # peft's layout: the bases on the tuner and again under every layer, plus λ and γ per layer
    assert len(state) == 2 + 6 * 4 and state["base_model.randlora_A"].shape == (4, 1, 32)
    copy = state["base_model.model.model.layers.1.mlp.down_proj.randlora_B"]
    assert torch.equal(copy, state["base_model.randlora_B"])
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert parity.record("randlora export_peft -> PeftModel.from_pretrained", _diff(llama, pm)) < 1e-5


def _peft_saved(folder, save_projection: bool):
    # sparse bases and a non-default key: both must come through the config
    config = _peft_config(dict(targets=["q_proj", "down_proj"], r=8, alpha=2.0), projection_prng_key=11, sparse=True,
                          save_projection=save_projection)
    return peft_saved(config, folder)  # random adapter tensors, saved by peft


def test_peft_folders_import(llama, tmp_path, parity):
    # without saved projections our bases are regenerated from the key, equal to peft's
    bare = _peft_saved(tmp_path / "bare", save_projection=False)
    cm = gp.import_peft(tiny_llama(), tmp_path / "bare", (IDS,), {"use_cache": False}).eval()
    (rule,) = cm.plan.rules
    assert (type(rule), rule.r, rule.alpha, rule.projection_prng_key, rule.sparse) == (gp.RandLoRA, 8, 2.0, 11, True)
    assert parity.record("randlora import_peft (save_projection=False) vs peft", _diff(cm, bare)) < 1e-5
    # peft's default file repeats the bases under every layer; onto a compiled model, as a name
    full = _peft_saved(tmp_path / "full", save_projection=True)
    gp.import_peft(cm, tmp_path / "full", adapter_name="full")
    cm.set_adapter("full")
    assert parity.record("randlora import_peft (save_projection=True) vs peft", _diff(cm, full)) < 1e-5
    # nothing lost: exporting the import gives peft's file back, tensor for tensor
    gp.export_peft(cm, tmp_path / "again", adapter_name="full")
    theirs = load_file(tmp_path / "full" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    # a file whose per-layer copy of a basis differs from the shared one is refused, model unchanged
    theirs["base_model.model.model.layers.0.self_attn.q_proj.randlora_A"] += 1
    save_file(theirs, tmp_path / "full" / "adapter_model.safetensors")
    with pytest.raises(gp.AdapterFileError, match="should repeat base_model.randlora_A"):
        gp.import_peft(cm, tmp_path / "full", adapter_name="broken")
    assert cm.adapter_names == ["default", "full"]
