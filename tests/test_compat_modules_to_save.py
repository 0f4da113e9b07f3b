"""PEFT's ``modules_to_save`` (issue 14): modules trained in full beside the adapter (a
classification head) map to ``gp.Update(targets=..., part="module")``. ``peft`` is the oracle:
an adapter folder peft saved imports with the same outputs, graphpeft's export loads into peft,
and a training step updates those modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphpeft as gp


class Head(nn.Module):
    """A RoBERTa-style classification head: dense -> tanh -> out_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.out_proj = nn.Linear(8, 3)

    def forward(self, h):
        return self.out_proj(torch.tanh(self.dense(h)))


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(6, 8)
        self.value = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.classifier = Head()

    def forward(self, x):
        return self.classifier(self.norm(self.value(torch.relu(self.query(x)))))


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    """An adapter peft saved: LoRA on query/value, classifier and norm trained in full."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = Classifier().eval()
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                         modules_to_save=["classifier", "norm"]))
    with torch.no_grad():  # as if trained: adapters and the module copies move away from the base
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path_factory.mktemp("peft") / "a"
    pm.save_pretrained(str(folder))
    return model, pm.eval(), folder


def test_update_part_module_selects_whole_modules():
    torch.manual_seed(0)
    model, x = Classifier().eval(), torch.randn(4, 6)
    plan = gp.Plan([gp.LoRA(targets=["query"], r=2), gp.Update(targets=["classifier", "norm"], part="module")])
    cm = gp.compile(model, plan, (x,))
    res = plan.resolve(plan.layers_of(gp.trace(model, (x,)).gm))
    assert sorted(l.path for l in res.matches[plan.rules[1].name]) == ["classifier.dense", "classifier.out_proj",
                                                                        "norm"]
    trainable = {n: r.value for n, r in cm.roles().items() if r.trainable}
    assert trainable == {
        "query.lora_A.weight": "adapter", "query.lora_B.weight": "adapter",
        "classifier.dense.weight": "trainable", "classifier.dense.bias": "trainable",
        "classifier.out_proj.weight": "trainable", "classifier.out_proj.bias": "trainable",
        "norm.weight": "trainable", "norm.bias": "trainable"}
    from graphpeft.peft_interop import saved_modules

    assert list(saved_modules(cm)) == ["classifier", "norm"]


def test_import_matches_peft_and_exports_back(peft_folder, tmp_path):
    from peft import PeftModel

    model, pm, folder = peft_folder
    x = torch.randn(4, 6)
    cm = gp.import_peft(copy.deepcopy(model), folder, (x,))
    assert any(isinstance(r, gp.Update) and r.part == "module" for r in cm.plan.rules)
    with torch.no_grad():
        want = pm(x)
        assert (cm(x) - want).abs().max().item() < 1e-6
        assert (cm.merge()(x) - want).abs().max().item() < 1e-5
    gp.export_peft(cm, tmp_path / "back")
    import json

    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier", "norm"]
    back = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "back")).eval()
    cm.save_adapter(tmp_path / "own")  # graphpeft's own format holds the modules too
    own = gp.load_adapter(gp.compile(copy.deepcopy(model), cm.plan, (x,)), tmp_path / "own")
    with torch.no_grad():
        assert (back(x) - want).abs().max().item() < 1e-6
        assert (own(x) - want).abs().max().item() < 1e-6


def test_import_leaves_the_users_model_alone(peft_folder):
    model, _, folder = peft_folder
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gp.import_peft(model, folder, (torch.randn(2, 6),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_step_updates_saved_modules(peft_folder):
    model, _, folder = peft_folder
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    cm = gp.import_peft(copy.deepcopy(model), folder, (x,))
    before = {k: v.detach().clone() for k, v in cm.trainable_parameters().items()}
    frozen = cm.graph_module.get_parameter("query.weight").detach().clone()
    step = cm.compile_training("mse", gp.optim.SGD(lr=0.1))
    step(x, y)
    after = cm.trainable_parameters()
    for name in ("classifier.out_proj.weight", "classifier.dense.bias", "norm.weight", "value.lora_B.weight"):
        assert not torch.equal(before[name], after[name]), name
    assert torch.equal(cm.graph_module.get_parameter("query.weight"), frozen)


def test_named_adapter_import_is_refused(peft_folder):
    model, _, folder = peft_folder
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["query"], r=2)]), (torch.randn(2, 6),))
    with pytest.raises(gp.AdapterFileError, match="modules_to_save.*first adapter"):
        gp.import_peft(cm, folder, adapter_name="other")
    assert cm.adapter_names == ["default"]


def test_bad_module_rules():
    with pytest.raises(gp.PlanError, match="part='module' trains whole modules"):
        gp.Update(targets="all-linear", part="module")

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    with pytest.raises(gp.PlanError, match="tied weights.*PEFT trains a copy"):
        gp.compile(Tied(), gp.Plan([gp.Update(targets=["head"], part="module")]), (torch.tensor([[1, 2]]),))
