"""LoRA-XS (Bałazy et al., 2024) and its LoRA-SB initialisation (Ponkshe et al., 2024).

Only a small ``r x r`` core ``R`` trains, between two frozen factors taken from a truncated SVD::

    y = base(x) + s · B(R(A(dropout(x))))          s = alpha / r

**LoRA-XS** (``init="default"``): the factors come from the frozen weight, ``W = U Σ Vᵀ``
(``W`` in ``(out, in)`` layout; GPT-2's Conv1D weight is transposed first), as the official code
builds them: ``B = U_r`` ``(out, r)`` and ``A = Σ_r V_rᵀ`` ``(r, in)``. (The official
``get_svd_replacement_module`` takes the SVD of ``weight.T``, the ``(in, out)`` matrix of
``h = xW``, and sets ``lora_A = (U' Σ)ᵀ``, ``lora_B = V'``; in PyTorch's ``(out, in)`` layout
that puts ``Σ_r`` on the input side, not on ``B``.) ``R`` is drawn ``N(0, σ²)`` with
``σ = 1e-5`` as in the official code (``init_module_weights(..., sigma=0.00001)``): a fresh
adapter changes the outputs only by that much; ``init="zero"`` starts exactly at the
identity (training is unaffected: ``B``, ``A`` are frozen, so ``∂L/∂R = s·Bᵀ G Aᵀ`` is non-zero
at ``R = 0``).

**LoRA-SB** (``init="sb"``): same architecture, initialised from an approximation of the first
full fine-tuning update. A gradient probe runs the graph forward and backward once on a probe
batch (``compile(..., options={"probe_batch": ..., "probe_loss": ...})``, default: the example
inputs and next-token cross-entropy, as ``gp.Update(select="gradient")`` uses); the update is
approximated as AdamW's first step, ``ΔW ≈ -η·sign(∇W L)`` (``η = sb_lr``; the official code's
``estimate_and_process_grads_torch``), and ``ΔW = U Σ Vᵀ`` gives ``B = U_r``, ``A = V_rᵀ`` and
``R = Σ_r / s``, so ``s·BRA`` is the best rank-``r`` approximation of ``ΔW``. The base weight
is not changed: a fresh LoRA-SB adapter has taken that approximate first step (the reading of
"initialisation using update approximation" taken here; the official initialisation function
itself was not available to check whether it also subtracts ``s·BRA`` from ``W``). Not done
here: the official code sums the gradients of 50 samples (``num_samples``) over several
mini-batches; the probe uses the one probe batch given (the sign is scale-free, so a mean and a
sum of the same gradients give the same ``ΔW``).

Decompositions run in float64 (deterministic for the same weight: singular vectors get a
canonical sign, the largest-magnitude entry of each column of ``U`` positive) and are cast to
the weight's dtype. ``A`` and ``B`` are :attr:`Role.ADAPTER_CONST`: a compile regenerates them
from the same weight (LoRA-XS) or the same probe batch (LoRA-SB); ``save_adapter`` writes them
too (the core saves constants), so a LoRA-SB adapter reloads exactly whatever the probe batch of
the new compile. ``adapter_state_dict()`` holds ``R`` only.

Tensor names follow the official LoRA-XS code (a PEFT LoRA whose ``lora_A``/``lora_B`` are
frozen plus a ``default_lora_latent_mapping`` linear): ``<path>.lora_A.weight`` ``(r, in)``,
``<path>.lora_B.weight`` ``(out, r)``, ``<path>.default_lora_latent_mapping.weight``
``(r, r)``. Merge is additive and exact: ``W + s·B R A``. Linear layers only (GPT-2's Conv1D
included).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx

from graphpeft.errors import PlanError
from graphpeft.graph import Layer, Role, find_layers, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext, PassResult
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice, check_number, check_positive_int, check_probability
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .layer_rewrite import (LayerRewrite, LayerRewritePass, adapter_dropout, branch_builder, check_rank_and_tying,
                            join_output, layer_generator, layer_input, record_adapter)
from ..update.probe_gradients import probe_weight_gradients

aten = torch.ops.aten

INITS = ("default", "zero", "sb", "random")
#: std of the core's Gaussian init in the official LoRA-XS code
R_INIT_STD = 1e-5


@register_rule
@dataclasses.dataclass
class LoRAXS(Rule):
    """LoRA-XS: a trainable ``r x r`` core between frozen factors of the weight's SVD.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: rank of the frozen factors; the core has ``r²`` trainable entries. Default 16 (the
            paper's RoBERTa-large GLUE setting quoted with 24.6K parameters).
        alpha: scaling numerator; the branch is multiplied by ``alpha / r`` (default 16:
            scaling 1, as the official math/instruction scripts set ``lora_alpha = r``).
        dropout: dropout probability on the adapter branch's input (training only).
        init: ``"default"`` (LoRA-XS: factors from the SVD of ``W``, ``R ~ N(0, 1e-5²)``),
            ``"zero"`` (same factors, ``R = 0``: exactly the identity), ``"sb"`` (LoRA-SB: factors
            and ``R`` from a gradient probe, see the module doc) or ``"random"`` (``R`` standard
            normal: a non-identity start, for tests).
        sb_lr: with ``init="sb"``, the learning rate ``η`` of the approximated first update
            ``-η·sign(∇W L)`` (the official code uses the first warm-up step's rate).
    """

    key: ClassVar[str] = "lora_xs"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "default"
    sb_lr: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_number(self, "alpha", "dropout", "sb_lr")
        if float(self.alpha) == 0.0:
            raise PlanError(f"{self.key}: alpha must not be 0 (the branch would be switched off)")
        check_probability(self, "dropout")
        if float(self.sb_lr) <= 0.0:
            raise PlanError(f"{self.key}: sb_lr must be positive, got {self.sb_lr!r}")
        check_choice(self, "init", INITS)

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r

    def check(self, layer: Layer) -> Optional[str]:
        return check_rank_and_tying(self.r, layer)


# -- decompositions (float64, deterministic) -------------------------------------------------------


def weight_rows(weight: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The weight in ``(out, in)`` layout as float64 (GPT-2's Conv1D stores ``(in, out)``)."""
    w = weight.detach().to(torch.float64)
    return w.T if layer.fan_in_fan_out else w


def top_singular(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, σ_r, V_rᵀ)`` of a float64 matrix, with a canonical sign per component (the
    largest-magnitude entry of each column of ``U_r`` is positive), so the same matrix gives the
    same factors whatever LAPACK's sign choice."""
    # numpy's LAPACK: torch.linalg.svd in float64 takes ~15 s on a 1024x1024 weight on the CPU
    # build we ship (float32: 0.3 s; numpy float64: 0.5 s)
    u, s, vh = (torch.from_numpy(t) for t in np.linalg.svd(matrix.to(torch.float64).numpy(), full_matrices=False))
    u, s, vh = u[:, :r], s[:r], vh[:r]
    pivot = u.abs().argmax(dim=0)
    sign = torch.sign(u[pivot, torch.arange(u.shape[1])])
    sign[sign == 0] = 1.0
    return u * sign, s, vh * sign.unsqueeze(1)


def lora_xs_factors(weight: torch.Tensor, layer: Layer, rule: LoRAXS, seed: int,
                    grad: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r), R (r, r))`` for one layer, in float64."""
    r = rule.r
    if rule.init == "sb":
        assert grad is not None, "init='sb' needs the layer's probe gradient"
        update = -float(rule.sb_lr) * torch.sign(weight_rows(grad, layer))  # AdamW's first step
        u, s, vh = top_singular(update, r)
        return vh, u, torch.diag(s) / rule.scaling  # s·B R A = U_r Σ_r V_rᵀ
    u, s, vh = top_singular(weight_rows(weight, layer), r)
    a = s.unsqueeze(1) * vh  # Σ_r V_rᵀ: the official code's SVD of Wᵀ puts Σ on the input side
    if rule.init == "zero":
        core = torch.zeros(r, r, dtype=torch.float64)
    else:
        gen = layer_generator(seed, layer)
        std = 1.0 if rule.init == "random" else R_INIT_STD
        core = (torch.randn(r, r, generator=gen) * std).to(torch.float64)
    return a, u, core


class LoRAXSRewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``y + s · B(R(A(dropout(x))))``."""

    rule: LoRAXS

    def __init__(self, rule: LoRAXS) -> None:
        super().__init__(rule)
        #: weight name -> probe gradient (``init="sb"``), filled by :class:`InsertLoRAXS`
        self.gradients: dict[str, torch.Tensor] = {}

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        a, b, core = lora_xs_factors(weight, layer, rule, ctx.seed, self.gradients.get(layer.weight))
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        aid, y, g = branch_builder(gm, layer, ctx, InsertLoRAXS.name, rule)
        a_node = g.param(names["A"], a.to(weight.dtype).contiguous(), Role.ADAPTER_CONST)
        r_node = g.param(names["R"], core.to(weight.dtype).contiguous(), Role.ADAPTER)
        b_node = g.param(names["B"], b.to(weight.dtype).contiguous(), Role.ADAPTER_CONST)
        x = adapter_dropout(g, layer_input(layer), rule.dropout)
        low = g.call(aten.linear.default, x, a_node)  # (.., r): A x
        mixed = g.call(aten.linear.default, low, r_node)  # R A x
        up = g.call(aten.linear.default, mixed, b_node)  # B R A x
        joined = join_output(g, y, g.call(aten.mul.Tensor, up, rule.scaling))
        record_adapter(gm, aid, layer, ctx, rule, LoRAXSMethod.name, names, joined, scaling=rule.scaling)


def tensor_names(layer: Layer) -> dict[str, str]:
    """State-dict keys of one LoRA-XS layer (the official code's names)."""
    return {"A": f"{layer.path}.lora_A.weight", "B": f"{layer.path}.lora_B.weight",
            "R": f"{layer.path}.default_lora_latent_mapping.weight"}


@register_pass
class InsertLoRAXS(LayerRewritePass):
    """Inserts a LoRA-XS branch on every layer selected by the given rules; for ``init="sb"``
    rules it first probes the weights' gradients (one forward and backward, before any branch
    of this pass exists)."""

    name = "insert_lora_xs"
    rewrite_class = LoRAXSRewrite

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sb = [rw for rw in self.rules if isinstance(rw, LoRAXSRewrite) and rw.rule.init == "sb"]
        if sb:
            layers = [l for l in find_layers(gm)
                      if any(rw.rule.select(l) is None and rw.rule.check(l) is None for rw in sb)]
            grads = (probe_weight_gradients(gm, ctx, list(dict.fromkeys(l.weight for l in layers)), "lora_xs init='sb'")
                     if layers else {})
            for rw in sb:
                rw.gradients = grads
        try:
            return super().call(gm, ctx)
        finally:
            for rw in sb:
                rw.gradients = {}  # the gradients are weight-sized: do not keep them


class LoRAXSMethod(AdapterMethod):
    """LoRA-XS for the core: additive merge ``ΔW = s · B R A``."""

    name = "lora_xs"
    rule = LoRAXS

    def make_pass(self, rules: Sequence[Rule]) -> InsertLoRAXS:
        return InsertLoRAXS([r for r in rules if isinstance(r, LoRAXS)])

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        t = record["tensors"]
        a = get_tensor(gm, t["A"]).detach()
        b = get_tensor(gm, t["B"]).detach()
        core = get_tensor(gm, t["R"]).detach()
        delta = (b @ core @ a) * record["scaling"]
        return delta.T if record["fan_in_fan_out"] else delta


register_method(LoRAXSMethod.name, LoRAXSMethod())
