"""LoRA and IA3 on Conv1d, Conv3d, grouped and ``padding="same"`` convolutions (issue 14), as
PEFT has them: LoRA's ``A`` is an ungrouped convolution like the layer's (kernel, stride,
padding), ``B`` a 1x1 convolution with the layer's groups (so ``r`` must be a multiple of them,
and a grouped layer's adapter cannot merge); IA3's vector is ``(1, C, 1...)``. ``peft`` is the
oracle: outputs unmerged and merged, folders both ways; then ONNX and a training step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import graphpeft as gp

aten = torch.ops.aten


class Convs(nn.Module):
    """A Conv1d, a Conv3d, a grouped Conv2d and a ``padding="same"`` Conv2d feeding a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c3 = nn.Conv3d(2, 4, 3, stride=2)
        self.g = nn.Conv2d(4, 8, 3, groups=2)
        self.same = nn.Conv2d(8, 4, 3, padding="same")
        self.lin = nn.Linear(6 + 4 + 4, 5)

    def forward(self, a, b, c):
        h = torch.cat([self.c1(a).mean(-1), self.c3(b).mean((2, 3, 4)), self.same(self.g(c)).mean((2, 3))], -1)
        return self.lin(h)


ALL = ["c1", "c3", "g", "same", "lin"]
MERGEABLE = ["c1", "c3", "same", "lin"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    return Convs().eval(), (torch.randn(2, 4, 8), torch.randn(2, 2, 5, 5, 5), torch.randn(2, 4, 6, 6))


@pytest.fixture(scope="module")
def lora_all(setup):
    model, xs = setup
    return gp.compile(model, gp.Plan([gp.LoRA(targets=ALL, r=4, alpha=8, init="random")]), xs)


@pytest.fixture(scope="module")
def lora_mergeable(setup):
    model, xs = setup
    return gp.compile(model, gp.Plan([gp.LoRA(targets=MERGEABLE, r=3, alpha=6, init="random", lora_bias=True)]), xs)


def _peft(model, cm, config):
    from peft import get_peft_model, set_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that a grouped layer's adapter cannot merge
        pm = get_peft_model(copy.deepcopy(model), config)
    res = set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
    assert not res.unexpected_keys
    return pm.eval()


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_layers_found(setup):
    model, xs = setup
    layers = {l.path: l for l in gp.find_layers(gp.trace(model, xs).gm)}
    assert sorted(layers) == sorted(ALL)
    assert layers["g"].in_features == 4 and layers["g"].out_features == 8  # every input channel, not in/groups
    assert layers["same"].node.target == aten.conv2d.padding and layers["c3"].node.target == aten.conv3d.default


def test_lora_matches_peft(setup, lora_all, tmp_path):
    from peft import LoraConfig, PeftModel

    model, xs = setup
    cm = lora_all
    t = cm.trainable_parameters()
    assert t["c3.lora_A.weight"].shape == (4, 2, 3, 3, 3) and t["c3.lora_B.weight"].shape == (4, 4, 1, 1, 1)
    assert t["g.lora_A.weight"].shape == (4, 4, 3, 3) and t["g.lora_B.weight"].shape == (8, 2, 1, 1)  # B grouped
    pm = _peft(model, cm, LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    with torch.no_grad():
        assert _diff(cm(*xs), pm(*xs)) == 0.0
        with pytest.raises(gp.GraphPeftError, match="grouped convolution.*merged=False"):
            cm.merge()
    gp.export_peft(cm, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert _diff(back(*xs), cm(*xs)) == 0.0


def test_lora_merges_without_the_grouped_layer(setup, lora_mergeable, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, xs = setup
    cm = lora_mergeable
    pm = _peft(model, cm, LoraConfig(r=3, lora_alpha=6, target_modules=MERGEABLE, lora_bias=True))
    with torch.no_grad():
        assert _diff(cm(*xs), pm(*xs)) < 1e-6
        merged = cm.merge()
        pm.merge_adapter()
        assert _diff(merged(*xs), pm(*xs)) < 1e-5
    # a folder PEFT wrote imports here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=ALL,
                                                                 init_lora_weights=False)).eval()
        theirs.save_pretrained(str(tmp_path / "peft"))
    imported = gp.import_peft(copy.deepcopy(model), tmp_path / "peft", xs)
    with torch.no_grad():
        assert _diff(imported(*xs), theirs(*xs)) < 1e-6


def test_ia3_matches_peft(setup, tmp_path):
    from peft import IA3Config, PeftModel, get_peft_model

    model, xs = setup
    targets, ff = ["c3", "g", "same", "lin"], ["g", "c3"]
    cm = gp.compile(model, gp.Plan([gp.IA3(targets=targets, feedforward_modules=ff, init="random")]), xs)
    t = cm.trainable_parameters()
    assert t["c3.ia3_l"].shape == (1, 2, 1, 1, 1) and t["g.ia3_l"].shape == (1, 4, 1, 1)
    pm = _peft(model, cm, IA3Config(target_modules=targets, feedforward_modules=ff))
    with torch.no_grad():
        assert _diff(cm(*xs), pm(*xs)) == 0.0
        merged = cm.merge()  # the grouped layer's input vector laid out per group
        assert _diff(merged(*xs), pm(*xs)) < 1e-6
        pm.merge_adapter()
        assert _diff(merged(*xs), pm(*xs)) < 1e-6
    gp.export_peft(cm, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    theirs = get_peft_model(copy.deepcopy(model), IA3Config(target_modules=targets, feedforward_modules=ff,
                                                            init_ia3_weights=False)).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    imported = gp.import_peft(copy.deepcopy(model), tmp_path / "peft", xs)
    with torch.no_grad():
        assert _diff(back(*xs), cm(*xs)) == 0.0
        assert _diff(imported(*xs), theirs(*xs)) == 0.0


def test_ia3_on_conv1d_works_but_is_not_a_peft_adapter(setup, tmp_path):
    model, xs = setup
    cm = gp.compile(model, gp.Plan([gp.IA3(targets=["c1"], feedforward_modules=["c1"], init="random")]), xs)
    assert cm.trainable_parameters()["c1.ia3_l"].shape == (1, 4, 1)
    with torch.no_grad():
        assert _diff(cm(*xs), model(*xs)) > 1e-3
        assert _diff(cm.merge()(*xs), cm(*xs)) < 1e-6
    with pytest.raises(gp.AdapterFileError, match="PEFT's IA3 has no nn.Conv1d layer"):
        gp.export_peft(cm, tmp_path / "x")
    assert not (tmp_path / "x" / "adapter_config.json").exists()


def test_rank_not_a_multiple_of_groups_is_refused(setup):
    model, xs = setup
    with pytest.raises(gp.PlanError, match=r"groups=2 and r=3 is not a multiple of it.*use r = 2"):
        gp.compile(model, gp.Plan([gp.LoRA(targets=["g"], r=3)]), xs)


def test_onnx_and_training(setup, lora_all, lora_mergeable, tmp_path):
    from graphpeft.backends.onnx import OnnxRunner

    _, xs = setup
    for cm, merged in ((lora_all, False), (lora_mergeable, True)):
        cm.export_onnx(tmp_path / "m.onnx", merged=merged)
        with torch.no_grad():
            want = (cm.merge() if merged else cm)(*xs)
        assert _diff(torch.from_numpy(OnnxRunner(tmp_path / "m.onnx").run(list(xs))[0]), want) < 1e-5
    cm = lora_all
    saved = cm.adapter_state_dict()
    step = cm.compile_training("mse", gp.optim.SGD(lr=0.1))
    target = torch.randn(2, 5)
    losses = [float(step(*xs, target)) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert all(not torch.equal(saved[k], v) for k, v in cm.trainable_parameters().items())
    cm.load_adapter_state_dict(saved)


def test_grouped_training_in_onnxruntime(tmp_path):
    """The ONNX step computes a grouped convolution's weight gradient (LoRA's grouped B, and a
    grouped Conv2d with stride and dilation / a grouped Conv3d trained in full) as torch does."""
    from graphpeft.backends.onnx import OnnxTrainer

    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Conv2d(6, 9, 3, groups=3, stride=2, dilation=2, padding=1)
            self.h = nn.Conv3d(4, 4, 2, groups=2)
            self.lin = nn.Linear(13, 3)

        def forward(self, x, z):
            return self.lin(torch.cat([self.g(x).mean((2, 3)), self.h(z).mean((2, 3, 4))], -1))

    torch.manual_seed(0)
    model, xs, target = Grouped().eval(), (torch.randn(3, 6, 9, 9), torch.randn(3, 4, 4, 4, 4)), torch.randn(3, 3)
    for plan in (gp.Plan([gp.LoRA(targets=["g", "h"], r=6, init="random")]), gp.Plan([gp.Update(targets=["g", "h"])])):
        cm = gp.compile(model, plan, xs)
        step = cm.compile_training("mse", gp.optim.SGD(lr=0.1))
        step.export_onnx(tmp_path / "t.onnx")
        trainer = OnnxTrainer(tmp_path / "t.onnx")
        for _ in range(2):
            assert abs(float(trainer.step(*xs, target)) - float(step(*xs, target))) < 1e-6
        ours, theirs = cm.adapter_state_dict(), trainer.adapter_state_dict()
        assert ours and max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6


def test_row_sliced_update_of_conv3d_and_same_padding_merges_back(setup):
    model, xs = setup
    cm = gp.compile(model, gp.Plan([gp.Update(targets=["c3", "same"], fraction=0.5, select="magnitude")]), xs)
    cm.compile_training("mse", gp.optim.SGD(lr=0.1))(*xs, torch.randn(2, 5))
    merged = cm.merge()
    ops = [n.target for n in merged.graph_module.graph.nodes if n.op == "call_function"]
    assert aten.conv3d.default in ops and aten.conv2d.padding in ops  # the layers' own ops again
    with torch.no_grad():
        assert _diff(merged(*xs), cm(*xs)) < 1e-6


def test_reflect_padding_reads_the_padded_input():
    """A reads what the layer reads (the reflect-padded input), so the unmerged adapter equals its
    merge, which is PEFT's merge; PEFT's unmerged A pads with zeros instead (README)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")).eval(), torch.randn(2, 3, 6, 6)
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["0"], r=2, init="random")]), (x,))
    pm = _peft(model, cm, LoraConfig(r=2, lora_alpha=8, target_modules=["0"]))
    with torch.no_grad():
        merged = cm.merge()(x)
        assert _diff(merged, cm(x)) < 1e-5
        assert _diff(merged, pm.merge_and_unload()(x)) < 1e-5
