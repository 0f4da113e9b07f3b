"""Choose a sparse-update scheme that fits a memory budget (PockEngine / tiny-training style).

    scheme = gp.choose_update_scheme(model, (input_ids,), "causal_lm", gp.optim.AdamW(lr=1e-4),
                                     budget_bytes=64 << 20, example_kwargs={"use_cache": False})
    print(scheme)                      # every candidate tried, its planned peak, and why this one
    cm = gp.compile(model, scheme.plan, (input_ids,), {"use_cache": False})

How. Each candidate is a plan of ``gp.Update`` rules; it is compiled (the model is traced once,
each candidate adapts a copy) and its training step is traced and planned by the static memory
planner (``plan_memory``: liveness over the step graph after ``reorder_updates``), without running
it. The candidates, from most to least expressive:

1. full fine-tuning (every weight, bias and norm);
2. for each channel ratio in ``fractions`` (1 = whole weights): the last ``k`` numbered blocks
   (weights, biases, norms) plus the head (unnumbered layers after the last block, such as
   ``lm_head`` and a final norm), with the largest ``k`` that fits, found by bisection (peak
   memory grows with ``k``: the backward reaches deeper and keeps more activations);
3. biases and norm weights of every layer; then the head alone.

The choice: full fine-tuning when it fits; otherwise, among the fitting layer-range schemes, the
one with the most trainable parameters (then the deeper, then the smaller peak); biases/norms or
the head alone only when no layer-range scheme fits. The result says what was chosen and why.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ..compiled import CompiledModel
from ..errors import GraphPeftError, PlanError
from ..graph import find_layers, find_norms
from ..infra import clone_graph_module
from ..plan import Plan, Rule
from ..registry import RULES, load_plugins

log = logging.getLogger(__name__)

MIB = 1 << 20


@dataclasses.dataclass
class SchemeCandidate:
    """One scheme tried by :func:`choose_update_scheme`.

    Attributes:
        description: in words (``"last 2 of 4 blocks + head, 25% of channels"``).
        rules: its update rules.
        depth: how many numbered blocks it updates (0 for the head alone).
        fraction: the channel ratio of its weights (1.0: whole weights; None: no weights).
        peak_bytes: the planned peak memory of its training step (None if it failed).
        trainable_parameters: number of trained elements.
        fits: ``peak_bytes <= budget``.
        error: why it could not be compiled, if it could not.
    """

    description: str
    rules: list[Rule]
    depth: int
    fraction: Optional[float]
    peak_bytes: Optional[int] = None
    trainable_parameters: int = 0
    fits: bool = False
    error: Optional[str] = None


@dataclasses.dataclass
class UpdateScheme:
    """The outcome of :func:`choose_update_scheme`.

    Attributes:
        plan: the plan to compile the model with (the compiled model's own rules, if it was a
            ``CompiledModel``, followed by the chosen update rules); None when nothing fits.
        chosen: the chosen candidate (None when nothing fits).
        budget_bytes: the budget.
        candidates: every candidate evaluated, in the order tried.
        reason: why this one.
    """

    plan: Optional[Plan]
    chosen: Optional[SchemeCandidate]
    budget_bytes: int
    candidates: list[SchemeCandidate]
    reason: str

    def summary(self) -> str:
        """A readable table of the candidates and the reason for the choice."""
        lines = [f"update scheme for a budget of {self.budget_bytes / MIB:.3f} MiB "
                 f"({len(self.candidates)} candidates planned):"]
        width = max((len(c.description) for c in self.candidates), default=10)
        lines.append(f"  {'':2s}{'candidate':{width}s} {'peak MiB':>10s} {'trainable':>12s}  fits")
        for c in self.candidates:
            mark = "->" if c is self.chosen else "  "
            peak = f"{c.peak_bytes / MIB:10.3f}" if c.peak_bytes is not None else f"{'-':>10s}"
            fits = "yes" if c.fits else ("error: " + (c.error or "")[:80] if c.error else "no")
            lines.append(f"  {mark}{c.description:{width}s} {peak} {c.trainable_parameters:12,d}  {fits}")
        lines.append(f"  chosen: {self.reason}")
        return "\n".join(lines)

    __str__ = summary


def _update_rule() -> Callable[..., Rule]:
    load_plugins()
    if "update" not in RULES:
        raise GraphPeftError("no 'update' rule is registered (import graphpeft.passes)")
    return RULES["update"]


def choose_update_scheme(
    model: Union[torch.nn.Module, CompiledModel],
    inputs: Sequence[Any],
    loss: Any,
    optimizer: Any,
    budget_bytes: int,
    *,
    targets: Sequence[torch.Tensor] = (),
    example_kwargs: Optional[Mapping[str, Any]] = None,
    fractions: Sequence[float] = (1.0, 0.5, 0.25, 0.125),
    select: str = "magnitude",
    include_head: bool = True,
    training_options: Optional[Mapping[str, Any]] = None,
) -> UpdateScheme:
    """Choose which layers, parts and channel ratio to update so the training step fits
    ``budget_bytes`` (by the static memory planner); see the module docstring for the search.

    Args:
        model: an ``nn.Module``, or a :class:`CompiledModel` (its adapters are kept and the
            update rules are added on top, e.g. LoRA plus biases).
        inputs: the model's positional example inputs (as for :func:`graphpeft.compile`).
        loss: the training loss (``"causal_lm"``, ``"cross_entropy"``, a callable ...).
        optimizer: ``gp.optim.SGD(...)`` / ``gp.optim.AdamW(...)``.
        budget_bytes: the memory budget of one training step (weights, activations, gradients
            and optimizer state at the planned peak).
        targets: the targets the loss needs (labels for ``cross_entropy``).
        example_kwargs: the model's keyword inputs (``{"use_cache": False}``).
        fractions: channel ratios to try for the layer-range schemes, largest first.
        select: how a fraction chooses channels (``"first"``, ``"magnitude"``, ``"gradient"``).
        include_head: add the head (unnumbered layers after the last block) to layer-range schemes.
        training_options: extra options for ``compile_training`` (``accumulation_steps`` ...).

    Returns:
        An :class:`UpdateScheme`; ``print(scheme)`` shows every candidate and the reason.
    """
    from ..trace import trace

    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Integral) or budget_bytes <= 0:
        raise PlanError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    fractions = sorted({float(f) for f in fractions}, reverse=True)
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise PlanError(f"fractions must be numbers in (0, 1], got {list(fractions)!r}")
    inputs, kwargs = tuple(inputs), dict(example_kwargs or {})
    if isinstance(model, CompiledModel):
        base_traced, base_rules = model._traced, list(model.plan.rules if model.plan else [])
        base_traced = dataclasses.replace(base_traced, gm=model.graph_module)
    else:
        base_traced, base_rules = trace(model, inputs, kwargs), []
    base_gm = base_traced.gm
    # every scheme holds all weights for the whole step: below that, nothing can fit
    weight_bytes = sum(t.numel() * t.element_size() for t in (*base_gm.parameters(), *base_gm.buffers()))
    if budget_bytes < weight_bytes:
        return UpdateScheme(None, None, budget_bytes, [], (
            f"nothing fits: the model's weights alone need {weight_bytes / MIB:.3f} MiB > {budget_bytes / MIB:.3f} MiB; "
            "raise the budget or use a smaller model"))
    example_flat = tuple(t.detach().clone() for t in base_traced.flatten_inputs(inputs, kwargs))
    search = _SchemeSearch(base_traced, example_flat, (*example_flat, *targets), loss, optimizer, budget_bytes,
                           {"verify": False, **dict(training_options or {})}, select, include_head)
    chosen, reason = search.run(fractions)
    plan = Plan(base_rules + chosen.rules) if chosen is not None else None
    return UpdateScheme(plan, chosen, budget_bytes, search.candidates, reason)


class _SchemeSearch:
    """The candidates of :func:`choose_update_scheme`, each compiled and planned: full
    fine-tuning, then per channel ratio a binary search over the number of last blocks, then
    biases and norms, then the head alone."""

    def __init__(self, base_traced: Any, example_flat: tuple, batch: tuple, loss: Any, optimizer: Any,
                 budget_bytes: int, options: dict[str, Any], select: str, include_head: bool) -> None:
        self.base_traced, self.base_gm = base_traced, base_traced.gm
        self.example_flat, self.batch, self.loss, self.optimizer = example_flat, batch, loss, optimizer
        self.budget_bytes, self.options, self.select = budget_bytes, options, select
        self.Update = _update_rule()
        self.candidates: list[SchemeCandidate] = []
        gm = self.base_gm
        layers, self.norms = find_layers(gm), find_norms(gm)
        self.numbered = sorted({l.layer_index for l in layers + self.norms if l.layer_index is not None})
        self.blocks = len(self.numbered)
        order = {l.node: i for i, l in enumerate(layers)}
        last_numbered = max((order[l.node] for l in layers if l.layer_index is not None), default=-1)
        self.heads = [l.path for l in layers if l.layer_index is None and order[l.node] > last_numbered]
        block_nodes = [l.node for l in layers if l.layer_index is not None]
        self.head_norms = [n.path for n in self.norms if n.layer_index is None and n.path not in self.heads
                           and _after(gm, n.node, block_nodes)]
        self.has_bias = any(l.bias for l in layers)
        self.include_head = include_head

    def head_rules(self) -> list[Rule]:
        rules: list[Rule] = []
        if self.include_head and self.heads:
            rules.append(self.Update(targets=self.heads))
        if self.include_head and self.head_norms:
            rules.append(self.Update(targets=self.head_norms, part="norm"))
        return rules

    def evaluate(self, c: SchemeCandidate) -> SchemeCandidate:
        """Compile ``c``'s plan and its training step; record its planned peak."""
        from ..api import compile_traced

        try:
            traced = dataclasses.replace(self.base_traced, gm=clone_graph_module(self.base_gm))
            cm = compile_traced(traced, Plan(c.rules), self.example_flat, verify=False)
            c.trainable_parameters = cm.num_parameters(trainable_only=True)
            step = cm.compile_training(self.loss, self.optimizer, example_batch=self.batch, **self.options)
            c.peak_bytes = int(step.memory_report().peak_bytes)
            c.fits = c.peak_bytes <= self.budget_bytes
        except GraphPeftError as e:
            c.error = str(e).splitlines()[0]
        log.info("scheme %s: peak %s, %d trainable, fits=%s", c.description, c.peak_bytes,
                 c.trainable_parameters, c.fits)
        self.candidates.append(c)
        return c

    def ranged(self, k: int, f: float) -> SchemeCandidate:
        """The last ``k`` blocks (whole weights, or a fraction ``f`` of their channels) + head."""
        Update = self.Update

        def layer_sel() -> list[int]:
            return list(range(-k, 0))  # a fresh list per rule: YAML would otherwise write anchors

        if f >= 1.0:
            rules: list[Rule] = [Update(targets=".*", layers=layer_sel())]
        else:
            rules = [Update(targets=".*", kind=["linear", "conv"], layers=layer_sel(), fraction=f, select=self.select)]
        if any(n.layer_index in self.numbered[-k:] for n in self.norms):
            rules.append(Update(targets=".*", part="norm", layers=layer_sel()))
        rules += self.head_rules()
        ratio = "whole weights" if f >= 1.0 else f"{f:.0%} of channels ({self.select})"
        head = " + head" if self.head_rules() else ""
        return SchemeCandidate(f"last {k} of {self.blocks} blocks{head}, {ratio}", rules, k, f)

    def search_depths(self, fractions: Sequence[float]) -> tuple[dict[float, SchemeCandidate],
                                                                 dict[float, SchemeCandidate]]:
        """Per ratio, the deepest fitting scheme and the shallowest one that does not fit."""
        best: dict[float, SchemeCandidate] = {}
        too_big: dict[float, SchemeCandidate] = {}
        for f in fractions:
            lo, hi = 1, self.blocks
            while lo <= hi:
                mid = (lo + hi) // 2
                c = self.evaluate(self.ranged(mid, f))
                if c.fits:
                    best[f], lo = c, mid + 1
                else:
                    if c.peak_bytes is not None and (f not in too_big or c.depth < too_big[f].depth):
                        too_big[f] = c
                    hi = mid - 1
        return best, too_big

    def fallbacks(self) -> list[SchemeCandidate]:
        """Biases and norms of every layer, then the head alone."""
        Update, out = self.Update, []
        small: list[Rule] = ([Update(targets=".*", part="bias")] if self.has_bias else []) + \
                            ([Update(targets=".*", part="norm")] if self.norms else [])
        if small:
            out.append(self.evaluate(SchemeCandidate("biases and norms of every layer", small, self.blocks, None)))
        if self.heads and not any(c.fits for c in out):
            rules = self.head_rules() or [Update(targets=self.heads)]
            out.append(self.evaluate(SchemeCandidate("head only", rules, 0, 1.0)))
        return out

    def run(self, fractions: Sequence[float]) -> tuple[Optional[SchemeCandidate], str]:
        """The chosen candidate (None: nothing fits) and why."""
        Update = self.Update
        full_rules: list[Rule] = [Update(targets=".*")] + ([Update(targets=".*", part="norm")] if self.norms else [])
        full = self.evaluate(SchemeCandidate("full fine-tuning", full_rules, self.blocks, 1.0))
        budget = f"{self.budget_bytes / MIB:.3f} MiB"
        if full.fits:
            return full, f"full fine-tuning fits ({full.peak_bytes / MIB:.3f} MiB <= {budget})"  # type: ignore[operator]
        best, too_big = self.search_depths(fractions) if self.blocks else ({}, {})
        if best:
            return self._best_ranged(best, too_big, full, budget)
        fitting = [c for c in self.fallbacks() if c.fits]
        if fitting:
            return fitting[0], (f"{fitting[0].description}: {fitting[0].peak_bytes / MIB:.3f} MiB <= {budget}; "  # type: ignore[operator]
                                "no scheme that updates weights of a block fits")
        smallest = min((c for c in self.candidates if c.peak_bytes is not None), key=lambda c: c.peak_bytes or 0,
                       default=None)
        return None, ("nothing fits: " + (f"the smallest scheme tried ({smallest.description}) needs "
                                          f"{smallest.peak_bytes / MIB:.3f} MiB > {budget}" if smallest else
                                          "no scheme could be compiled")  # type: ignore[operator]
                      + "; raise the budget, use a smaller batch, or accumulation_steps in training_options")

    @staticmethod
    def _best_ranged(best: dict[float, SchemeCandidate], too_big: dict[float, SchemeCandidate],
                     full: SchemeCandidate, budget: str) -> tuple[SchemeCandidate, str]:
        chosen = max(best.values(), key=lambda c: (c.trainable_parameters, c.depth, -(c.peak_bytes or 0)))
        deeper = too_big.get(chosen.fraction)  # type: ignore[arg-type]
        why_not = ""
        if deeper is not None and deeper.peak_bytes is not None and deeper.depth > chosen.depth:
            why_not = f"; one more block at this ratio needs {deeper.peak_bytes / MIB:.3f} MiB"
        full_need = f"full fine-tuning needs {full.peak_bytes / MIB:.3f} MiB" if full.peak_bytes else \
            f"full fine-tuning failed ({full.error})"
        return chosen, (f"{chosen.description}: {chosen.peak_bytes / MIB:.3f} MiB <= {budget}, the fitting scheme "  # type: ignore[operator]
                        f"with the most trainable parameters ({chosen.trainable_parameters:,}); {full_need}{why_not}")


def _after(gm: Any, node: Any, others: list[Any]) -> bool:
    """Whether ``node`` comes after every node of ``others`` in graph order."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    return all(position[node] > position[o] for o in others)


__all__ = ["SchemeCandidate", "UpdateScheme", "choose_update_scheme"]
