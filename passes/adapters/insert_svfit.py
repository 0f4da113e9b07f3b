"""SVFit (Sun et al., 2024): fine-tune the top singular values of each weight.

The weight (``(out, in)`` layout; GPT-2's Conv1D weight is transposed first) is split by its
SVD into the best rank-``r`` part and a frozen rest, ``W = U_r Σ_r V_rᵀ + W_e``; the ``r``
singular values ``σ`` train, the singular vectors ``U_r``, ``V_r`` and ``W_e`` stay frozen, and
``σ`` starts at the true singular values ``σ₀`` (so the adapted weight starts at ``W``). The
graph keeps ``W`` (``W_e = W - U_r diag(σ₀) V_rᵀ``) and adds the difference, the same forward::

    y = base(x) + U_r ((σ - σ₀) ⊙ (V_rᵀ x))

A fresh adapter is exactly the identity (``σ - σ₀ = 0``). ``σ`` itself trains (not an offset
from ``σ₀``), as in the paper, so weight decay pulls the singular values toward zero, not
toward their pretrained values.

Tensors: ``<path>.svfit_U`` ``(out, r)``, ``<path>.svfit_V`` ``(r, in)`` (``V_rᵀ``) and
``<path>.svfit_sigma0`` ``(r,)``, :attr:`Role.ADAPTER_CONST` (recomputed on compile from the
same weight: the SVD runs in float64 with a canonical sign per component; ``save_adapter``
writes them as well); ``<path>.svfit_sigma`` ``(r,)``, :attr:`Role.ADAPTER`. Merge is additive
and exact: ``ΔW = U_r diag(σ - σ₀) V_rᵀ``. Linear layers only (GPT-2's Conv1D included).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import Layer, Role, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice, check_positive_int
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .insert_lora_xs import top_singular, weight_rows
from .layer_rewrite import (LayerRewrite, LayerRewritePass, branch_builder, check_rank_and_tying, join_output,
                            layer_generator, layer_input, record_adapter)

aten = torch.ops.aten

INITS = ("default", "random")


@register_rule
@dataclasses.dataclass
class SVFit(Rule):
    """SVFit: the top-``r`` singular values of each selected weight train.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: how many singular values train; ``None`` (the default) means all of them,
            ``min(in, out)`` per layer: the paper's "16 times fewer trainable parameters than
            LoRA" is exactly ``min(in, out)`` against a rank-8 LoRA on a square layer.
        init: ``"default"`` (``σ = σ₀``: the identity) or ``"random"`` (``σ = σ₀`` plus a
            standard-normal draw: a non-identity start, for tests).
    """

    key: ClassVar[str] = "svfit"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    r: Optional[int] = None
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r", none_means="all singular values")
        check_choice(self, "init", INITS)

    def rank(self, layer: Layer) -> int:
        """The number of singular values that train on ``layer``."""
        return self.r if self.r is not None else min(layer.in_features, layer.out_features)

    def check(self, layer: Layer) -> Optional[str]:
        return check_rank_and_tying(self.r, layer)


class SVFitRewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``y + U_r((σ - σ₀) ⊙ (V_rᵀ x))``."""

    rule: SVFit

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        dtype = weight.dtype
        r = rule.rank(layer)
        u, s, vh = top_singular(weight_rows(weight, layer), r)
        sigma0 = s.to(dtype)
        sigma = sigma0.clone()
        if rule.init == "random":
            sigma = sigma + torch.randn(r, generator=layer_generator(ctx.seed, layer)).to(dtype)
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        aid, y, g = branch_builder(gm, layer, ctx, InsertSVFit.name, rule)
        v_node = g.param(names["V"], vh.to(dtype).contiguous(), Role.ADAPTER_CONST)
        s_node = g.param(names["sigma"], sigma, Role.ADAPTER)
        s0_node = g.param(names["sigma0"], sigma0, Role.ADAPTER_CONST)
        u_node = g.param(names["U"], u.to(dtype).contiguous(), Role.ADAPTER_CONST)
        shift = g.call(aten.sub.Tensor, s_node, s0_node)
        low = g.call(aten.linear.default, layer_input(layer), v_node)  # V_rᵀ x
        up = g.call(aten.linear.default, g.call(aten.mul.Tensor, low, shift), u_node)
        joined = join_output(g, y, up)
        record_adapter(gm, aid, layer, ctx, rule, SVFitMethod.name, names, joined, rank=r)


def tensor_names(layer: Layer) -> dict[str, str]:
    """State-dict keys of one SVFit layer."""
    return {k: f"{layer.path}.svfit_{k}" for k in ("U", "V", "sigma", "sigma0")}


@register_pass
class InsertSVFit(LayerRewritePass):
    """Inserts an SVFit branch on every layer selected by the given SVFit rules."""

    name = "insert_svfit"
    rewrite_class = SVFitRewrite


class SVFitMethod(AdapterMethod):
    """SVFit for the core: additive merge ``ΔW = U_r diag(σ - σ₀) V_rᵀ``."""

    name = "svfit"
    rule = SVFit

    def make_pass(self, rules: Sequence[Rule]) -> InsertSVFit:
        return InsertSVFit([r for r in rules if isinstance(r, SVFit)])

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        t = {k: get_tensor(gm, v).detach() for k, v in record["tensors"].items()}
        delta = (t["U"] * (t["sigma"] - t["sigma0"])) @ t["V"]
        return delta.T if record["fan_in_fan_out"] else delta


register_method(SVFitMethod.name, SVFitMethod())
