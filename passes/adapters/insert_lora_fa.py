"""LoRA-FA (Zhang et al., 2023): LoRA with the down-projection ``A`` frozen at its random init.

Forward and merge are LoRA's, ``y = base(x) + s · B(A(dropout(x)))`` with ``s = alpha / r``;
only ``B`` trains, so the backward needs no gradient for ``A`` and keeps no copy of the
full-width input for it (the paper's activation-memory saving: only the ``r``-wide ``A x`` is
stored). ``A`` is :attr:`Role.ADAPTER_CONST`, ``B`` :attr:`Role.ADAPTER`. Names follow PEFT
(``<path>.lora_A.weight`` ``(r, in)``, ``<path>.lora_B.weight`` ``(out, r)``), so a LoRA-FA
adapter loads into a PEFT LoRA model (PEFT's LoRA-FA is a LoRA model whose ``lora_A`` is frozen
by ``create_lorafa_optimizer``). Init: A Kaiming-uniform (regenerated from the compile seed and
the layer path), B zero. Linear layers only (GPT-2's Conv1D included).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import Layer, Role, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.plan import Rule, check_choice
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .insert_lora import LoRA, LoRAMethod, _init_factors  # LoRA's factors: A Kaiming-uniform, B zero
from .layer_rewrite import (LayerRewrite, LayerRewritePass, adapter_dropout, branch_builder, join_output, layer_input,
                            record_adapter)

aten = torch.ops.aten

INITS = ("default", "random")


@register_rule
@dataclasses.dataclass
class LoRAFA(LoRA):
    """LoRA with a frozen random ``A``: only ``B (out x r)`` trains.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: rank.
        alpha: scaling numerator; the branch is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter branch's input (training only).
        use_rslora: scale by ``alpha / sqrt(r)``.
        init: ``"default"`` (A Kaiming-uniform, B zero) or ``"random"`` (B random too: a
            non-identity start, for tests).
    """

    key: ClassVar[str] = "lora_fa"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "init", INITS)  # A is frozen Kaiming-uniform: "gaussian" has no meaning here


class LoRAFARewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``y + s · B(A(dropout(x)))`` with ``A`` frozen."""

    rule: LoRAFA

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        a, b = _init_factors(layer, get_tensor(gm, layer.weight), rule, ctx.seed)
        names = {k: scoped_tensor_name(f"{layer.path}.lora_{k}.weight", ctx.adapter_name) for k in ("A", "B")}
        aid, y, g = branch_builder(gm, layer, ctx, InsertLoRAFA.name, rule)
        a_node = g.param(names["A"], a, Role.ADAPTER_CONST)  # the "frozen A"
        b_node = g.param(names["B"], b, Role.ADAPTER)
        x = adapter_dropout(g, layer_input(layer), rule.dropout)
        low = g.call(aten.linear.default, x, a_node)
        up = g.call(aten.linear.default, low, b_node)
        joined = join_output(g, y, g.call(aten.mul.Tensor, up, rule.scaling))
        # the record has LoRA's fields, so LoRA's delta_weight merges it
        record_adapter(gm, aid, layer, ctx, rule, LoRAFAMethod.name, names, joined, scaling=rule.scaling)


@register_pass
class InsertLoRAFA(LayerRewritePass):
    """Inserts a LoRA-FA branch on every layer selected by the given LoRA-FA rules."""

    name = "insert_lora_fa"
    rewrite_class = LoRAFARewrite


class LoRAFAMethod(LoRAMethod):
    """LoRA-FA for the core: inserted by its own pass, merged exactly as LoRA (``ΔW = s·BA``)."""

    name = "lora_fa"
    rule = LoRAFA
    # exported as a PEFT LoRA (PEFT's LoRA-FA is a LoRA with A frozen by its optimizer); a PEFT
    # LoRA folder imports as LoRA unless import_peft(..., method="lora_fa") asks for this
    peft_import = False

    def make_pass(self, rules: Sequence[Rule]) -> InsertLoRAFA:  # type: ignore[override]
        return InsertLoRAFA([r for r in rules if isinstance(r, LoRAFA)])


register_method(LoRAFAMethod.name, LoRAFAMethod())
