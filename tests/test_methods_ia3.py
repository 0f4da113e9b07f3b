"""IA3: structure (output vs input scaling), match count, parity with peft on Llama, GPT-2
(Conv1D, biases) and a CNN (conv2d), exact merge incl. biases, ONNX export, and a verified
training step run by torch and, exported, by onnxruntime."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.errors import PlanError
from graphpeft.graph import find_layers, iter_created

from method_helpers import (assert_loss_falls, check_merge, check_onnx_merged_and_unmerged, check_structure,
                            check_training_export, compiled_fixture, created_ops, llama_paths, peft_model, randomize,
                            run)
from models import image_batch, tiny_cnn, tiny_llama

# PEFT's defaults for Llama: keys, values and the feed-forward down-projection (input-scaled)
LLAMA = dict(targets=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
GPT2 = dict(targets=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])


def _peft_config(rule: dict):
    from peft import IA3Config

    return IA3Config(target_modules=rule["targets"], feedforward_modules=rule["feedforward_modules"],
                     fan_in_fan_out=rule is GPT2,
                     init_ia3_weights=True)


llama = compiled_fixture("llama", [gp.IA3(**LLAMA)])
gpt2 = compiled_fixture("gpt2", [gp.IA3(**GPT2)])


def test_structure_roles_and_match_count(llama):
    adapters = llama.adapters()
    check_structure(llama, llama_paths("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"), "insert_ia3",
                    "ia3[k_proj,v_proj,down_proj]")
    layers = {l.path: l for l in find_layers(llama.graph_module)}
    sd = llama.adapter_state_dict()
    for path, rec in adapters.items():
        assert created_ops(llama, path) == ["view", "mul"]
        mul = [n for n in iter_created(llama.graph_module, path) if n.op == "call_function"][-1]
        layer_op = layers[path].node
        if path.endswith("down_proj"):
            # input scaling: the scaled activation is what the layer op reads
            assert rec["feedforward"] and layer_op.args[0] is mul
            assert sd[f"{path}.ia3_l"].shape == (1, 64)
        else:
            # output scaling: the layer op's result is scaled
            assert not rec["feedforward"] and mul.args[0] is layer_op
            assert sd[f"{path}.ia3_l"].shape == (16, 1)
        assert llama.roles()[f"{path}.ia3_l"] == gp.Role.ADAPTER
    # one vector per adapted layer: k, v 16 outputs each, down_proj 64 inputs, in 2 layers
    assert llama.num_parameters(trainable_only=True) == 2 * (16 + 16 + 64)


def test_identity_init_data_form_and_rejections(llama):
    saved = llama.adapter_state_dict()
    try:
        llama.load_adapter_state_dict({k: torch.ones_like(v) for k, v in saved.items()})
        with torch.no_grad():
            assert (run(llama, "llama") - run(tiny_llama(), "llama")).abs().max().item() < 1e-6
    finally:
        llama.load_adapter_state_dict(saved)
    assert gp.Plan.from_dict([{"ia3": LLAMA}]) == llama.plan
    with pytest.raises(PlanError, match="does not support embedding"):
        gp.Plan([gp.IA3(targets=["embed_tokens"])]).resolve(find_layers(llama.graph_module))
    with pytest.raises(PlanError, match="feedforward_modules"):
        gp.IA3(targets=["q_proj"], feedforward_modules=[3])


@pytest.mark.parametrize("arch,rule", [("llama", LLAMA), ("gpt2", GPT2)])
def test_peft_parity(arch, rule, request, parity):
    cm = request.getfixturevalue(arch)
    pm = peft_model(arch, _peft_config(rule), cm)
    with torch.no_grad():
        diff = (run(cm, arch) - run(pm, arch)).abs().max().item()
    assert parity.record(f"ia3 {arch} vs peft", diff) < 1e-5


@pytest.mark.parametrize("arch,rule", [("llama", LLAMA), ("gpt2", GPT2)])
def test_merge_is_exact_and_matches_peft(arch, rule, request):
    cm = request.getfixturevalue(arch)
    merged = check_merge(cm, arch)
    peft_merged = peft_model(arch, _peft_config(rule), cm).merge_and_unload().state_dict()
    checked = 0
    for path, rec in cm.adapters().items():
        names = [rec["weight"]] + ([rec["bias"]] if rec.get("bias") else [])
        for name in names:  # output scaling rescales the bias too (GPT-2's c_attn)
            torch.testing.assert_close(gp.graph.get_tensor(merged.graph_module, name), peft_merged[name])
            checked += 1
    assert checked == (6 if arch == "llama" else 8)  # gpt2: biases too (scaled only on c_attn)


def test_conv2d_parity_and_merge(parity):
    from peft import IA3Config, get_peft_model, set_peft_model_state_dict

    x = image_batch()
    rule = dict(targets=["conv1", "layer1.conv2"], feedforward_modules=["layer1.conv2"])
    cm = gp.compile(tiny_cnn(), gp.Plan([gp.IA3(**rule)]), (x,))
    randomize(cm)
    sd = cm.adapter_state_dict()
    assert sd["conv1.ia3_l"].shape == (1, 8, 1, 1) and sd["layer1.conv2.ia3_l"].shape == (1, 8, 1, 1)
    pm = get_peft_model(tiny_cnn(), IA3Config(target_modules=rule["targets"],
                                              feedforward_modules=rule["feedforward_modules"]))
    set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in sd.items()})
    with torch.no_grad():
        ours = cm(x)
        assert parity.record("ia3 cnn (conv2d) vs peft", (ours - pm.eval()(x)).abs().max().item()) < 1e-5
        merged = cm.merge()
        assert gp.graph.op_count(merged.graph_module) == cm.base_op_count
        assert (merged(x) - ours).abs().max().item() < 1e-5


def test_onnx_merged_and_unmerged(gpt2, tmp_path, parity):
    check_onnx_merged_and_unmerged(gpt2, tmp_path, parity, "ia3 gpt2")


def test_training_step_in_torch_and_onnxruntime(llama, tmp_path, parity):
    # 192 scaling entries on a random tiny model: the loss moves slowly, but steadily; AdamW, 3
    # steps compared
    result = check_training_export(llama, gp.optim.AdamW(lr=0.1), tmp_path, steps=12, compared=3)
    assert_loss_falls(result.torch_losses, by=0.05)
    loss_diff, param_diff = result.record(parity, "ia3 llama")
    assert loss_diff < 1e-4 and param_diff < 1e-4
