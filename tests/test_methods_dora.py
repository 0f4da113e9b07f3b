"""DoRA: structure, match count, parity with peft (outputs, gradients, merged weights), exact
merge, ONNX export merged and unmerged, and a verified training step run by torch and, exported,
by onnxruntime."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.errors import PlanError

from method_helpers import (assert_loss_falls, check_merge, check_onnx_merged_and_unmerged, check_structure,
                            check_training_export, compile_randomized, compiled_fixture, created_ops, llama_paths,
                            peft_model, run)
from models import tiny_llama

RULE = dict(targets=["q_proj", "v_proj"], r=4, alpha=8)
# per layer (no bias, no dropout): the detached norm of W + s·BA, the LoRA branch, the correction
DORA_OPS = ["detach", "detach", "mm", "mul", "add", "linalg_vector_norm", "div",
            "linear", "linear", "mul", "sub", "mul", "mul", "add", "add"]


def _peft_config(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, use_dora=True, **kw)


# randomized: magnitudes off ‖W + s·BA‖ too, so the m/n scale is exercised
llama = compiled_fixture("llama", [gp.DoRA(**RULE, init="random")])
# GPT-2's Conv1D: weight stored (in, out), a bias, addmm in the graph
gpt2 = compiled_fixture("gpt2", [gp.DoRA(targets=["c_attn"], r=4, alpha=8, init="random")])


def test_structure_roles_and_match_count(llama):
    paths = llama_paths("self_attn.q_proj", "self_attn.v_proj")
    check_structure(llama, paths, "insert_dora", "dora[q_proj,v_proj]")
    for path in paths:
        assert created_ops(llama, path) == DORA_OPS
    roles = llama.roles()
    sd = llama.adapter_state_dict()
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert sd[f"{q}.lora_A.weight"].shape == (4, 32) and sd[f"{q}.lora_B.weight"].shape == (32, 4)
    assert sd[f"{q}.lora_magnitude_vector"].shape == (32,) and sd[f"{v}.lora_magnitude_vector"].shape == (16,)
    assert all(roles[k] == gp.Role.ADAPTER for k in sd) and len(sd) == 12
    # q_proj 32x32: 4*32 + 32*4 + 32 = 288; v_proj 32->16: 128 + 64 + 16 = 208
    assert llama.num_parameters(trainable_only=True) == 2 * (288 + 208)


def test_plan_data_form_and_rejections(llama):
    assert gp.Plan.from_dict({"rules": [{"dora": {**RULE, "init": "random"}}]}) == llama.plan
    layers = gp.find_layers(llama.graph_module)
    plan = gp.Plan([gp.DoRA(targets=["embed_tokens"])])  # embeddings take DoRA, as in PEFT (test_compat_dora)
    assert [l.path for l in plan.resolve(layers).matches[plan.rules[0].name]] == ["model.embed_tokens"]
    with pytest.warns(gp.GraphPeftWarning, match="dora: r=64 on .* is larger than the layer"):  # as PEFT allows
        gp.Plan([gp.DoRA(targets=["k_proj"], r=64)]).resolve(layers)
    with pytest.raises(PlanError, match="init must be one of"):
        gp.DoRA(targets=["q_proj"], init="zeros")


def test_magnitude_init_and_identity_start(llama):
    # the magnitude starts at the row norm of W + s·BA (PEFT's update_layer)
    s = 8 / 4
    init = llama.initial_state
    for path in llama.adapters():
        w = gp.graph.get_tensor(llama.graph_module, f"{path}.weight")
        a, b = init[f"{path}.lora_A.weight"], init[f"{path}.lora_B.weight"]
        expected = torch.linalg.vector_norm(w + s * b @ a, dim=1)
        torch.testing.assert_close(init[f"{path}.lora_magnitude_vector"], expected)
    # with B = 0 and m = ‖W‖ (the default init) the model is the base model
    saved = llama.adapter_state_dict()
    fresh = dict(saved)
    for path in llama.adapters():
        fresh[f"{path}.lora_B.weight"] = torch.zeros_like(saved[f"{path}.lora_B.weight"])
        w = gp.graph.get_tensor(llama.graph_module, f"{path}.weight")
        fresh[f"{path}.lora_magnitude_vector"] = torch.linalg.vector_norm(w, dim=1)
    try:
        llama.load_adapter_state_dict(fresh)
        with torch.no_grad():
            diff = (run(llama, "llama") - run(tiny_llama(), "llama")).abs().max().item()
        assert diff < 1e-5
    finally:
        llama.load_adapter_state_dict(saved)


def test_peft_parity_outputs_and_gradients_llama(llama, parity):
    pm = peft_model("llama", _peft_config(target_modules=["q_proj", "v_proj"]), llama)
    weights = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(3))
    ours, ref = run(llama, "llama"), run(pm, "llama")
    assert parity.record("dora llama vs peft", (ours - ref).abs().max().item()) < 1e-5
    # gradients agree too: the norm is a constant for autograd in both (DoRA §4.3)
    params = llama.trainable_parameters()
    for p in params.values():
        p.grad = None
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    peft_params = dict(pm.named_parameters())
    for name, p in params.items():
        # peft: "<path>.lora_A.default.weight", "<path>.lora_magnitude_vector.default.weight"
        key = f"base_model.model.{name.removesuffix('.weight')}.default.weight"
        torch.testing.assert_close(p.grad, peft_params[key].grad, atol=1e-5, rtol=1e-4)
        p.grad = None


def test_peft_parity_gpt2_conv1d(gpt2, parity):
    pm = peft_model("gpt2", _peft_config(target_modules=["c_attn"], fan_in_fan_out=True), gpt2)
    with torch.no_grad():
        diff = (run(gpt2, "gpt2") - run(pm, "gpt2")).abs().max().item()
    assert parity.record("dora gpt2 vs peft", diff) < 1e-5


def test_dropout_recomputes_the_base_term_as_peft(parity):
    # with dropout PEFT recomputes x_d Wᵀ on the dropped-out input; same RNG -> same masks
    cm = compile_randomized("llama", [gp.DoRA(targets=["q_proj"], r=4, alpha=8, dropout=0.25, init="random")])
    ops = created_ops(cm, "model.layers.0.self_attn.q_proj")
    assert ops[ops.index("dropout"):ops.index("dropout") + 4] == ["dropout", "linear", "linear", "linear"]
    pm = peft_model("llama", _peft_config(target_modules=["q_proj"], lora_dropout=0.25), cm)
    pm.train()
    cm.train()
    with torch.no_grad():
        torch.manual_seed(5)
        ours = run(cm, "llama")
        torch.manual_seed(5)
        theirs = run(pm, "llama")
        cm.eval()
        pm.eval()
        assert (run(cm, "llama") - run(pm, "llama")).abs().max().item() < 1e-5
        assert (run(cm, "llama") - ours).abs().max().item() > 1e-3  # dropout was active in training
    assert parity.record("dora llama vs peft, dropout (train mode)", (ours - theirs).abs().max().item()) < 1e-5
    check_merge(cm, "llama")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_exact_and_matches_peft(arch, request):
    cm = request.getfixturevalue(arch)
    merged = check_merge(cm, arch)
    kw = dict(target_modules=["q_proj", "v_proj"]) if arch == "llama" else dict(target_modules=["c_attn"], fan_in_fan_out=True)
    peft_merged = peft_model(arch, _peft_config(**kw), cm).merge_and_unload().state_dict()
    for path in cm.adapters():
        ours = gp.graph.get_tensor(merged.graph_module, f"{path}.weight")
        torch.testing.assert_close(ours, peft_merged[f"{path}.weight"], atol=1e-6, rtol=1e-5)


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    check_onnx_merged_and_unmerged(llama, tmp_path, parity, "dora llama")


def test_training_step_in_torch_and_onnxruntime(gpt2, tmp_path, parity):
    # the step trains A, B and m (trainable_parameters); AdamW, 3 steps compared
    result = check_training_export(gpt2, gp.optim.AdamW(lr=3e-2), tmp_path, steps=12, compared=3)
    assert_loss_falls(result.torch_losses)
    loss_diff, param_diff = result.record(parity, "dora gpt2")
    assert loss_diff < 1e-4 and param_diff < 1e-4
