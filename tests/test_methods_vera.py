"""VeRA: shared seeded projections (identical to peft's), structure, match count, parity with
peft on Llama and GPT-2, exact merge (all layers, and one layer while others share the
projections), ONNX export, and a verified training step run by torch and, exported, by
onnxruntime."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.errors import PlanError
from graphpeft.graph import get_tensor, iter_created, op_count
from graphpeft.infra import PassContext, PassManager, clone_graph_module

from method_helpers import (QVD, assert_loss_falls, check_merge, check_onnx_merged_and_unmerged, check_structure,
                            check_training_export, compile_model, compiled_fixture, created_ops, llama_paths,
                            peft_model, randomize, run)
from models import tiny_llama

# v_proj (32 -> 16) and down_proj (64 -> 32) use slices of the (4, 64) / (32, 4) projections
LLAMA = dict(targets=["q_proj", "v_proj", "down_proj"], r=4)
GPT2 = dict(targets=["c_attn", "mlp.c_proj"], r=4)


def _peft_config(rule: dict, **kw):
    from peft import VeraConfig

    return VeraConfig(r=rule["r"], target_modules=rule["targets"], projection_prng_key=0, **kw)


def _shared(cm) -> dict:
    # peft keeps the projections at base_model.vera_A / vera_B
    return {f"base_model.{k}": get_tensor(cm.graph_module, k) for k in ("vera_A", "vera_B")}


llama = compiled_fixture("llama", [gp.VeRA(**LLAMA)])
gpt2 = compiled_fixture("gpt2", [gp.VeRA(**GPT2)])


def test_structure_roles_and_match_count(llama):
    paths = llama_paths(*QVD)
    check_structure(llama, paths, "insert_vera", "vera[q_proj,v_proj,down_proj]")
    ops = {p.rsplit(".", 1)[-1]: created_ops(llama, p) for p in paths[:3]}
    branch = ["linear", "mul", "linear", "mul", "add"]
    assert ops["q_proj"] == ["slice"] + branch  # in 32 < 64: A sliced, out 32 = max: B whole
    assert ops["v_proj"] == ["slice", "slice"] + branch
    assert ops["down_proj"] == branch  # the largest layer reads both whole
    roles = llama.roles()
    assert roles["vera_A"] == roles["vera_B"] == gp.Role.ADAPTER_CONST
    assert get_tensor(llama.graph_module, "vera_A").shape == (4, 64)
    assert get_tensor(llama.graph_module, "vera_B").shape == (32, 4)
    # every adapter reads the shared projections through its own stamped get_attr node
    for p in paths:
        reads = [n.target for n in iter_created(llama.graph_module, p) if n.op == "get_attr"]
        assert sorted(reads) == sorted([f"{p}.vera_lambda_b", f"{p}.vera_lambda_d", "vera_A", "vera_B"])
    sd = llama.adapter_state_dict()
    assert "vera_A" not in sd and len(sd) == 12  # constants are regenerated, not saved
    assert sd["model.layers.0.self_attn.q_proj.vera_lambda_b"].shape == (32,)
    assert sd["model.layers.0.self_attn.q_proj.vera_lambda_d"].shape == (4,)
    # per layer: out + r  (q 32+4, v 16+4, down 32+4)
    assert llama.num_parameters(trainable_only=True) == 2 * (36 + 20 + 36)


def test_projections_equal_peft_and_default_init(llama):
    from peft import get_peft_model

    pm = get_peft_model(tiny_llama(), _peft_config(LLAMA))
    for ours, theirs in zip(_shared(llama).values(), (pm.base_model.vera_A["default"], pm.base_model.vera_B["default"])):
        assert torch.equal(ours, theirs)
    fresh = gp.passes.VeRA(**LLAMA)
    assert (fresh.r, fresh.d_initial, fresh.projection_prng_key) == (4, 0.1, 0)
    assert gp.VeRA(targets=["q_proj"]).r == 256  # the published default
    # the default init (λ_b = 0, λ_d = d_initial) is the identity, as in peft
    saved = llama.adapter_state_dict()
    init = {k: (torch.zeros_like(v) if k.endswith("lambda_b") else torch.full_like(v, 0.1)) for k, v in saved.items()}
    peft_init = {k.removeprefix("base_model.model.").replace(".default", ""): v.detach()
                 for k, v in pm.named_parameters() if "vera_lambda" in k}
    assert set(peft_init) == set(init) and all(torch.equal(init[k], peft_init[k]) for k in init)
    try:
        llama.load_adapter_state_dict(init)
        with torch.no_grad():
            assert (run(llama, "llama") - run(tiny_llama(), "llama")).abs().max().item() < 1e-6
    finally:
        llama.load_adapter_state_dict(saved)


def test_rejections(llama):
    layers = gp.find_layers(llama.graph_module)
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.VeRA(targets=["embed_tokens"])]).resolve(layers)
    with pytest.raises(PlanError, match="same r and projection_prng_key"):
        gp.passes.InsertVeRA([gp.VeRA(targets=["q_proj"], r=4), gp.VeRA(targets=["k_proj"], r=8)])
    assert gp.Plan.from_dict([{"vera": LLAMA}]) == llama.plan


@pytest.mark.parametrize("arch,rule", [("llama", LLAMA), ("gpt2", GPT2)])
def test_peft_parity(arch, rule, request, parity):
    cm = request.getfixturevalue(arch)
    pm = peft_model(arch, _peft_config(rule, fan_in_fan_out=arch == "gpt2"), cm, _shared(cm))
    with torch.no_grad():
        diff = (run(cm, arch) - run(pm, arch)).abs().max().item()
    assert parity.record(f"vera {arch} vs peft", diff) < 1e-5


@pytest.mark.parametrize("arch,rule", [("llama", LLAMA), ("gpt2", GPT2)])
def test_merge_is_exact_and_matches_peft(arch, rule, request):
    cm = request.getfixturevalue(arch)
    merged = check_merge(cm, arch)
    assert "vera_A" not in merged.roles()
    pm = peft_model(arch, _peft_config(rule, fan_in_fan_out=arch == "gpt2"), cm, _shared(cm))
    peft_merged = pm.merge_and_unload().state_dict()
    for rec in cm.adapters().values():
        torch.testing.assert_close(get_tensor(merged.graph_module, rec["weight"]), peft_merged[rec["weight"]])


def test_merging_one_layer_keeps_the_shared_projections(llama):
    gm = clone_graph_module(llama.graph_module)
    path = "model.layers.0.self_attn.v_proj"
    before = op_count(gm)
    branch_ops = len(created_ops(llama, path))
    result = PassManager().run(gm, [gp.passes.MergeAdapters([path]), gp.passes.RemoveDeadCode()], PassContext())
    gm = result.gm
    assert op_count(gm) == before - branch_ops
    assert "vera_A" in gp.graph.roles(gm) and path not in gp.graph.adapters(gm)
    assert f"{path}.vera_lambda_b" not in gp.graph.roles(gm)
    with torch.no_grad():
        expected = llama.graph_module(*llama.example_inputs)
        got = gm(*llama.example_inputs)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-5


def test_mixed_plan_saves_and_reloads_with_regenerated_constants(tmp_path):
    # all four first-wave methods in one plan; the adapter file holds only trainable tensors
    # (adapter-const ones, vera_A/B and LoRA-FA's A, are regenerated from the seeds on compile)
    rules = lambda: [gp.VeRA(targets=["q_proj"], r=4), gp.IA3(targets=["k_proj"]),  # noqa: E731
                     gp.DoRA(targets=["v_proj"], r=2), gp.LoRAFA(targets=["o_proj"], r=2)]
    cm = compile_model("llama", rules())
    assert {r["method"] for r in cm.adapters().values()} == {"vera", "ia3", "dora", "lora_fa"}
    randomize(cm)
    cm.save_adapter(tmp_path / "adapter")
    other = compile_model("llama", rules())
    gp.load_adapter(other, tmp_path / "adapter")
    with torch.no_grad():
        assert (run(other, "llama") - run(cm, "llama")).abs().max().item() == 0
    check_merge(other, "llama")


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    check_onnx_merged_and_unmerged(llama, tmp_path, parity, "vera llama")


def test_training_step_in_torch_and_onnxruntime(gpt2, tmp_path, parity):
    # the step trains the vectors only (trainable_parameters), and its graph verifies: the shared
    # projections (adapter-const) are read through stamped get_attr nodes; AdamW, 3 steps compared
    result = check_training_export(gpt2, gp.optim.AdamW(lr=0.1), tmp_path, steps=12, compared=3)
    assert_loss_falls(result.torch_losses, by=0.05)
    loss_diff, param_diff = result.record(parity, "vera gpt2")
    assert loss_diff < 1e-4 and param_diff < 1e-4
