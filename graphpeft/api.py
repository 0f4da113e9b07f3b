"""``compile(model, plan)``: trace, resolve the plan, run the adapter pipeline."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Union

import torch

from .compiled import CompiledModel
from .errors import PlanError
from .graph import op_count
from .infra import PassContext, PassHook, PassManager, Pipeline
from .plan import Plan, Rule
from .registry import PASSES, get_method, load_plugins
from .trace import Frontend, TracedModel, trace

log = logging.getLogger(__name__)


def build_pipeline(plan: Plan) -> Pipeline:
    """The named pipeline ``compile`` runs for a plan: one insertion pass per method, then
    freeze and clean-up."""
    load_plugins()
    steps = []
    by_method: dict[str, list[Rule]] = {}
    # adapters first: a sparse-update rule (not an adapter) then sees the adapted layers, and
    # slicing a weight never hides a layer from an adapter rule that also selects it; rules of a
    # later stage (quantize: it changes how weights are stored) run after all of those
    for rule in sorted(plan.rules, key=lambda r: (not r.is_adapter, getattr(r, "stage", 0))):
        by_method.setdefault(rule.key, []).append(rule)
    for key, rules in by_method.items():
        method = get_method(key)
        if method is None:
            raise PlanError(f"no adapter method registered for rule {key!r}")
        steps.append(method.make_pass(rules))
    steps += [PASSES["freeze"](), PASSES["remove_dead_code"]()]
    return Pipeline("adapt", steps)


def compile(  # noqa: A001 - the public name users expect: gp.compile(model, plan)
    model: torch.nn.Module,
    plan: Union[Plan, Sequence[Rule], dict],
    example_inputs: Sequence[Any] = (),
    example_kwargs: Optional[dict[str, Any]] = None,
    *,
    frontend: Frontend = "auto",
    dynamic: bool = True,
    seed: int = 0,
    verify: bool = True,
    hooks: Sequence[PassHook] = (),
    options: Optional[dict[str, Any]] = None,
) -> CompiledModel:
    """Compile ``model`` with ``plan`` into a :class:`CompiledModel`.

    Args:
        model: any ``nn.Module`` (transformers models included).
        plan: a :class:`Plan`, a list of rules, or the plan's data form (dict).
        example_inputs / example_kwargs: one call's worth of inputs, as you would pass to
            ``model(...)``. Non-tensor keyword arguments (``use_cache=False``) are baked in.
        frontend: ``"export"`` (torch.export), ``"fx"`` (symbolic_trace) or ``"auto"``.
        dynamic: keep batch and sequence dimensions symbolic.
        seed: seeds adapter initialisation (per layer, independent of the global RNG).
        verify: run the verifier after every pass.
        hooks: pass instrumentation (``TimingHook``, ``IRDumpHook``).
        options: options for the passes (``PassContext.options``), e.g. ``probe_batch`` and
            ``probe_loss`` for ``gp.Update(select="gradient")``.
    """
    load_plugins()
    if isinstance(plan, dict) or (isinstance(plan, list) and plan and isinstance(plan[0], dict)):
        plan = Plan.from_dict(plan)
    elif not isinstance(plan, Plan):
        plan = Plan(plan)
    traced = trace(model, example_inputs, example_kwargs, frontend=frontend, dynamic=dynamic)
    example_flat = tuple(t.detach().clone() for t in traced.flatten_inputs(tuple(example_inputs), dict(example_kwargs or {})))
    cm = compile_traced(traced, plan, example_flat, seed=seed, verify=verify, hooks=hooks, options=options)
    cm.train(model.training)
    log.info("compiled %s: %d adapters", type(model).__name__, len(cm.adapters()))
    return cm


def compile_traced(traced: TracedModel, plan: Plan, example_flat: tuple = (), *, seed: int = 0,
                   verify: bool = True, hooks: Sequence[PassHook] = (),
                   options: Optional[dict[str, Any]] = None) -> CompiledModel:
    """The part of :func:`compile` after tracing: resolve ``plan`` on ``traced.gm`` and run the
    adapter pipeline on it (in place). Lets a caller that tries several plans on one model
    (``gp.choose_update_scheme``) trace once and compile copies of the trace.

    ``example_flat`` (the flat example inputs) is also given to the passes as
    ``ctx.options["example_inputs"]`` (with ``"out_spec"``), for passes that run the model once
    (the gradient probe of ``gp.Update(select="gradient")``).
    """
    load_plugins()
    gm = traced.gm
    base_ops = op_count(gm)
    resolution = plan.resolve(plan.layers_of(gm))
    opts = {"example_inputs": example_flat, "out_spec": traced.out_spec, **(options or {})}
    ctx = PassContext(plan=plan, resolution=resolution, verify=verify, hooks=list(hooks), seed=seed, options=opts)
    result = PassManager().run(gm, build_pipeline(plan), ctx)
    return CompiledModel(result.gm, traced, plan, resolution, ctx, example_flat, base_ops)
