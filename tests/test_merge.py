"""Merge (issue 2, part 6): adapters folded into base weights.

Structure: the merged graph is the base graph again (same op list, same op count as the traced
model, no node with provenance, no adapter tensor). Numbers: the merged model computes what the
unmerged one does, and each merged weight is ``W + scaling * B @ A`` in the weight's own layout.
Side effects: the source compiled model and the user's ``nn.Module`` are unchanged.
"""

from __future__ import annotations


import pytest
import torch

import graphpeft as gp
from graphpeft.graph import Role, op_count, roles
from graphpeft.infra import clone_graph_module
from graphpeft.passes import MergeAdapters

from conftest import ARCHS, created_nodes, max_diff

NAMES = list(ARCHS)


def base_ops(cm) -> list:
    """The op list of the graph without the nodes passes created."""
    return [n.target for n in cm.graph_module.graph.nodes if n.op == "call_function" and "graphpeft" not in n.meta]


@pytest.fixture(scope="module")
def merged(random_lora):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            _, _, cm = random_lora(name)
            before = (op_count(cm.graph_module), cm.adapter_state_dict(), dict(cm.roles()))
            cache[name] = (cm.merge(), before)
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_merged_graph_is_the_base_graph(random_lora, merged, name):
    _, _, cm = random_lora(name)
    m, _ = merged(name)
    assert cm.adapters()  # there was something to merge
    assert op_count(m.graph_module) == cm.base_op_count
    assert [n.target for n in m.graph_module.graph.nodes if n.op == "call_function"] == base_ops(cm)
    assert not created_nodes(m.graph_module)
    assert m.adapters() == {} and m.trainable_parameters() == {}
    assert not any("lora" in n for n in roles(m.graph_module))
    assert Role.ADAPTER not in set(roles(m.graph_module).values())
    assert not any(p.requires_grad for p in m.graph_module.parameters())
    gp.verify(m.graph_module)


@pytest.mark.parametrize("name", NAMES)
def test_merged_outputs_match_unmerged(random_lora, merged, parity, name):
    model, _, cm = random_lora(name)
    m, _ = merged(name)
    args, kwargs = ARCHS[name].inputs()
    with torch.no_grad():
        unmerged, folded, base = cm(*args, **kwargs), m(*args, **kwargs), model(*args, **kwargs)
    assert max_diff(unmerged, base) > 1e-3  # the adapters change the outputs
    assert parity.record(f"merged vs unmerged (torch) {name}", max_diff(folded, unmerged)) <= 1e-5
    # and at another batch size / sequence length
    args3, kwargs3 = ARCHS[name].inputs(batch=3, seq=5)
    with torch.no_grad():
        assert max_diff(m(*args3, **kwargs3), cm(*args3, **kwargs3)) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_merge_leaves_the_source_and_the_user_model_unchanged(random_lora, merged, name):
    model, state_before_compile, cm = random_lora(name)
    _, (ops, adapter_state, role_map) = merged(name)
    assert op_count(cm.graph_module) == ops
    assert dict(cm.roles()) == role_map
    after = cm.adapter_state_dict()
    assert after.keys() == adapter_state.keys() and all(torch.equal(after[k], v) for k, v in adapter_state.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_before_compile.items())
    # the unmerged graph still computes with its base weights: W of the graph is W of the model
    gm = cm.graph_module
    for rec in cm.adapters().values():
        assert torch.equal(gm.get_parameter(rec["weight"]), state_before_compile[rec["weight"]])


@pytest.mark.parametrize("name", ["llama", "gpt2", "cnn"])
def test_merged_weight_is_w_plus_scaled_ba(random_lora, merged, name):
    _, state, cm = random_lora(name)
    m, _ = merged(name)
    for rec in cm.adapters().values():
        a = cm.graph_module.get_parameter(rec["tensors"]["A"]).detach()
        b = cm.graph_module.get_parameter(rec["tensors"]["B"]).detach()
        w = state[rec["weight"]]
        delta = rec["scaling"] * (b.flatten(1) @ a.flatten(1))
        if rec["fan_in_fan_out"]:
            delta = delta.T  # GPT-2's Conv1D stores W as (in, out)
        want = w + delta.reshape(w.shape)
        assert torch.allclose(m.graph_module.get_parameter(rec["weight"]), want, atol=1e-6), rec["layer"]


def test_partial_merge_of_one_layer(random_lora):
    _, _, cm = random_lora("llama")
    gm = clone_graph_module(cm.graph_module)
    first = next(iter(cm.adapters()))
    result = gp.PassManager().run(gm, [MergeAdapters(layers=[first])])
    assert result.modified
    n = len(cm.adapters())
    assert op_count(result.gm) == cm.base_op_count + 4 * (n - 1)
    assert first not in gp.graph.adapters(result.gm) and len(gp.graph.adapters(result.gm)) == n - 1
    assert not created_nodes(result.gm, first)
    flat = cm.flat_inputs(*ARCHS["llama"].inputs()[0], **ARCHS["llama"].inputs()[1])
    with torch.no_grad():
        assert max_diff(result.gm(*flat), cm.graph_module(*flat)) <= 1e-5
    # negative: merging a layer without an adapter changes nothing
    nothing = gp.PassManager().run(result.gm, [MergeAdapters(layers=["lm_head"])])
    assert not nothing.modified and op_count(nothing.gm) == op_count(result.gm)


def test_merge_removes_dropout_and_a_merged_model_merges_to_itself():
    arch = ARCHS["cnn"]
    model = arch.build()
    args, _ = arch.inputs()
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["fc"], r=2, dropout=0.5, init="random")]), example_inputs=args)
    cm.train()
    m = cm.merge()
    assert m.training  # merge keeps the mode ...
    assert op_count(m.graph_module) == cm.base_op_count  # ... and drops the dropout with the branch
    cm.eval()
    with torch.no_grad():
        assert max_diff(m(*args), cm(*args)) <= 1e-5
        again = m.merge()
        assert op_count(again.graph_module) == op_count(m.graph_module)
        assert max_diff(again(*args), m(*args)) == 0.0
