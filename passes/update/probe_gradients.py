"""Gradient probe: score the output channels of weights by their gradient on one batch.

``gp.Update(fraction=f, select="gradient")`` trains the rows whose loss gradient is largest
(the saliency criterion of sparse-update papers). This analysis pass runs the graph forward and
backward once on a probe batch, with the selected weights temporarily requiring gradients, and
stores the L2 norm of each row of each gradient in ``ctx.options["row_scores"]`` (weight name ->
scores), which ``slice_rows`` reads. The graph and the weights are unchanged.
:func:`probe_weight_gradients` is the probe itself (weight name -> full gradient); SHiRA's
``mask_type="gradient"`` calls it too and keeps the entries of largest gradient magnitude.

The probe batch and loss come from ``ctx.options`` (``compile(..., options=...)``):

* ``probe_batch``: the model's flat inputs followed by the targets, as a training step takes
  them (default: the example inputs ``compile`` traced with);
* ``probe_loss``: a loss name, :class:`~graphpeft.training.losses.Loss` or callable (default: next-token
  cross-entropy when the model takes token ids and returns ``(batch, seq, vocab)`` logits, else
  the mean square of the primary output: a task-free saliency). Give the task's loss and batch
  to choose rows for that task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphpeft.errors import PlanError
from graphpeft.graph import find_layers, get_tensor
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.training.losses import Loss, make_loss, primary_output
from graphpeft.registry import register_pass

from .slice_rows import ROW_SCORES, row_norms

if TYPE_CHECKING:
    from .update_parameters import Update


class OutputEnergy(Loss):
    """``mean(output ** 2) / 2``: a task-free objective whose gradient ranks channels by how much
    they move the output (used when no probe loss is given and the model is not a token LM)."""

    name = "output_energy"

    def __call__(self, outputs: Any, model_inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        return 0.5 * primary_output(outputs).float().pow(2).mean()


def default_probe_loss(outputs: Any, model_inputs: Sequence[torch.Tensor]) -> Loss:
    """Next-token cross-entropy for a token LM (integer ``(B, T)`` input, ``(B, T, V)`` output),
    else :class:`OutputEnergy`."""
    out = primary_output(outputs)
    first = model_inputs[0] if model_inputs else None
    if (isinstance(first, torch.Tensor) and not first.is_floating_point() and first.dim() == 2
            and out.dim() == 3 and out.shape[:2] == first.shape):
        return make_loss("causal_lm")
    return OutputEnergy()


@register_pass
class ProbeGradients(PassBase):
    """Scores the rows of the weights that ``select="gradient"`` update rules slice (analysis:
    the graph is unchanged)."""

    name = "probe_gradients"

    def __init__(self, rules: Sequence["Update"]) -> None:
        self.rules = [r for r in rules if r.sliced and r.selection == "gradient"]

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not self.rules:
            return PassResult(gm, False)
        layers = [l for l in find_layers(gm)
                  if any(r.select(l) is None and r.check(l) is None for r in self.rules)]
        if not layers:
            return PassResult(gm, False)
        weights = list(dict.fromkeys((l.weight, l.fan_in_fan_out) for l in layers))
        grads = probe_weight_gradients(gm, ctx, [w for w, _ in weights], "select='gradient'")
        scores = ctx.options.setdefault(ROW_SCORES, {})
        for name, fif in weights:
            scores[name] = row_norms(grads[name], fif)
        return PassResult(gm, False)


def probe_weight_gradients(gm: fx.GraphModule, ctx: PassContext, names: Sequence[str],
                           needed_by: str) -> dict[str, torch.Tensor]:
    """The gradient of the probe loss with respect to each tensor in ``names`` (weight name ->
    gradient, zeros where the loss does not reach it), from one forward and backward of ``gm``
    on the probe batch of ``ctx.options`` (see the module docstring). The tensors require
    gradients only during the probe; the graph and the values are unchanged. ``needed_by``
    names the option that asked for the probe, for the error when there is no batch."""
    batch = ctx.options.get("probe_batch") or ctx.options.get("example_inputs")
    out_spec = ctx.options.get("out_spec")
    if not batch or out_spec is None:
        raise PlanError(f"{needed_by} needs a probe batch: compile the model with gp.compile(...) (it "
                        "passes the example inputs), or give options={'probe_batch': (...), 'probe_loss': ...}")
    n_in = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    batch = list(batch)
    if len(batch) < n_in:
        raise PlanError(f"the probe batch has {len(batch)} tensors but the model takes {n_in} inputs: give the "
                        "model's flat inputs followed by the targets")
    inputs, targets = batch[:n_in], batch[n_in:]
    params = [get_tensor(gm, w) for w in names]
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            flat = gm(*inputs)
            outputs = pytree.tree_unflatten(list(flat), out_spec)
            spec = ctx.options.get("probe_loss")
            loss = make_loss(spec) if spec is not None else default_probe_loss(outputs, inputs)
            value = loss(outputs, inputs, targets)
            grads = torch.autograd.grad(value, params, allow_unused=True)
    finally:
        for p, rg in zip(params, before):
            p.requires_grad_(rg)
    return {w: (g if g is not None else torch.zeros_like(p)).detach() for w, g, p in zip(names, grads, params)}
