"""LoRA (Hu et al., 2021) as PEFT implements it: ``y = base(x) + scaling * B(A(dropout(x)))``.

This module is the example to copy for a new method. It has four parts:

1. :class:`LoRA` — the plan rule (its hyper-parameters, defaults as published, and ``check``
   with reasons);
2. :class:`LoRARewrite` — match -> check -> rewrite on the graph, one layer op at a time;
3. :class:`InsertLoRA` — the pass that runs those rewrites;
4. :class:`LoRAMethod` — what the core needs for merging (``delta_weight``).

Shapes and names follow PEFT so state dicts are interchangeable: linear ``lora_A.weight``
``(r, in)`` and ``lora_B.weight`` ``(out, r)``; conv ``(r, in, kh, kw)`` and ``(out, r, 1, 1)``;
embedding ``lora_embedding_A`` ``(r, num)`` and ``lora_embedding_B`` ``(dim, r)``. Scaling is
``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). A is Kaiming-uniform and B zero (for
embeddings A zero and B normal), so a fresh adapter leaves outputs unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import GraphBuilder, Layer, Provenance, Role, adapters, find_layers, get_tensor, op_args
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule
from graphpeft.errors import PlanError

aten = torch.ops.aten

INITS = ("default", "gaussian", "random")


@register_rule
@dataclasses.dataclass
class LoRA(Rule):
    """Low-rank adapter: trainable ``A (r x in)`` and ``B (out x r)`` beside a frozen weight.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: rank.
        alpha: scaling numerator; the branch is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter branch's input (training only).
        use_rslora: scale by ``alpha / sqrt(r)`` (rank-stabilised LoRA).
        init: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal with
            std ``1/r``, B zero) or ``"random"`` (both random: a non-identity start, for tests).
    """

    key: ClassVar[str] = "lora"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise PlanError(f"lora: r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise PlanError(f"lora: dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise PlanError(f"lora: init must be one of {list(INITS)}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def check(self, layer: Layer) -> Optional[str]:
        limit = min(layer.in_features, layer.out_features)
        if self.r > limit:
            return (f"rank r={self.r} is larger than the layer ({layer.in_features} -> "
                    f"{layer.out_features}); use r <= {limit}")
        if layer.shared_with:
            return (f"its weight {layer.weight} is shared with {layer.shared_with} (tied weights): "
                    "merging would change both; exclude this layer")
        if layer.kind == "conv" and op_args(layer.node).get("groups", 1) != 1:
            return "grouped convolutions are not supported by LoRA"
        return None


class LoRARewrite(RewriteRule):
    """Rewrites one layer op ``y = op(x, W)`` into ``y + scaling * B(A(dropout(x)))``."""

    def __init__(self, rule: LoRA) -> None:
        self.rule = rule
        self.name = rule.name
        self._layers: dict[fx.Node, Layer] = {}

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if not self._layers:
            self._layers = {l.node: l for l in find_layers(gm)}
        layer = self._layers.get(node)
        if layer is None:
            return None  # not a layer op: not worth a reason
        why = self.rule.select(layer)
        if why is not None:
            return MatchResult.fail(self.name, node, why, layer.path)
        return MatchResult.success(self.name, node, layer.path, layer=layer)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        layer: Layer = match.bindings["layer"]
        if any(rec["layer"] == layer.path for rec in adapters(gm).values()):
            return "the layer already has an adapter"
        if not get_tensor(gm, layer.weight).is_floating_point():
            return "the weight is not floating point (quantized weights are not supported yet)"
        return self.rule.check(layer)

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        a, b = _init_factors(layer, weight, rule, ctx.seed)
        prov = Provenance(InsertLoRA.name, rule.name, layer.path, adapter=layer.path)
        y = layer.node
        g = GraphBuilder(gm, y, prov)
        names = _tensor_names(layer)
        a_node = g.param(names["A"], a, Role.ADAPTER)
        b_node = g.param(names["B"], b, Role.ADAPTER)
        if layer.kind == "embedding":
            a_t = g.call(aten.t.default, a_node)
            low = g.call(aten.embedding.default, a_t, y.args[1], op_args(y)["padding_idx"])
            up = g.call(aten.linear.default, low, b_node)
        else:
            x = y.args[1] if layer.fan_in_fan_out else y.args[0]  # addmm(bias, x, W)
            if rule.dropout > 0:
                x = g.call(aten.dropout.default, x, float(rule.dropout), True)
                x.meta["graphpeft"]["part"] = "dropout"
            if layer.kind == "conv":
                conv = y.target
                c = op_args(y)
                low = g.call(conv, x, a_node, None, c["stride"], c["padding"], c["dilation"], 1)
                up = g.call(conv, low, b_node)
            else:
                low = g.call(aten.linear.default, x, a_node)
                up = g.call(aten.linear.default, low, b_node)
        scaled = g.call(aten.mul.Tensor, up, rule.scaling)
        joined = g.call(aten.add.Tensor, y, scaled)
        joined.meta["graphpeft"]["part"] = "join"
        y.replace_all_uses_with(joined, delete_user_cb=lambda user: user is not joined)
        adapters(gm)[layer.path] = {
            "method": LoRAMethod.name,
            "layer": layer.path,
            "kind": layer.kind,
            "weight": layer.weight,
            "fan_in_fan_out": layer.fan_in_fan_out,
            "tensors": {"A": names["A"], "B": names["B"]},
            "scaling": rule.scaling,
            "join": joined.name,
            "rule": rule.name,
            "config": rule.to_dict()["lora"],
        }


def _tensor_names(layer: Layer) -> dict[str, str]:
    if layer.kind == "embedding":
        return {"A": f"{layer.path}.lora_embedding_A", "B": f"{layer.path}.lora_embedding_B"}
    return {"A": f"{layer.path}.lora_A.weight", "B": f"{layer.path}.lora_B.weight"}


def _init_factors(layer: Layer, weight: torch.Tensor, rule: LoRA, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a generator per layer: the same plan and seed give the same adapters, whatever else ran
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(layer.path.encode()))
    r = rule.r
    if layer.kind == "embedding":
        a = torch.zeros(r, layer.in_features)
        b = torch.empty(layer.out_features, r)
        torch.nn.init.normal_(b, generator=gen)
        if rule.init == "random":
            torch.nn.init.normal_(a, generator=gen)
    else:
        a_shape = (r, layer.in_features, *weight.shape[2:]) if layer.kind == "conv" else (r, layer.in_features)
        b_shape = (layer.out_features, r, *([1] * (weight.dim() - 2))) if layer.kind == "conv" else (layer.out_features, r)
        a, b = torch.empty(a_shape), torch.zeros(b_shape)
        if rule.init == "gaussian":
            torch.nn.init.normal_(a, std=1 / r, generator=gen)
        else:
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        if rule.init == "random":
            torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)
    return a.to(weight.dtype, copy=False).to(weight.device), b.to(weight.dtype).to(weight.device)


@register_pass
class InsertLoRA(RewritePass):
    """Inserts a LoRA branch on every layer selected by the given LoRA rules."""

    name = "insert_lora"

    def __init__(self, rules: Sequence[LoRA]) -> None:
        super().__init__([LoRARewrite(r) for r in rules])


class LoRAMethod(AdapterMethod):
    name = "lora"
    rule = LoRA

    def make_pass(self, rules: Sequence[Rule]) -> InsertLoRA:
        return InsertLoRA([r for r in rules if isinstance(r, LoRA)])

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        a = get_tensor(gm, record["tensors"]["A"]).detach()
        b = get_tensor(gm, record["tensors"]["B"]).detach()
        s = record["scaling"]
        if record["kind"] == "embedding":
            return (b @ a).T * s
        if record["kind"] == "conv":
            w = get_tensor(gm, record["weight"])
            return (b.flatten(1) @ a.flatten(1)).reshape(w.shape) * s
        delta = (b @ a) * s
        return delta.T if record["fan_in_fan_out"] else delta


register_method(LoRAMethod.name, LoRAMethod())
