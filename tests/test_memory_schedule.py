"""schedule_memory: the peak-memory list scheduler — structure, peak, numerics, random-op order."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

import graphpeft as gp
from graphpeft.graph import graph_meta, to_networkx
from graphpeft.passes.memory.plan_memory import _categories, liveness
from graphpeft.passes.memory.schedule_memory import is_random, memory_schedule, ordering_edges
from graphpeft.registry import PASSES
from graphpeft.training import UPDATE_PHASES, phase_of
from graphpeft.training.options import DEFAULT_TRAINING_PASSES

from models import tiny_llama, token_batch

IDS = token_batch(batch=2, seq=16)


def peak(gm: fx.GraphModule) -> int:
    return liveness(list(gm.graph.nodes), _categories(gm))["peak"]


def two_branches() -> fx.GraphModule:
    def f(x: torch.Tensor) -> Any:
        a = x * 2  # traced order: a and b are alive together ...
        b = x * 3
        c = a.sum()  # ... though a can die before b is made
        d = b.sum()
        return c + d

    return make_fx(f)(torch.ones(64, 64))


def test_schedule_lowers_the_peak_of_a_bad_order() -> None:
    gm = two_branches()
    x = torch.randn(64, 64)
    ref = gm(x)
    names_before = sorted(n.name for n in gm.graph.nodes)
    before = peak(gm)
    result = PASSES["schedule_memory"]()(gm)
    assert result.modified
    order = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    assert order.index("sum_1") < order.index("mul_1")  # a's sum runs before b is made
    assert sorted(n.name for n in gm.graph.nodes) == names_before  # same ops, new order
    assert before == 3 * 16384 + 4 and peak(gm) == 2 * 16384 + 8  # x, a, b (+ c) -> x, b (+ c, d)
    assert graph_meta(gm)["schedule"] == {"before": before, "after": peak(gm)}
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)


def test_schedule_keeps_a_good_order() -> None:
    def f(x: torch.Tensor) -> Any:
        return (x * 2).sum() + (x * 3).sum()

    gm = make_fx(f)(torch.ones(8, 8))
    order = list(gm.graph.nodes)
    assert not PASSES["schedule_memory"]()(gm).modified
    assert list(gm.graph.nodes) == order


def test_random_ops_and_inplace_writes_are_ordering_constraints() -> None:
    def f(x: torch.Tensor) -> Any:
        r1 = torch.rand_like(x)
        y = x * 2
        r2 = torch.rand_like(x)
        y.add_(1)  # in place: after the reads of y before it, before the reads after it
        return r1.sum() + r2.sum() + y.sum()

    gm = make_fx(f)(torch.ones(4, 4))
    edges = {(a.name, b.name) for a, b in ordering_edges(gm, to_networkx(gm))}
    rand = [n.name for n in gm.graph.nodes if n.op == "call_function" and is_random(n)]
    assert len(rand) == 2 and (rand[0], rand[1]) in edges
    add_ = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.add_.Tensor)
    later_reader = next(iter(add_.users)) if add_.users else None
    assert later_reader is None or (add_.name, later_reader.name) in edges or later_reader in add_.users


def test_schedule_of_a_training_step_keeps_numerics_masks_and_update_placement() -> None:
    cm = gp.compile(tiny_llama().train(), gp.Plan([gp.LoRA(targets="all-linear", r=4, init="random", dropout=0.1)]),
                    (IDS,), {"use_cache": False})
    names = list(DEFAULT_TRAINING_PASSES)
    names.insert(names.index("plan_memory"), "schedule_memory")
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3), example_batch=(IDS,), passes=names)
    gm = step.graph_module
    report = step.memory_report()
    assert report.unscheduled_peak_bytes is not None and report.peak_bytes <= report.unscheduled_peak_bytes
    assert report.peak_bytes == peak(gm)
    # the random draws keep their order
    rand = [n for n in gm.graph.nodes if n.op == "call_function" and is_random(n)]
    assert len(rand) >= 2
    # scheduling the scheduled graph again from scratch gives a valid topological order
    order = memory_schedule(gm)
    pos = {n: i for i, n in enumerate(order)}
    assert all(pos[a] < pos[n] for n in order for a in n.all_input_nodes)
    assert [pos[n] for n in rand] == sorted(pos[n] for n in rand)
    # every update waits for the step's finite flag (it is kept or dropped on it), so no update
    # result is alive during the backward: no backward op runs after an update reading a gradient
    nodes = list(gm.graph.nodes)
    idx = {n: i for i, n in enumerate(nodes)}
    last_backward = max(idx[n] for n in nodes if phase_of(n) == "backward")
    readers = [n for n in nodes if phase_of(n) in UPDATE_PHASES
               and any(phase_of(a) == "backward" for a in n.all_input_nodes)]
    assert readers and all(idx[n] > last_backward for n in readers)
    # numerics (same seed -> same dropout masks) equal those of the graph in its traced order
    inputs = step.flat_inputs(IDS)
    torch.manual_seed(0)
    out = gm(*inputs)
    plain = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3), example_batch=(IDS,)).graph_module
    torch.manual_seed(0)
    ref = plain(*inputs)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
