"""PEFT's layer selection (issue 14): ``"all-linear"`` picks what PEFT's
``_maybe_include_all_linear_layers`` picks (only a transformers model's output embeddings are left
out: a classification head and a plain module's last linear are adapted), any case; a string
``targets`` is a full-match regex as PEFT's string ``target_modules``; PEFT's option names
``target_modules`` / ``layers_to_transform`` / ``exclude_modules`` work in the data form."""

from __future__ import annotations

import copy

import pytest
import torch

import graphpeft as gp

from models import tiny_gpt2, tiny_llama, token_batch


def _bert_seq_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 3)  # a plain module: PEFT's all-linear adapts it too

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


MODELS = {
    "llama": (tiny_llama, lambda: ((token_batch(),), {"use_cache": False})),
    "gpt2": (tiny_gpt2, lambda: ((token_batch(),), {"use_cache": False})),
    "bert_seq_cls": (_bert_seq_cls, lambda: ((token_batch(),), {})),
    "mlp": (MLP, lambda: ((torch.randn(2, 6),), {})),
}


def _peft_targets(model, target_modules, **kw):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=target_modules, **kw))
    return set(pm.targeted_module_names)


def _ours(model, inputs, rule):
    args, kwargs = inputs
    cm = gp.compile(model, gp.Plan([rule]), args, kwargs)
    return {rec["layer"] for rec in cm.adapters().values()}


@pytest.mark.parametrize("name", list(MODELS))
def test_all_linear_matches_peft(name):
    build, inputs = MODELS[name]
    model = build().eval()
    ours = _ours(model, inputs(), gp.LoRA(targets="all-linear", r=2))
    assert ours == _peft_targets(model, "all-linear")
    if name == "bert_seq_cls":
        assert "classifier" in ours  # PEFT (without a task type) adapts the classification head
    if name in ("llama", "gpt2"):
        assert "lm_head" not in ours  # the output embeddings are left out
    if name == "mlp":
        assert ours == {"body", "head"}


def test_all_linear_any_case():
    assert gp.LoRA(targets="ALL-Linear").targets == "all-linear"
    assert gp.Plan.from_dict({"rules": [{"lora": {"targets": "All-Linear"}}]}).rules[0].targets == "all-linear"


def test_string_targets_are_a_full_match_regex_as_in_peft():
    model, inputs = tiny_llama(), ((token_batch(),), {"use_cache": False})
    regex = r".*\.(q|v)_proj"
    assert _ours(model, inputs, gp.LoRA(targets=regex, r=2)) == _peft_targets(model, regex)
    assert len(_peft_targets(model, regex)) == 4


def test_peft_option_names_are_aliases():
    peft_style = gp.Plan.from_dict({"rules": [{"lora": {"target_modules": ["q_proj"], "layers_to_transform": [1],
                                                        "exclude_modules": ["k_proj"], "r": 2}}]})
    ours = gp.Plan([gp.LoRA(targets=["q_proj"], layers=[1], exclude=["k_proj"], r=2)])
    assert peft_style == ours
    assert gp.Plan.from_yaml("rules:\n  - lora: {target_modules: [q_proj], layers_to_transform: 0}\n").rules[0].layers == 0


def test_layers_to_transform_selects_like_peft():
    model, inputs = tiny_llama(), ((token_batch(),), {"use_cache": False})
    plan = gp.Plan.from_dict([{"lora": {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "r": 2}}])
    cm = gp.compile(model, plan, *inputs)
    ours = {rec["layer"] for rec in cm.adapters().values()}
    assert ours == _peft_targets(model, ["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")


def test_alias_and_own_name_together_is_an_error():
    with pytest.raises(gp.PlanError, match=r"give 'targets' or PEFT's 'target_modules', not both"):
        gp.Plan.from_dict({"rules": [{"lora": {"targets": ["q_proj"], "target_modules": ["v_proj"]}}]})
