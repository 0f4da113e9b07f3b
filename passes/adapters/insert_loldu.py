"""LoLDU (Shi et al., 2024): low-rank adaptation through the LDU decomposition of the weight.

The weight (``(out, in)`` layout; GPT-2's Conv1D weight is transposed first) is decomposed by
LU with partial pivoting, ``W = P L U``, and ``U`` is split into its diagonal and a unit upper
triangle, ``W = P L D U'``. The first ``r`` components are kept: ``L_r = L[:, :r]``,
``D_r = diag(U)[:r]``, ``U'_r = U'[:r]``. Only a vector ``z`` ``(r,)`` (the diagonal) and a
scalar scaling factor ``σ`` train. The official code (``minloldu``) replaces ``W`` by the
residual ``W_res = W - σ₀·P L_r diag(z₀) U'_r`` and adds ``σ·P L_r diag(z) U'_r``, with
``z₀ = D_r`` and ``σ₀ = alpha / r`` (its ``init_method="lu"`` and ``scaling_factor``). This pass
leaves ``W`` in place and adds the same difference, which is the same forward::

    y = base(x) + (P L_r) · ((σ·z - σ₀·z₀) ⊙ (U'_r x))

so a fresh adapter is exactly the identity (``σ·z - σ₀·z₀`` is computed in the graph's dtype
from the same values: exactly zero) and ``W`` is never rewritten (named adapters, unmerge and the
source model all keep reading the true weight).

Tensors: ``<path>.loldu_L`` ``(out, r)`` = ``P·L_r`` (the permutation folded into the lower
factor: rows reordered, no arithmetic), ``<path>.loldu_U`` ``(r, in)`` = ``U'_r`` and
``<path>.loldu_offset`` ``(r,)`` = ``σ₀·z₀``, all :attr:`Role.ADAPTER_CONST` (recomputed on
compile from the same weight: the LU runs in float64 and is deterministic; ``save_adapter``
writes them as well); ``<path>.loldu_z`` ``(r,)`` init ``D_r`` and ``<path>.loldu_scale``
``(1,)`` init ``alpha / r``, :attr:`Role.ADAPTER`. Merge is additive and exact:
``ΔW = (P L_r) diag(σ·z - σ₀·z₀) U'_r``. Linear layers only (GPT-2's Conv1D included).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import Layer, Role, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice, check_number, check_positive_int
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .insert_lora_xs import weight_rows
from .layer_rewrite import (LayerRewrite, LayerRewritePass, branch_builder, check_rank_and_tying, join_output,
                            layer_generator, layer_input, record_adapter)

aten = torch.ops.aten

INITS = ("default", "random")


@register_rule
@dataclasses.dataclass
class LoLDU(Rule):
    """LoLDU: only the diagonal of ``r`` LDU components of the weight, and a scale, train.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: number of LDU components kept (default 4 and ``alpha`` 1: the official
            ``LoLDUParametrization.from_linear`` defaults).
        alpha: the scaling factor starts at ``alpha / r`` (it trains).
        init: ``"default"`` (``z = D_r``, the official ``init_method="lu"``, and the scale at
            ``alpha / r``: the identity) or ``"random"`` (``z`` and the scale moved off that by a
            standard-normal draw each: a non-identity start, for tests).
    """

    key: ClassVar[str] = "loldu"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    r: int = 4
    alpha: float = 1.0
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_number(self, "alpha")
        check_choice(self, "init", INITS)

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r

    def check(self, layer: Layer) -> Optional[str]:
        return check_rank_and_tying(self.r, layer)


def ldu_factors(rows: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P L_r (out, r), D_r (r,), U'_r (r, in))`` of a float64 ``(out, in)`` matrix: LU with
    partial pivoting (``torch.linalg.lu``), ``U = D U'`` with ``U'`` unit upper triangular."""
    p, lower, upper = torch.linalg.lu(rows.to(torch.float64))
    d = torch.diagonal(upper)
    # a zero pivot (rank-deficient weight) leaves that row of U as it is: its D entry is 0, so
    # the component contributes nothing at init either way, and nothing divides by zero
    safe = torch.where(d == 0, torch.ones_like(d), d)
    unit_upper = upper / safe.unsqueeze(-1)
    return p @ lower[:, :r], d[:r].clone(), unit_upper[:r].contiguous()


class LoLDURewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``y + (P L_r)((σ·z - σ₀·z₀) ⊙ (U'_r x))``."""

    rule: LoLDU

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        dtype = weight.dtype
        pl, d, unit_upper = ldu_factors(weight_rows(weight, layer), rule.r)
        z0 = d.to(dtype)
        scale0 = torch.tensor([rule.scaling], dtype=dtype)
        # σ₀·z₀ in the graph's dtype, the same float op the graph does on the fresh values: the
        # branch is exactly zero at init
        offset = z0 * scale0
        z, scale = z0.clone(), scale0.clone()
        if rule.init == "random":
            gen = layer_generator(ctx.seed, layer)
            z = z + torch.randn(rule.r, generator=gen).to(dtype)
            scale = scale + torch.randn(1, generator=gen).to(dtype)
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        aid, y, g = branch_builder(gm, layer, ctx, InsertLoLDU.name, rule)
        u_node = g.param(names["U"], unit_upper.to(dtype), Role.ADAPTER_CONST)
        z_node = g.param(names["z"], z, Role.ADAPTER)
        s_node = g.param(names["scale"], scale, Role.ADAPTER)
        o_node = g.param(names["offset"], offset, Role.ADAPTER_CONST)
        l_node = g.param(names["L"], pl.to(dtype).contiguous(), Role.ADAPTER_CONST)
        coef = g.call(aten.sub.Tensor, g.call(aten.mul.Tensor, z_node, s_node), o_node)
        low = g.call(aten.linear.default, layer_input(layer), u_node)  # U'_r x
        up = g.call(aten.linear.default, g.call(aten.mul.Tensor, low, coef), l_node)
        joined = join_output(g, y, up)
        record_adapter(gm, aid, layer, ctx, rule, LoLDUMethod.name, names, joined, scaling=rule.scaling)


def tensor_names(layer: Layer) -> dict[str, str]:
    """State-dict keys of one LoLDU layer."""
    return {k: f"{layer.path}.loldu_{k}" for k in ("L", "U", "z", "scale", "offset")}


@register_pass
class InsertLoLDU(LayerRewritePass):
    """Inserts a LoLDU branch on every layer selected by the given LoLDU rules."""

    name = "insert_loldu"
    rewrite_class = LoLDURewrite


class LoLDUMethod(AdapterMethod):
    """LoLDU for the core: additive merge ``ΔW = (P L_r) diag(σ·z - σ₀·z₀) U'_r``."""

    name = "loldu"
    rule = LoLDU

    def make_pass(self, rules: Sequence[Rule]) -> InsertLoLDU:
        return InsertLoLDU([r for r in rules if isinstance(r, LoLDU)])

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        t = {k: get_tensor(gm, v).detach() for k, v in record["tensors"].items()}
        coef = t["z"] * t["scale"] - t["offset"]
        delta = (t["L"] * coef) @ t["U"]
        return delta.T if record["fan_in_fan_out"] else delta


register_method(LoLDUMethod.name, LoLDUMethod())
