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
embeddings A zero and B normal), so a fresh adapter leaves outputs unchanged. ``lora_bias=True``
(PEFT's option) gives B a bias ``lora_B.bias`` ``(out,)``, zero at init; the branch is
``scaling * (B(A(x)) + b_B)`` and merge adds ``scaling * b_B`` to the layer's bias.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import GraphPeftWarning, PassError, PlanError
from graphpeft.graph import (GraphBuilder, Layer, Role, conv_groups, find_layers, get_tensor, op_args,
                             scoped_tensor_name)
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_bool, check_choice, check_number, check_positive_int, check_probability
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult
from graphpeft.task_arithmetic import COMBINATIONS, combine as combine_tensors

from .lora_parameters import UNSUPPORTED, LoRAParameterRewrite, delta_weight as parameter_delta, parameter_reason
from .layer_rewrite import (LayerRewrite, LayerRewritePass, adapter_dropout, branch_builder, join_output, layer_calls,
                            layer_generator, layer_input, plain_conv, record_adapter, tied_weights_reason,
                            warn_large_rank)

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
        lora_bias: give B a trainable bias (PEFT's ``lora_bias``); merging adds it, scaled,
            to the layer's bias. Linear and conv layers; plain LoRA only.
        target_parameters: parameters to adapt themselves (PEFT's ``target_parameters``; names
            matched as a ``targets`` list: ``["experts.gate_up_proj"]``): the graph reads
            ``W + ΔW`` where it read ``W``, 2-D or 3-D (MoE expert stacks, one ``A``/``B`` block
            per expert; see ``lora_parameters``). ``targets`` may then be left out. Plain LoRA
            without dropout or ``lora_bias`` (PEFT's ``ParamWrapper`` refuses them).
    """

    key: ClassVar[str] = "lora"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    lora_bias: bool = False
    target_parameters: Optional[Sequence[str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_target_parameters()
        check_positive_int(self, "r")
        check_number(self, "alpha", "dropout")
        check_probability(self, "dropout")
        check_bool(self, "use_rslora", "lora_bias")
        check_choice(self, "init", INITS)
        if self.lora_bias and self.key != "lora":
            raise PlanError(f"{self.key}: lora_bias is an option of plain LoRA (PEFT has it for LoRA only, not DoRA)")

    def _check_target_parameters(self) -> None:
        tp = self.target_parameters
        if tp is None:
            return
        if (not isinstance(tp, (list, tuple)) or not tp or not all(isinstance(t, str) and t for t in tp)):
            raise PlanError(f"{self.key}: target_parameters must be a non-empty list of parameter names "
                            f"(['experts.gate_up_proj']), got {tp!r}")
        self.target_parameters = list(tp)
        if self.key != "lora":
            raise PlanError(f"{self.key}: target_parameters is an option of plain LoRA (PEFT's ParamWrapper refuses "
                            "DoRA and other variants); use gp.LoRA for the parameters")
        for option, why in UNSUPPORTED.items():
            if getattr(self, option):
                raise PlanError(f"{self.key}: {option} does not work with target_parameters ({why}; PEFT refuses it "
                                "too); put the parameters in a rule of their own without it")

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Rule":
        if isinstance(body, dict) and body.get("target_parameters") and not {"targets", "target_modules"} & set(body):
            body = {**body, "targets": ""}  # parameters only: no layer targets
        return super().from_body(body)

    @property
    def name(self) -> str:
        if not self.target_parameters:
            return super().name
        layers = super().name[len(self.key) + 1:-1]
        return f"{self.key}[{layers + ';' if layers else ''}params:{','.join(self.target_parameters)}]"

    @property
    def selects_parameters(self) -> bool:
        return bool(self.target_parameters)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def select(self, layer: Layer) -> Optional[str]:
        if layer.kind == "parameter":
            return self._select_parameter(layer)
        why = super().select(layer)
        if why is not None and self.key == "lora" and is_attention_out_proj(layer):
            # PEFT's LoRA on an nn.MultiheadAttention adapts its in_proj and its out_proj together
            if super().select(dataclasses.replace(layer, path=layer.path.rsplit(".", 1)[0])) is None:
                return None
        return why

    def _select_parameter(self, layer: Layer) -> Optional[str]:
        wanted = self.target_parameters or []
        if not any(layer.path == t or layer.path.endswith("." + t) for t in wanted):
            return f"parameter does not match target_parameters {wanted!r}"
        layers = self.layers if isinstance(self.layers, (list, tuple)) or self.layers is None else [self.layers]
        if layers is not None and layer.layer_index not in {i if i >= 0 else (layer.deepest_index or 0) + 1 + i
                                                            for i in layers}:
            return f"layer index {layer.layer_index} is not in layers={list(layers)}"
        return None

    def _module_also_selected(self, param: Layer) -> Optional[str]:
        """Why ``param`` cannot take LoRA when ``targets`` also selects a layer computing with it."""
        gm = param.node.graph.owning_module
        both = [l.path for l in (find_layers(gm) if gm is not None else []) if l.weight == param.weight
                and self.select(l) is None]
        if both:
            return (f"targets also selects {both[0]}, whose weight this is: one adapter per weight (PEFT would stack "
                    "two); drop it from targets or from target_parameters")
        return None

    def check(self, layer: Layer) -> Optional[str]:
        if layer.kind == "parameter":
            return parameter_reason(layer) or self._module_also_selected(layer)
        warn_large_rank(self.key, self.r, layer)  # PEFT allows r > min(in, out): a warning, not a refusal
        # a module called several times: LoRA and DoRA put a branch at each call
        reason = tied_weights_reason(layer, calls_ok=self.key in ("lora", "dora"))
        if reason is None and self.key == "lora" and is_attention_out_proj(layer):
            reason = _packed_in_proj_reason(layer)
        groups = conv_groups(layer.node) if layer.kind == "conv" else 1
        if reason is None and self.r % groups:
            reason = (f"the convolution has groups={groups} and r={self.r} is not a multiple of it (PEFT's lora_B "
                      f"is a grouped convolution too); use r = {groups * max(1, self.r // groups)} or another multiple")
        if reason is None and self.lora_bias:
            if layer.kind == "embedding":
                reason = "lora_bias is not supported on embedding layers (PEFT refuses it too)"
            elif layer.bias is None:
                warnings.warn(f"lora: lora_bias=True on {layer.path}, which has no bias: the adapter trains and "
                              "exports, but cannot be merged (as in PEFT)", GraphPeftWarning, stacklevel=2)
        return reason


class LoRARewrite(LayerRewrite):
    """Rewrites one layer op ``y = op(x, W)`` into ``y + scaling * B(A(dropout(x)))``.

    ``LayerRewrite`` supplies match (the layer ops the rule selects, with the reason for the
    others) and check (no second adapter of the same name, float weights, ``LoRA.check``). A
    module called several times (ALBERT's shared layers) gets one adapter, as in PEFT: the same
    ``A`` and ``B`` in a branch at every call (each with its own dropout), one record whose
    ``joins`` lists them all."""

    rule: LoRA

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        a, b = _init_factors(layer, weight, rule, ctx.seed)
        b_bias = _init_bias(layer, weight, rule, ctx.seed) if rule.lora_bias else None
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in _tensor_names(layer).items()}
        tensors = {"A": names["A"], "B": names["B"]}
        if b_bias is not None:
            tensors["B_bias"] = scoped_tensor_name(f"{layer.path}.lora_B.bias", ctx.adapter_name)
        values = {"A": a, "B": b, "B_bias": b_bias}
        joins = []
        for i, call in enumerate(layer_calls(layer)):
            # several named adapters may adapt one layer: the id and tensor names carry the name,
            # and out is y or the last adapter joined onto it
            aid, out, g = branch_builder(gm, call, ctx, InsertLoRA.name, rule)
            nodes = {k: g.param(n, values[k], Role.ADAPTER) if i == 0 else g.attr(n) for k, n in tensors.items()}
            joins.append(_branch(g, call, out, nodes, rule))
        extra: dict[str, Any] = {"bias": layer.bias} if b_bias is not None else {}
        if len(joins) > 1:
            extra["joins"] = [j.name for j in joins]
        record_adapter(gm, aid, layer, ctx, rule, LoRAMethod.name, tensors, joins[0], scaling=rule.scaling, **extra)


def _branch(g: GraphBuilder, layer: Layer, out: fx.Node, nodes: dict[str, fx.Node], rule: LoRA) -> fx.Node:
    """``out + scaling * B(A(dropout(x)))`` at one call of ``layer`` (B with its bias under
    ``lora_bias``); returns the join."""
    if layer.kind == "embedding":
        x = layer.node.args[1]  # the ids: PEFT has no dropout on an embedding's branch
    else:
        # PEFT merges nn.MultiheadAttention's adapters into its weights for the forward: no dropout
        x = adapter_dropout(g, layer_input(layer), 0.0 if is_attention(layer) else rule.dropout)
    up = lora_product(g, layer, x, nodes["A"], nodes["B"], nodes.get("B_bias"))
    return join_output(g, out, g.call(aten.mul.Tensor, up, rule.scaling))


def is_attention(layer: Layer) -> bool:
    """Whether ``layer`` is a projection of an ``nn.MultiheadAttention`` (its in_proj or out_proj)."""
    return layer.module_class == "MultiheadAttention"


def is_attention_out_proj(layer: Layer) -> bool:
    """Whether ``layer`` is the ``out_proj`` of an ``nn.MultiheadAttention``."""
    return is_attention(layer) and layer.path.endswith(".out_proj")


def _packed_in_proj_reason(out_proj: Layer) -> Optional[str]:
    """Why LoRA cannot take an nn.MultiheadAttention whose in_proj is not one matmul (cross
    attention, or kdim/vdim: q, k and v are projected by slices of the weight), or None."""
    gm = out_proj.node.graph.owning_module
    parent = out_proj.path.rsplit(".", 1)[0]
    if gm is None or any(l.path == parent for l in find_layers(gm)):
        return None
    return (f"the in_proj of {parent} is not one matmul here (cross-attention or kdim/vdim: q, k and v are "
            "projected by slices of in_proj_weight); graphpeft adapts nn.MultiheadAttention in self-attention "
            "(query is key is value) only; exclude it or target out_proj alone")


def lora_product(g: GraphBuilder, layer: Layer, x: fx.Node, a_node: fx.Node, b_node: fx.Node,
                 b_bias: Optional[fx.Node] = None) -> fx.Node:
    """``B(A(x))`` in PEFT's form for ``layer``'s kind (unscaled): linear layers two linears, an
    embedding a lookup of ``Aᵀ`` by the ids ``x`` then ``B``, a convolution ``A`` like the
    layer's (kernel, stride, padding, ungrouped) then a 1x1 ``B`` with the layer's groups."""
    y = layer.node
    if layer.kind == "embedding":
        a_t = g.call(aten.t.default, a_node)
        low = g.call(aten.embedding.default, a_t, x, op_args(y)["padding_idx"])
        return g.call(aten.linear.default, low, b_node)
    bias = [b_bias] if b_bias is not None else []
    if layer.kind == "conv":
        c = op_args(y)
        low = g.call(y.target, x, a_node, None, c["stride"], c["padding"], c["dilation"], 1)
        nd = get_tensor(g.gm, layer.weight).dim() - 2
        ones = [1] * nd
        return g.call(plain_conv(y.target), low, b_node, b_bias, ones, [0] * nd, ones, c["groups"])
    low = g.call(aten.linear.default, x, a_node)
    return g.call(aten.linear.default, low, b_node, *bias)


def _tensor_names(layer: Layer) -> dict[str, str]:
    if layer.kind == "embedding":
        return {"A": f"{layer.path}.lora_embedding_A", "B": f"{layer.path}.lora_embedding_B"}
    return {"A": f"{layer.path}.lora_A.weight", "B": f"{layer.path}.lora_B.weight"}


def _init_bias(layer: Layer, weight: torch.Tensor, rule: LoRA, seed: int) -> torch.Tensor:
    """B's bias (``lora_bias``): zero, as PEFT; ``init="random"``: nn.Linear's uniform(±1/sqrt(r))."""
    bias = torch.zeros(layer.out_features)
    if rule.init == "random":
        gen = layer_generator(seed + 1, layer)  # its own stream: A and B stay as without a bias
        bound = 1 / math.sqrt(rule.r)
        bias.uniform_(-bound, bound, generator=gen)
    return bias.to(weight.dtype).to(weight.device)


def _init_factors(layer: Layer, weight: torch.Tensor, rule: LoRA, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = layer_generator(seed, layer)
    r = rule.r
    if layer.kind == "embedding":
        a = torch.zeros(r, layer.in_features)
        b = torch.empty(layer.out_features, r)
        torch.nn.init.normal_(b, generator=gen)
        if rule.init == "random":
            torch.nn.init.normal_(a, generator=gen)
    else:
        a_shape = (r, layer.in_features, *weight.shape[2:]) if layer.kind == "conv" else (r, layer.in_features)
        groups = conv_groups(layer.node) if layer.kind == "conv" else 1
        b_shape = ((layer.out_features, r // groups, *([1] * (weight.dim() - 2))) if layer.kind == "conv"
                   else (layer.out_features, r))
        a, b = torch.empty(a_shape), torch.zeros(b_shape)
        if rule.init == "gaussian":
            torch.nn.init.normal_(a, std=1 / r, generator=gen)
        else:
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        if rule.init == "random":
            torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)
    return a.to(weight.dtype, copy=False).to(weight.device), b.to(weight.dtype).to(weight.device)


@register_pass
class InsertLoRA(LayerRewritePass):
    """Inserts a LoRA branch on every layer selected by the given LoRA rules."""

    name = "insert_lora"
    rewrite_class = LoRARewrite

    def __init__(self, rules: Sequence[Rule]) -> None:
        super().__init__(rules)
        # target_parameters: a second rewrite per such rule, on the parameters' reads
        self.rules += [LoRAParameterRewrite(r, self.name) for r in rules if r.selects_parameters]


class LoRAMethod(AdapterMethod):
    name = "lora"
    rule = LoRA
    peft_type = "LORA"
    peft_options = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora",
                    "lora_bias": "lora_bias"}
    peft_fixed = {"use_dora": False}
    peft_patterns = {"rank_pattern": "r", "alpha_pattern": "alpha"}

    def make_pass(self, rules: Sequence[Rule]) -> InsertLoRA:
        return InsertLoRA([r for r in rules if r.key == LoRA.key])  # DoRA, LoRA-FA subclass LoRA

    def merged_tensors(self, gm: fx.GraphModule, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        merged = super().merged_tensors(gm, record)
        if "B_bias" in record["tensors"]:
            bias = _base_bias(record)
            b = get_tensor(gm, bias).detach()
            merged[bias] = b + record["scaling"] * get_tensor(gm, record["tensors"]["B_bias"]).detach().to(b.dtype)
        return merged

    def add_delta_(self, gm: fx.GraphModule, record: dict[str, Any], alpha: float = 1.0) -> None:
        if "B_bias" in record["tensors"]:
            b = get_tensor(gm, _base_bias(record))
            b.add_(get_tensor(gm, record["tensors"]["B_bias"]).detach().to(b.dtype), alpha=record["scaling"] * alpha)
        self._add_weight_delta_(gm, record, alpha)

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        a = get_tensor(gm, record["tensors"]["A"]).detach()
        b = get_tensor(gm, record["tensors"]["B"]).detach()
        if record["kind"] == "parameter":
            shape = get_tensor(gm, record["weight"]).shape
            return parameter_delta(a, b, record["scaling"], shape, record["fan_in_fan_out"])
        if record["kind"] == "conv" and b.shape[1] != a.shape[0]:
            # B grouped: ΔW reads every input channel, a grouped weight only its group's
            raise PassError("merge_adapters", f"the LoRA adapter on {record['layer']} is on a grouped "
                            "convolution: its update cannot be folded into the grouped weight (PEFT cannot merge "
                            "it either); export it with merged=False")
        # a convolution's ΔW takes its kernel shape (a quantized linear weight is stored otherwise)
        shape = get_tensor(gm, record["weight"]).shape if record["kind"] == "conv" else ()
        return self.factor_delta(a, b, record["scaling"], record["kind"], record["fan_in_fan_out"], shape)

    @staticmethod
    def factor_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, kind: str, fan_in_fan_out: bool,
                     shape: Sequence[int]) -> torch.Tensor:
        """``s·BA`` in the layout of a weight of ``shape`` (an embedding's ``(BA)ᵀ``, a
        convolution's reshaped to its kernel, GPT-2's Conv1D's transposed)."""
        if kind == "embedding":
            return (b @ a).T * scaling
        if kind == "conv":
            return (b.flatten(1) @ a.flatten(1)).reshape(shape) * scaling
        delta = (b @ a) * scaling
        return delta.T if fan_in_fan_out else delta

    def _add_weight_delta_(self, gm: fx.GraphModule, record: dict[str, Any], alpha: float = 1.0) -> None:
        if record["kind"] != "linear":
            return super().add_delta_(gm, record, alpha)
        # one GEMM accumulated into W: no (out x in) temporary for ΔW
        w = get_tensor(gm, record["weight"])
        a = get_tensor(gm, record["tensors"]["A"]).detach().to(w.dtype)
        b = get_tensor(gm, record["tensors"]["B"]).detach().to(w.dtype)
        s = record["scaling"] * alpha
        if record["fan_in_fan_out"]:
            w.addmm_(a.T, b.T, alpha=s)
        else:
            w.addmm_(b, a, alpha=s)

    # -- add_weighted_adapter, as PEFT's LoraModel.add_weighted_adapter computes it ----------

    def combined_rule_body(self, bodies: Sequence[Sequence[dict[str, Any]]], combination_type: str,
                           svd_rank: Optional[int] = None, **options: Any) -> dict[str, Any]:
        if any(b.get("lora_bias") for adapter in bodies for b in adapter):
            raise ValueError("adapters with lora_bias cannot be combined (PEFT has no rule for their biases)")
        if any(b.get("target_parameters") for adapter in bodies for b in adapter):
            raise ValueError("adapters on parameters (target_parameters) cannot be combined yet: their factors hold "
                             "one block per expert")
        ranks = [max(b.get("r", LoRA.r) for b in adapter) for adapter in bodies]
        if combination_type in COMBINATIONS:
            if len(set(ranks)) != 1:
                raise ValueError(f"combination_type {combination_type!r} needs adapters of one rank, got ranks {ranks}; "
                                 "use 'cat' or an '_svd' combination")
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type in SVD_COMBINATIONS:
            new_rank = svd_rank or max(ranks)
        else:
            raise ValueError(f"unknown combination_type {combination_type!r}; use one of "
                             f"{list(COMBINATIONS) + ['cat'] + list(SVD_COMBINATIONS)}")
        # PEFT gives the combined adapter lora_alpha = r: scaling 1 (sqrt(r) with rsLoRA)
        body = {k: v for k, v in bodies[0][0].items() if k not in ("targets", "exclude", "layers", "kind", "init")}
        body.update(r=new_rank, alpha=float(new_rank))
        return body

    def combine(self, parts: Sequence[dict[str, torch.Tensor]], records: Sequence[dict[str, Any]],
                weights: Sequence[float], combination_type: str, new: Optional[dict[str, torch.Tensor]] = None,
                *, svd_clamp: Optional[float] = None, svd_full_matrices: bool = True, svd_driver: Optional[str] = None,
                density: Optional[float] = None, majority_sign_method: str = "total",
                generator: Optional[torch.Generator] = None, **_: Any) -> dict[str, torch.Tensor]:
        assert new is not None, "combine needs the combined adapter's tensors (their shapes)"
        scalings = [rec["scaling"] for rec in records]
        As, Bs = [p["A"].detach() for p in parts], [p["B"].detach() for p in parts]
        if combination_type == "cat":
            a_cat = torch.cat([a * w * s for a, w, s in zip(As, weights, scalings)], dim=0)
            b_cat = torch.cat(Bs, dim=1)
            a_new, b_new = torch.zeros_like(new["A"]), torch.zeros_like(new["B"])
            a_new[: a_cat.shape[0]] = a_cat
            b_new[:, : b_cat.shape[1]] = b_cat
            return {"A": a_new, "B": b_new}
        if combination_type in SVD_COMBINATIONS:
            # on ΔW = s·BA in (out, r-side) layout; rank-r SVD back into B (U·S) and A (Vh)
            deltas = [s * (b.flatten(1) @ a.flatten(1)) for a, b, s in zip(As, Bs, scalings)]
            inner = combination_type.removesuffix("_svd") if combination_type != "svd" else "linear"
            delta = combine_tensors(inner, deltas, torch.tensor(list(weights)), density=density,
                                    majority_sign_method=majority_sign_method,  # type: ignore[arg-type]
                                    generator=generator)
            rank = new["A"].shape[0]
            u, sv, vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
            u = u[:, :rank] @ torch.diag(sv[:rank])
            vh = vh[:rank, :]
            if svd_clamp is not None:
                hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), svd_clamp)
                u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
            return {"A": vh.reshape(new["A"].shape), "B": u.reshape(new["B"].shape)}
        # factor-wise: A and B each get sqrt(|w·s|), the sign goes on A only
        ws = [w * s for w, s in zip(weights, scalings)]
        w_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])
        w_b = torch.tensor([math.sqrt(abs(x)) for x in ws])
        opts = dict(density=density, majority_sign_method=majority_sign_method, generator=generator)
        return {"A": combine_tensors(combination_type, As, w_a, **opts).to(As[0].dtype),  # type: ignore[arg-type]
                "B": combine_tensors(combination_type, Bs, w_b, **opts).to(Bs[0].dtype)}  # type: ignore[arg-type]


def _base_bias(record: dict[str, Any]) -> str:
    """The layer bias a ``lora_bias`` adapter folds into (PassError when the layer has none)."""
    if not record.get("bias"):
        raise PassError("merge_adapters", f"the LoRA adapter on {record['layer']} has lora_bias=True but the layer has "
                        "no bias to add it to (PEFT cannot merge it either); export it with merged=False")
    return record["bias"]


#: PEFT's combinations that work on ΔW and factor it again by SVD
SVD_COMBINATIONS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


register_method(LoRAMethod.name, LoRAMethod())
