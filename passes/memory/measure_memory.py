"""Measured memory of a training graph: run it once and count the bytes of live tensor storage.

The static planner (:mod:`.plan_memory`) predicts the peak from fake-tensor sizes and
liveness; this pass checks the prediction against the real thing for the torch executor. It runs
the graph op by op exactly as the ``GraphModule``'s generated code does (each value is dropped
right after its last reader), and after every op sums the bytes of the distinct *storages* alive:
the graph's inputs and stored tensors (held by the caller and the module for the whole step),
plus every value still to be read. Storages are counted once however many views share them, so
aliasing the planner got wrong (a view it took for a copy, an op that returns its input) shows
up as a difference. Temporaries inside one aten kernel are not visible, and neither is what the
allocator keeps around: the fresh-process benchmark (``python -m benchmarks.memory``) measures
the whole process.

Measuring runs the step's computation once without writing anything back (the graph is
functional) and restores the global RNG state afterwards, so training is unchanged by it.

An analysis pass: constructed with the inputs to run on, it fills the ``measured_*`` fields of
the :class:`~graphpeft.training.MemoryReport` in ``gm.meta["graphpeft"]["memory"]`` (planning first
if there is none), which ``TrainingStep.memory_report(measure=True)`` returns.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphpeft.graph import graph_meta
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MeasuredMemory:
    """Live tensor-storage bytes of one run of a graph."""

    peak_bytes: int
    peak_node: str
    #: live bytes after each node, in graph order (the same positions as the plan's timeline)
    timeline: list[int]


def _storages(value: Any) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            st = leaf.untyped_storage()
            out.append((st.data_ptr() if st.nbytes() else -id(st), st.nbytes()))
    return out


def measure_memory(gm: fx.GraphModule, inputs: Sequence[Any]) -> MeasuredMemory:
    """Run ``gm`` on ``inputs`` op by op (freeing each value after its last use) and return the
    peak of live tensor-storage bytes, where it happens and the live bytes after every node."""
    nodes = list(gm.graph.nodes)
    last_use: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last_use[a] = n
    dies_at: dict[fx.Node, list[fx.Node]] = {}
    for v, n in last_use.items():
        dies_at.setdefault(n, []).append(v)

    refs: dict[int, int] = {}
    size: dict[int, int] = {}
    live = 0

    def hold(value: Any) -> None:
        nonlocal live
        for key, nb in _storages(value):
            if refs.get(key, 0) == 0:
                size[key] = nb
                live += nb
            refs[key] = refs.get(key, 0) + 1

    def drop(value: Any) -> None:
        nonlocal live
        for key, _ in _storages(value):
            refs[key] -= 1
            if refs[key] == 0:
                live -= size.pop(key)
                del refs[key]

    env: dict[fx.Node, Any] = {}
    pinned: list[Any] = list(inputs)  # inputs and stored tensors: alive for the whole step
    for n in nodes:
        if n.op == "get_attr":
            value = gm
            for part in str(n.target).split("."):
                value = getattr(value, part)
            pinned.append(value)
    for value in pinned:
        hold(value)
    args_iter = iter(inputs)
    timeline: list[int] = []
    peak, peak_node = -1, ""
    result: Any = None
    for n in nodes:
        if n.op == "placeholder":
            value = next(args_iter)
        elif n.op == "get_attr":
            value = gm
            for part in str(n.target).split("."):
                value = getattr(value, part)
        elif n.op == "call_function":
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
            value = n.target(*args, **kwargs)
        elif n.op == "output":
            result = fx.node.map_arg(n.args[0], lambda a: env[a])
            value = None
        else:  # call_module / call_method do not occur in aten training graphs
            raise NotImplementedError(f"measure_memory: unsupported node {n.op} {n.target}")
        if n.op != "output":
            env[n] = value
            hold(value)
        timeline.append(live)
        if live > peak:
            peak, peak_node = live, n.name
        for dead in dies_at.get(n, ()):
            if dead in env:
                drop(env.pop(dead))
    del result, pinned
    return MeasuredMemory(peak_bytes=max(peak, 0), peak_node=peak_node, timeline=timeline)


@register_pass
class MeasureMemory(PassBase):
    """Runs the training graph once on ``inputs`` and records the measured peak beside the plan
    (analysis; changes nothing). ``inputs`` are the graph's flat inputs
    (``TrainingStep.flat_inputs(*batch)``)."""

    name = "measure_memory"

    def __init__(self, inputs: Optional[Sequence[Any]] = None) -> None:
        self.inputs = list(inputs) if inputs is not None else None

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from .plan_memory import plan_memory

        inputs = self.inputs if self.inputs is not None else ctx.options.get("example_inputs")
        if inputs is None:
            from graphpeft.errors import GraphPeftError

            raise GraphPeftError("measure_memory needs the graph's inputs: MeasureMemory(inputs) or "
                                 "ctx.options['example_inputs']")
        report = graph_meta(gm).get("memory")
        if report is None:
            report = graph_meta(gm)["memory"] = plan_memory(gm)
        rng = torch.get_rng_state()
        try:
            with torch.no_grad():
                measured = measure_memory(gm, inputs)
        finally:
            torch.set_rng_state(rng)
        report.measured_peak_bytes = measured.peak_bytes
        report.measured_peak_node = measured.peak_node
        report.measured_timeline = measured.timeline
        log.info("measured peak %.1f MiB at %s (plan %.1f MiB at %s)", measured.peak_bytes / 2**20,
                 measured.peak_node, report.peak_bytes / 2**20, report.peak_node)
        return PassResult(gm, False)
