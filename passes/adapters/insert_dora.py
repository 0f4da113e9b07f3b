"""DoRA (Liu et al., 2024): weight-decomposed LoRA, as PEFT's ``use_dora=True`` computes it.

The adapted weight is ``W' = m * (W + s·BA) / ‖W + s·BA‖``: a trainable magnitude ``m`` (one
entry per output feature) times the direction of the LoRA-updated weight. The norm is taken per
output row of ``W`` in ``(out, in)`` layout (the paper's "column norm" of ``Wᵀ``) and treated as
a constant: it receives no gradient (paper §4.3; PEFT detaches it too). Like PEFT, the graph
keeps the base op and adds a correction::

    y + (m/n - 1) * (y - bias) + (m/n) * s * B(A(x))          n = ‖W + s·(BA)‖ (no gradient)

which equals ``x W'ᵀ + bias``. With dropout, PEFT recomputes the base term on the dropped-out
input (``x_d Wᵀ``); so does this pass.

Tensors (PEFT names, so state dicts are interchangeable): ``<path>.lora_A.weight`` ``(r, in)``,
``<path>.lora_B.weight`` ``(out, r)`` and ``<path>.lora_magnitude_vector`` ``(out,)``. Init: A
Kaiming-uniform, B zero, and ``m = ‖W + s·BA‖`` (so ``m = ‖W‖`` and a fresh adapter leaves
outputs unchanged). Merge writes ``W'`` into the weight exactly (PEFT's merge); the bias is untouched.
Linear layers only (GPT-2's Conv1D included).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import Layer, Role, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .insert_lora import LoRA, _init_factors  # same factors and initialisation as LoRA
from .layer_rewrite import (LayerRewrite, LayerRewritePass, adapter_dropout, branch_builder, join_output, layer_bias,
                            layer_input, layer_weight, record_adapter)
from ..merge.merge_adapters import unmerged_weight

aten = torch.ops.aten



@register_rule
@dataclasses.dataclass
class DoRA(LoRA):
    """Weight-decomposed low-rank adapter: LoRA's ``A``, ``B`` plus a magnitude vector.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: rank of the direction update.
        alpha: scaling numerator; the LoRA update is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter's input (training only).
        use_rslora: scale by ``alpha / sqrt(r)``.
        init: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal, std
            ``1/r``, B zero) or ``"random"`` (B random too: a non-identity start, for tests).
    """

    key: ClassVar[str] = "dora"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)


class DoRARewrite(LayerRewrite):
    """Rewrites ``y = linear(x, W, b)`` into ``y + (m/n - 1)(y - b) + (m/n)·s·B(A(x))``."""

    rule: DoRA

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        s = rule.scaling
        weight = get_tensor(gm, layer.weight)
        a, b = _init_factors(layer, weight, rule, ctx.seed)
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        with torch.no_grad():
            magnitude = torch.linalg.vector_norm(_rows(weight, layer) + s * (b @ a), dim=1)
        aid, y, g = branch_builder(gm, layer, ctx, InsertDoRA.name, rule)
        a_node = g.param(names["A"], a, Role.ADAPTER)
        b_node = g.param(names["B"], b, Role.ADAPTER)
        m_node = g.param(names["magnitude"], magnitude, Role.ADAPTER)
        w_node = layer_weight(layer)

        # n = ‖W + s·BA‖ per output row, built from detached factors: no gradient flows
        # through the norm (DoRA §4.3), and the training compiler has no backward to prune
        ba = g.call(aten.mm.default, g.call(aten.detach.default, b_node), g.call(aten.detach.default, a_node))
        w_rows = g.call(aten.t.default, w_node) if layer.fan_in_fan_out else w_node
        combined = g.call(aten.add.Tensor, w_rows, g.call(aten.mul.Tensor, ba, s))
        norm = g.call(aten.linalg_vector_norm.default, combined, 2, [1])
        mag_scale = g.call(aten.div.Tensor, m_node, norm)
        mag_scale.meta["graphpeft"]["part"] = "magnitude_scale"

        x = adapter_dropout(g, layer_input(layer), rule.dropout)
        if rule.dropout > 0:
            # PEFT: with dropout active the base term is recomputed on the dropped-out input
            base = g.call(aten.mm.default, x, w_node) if layer.fan_in_fan_out else g.call(aten.linear.default, x, w_node)
        else:
            bias = layer_bias(layer)
            base = g.call(aten.sub.Tensor, y, bias) if bias is not None else y
        low = g.call(aten.linear.default, x, a_node)
        up = g.call(aten.linear.default, low, b_node)
        lora = g.call(aten.mul.Tensor, up, s)
        base_term = g.call(aten.mul.Tensor, g.call(aten.sub.Tensor, mag_scale, 1.0), base)
        lora_term = g.call(aten.mul.Tensor, lora, mag_scale)
        branch = g.call(aten.add.Tensor, base_term, lora_term)
        joined = join_output(g, y, branch)
        record_adapter(gm, aid, layer, ctx, rule, DoRAMethod.name, names, joined, scaling=s)


def tensor_names(layer: Layer) -> dict[str, str]:
    """PEFT's state-dict keys for a DoRA layer."""
    return {"A": f"{layer.path}.lora_A.weight", "B": f"{layer.path}.lora_B.weight",
            "magnitude": f"{layer.path}.lora_magnitude_vector"}


def _rows(weight: torch.Tensor, layer: Layer) -> torch.Tensor:
    # the weight in (out, in) layout: GPT-2's Conv1D stores (in, out)
    return weight.detach().T if layer.fan_in_fan_out else weight.detach()


@register_pass
class InsertDoRA(LayerRewritePass):
    """Inserts a DoRA branch on every layer selected by the given DoRA rules."""

    name = "insert_dora"
    rewrite_class = DoRARewrite


class DoRAMethod(AdapterMethod):
    """DoRA for the core: the merge rescales the rows of ``W + s·BA`` to the magnitude."""

    name = "dora"
    rule = DoRA
    additive = False
    peft_type = "LORA"
    peft_options = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora"}
    peft_fixed = {"use_dora": True}
    peft_patterns = {"rank_pattern": "r", "alpha_pattern": "alpha"}

    def make_pass(self, rules: Sequence[Rule]) -> InsertDoRA:
        return InsertDoRA([r for r in rules if isinstance(r, DoRA)])

    def merged_tensors(self, gm: fx.GraphModule, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        # PEFT's merge: W' = (m / ‖W + ΔW‖) · (W + ΔW), the norm per output row. The norm is of
        # the base weight as the forward reads it: if other adapters on this layer were merged
        # first (named adapters stacked), W here already holds them but the norm does not
        t = record["tensors"]
        weight = get_tensor(gm, record["weight"]).detach()
        base = unmerged_weight(gm, record["weight"])
        a = get_tensor(gm, t["A"]).detach()
        b = get_tensor(gm, t["B"]).detach()
        m = get_tensor(gm, t["magnitude"]).detach()
        fiifo = record["fan_in_fan_out"]
        delta = record["scaling"] * (b @ a)
        rows = (weight.T if fiifo else weight) + delta
        norm = torch.linalg.vector_norm((base.T if fiifo else base) + delta, dim=1)
        merged = (m / norm).unsqueeze(1) * rows
        return {record["weight"]: merged.T if fiifo else merged}

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        # DoRA's merge is not additive; ΔW = W' - W for callers that want a difference
        weight = get_tensor(gm, record["weight"]).detach()
        return self.merged_tensors(gm, record)[record["weight"]] - weight


register_method(DoRAMethod.name, DoRAMethod())
