"""Weight-only quantization of frozen base weights (QLoRA-style): the ``quantize`` plan rule.

``gp.Quantize(targets=..., dtype="int8" | "int4" | "nf4" | "bfloat16" | "float16", group_size=64)``
stores each selected layer's weight quantized, as new frozen tensors beside the layer
(``<weight>_qdata``, ``<weight>_scale`` ...; see :mod:`.formats`), and replaces the weight's
``get_attr`` with a dequantize subgraph of plain aten ops (unpack, level lookup, scale,
reshape) placed just before the layer reads it. The float weight leaves the graph. Every node
the rewrite creates carries provenance (pass, rule, layer, ``part="dequant"``).

Two readers never see the whole float weight (int8 / int4 / bf16 / fp16, layers without
adapters): an embedding gathers the quantized rows of its ids and dequantizes only those, and a
linear layer whose float weight exceeds :data:`CHUNK_BYTES` (a vocabulary head) dequantizes it a
block of rows at a time, one matmul per block. Tied weights (an embedding and the head sharing
it) are quantized once when the rule selects every layer reading them, and declined otherwise.

It combines with adapter rules in one plan: ``compile`` runs it after every other rule's pass
(``stage = 1``), so adapters are initialised from (and attach to) the float weight, and then
read the dequantized one; adapters stay in their own dtype (float32 on a float32 model), as
peft keeps LoRA in float32 on a 4-bit base. A quantized tensor never trains: a plan that also
updates the weight (``gp.Update`` with ``part="all"``) is refused with a :class:`PlanError`.

Merge (``cm.merge(requantize=True)``, the default, as peft's ``merge_and_unload`` on a 4-bit
base): the weights of adapted layers are dequantized (:mod:`.dequantize_for_merge`), the
adapters folded in, and the merged weight quantized again in the same format
(:mod:`.requantize_merged`; the round trip adds a quantization error, which the merge report
says); ``requantize=False`` keeps the merged weights in float.

Records: ``gm.meta["graphpeft"]["quantized"]``: weight name -> dtype, group size, shape, the
float dtype, the stored tensor names, the layer paths and the rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import PlanError, WeightsError
from graphpeft.graph import (GraphBuilder, Layer, Provenance, Role, adapters, find_layers, get_tensor, graph_meta,
                             register_tensor, remove_tensor, roles)
from graphpeft.infra import PassContext, PassResult
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice, check_positive_int
from graphpeft.registry import register_method, register_pass, register_rule, register_weight_format
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

from .formats import (DTYPES, FLOAT_DTYPES, PACKED, ROW_FORMATS, dequantize, layout_problem, quantize, slice_rows,
                      take_rows)

aten = torch.ops.aten

#: ``gm.meta["graphpeft"]`` key of the quantized-weight records (weight name -> record)
QUANT_META = "quantized"


def quantized(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """The quantized-weight records of ``gm`` (weight name -> record)."""
    return graph_meta(gm).setdefault(QUANT_META, {})


@register_rule
@dataclasses.dataclass
class Quantize(Rule):
    """Store the selected layers' frozen weights quantized; dequantize them where used.

    Args:
        targets / kind / layers / exclude: the usual selection (linear, conv and embedding layers).
        dtype: ``"int8"`` (symmetric, per group), ``"int4"`` (asymmetric, per group, two per
            byte), ``"nf4"`` (QLoRA's NormalFloat4, double-quantized scales), ``"bfloat16"`` or
            ``"float16"`` (a cast).
        group_size: weights per scale along each row (the input dimension of a linear layer);
            ``None``: one scale per row. Ignored by the float dtypes.
    """

    key: ClassVar[str] = "quantize"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")
    is_adapter: ClassVar[bool] = False
    #: ``compile`` orders rule passes by (adapter first, stage): quantizing changes how a weight
    #: is stored, so it runs after the rules that read or train weights
    stage: ClassVar[int] = 1

    dtype: str = "int8"
    group_size: Optional[int] = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "dtype", DTYPES)
        check_positive_int(self, "group_size", none_means="one scale per row")
        if self.dtype in PACKED and self.group_size is not None and self.group_size % 2:
            raise PlanError(f"{self.key}: {self.dtype} packs two values per byte, so group_size must be even, "
                            f"got {self.group_size}")

    @property
    def name(self) -> str:
        t = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
        return f"{self.key}[{t}; {self.dtype}]"

    def check(self, layer: Layer) -> Optional[str]:
        # tied weights (an embedding and its output head): the rewrite checks that the rule
        # selects every layer reading the tensor, since quantizing it changes all of them
        shape = _weight_shape(layer)
        if shape is not None:
            return layout_problem(shape, self.dtype, self.group_size)
        return None


def _weight_shape(layer: Layer) -> Optional[tuple[int, ...]]:
    """The stored weight shape a layer implies (None for conv: the kernel size is not known)."""
    if layer.kind == "linear":
        return (layer.in_features, layer.out_features) if layer.fan_in_fan_out else (layer.out_features,
                                                                                       layer.in_features)
    if layer.kind == "embedding":
        return (layer.in_features, layer.out_features)
    return None


class QuantizeRewrite(RewriteRule):
    """Match a layer the rule selects -> check its weight is a frozen float tensor that fits the
    format -> rewrite: store it quantized, dequantize it before the layer reads it."""

    def __init__(self, rule: Quantize) -> None:
        self.rule = rule
        self.name = rule.name
        self._layers: dict[fx.Node, Layer] = {}

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if not self._layers:
            self._layers = {l.node: l for l in find_layers(gm)}
        layer = self._layers.get(node)
        if layer is None:
            return None
        why = self.rule.select(layer)
        if why is not None:
            return MatchResult.fail(self.name, node, why, layer.path)
        return MatchResult.success(self.name, node, layer.path, layer=layer)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        layer: Layer = match.bindings["layer"]
        done = quantized(gm).get(layer.weight)
        if done is not None:
            # a tied weight is quantized once, for every layer reading it
            return None if layer.path in done["layers"] and done["rule"] == self.rule.name else \
                "its weight is already quantized"
        if layer.shared_with:
            others = [l.path for l in self._layers.values() if l.path in layer.shared_with and self.rule.select(l)]
            if others:
                return (f"its weight {layer.weight} is shared with {others} (tied weights), which this rule does not "
                        "select: quantizing the tensor changes every layer that reads it, so select them too "
                        "(e.g. targets=[..., 'lm_head']) or exclude this layer")
        role = roles(gm).get(layer.weight)
        if role != Role.FROZEN:
            return f"its weight has role {role.value if role else None}; only frozen base weights are quantized"
        w = get_tensor(gm, layer.weight)
        if not w.is_floating_point():
            return f"its weight is {w.dtype}, not a float tensor"
        if FLOAT_DTYPES.get(self.rule.dtype) == w.dtype:
            return f"its weight is already {self.rule.dtype}"
        return self.rule.check(layer) or layout_problem(tuple(w.shape), self.rule.dtype, self.rule.group_size)

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        if layer.weight in quantized(gm):
            return  # tied: quantized with the first layer reading it
        rec = store_quantized(gm, layer.weight, self.rule.dtype, self.rule.group_size, pass_name=QuantizeWeights.name,
                              rule_name=self.rule.name, origin=layer.path,
                              module_stack=layer.node.meta.get("nn_module_stack"))
        rec["layers"] = [layer.path, *(p for p in layer.shared_with if p != layer.path)]


def store_quantized(gm: fx.GraphModule, name: str, dtype: str, group_size: Optional[int], *, pass_name: str,
                    rule_name: str, origin: str, module_stack: Optional[dict] = None) -> dict[str, Any]:
    """Replace float tensor ``name`` of ``gm`` by its quantized tensors and a dequantize subgraph
    before the first op reading each of its ``get_attr`` nodes; returns the new record.

    Also used by merge to quantize a merged weight again (:mod:`.requantize_merged`)."""
    w = get_tensor(gm, name).detach()
    tensors = quantize(w, dtype, group_size)
    names = {k: f"{name}_{k}" for k in tensors}
    taken = [n for n in names.values() if n in roles(gm)]
    if taken:
        raise PlanError(f"quantize: cannot store {name} quantized: the graph already has tensors named {taken}")
    attrs = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for k, t in tensors.items():
        register_tensor(gm, names[k], t, Role.FROZEN)
    adapted = any(r.get("weight") == name for r in adapters(gm).values())
    prov = Provenance(pass_name, rule_name, origin, part="dequant")
    outputs, fused = [], []
    for attr in attrs:
        users = sorted(attr.users, key=order.__getitem__)
        forms = {u: _reader_form(u, attr, dtype, w, adapted) for u in users}
        plain = [u for u in users if forms[u] is None]
        if plain:
            # the subgraph goes right before the first reader, so a dequantized weight lives only
            # while the layer runs (not from the top of the graph)
            g = GraphBuilder(gm, plain[0].prev, prov, module_stack if module_stack is not None
                             else plain[0].meta.get("nn_module_stack"))
            out = dequantize(g, {k: g.attr(n) for k, n in names.items()}, dtype, tuple(w.shape), group_size, w.dtype)
            for u in plain:
                u.replace_input_with(attr, out)
            outputs.append(out.name)
        for u in users:
            if forms[u] is not None:
                fused.append(_fused_reader(gm, u, forms[u], names, dtype, group_size, w, prov))
        gm.graph.erase_node(attr)
    remove_tensor(gm, name)
    rec = {"weight": name, "dtype": dtype, "group_size": group_size, "shape": [int(s) for s in w.shape],
           "float_dtype": str(w.dtype).replace("torch.", ""), "tensors": names, "outputs": outputs,
           "fused": fused, "layers": [origin], "rule": rule_name,
           "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
           "float_bytes": w.numel() * w.element_size()}
    quantized(gm)[name] = rec
    return rec


#: a linear layer whose dequantized weight would take more than this reads it in row chunks of at
#: most this size, so the float weight never exists whole (a vocabulary head: Qwen2-0.5B's
#: 151936 x 896 is 545 MB in float32)
CHUNK_BYTES = 16 * 2**20


def _reader_form(user: fx.Node, attr: fx.Node, dtype: str, w: torch.Tensor, adapted: bool) -> Optional[str]:
    """How ``user`` reads the quantized weight: ``"gather"`` (an embedding lookup of quantized
    rows, dequantized after the gather), ``"chunks"`` (a big linear layer's weight dequantized a
    row block at a time) or None (the whole weight dequantized). Adapted layers read the whole
    weight: merge and adapter initialization find their layer op as it was."""
    if adapted or dtype not in ROW_FORMATS or user.op != "call_function":
        return None
    if user.target is aten.embedding.default and user.args[0] is attr and attr not in user.args[1:]:
        return "gather"
    if (user.target is aten.linear.default and len(user.args) > 1 and user.args[1] is attr and w.dim() == 2
            and attr not in (user.args[0], *user.args[2:]) and w.numel() * w.element_size() > CHUNK_BYTES):
        return "chunks"
    return None


def _fused_reader(gm: fx.GraphModule, user: fx.Node, form: str, names: dict[str, str], dtype: str,
                  group_size: Optional[int], w: torch.Tensor, prov: Provenance) -> dict[str, Any]:
    """Replace reader ``user`` by its ``form`` (see :func:`_reader_form`) on the stored tensors."""
    g = GraphBuilder(gm, user.prev, prov, user.meta.get("nn_module_stack"))
    stored = {k: g.attr(n) for k, n in names.items()}
    if form == "gather":
        ids = user.args[1]
        index = g.call(aten.reshape.default, ids, [-1])
        device = stored["qdata"].meta["val"].device
        if index.meta["val"].device != device:  # a meta compile: the ids are real (retargeted on load)
            index = g.call(aten._to_copy.default, index, device=device)
        rows = take_rows(g, stored, index)
        x = dequantize(g, rows, dtype, (-1, *w.shape[1:]), group_size, w.dtype)
        sizes = [d if isinstance(d, int) else g.call(aten.sym_size.int, ids, i)
                 for i, d in enumerate(user.meta["val"].shape[:-1])]
        out = g.call(aten.view.default, x, [*sizes, int(w.shape[1])])
        chunks = 1
    else:
        x, bias = user.args[0], user.args[2] if len(user.args) > 2 else None
        rows = int(w.shape[0])
        chunks = -(-w.numel() * w.element_size() // CHUNK_BYTES)
        size = -(-rows // chunks)
        parts = []
        for start in range(0, rows, size):
            end = min(rows, start + size)
            wk = dequantize(g, slice_rows(g, stored, start, end), dtype, (end - start, *w.shape[1:]), group_size,
                            w.dtype)
            bk = g.call(aten.slice.Tensor, bias, 0, start, end) if bias is not None else None
            parts.append(g.call(aten.linear.default, x, wk, bk))
        out = g.call(aten.cat.default, parts, -1)
    user.replace_all_uses_with(out)
    gm.graph.erase_node(user)
    return {"node": out.name, "form": form, "chunks": chunks}


@register_pass
class QuantizeWeights(RewritePass):
    """Stores the weights of the layers the ``quantize`` rules select quantized (in place).

    Refuses (``PlanError``) a layer that a ``gp.Update`` rule of the same plan trains: a
    quantized tensor never trains."""

    name = "quantize_weights"

    def __init__(self, rules: Sequence[Quantize]) -> None:
        super().__init__([QuantizeRewrite(r) for r in rules])

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self._refuse_training(gm, ctx)
        return super().call(gm, ctx)

    def _refuse_training(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        ours = [r.rule for r in self.rules]  # type: ignore[attr-defined]
        updates = [r for r in (ctx.plan.rules if ctx.plan is not None else []) if r.key == "update"]
        # the layers as the plan saw them (an update pass that ran first may have sliced a
        # weight, so that its layer is no longer a plain layer op of the graph)
        layers = ({l.path: l for d in ctx.resolution.decisions for l in [d.layer]}.values()
                  if ctx.resolution is not None else find_layers(gm))
        role_map = roles(gm)
        problems = []
        for layer in layers:
            mine = [r for r in ours if r.select(layer) is None]
            if not mine:
                continue
            q = mine[0]
            if len(mine) > 1:
                raise PlanError(f"{layer.path} is claimed by two quantize rules: {mine[0].name} and {mine[1].name}; "
                                "narrow one of them with exclude= or a tighter targets")
            trains = [u.name for u in updates if u.select(layer) is None and getattr(u, "part", "all") == "all"]
            role = role_map.get(layer.weight)
            if trains or (role is not None and role.trainable):
                by = f"{', '.join(trains)} trains it" if trains else f"its weight has role {role.value}"
                problems.append(f"{q.name} and {by} on {layer.path}")
        if problems:
            raise PlanError("a quantized tensor never trains: " + "; ".join(problems) + ". Exclude these layers from "
                            "the quantize rule (exclude=...) or from the update rule, or put an adapter (gp.LoRA) "
                            "on the quantized layer instead")


class QuantizeMethod(AdapterMethod):
    """What ``compile`` runs for ``quantize`` rules (not an adapter: nothing to merge)."""

    name = "quantize"
    rule = Quantize
    mergeable = False

    def make_pass(self, rules: Sequence[Rule]) -> QuantizeWeights:
        return QuantizeWeights([r for r in rules if isinstance(r, Quantize)])


register_method(QuantizeMethod.name, QuantizeMethod())


def quantization_report(gm: fx.GraphModule) -> dict[str, Any]:
    """Bytes of the quantized weights (scales included) against the float weights they replace."""
    recs = quantized(gm)
    stored = sum(r["bytes"] for r in recs.values())
    floats = sum(r["float_bytes"] for r in recs.values())
    return {"weights": len(recs), "bytes": stored, "float_bytes": floats,
            "ratio": stored / floats if floats else 1.0,
            "requantized_after_merge": sorted(n for n, r in recs.items() if r.get("requantized_after_merge")),
            "by_dtype": {d: sum(1 for r in recs.values() if r["dtype"] == d) for d in DTYPES
                         if any(r["dtype"] == d for r in recs.values())}}


def dequantized_weight(gm: fx.GraphModule, name: str) -> torch.Tensor:
    """The float weight a quantized record stands for, computed eagerly with the graph's ops."""
    from .formats import EagerOps

    rec = quantized(gm)[name]
    tensors = {k: get_tensor(gm, n).detach() for k, n in rec["tensors"].items()}
    return dequantize(EagerOps(), tensors, rec["dtype"], tuple(rec["shape"]), rec["group_size"],
                      getattr(torch, rec["float_dtype"]))


class QuantizedWeights:
    """The stored form ``CompiledModel.load_base_weights`` converts a checkpoint's float weights
    to, one weight at a time (so the float model never exists in full): each quantized weight of
    the graph is read in float and quantized with its record's format."""

    def records(self, gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
        return {w: {"shape": tuple(r["shape"]), "dtype": getattr(torch, r["float_dtype"]),
                    "tensors": list(r["tensors"].values()), "outputs": list(r.get("outputs", []))}
                for w, r in quantized(gm).items()}

    def encode(self, gm: fx.GraphModule, name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        rec = quantized(gm)[name]
        out = {rec["tensors"][k]: t for k, t in quantize(w, rec["dtype"], rec["group_size"]).items()}
        for n, t in out.items():
            want = get_tensor(gm, n)
            if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                raise WeightsError(f"quantizing {name} gave {n} as {t.dtype}{list(t.shape)}, the graph holds "
                                   f"{want.dtype}{list(want.shape)}; compile again with this torchao version")
        return out

    def describe(self, gm: fx.GraphModule, name: str) -> str:
        return quantized(gm)[name]["dtype"]


register_weight_format("quantize", QuantizedWeights())
