"""Backward pruning made visible, and the memory budget (issue 4, parts 2 and 3).

The op counts of the pruned training graph: updating the last block and nothing else leaves
the backward with fewer than half of the matrix products of full fine-tuning (frozen layers
compute only the input gradient, layers below the last trainable tensor nothing); a channel
slice computes its weight gradient for its rows only. ``step.backward_report()`` says so per
layer. ``gp.choose_update_scheme`` picks a scheme that fits a budget by the static planner.
"""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.training import phase_of

from conftest import ARCHS

aten = torch.ops.aten


def backward_ops(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target and phase_of(n) == "backward")


def compiled_step(rules):
    arch = ARCHS["llama"]
    args, kwargs = arch.inputs()
    cm = gp.compile(arch.build(), gp.Plan(rules), args, kwargs)
    # these tests count the backward's own GEMMs: the fused head computes its gradients in the loss
    # attention in math form: the counts below are of plain matrix products
    return cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=args, fuse_head_loss=False,
                               fused_attention=False)


@pytest.fixture(scope="module")
def full_and_last():
    return compiled_step([gp.Update(targets=".*")]), compiled_step([gp.Update(targets=".*", layers=[-1])])


def test_op_counts_of_the_pruned_backward(full_and_last):
    full, last = full_and_last
    # full: 15 linears x (input grad + weight grad); attention: 4 bmm per layer
    assert backward_ops(full.graph_module, aten.mm.default) == 30
    assert backward_ops(full.graph_module, aten.bmm.default) == 8
    # last block only: its 7 weight grads, input grads of o/gate/up/down (q/k/v feed nothing trainable
    # below) and of the frozen head; layer 0 has no backward at all
    assert backward_ops(last.graph_module, aten.mm.default) == 7 + 4 + 1
    assert backward_ops(last.graph_module, aten.bmm.default) == 4
    assert len([n for n in last.graph_module.graph.nodes if phase_of(n) == "backward"]) < \
        0.5 * len([n for n in full.graph_module.graph.nodes if phase_of(n) == "backward"])
    assert last.memory_report().peak_bytes < full.memory_report().peak_bytes


def test_backward_report_per_layer(full_and_last):
    full, last = full_and_last
    r = last.backward_report()
    assert r.backward_matmuls == 16 and r.first_reached() == "model.layers.1.self_attn.q_proj"
    assert r.layer("model.layers.0.mlp.down_proj").summary == "nothing" and not r.layer("model.embed_tokens").reached
    assert r.layer("model.layers.1.self_attn.q_proj").summary == "weight grad (full, 32x32)"
    assert r.layer("model.layers.1.mlp.down_proj").summary == "input grad, weight grad (full, 32x64)"
    assert r.layer("model.layers.1.mlp.down_proj").matmuls == 2
    assert r.layer("lm_head").summary == "input grad" and r.layer("lm_head").matmuls == 1
    assert r.layer("model.norm").summary == "input grad"
    assert r.reached() == [l.path for l in r.layers[r.layers.index(r.layer("model.layers.1.self_attn.q_proj")):]
                           if l.path != "model.layers.1.input_layernorm"]
    text = str(r)
    assert "pruned backward:" in text and "stops at model.layers.1.self_attn.q_proj" in text
    assert "model.layers.0.self_attn.q_proj" in text and "nothing" in text
    assert full.backward_report().layer("model.embed_tokens").summary == "weight grad (full, 128x32)"


def test_slice_backward_computes_only_the_slice_rows():
    step = compiled_step([gp.Update(targets=["down_proj"], layers=[-1], fraction=0.25, select="magnitude")])
    r = step.backward_report()
    entry = r.layer("model.layers.1.mlp.down_proj")
    # the only trainable tensor, so the lowest: no input gradient, just dW of the 8 slice rows
    assert entry.summary == "weight-slice grad (8 of 32 rows)" and entry.matmuls == 1
    assert entry.trainable == ["model.layers.1.mlp.down_proj.weight_slice"]
    # the weight-gradient product has the slice's shape, never the full weight's
    grads = [n for n in step.graph_module.graph.nodes
             if "model.layers.1.mlp.down_proj.weight_slice" in (n.meta.get("graphpeft") or {}).get("grad_of", [])]
    assert grads and all(list(g.meta["val"].shape) == [8, 64] for g in grads)
    assert backward_ops(step.graph_module, aten.mm.default) == 2  # dW of the slice, dx of the head
    assert r.layer("model.layers.1.mlp.up_proj").summary == "nothing"


def test_choose_update_scheme_fits_the_budget():
    arch = ARCHS["llama"]
    args, kwargs = arch.inputs()
    model = arch.build()
    roomy = gp.choose_update_scheme(model, args, "causal_lm", gp.optim.AdamW(lr=1e-3), 1 << 30, example_kwargs=kwargs)
    assert roomy.chosen.description == "full fine-tuning" and len(roomy.candidates) == 1
    full_peak = roomy.chosen.peak_bytes
    scheme = gp.choose_update_scheme(model, args, "causal_lm", gp.optim.AdamW(lr=1e-3), full_peak - 1,
                                     example_kwargs=kwargs, fractions=(1.0, 0.25))
    chosen = scheme.chosen
    assert chosen is not None and chosen.fits and chosen.peak_bytes <= full_peak - 1
    assert not scheme.candidates[0].fits and scheme.candidates[0].description == "full fine-tuning"
    ranged = [c for c in scheme.candidates if c.fits and c.description.startswith("last")]
    assert chosen.trainable_parameters == max(c.trainable_parameters for c in ranged)
    assert all(c.peak_bytes > full_peak - 1 for c in scheme.candidates if not c.fits)
    text = str(scheme)
    assert f"->{chosen.description}" in text and "chosen: " + chosen.description in text
    assert "the fitting scheme with the most trainable parameters" in scheme.reason
    # the plan is data (YAML) and reproduces the planned peak
    assert gp.Plan.from_yaml(scheme.plan.to_yaml()) == scheme.plan
    cm = gp.compile(arch.build(), scheme.plan, args, kwargs)
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3), example_batch=args)
    assert step.memory_report().peak_bytes == chosen.peak_bytes


def test_choose_update_scheme_when_nothing_fits():
    arch = ARCHS["llama"]
    args, kwargs = arch.inputs()
    scheme = gp.choose_update_scheme(arch.build(), args, "causal_lm", gp.optim.SGD(lr=0.1), 10_000,
                                     example_kwargs=kwargs)
    assert scheme.plan is None and scheme.chosen is None
    assert "nothing fits: the model's weights alone need" in scheme.reason
    with pytest.raises(gp.PlanError, match="budget_bytes must be a positive number of bytes"):
        gp.choose_update_scheme(arch.build(), args, "causal_lm", gp.optim.SGD(lr=0.1), 0, example_kwargs=kwargs)
    with pytest.raises(gp.PlanError, match=r"fractions must be numbers in \(0, 1\]"):
        gp.choose_update_scheme(arch.build(), args, "causal_lm", gp.optim.SGD(lr=0.1), 1 << 20,
                                example_kwargs=kwargs, fractions=(1.5,))
