"""VeRA (Kopiczko et al., 2024): one pair of frozen random matrices shared by every adapted
layer, and two trainable scaling vectors per layer, as PEFT implements it::

    y + λ_b ⊙ (B[:out] · (λ_d ⊙ (A[:, :in] · x)))

``A`` ``(r, max_in)`` and ``B`` ``(max_out, r)`` are sized for the largest adapted layer and
sliced per layer. They are :attr:`Role.ADAPTER_CONST` graph tensors named ``vera_A`` and
``vera_B`` (PEFT's ``base_model.vera_A`` / ``base_model.vera_B``), regenerated from
``projection_prng_key`` exactly as PEFT does (Kaiming-uniform from one CPU generator, A first),
so the same key gives the same matrices in both. Per layer: ``<path>.vera_lambda_b`` ``(out,)``,
init zero (a fresh adapter is the identity), and ``<path>.vera_lambda_d`` ``(r,)``, init
``d_initial``. Merge is additive and exact: ``ΔW = (λ_b ⊙ B) (λ_d ⊙ A)``. Linear layers only
(GPT-2's Conv1D included), as in PEFT.

The shared matrices are why the pass is more than its per-layer rewrites: it first finds every
layer its rules will adapt to size them, and each rewrite reads them through its own node
(``GraphBuilder.attr``) so that merging one layer leaves the others' reads in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import Layer, Role, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext

from graphpeft.plan import Rule, check_choice, check_int, check_number, check_positive_int, check_probability
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .layer_rewrite import (LayerRewrite, SharedTensorsMethod, SharedTensorsPass, adapter_dropout, branch_builder,
                            join_output, layer_generator, layer_input, record_adapter, tied_weights_reason)

aten = torch.ops.aten

INITS = ("default", "random")
#: graph names of the shared projections (PEFT: ``base_model.vera_A`` / ``base_model.vera_B``)
SHARED_A = "vera_A"
SHARED_B = "vera_B"


@register_rule
@dataclasses.dataclass
class VeRA(Rule):
    """Vector-based random matrix adaptation: shared frozen ``A``/``B``, per-layer vectors.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: rank of the shared projections (published default 256; it may exceed a layer's
            size: only the vectors train).
        projection_prng_key: seed of the shared projections (PEFT's name and default, so a
            PEFT VeRA adapter with the same key has the same ``vera_A``/``vera_B``).
        dropout: dropout probability on the adapter's input (training only).
        d_initial: initial value of every ``vera_lambda_d`` entry.
        init: ``"default"`` (``λ_b = 0``, ``λ_d = d_initial``) or ``"random"`` (both standard
            normal: a non-identity start, for tests).
    """

    key: ClassVar[str] = "vera"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    r: int = 256
    projection_prng_key: int = 0
    dropout: float = 0.0
    d_initial: float = 0.1
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_number(self, "dropout", "d_initial")
        check_int(self, "projection_prng_key")
        check_probability(self, "dropout")
        check_choice(self, "init", INITS)

    def check(self, layer: Layer) -> Optional[str]:
        return tied_weights_reason(layer)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: uniform with bound ``sqrt(3) * sqrt(2) / sqrt(fan_in)``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``vera_A`` ``(r, max_in)`` and ``vera_B`` ``(max_out, r)`` as PEFT draws them from ``key``."""
    gen = torch.Generator(device="cpu").manual_seed(key)
    a = kaiming_uniform((r, max_in), gen)
    b = kaiming_uniform((max_out, r), gen)
    return a, b


class VeRARewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``y + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))``."""

    rule: VeRA

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        shared_a, shared_b = (scoped_tensor_name(n, ctx.adapter_name) for n in (SHARED_A, SHARED_B))
        max_out, r = get_tensor(gm, shared_b).shape
        max_in = get_tensor(gm, shared_a).shape[1]
        if rule.init == "random":
            gen = layer_generator(ctx.seed, layer)
            lam_b = torch.randn(layer.out_features, generator=gen)
            lam_d = torch.randn(r, generator=gen)
        else:
            lam_b = torch.zeros(layer.out_features)
            lam_d = torch.full((r,), float(rule.d_initial))
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        aid, y, g = branch_builder(gm, layer, ctx, InsertVeRA.name, rule)
        b_vec = g.param(names["lambda_b"], lam_b.to(weight), Role.ADAPTER)
        d_vec = g.param(names["lambda_d"], lam_d.to(weight), Role.ADAPTER)
        a_mat = g.attr(shared_a)
        b_mat = g.attr(shared_b)
        # slice only what is larger than this layer (no op when the layer is the largest)
        if layer.in_features != max_in:
            a_mat = g.call(aten.slice.Tensor, a_mat, 1, 0, layer.in_features)
        if layer.out_features != max_out:
            b_mat = g.call(aten.slice.Tensor, b_mat, 0, 0, layer.out_features)
        x = adapter_dropout(g, layer_input(layer), rule.dropout)
        low = g.call(aten.mul.Tensor, g.call(aten.linear.default, x, a_mat), d_vec)
        up = g.call(aten.mul.Tensor, g.call(aten.linear.default, low, b_mat), b_vec)
        joined = join_output(g, y, up)
        record_adapter(gm, aid, layer, ctx, rule, VeRAMethod.name, {**names, "A": shared_a, "B": shared_b}, joined)


def tensor_names(layer: Layer) -> dict[str, str]:
    """PEFT's state-dict keys for a VeRA layer's own vectors."""
    return {"lambda_b": f"{layer.path}.vera_lambda_b", "lambda_d": f"{layer.path}.vera_lambda_d"}


@register_pass
class InsertVeRA(SharedTensorsPass):
    """Creates the shared projections, then inserts a VeRA branch on every selected layer.

    All VeRA rules of a plan share one ``vera_A``/``vera_B`` (per adapter name, PEFT's
    ``base_model.vera_A.<adapter name>``), so they must agree on ``r`` and
    ``projection_prng_key`` (PEFT has the same constraint across adapters).
    """

    name = "insert_vera"
    rewrite_class = VeRARewrite
    shared_names = (SHARED_A, SHARED_B)
    shared_options = ("r", "projection_prng_key")
    label = "VeRA"
    shared_noun = "projections"

    def make_shared(self, rule: VeRA, max_in: int, max_out: int) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return shared_projections(rule.r, max_in, max_out, rule.projection_prng_key)


class VeRAMethod(SharedTensorsMethod):
    """VeRA for the core: additive merge ``ΔW = (λ_b ⊙ B[:out]) (λ_d ⊙ A[:, :in])``; PEFT
    interop keeps ``vera_A``/``vera_B`` at ``base_model.vera_A``/``vera_B``."""

    name = "vera"
    rule = VeRA
    shared_names = InsertVeRA.shared_names
    peft_type = "VERA"
    peft_options = {"r": "r", "projection_prng_key": "projection_prng_key", "dropout": "vera_dropout",
                    "d_initial": "d_initial"}

    def make_pass(self, rules: Sequence[Rule]) -> InsertVeRA:
        return InsertVeRA([r for r in rules if isinstance(r, VeRA)])

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        t = record["tensors"]
        a = get_tensor(gm, t["A"]).detach()[:, : record["in_features"]]
        b = get_tensor(gm, t["B"]).detach()[: record["out_features"], :]
        lam_b = get_tensor(gm, t["lambda_b"]).detach().unsqueeze(-1)
        lam_d = get_tensor(gm, t["lambda_d"]).detach().unsqueeze(-1)
        delta = (lam_b * b) @ (lam_d * a)
        return delta.T if record["fan_in_fan_out"] else delta


register_method(VeRAMethod.name, VeRAMethod())
