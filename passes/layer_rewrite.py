"""Pieces every adapter-insertion pass shares, so a method module holds only its own math.

:class:`LayerRewrite` is the match -> check half of a rewrite rule that adapts one layer op
selected by a plan rule (a subclass writes ``rewrite``); the helpers read a layer op's input,
weight and bias nodes whatever its form (``linear(x, W, b)``, GPT-2's ``addmm(b, x, W)``,
``conv2d(x, W, b, ...)``) and give each layer its own random generator.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx

from graphpeft.graph import DEFAULT_ADAPTER, META_KEY, Layer, adapter_name_of, adapters, find_layers, get_tensor
from graphpeft.infra import PassContext
from graphpeft.plan import Rule
from graphpeft.rewrite import MatchResult, RewriteRule

__all__ = ["LayerRewrite", "layer_bias", "layer_generator", "layer_input", "layer_output", "layer_weight",
           "record_adapter"]


class LayerRewrite(RewriteRule):
    """Matches the layer ops a plan rule selects; declines (with a reason) layers that already
    carry an adapter of the same name (``ctx.adapter_name``), non-float weights, and whatever
    ``rule.check`` rejects."""

    def __init__(self, rule: Rule) -> None:
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
        if any(rec["layer"] == layer.path and adapter_name_of(rec) == ctx.adapter_name for rec in adapters(gm).values()):
            return "the layer already has an adapter" + (
                f" named {ctx.adapter_name!r}" if ctx.adapter_name != DEFAULT_ADAPTER else "")
        if not get_tensor(gm, layer.weight).is_floating_point():
            return "the weight is not floating point (quantized weights are not supported yet)"
        return self.rule.check(layer)


def layer_input(layer: Layer) -> fx.Node:
    """The activation node a layer op reads (``addmm(bias, x, W)`` keeps it second)."""
    return layer.node.args[1] if layer.fan_in_fan_out else layer.node.args[0]


def layer_output(layer: Layer) -> fx.Node:
    """The node that hands the layer's output to its users: the layer op, or the last join of
    the output-side adapters already on the layer (named adapters stack). A new adapter joins
    onto that result so far, as PEFT's forward applies several active adapters one after the
    other (DoRA's magnitude term then sees the earlier adapters, as in PEFT)."""
    node = layer.node
    while True:
        nxt = next((u for u in node.users if u.args and u.args[0] is node
                    and (u.meta.get(META_KEY) or {}).get("part") == "join"
                    and u.meta[META_KEY].get("origin") == layer.path), None)
        if nxt is None:
            return node
        node = nxt


def layer_weight(layer: Layer) -> fx.Node:
    """The ``get_attr`` node of the layer's weight, in its stored layout."""
    node = layer.node
    if layer.fan_in_fan_out:
        return node.args[2]
    return node.args[0] if layer.kind == "embedding" else node.args[1]


def layer_bias(layer: Layer) -> Optional[fx.Node]:
    """The bias node the layer op adds, or None."""
    if layer.bias is None:
        return None
    return layer.node.args[0] if layer.fan_in_fan_out else layer.node.args[2]


def layer_generator(seed: int, layer: Layer) -> torch.Generator:
    """A generator per layer: the same plan and seed give the same adapters, whatever else ran
    (the same derivation as LoRA's, so methods agree on what "seed" means)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(layer.path.encode()))


def record_adapter(gm: fx.GraphModule, aid: str, layer: Layer, ctx: PassContext, rule: Rule, method: str,
                   tensors: Mapping[str, str], join: fx.Node, **extra: Any) -> dict[str, Any]:
    """Register the record of one inserted adapter (``gm.meta``'s adapter table) and return it.

    The fields every method shares are filled here: the layer and its weight, the adapter name,
    the method, the graph names of its tensors (role key -> tensor name, e.g. ``{"A": ...}``),
    the join node merge removes, and the rule's options (``config``, its data form) so that an
    adapter file can rebuild the plan. ``extra`` holds what only this method needs (LoRA's
    ``scaling``, IA3's ``feedforward``)."""
    record = {
        "method": method,
        "layer": layer.path,
        "name": ctx.adapter_name,
        "kind": layer.kind,
        "weight": layer.weight,
        "fan_in_fan_out": layer.fan_in_fan_out,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "tensors": dict(tensors),
        "join": join.name,
        "rule": rule.name,
        "config": rule.to_dict()[rule.key],
        **extra,
    }
    adapters(gm)[aid] = record
    return record
