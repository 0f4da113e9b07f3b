"""graph.to_networkx, the measured memory beside the plan, and the memory timeline picture."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import get_tensor, to_networkx
from graphpeft.training import phase_of

from models import tiny_llama, token_batch

IDS = token_batch(batch=2, seq=16)
_CACHE: dict[str, Any] = {}


def step() -> Any:
    """A LoRA SGD step of a tiny Llama with adapter dropout (random ops in the graph); shared,
    tests only read it (measuring writes nothing back)."""
    if "step" not in _CACHE:
        cm = gp.compile(tiny_llama().train(), gp.Plan([gp.LoRA(targets="all-linear", r=4, init="random", dropout=0.1)]),
                        (IDS,), {"use_cache": False})
        _CACHE["step"] = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1, momentum=0.9), example_batch=(IDS,))
    return _CACHE["step"]


def test_to_networkx_nodes_edges_and_attributes() -> None:
    import networkx as nx

    gm = step().graph_module
    G = to_networkx(gm)
    nodes = list(gm.graph.nodes)
    assert isinstance(G, nx.DiGraph) and G.number_of_nodes() == len(nodes)
    assert nx.is_directed_acyclic_graph(G)
    assert G.number_of_edges() == sum(len(n.all_input_nodes) for n in nodes)
    for i, n in enumerate(nodes):
        d = G.nodes[n.name]
        assert d["node"] is n and d["index"] == i and d["op"] == n.op
        assert set(G.predecessors(n.name)) == {a.name for a in n.all_input_nodes}
        assert d["phase"] == (phase_of(n) if n.op != "output" else "output")
    # roles: frozen weights, training-graph inputs by kind
    roles = {d["role"] for _, d in G.nodes(data=True)}
    assert {"frozen", "param", "state", "lr", "batch"} <= roles
    assert {"forward", "loss", "backward", "optimizer"} <= {d["phase"] for _, d in G.nodes(data=True)}
    # bytes: a matmul allocates its result; a view allocates nothing and names its storage's owner
    mm = next(n for n in nodes if n.target == torch.ops.aten.mm.default)
    assert G.nodes[mm.name]["bytes"] == mm.meta["val"].numel() * 4 and G.nodes[mm.name]["target"] == "aten.mm.default"
    view = next(n for n in nodes if n.target == torch.ops.aten.view.default and n.args[0].op == "call_function"
                and n.args[0].target == torch.ops.aten.mm.default)
    assert G.nodes[view.name]["bytes"] == 0 and G.nodes[view.name]["alias_of"] == view.args[0].name
    assert all(d["bytes"] == G.nodes[u]["bytes"] for u, _, d in G.edges(data=True) if G.nodes[u]["alias_of"] is None)


def test_measured_peak_matches_plan_and_changes_nothing() -> None:
    s = step()
    before = {n: get_tensor(s.cm.graph_module, n).clone() for n in s.param_names}
    state = {k: v.clone() for k, v in s._state.items()}
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    report = s.memory_report(measure=True)
    assert torch.equal(torch.get_rng_state(), rng)  # random draws of later steps are unchanged
    assert all(torch.equal(before[n], get_tensor(s.cm.graph_module, n)) for n in s.param_names)
    assert all(torch.equal(state[k], s._state[k]) for k in state)
    assert report.measured_peak_bytes and len(report.measured_timeline) == report.num_nodes
    assert abs(report.plan_vs_measured - 1) <= 0.15, str(report)
    assert "measured peak" in str(report) and "plan / measured" in str(report)


def test_measure_memory_counts_shared_storage_once() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphpeft.passes.memory.measure_memory import measure_memory

    def f(x: torch.Tensor) -> Any:
        y = x * 2  # 4 KiB
        v = y.view(-1)  # shares y's storage
        z = v + 1  # 4 KiB, y dies here
        return z.sum()

    gm = make_fx(f)(torch.ones(32, 32))
    m = measure_memory(gm, [torch.ones(32, 32)])
    assert m.peak_bytes == 3 * 4096  # x, y (once for y and its view), z
    assert len(m.timeline) == len(gm.graph.nodes)


def test_plot_writes_a_timeline(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    report = step().memory_report(measure=True)
    assert set(report.timeline_by_category) == set(gp.training.MEMORY_CATEGORIES)
    assert [sum(v) for v in zip(*report.timeline_by_category.values())] == report.timeline
    out = tmp_path / "timeline.png"
    report.plot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_without_matplotlib_is_a_clear_error(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(gp.GraphPeftError, match="matplotlib"):
        step().memory_report().plot(tmp_path / "t.png")
