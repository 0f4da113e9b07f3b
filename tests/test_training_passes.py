"""Training-graph passes: CSE, gradient-flow check, update reordering, memory plan, ONNX
legalization — structure, counts and numerical equivalence on real training graphs."""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
import torch.fx as fx

import graphpeft as gp
from graphpeft.errors import VerificationError
from graphpeft.graph import META_KEY, Provenance, get_tensor, roles
from graphpeft.registry import PASSES
from graphpeft.training import ORDER_KEY, PHASES, UPDATE_PHASES, phase_of, signature_of, verify_training
from graphpeft.training.options import DEFAULT_TRAINING_PASSES
from graphpeft.passes.memory.plan_memory import liveness, nbytes
from graphpeft.passes.memory.plan_memory import _categories as memory_categories
from graphpeft.backends.onnx.train_export import legalized_copy

from models import image_batch, tiny_bert, tiny_cnn, tiny_llama, token_batch

aten = torch.ops.aten
IDS = token_batch()
_CACHE: dict[Any, Any] = {}


def llama(**lora: Any) -> gp.CompiledModel:
    key = ("llama", tuple(sorted((k, str(v)) for k, v in lora.items())))
    if key not in _CACHE:
        rule = gp.LoRA(**{"targets": ["q_proj", "v_proj"], "r": 4, "init": "random", **lora})
        _CACHE[key] = gp.compile(tiny_llama(), gp.Plan([rule]), (IDS,), {"use_cache": False})
    return _CACHE[key]


def llama_step(opt: Any = None, **options: Any) -> Any:
    """A compiled AdamW step of the Llama model (the default one is compiled once and shared:
    tests only read it)."""
    if opt is None and not options:
        if "step" not in _CACHE:
            _CACHE["step"] = llama_step(gp.optim.AdamW(lr=1e-3), example_batch=(IDS,), fuse_optimizer=False)
        return _CACHE["step"]
    opt = opt or gp.optim.AdamW(lr=1e-3)
    options.setdefault("fuse_optimizer", False)  # these tests place and measure per-tensor updates
    return llama().compile_training("causal_lm", opt, example_batch=options.pop("example_batch", (IDS,)), **options)


def cnn() -> gp.CompiledModel:
    if "cnn" not in _CACHE:
        _CACHE["cnn"] = gp.compile(tiny_cnn(), gp.Plan([gp.LoRA(targets=["conv1", "conv2", "fc"], r=2, init="random")]),
                                   (image_batch(),))
    return _CACHE["cnn"]


CNN_BATCH = (image_batch(), torch.tensor([1, 7]))


def positions(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


# --- common-subexpression elimination -------------------------------------------------------


def test_cse_merges_pure_duplicates_but_not_random_ops() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x: torch.Tensor) -> Any:
        return x.add(1) * x.add(1), torch.rand_like(x) + torch.rand_like(x), x.add(1.0)

    gm = make_fx(f)(torch.ones(3))
    adds = lambda: [n for n in gm.graph.nodes if n.target == aten.add.Tensor and n.args[1] in (1, 1.0)]  # noqa: E731
    rands = lambda: [n for n in gm.graph.nodes if n.target == aten.rand_like.default]  # noqa: E731
    assert len(adds()) == 3 and len(rands()) == 2
    result = PASSES["eliminate_common_subexpressions"]()(gm)
    assert result.modified
    # x.add(1) twice -> once; x.add(1.0) is kept apart (1 and 1.0 are different arguments); rand never merges
    assert len(adds()) == 2 and len(rands()) == 2
    torch.testing.assert_close(gm(torch.ones(3))[0], torch.full((3,), 4.0))


def test_cse_runs_on_the_training_graph() -> None:
    step = llama_step()
    assert step.ctx.options["cse_removed"] > 0
    # the pipeline is verified after every pass, with the training verifier
    verify_training(step.graph_module)


# --- gradient flow -------------------------------------------------------------------------------


def test_frozen_tensors_get_no_gradient() -> None:
    step = llama_step()
    gm, sig = step.graph_module, step.signature
    cm_roles = llama().roles()
    # every updated tensor is trainable; every frozen tensor is stored in the graph, never an input
    assert sig.params == [n for n, r in cm_roles.items() if r.trainable]
    assert all(gp.Role(r).trainable for r in sig.param_roles.values())
    stored = roles(gm)
    assert stored and not any(r.trainable for r in stored.values())
    frozen = {n for n, r in cm_roles.items() if not r.trainable}
    assert set(stored) <= frozen
    placeholder_names = {s.key for s in sig.inputs if s.kind in ("param", "state")}
    assert not placeholder_names & frozen
    # the stored frozen tensors are the model's own (no copy)
    for name in list(stored)[:5]:
        assert get_tensor(gm, name) is get_tensor(llama().graph_module, name)
    findings = gm.meta["graphpeft"]["gradient_flow"]
    assert findings["problems"] == [] and findings["dead_backward_ops"] == 0
    # no backward op of an embedding: nothing trainable lies below the first attention
    assert not any("embedding_dense_backward" in str(n.target) for n in gm.graph.nodes)


def test_check_gradient_flow_reports_a_wasted_backward_op() -> None:
    step = llama_step()
    gm, _ = legalized_copy(step.graph_module)
    backward = next(n for n in gm.graph.nodes if phase_of(n) == "backward" and n.target == aten.mm.default)
    with gm.graph.inserting_after(backward):
        leak = gm.graph.call_function(aten.mul.Tensor, (backward, 2.0))
    leak.meta[META_KEY] = Provenance("test", part="backward").as_dict()
    with pytest.raises(VerificationError, match="feed no trainable tensor's gradient"):
        PASSES["check_gradient_flow"]()(gm)


def test_check_gradient_flow_reports_a_trainable_tensor_without_gradient() -> None:
    # BERT's pooler output is not read by a loss on the last hidden state: its adapter gets no gradient
    cm = gp.compile(tiny_bert(), gp.Plan([gp.LoRA(targets=["value", "pooler.dense"], r=2, init="random")]), (IDS,))
    target = torch.zeros(2, 8, 32)
    with pytest.raises(VerificationError, match="receives no gradient"):
        cm.compile_training("mse", gp.optim.SGD(lr=0.1), example_batch=(IDS, target))


def test_backward_stops_where_nothing_trainable_lies_below() -> None:
    low = llama(layers=[0]).compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS,))
    high = llama(layers=[1]).compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS,))
    f_low = low.graph_module.meta["graphpeft"]["gradient_flow"]
    f_high = high.graph_module.meta["graphpeft"]["gradient_flow"]
    assert f_high["forward_ops_needing_grad"] < f_low["forward_ops_needing_grad"]
    assert f_high["backward_ops"] < f_low["backward_ops"]
    # adapters only in layer 1: no backward op traces back to layer 0's modules' own weights
    assert f_high["problems"] == [] and f_low["problems"] == []


def test_batchnorm_weight_gradients_are_computed_then_pruned() -> None:
    # batch norm's backward formula also yields the frozen weight/bias gradients: dead ops that
    # remove_dead_code prunes; checked before pruning they are reported
    cm = cnn()
    with pytest.raises(VerificationError, match="feed no trainable"):
        cm.compile_training("cross_entropy", gp.optim.SGD(lr=0.01), example_batch=CNN_BATCH,
                            passes=["eliminate_common_subexpressions", "check_gradient_flow"])
    step = cm.compile_training("cross_entropy", gp.optim.SGD(lr=0.01), example_batch=CNN_BATCH)
    assert step.graph_module.meta["graphpeft"]["gradient_flow"]["dead_backward_ops"] == 0


# --- reordering -----------------------------------------------------------------------------------


def _update_windows(gm: fx.GraphModule, order: list[fx.Node]) -> dict[str, tuple[int, int, list[fx.Node]]]:
    pos = {n: i for i, n in enumerate(order)}
    out = {}
    for p in signature_of(gm).params:
        grad = next(n for n in order if p in (n.meta.get(META_KEY) or {}).get("final_grad_of", []))
        updates = [n for n in order if (n.meta.get(META_KEY) or {}).get("param") == p]
        end = max(pos[u] for u in updates)
        between = order[pos[grad] + 1:end + 1]
        out[p] = (pos[grad], end, between)
    return out


def _finite_flag(gm: fx.GraphModule) -> fx.Node:
    """The step's finite flag: the check-phase value the updates' ``where`` nodes read."""
    flags = {a for n in gm.graph.nodes if phase_of(n) in UPDATE_PHASES
             for a in n.all_input_nodes if phase_of(a) == "check"}
    assert len(flags) == 1, [f.name for f in flags]
    return flags.pop()


def test_each_update_runs_right_after_the_finite_flag() -> None:
    step = llama_step()
    gm = step.graph_module
    order = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    flag = _finite_flag(gm)
    # the flag reads every gradient, so it comes after the backward; every update follows it
    assert pos[flag] > max(pos[n] for n in order if phase_of(n) == "backward")
    for p, (g, end, between) in _update_windows(gm, order).items():
        assert g < pos[flag] < end, p
        updates = [n for n in order if (n.meta.get(META_KEY) or {}).get("param") == p]
        assert all(pos[u] > pos[flag] for u in updates), p
    # after the flag: only update and check ops (no forward or backward op waits behind them)
    assert all(phase_of(n) in (*UPDATE_PHASES, "check") for n in order[pos[flag] + 1:-1])


def test_no_update_result_is_alive_during_the_backward() -> None:
    step = llama_step()
    gm = step.graph_module
    cats = memory_categories(gm)
    order = list(gm.graph.nodes)
    traced = sorted(order[:-1], key=lambda n: n.meta[ORDER_KEY]) + [order[-1]]
    grads = [n for n in order if (n.meta.get(META_KEY) or {}).get("final_grad_of")]
    assert len(grads) == len(step.signature.params)
    pos = {n: i for i, n in enumerate(order)}
    last_backward = max(i for i, n in enumerate(order) if phase_of(n) == "backward")
    # an update that reads a gradient runs after the backward: its results (new tensors and
    # moments, 3x the gradient's bytes with AdamW) never sit beside the backward's values
    readers = [u for g in grads for u in g.users if phase_of(u) in UPDATE_PHASES]
    assert readers and all(pos[u] > last_backward for u in readers)
    now, before = liveness(order, cats), liveness(traced, cats)
    assert now["peak"] <= before["peak"]
    assert sorted(n.name for n in order) == sorted(n.name for n in traced)  # same ops


# --- memory plan ------------------------------------------------------------------------------------


def test_memory_plan_numbers_are_sane() -> None:
    step = llama_step()
    report = step.memory_report()
    gm, sig = step.graph_module, step.signature
    weights = sum(nbytes(get_tensor(gm, n)) for n in roles(gm)) + sum(
        nbytes(torch.empty(s.shape)) for s in sig.inputs if s.kind == "param")
    state = sum(nbytes(torch.empty(s.shape)) for s in sig.inputs if s.kind in ("state", "lr"))
    assert report.totals["weights"] == weights
    assert report.totals["optimizer_state"] == state
    assert report.peak_bytes >= weights + state
    assert sum(report.at_peak.values()) == report.peak_bytes
    assert all(report.category_peaks[c] >= report.at_peak[c] for c in report.at_peak)
    everything = sum(nbytes(n.meta.get("val")) for n in gm.graph.nodes if n.op != "output")
    assert report.peak_bytes <= everything
    assert report.trace_order_peak_bytes is not None and report.peak_bytes <= report.trace_order_peak_bytes
    assert len(report.timeline) == report.num_nodes == len(gm.graph.nodes)
    text = str(report)
    assert "peak" in text and all(c in text for c in ("weights", "activations", "gradients", "optimizer_state"))


def test_gradient_accumulation_lowers_activation_memory() -> None:
    big = token_batch(batch=4)
    one = llama_step(gp.optim.SGD(lr=0.1), example_batch=(big,))
    two = llama_step(gp.optim.SGD(lr=0.1), example_batch=(big,), accumulation_steps=2)
    a1 = one.memory_report().category_peaks["activations"]
    a2 = two.memory_report().category_peaks["activations"]
    assert a2 < a1


# --- ONNX legalization ----------------------------------------------------------------------------


def _run(gm: fx.GraphModule, inputs: list) -> list:
    with torch.no_grad():
        return list(gm(*inputs))


@pytest.mark.parametrize("which", ["llama", "cnn"])
def test_legalize_onnx_rewrites_and_keeps_the_numbers(which: str) -> None:
    if which == "llama":  # without simplify_algebra, which already removes silu's in-place ops
        passes = [p for p in DEFAULT_TRAINING_PASSES if p != "simplify_algebra"]
        step, batch = llama_step(gp.optim.AdamW(lr=1e-3), passes=passes), (IDS,)
    else:
        step, batch = cnn().compile_training("cross_entropy", gp.optim.AdamW(lr=1e-3), example_batch=CNN_BATCH), CNN_BATCH
    gm = step.graph_module
    legal, counts = legalized_copy(gm)
    assert legal is not gm
    if which == "llama":  # silu's backward: empty_permuted + copy_ + sub_; asserts from casts
        assert counts["empty"] >= 1 and counts["functionalize"] >= 2 and counts["drop_asserts"] >= 1
    else:
        assert counts["conv_backward"] >= 1
    bad = [n for n in legal.graph.nodes if n.op == "call_function" and (
        n.target in (aten.empty_permuted.default, aten.convolution_backward.default, aten.squeeze.dims)
        or getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable)]
    assert bad == []
    created = [n for n in legal.graph.nodes if (n.meta.get(META_KEY) or {}).get("pass_name") == "legalize_onnx"]
    assert created and all(n.meta[META_KEY]["part"] in PHASES for n in created)
    inputs = step.flat_inputs(*batch)
    for a, b in zip(_run(gm, inputs), _run(legal, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert list(gm.graph.nodes)[0].op == "placeholder"  # the original graph is untouched
    assert any(n.target == aten.empty_permuted.default or n.target == aten.convolution_backward.default
               for n in gm.graph.nodes)


def test_legalize_decomposes_nll_loss() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.nll_loss_forward(torch.log_softmax(x, -1), t, None, 1, -100)[0]

    x, t = torch.randn(4, 5), torch.tensor([0, 3, -100, 2])
    gm = make_fx(f, tracing_mode="fake")(x, t)
    assert any(n.target == aten.nll_loss_forward.default for n in gm.graph.nodes)
    PASSES["legalize_onnx"]()(gm)
    assert not any("nll_loss" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x, t), f(x, t))


def test_every_node_has_provenance_and_a_phase() -> None:
    gm = llama_step().graph_module
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert all(n.meta[META_KEY]["part"] in PHASES for n in ops)
    adapter_ops = [n for n in ops if n.meta[META_KEY].get("adapter") == "model.layers.0.self_attn.q_proj"]
    assert adapter_ops and {n.meta[META_KEY]["part"] for n in adapter_ops} == {"forward"}
    # the rotary embedding's higher-order op (wrap_with_set_grad_enabled) was inlined
    assert not any("wrap_with_set_grad_enabled" in str(n.target) for n in gm.graph.nodes)
    assert not any(isinstance(getattr(gm, n.target, None), fx.GraphModule) for n in gm.graph.nodes if n.op == "get_attr")
    assert all(n.target is operator.getitem or isinstance(n.target, torch._ops.OpOverload) for n in ops)


def test_verifier_rejects_a_node_without_provenance() -> None:
    gm, _ = legalized_copy(llama_step().graph_module)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    del node.meta[META_KEY]
    with pytest.raises(VerificationError, match="no provenance"):
        verify_training(gm)
