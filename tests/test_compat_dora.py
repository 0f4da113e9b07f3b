"""DoRA on Conv1d/2d/3d and Embedding layers, and on a module called several times (issue 14), as
PEFT's ``use_dora=True`` computes them: a convolution's magnitude ``(1, out, 1...)`` against the
norm over its input channels and kernel; an embedding's ``(dim,)`` against the norm over the
vocabulary. ``peft`` is the oracle: outputs unmerged and merged, folders both ways; then ONNX
and a training step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphpeft as gp

TARGETS = ["emb", "c1", "c2", "c3", "lin"]


class Net(nn.Module):
    """An Embedding feeding a Conv1d; a Conv2d and a bias-less, strided Conv3d; a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.c1 = nn.Conv1d(6, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.c3 = nn.Conv3d(2, 4, 3, stride=2, bias=False)
        self.lin = nn.Linear(14, 5)

    def forward(self, ids, b, c):
        e = self.emb(ids).transpose(1, 2)
        return self.lin(torch.cat([self.c1(e).mean(-1), self.c3(b).mean((2, 3, 4)), self.c2(c).mean((2, 3))], -1))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    xs = (torch.randint(0, 20, (2, 7)), torch.randn(2, 2, 5, 5, 5), torch.randn(2, 3, 6, 6))
    cm = gp.compile(model, gp.Plan([gp.DoRA(targets=TARGETS, r=4, alpha=8, init="random")]), xs)
    with torch.no_grad():  # magnitudes away from the norms, so the m/n factor is not 1
        for k, v in cm.trainable_parameters().items():
            if k.endswith("lora_magnitude_vector"):
                v.mul_(1 + 0.3 * torch.rand(v.shape, generator=torch.Generator().manual_seed(1)))
    return model, xs, cm


def _peft(model, cm, targets=TARGETS):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    res = set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "lora" in k]
    return pm.eval()


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_shapes_and_fresh_identity(setup):
    model, xs, cm = setup
    mags = {k.split(".")[0]: tuple(v.shape) for k, v in cm.trainable_parameters().items() if "magnitude" in k}
    assert mags == {"emb": (6,), "c1": (1, 6, 1), "c2": (1, 4, 1, 1), "c3": (1, 4, 1, 1, 1), "lin": (5,)}
    fresh = gp.compile(model, gp.Plan([gp.DoRA(targets=TARGETS, r=4)]), xs)
    with torch.no_grad():
        assert _diff(fresh(*xs), model(*xs)) < 1e-6


def test_matches_peft_unmerged_and_merged(setup):
    model, xs, cm = setup
    pm = _peft(model, cm)
    with torch.no_grad():
        assert _diff(cm(*xs), pm(*xs)) < 1e-6
        merged = cm.merge()
        assert _diff(merged(*xs), pm(*xs)) < 1e-6
        pm.merge_adapter()
        for name in TARGETS:  # the merged weights are PEFT's
            ours = merged.graph_module.get_parameter(f"{name}.weight")
            assert _diff(ours, pm.base_model.model.get_submodule(name).get_base_layer().weight) < 1e-6


def test_folders_both_ways(setup, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, xs, cm = setup
    gp.export_peft(cm, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).eval()
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                                                             init_lora_weights=False)).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    imported = gp.import_peft(copy.deepcopy(model), tmp_path / "peft", xs)
    assert {r["method"] for r in imported.adapters().values()} == {"dora"}
    with torch.no_grad():
        assert _diff(back(*xs), cm(*xs)) < 1e-6
        assert _diff(imported(*xs), theirs(*xs)) < 1e-6


def test_onnx_and_training(setup, tmp_path):
    from graphpeft.backends.onnx import OnnxRunner, OnnxTrainer

    model, xs, cm = setup
    cm.export_onnx(tmp_path / "u.onnx", merged=False)
    with torch.no_grad():
        assert _diff(torch.from_numpy(OnnxRunner(tmp_path / "u.onnx").run(list(xs))[0]), cm(*xs)) < 1e-5
    saved = cm.adapter_state_dict()
    target = torch.randn(2, 5)
    step = cm.compile_training("mse", gp.optim.SGD(lr=0.05))
    step.export_onnx(tmp_path / "t.onnx")
    trainer = OnnxTrainer(tmp_path / "t.onnx")
    losses = [float(step(*xs, target)) for _ in range(3)]
    ort = [float(trainer.step(*xs, target)) for _ in range(3)]
    assert losses[-1] < losses[0] and max(abs(a - b) for a, b in zip(losses, ort)) < 1e-5
    trained = cm.trainable_parameters()
    assert all(not torch.equal(saved[k], trained[k]) for k in saved if "magnitude" in k)
    cm.load_adapter_state_dict(saved)


def test_module_called_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Conv1d(4, 4, 3, padding=1)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.shared(torch.tanh(self.shared(x))).mean(-1))

    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(2, 4, 6)
    cm = gp.compile(model, gp.Plan([gp.DoRA(targets=["shared", "out"], r=4, alpha=8, init="random")]), (x,))
    assert len(cm.adapters()["shared"]["joins"]) == 2
    pm = _peft(model, cm, ["shared", "out"])
    with torch.no_grad():
        assert _diff(cm(x), pm(x)) < 1e-6
        assert _diff(cm.merge()(x), pm(x)) < 1e-5


def test_grouped_convolution_as_peft_computes_it():
    """PEFT's norm on a grouped convolution reads ``B.view(-1, r) @ A`` reshaped to W (not ΔW);
    graphpeft computes the same, warns, and refuses to merge as PEFT does."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)).eval(), torch.randn(2, 4, 6, 6)
    with pytest.warns(gp.GraphPeftWarning, match="grouped convolution: its norm is PEFT's"):
        cm = gp.compile(model, gp.Plan([gp.DoRA(targets=["0"], r=4, alpha=8, init="random")]), (x,))
    assert cm.trainable_parameters()["0.lora_B.weight"].shape == (6, 2, 1, 1)
    with torch.no_grad():
        cm.trainable_parameters()["0.lora_magnitude_vector"].mul_(1.2)
        assert _diff(cm(x), _peft(model, cm, ["0"])(x)) < 1e-6
        with pytest.raises(gp.GraphPeftError, match="grouped convolution.*merged=False"):
            cm.merge()


def test_refusals():
    twice = _Twice(nn.Linear(4, 4))
    for rule in (gp.LoRAFA(targets=["lin"], r=2), gp.SoRA(targets=["lin"], r=2)):  # one branch only: refused
        with pytest.raises(gp.PlanError, match="called 2 times"):
            gp.compile(twice, gp.Plan([rule]), (torch.randn(2, 4),))


class _Twice(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(self.lin(x))
