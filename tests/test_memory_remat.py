"""rematerialize: compile_training(memory_budget=...) — min-cut choice, structure, numerics, the same
dropout masks, the report, and the error naming the smallest feasible budget."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import META_KEY, get_tensor
from graphpeft.passes.memory.rematerialize import choose, never_recompute
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


def budget() -> int:
    """Halfway between the plain peak and the smallest feasible budget (the error names it)."""
    if "budget" not in _CACHE:
        import re

        with pytest.raises(gp.GraphPeftError) as e:
            compile_step(memory_budget=1)
        floor = int(re.search(r"smallest feasible budget is (\d+) bytes", str(e.value)).group(1))
        _CACHE["budget"] = (floor + plain().memory_report().peak_bytes) // 2
    return _CACHE["budget"]


def budgeted() -> Any:
    if "remat" not in _CACHE:
        _CACHE["remat"] = compile_step(memory_budget=budget())
    return _CACHE["remat"]


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


def test_rematerialized_step_trains_exactly_like_the_plain_one() -> None:
    cm = model()
    start = plain().state_dict()

    def run(step: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
        step.load_state_dict(start)
        torch.manual_seed(1234)  # the same dropout masks for both, if nothing random is recomputed
        losses = [float(step(IDS)) for _ in range(3)]
        return losses, {n: get_tensor(cm.graph_module, n).clone() for n in step.param_names}

    losses_a, params_a = run(plain())
    losses_b, params_b = run(budgeted())
    assert losses_a == losses_b
    for n in params_a:
        torch.testing.assert_close(params_a[n], params_b[n], rtol=0, atol=0)
    plain().load_state_dict(start)


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
