"""PEFT's rank rule (issue 14): a LoRA rank larger than the layer is allowed with a warning, and a
convolution's bound counts its kernel. ``peft`` is the oracle: the same adapter tensors give the
same outputs, unmerged and merged, and graphpeft's exported folder loads into peft."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import graphpeft as gp


class ConvMLP(torch.nn.Module):
    """Conv2d(5, 10, 3) (45 inputs with the kernel) feeding two small linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(5, 10, 3)
        self.lin = torch.nn.Linear(10, 4)
        self.out = torch.nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lin(self.conv(x).mean((2, 3))))


TARGETS = ["conv", "lin", "out"]


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    return ConvMLP().eval(), torch.randn(2, 5, 8, 8)


def _peft_model(model, cm, r):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=16, target_modules=TARGETS))
    res = set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
    assert not res.unexpected_keys
    return pm.eval()


def _compile(model, x, r):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = gp.compile(model, gp.Plan([gp.LoRA(targets=TARGETS, r=r, alpha=16, init="random")]), (x,))
    msgs = sorted({str(w.message) for w in caught if issubclass(w.category, gp.GraphPeftWarning)})
    return cm, msgs


@pytest.mark.parametrize("r", [8, 45, 50])
def test_rank_above_the_layer_matches_peft(model_and_input, r):
    model, x = model_and_input
    cm, msgs = _compile(model, x, r)
    # lin (10 -> 4) and out (4 -> 6) bound r by 4: warned; conv's bound is 5·3·3 = 45 inputs vs 10 outputs
    warned = {m.split(" on ")[1].split(" ")[0] for m in msgs}
    assert warned == ({"lin", "out"} if r <= 10 else {"conv", "lin", "out"})
    assert all("allowed, as in PEFT" in m for m in msgs)
    assert cm.trainable_parameters()["conv.lora_A.weight"].shape == (r, 5, 3, 3)
    pm = _peft_model(model, cm, r)
    with torch.no_grad():
        assert (cm(x) - pm(x)).abs().max().item() == 0.0
        assert (cm.merge()(x) - pm(x)).abs().max().item() < 1e-5


def test_conv_message_names_the_kernel(model_and_input):
    model, x = model_and_input
    _, msgs = _compile(model, x, 50)
    conv = next(m for m in msgs if " on conv " in m)
    assert "(5 channels x 3x3 kernel = 45 inputs -> 10)" in conv and "use r <= 10" in conv


def test_large_rank_exports_to_peft_and_back(model_and_input, tmp_path):
    from peft import PeftModel

    model, x = model_and_input
    cm, _ = _compile(model, x, 8)
    gp.export_peft(cm, tmp_path / "a")
    pm = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a")).eval()
    back = gp.import_peft(copy.deepcopy(model), tmp_path / "a", (x,))
    with torch.no_grad():
        assert (pm(x) - cm(x)).abs().max().item() == 0.0
        assert (back(x) - cm(x)).abs().max().item() == 0.0


@pytest.mark.parametrize("rule", [gp.DoRA, gp.LoRAFA, gp.SoRA])
def test_lora_family_warns_too(model_and_input, rule):
    model, x = model_and_input
    layers = gp.find_layers(gp.trace(model, (x,)).gm)
    with pytest.warns(gp.GraphPeftWarning, match=rf"{rule.key}: r=6 on out is larger than the layer \(4 -> 6\)"):
        plan = gp.Plan([rule(targets=["out"], r=6)])
        res = plan.resolve(layers)
    assert [l.path for l in res.matches[plan.rules[0].name]] == ["out"]


def test_decomposition_methods_still_refuse(model_and_input):
    """LoRA-XS / SVFit / LoLDU take r directions of W's decomposition: r above the layer is
    impossible there, so it stays a PlanError (with the bound to use)."""
    model, x = model_and_input
    layers = gp.find_layers(gp.trace(model, (x,)).gm)
    for rule in (gp.LoRAXS(targets=["lin"], r=5), gp.SVFit(targets=["lin"], r=5), gp.LoLDU(targets=["lin"], r=5)):
        with pytest.raises(gp.PlanError, match=r"rank r=5 is larger than the layer \(10 -> 4\); use r <= 4"):
            gp.Plan([rule]).resolve(layers)


def test_rank_within_the_layer_does_not_warn(model_and_input):
    model, x = model_and_input
    layers = gp.find_layers(gp.trace(model, (x,)).gm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gp.GraphPeftWarning)
        gp.Plan([gp.LoRA(targets=TARGETS, r=4)]).resolve(layers)
