"""MoLE: top-k routed LoRA experts on one layer, as MixLoRA (Li et al., 2024, arXiv 2404.15159)
routes them (its "mixtral" strategy, the published default)::

    p       = softmax(x Rᵀ)                      router over E experts, trainable R (E x in)
    w, idx  = top_k(p)                           the k most probable experts of each token
    w       = w / Σ w                            renormalised over the selected experts
    y       = W x + Σ_{e ∈ idx} w_e · (alpha / r) · B_e A_e dropout(x)

Softmax, then top-k, then renormalise (MixLoRA's ``MixLoraSparseMoe.forward``, the same as
Mixtral's) equals a softmax over the k selected logits. The router reads ``x`` itself; the
experts read it through the adapter dropout, as MixLoRA's LoRA experts do.

Differences from MixLoRA, on purpose: MixLoRA routes a whole feed-forward block (one router
for ``gate_proj``/``up_proj``/``down_proj`` together, the experts being LoRA-adapted copies of
the block); here every selected layer has its own router and experts, so a plan puts MoLE on
any linear layer (``targets=["gate_proj", "up_proj", "down_proj"]`` gives each projection its
own routing). No router jitter noise (MixLoRA's default is 0 too).

Tensors per layer: ``<path>.mole_router`` ``(E, in)`` (normal, std ``router_init_range``),
``<path>.mole_lora_A`` ``(E, r, in)`` (each expert Kaiming-uniform, as LoRA's A) and
``<path>.mole_lora_B`` ``(out, E, r)`` (zero, so a fresh adapter is the identity), all
:attr:`Role.ADAPTER` (trainable). Expert ``e`` is ``A_e = A[e]`` and ``B_e = B[:, e]``: the two
are a rank-``E·r`` LoRA pair (``A.view(E·r, in)``, ``B.view(out, E·r)``) with its rank axis
split by expert, so the graph reads both through views (a permuted B would make its gradient
non-contiguous, which the training step's ONNX export cannot translate).

The graph is the dense formulation: every expert runs, and the top-k weights, scattered into an
E-vector of gates, zero the others. So the branch costs what a rank-``E·r`` LoRA costs (with the
defaults ``E·r = 64``, ``E/k = 4`` times the FLOPs of the k selected experts) plus the router,
but it is made of static-shape ops only (``linear``, ``softmax``, ``topk``, ``scatter``), which
trace into the training step and export to ONNX (inference and training) without legalising.

Not mergeable: the update depends on the input through the routing. ``cm.merge()`` and
``export_onnx(merged=True)`` fold every mergeable adapter and keep MoLE branches in the graph;
the ``merge_adapters`` pass on its own raises for them.

The load-balancing auxiliary loss (MixLoRA's, from Switch Transformers / Mixtral) is available
for eager training: :func:`forward_with_router_logits` runs the model once and returns its
outputs with every MoLE layer's router logits, :func:`load_balancing_loss` computes the loss
from them, :func:`router_aux_loss` does both and scales by the rule's
``router_aux_loss_coef``. The compiled training step (``cm.compile_training``) trains the
task loss only: its loss sees the model's outputs, not the router logits.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphpeft.errors import PlanError
from graphpeft.graph import Layer, Role, adapters, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice, check_number, check_positive_int, check_probability
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .layer_rewrite import (LayerRewrite, LayerRewritePass, adapter_dropout, branch_builder, join_output,
                            layer_generator, layer_input, rank_reason, record_adapter, tied_weights_reason)

aten = torch.ops.aten

INITS = ("default", "random")

__all__ = ["InsertMoLE", "MoLE", "MoLEMethod", "MoLERewrite", "forward_with_router_logits", "load_balancing_loss",
           "router_aux_loss"]


@register_rule
@dataclasses.dataclass
class MoLE(Rule):
    """Mixture of LoRA experts (MixLoRA-style top-k routing) on each selected linear layer.

    Defaults are MixLoRA's published top-k configuration: 8 experts, top-2, rank 8, alpha 16,
    dropout 0.05, router initialised normal with std 0.02, auxiliary loss coefficient 0.01.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``); typically the MLP projections.
        num_experts: number of LoRA experts ``E`` per layer.
        top_k: experts each token is routed to (``1 <= top_k <= num_experts``).
        r: rank of every expert.
        alpha: scaling numerator; each expert's output is multiplied by ``alpha / r``.
        dropout: dropout probability on the experts' input (training only; not the router's).
        router_init_range: standard deviation of the router's normal initialisation.
        router_aux_loss_coef: weight of the load-balancing loss in :func:`router_aux_loss`
            (not part of the graph).
        init: ``"default"`` (A Kaiming-uniform, B zero: the identity) or ``"random"`` (B
            Kaiming-uniform as well: a non-identity start, for tests).
    """

    key: ClassVar[str] = "mole"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    num_experts: int = 8
    top_k: int = 2
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    router_init_range: float = 0.02
    router_aux_loss_coef: float = 0.01
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "num_experts", "top_k", "r")
        if self.top_k > self.num_experts:
            raise PlanError(f"mole: top_k={self.top_k} is larger than num_experts={self.num_experts}; "
                            f"route to at most num_experts experts")
        check_number(self, "alpha", "dropout", "router_init_range", "router_aux_loss_coef", finite=True)
        check_probability(self, "dropout")
        if self.router_init_range < 0 or self.router_aux_loss_coef < 0:
            raise PlanError("mole: router_init_range and router_aux_loss_coef must be >= 0, got "
                            f"{self.router_init_range!r} and {self.router_aux_loss_coef!r}")
        check_choice(self, "init", INITS)

    @property
    def scaling(self) -> float:
        """Multiplier of every expert's output: ``alpha / r``."""
        return self.alpha / self.r

    def check(self, layer: Layer) -> Optional[str]:
        # MoLE is never merged, so the tied-weights reason names no merge consequence
        return rank_reason(self.r, layer) or tied_weights_reason(layer, consequence=None)


def tensor_names(layer: Layer) -> dict[str, str]:
    """Graph names (adapter "default") of one layer's router and expert factors."""
    return {"router": f"{layer.path}.mole_router", "A": f"{layer.path}.mole_lora_A",
            "B": f"{layer.path}.mole_lora_B"}


def init_tensors(layer: Layer, rule: MoLE, seed: int) -> dict[str, torch.Tensor]:
    """Router ``(E, in)`` normal(0, router_init_range); A ``(E, r, in)`` Kaiming-uniform per
    expert (LoRA's init, fan-in ``in``); B ``(out, E, r)`` zero (random with ``init="random"``)."""
    gen = layer_generator(seed, layer)
    e, r = rule.num_experts, rule.r
    router = torch.empty(e, layer.in_features)
    torch.nn.init.normal_(router, mean=0.0, std=float(rule.router_init_range), generator=gen)
    a = torch.empty(e, r, layer.in_features)
    b = torch.zeros(layer.out_features, e, r)
    for i in range(e):  # per expert: kaiming on the 3-d tensor would take fan-in r·in
        torch.nn.init.kaiming_uniform_(a[i], a=math.sqrt(5), generator=gen)
        if rule.init == "random":
            torch.nn.init.kaiming_uniform_(b[:, i], a=math.sqrt(5), generator=gen)
    return {"router": router, "A": a, "B": b}


class MoLERewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``y + scaling · B_cat (gates ⊗ (A_cat dropout(x)))`` with
    ``gates`` the renormalised top-k router weights scattered into an E-vector (every expert is
    computed; unselected ones are multiplied by zero)."""

    rule: MoLE

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        e, k, r = rule.num_experts, rule.top_k, rule.r
        values = init_tensors(layer, rule, ctx.seed)
        names = {key: scoped_tensor_name(v, ctx.adapter_name) for key, v in tensor_names(layer).items()}
        aid, out, g = branch_builder(gm, layer, ctx, InsertMoLE.name, rule)
        router = g.param(names["router"], values["router"].to(weight), Role.ADAPTER)
        a = g.param(names["A"], values["A"].to(weight), Role.ADAPTER)
        b = g.param(names["B"], values["B"].to(weight), Role.ADAPTER)
        x = layer_input(layer)

        # routing: softmax over all experts, top-k, renormalise (MixLoRA / Mixtral)
        logits = g.call(aten.linear.default, x, router)
        logits.meta["graphpeft"]["part"] = "router_logits"
        probs = g.call(aten.softmax.int, logits, -1)
        top = g.call(aten.topk.default, probs, k, -1)
        top_w = g.call(operator.getitem, top, 0)
        top_i = g.call(operator.getitem, top, 1)
        top_w = g.call(aten.div.Tensor, top_w, g.call(aten.sum.dim_IntList, top_w, [-1], True))
        gates = g.call(aten.scatter.src, g.call(aten.zeros_like.default, probs), -1, top_i, top_w)

        # experts, dense: (..., E·r) low-rank activations, gated per expert, one up-projection
        x = adapter_dropout(g, x, rule.dropout)
        a_cat = g.call(aten.view.default, a, [e * r, layer.in_features])
        low = g.call(aten.unflatten.int, g.call(aten.linear.default, x, a_cat), -1, [e, r])
        gated = g.call(aten.mul.Tensor, low, g.call(aten.unsqueeze.default, gates, -1))
        gated = g.call(aten.flatten.using_ints, gated, -2, -1)
        # B (out, E, r) -> (out, E·r): columns in the expert-major order of A_cat's rows
        b_cat = g.call(aten.view.default, b, [layer.out_features, e * r])
        up = g.call(aten.mul.Tensor, g.call(aten.linear.default, gated, b_cat), rule.scaling)
        joined = join_output(g, out, up)
        record_adapter(gm, aid, layer, ctx, rule, MoLEMethod.name, names, joined, scaling=rule.scaling,
                       num_experts=e, top_k=k, router_logits=logits.name)


@register_pass
class InsertMoLE(LayerRewritePass):
    """Inserts routed LoRA experts on every layer selected by the given MoLE rules."""

    name = "insert_mole"
    rewrite_class = MoLERewrite


class MoLEMethod(AdapterMethod):
    """MoLE for the core: not mergeable (routing depends on the input), so merge keeps it."""

    name = "mole"
    rule = MoLE
    mergeable = False
    additive = False

    def make_pass(self, rules: Sequence[Rule]) -> InsertMoLE:
        return InsertMoLE([r for r in rules if isinstance(r, MoLE)])

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError(f"the MoLE adapter on {record['layer']} has no weight delta: its update depends on "
                                  "the input through the router; keep its branch (cm.merge() does, "
                                  "export_onnx(merged=False) too)")

    def merged_tensors(self, gm: fx.GraphModule, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {record["weight"]: self.delta_weight(gm, record)}  # raises: not mergeable

    def describe(self, record: dict[str, Any]) -> str:
        return f"mole (E={record['num_experts']}, top-{record['top_k']})"


register_method(MoLEMethod.name, MoLEMethod())


# --- load-balancing auxiliary loss (eager training) ----------------------------------------------


def forward_with_router_logits(cm: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``cm`` (a :class:`~graphpeft.compiled.CompiledModel`) once on a model-style call and
    return ``(outputs, {adapter id: router logits (..., E)})`` for every MoLE adapter it runs.

    Differentiable (the graph's own tensors are used), so a loss built from both trains the
    routers; it interprets the graph node by node, so it is slower than ``cm(...)``."""
    gm = cm.graph_module
    wanted = {rec["router_logits"]: aid for aid, rec in adapters(gm).items() if rec["method"] == MoLEMethod.name}
    captured: dict[str, torch.Tensor] = {}

    class _Capture(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.name in wanted:
                captured[wanted[n.name]] = value
            return value

    flat = _Capture(gm).run(*cm.flat_inputs(*args, **kwargs))
    outputs = pytree.tree_unflatten(list(flat), cm._traced.out_spec)
    return outputs, captured


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """The load-balancing loss of Switch Transformers as Mixtral and MixLoRA compute it:
    ``E · Σ_e f_e · P_e`` over the tokens of every given layer together, with ``f_e`` the
    fraction of (token, choice) slots routed to expert ``e`` (no gradient) and ``P_e`` its mean
    router probability (transformers' Mixtral ``load_balancing_loss_func`` gives the same value).
    ``top_k`` when routing is uniform; larger when it is unbalanced."""
    if not router_logits:
        raise ValueError("no router logits: the model has no MoLE adapters")
    num_experts = router_logits[0].shape[-1]
    logits = torch.cat([t.reshape(-1, num_experts) for t in router_logits], dim=0)
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    tokens_per_expert = torch.nn.functional.one_hot(chosen, num_experts).float().mean(dim=0)  # (k, E)
    return (tokens_per_expert * probs.mean(dim=0).unsqueeze(0)).sum() * num_experts


def router_aux_loss(cm: Any, *args: Any, **kwargs: Any) -> tuple[Any, torch.Tensor]:
    """``(outputs, aux)`` for one model-style call: ``aux`` is the sum over MoLE rules of
    ``router_aux_loss_coef · load_balancing_loss`` of the layers each rule adapted (MixLoRA
    adds it to the task loss). Example::

        out, aux = router_aux_loss(cm, ids, use_cache=False)
        loss = task_loss(out) + aux
        loss.backward()
    """
    outputs, logits = forward_with_router_logits(cm, *args, **kwargs)
    records = adapters(cm.graph_module)
    groups: dict[tuple[str, str], list[str]] = {}
    for aid in logits:
        rec = records[aid]
        groups.setdefault((rec.get("name", "default"), rec["rule"]), []).append(aid)
    total = torch.zeros(())
    for aids in groups.values():
        rec = records[aids[0]]
        coef = float(rec["config"].get("router_aux_loss_coef", MoLE.router_aux_loss_coef))
        total = total + coef * load_balancing_loss([logits[a] for a in aids], rec["top_k"])
    return outputs, total
