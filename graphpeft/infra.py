"""Pass infrastructure: the pass protocol, pipelines, the pass manager and its hooks.

Modelled on torch.fx's PassBase/PassResult/PassManager, onnx_ir's in-place vs functional
passes and TVM Relax's named pipelines with well-formedness checked around every pass.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch.fx as fx
from torch.fx._lazy_graph_module import _make_graph_module

from .errors import GraphPeftError, PassError, VerificationError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph module and whether it changed anything."""

    gm: fx.GraphModule
    modified: bool


@dataclasses.dataclass
class PassContext:
    """State shared by the passes of one run: the plan, the match report, options, hooks."""

    plan: Any = None
    resolution: Any = None  # plan.Resolution, set by compile()
    #: every match/check outcome of every rewrite rule, in order (feeds ``explain``)
    report: list[Any] = dataclasses.field(default_factory=list)
    #: run the verifier after every pass (on in tests and by default in compile)
    verify: bool = True
    hooks: list["PassHook"] = dataclasses.field(default_factory=list)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: names of the passes run so far (named in errors)
    history: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    #: the name of the adapters insertion passes create (``CompiledModel.add_adapter``); the
    #: compile's own adapters are "default" (see :func:`graphpeft.graph.adapter_id`)
    adapter_name: str = "default"


class PassBase(abc.ABC):
    """A graph-to-graph transformation.

    Subclasses set ``name`` and implement :meth:`call`. ``in_place = True`` means ``call``
    mutates and returns the graph module it is given; a functional pass (``in_place = False``)
    returns a new one and leaves its input untouched. ``requires``/``ensures`` are optional
    pre- and post-conditions: raise :class:`VerificationError` to reject a graph.
    """

    name: str = ""
    in_place: bool = True

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Pre-condition on the input graph (default: none)."""

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Post-condition on the output graph (default: none)."""

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Transform ``gm``."""

    def __call__(self, gm: fx.GraphModule, ctx: Optional[PassContext] = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        self.requires(gm, ctx)
        result = self.call(gm, ctx)
        if result.modified:
            result.gm.graph.lint()
            result.gm.recompile()
        self.ensures(result.gm, ctx)
        return result

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


Step = Union[PassBase, "Pipeline"]


@dataclasses.dataclass
class Pipeline:
    """A named sequence of passes (or pipelines); optionally repeated to a fixed point."""

    name: str
    steps: Sequence[Step]
    fixed_point: bool = False
    max_iterations: int = 10

    def flat_names(self) -> list[str]:
        out = []
        for s in self.steps:
            out += s.flat_names() if isinstance(s, Pipeline) else [s.name]
        return out


class PassHook:
    """Instrumentation: called around every pass. Subclass and override what you need."""

    def before_pass(self, p: PassBase, gm: fx.GraphModule, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: PassBase, result: PassResult, ctx: PassContext, seconds: float) -> None:
        pass


class TimingHook(PassHook):
    """Collects wall time per pass: ``hook.timings`` is a list of (pass name, seconds)."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    def after_pass(self, p: PassBase, result: PassResult, ctx: PassContext, seconds: float) -> None:
        self.timings.append((p.name, seconds))

    def table(self) -> str:
        return "\n".join(f"{name:32s} {s * 1000:9.2f} ms" for name, s in self.timings)


class IRDumpHook(PassHook):
    """Writes the graph after every pass to ``folder/NNN_<pass>.txt`` (numbered, in order)."""

    def __init__(self, folder: Union[str, os.PathLike]) -> None:
        self.folder = os.fspath(folder)
        self.count = 0
        os.makedirs(self.folder, exist_ok=True)

    def _dump(self, tag: str, gm: fx.GraphModule) -> None:
        path = os.path.join(self.folder, f"{self.count:03d}_{tag}.txt")
        self.count += 1
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(gm.print_readable(print_output=False))
        os.replace(tmp, path)

    def before_pass(self, p: PassBase, gm: fx.GraphModule, ctx: PassContext) -> None:
        if self.count == 0:
            self._dump("input", gm)

    def after_pass(self, p: PassBase, result: PassResult, ctx: PassContext, seconds: float) -> None:
        self._dump(p.name, result.gm)


class PassManager:
    """Runs pipelines: hooks around each pass, the verifier after each, typed errors."""

    def __init__(self, verifier: Optional[Callable[[fx.GraphModule], None]] = None) -> None:
        if verifier is None:
            from .verify import verify

            verifier = verify
        self.verifier = verifier

    def run(self, gm: fx.GraphModule, pipeline: Union[Pipeline, Sequence[PassBase]],
            ctx: Optional[PassContext] = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        if not isinstance(pipeline, Pipeline):
            pipeline = Pipeline("anonymous", list(pipeline))
        return self._run_pipeline(gm, pipeline, ctx)

    def _run_pipeline(self, gm: fx.GraphModule, pipeline: Pipeline, ctx: PassContext) -> PassResult:
        modified_any = False
        for iteration in range(pipeline.max_iterations if pipeline.fixed_point else 1):
            modified = False
            for step in pipeline.steps:
                if isinstance(step, Pipeline):
                    result = self._run_pipeline(gm, step, ctx)
                else:
                    result = self._run_pass(gm, step, ctx)
                gm = result.gm
                modified |= result.modified
            modified_any |= modified
            if not modified:
                break
        else:
            if pipeline.fixed_point:
                log.warning("pipeline %s did not reach a fixed point in %d iterations",
                            pipeline.name, pipeline.max_iterations)
        return PassResult(gm, modified_any)

    def _run_pass(self, gm: fx.GraphModule, p: PassBase, ctx: PassContext) -> PassResult:
        for h in ctx.hooks:
            h.before_pass(p, gm, ctx)
        start = time.perf_counter()
        try:
            result = p(gm, ctx)
        except PassError:
            raise
        except GraphPeftError as e:
            # keep the type (a PlanError stays a PlanError) but name the pass
            e.args = (f"{e.args[0] if e.args else e} [in pass '{p.name}'; before it: "
                      f"{', '.join(ctx.history) or 'none'}]",)
            raise
        except Exception as e:
            raise PassError(p.name, f"{type(e).__name__}: {e}", ctx.history) from e
        seconds = time.perf_counter() - start
        ctx.history.append(p.name)
        if ctx.verify and self.verifier is not None:
            try:
                self.verifier(result.gm)
            except VerificationError as e:
                raise PassError(p.name, f"the graph it produced is invalid: {e}", ctx.history[:-1]) from e
        for h in ctx.hooks:
            h.after_pass(p, result, ctx, seconds)
        log.debug("pass %s: modified=%s in %.1f ms", p.name, result.modified, seconds * 1000)
        return result


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A new graph module over a copy of ``gm``'s graph that shares its tensors: passes may
    rewrite the copy (and register new tensors on it) without touching ``gm`` or copying its
    weights. Node metadata is copied one level deep; so is graphpeft's graph metadata, with
    its own role and adapter tables (a pass may add or drop entries); an analysis stored there
    (the memory report) describes ``gm``, so the copy starts without it."""
    from .graph import META_KEY

    graph = fx.Graph()
    out, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    new_output = graph.output(out)
    new_output.meta = copy.copy(old_output.meta)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = _make_graph_module(gm, graph)  # lazy (recompiled when first run) under _use_lazy_graph_module
    new.meta = dict(gm.meta)
    if META_KEY in gm.meta:
        meta = gm.meta[META_KEY]
        new.meta[META_KEY] = {**meta, "roles": dict(meta.get("roles", {})), "adapters": dict(meta.get("adapters", {}))}
        new.meta[META_KEY].pop("memory", None)
    return new


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy (tensors included) for functional passes and merge-to-a-new-model."""
    new = copy.deepcopy(gm)
    new.meta = copy.deepcopy(gm.meta)
    return new
