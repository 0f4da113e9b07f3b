"""DoRA (Liu et al., 2024): weight-decomposed LoRA, as PEFT's ``use_dora=True`` computes it.

The adapted weight is ``W' = m * (W + s·BA) / ‖W + s·BA‖``: a trainable magnitude ``m`` (one
entry per output feature) times the direction of the LoRA-updated weight. The norm is taken per
output row of ``W`` in ``(out, in)`` layout (the paper's "column norm" of ``Wᵀ``; a convolution's
over its input channels and kernel, per output channel) and treated as a constant: it receives
no gradient (paper §4.3; PEFT detaches it too). Like PEFT, the graph keeps the base op and adds a
correction::

    y + (m/n - 1) * (y - bias) + (m/n) * s * B(A(x))          n = ‖W + s·(BA)‖ (no gradient)

which equals ``x W'ᵀ + bias``. With dropout, PEFT recomputes the base term on the dropped-out
input (``x_d Wᵀ``); so does this pass. On an embedding ``(num, dim)`` PEFT takes the norm per
embedding dimension, over the vocabulary, and the branch is ``(m/n)·(y + s·B(A[ids]))``
(no dropout, no bias).

Tensors (PEFT names and shapes, so state dicts are interchangeable): ``<path>.lora_A.weight``
``(r, in)``, ``<path>.lora_B.weight`` ``(out, r)`` and ``<path>.lora_magnitude_vector``
``(out,)``; a convolution's factors as LoRA's and magnitude ``(1, out, 1...)``; an embedding's
``lora_embedding_A`` ``(r, num)``, ``lora_embedding_B`` ``(dim, r)`` and magnitude ``(dim,)``.
Init: LoRA's factors and ``m = ‖W + s·BA‖`` (so a fresh adapter leaves outputs unchanged).
Merge writes ``W'`` into the weight exactly (PEFT's merge); the bias is untouched. Linear
(GPT-2's Conv1D included), Conv1d/2d/3d and embedding layers; a module called several times gets
the branch at every call. On a grouped convolution the norm is PEFT's, of
``W + s·reshape(B.view(-1, r) @ A.view(r, -1))`` -- for a grouped ``B`` not ``W + ΔW`` (a
warning says so) -- and the adapter does not merge (PEFT refuses too).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import GraphPeftWarning, PassError
from graphpeft.graph import GraphBuilder, Layer, Role, conv_groups, get_tensor, op_args, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .insert_lora import LoRA, LoRAMethod, _init_factors, lora_product  # LoRA's factors and initialisation
from .layer_rewrite import (LayerRewrite, LayerRewritePass, adapter_dropout, branch_builder, join_output, layer_bias,
                            layer_calls, layer_input, layer_weight, record_adapter)
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
        dropout: dropout probability on the adapter's input (training only; not on embeddings).
        use_rslora: scale by ``alpha / sqrt(r)``.
        init: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal, std
            ``1/r``, B zero) or ``"random"`` (B random too: a non-identity start, for tests).
    """

    key: ClassVar[str] = "dora"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")

    def check(self, layer: Layer) -> Optional[str]:
        if layer.kind == "conv" and conv_groups(layer.node) != 1:
            warnings.warn(f"dora: {layer.path} is a grouped convolution: its norm is PEFT's, of W + s·(B.view(-1, r) @ "
                          "A) reshaped to W, which for a grouped B is not W + ΔW; the adapter cannot merge (as in PEFT)",
                          GraphPeftWarning, stacklevel=2)
        return super().check(layer)


def out_axis(kind: str, fan_in_fan_out: bool) -> int:
    """The weight axis DoRA's magnitude runs along: output features (rows of ``(out, in)``,
    columns of GPT-2's ``(in, out)``, output channels of a convolution), or an embedding's
    dimensions (PEFT normalises an embedding's columns, over the vocabulary)."""
    return 1 if fan_in_fan_out or kind == "embedding" else 0


def weight_norm(weight: torch.Tensor, kind: str, fan_in_fan_out: bool) -> torch.Tensor:
    """‖W‖ over every axis but :func:`out_axis`, one entry per magnitude entry."""
    axis = out_axis(kind, fan_in_fan_out)
    return torch.linalg.vector_norm(weight, dim=[d for d in range(weight.dim()) if d != axis])


def magnitude_shape(layer: Layer) -> tuple[int, ...]:
    """PEFT's shape of ``lora_magnitude_vector``: ``(out,)``, a convolution's ``(1, out, 1...)``."""
    if layer.kind == "conv":
        gm = layer.node.graph.owning_module
        return (1, layer.out_features) + (1,) * (get_tensor(gm, layer.weight).dim() - 2)
    return (layer.out_features,)


class DoRARewrite(LayerRewrite):
    """Rewrites ``y = op(x, W, b)`` into ``y + (m/n - 1)(y - b) + (m/n)·s·B(A(x))`` (an
    embedding: ``y + (m/n - 1)·y + (m/n)·s·B(A[ids])``); a module called several times gets the
    branch at every call, reading the same tensors."""

    rule: DoRA

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        a, b = _init_factors(layer, weight, rule, ctx.seed)
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        delta = _norm_delta(a, b, rule.scaling, layer.kind, layer.fan_in_fan_out, weight.shape)
        with torch.no_grad():
            m = weight_norm(weight.detach() + delta, layer.kind, layer.fan_in_fan_out).reshape(magnitude_shape(layer))
        values = {"A": a, "B": b, "magnitude": m}
        joins = []
        for i, call in enumerate(layer_calls(layer)):
            aid, y, g = branch_builder(gm, call, ctx, InsertDoRA.name, rule)
            nodes = {k: g.param(n, values[k], Role.ADAPTER) if i == 0 else g.attr(n) for k, n in names.items()}
            joins.append(join_output(g, y, _dora_branch(g, call, y, nodes, rule)))
        extra = {"joins": [j.name for j in joins]} if len(joins) > 1 else {}
        record_adapter(gm, aid, layer, ctx, rule, DoRAMethod.name, names, joins[0], scaling=rule.scaling, **extra)


def _dora_branch(g: GraphBuilder, layer: Layer, y: fx.Node, nodes: dict[str, fx.Node], rule: DoRA) -> fx.Node:
    """DoRA's correction at one call (what is added to ``y``)."""
    s = rule.scaling
    w_node = layer_weight(layer)
    # n = ‖W + s·BA‖ along the magnitude, built from detached factors: no gradient flows through
    # the norm (DoRA §4.3), and the training compiler has no backward to prune
    a_d, b_d = (g.call(aten.detach.default, nodes[k]) for k in ("A", "B"))
    w_shape = list(get_tensor(g.gm, layer.weight).shape)
    if layer.kind == "conv":
        r = get_tensor(g.gm, nodes["A"].target).shape[0]
        # PEFT's form: B.view(-1, r) @ A.view(r, -1) (for a grouped B a reshuffle, not ΔW)
        ba = g.call(aten.mm.default, g.call(aten.view.default, b_d, [-1, r]),
                    g.call(aten.view.default, a_d, [r, -1]))
        delta = g.call(aten.view.default, ba, w_shape)
    else:
        ba = g.call(aten.mm.default, b_d, a_d)  # (out, in); an embedding's (dim, num)
        delta = g.call(aten.t.default, ba) if layer.fan_in_fan_out or layer.kind == "embedding" else ba
    combined = g.call(aten.add.Tensor, w_node, g.call(aten.mul.Tensor, delta, s))
    axis = out_axis(layer.kind, layer.fan_in_fan_out)
    norm = g.call(aten.linalg_vector_norm.default, combined, 2, [d for d in range(len(w_shape)) if d != axis])
    if layer.kind == "conv":
        norm = g.call(aten.view.default, norm, [1, -1] + [1] * (len(w_shape) - 2))
    mag_scale = g.call(aten.div.Tensor, nodes["magnitude"], norm)
    mag_scale.meta["graphpeft"]["part"] = "magnitude_scale"

    if layer.kind == "embedding":
        base, x = y, layer.node.args[1]  # PEFT: no dropout on an embedding, and no bias
    else:
        x = adapter_dropout(g, layer_input(layer), rule.dropout)
        base = _base_term(g, layer, y, x, w_node, dropped=rule.dropout > 0)
    lora = g.call(aten.mul.Tensor, lora_product(g, layer, x, nodes["A"], nodes["B"]), s)
    base_term = g.call(aten.mul.Tensor, g.call(aten.sub.Tensor, mag_scale, 1.0), base)
    return g.call(aten.add.Tensor, base_term, g.call(aten.mul.Tensor, lora, mag_scale))


def _base_term(g: GraphBuilder, layer: Layer, y: fx.Node, x: fx.Node, w_node: fx.Node, dropped: bool) -> fx.Node:
    """The layer's output without its bias: with dropout active PEFT recomputes it on the
    dropped-out input (``x_d Wᵀ``), else it is ``y - b``."""
    if dropped:
        if layer.kind == "conv":
            c = op_args(layer.node)
            return g.call(layer.node.target, x, w_node, None, c["stride"], c["padding"], c["dilation"], c["groups"])
        if layer.fan_in_fan_out:
            return g.call(aten.mm.default, x, w_node)
        return g.call(aten.linear.default, x, w_node)
    bias = layer_bias(layer)
    if bias is None:
        return y
    if layer.kind == "conv":
        bias = g.call(aten.view.default, bias, [1, -1] + [1] * (get_tensor(g.gm, layer.weight).dim() - 2))
    return g.call(aten.sub.Tensor, y, bias)


def _norm_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, kind: str, fan_in_fan_out: bool,
                shape: Sequence[int]) -> torch.Tensor:
    """The ``s·BA`` DoRA's norm reads, as PEFT forms it: ΔW, except for a grouped convolution,
    whose ``B.view(-1, r) @ A.view(r, -1)`` PEFT reshapes to the weight as it is."""
    if kind == "conv" and b.shape[1] != a.shape[0]:
        r = a.shape[0]
        return (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(shape) * scaling
    return LoRAMethod.factor_delta(a, b, scaling, kind, fan_in_fan_out, shape)


def tensor_names(layer: Layer) -> dict[str, str]:
    """PEFT's state-dict keys for a DoRA layer."""
    names = {"A": f"{layer.path}.lora_A.weight", "B": f"{layer.path}.lora_B.weight"}
    if layer.kind == "embedding":
        names = {"A": f"{layer.path}.lora_embedding_A", "B": f"{layer.path}.lora_embedding_B"}
    return {**names, "magnitude": f"{layer.path}.lora_magnitude_vector"}


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
        # PEFT's merge: W' = (m / ‖W + ΔW‖) · (W + ΔW), the norm along the magnitude's axis. The
        # norm is of the base weight as the forward reads it: if other adapters on this layer
        # were merged first (named adapters stacked), W here already holds them but the norm not
        t = record["tensors"]
        weight = get_tensor(gm, record["weight"]).detach()
        base = unmerged_weight(gm, record["weight"])
        a, b = get_tensor(gm, t["A"]).detach(), get_tensor(gm, t["B"]).detach()
        m = get_tensor(gm, t["magnitude"]).detach().flatten()
        kind, fiifo = record["kind"], record["fan_in_fan_out"]
        if kind == "conv" and b.shape[1] != a.shape[0]:
            raise PassError("merge_adapters", f"the DoRA adapter on {record['layer']} is on a grouped convolution: "
                            "its update cannot be folded into the grouped weight (PEFT cannot merge it either); "
                            "export it with merged=False")
        delta = LoRAMethod.factor_delta(a, b, record["scaling"], kind, fiifo, weight.shape)
        norm = weight_norm(base + delta, kind, fiifo)
        shape = [1] * weight.dim()
        shape[out_axis(kind, fiifo)] = -1
        return {record["weight"]: (m / norm).reshape(shape) * (weight + delta)}

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        # DoRA's merge is not additive; ΔW = W' - W for callers that want a difference
        weight = get_tensor(gm, record["weight"]).detach()
        return self.merged_tensors(gm, record)[record["weight"]] - weight


register_method(DoRAMethod.name, DoRAMethod())
