"""Hydra (Kim et al., 2024, "Hydra: Multi-head Low-rank Adaptation for Parameter Efficient
Fine-tuning", arXiv 2309.06922): a parallel and a sequential low-rank branch on one layer::

    y = base(x) + s · (B_p A_p x + B_s A_s base(x))          base(x) = W x + b

The parallel branch is LoRA's (it reads the layer's input: ``A_p`` ``(par_r, in)``, ``B_p``
``(out, par_r)``); the sequential one reads the layer's output, bias included, and maps it back
to the output space (``A_s`` ``(seq_r, out)``, ``B_s`` ``(out, seq_r)``): a learned linear
combination of the pre-trained features. As in the official code (github.com/extremebird/Hydra:
``nlu/.../adapter.py`` and ``vtab1k/hydra.py``) the sequential branch sees the base layer's
output with its bias, one scale ``s`` multiplies both branches, and dropout (vtab1k) sits
between each branch's down and up projection. Init as the official NLU code: each ``A``
Kaiming-uniform (``a = sqrt(5)``), each ``B`` zero, so a fresh adapter is the identity. All four
factors train (:attr:`Role.ADAPTER`). Defaults: ``par_r=4``, ``seq_r=8`` (every official GLUE
script) and ``scale=1`` (the NLU code has no scaling; its vtab1k configs tune it per dataset).

Merge is exact and folds both branches into the weight and the bias (the official
``reparameterize``)::

    W' = W + s · (B_p A_p + B_s A_s W)        b' = b + s · B_s A_s b

It is not a plain ``W + ΔW`` (the bias changes too, and ΔW depends on ``W``), so the method is
non-additive: a fused adapter is removed by restoring the saved weights. Names:
``<path>.hydra_par.hydra_A.weight`` / ``hydra_B`` and ``<path>.hydra_seq.hydra_A.weight`` /
``hydra_B`` (the official modules' names). Linear layers only (GPT-2's Conv1D included).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import Layer, Role, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice, check_number, check_positive_int, check_probability
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .layer_rewrite import (LayerRewrite, LayerRewritePass, adapter_dropout, branch_builder, join_output,
                            layer_generator, layer_input, record_adapter, tied_weights_reason)
from ..merge.merge_adapters import unmerged_weight

aten = torch.ops.aten

INITS = ("default", "random")


@register_rule
@dataclasses.dataclass
class Hydra(Rule):
    """Multi-head low-rank adapter: a parallel LoRA branch on the input and a sequential one
    on the layer's output.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        par_r: rank of the parallel branch ``B_p A_p x``.
        seq_r: rank of the sequential branch ``B_s A_s (W x + b)``.
        scale: ``s``, multiplies both branches.
        dropout: dropout probability between each branch's down and up projection (training only).
        init: ``"default"`` (each A Kaiming-uniform, each B zero) or ``"random"`` (the B's
            random too: a non-identity start, for tests).
    """

    key: ClassVar[str] = "hydra"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    par_r: int = 4
    seq_r: int = 8
    scale: float = 1.0
    dropout: float = 0.0
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "par_r", "seq_r")
        check_number(self, "scale", "dropout", finite=True, what="a finite number")
        check_probability(self, "dropout")
        check_choice(self, "init", INITS)

    def check(self, layer: Layer) -> Optional[str]:
        if self.par_r > min(layer.in_features, layer.out_features):
            return (f"par_r={self.par_r} is larger than the layer ({layer.in_features} -> {layer.out_features}); "
                    f"use par_r <= {min(layer.in_features, layer.out_features)}")
        if self.seq_r > layer.out_features:
            return f"seq_r={self.seq_r} is larger than the layer's output ({layer.out_features}); use seq_r <= {layer.out_features}"
        return tied_weights_reason(layer)


class HydraRewrite(LayerRewrite):
    """Rewrites ``y = op(x, W, b)`` into ``y + s·(B_p(A_p x) + B_s(A_s y))``."""

    rule: Hydra

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        factors = _init_factors(layer, rule, ctx.seed)
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        aid, y, g = branch_builder(gm, layer, ctx, InsertHydra.name, rule)
        nodes = {k: g.param(names[k], factors[k].to(weight), Role.ADAPTER) for k in names}

        def branch(inp: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
            low = adapter_dropout(g, g.call(aten.linear.default, inp, a), rule.dropout)
            return g.call(aten.linear.default, low, b)

        par = branch(layer_input(layer), nodes["par_A"], nodes["par_B"])
        # the sequential branch reads the base layer's own output (W x + b), not other adapters'
        seq = branch(layer.node, nodes["seq_A"], nodes["seq_B"])
        scaled = g.call(aten.mul.Tensor, g.call(aten.add.Tensor, par, seq), float(rule.scale))
        joined = join_output(g, y, scaled)  # the sequential branch keeps reading y when y is the layer op
        record_adapter(gm, aid, layer, ctx, rule, HydraMethod.name, names, joined, scaling=float(rule.scale),
                       bias=layer.bias)


def tensor_names(layer: Layer) -> dict[str, str]:
    """State-dict keys of a Hydra layer (the official modules' names under the layer's path)."""
    return {f"{branch}_{f}": f"{layer.path}.hydra_{branch}.hydra_{f}.weight"
            for branch in ("par", "seq") for f in ("A", "B")}


def _init_factors(layer: Layer, rule: Hydra, seed: int) -> dict[str, torch.Tensor]:
    gen = layer_generator(seed, layer)
    shapes = {"par_A": (rule.par_r, layer.in_features), "par_B": (layer.out_features, rule.par_r),
              "seq_A": (rule.seq_r, layer.out_features), "seq_B": (layer.out_features, rule.seq_r)}
    out = {}
    for k, shape in shapes.items():
        t = torch.zeros(shape)
        if k.endswith("A") or rule.init == "random":
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        out[k] = t
    return out


@register_pass
class InsertHydra(LayerRewritePass):
    """Inserts a Hydra branch pair on every layer selected by the given Hydra rules."""

    name = "insert_hydra"
    rewrite_class = HydraRewrite


class HydraMethod(AdapterMethod):
    """Hydra for the core: the merge folds both branches into the weight and the bias."""

    name = "hydra"
    rule = Hydra
    additive = False  # the bias changes too and ΔW depends on W: restore, don't subtract

    def make_pass(self, rules: Sequence[Rule]) -> InsertHydra:
        return InsertHydra([r for r in rules if isinstance(r, Hydra)])

    def merged_tensors(self, gm: fx.GraphModule, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        t = {k: get_tensor(gm, v).detach() for k, v in record["tensors"].items()}
        s = record["scaling"]
        fiifo = record["fan_in_fan_out"]
        weight = get_tensor(gm, record["weight"]).detach()
        # the sequential branch reads the base layer's output: W and b as they were before this
        # merge folded any other adapter of the layer into them
        base = unmerged_weight(gm, record["weight"])
        seq = t["seq_B"] @ t["seq_A"]
        delta = s * (t["par_B"] @ t["par_A"] + seq @ (base.T if fiifo else base))
        out = {record["weight"]: weight + (delta.T if fiifo else delta).to(weight.dtype)}
        if record.get("bias") is not None:
            bias = get_tensor(gm, record["bias"]).detach()
            out[record["bias"]] = bias + (s * (seq @ unmerged_weight(gm, record["bias"]))).to(bias.dtype)
        return out

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        # the weight part only (the bias changes too: see merged_tensors)
        weight = get_tensor(gm, record["weight"]).detach()
        return self.merged_tensors(gm, record)[record["weight"]] - weight


register_method(HydraMethod.name, HydraMethod())

__all__ = ["Hydra", "HydraMethod", "HydraRewrite", "InsertHydra"]
