"""SoRA (Ding et al., EMNLP 2023, "Sparse Low-rank Adaptation"): LoRA with a gate vector
between ``A`` and ``B`` that a proximal L1 step makes sparse, so the rank shrinks while training::

    y = base(x) + s · B (g ⊙ A(dropout(x)))          s = alpha / r

``A`` ``(r, in)`` and ``B`` ``(out, r)`` are LoRA's (Kaiming-uniform and zero: a fresh adapter is
the identity); the gate ``g`` ``(r,)`` is drawn standard normal, as the official code does
(``nn.Parameter(torch.randn(1, r))`` in TsinghuaC3I/SoRA ``src/lora.py``; ``gate_init="ones"``
starts it at 1 instead). All three train (:attr:`Role.ADAPTER`).

After every optimizer update the gate takes the proximal step of the L1 penalty ``λ‖g‖₁``
(the paper's soft-thresholding ``g ← T_{η_t·λ}(g)``, ``η_t`` the step's learning rate)::

    g ← sign(g) · max(|g| − lr · λ, 0)

so small gates become exactly zero and stay there until a gradient step pushes them past the
threshold again. The training-step compiler runs it inside the compiled step (and its ONNX
export) through :meth:`SoRAMethod.after_update`; in a plain ``torch.optim`` loop call
:func:`sora_proximal_step` after ``optimizer.step()``. Differences from the official code,
which trains the gates with a separate ``SparseAdamW``: that optimizer's default threshold is
``λ`` itself, not ``lr·λ`` (its ``sparse_optimizer_multiply_lr.py`` variant has ``lr·λ``, the
paper's form, used here), and it excludes the gates from weight decay, whereas here the gates
get the step's optimizer as every other trainable tensor (use ``weight_decay=0`` to match).

Merge is additive and exact: ``ΔW = s · B[:, k] diag(g[k]) A[k]`` over the live ranks ``k``
(``g_k ≠ 0``); zeroed ranks are dropped (they contribute nothing). :func:`sora_live_ranks`
reports the live rank of each layer and :func:`sora_pruned_factors` gives each layer's pruned
LoRA factors (the paper's inference-time SoRA: a LoRA of the live rank with the gate folded into
``B``). Tensor names: ``<path>.lora_A.weight``, ``<path>.lora_B.weight``, ``<path>.lora_gate``.
Linear layers only (GPT-2's Conv1D included), as in the official code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import PlanError
from graphpeft.graph import Layer, Role, adapters, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice, is_number
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult
from graphpeft.training import apply_after_update

from .insert_lora import LoRA, _init_factors  # same factors and initialisation as LoRA
from .layer_rewrite import (LayerRewrite, LayerRewritePass, adapter_dropout, branch_builder, join_output,
                            layer_generator, layer_input, record_adapter)

if TYPE_CHECKING:
    from graphpeft.compiled import CompiledModel

aten = torch.ops.aten

GATE_INITS = ("normal", "ones")


@register_rule
@dataclasses.dataclass
class SoRA(LoRA):
    """Sparse low-rank adapter: LoRA's ``A``, ``B`` and a gate ``g (r,)`` made sparse by a
    proximal L1 step after each update.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: the maximal rank (the paper's ``r_max``; official scripts: 8).
        alpha: scaling numerator; the branch is multiplied by ``alpha / r`` (official: 16).
        dropout: dropout probability on the adapter branch's input (training only).
        use_rslora: scale by ``alpha / sqrt(r)``.
        init: ``"default"`` (A Kaiming-uniform, B zero), ``"gaussian"`` (A normal with std
            ``1/r``, B zero) or ``"random"`` (B random too: a non-identity start, for tests).
        sparse_lambda: ``λ``, the strength of the L1 penalty on the gate: each step shrinks
            every gate entry towards 0 by ``lr · λ`` (0 turns the proximal step off). Default
            0.1, the default of the official ``SparseAdamW``.
        gate_init: ``"normal"`` (standard normal, as the official code) or ``"ones"``.
    """

    key: ClassVar[str] = "sora"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    alpha: float = 16.0
    sparse_lambda: float = 0.1
    gate_init: str = "normal"

    def __post_init__(self) -> None:
        super().__post_init__()
        lam = self.sparse_lambda
        if not is_number(lam) or not math.isfinite(lam) or lam < 0:
            raise PlanError(f"sora: sparse_lambda must be a finite number >= 0, got {lam!r}")
        check_choice(self, "gate_init", GATE_INITS)


class SoRARewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``y + s · B(g ⊙ A(dropout(x)))``."""

    rule: SoRA

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        a, b = _init_factors(layer, weight, rule, ctx.seed)
        if rule.gate_init == "ones":
            gate = torch.ones(rule.r)
        else:
            # a generator of its own (not the factors'): A and B stay LoRA's for the same seed
            gen = layer_generator(ctx.seed + 1, layer)
            gate = torch.randn(rule.r, generator=gen)
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        aid, y, g = branch_builder(gm, layer, ctx, InsertSoRA.name, rule)
        a_node = g.param(names["A"], a, Role.ADAPTER)
        b_node = g.param(names["B"], b, Role.ADAPTER)
        gate_node = g.param(names["gate"], gate.to(weight), Role.ADAPTER)
        x = adapter_dropout(g, layer_input(layer), rule.dropout)
        low = g.call(aten.linear.default, x, a_node)
        gated = g.call(aten.mul.Tensor, low, gate_node)
        up = g.call(aten.linear.default, gated, b_node)
        joined = join_output(g, y, g.call(aten.mul.Tensor, up, rule.scaling))
        record_adapter(gm, aid, layer, ctx, rule, SoRAMethod.name, names, joined, scaling=rule.scaling,
                       sparse_lambda=float(rule.sparse_lambda))


def tensor_names(layer: Layer) -> dict[str, str]:
    """The state-dict keys of a SoRA layer (LoRA's for the factors)."""
    return {"A": f"{layer.path}.lora_A.weight", "B": f"{layer.path}.lora_B.weight", "gate": f"{layer.path}.lora_gate"}


def soft_threshold(g: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``sign(g) · max(|g| − threshold, 0)``: the proximal operator of ``threshold · ‖g‖₁``.
    Entries within the threshold become exactly 0 (``sign(0) = 0`` keeps them there)."""
    return torch.sign(g) * torch.relu(torch.abs(g) - threshold)


@register_pass
class InsertSoRA(LayerRewritePass):
    """Inserts a SoRA branch on every layer selected by the given SoRA rules."""

    name = "insert_sora"
    rewrite_class = SoRARewrite


class SoRAMethod(AdapterMethod):
    """SoRA for the core: the proximal step after each update, and an additive merge over the
    live ranks."""

    name = "sora"
    rule = SoRA

    def make_pass(self, rules: Sequence[Rule]) -> InsertSoRA:
        return InsertSoRA([r for r in rules if isinstance(r, SoRA)])

    def after_update(self, record: dict[str, Any], key: str, param: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        lam = float(record.get("sparse_lambda", 0.0))
        if key != "gate" or lam == 0.0:
            return param
        return soft_threshold(param, lr.to(param.dtype) * lam)

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        a, b = pruned_factors(gm, record)
        delta = (b @ a) * record["scaling"]
        return delta.T if record["fan_in_fan_out"] else delta


def pruned_factors(gm: fx.GraphModule, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One SoRA layer as a LoRA of its live rank: ``(A[k], B[:, k] · g[k])`` over the ranks
    ``k`` whose gate is not zero, so ``s · B' A'`` is the layer's ΔW."""
    t = record["tensors"]
    gate = get_tensor(gm, t["gate"]).detach()
    live = torch.nonzero(gate != 0).flatten()
    a = get_tensor(gm, t["A"]).detach().index_select(0, live)
    b = get_tensor(gm, t["B"]).detach().index_select(1, live) * gate.index_select(0, live)
    return a, b


def _records(cm: "CompiledModel") -> dict[str, dict[str, Any]]:
    return {aid: rec for aid, rec in adapters(cm.graph_module).items() if rec["method"] == SoRAMethod.name}


def sora_live_ranks(cm: "CompiledModel") -> dict[str, int]:
    """Adapter id (the layer path, plus the adapter name for named adapters) -> the number of
    ranks whose gate is not zero: what each layer keeps after pruning."""
    return {aid: int((get_tensor(cm.graph_module, rec["tensors"]["gate"]) != 0).sum())
            for aid, rec in _records(cm).items()}


def sora_pruned_factors(cm: "CompiledModel") -> dict[str, dict[str, Any]]:
    """Adapter id -> ``{"A": (k, in), "B": (out, k), "scaling": s}``: each SoRA layer reduced
    to a LoRA of its live rank ``k`` with the gate folded into ``B`` (the paper's inference
    form). ``s · B A`` equals the layer's ΔW (in ``(out, in)`` layout)."""
    out: dict[str, dict[str, Any]] = {}
    for aid, rec in _records(cm).items():
        a, b = pruned_factors(cm.graph_module, rec)
        out[aid] = {"A": a, "B": b, "scaling": rec["scaling"]}
    return out


def sora_proximal_step(cm: "CompiledModel", lr: float) -> None:
    """The proximal L1 step on every SoRA gate of ``cm``, in place: ``g ← sign(g) ·
    max(|g| − lr·λ, 0)``. For plain PyTorch loops: call it right after ``optimizer.step()``
    with that step's learning rate (the compiled training step does this by itself)::

        opt = torch.optim.AdamW(cm.trainable_parameters().values(), lr=lr)
        for batch in data:
            opt.zero_grad(); loss_fn(cm(*batch)).backward(); opt.step()
            sora_proximal_step(cm, lr)
    """
    apply_after_update(cm, lr, methods=(SoRAMethod.name,))


register_method(SoRAMethod.name, SoRAMethod())

__all__ = ["InsertSoRA", "SoRA", "SoRAMethod", "SoRARewrite", "soft_threshold", "sora_live_ranks",
           "sora_proximal_step", "sora_pruned_factors"]
