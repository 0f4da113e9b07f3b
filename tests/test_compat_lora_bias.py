"""PEFT's ``lora_bias=True`` (issue 14): LoRA's B gets a bias, scaled with the branch; merging adds
it to the layer's bias. ``peft`` is the oracle (outputs, merge, both folder directions)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import graphpeft as gp

TARGETS = ["conv", "fc1", "fc2"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=TARGETS, r=4, alpha=8, init="random", lora_bias=True)]), (x,))
    return model, x, cm


def _peft(model, cm):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True))
    res = set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
    assert not res.unexpected_keys
    return pm.eval()


def test_structure_and_matches_peft(setup):
    model, x, cm = setup
    params = cm.trainable_parameters()
    assert sorted(k for k in params if k.endswith("lora_B.bias")) == [f"{t}.lora_B.bias" for t in sorted(TARGETS)]
    assert all(params[f"{t}.lora_B.bias"].abs().sum() > 0 for t in TARGETS)  # init="random": nonzero
    assert {r["bias"] for r in cm.adapters().values()} == {f"{t}.bias" for t in TARGETS}
    pm = _peft(model, cm)
    with torch.no_grad():
        assert (cm(x) - pm(x)).abs().max().item() < 1e-6
        merged = cm.merge()
        assert (merged(x) - pm(x)).abs().max().item() < 1e-5
        pm.merge_adapter()
        assert (merged(x) - pm(x)).abs().max().item() < 1e-5
    for t in TARGETS:  # merge adds s·b_B to the layer bias, exactly
        want = getattr(model, t).bias + 2.0 * params[f"{t}.lora_B.bias"]
        assert torch.equal(merged.graph_module.get_parameter(f"{t}.bias"), want.detach())
    assert not any(k.endswith("lora_B.bias") for k in merged.roles())


def test_fresh_adapter_is_the_identity():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 6, 6)
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=TARGETS, r=4, lora_bias=True)]), (x,))
    assert all(cm.trainable_parameters()[f"{t}.lora_B.bias"].abs().sum() == 0 for t in TARGETS)
    with torch.no_grad():
        assert torch.equal(cm(x), model(x))


def test_folders_both_ways(setup, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, x, cm = setup
    gp.export_peft(cm, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_bias"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that 1-D lora_B tensors look like unsharded ZeRO shards
        back = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "out")).eval()
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                             lora_bias=True, init_lora_weights=False))
        pm.save_pretrained(str(tmp_path / "peft"))
    imported = gp.import_peft(copy.deepcopy(model), tmp_path / "peft", (x,))
    assert imported.plan.rules[0].lora_bias is True
    with torch.no_grad():
        assert (back(x) - cm(x)).abs().max().item() < 1e-6
        assert (imported(x) - pm.eval()(x)).abs().max().item() < 1e-6


def test_training_and_fusing(setup):
    model, x, _ = setup
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=TARGETS, r=4, alpha=8, init="random", lora_bias=True)]), (x,))
    before = cm.trainable_parameters()["fc2.lora_B.bias"].detach().clone()
    cm.compile_training("mse", gp.optim.SGD(lr=0.1))(x, torch.randn(2, 4))
    assert not torch.equal(before, cm.trainable_parameters()["fc2.lora_B.bias"])
    with torch.no_grad():
        out = cm(x)
        bias = cm.graph_module.get_parameter("fc2.bias").detach().clone()
        cm.fuse_adapter("default")
        assert (cm(x) - out).abs().max().item() < 1e-5
        cm.unfuse_adapter()
        assert (cm.graph_module.get_parameter("fc2.bias") - bias).abs().max().item() < 1e-6


def test_refusals():
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(gp.PlanError, match="lora_bias is an option of plain LoRA"):
        gp.DoRA(targets=["fc1"], lora_bias=True)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(gp.PlanError, match="not supported on embedding layers"):
        gp.compile(emb, gp.Plan([gp.LoRA(targets=["0"], r=2, lora_bias=True)]), (torch.tensor([[1, 2]]),))
    net = Net().eval()
    net.fc2 = nn.Linear(10, 4, bias=False)
    with pytest.warns(gp.GraphPeftWarning, match="fc2, which has no bias.*cannot be merged"):
        cm = gp.compile(net, gp.Plan([gp.LoRA(targets=["fc2"], r=2, lora_bias=True, init="random")]), (x,))
    cm(x)  # trains and runs unmerged
    with pytest.raises(gp.GraphPeftError, match="no bias to add it to.*merged=False"):
        cm.merge()
