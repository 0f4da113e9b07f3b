"""LoRA on a parameter itself (PEFT's ``target_parameters``, its ``lora.ParamWrapper``): the graph
reads ``W + ΔW`` wherever it read ``W``, whatever op reads it (MoE experts' grouped products,
a weight read without calling its module).

Layout, as PEFT's ``ParamWrapper`` (peft 0.21): a 2-D ``W (out, in)`` gets ``lora_A.weight
(r, in)`` and ``lora_B.weight (out, r)``, ``ΔW = s·B@A``. A 3-D expert stack ``(E, out, in)``
(transformers 5.x Mixtral / Qwen2-MoE / OLMoE ``gate_up_proj``, ``down_proj``) gets
``lora_A.weight (r·E, in)``, rows expert-major (expert ``e``'s ``A`` is rows ``e·r .. e·r+r-1``),
and ``lora_B.weight (out, r·E)``, columns expert-minor (expert ``e``'s ``B`` is columns
``k·E + e``); ``ΔW[e] = s·B_e@A_e``. A module with ``is_transposed`` stores ``(E, in, out)``:
then ``ΔW[e] = (s·B_e@A_e)ᵀ``. The forward folds it as PEFT does, ``baddbmm(W, lhs, rhs, alpha=s)``.

PEFT names the tensors after the module, not the parameter (``experts.lora_A.weight``); two
parameters of one module nest wrappers, the earlier one under ``base_layer.`` (the folder keys
are mapped in ``graphpeft.peft_interop``; records keep the parameter's model ``order``). Ours
are named after the parameter (``experts.lora_parameters.gate_up_proj.lora_A.weight``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import (META_KEY, GraphBuilder, Layer, Provenance, Role, adapter_id, adapter_name_of, adapters,
                             find_parameters, get_tensor, roles, scoped_tensor_name)
from graphpeft.infra import PassContext
from graphpeft.rewrite import MatchResult, RewriteRule

from .layer_rewrite import layer_generator, layer_output, record_adapter

aten = torch.ops.aten

#: the submodule of a parameter's module that holds the adapters of its parameters
PARAMS_MODULE = "lora_parameters"
#: what PEFT's ParamWrapper refuses, rule option -> why (checked by the LoRA rule)
UNSUPPORTED = {"dropout": "dropout cannot be factored out of x when the update is added to the parameter",
               "lora_bias": "a parameter has no bias for B's bias to join"}


def parameter_reason(layer: Layer) -> Optional[str]:
    """Why LoRA cannot go on the parameter ``layer`` (kind ``"parameter"``), or None."""
    gm = layer.node.graph.owning_module
    if gm is None:
        return None
    for rec in adapters(gm).values():
        if rec["kind"] != "parameter" and rec["weight"] == layer.weight:
            return f"{rec['layer']} already has an adapter on this weight; target the module or the parameter, not both"
    return None


def tensor_names(path: str) -> dict[str, str]:
    """Our names of the factors of the adapter on parameter ``path`` (``m.p`` ->
    ``m.lora_parameters.p.lora_A.weight``: a parameter cannot own tensors, its module does)."""
    module, _, param = path.rpartition(".")
    prefix = f"{module}.{PARAMS_MODULE}.{param}" if module else f"{PARAMS_MODULE}.{param}"
    return {"A": f"{prefix}.lora_A.weight", "B": f"{prefix}.lora_B.weight"}


def experts_of(weight: torch.Tensor) -> int:
    """PEFT's ``num_experts``: the leading size of a 3-D parameter, 1 for a 2-D one."""
    return weight.shape[0] if weight.dim() == 3 else 1


def init_factors(layer: Layer, weight: torch.Tensor, r: int, init: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (r·E, in)`` and ``B (out, r·E)`` initialised as PEFT's (A Kaiming-uniform or normal
    with std ``1/r``; B zero, or Kaiming-uniform too with ``init="random"``)."""
    gen = layer_generator(seed, layer)
    e = experts_of(weight)
    a, b = torch.empty(r * e, layer.in_features), torch.zeros(layer.out_features, r * e)
    if init == "gaussian":
        torch.nn.init.normal_(a, std=1 / r, generator=gen)
    else:
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    if init == "random":
        torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)
    return a.to(weight), b.to(weight)


def delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float, shape: Sequence[int],
                 transposed: bool) -> torch.Tensor:
    """``ΔW`` in the parameter's layout ``shape``, as PEFT's ``ParamWrapper.get_delta_weight``."""
    if len(shape) == 2:
        return (b @ a) * scaling
    e = shape[0]
    a3 = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
    b3 = b.reshape(b.shape[0], -1, e)  # (out, r, E)
    return torch.einsum("ore,eri->eio" if transposed else "ore,eri->eoi", b3, a3) * scaling


class LoRAParameterRewrite(RewriteRule):
    """Rewrites the reads of a parameter ``W`` the rule's ``target_parameters`` select into
    reads of ``W + ΔW`` (one join per parameter, at its first read)."""

    def __init__(self, rule: Any, pass_name: str) -> None:
        self.rule = rule
        self.name = rule.name
        self.pass_name = pass_name
        self._params: dict[fx.Node, Layer] = {}

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if not self._params:
            self._params = {p.node: p for p in find_parameters(gm)}
        layer = self._params.get(node)
        if layer is None:
            return None
        why = self.rule.select(layer)
        if why is not None:
            return None  # every parameter is a candidate: only the selected ones are worth a line
        return MatchResult.success(self.name, node, layer.path, layer=layer)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        layer: Layer = match.bindings["layer"]
        if any(r["layer"] == layer.path and adapter_name_of(r) == ctx.adapter_name for r in adapters(gm).values()):
            return "the parameter already has an adapter"
        return self.rule.check(layer)

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        a, b = init_factors(layer, weight, rule.r, rule.init, ctx.seed)
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer.path).items()}
        aid = adapter_id(layer.path, ctx.adapter_name)
        out = layer_output(layer)  # the read, or the last join of adapters already on it
        stack = next((u.meta.get("nn_module_stack") for u in layer.node.users), None)
        g = GraphBuilder(gm, out, Provenance(self.pass_name, rule.name, layer.path, adapter=aid), module_stack=stack)
        a_node = g.param(names["A"], a, Role.ADAPTER)
        b_node = g.param(names["B"], b, Role.ADAPTER)
        joined = _join(g, out, a_node, b_node, weight, rule.scaling, layer)
        joined.meta[META_KEY]["part"] = "join"
        for reader in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == layer.weight]:
            if reader is not layer.node and META_KEY not in reader.meta:
                reader.replace_all_uses_with(joined)  # other reads of W (a traced graph may repeat them)
        out.replace_all_uses_with(joined, delete_user_cb=lambda user: user not in g.created)
        record_adapter(gm, aid, layer, ctx, rule, "lora", names, joined, scaling=rule.scaling,
                       experts=experts_of(weight), order=list(roles(gm)).index(layer.weight))


def _join(g: GraphBuilder, w: fx.Node, a: fx.Node, b: fx.Node, weight: torch.Tensor, scaling: float,
          layer: Layer) -> fx.Node:
    """``W + ΔW`` as PEFT's forward computes it: ``W + (B@A)·s`` for a 2-D parameter, one
    ``baddbmm`` over the experts for a 3-D one."""
    if weight.dim() == 2:
        return g.call(aten.add.Tensor, w, g.call(aten.mul.Tensor, g.call(aten.mm.default, b, a), scaling))
    e = weight.shape[0]
    a3 = g.call(aten.view.default, a, [e, -1, layer.in_features])  # (E, r, in)
    b3 = g.call(aten.permute.default, g.call(aten.view.default, b, [layer.out_features, -1, e]), [2, 0, 1])
    if layer.fan_in_fan_out:  # stored (E, in, out): ΔWᵀ = Aᵀ Bᵀ
        lhs, rhs = g.call(aten.transpose.int, a3, -2, -1), g.call(aten.transpose.int, b3, -2, -1)
    else:
        lhs, rhs = b3, a3
    return g.call(aten.baddbmm.default, w, lhs, rhs, beta=1, alpha=scaling)
