"""Reparameterise a weight as a trainable row slice plus a frozen rest (channel-fraction update).

``gp.Update(targets=..., fraction=f)`` trains ``k = round(f * out)`` output channels of each
matched weight. Masking the gradient of a full trainable weight would still make autograd
compute the whole ``dW``; instead the layer op is split so that only the slice is a trainable
tensor::

    y = linear(x, W, b)                      y_s = linear(x, W[rows])       # trainable-slice (k, in)
                                  ──▶        y_r = linear(x, W[rest])       # frozen (out - k, in)
                                             y   = cat(y_s, y_r)[..., order] + b

``order`` (a buffer) puts the channels back in place when the rows are not the first ``k``; with
``select="first"`` the concatenation is already in order and no permutation is added. The
backward computes ``dW_s = dy_s^T x`` (k rows) and, where something below trains, the input
gradient through both halves; the frozen rows' weight gradient is never built. Linear,
GPT-2's ``addmm(b, x, W)`` (``W`` stored ``(in, out)``: the slice is a column block) and
ungrouped convolutions (output channels along dim 1) are supported.

Tensors: ``<weight>_slice`` (:attr:`Role.TRAINABLE_SLICE`), ``<weight>_rest`` (frozen) and
``<layer>.slice_order`` (buffer), next to the original names; the original weight is removed.
``gm.meta["graphpeft"]["slices"][layer path]`` records the rows and names, which
``reassemble_slices`` (run by ``merge()``) uses to put the weight back exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import PlanError
from graphpeft.graph import (GraphBuilder, Layer, Provenance, Role, adapters, find_layers, get_tensor, graph_meta,
                             op_args, remove_tensor, roles, set_role)
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

from ..adapters.layer_rewrite import layer_bias, layer_input, layer_weight

if TYPE_CHECKING:
    from .update_parameters import Update

aten = torch.ops.aten

#: ``gm.meta["graphpeft"]["slices"]``: layer path -> record of a sliced weight
SLICES_META = "slices"
#: ``ctx.options["row_scores"]``: weight name -> per-row scores from the gradient probe
ROW_SCORES = "row_scores"


def rows_to_train(fraction: Optional[float], out_features: int) -> int:
    """How many output channels a ``fraction`` trains: ``round(fraction * out)``, at least one."""
    if fraction is None:
        return out_features
    return min(out_features, max(1, int(round(float(fraction) * out_features))))


def slices_layer(rule: "Update", layer: Layer) -> bool:
    """Whether ``rule`` trains a proper row slice of ``layer``'s weight (this pass's job); a
    fraction that rounds to every row is a whole-tensor update (``update_parameters``'s job)."""
    return (rule.sliced and layer.kind in ("linear", "conv")
            and rows_to_train(rule.fraction, layer.out_features) < layer.out_features)


def row_norms(weight: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """L2 norm of each output channel of a weight (a column when stored ``(in, out)``)."""
    w = weight.detach().double()
    if fan_in_fan_out:
        return w.norm(dim=0)
    return w.flatten(1).norm(dim=1)


def choose_rows(scores: Optional[torch.Tensor], out_features: int, k: int) -> list[int]:
    """The ``k`` rows to train, ascending: the first ``k`` without scores, else the ``k`` with
    the largest scores (ties to the lower index, so the choice is deterministic)."""
    if scores is None:
        return list(range(k))
    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return sorted(int(i) for i in order)


class SliceRowsRewrite(RewriteRule):
    """Match a layer a fraction-update rule selects; rewrite it into slice + rest + reassembly."""

    def __init__(self, rule: "Update") -> None:
        self.rule = rule
        self.name = rule.name
        self._layers: dict[fx.Node, Layer] = {}

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if not self._layers:
            self._layers = {l.node: l for l in find_layers(gm)}
        layer = self._layers.get(node)
        # not a layer, not selected (update_parameters records the reason, once), or a fraction
        # that covers every row (a whole-tensor update, also update_parameters's)
        if layer is None or self.rule.select(layer) is not None or not slices_layer(self.rule, layer):
            return None
        return MatchResult.success(self.name, node, layer.path, layer=layer)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        layer: Layer = match.bindings["layer"]
        if any(rec["layer"] == layer.path for rec in adapters(gm).values()):
            # an adapter's merge folds into the original weight, which slicing removes
            raise PlanError(f"{self.name} slices {layer.path}, which also has an adapter; a channel-fraction update "
                            "cannot share a layer with an adapter: exclude the layer from one rule, or update it "
                            "fully (no fraction)")
        if layer.path in graph_meta(gm).get(SLICES_META, {}):
            return "the layer is already sliced by another update rule"
        if not get_tensor(gm, layer.weight).is_floating_point():
            return "the weight is not floating point (quantized weights cannot be trained)"
        return self.rule.check(layer)

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        y = layer.node
        weight = get_tensor(gm, layer.weight).detach()
        out_features = layer.out_features
        k = rows_to_train(rule.fraction, out_features)
        if rule.selection == "first":
            scores = None
        elif rule.selection == "magnitude":
            scores = row_norms(weight, layer.fan_in_fan_out)
        else:
            scores = ctx.options.get(ROW_SCORES, {}).get(layer.weight)
            if scores is None:
                raise PlanError(f"{rule.name}: no gradient probe scores for {layer.weight}; the probe_gradients "
                                "pass must run first (compile() runs it for select='gradient')")
        rows = choose_rows(scores, out_features, k)
        rest = [i for i in range(out_features) if i not in set(rows)]
        dim = 1 if layer.fan_in_fan_out else 0  # where output channels sit in the stored weight
        idx_rows, idx_rest = torch.tensor(rows), torch.tensor(rest)
        w_slice = weight.index_select(dim, idx_rows).contiguous()
        w_rest = weight.index_select(dim, idx_rest).contiguous()

        prov = Provenance(SliceRows.name, rule.name, layer.path)
        g = GraphBuilder(gm, y, prov)
        names = {"slice": f"{layer.weight}_slice", "rest": f"{layer.weight}_rest", "order": None}
        x = layer_input(layer)
        ws = _part(g.param(names["slice"], w_slice, Role.TRAINABLE_SLICE), "slice")
        wr = _part(g.param(names["rest"], w_rest, Role.FROZEN), "rest")
        conv_args: dict[str, Any] = {}
        if layer.kind == "conv":
            a = op_args(y)
            conv_args = {k_: a[k_] for k_ in ("stride", "padding", "dilation", "groups")}
            tail = (conv_args["stride"], conv_args["padding"], conv_args["dilation"], conv_args["groups"])
            ys = g.call(y.target, x, ws, None, *tail)
            yr = g.call(y.target, x, wr, None, *tail)
            cat_dim = 1
        elif layer.fan_in_fan_out:
            ys = g.call(aten.mm.default, x, ws)
            yr = g.call(aten.mm.default, x, wr)
            cat_dim = -1
        else:
            ys = g.call(aten.linear.default, x, ws)
            yr = g.call(aten.linear.default, x, wr)
            cat_dim = -1
        _part(ys, "slice")
        _part(yr, "rest")
        out = _part(g.call(aten.cat.default, [ys, yr], cat_dim), "join")
        if rows != list(range(k)):
            position = torch.empty(out_features, dtype=torch.long)
            position[idx_rows] = torch.arange(k)
            position[idx_rest] = torch.arange(k, out_features)
            names["order"] = f"{layer.path}.slice_order"
            order = _part(g.param(names["order"], position, Role.BUFFER), "order")
            out = _part(g.call(aten.index_select.default, out, cat_dim, order), "join")
        bias_node = layer_bias(layer)
        if bias_node is not None:
            b = _part(g.attr(layer.bias), "bias")
            if layer.kind == "conv":
                b = _part(g.call(aten.view.default, b, [-1] + [1] * (weight.dim() - 2)), "bias")
            out = _part(g.call(aten.add.Tensor, out, b), "join")

        if layer.bias:
            set_role(gm, layer.bias, Role.TRAINABLE)  # the bias of a sliced layer trains whole
        graph_meta(gm).setdefault(SLICES_META, {})[layer.path] = {
            "layer": layer.path,
            "kind": layer.kind,
            "op": str(y.target),
            "fan_in_fan_out": layer.fan_in_fan_out,
            "weight": layer.weight,
            "bias": layer.bias,
            "weight_shape": list(weight.shape),
            "rows": rows,
            "out_features": out_features,
            "tensors": names,
            "conv_args": conv_args,
            "input": x.name,
            "output": out.name,
            "node_name": y.name,
            "module_stack": dict(y.meta.get("nn_module_stack") or {}),
            "rule": rule.name,
            "select": rule.selection,
            "fraction": rule.fraction,
        }
        old_weight = layer_weight(layer)
        y.replace_all_uses_with(out)
        gm.graph.erase_node(y)
        for node in (old_weight, bias_node):
            if node is not None and not node.users:
                gm.graph.erase_node(node)
        if not any(n.op == "get_attr" and n.target == layer.weight for n in gm.graph.nodes):
            remove_tensor(gm, layer.weight)


def _part(node: fx.Node, part: str) -> fx.Node:
    node.meta["graphpeft"]["part"] = part
    return node


@register_pass
class SliceRows(RewritePass):
    """Splits each layer a fraction-update rule selects into a trainable row slice and a frozen
    rest (see the module docstring); in place."""

    name = "slice_rows"

    def __init__(self, rules: Sequence["Update"]) -> None:
        super().__init__([SliceRowsRewrite(r) for r in rules if r.sliced])

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        from graphpeft.errors import VerificationError

        role_map = roles(gm)
        for path, rec in graph_meta(gm).get(SLICES_META, {}).items():
            if role_map.get(rec["tensors"]["slice"]) != Role.TRAINABLE_SLICE:
                raise VerificationError(f"the slice of {path} is not a trainable-slice tensor")
            if role_map.get(rec["tensors"]["rest"]) != Role.FROZEN:
                raise VerificationError(f"the rest of {path} is not frozen")
