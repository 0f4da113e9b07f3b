"""Pieces every adapter-insertion pass shares, so a method module holds only its own math.

:class:`LayerRewrite` is the match -> check half of a rewrite rule that adapts one layer op
selected by a plan rule (a subclass writes ``rewrite``), and :class:`LayerRewritePass` runs one
per rule (:class:`SharedTensorsPass` when every adapted layer reads the same frozen tensors, as
VeRA's projections). The helpers read a layer op's input, weight and bias nodes whatever its form
(``linear(x, W, b)``, GPT-2's ``addmm(b, x, W)``, ``conv2d(x, W, b, ...)``), give each layer its
own random generator, build the dropout and the join every branch has, and give the reasons
shared by the rules' ``check`` (rank larger than the layer, tied weights).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import GraphPeftWarning, PassError, PlanError
from graphpeft.graph import (DEFAULT_ADAPTER, META_KEY, GraphBuilder, Layer, Provenance, Role, adapter_id,
                             adapter_name_of, adapters, find_layers, get_tensor, register_tensor, remove_tensor, roles,
                             scoped_tensor_name)
from graphpeft.infra import PassContext, PassResult
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

__all__ = ["LayerRewrite", "LayerRewritePass", "SharedTensorsMethod", "SharedTensorsPass", "adapter_dropout",
           "branch_builder", "check_rank_and_tying", "join_output", "layer_bias", "layer_generator", "layer_input",
           "layer_calls", "layer_output", "layer_weight", "plain_conv", "rank_limit", "rank_reason", "record_adapter",
           "tied_weights_reason", "warn_large_rank"]

aten = torch.ops.aten


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
        if layer.calls and node is not layer.calls[0]:
            return None  # a module called several times is matched (and adapted) at its first call
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


class LayerRewritePass(RewritePass):
    """Runs one :attr:`rewrite_class` rewrite per plan rule: the insertion pass of a method whose
    layers are independent of each other (a subclass names its ``name`` and ``rewrite_class``)."""

    rewrite_class: ClassVar[type[LayerRewrite]]

    def __init__(self, rules: Sequence[Rule]) -> None:
        super().__init__([self.rewrite_class(r) for r in rules])


class SharedTensorsPass(LayerRewritePass):
    """A :class:`LayerRewritePass` whose rewrites all read frozen tensors shared by every layer
    the pass adapts (VeRA's projections, RandLoRA's bases), as PEFT keeps them on the tuner.

    Before any rewrite runs, :meth:`call` registers them as :attr:`Role.ADAPTER_CONST` under
    ``scoped_tensor_name(name, ctx.adapter_name)`` (each adapter name has its own), sized by the
    largest ``in`` and ``out`` among the layers the rules will adapt (as PEFT sizes them), and
    removes them again when no layer took the adapter. Rewrites read them with
    ``GraphBuilder.attr``. A subclass sets the class attributes and writes :meth:`make_shared`.
    """

    #: graph names of the shared tensors, in the order :meth:`make_shared` returns them
    shared_names: ClassVar[tuple[str, ...]] = ()
    #: rule options that shape the shared tensors: every rule of one pass needs the same values
    shared_options: ClassVar[tuple[str, ...]] = ()
    #: how errors name the method and its shared tensors (``"VeRA"``, ``"projections"``)
    label: ClassVar[str] = ""
    shared_noun: ClassVar[str] = ""

    def __init__(self, rules: Sequence[Rule]) -> None:
        rules = list(rules)
        if len({self._shaping(r) for r in rules}) > 1:
            opts = self.shared_options
            same = opts[0] if len(opts) == 1 else f"{', '.join(opts[:-1])} and {opts[-1]}"
            raise PlanError(f"{rules[0].key}: every {self.label} rule of a plan shares one "
                            f"{'/'.join(self.shared_names)}, so they need the same {same}; "
                            f"got {[(r.name, *self._shaping(r)) for r in rules]}")
        super().__init__(rules)

    def _shaping(self, rule: Rule) -> tuple[Any, ...]:
        return tuple(getattr(rule, opt) for opt in self.shared_options)

    def make_shared(self, rule: Rule, max_in: int, max_out: int) -> Sequence[torch.Tensor]:
        """The shared tensors (float32 on the CPU; cast to the weights' dtype and device here),
        for layers of at most ``max_in`` inputs and ``max_out`` outputs."""
        raise NotImplementedError

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not self.rules:
            return PassResult(gm, False)
        names = [scoped_tensor_name(n, ctx.adapter_name) for n in self.shared_names]
        if any(n in roles(gm) for n in names):
            raise PassError(self.name, f"adapter {ctx.adapter_name!r} already has {self.label} {self.shared_noun}; "
                            f"one {self.label} pass per adapter name")
        chosen = [l for l in find_layers(gm)
                  if any(r.rule.select(l) is None and r.rule.check(l) is None for r in self.rules)]
        if not chosen:
            return super().call(gm, ctx)  # nothing to adapt: the rewrites report why
        shared = self.make_shared(self.rules[0].rule, max(l.in_features for l in chosen),
                                  max(l.out_features for l in chosen))
        like = get_tensor(gm, chosen[0].weight)
        for name, tensor in zip(names, shared):
            register_tensor(gm, name, tensor.to(like), Role.ADAPTER_CONST)
        result = super().call(gm, ctx)
        if not result.modified:  # every layer declined at check: leave no orphan tensors
            for name in names:
                remove_tensor(gm, name)
        return result


class SharedTensorsMethod(AdapterMethod):
    """PEFT interop of a method inserted by a :class:`SharedTensorsPass`: PEFT keeps the shared
    tensors on the tuner (``base_model.<name>``), not on a layer, and an exported file holds
    them (``save_projection``), so loading it relies on no PRNG equality."""

    #: the pass's :attr:`SharedTensorsPass.shared_names`
    shared_names: ClassVar[tuple[str, ...]] = ()

    def peft_key(self, tensor_name: str) -> str:
        return f"base_model.{tensor_name}" if tensor_name in self.shared_names else super().peft_key(tensor_name)

    def peft_export_config(self, config: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        config["save_projection"] = True
        return config


# -- reasons a rule's check gives -----------------------------------------------------------------


def _fan_in(layer: Layer) -> int:
    # a convolution's input count includes its kernel (in_channels · kh · kw: PEFT's lora_A reads
    # every channel, also of a grouped layer)
    fan_in = layer.in_features
    if layer.kind == "conv":
        gm = layer.node.graph.owning_module
        if gm is not None and layer.weight:
            fan_in *= math.prod(get_tensor(gm, layer.weight).shape[2:])
    return fan_in


def rank_limit(layer: Layer) -> int:
    """The largest rank a factorisation of ``layer``'s weight can have: ``min(in, out)``, where
    a convolution's ``in`` counts its kernel (PEFT's ``lora_A`` of a ``Conv2d(5, 10, 3)`` is a
    5 -> r convolution over 5·3·3 = 45 inputs)."""
    return min(_fan_in(layer), layer.out_features)


def _layer_size(layer: Layer) -> str:
    fan_in = _fan_in(layer)
    if fan_in == layer.in_features:
        return f"{layer.in_features} -> {layer.out_features}"
    kernel = "x".join(map(str, get_tensor(layer.node.graph.owning_module, layer.weight).shape[2:]))
    return f"{layer.in_features} channels x {kernel} kernel = {fan_in} inputs -> {layer.out_features}"


def rank_reason(r: Optional[int], layer: Layer) -> Optional[str]:
    """Why a rank-``r`` adapter does not fit ``layer`` (``r`` above :func:`rank_limit`), or None
    (also for ``r=None``, "as large as the layer"). For the methods that need ``r`` independent
    directions of the weight (SVD/LDU factors); LoRA-like methods warn instead
    (:func:`warn_large_rank`)."""
    limit = rank_limit(layer)
    if r is not None and r > limit:
        return f"rank r={r} is larger than the layer ({_layer_size(layer)}); use r <= {limit}"
    return None


def warn_large_rank(method: str, r: Optional[int], layer: Layer, option: str = "r") -> None:
    """PEFT's rule for LoRA-like methods: a rank above :func:`rank_limit` is allowed (the update
    still has rank at most the limit, so the extra ranks only cost parameters); say so with a
    :class:`~graphpeft.errors.GraphPeftWarning` (once per layer and rank)."""
    limit = rank_limit(layer)
    if r is not None and r > limit:
        warnings.warn(f"{method}: {option}={r} on {layer.path} is larger than the layer ({_layer_size(layer)}): "
                      f"allowed, as in PEFT, but the update has rank at most {limit}; "
                      f"use {option} <= {limit} to save parameters", GraphPeftWarning, stacklevel=2)


def tied_weights_reason(layer: Layer, consequence: Optional[str] = "merging would change both",
                        calls_ok: bool = False) -> Optional[str]:
    """Why ``layer`` cannot take the adapter when its weight is tied to other layers' (GPT-2's
    ``lm_head`` and ``wte``), or None when it is not tied. ``consequence`` says what would go
    wrong (None: say nothing, for adapters that are never merged). A module called several
    times (ALBERT's shared layers, :attr:`Layer.calls`) is refused too unless ``calls_ok``: the
    method's rewrite must put a branch at every call (LoRA's does, with :func:`layer_calls`)."""
    if layer.tied_to:
        because = f": {consequence}" if consequence is not None else ""
        return f"its weight {layer.weight} is shared with {layer.tied_to} (tied weights){because}; exclude this layer"
    if layer.calls and not calls_ok:
        return (f"the module is called {len(layer.calls)} times (shared layers, as in ALBERT); only LoRA and DoRA "
                "put one adapter used at every call: use one of them or exclude this layer")
    return None


def layer_calls(layer: Layer) -> list[Layer]:
    """One :class:`Layer` per call of ``layer``'s module (just ``layer`` when it is called once):
    a rewrite that supports modules called several times builds its branch at each, reading the
    same adapter tensors, as PEFT's one adapter module does."""
    if not layer.calls:
        return [layer]
    return [dataclasses.replace(layer, node=call) for call in layer.calls]


def check_rank_and_tying(r: Optional[int], layer: Layer) -> Optional[str]:
    """The checks most low-rank methods share: :func:`rank_reason`, then :func:`tied_weights_reason`."""
    return rank_reason(r, layer) or tied_weights_reason(layer)


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


def plain_conv(target: Any) -> Any:
    """The ``.default`` form of a convolution op (``conv2d.padding``, for ``padding="same"``,
    becomes ``conv2d.default``): for a branch's own convolutions, given numeric padding."""
    return getattr(aten, target.overloadpacket.__name__).default


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


def branch_builder(gm: fx.GraphModule, layer: Layer, ctx: PassContext, pass_name: str,
                   rule: Rule) -> tuple[str, fx.Node, GraphBuilder]:
    """Where a rewrite builds an adapter branch on ``layer``'s output: ``(aid, out, g)``, the
    adapter id (the layer path, plus the name of a named adapter), the node the branch joins
    onto (:func:`layer_output`, so named adapters stack) and a builder placed after it that
    stamps the adapter's provenance (pass, rule, layer) on every node it creates."""
    aid = adapter_id(layer.path, ctx.adapter_name)
    out = layer_output(layer)
    return aid, out, GraphBuilder(gm, out, Provenance(pass_name, rule.name, layer.path, adapter=aid))


def adapter_dropout(g: GraphBuilder, x: fx.Node, p: float) -> fx.Node:
    """``x`` through training-mode dropout with probability ``p`` (``x`` itself when ``p`` is 0).
    The node is tagged ``part="dropout"``: ``CompiledModel.train()``/``eval()`` find it by that
    tag to switch it."""
    if p > 0:
        x = g.call(aten.dropout.default, x, float(p), True)
        x.meta[META_KEY]["part"] = "dropout"
    return x


def join_output(g: GraphBuilder, out: fx.Node, branch: fx.Node) -> fx.Node:
    """``out + branch``, tagged as the adapter's join, and hands ``out``'s users to it.

    ``out`` is the layer's output so far (:func:`layer_output`); nodes ``g`` created keep
    reading ``out`` itself (a branch that reads the layer's output, as Hydra's sequential one).
    Merge removes the join and points its users back at ``out``."""
    joined = g.call(aten.add.Tensor, out, branch)
    joined.meta[META_KEY]["part"] = "join"
    out.replace_all_uses_with(joined, delete_user_cb=lambda user: user not in g.created)
    return joined


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
        "module_class": layer.module_class,
        "out_features": layer.out_features,
        "tensors": dict(tensors),
        "join": join.name,
        "rule": rule.name,
        "config": rule.to_dict()[rule.key],
        **extra,
    }
    adapters(gm)[aid] = record
    return record

