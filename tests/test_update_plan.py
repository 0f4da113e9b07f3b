"""Sparse-update rules in plans (issue 4, part 1): ``gp.Update`` as Python and as data
(dict / YAML), validation errors that say what to do, selection of layers, biases, norm modules
and the last k blocks (negative layer indices), and update rules combined with adapters.

Selection is checked on real traced graphs (Llama, BERT, GPT-2, the tiny ResNet); nothing here
trains.
"""

from __future__ import annotations

import pytest

import graphpeft as gp
from graphpeft.graph import find_norms

from conftest import ARCHS


@pytest.fixture(scope="module")
def graphs():
    cache = {}

    def get(name: str):
        if name not in cache:
            arch = ARCHS[name]
            args, kwargs = arch.inputs()
            cache[name] = gp.trace(arch.build(), args, kwargs).gm
        return cache[name]

    return get


def layers_of(plan: gp.Plan, gm) -> dict[str, list[str]]:
    res = plan.resolve(plan.layers_of(gm))
    return {rule: [l.path for l in ls] for rule, ls in res.matches.items()}


# --- the rule and its data form --------------------------------------------------------------------


def test_python_and_yaml_forms_are_one_plan():
    py = gp.Plan([
        gp.LoRA(targets=["q_proj", "v_proj"], r=4),
        gp.Update(targets=".*", part="norm"),
        gp.Update(targets=["down_proj"], layers=[-1], fraction=0.25, select="magnitude"),
    ])
    text = """
rules:
  - lora: {targets: [q_proj, v_proj], r: 4}
  - update: {targets: ".*", part: norm}
  - update: {targets: [down_proj], layers: [-1], fraction: 0.25, select: magnitude}
"""
    assert gp.Plan.from_yaml(text) == py
    data = py.to_dict()
    assert data["rules"][2] == {"update": {"targets": ["down_proj"], "layers": [-1], "fraction": 0.25,
                                           "select": "magnitude"}}
    assert gp.Plan.from_dict(data) == py and gp.Plan.from_yaml(py.to_yaml()) == py
    assert repr(py.rules[2]) == "Update(targets=['down_proj'], layers=[-1], fraction=0.25, select='magnitude')"


def test_update_rules_with_different_parts_have_different_names():
    plan = gp.Plan([gp.Update(targets=".*"), gp.Update(targets=".*", part="bias"),
                    gp.Update(targets=".*", part="norm"), gp.Update(targets=".*", layers=[-1], fraction=0.5)])
    assert [r.name for r in plan.rules] == ["update[.*]", "update[.*; part=bias]", "update[.*; part=norm]",
                                            "update[.*; layers=[-1]; fraction=0.5; select=first]"]
    with pytest.raises(gp.PlanError, match="the same rule twice"):
        gp.Plan([gp.Update(targets=".*", part="bias"), gp.Update(targets=".*", part="bias")])


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, True, "half", float("nan")])
def test_fraction_outside_the_unit_interval(fraction):
    with pytest.raises(gp.PlanError, match=r"update: fraction must be a number in \(0, 1\]"):
        gp.Update(targets=".*", fraction=fraction)


def test_bad_part_select_and_combinations():
    with pytest.raises(gp.PlanError, match=r"unknown part 'weights'; use one of \['all', 'bias', 'norm', 'module'\]"):
        gp.Update(targets=".*", part="weights")
    with pytest.raises(gp.PlanError, match=r"unknown select 'random'; use one of \['first', 'magnitude', 'gradient'\]"):
        gp.Update(targets=".*", fraction=0.5, select="random")
    with pytest.raises(gp.PlanError, match=r"fraction slices weight rows, so it needs part='all'"):
        gp.Update(targets=".*", part="bias", fraction=0.5)
    with pytest.raises(gp.PlanError, match=r"select='magnitude' chooses which rows a fraction trains; give fraction"):
        gp.Update(targets=".*", select="magnitude")
    with pytest.raises(gp.PlanError, match=r"unknown kind 'dense'"):
        gp.Update(targets=".*", kind="dense")


def test_data_form_errors_name_the_option():
    with pytest.raises(gp.PlanError, match=r"update: unknown option\(s\) 'fracton' \(did you mean 'fraction'\?\)"):
        gp.Plan.from_dict({"rules": [{"update": {"targets": ".*", "fracton": 0.5}}]})
    with pytest.raises(gp.PlanError, match=r"'selection' \(did you mean 'select'\?\)"):
        gp.Plan.from_dict({"rules": [{"update": {"targets": ".*", "fraction": 0.5, "selection": "first"}}]})
    with pytest.raises(gp.PlanError, match=r"update: 'targets' is required"):
        gp.Plan.from_yaml("rules:\n  - update: {part: bias}\n")
    with pytest.raises(gp.PlanError, match=r"fraction must be a number in \(0, 1\]"):
        gp.Plan.from_yaml("rules:\n  - update: {targets: '.*', fraction: 2}\n")


# --- selection on real graphs ------------------------------------------------------------------------


def test_negative_layer_indices_select_the_last_blocks(graphs):
    gm = graphs("llama")
    last = layers_of(gp.Plan([gp.Update(targets=".*", layers=[-1])]), gm)["update[.*; layers=[-1]]"]
    assert len(last) == 7 and all(p.startswith("model.layers.1.") for p in last)
    both = layers_of(gp.Plan([gp.Update(targets=["q_proj"], layers=[-2, -1])]), gm)
    assert list(both.values())[0] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    # negative indices work for adapters too (they are a Rule option)
    assert list(layers_of(gp.Plan([gp.LoRA(targets=["v_proj"], layers=-1)]), gm).values())[0] == \
        ["model.layers.1.self_attn.v_proj"]
    with pytest.raises(gp.PlanError, match=r"layer index 0 is not in layers=\[-5\]"):
        gp.Plan([gp.Update(targets=["q_proj"], layers=[-5])]).resolve(gp.find_layers(gm))


def test_negative_indices_need_numbered_layers(graphs):
    gm = graphs("cnn")  # layer1.conv1 ... have no integer path component (layer2.down.0 is the only one)
    res = gp.Plan([gp.Update(targets=["fc"], layers=[-1])])
    with pytest.raises(gp.PlanError, match=r"fc matched the path but layer index None is not in layers=\[-1\]"):
        res.resolve(res.layers_of(gm))


def test_norm_modules_are_found_by_module_path(graphs):
    llama = [(n.path, n.module_class, n.weight, n.bias) for n in find_norms(graphs("llama"))]
    assert llama[0] == ("model.layers.0.input_layernorm", "LlamaRMSNorm", "model.layers.0.input_layernorm.weight", None)
    assert [p for p, *_ in llama][-1] == "model.norm" and len(llama) == 5
    bert = find_norms(graphs("bert"))
    assert [n.path for n in bert][0] == "embeddings.LayerNorm" and len(bert) == 5
    assert all(n.bias == n.path + ".bias" and n.kind == "norm" for n in bert)
    cnn = find_norms(graphs("cnn"))  # BatchNorm: weight and bias, never the running statistics
    assert [n.path for n in cnn] == ["bn1", "layer1.bn1", "layer1.bn2", "layer2.bn1", "layer2.bn2", "layer2.down.1"]
    assert not any("running" in (n.weight + str(n.bias)) for n in cnn)
    # norms are candidates only for plans that ask for them: an adapter plan sees no norm
    assert all(l.kind != "norm" for l in gp.Plan([gp.LoRA(targets="all-linear")]).layers_of(graphs("llama")))


def test_part_selects_biases_norms_or_weight_layers(graphs):
    bert = layers_of(gp.Plan([gp.Update(targets=".*", part="bias"), gp.Update(targets=".*", part="norm")]),
                     graphs("bert"))
    assert len(bert["update[.*; part=bias]"]) == 13  # 12 encoder linears + the pooler (embeddings have none)
    assert len(bert["update[.*; part=norm]"]) == 5
    norms_in_last = layers_of(gp.Plan([gp.Update(targets=".*", part="norm", layers=[-1])]), graphs("llama"))
    assert list(norms_in_last.values())[0] == ["model.layers.1.input_layernorm",
                                               "model.layers.1.post_attention_layernorm"]


def test_bias_only_on_a_model_without_biases_says_why(graphs):
    with pytest.raises(gp.PlanError, match=r"update\[.*; part=bias\] matches no layer; e.g. model.embed_tokens "
                                           r"matched the path but the layer has no bias"):
        plan = gp.Plan([gp.Update(targets=".*", part="bias")])
        plan.resolve(plan.layers_of(graphs("llama")))


def test_fraction_declines_tied_weights_and_embeddings(graphs):
    gm = graphs("gpt2")
    with pytest.raises(gp.PlanError, match=r"selects lm_head but cannot adapt it: its weight transformer.wte.weight is "
                                           r"shared with \['transformer.wte'\] \(tied weights\): a row slice"):
        gp.Plan([gp.Update(targets=["lm_head"], fraction=0.5)]).resolve(gp.find_layers(gm))
    # a full update of a tied weight is one tensor: allowed
    assert layers_of(gp.Plan([gp.Update(targets=["lm_head"])]), gm) == {"update[lm_head]": ["lm_head"]}
    with pytest.raises(gp.PlanError, match=r"fraction slices the output channels of linear and conv layers, "
                                           r"not embedding layers"):
        gp.Plan([gp.Update(targets=["wpe"], fraction=0.5)]).resolve(gp.find_layers(gm))


def test_updates_combine_with_an_adapter_on_one_layer(graphs):
    gm = graphs("bert")
    for rules in ([gp.LoRA(targets=["query"], r=2), gp.Update(targets=["query"], part="bias")],
                  [gp.Update(targets=["query"], part="bias"), gp.LoRA(targets=["query"], r=2)]):
        res = gp.Plan(rules).resolve(gp.find_layers(gm))
        assert all(len(v) == 2 for v in res.matches.values())
        assert "encoder.layer.0.attention.self.query (linear Linear 32->32): " in res.explain()
        assert " + " in [d.rule for d in res.decisions if d.layer.path.endswith("0.attention.self.query")][0]
    # two adapters on one layer are still refused
    with pytest.raises(gp.PlanError, match="is claimed by two rules: lora"):
        gp.Plan([gp.LoRA(targets=["query"]), gp.LoRA(targets=r".*query", r=2)]).resolve(gp.find_layers(gm))


def test_fraction_update_on_an_adapted_layer_is_a_clear_error():
    arch = ARCHS["llama"]
    args, kwargs = arch.inputs()
    plan = gp.Plan([gp.LoRA(targets=["q_proj"], r=2), gp.Update(targets=["q_proj"], fraction=0.5)])
    with pytest.raises(gp.PlanError, match=r"slices model.layers.0.self_attn.q_proj, which also has an adapter; "
                                           r"a channel-fraction update cannot share a layer with an adapter"):
        gp.compile(arch.build(), plan, args, kwargs)
