"""IA3 (Liu et al., 2022, "(IA)³"): learned vectors that rescale activations, as PEFT has it.

On an ordinary layer the output is scaled, ``y = op(x, W, b) * l`` (``l``: one entry per output
feature, bias included); on a feed-forward layer (``feedforward_modules``, PEFT's name) the
input is scaled instead, ``y = op(x * l, W, b)`` (one entry per input feature). The paper puts
output scaling on keys and values and input scaling on the second feed-forward layer.

Tensor (PEFT name and shape, so state dicts are interchangeable): ``<path>.ia3_l``; linear
``(out, 1)``, or ``(1, in)`` on a feed-forward layer; conv ``(1, out, 1, 1)`` / ``(1, in, 1, 1)``
(one trailing 1 per spatial axis: Conv1d, Conv2d, Conv3d; grouped ones too).
Init: ones (a fresh adapter leaves outputs unchanged). Merge is exact and multiplicative:
``W <- W ⊙ l`` along the scaled axis (a grouped convolution's input vector laid out per group,
as PEFT does), and for output scaling also ``b <- b ⊙ l`` (PEFT does the same), so
:class:`IA3Method` overrides ``merged_tensors`` rather than ``delta_weight``. PEFT's IA3 has no
``nn.Conv1d`` layer: such adapters work here but do not export to a PEFT folder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import AdapterFileError, PlanError
from graphpeft.graph import GraphBuilder, Layer, Provenance, Role, adapter_id, conv_groups, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, Targets, check_choice
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .layer_rewrite import (LayerRewrite, LayerRewritePass, layer_generator, layer_input, layer_output, record_adapter,
                            tied_weights_reason)

aten = torch.ops.aten

INITS = ("default", "random")


@register_rule
@dataclasses.dataclass
class IA3(Rule):
    """Scaling vectors on activations: outputs, or inputs of feed-forward layers.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        feedforward_modules: which of the targeted layers scale their input instead of their
            output; same forms as ``targets`` (PEFT: ``["down_proj"]`` for Llama,
            ``["mlp.c_proj"]`` for GPT-2, ``["output.dense"]`` for BERT). ``None``: none.
        init: ``"default"`` (ones: the identity) or ``"random"`` (standard normal, as PEFT's
            ``init_ia3_weights=False``; for tests).
    """

    key: ClassVar[str] = "ia3"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv")

    feedforward_modules: Optional[Targets] = None
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "init", INITS)
        ff = self.feedforward_modules
        if ff is not None and not isinstance(ff, str):
            if not all(isinstance(t, str) for t in ff):
                raise PlanError("ia3: feedforward_modules must be a regex string or a list of names")
            self.feedforward_modules = list(ff)

    def is_feedforward(self, layer: Layer) -> bool:
        """Whether ``layer`` scales its input (it is one of ``feedforward_modules``)."""
        return self.feedforward_modules is not None and self._path_matches(self.feedforward_modules, layer)

    def check(self, layer: Layer) -> Optional[str]:
        return tied_weights_reason(layer)


def vector_shape(layer: Layer, feedforward: bool) -> tuple[int, ...]:
    """PEFT's shape of ``ia3_l`` for a layer (a convolution's: ``(1, C, 1, ...)``, one 1 per
    spatial axis)."""
    n = layer.in_features if feedforward else layer.out_features
    if layer.kind == "conv":
        gm = layer.node.graph.owning_module
        return (1, n) + (1,) * (get_tensor(gm, layer.weight).dim() - 2)
    return (1, n) if feedforward else (n, 1)


class IA3Rewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``op(x, W) * l`` or, on feed-forward layers, ``op(x * l, W)``."""

    rule: IA3

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        ff = rule.is_feedforward(layer)
        weight = get_tensor(gm, layer.weight)
        shape = vector_shape(layer, ff)
        if rule.init == "random":
            vec = torch.randn(shape, generator=layer_generator(ctx.seed, layer))
        else:
            vec = torch.ones(shape)
        name = scoped_tensor_name(f"{layer.path}.ia3_l", ctx.adapter_name)
        aid = adapter_id(layer.path, ctx.adapter_name)
        prov = Provenance(InsertIA3.name, rule.name, layer.path, adapter=aid)
        y = layer.node
        stack = y.meta.get("nn_module_stack")
        if ff:
            # the scaled input must exist before the layer op reads it: build just before it
            x = layer_input(layer)
            g = GraphBuilder(gm, y.prev, prov, module_stack=stack)
            scale = self._broadcastable(g, g.param(name, vec.to(weight), Role.ADAPTER), layer)
            joined = g.call(aten.mul.Tensor, x, scale)
            y.replace_input_with(x, joined)
        else:
            out = layer_output(layer)  # y, or the last adapter joined onto it (named adapters stack)
            g = GraphBuilder(gm, out, prov, module_stack=stack)
            scale = self._broadcastable(g, g.param(name, vec.to(weight), Role.ADAPTER), layer)
            joined = g.call(aten.mul.Tensor, out, scale)
            out.replace_all_uses_with(joined, delete_user_cb=lambda user: user is not joined)
        # the join is the node whose first argument it replaces: merge re-points its users there
        joined.meta["graphpeft"]["part"] = "join"
        extra = {"groups": conv_groups(y), "spatial_dims": weight.dim() - 2} if layer.kind == "conv" else {}
        record_adapter(gm, aid, layer, ctx, rule, IA3Method.name, {"l": name}, joined, bias=layer.bias, feedforward=ff,
                       **extra)

    @staticmethod
    def _broadcastable(g: GraphBuilder, vec: fx.Node, layer: Layer) -> fx.Node:
        # conv vectors (1, C, 1, 1) already broadcast over NCHW; linear ones become (C,) (PEFT
        # flattens them too) to broadcast over the last axis
        if layer.kind == "conv":
            return vec
        return g.call(aten.view.default, vec, [-1])


def _grouped_input_factor(vec: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Input scaling ``(1, in, 1...)`` laid out against a convolution weight ``(out, in/groups, k...)``:
    output channel ``o`` of group ``j`` reads input channels ``j·in/groups ...`` (PEFT's expand)."""
    if groups == 1:
        return vec
    out, per_group = weight.shape[0], weight.shape[1]
    spatial = vec.shape[2:]
    v = vec.reshape(groups, 1, per_group, *spatial).expand(groups, out // groups, per_group, *spatial)
    return v.reshape(out, per_group, *spatial)


@register_pass
class InsertIA3(LayerRewritePass):
    """Inserts IA3 scaling on every layer selected by the given IA3 rules."""

    name = "insert_ia3"
    rewrite_class = IA3Rewrite


class IA3Method(AdapterMethod):
    """IA3 for the core: the merge multiplies the weight (and, for output scaling, the bias)."""

    name = "ia3"
    rule = IA3
    additive = False
    peft_type = "IA3"
    peft_options = {"feedforward_modules": "feedforward_modules"}

    def make_pass(self, rules: Sequence[Rule]) -> InsertIA3:
        return InsertIA3([r for r in rules if isinstance(r, IA3)])

    def merged_tensors(self, gm: fx.GraphModule, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        vec = get_tensor(gm, record["tensors"]["l"]).detach()
        weight = get_tensor(gm, record["weight"]).detach()
        ff = record["feedforward"]
        if record["kind"] == "conv":
            # weight (out, in/groups, k...): input scaling along axis 1, output scaling along axis 0
            factor = _grouped_input_factor(vec, weight, record.get("groups", 1)) if ff else vec.transpose(0, 1)
        else:
            # (out, 1) or (1, in) against W (out, in); Conv1D stores W as (in, out)
            factor = vec.T if record["fan_in_fan_out"] else vec
        out = {record["weight"]: weight * factor}
        if not ff and record.get("bias") is not None:
            bias = get_tensor(gm, record["bias"]).detach()
            out[record["bias"]] = bias * vec.reshape(bias.shape)
        return out

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        # the weight part only (output scaling also rescales the bias: see merged_tensors)
        weight = get_tensor(gm, record["weight"]).detach()
        return self.merged_tensors(gm, record)[record["weight"]] - weight

    def peft_export_config(self, config: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        conv1d = [r["layer"] for r in records if r["kind"] == "conv" and r.get("spatial_dims") == 1]
        if conv1d:
            raise AdapterFileError(f"PEFT's IA3 has no nn.Conv1d layer ({conv1d}): PEFT could not load this adapter; "
                                   "save it with cm.save_adapter, or leave those layers out")
        # PEFT wants feedforward_modules within target_modules, which the core writes as paths
        config["feedforward_modules"] = [r["layer"] for r in records if r["feedforward"]]
        return config

    # add_weighted_adapter: PEFT's IA3Model.add_weighted_adapter sums the vectors, Σ w_i · l_i
    def combined_rule_body(self, bodies: Sequence[Sequence[dict[str, Any]]], combination_type: str,
                           **options: Any) -> dict[str, Any]:
        if combination_type != "linear":
            raise ValueError(f"IA3 adapters combine linearly only (combination_type='linear'), got {combination_type!r}")
        return {k: v for k, v in bodies[0][0].items() if k not in ("targets", "exclude", "layers", "kind", "init")}

    def combine(self, parts: Sequence[dict[str, torch.Tensor]], records: Sequence[dict[str, Any]],
                weights: Sequence[float], combination_type: str, new: Optional[dict[str, torch.Tensor]] = None,
                **options: Any) -> dict[str, torch.Tensor]:
        return {"l": sum(p["l"].detach() * w for p, w in zip(parts, weights))}  # type: ignore[dict-item]


register_method(IA3Method.name, IA3Method())
