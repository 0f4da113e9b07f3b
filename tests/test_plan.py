"""Plans (issue 2, part 3): rules as Python objects and as data (dict / YAML / JSON, one
schema), the three ways of selecting layers plus kind / layer-index / exclude filters, and
validation errors that say what is wrong and what to do.

Selection is tested on the layers of real traced models (Llama, GPT-2); the data-form tests
need no model.
"""

from __future__ import annotations

import json

import pytest

import graphpeft as gp
from graphpeft.plan import PLAN_VERSION

from conftest import ARCHS


@pytest.fixture(scope="module")
def llama_layers():
    arch = ARCHS["llama"]
    args, kwargs = arch.inputs()
    return gp.find_layers(gp.trace(arch.build(), args, kwargs).gm)


@pytest.fixture(scope="module")
def gpt2_layers():
    arch = ARCHS["gpt2"]
    args, kwargs = arch.inputs()
    return gp.find_layers(gp.trace(arch.build(), args, kwargs).gm)


def selected(plan: gp.Plan, layers) -> dict[str, list[str]]:
    res = plan.resolve(layers)
    return {rule: [l.path for l in ls] for rule, ls in res.matches.items()}


def only(plan: gp.Plan, layers) -> list[str]:
    (paths,) = selected(plan, layers).values()
    return paths


QV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
      "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


# --- the data form -----------------------------------------------------------------------------


def full_plan() -> gp.Plan:
    return gp.Plan([
        gp.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=16, dropout=0.1, layers=[0, 1],
                kind="linear", exclude=["k_proj"]),
        gp.LoRA(targets=r".*\.mlp\.down_proj", r=2, use_rslora=True, init="gaussian"),
    ])


def test_python_objects_and_dict_are_one_schema():
    plan = full_plan()
    data = plan.to_dict()
    assert data["version"] == PLAN_VERSION
    assert data["rules"][0] == {"lora": {"targets": ["q_proj", "v_proj"], "kind": "linear", "layers": [0, 1],
                                         "exclude": ["k_proj"], "r": 4, "alpha": 16, "dropout": 0.1}}
    # only non-default options are written
    assert data["rules"][1] == {"lora": {"targets": r".*\.mlp\.down_proj", "r": 2, "use_rslora": True,
                                         "init": "gaussian"}}
    again = gp.Plan.from_dict(data)
    assert again == plan and again.to_dict() == data
    assert isinstance(again.rules[0], gp.LoRA) and again.rules[0].r == 4
    # a bare list of rules is accepted too
    assert gp.Plan.from_dict(data["rules"]) == plan


def test_yaml_file_and_text_round_trip(tmp_path):
    plan = full_plan()
    text = plan.to_yaml()
    assert "lora:" in text and "use_rslora: true" in text
    assert gp.Plan.from_yaml(text) == plan
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    assert gp.Plan.from_yaml(path) == plan
    assert gp.Plan.from_yaml(str(path)) == plan
    hand_written = "rules:\n  - lora:\n      targets: [q_proj, v_proj]\n      r: 8\n      alpha: 16\n"
    p = gp.Plan.from_yaml(hand_written)
    assert p.rules[0].targets == ["q_proj", "v_proj"] and p.rules[0].scaling == 2.0


def test_json_file_and_text_round_trip(tmp_path):
    plan = full_plan()
    text = json.dumps(plan.to_dict())
    assert gp.Plan.from_json(text) == plan
    path = tmp_path / "plan.json"
    path.write_text(text)
    assert gp.Plan.from_json(path) == plan


def test_compile_accepts_the_data_form():
    arch = ARCHS["cnn"]
    args, _ = arch.inputs()
    cm = gp.compile(arch.build(), {"rules": [{"lora": {"targets": ["fc"], "r": 2}}]}, example_inputs=args)
    assert list(cm.adapters()) == ["fc"]
    assert cm.plan == gp.Plan([gp.LoRA(targets=["fc"], r=2)])


# --- selection ---------------------------------------------------------------------------------


def test_regex_targets_must_match_the_whole_path(llama_layers):
    assert only(gp.Plan([gp.LoRA(targets=r".*\.(q_proj|v_proj)")]), llama_layers) == QV
    assert only(gp.Plan([gp.LoRA(targets=r"model\.layers\.1\.self_attn\.q_proj")]), llama_layers) == [QV[2]]
    # a bare name is a regex that must match the whole path: it matches nothing
    with pytest.raises(gp.PlanError, match=r"lora\[q_proj\] matches no layer"):
        gp.Plan([gp.LoRA(targets="q_proj")]).resolve(llama_layers)
    # fullmatch, not search: a prefix of the path is not enough
    with pytest.raises(gp.PlanError, match="matches no layer"):
        gp.Plan([gp.LoRA(targets=r"model\.layers\.0")]).resolve(llama_layers)


def test_list_targets_match_path_suffixes(llama_layers):
    assert only(gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"])]), llama_layers) == QV
    assert only(gp.Plan([gp.LoRA(targets=["self_attn.q_proj"])]), llama_layers) == [QV[0], QV[2]]
    assert only(gp.Plan([gp.LoRA(targets=["model.layers.0.self_attn.q_proj"])]), llama_layers) == [QV[0]]
    # suffixes are whole path components: "proj" is not a suffix of "...q_proj"
    with pytest.raises(gp.PlanError, match="matches no layer"):
        gp.Plan([gp.LoRA(targets=["proj"])]).resolve(llama_layers)


def test_all_linear_skips_embeddings_and_the_head(llama_layers, gpt2_layers):
    paths = only(gp.Plan([gp.LoRA(targets="all-linear")]), llama_layers)
    assert len(paths) == 14 and "lm_head" not in paths and "model.embed_tokens" not in paths
    gpt2 = only(gp.Plan([gp.LoRA(targets="all-linear")]), gpt2_layers)
    assert len(gpt2) == 8 and all(".h." in p for p in gpt2)  # the Conv1D layers, not wte/wpe/lm_head


def test_kind_filter(llama_layers):
    assert only(gp.Plan([gp.LoRA(targets=".*", kind="embedding")]), llama_layers) == ["model.embed_tokens"]
    lin = only(gp.Plan([gp.LoRA(targets=".*", kind=["linear"])]), llama_layers)
    assert len(lin) == 15 and "lm_head" in lin  # a regex can select the head explicitly


def test_layer_index_filter(llama_layers):
    assert only(gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], layers=[1])]), llama_layers) == QV[2:]
    assert only(gp.Plan([gp.LoRA(targets=["q_proj"], layers=0)]), llama_layers) == [QV[0]]
    with pytest.raises(gp.PlanError, match=r"layer index 0 is not in layers=\[5\]"):
        gp.Plan([gp.LoRA(targets=["q_proj"], layers=[5])]).resolve(llama_layers)


def test_exclude(llama_layers):
    paths = only(gp.Plan([gp.LoRA(targets="all-linear", exclude=["q_proj", "mlp.up_proj"])]), llama_layers)
    assert len(paths) == 10 and not any(p.endswith(("q_proj", "up_proj")) for p in paths)
    paths = only(gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], exclude=r"model\.layers\.0\..*")]), llama_layers)
    assert paths == QV[2:]


def test_two_rules_on_disjoint_layers_and_explain(llama_layers):
    plan = gp.Plan([gp.LoRA(targets=["q_proj"], r=4), gp.LoRA(targets=["v_proj"], r=2)])
    res = plan.resolve(llama_layers)
    assert {k: len(v) for k, v in res.matches.items()} == {"lora[q_proj]": 2, "lora[v_proj]": 2}
    text = res.explain()
    assert "  + model.layers.0.self_attn.q_proj (linear Linear 32->32): lora[q_proj]" in text
    assert "  - model.layers.0.self_attn.k_proj (linear Linear 32->16): lora[q_proj]: path does not match" in text
    assert len(text.splitlines()) == len(llama_layers)


# --- validation errors ---------------------------------------------------------------------------


def test_rule_matching_nothing_lists_nearest_candidates(llama_layers):
    with pytest.raises(gp.PlanError) as info:
        gp.Plan([gp.LoRA(targets=["q_prj"])]).resolve(llama_layers)
    msg = str(info.value)
    assert "lora[q_prj] matches no layer" in msg
    assert "Nearest candidates" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert "list targets match path suffixes" in msg


def test_unknown_method_key_with_did_you_mean():
    with pytest.raises(gp.PlanError, match=r"rule #0: unknown method 'lroa' \(did you mean 'lora'\?\)"):
        gp.Plan.from_dict({"rules": [{"lroa": {"targets": ["q_proj"]}}]})


def test_unknown_option_with_did_you_mean():
    with pytest.raises(gp.PlanError, match=r"lora: unknown option\(s\) 'alpah' \(did you mean 'alpha'\?\); allowed"):
        gp.Plan.from_dict({"rules": [{"lora": {"targets": ["q_proj"], "alpah": 16}}]})
    # PEFT's option names get a hint towards ours
    with pytest.raises(gp.PlanError, match=r"unknown option\(s\) 'lora_alpha' \(did you mean 'alpha'\?\), "
                                           r"'rank' \(did you mean 'r'\?\)"):
        gp.Plan.from_yaml("rules:\n  - lora: {targets: [q_proj], rank: 4, lora_alpha: 8}\n")


def test_rank_larger_than_the_layer_warns_as_peft_allows_it(llama_layers):
    with pytest.warns(gp.GraphPeftWarning, match=r"lora: r=20 on model.layers.0.self_attn.v_proj is larger than "
                                                 r"the layer \(32 -> 16\): allowed, as in PEFT.*use r <= 16"):
        plan = gp.Plan([gp.LoRA(targets=["v_proj"], r=20)])
        res = plan.resolve(llama_layers)
    assert len(res.matches[plan.rules[0].name]) == 2


def test_two_adapter_rules_claiming_one_layer(llama_layers):
    plan = gp.Plan([gp.LoRA(targets=["q_proj"]), gp.LoRA(targets=r".*\.self_attn\..*", r=4)])
    with pytest.raises(gp.PlanError, match=r"model.layers.0.self_attn.q_proj is claimed by two rules: "
                                           r"lora\[q_proj\] and lora\[.*exclude="):
        plan.resolve(llama_layers)


def test_tied_weights_cannot_be_targeted(gpt2_layers):
    with pytest.raises(gp.PlanError, match=r"selects lm_head but cannot adapt it: its weight "
                                           r"transformer.wte.weight is shared with \['transformer.wte'\]"):
        gp.Plan([gp.LoRA(targets=["lm_head"])]).resolve(gpt2_layers)
    with pytest.raises(gp.PlanError, match="tied weights"):
        gp.Plan([gp.LoRA(targets=["wte"], r=4)]).resolve(gpt2_layers)
    # the untied embedding next to it is fine
    assert only(gp.Plan([gp.LoRA(targets=["wpe"], r=4)]), gpt2_layers) == ["transformer.wpe"]


@pytest.mark.parametrize("body, message", [
    ({"targets": "(q_proj"}, r"targets '\(q_proj' is not a valid regular expression"),
    ({"targets": ["q_proj"], "exclude": "[k"}, r"exclude '\[k' is not a valid regular expression"),
    ({"targets": 5}, r"targets must be a regex string or a non-empty list of names, got 5"),
    ({"targets": []}, "non-empty list"),
    ({"r": 4}, "'targets' is required"),
    ({"targets": ["q_proj"], "r": 0}, "r must be a positive integer, got 0"),
    ({"targets": ["q_proj"], "r": "8"}, "r must be a positive integer, got '8'"),
    ({"targets": ["q_proj"], "r": True}, "r must be a positive integer, got True"),
    ({"targets": ["q_proj"], "alpha": "16"}, "alpha must be a number, got '16'"),
    ({"targets": ["q_proj"], "dropout": 1.5}, r"dropout must be in \[0, 1\)"),
    ({"targets": ["q_proj"], "use_rslora": "yes"}, "use_rslora must be true or false"),
    ({"targets": ["q_proj"], "init": "xavier"}, "init must be one of"),
    ({"targets": ["q_proj"], "kind": "dense"}, "unknown kind 'dense'"),
    ({"targets": ["q_proj"], "layers": ["0"]}, "layers must be integers"),
    ("q_proj", "expected a mapping of options"),
])
def test_invalid_rule_options(body, message):
    with pytest.raises(gp.PlanError, match=message):
        gp.Plan.from_dict({"rules": [{"lora": body}]})


def test_invalid_regex_as_python_object():
    with pytest.raises(gp.PlanError, match="not a valid regular expression"):
        gp.LoRA(targets=r".*\.(q_proj")


@pytest.mark.parametrize("data, message", [
    ({"version": 2, "rules": [{"lora": {"targets": ["q_proj"]}}]}, "plan version 2 is not supported"),
    ({"version": "1", "rules": [{"lora": {"targets": ["q_proj"]}}]}, "plan version 1 is not supported"),
    ({"rules": [{"lora": {"targets": ["q_proj"]}}], "extra": 1}, r"unknown plan key\(s\) \['extra'\]"),
    ({"rules": []}, "the plan has no rules"),
    ({"rules": [{"lora": {"targets": ["a"]}, "ia3": {}}]}, "exactly one method key"),
    ("rules", "a plan is a mapping with 'rules'"),
])
def test_invalid_plan_data(data, message):
    with pytest.raises(gp.PlanError, match=message):
        gp.Plan.from_dict(data)


def test_invalid_files_and_text(tmp_path):
    with pytest.raises(gp.PlanError, match="not valid YAML"):
        gp.Plan.from_yaml("rules: [\n")
    with pytest.raises(gp.PlanError, match="not valid JSON"):
        gp.Plan.from_json('{"rules": ')
    with pytest.raises(gp.PlanError, match="does not exist"):
        gp.Plan.from_yaml(str(tmp_path / "missing.yaml"))
    with pytest.raises(gp.PlanError, match="a plan is a mapping"):
        gp.Plan.from_yaml("")


def test_plan_object_errors():
    with pytest.raises(gp.PlanError, match="plan entries must be rules"):
        gp.Plan([{"lora": {"targets": ["q_proj"]}}])
    with pytest.raises(gp.PlanError, match="the same rule twice"):
        gp.Plan([gp.LoRA(targets=["q_proj"]), gp.LoRA(targets=["q_proj"], r=2)])


def test_compile_reports_plan_errors_before_running_passes():
    arch = ARCHS["cnn"]
    args, _ = arch.inputs()
    # LoRA-XS takes r singular vectors of the weight: a rank above min(in, out) stays refused
    with pytest.raises(gp.PlanError, match=r"rank r=12 is larger than the layer \(16 -> 10\); use r <= 10"):
        gp.compile(arch.build(), gp.Plan([gp.LoRAXS(targets=["fc"], r=12)]), example_inputs=args)
