"""rematerialize: compile_training(memory_budget=...) — min-cut choice, structure, numerics, the same
dropout masks, the report, and the error naming the smallest feasible budget."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import META_KEY, get_tensor
from graphpeft.passes.memory.rematerialize import (_peak, apply, choose, gemm_flops, never_recompute,
                                                    recomputable_gemm, undo)
from graphpeft.passes.memory.schedule_memory import is_random
from graphpeft.training import phase_of

from models import tiny_llama, token_batch

IDS = token_batch(batch=2, seq=16)
_CACHE: dict[str, Any] = {}


def model() -> gp.CompiledModel:
    # the model in train mode: its adapter dropout is active in the graph (random ops to keep)
    if "cm" not in _CACHE:
        _CACHE["cm"] = gp.compile(tiny_llama().train(),
                                  gp.Plan([gp.LoRA(targets="all-linear", r=4, init="random", dropout=0.1)]),
                                  (IDS,), {"use_cache": False})
    return _CACHE["cm"]


def compile_step(**options: Any) -> Any:
    return model().compile_training("causal_lm", gp.optim.SGD(lr=0.1, momentum=0.9), example_batch=(IDS,), **options)


def plain() -> Any:
    if "plain" not in _CACHE:
        _CACHE["plain"] = compile_step()
    return _CACHE["plain"]


def floor() -> int:
    """The smallest feasible budget (the error for an unmeetable one names it)."""
    if "floor" not in _CACHE:
        with pytest.raises(gp.GraphPeftError) as e:
            compile_step(memory_budget=1)
        _CACHE["floor"] = int(re.search(r"smallest feasible budget is (\d+) bytes", str(e.value)).group(1))
    return _CACHE["floor"]


def cheap_floor() -> int:
    """The least planned peak without recomputing matrix multiplies (tiers 1 and 2 of the pass)."""
    if "cheap_floor" not in _CACHE:
        gm = plain().graph_module
        peaks = []
        for tier in (1, 2):
            made = apply(gm, choose(gm, tier))
            peaks.append(_peak(gm))
            undo(gm, made)
        _CACHE["cheap_floor"] = min(peaks)
    return _CACHE["cheap_floor"]


def budget() -> int:
    """Halfway between the plain peak and the least peak cheap recomputation reaches."""
    return (cheap_floor() + plain().memory_report().peak_bytes) // 2


def gemm_budget() -> int:
    """Halfway between the smallest feasible budget and what cheap recomputation reaches: only
    recomputing matrix multiplies meets it."""
    assert floor() < cheap_floor()
    return (floor() + cheap_floor()) // 2


def budgeted(kind: str = "cheap") -> Any:
    if kind not in _CACHE:
        _CACHE[kind] = compile_step(memory_budget=budget() if kind == "cheap" else gemm_budget())
    return _CACHE[kind]


def copies(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if (n.meta.get(META_KEY) or {}).get("pass_name") == "rematerialize"]


def test_budget_is_met_by_recomputing_cheap_forward_values() -> None:
    base, step = plain().memory_report(), budgeted().memory_report(measure=True)
    assert step.memory_budget == budget()
    assert step.peak_before_remat_bytes == base.peak_bytes
    assert step.peak_bytes <= step.memory_budget < base.peak_bytes
    assert step.recomputed and "recomputed in the backward" in str(step)
    assert abs(step.plan_vs_measured - 1) <= 0.15  # the plan holds for the rematerialized graph too
    gm = budgeted().graph_module
    made = copies(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    assert sorted(c.meta[META_KEY]["recompute_of"] for c in made) == sorted(step.recomputed)
    for c in made:
        orig = by_name[c.meta[META_KEY]["recompute_of"]]
        assert c.target == orig.target and never_recompute(orig) is None
        assert c.meta[META_KEY]["rule"] == "recompute" and c.meta[META_KEY]["part"] in ("forward", "loss")
        # a copy is read only by the backward or other copies, and runs after the forward original
        assert all(u in made or phase_of(u) not in ("forward", "loss") for u in c.users)
    # what is never recomputed: random draws, matrix multiplies
    assert not any(is_random(c) or c.target in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default) for c in made)
    randoms = lambda g: sum(1 for n in g.graph.nodes if n.op == "call_function" and is_random(n))  # noqa: E731
    assert randoms(gm) == randoms(plain().graph_module) > 0


@pytest.mark.parametrize("kind", ["cheap", "gemm"])
def test_rematerialized_step_trains_exactly_like_the_plain_one(kind: str) -> None:
    cm = model()
    start = plain().state_dict()

    def run(step: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
        step.load_state_dict(start)
        torch.manual_seed(1234)  # the same dropout masks for both, if nothing random is recomputed
        losses = [float(step(IDS)) for _ in range(3)]
        return losses, {n: get_tensor(cm.graph_module, n).clone() for n in step.param_names}

    losses_a, params_a = run(plain())
    losses_b, params_b = run(budgeted(kind))
    assert losses_a == losses_b
    for n in params_a:
        torch.testing.assert_close(params_a[n], params_b[n], rtol=0, atol=0)
    plain().load_state_dict(start)


def test_budget_below_cheap_recomputation_recomputes_matrix_multiplies() -> None:
    base, step = plain().memory_report(), budgeted("gemm").memory_report(measure=True)
    assert step.peak_bytes <= gemm_budget() < cheap_floor() < base.peak_bytes
    assert abs(step.plan_vs_measured - 1) <= 0.15
    gm = budgeted("gemm").graph_module
    made = copies(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    gemms = [by_name[c.meta[META_KEY]["recompute_of"]] for c in made if recomputable_gemm(c)]
    # the report lists the recomputed GEMMs and what their second run costs
    assert gemms and sorted(n.name for n in gemms) == sorted(step.recomputed_gemms)
    assert set(step.recomputed_gemms) <= set(step.recomputed)
    assert step.recomputed_gemm_flops == sum(gemm_flops(n) for n in gemms) > 0
    assert "matrix multiplies" in str(step) and step.recomputed_gemms[0] in str(step)
    for c in made:
        assert c.meta[META_KEY]["pass_name"] == "rematerialize" and c.meta[META_KEY]["rule"] == "recompute"
        assert not is_random(c) and all(u in made or phase_of(u) not in ("forward", "loss") for u in c.users)
    randoms = lambda g: sum(1 for n in g.graph.nodes if n.op == "call_function" and is_random(n))  # noqa: E731
    assert randoms(gm) == randoms(plain().graph_module) > 0
    # a budget cheap recomputation meets recomputes no GEMM
    assert budgeted("cheap").memory_report().recomputed_gemms == []


def test_unmeetable_budget_names_the_smallest_feasible_one() -> None:
    from graphpeft.passes.memory.rematerialize import Rematerialize

    gm = plain().graph_module
    nodes = list(gm.graph.nodes)
    with pytest.raises(gp.GraphPeftError, match="smallest feasible budget is") as info:
        Rematerialize(1000)(gm)
    assert list(gm.graph.nodes) == nodes  # tried and undone: the graph is as it was
    feasible = int(re.search(r"smallest feasible budget is (\d+) bytes", str(info.value)).group(1))
    assert 1000 < feasible < plain().memory_report().peak_bytes
    step = compile_step(memory_budget=feasible)  # the named budget is indeed feasible
    assert step.memory_report().peak_bytes <= feasible


def test_budget_already_met_changes_nothing_and_bad_budgets_are_refused() -> None:
    from graphpeft.passes.memory.rematerialize import Rematerialize

    gm = plain().graph_module
    nodes = list(gm.graph.nodes)
    assert not Rematerialize(plain().memory_report().peak_bytes)(gm).modified
    assert list(gm.graph.nodes) == nodes and not copies(gm)
    assert plain().memory_report().memory_budget is None and plain().memory_report().recomputed == []
    for bad in (0, -5, "1MB", True):
        with pytest.raises(gp.PlanError, match="memory_budget"):
            compile_step(memory_budget=bad)


def test_min_cut_keeps_less_than_the_backward_reads() -> None:
    gm = plain().graph_module
    tier2 = choose(gm, tier=2)
    read = {a for n in gm.graph.nodes if n.op == "call_function" and phase_of(n) not in ("forward", "loss")
            for a in n.all_input_nodes if a.op == "call_function" and phase_of(a) in ("forward", "loss")}
    from graphpeft.graph import to_networkx

    G = to_networkx(gm)
    roots = {G.nodes[a.name]["alias_of"] or a.name for a in read}
    assert tier2.saved_bytes < sum(G.nodes[r]["bytes"] for r in roots)
    assert tier2.saved_bytes <= choose(gm, tier=1).saved_bytes


def test_values_read_from_storage_written_in_place_are_not_recomputed() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x: torch.Tensor, buf: torch.Tensor) -> Any:
        y = x.sin()  # small
        z = y * buf  # big; reads buf, which is written below
        buf.add_(1)
        return z.cos() * 2  # "backward": reads z

    gm = make_fx(f)(torch.ones(1, 64), torch.ones(64, 64))
    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.meta[META_KEY] = {"part": "backward" if n.target in (torch.ops.aten.cos.default,) or
                                any(a.target == torch.ops.aten.cos.default for a in n.all_input_nodes) else "forward"}
    z = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor and phase_of(n) == "forward")
    plan = choose(gm, tier=2)
    assert z in plan.saved and z not in plan.recomputed

    # the same graph without the in-place write keeps nothing: z is remade from the inputs
    def g(x: torch.Tensor, buf: torch.Tensor) -> Any:
        return (x.sin() * buf).cos() * 2

    gm2 = make_fx(g)(torch.ones(1, 64), torch.ones(64, 64))
    for n in gm2.graph.nodes:
        if n.op == "call_function":
            n.meta[META_KEY] = {"part": "backward" if n.target == torch.ops.aten.cos.default or
                                any(a.target == torch.ops.aten.cos.default for a in n.all_input_nodes) else "forward"}
    plan2 = choose(gm2, tier=2)
    assert [n.target for n in plan2.recomputed] == [torch.ops.aten.sin.default, torch.ops.aten.mul.Tensor]
    assert plan2.saved == [] and plan2.saved_bytes == 0
