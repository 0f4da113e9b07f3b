"""RandLoRA (Albert et al., ICLR 2025): a full-rank update built from shared frozen random
low-rank bases, with only per-layer diagonal scalings trained, exactly as PEFT implements it.

For a layer with ``d = min(in, out)``, ``D = max(in, out)`` and ``n = ceil(d / r)`` bases::

    S    = λ[:, :, None] * A[:, :, :d] * γ[None]            # (r, n, d)
    U_A  = S.reshape(r·n, d)                                 # scaled small bases
    U_B  = B[:D, :n, :].reshape(D, n·r)                      # large bases
    in <= out:  y + scaling · (x U_Aᵀ) U_Bᵀ                  # ΔW = scaling · U_B U_A
    in >  out:  y + scaling · (x U_B) U_A                    # ΔW = scaling · U_Aᵀ U_Bᵀ

``A`` ``(r, 1, min_dim)`` and ``B`` ``(max_dim, N, r)`` are sized for the largest adapted
``(out, in)`` and sliced per layer. They are :attr:`Role.ADAPTER_CONST` graph tensors named
``randlora_A`` / ``randlora_B`` (PEFT's ``base_model.randlora_A`` / ``base_model.randlora_B``),
regenerated from ``projection_prng_key`` exactly as PEFT draws them (dense: Kaiming-uniform in
bfloat16 from one CPU generator, A first then B one basis at a time, each divided by its
standard deviation; ``sparse`` / ``very_sparse``: ternary bases from ``torch.rand``), so the
same key gives the same tensors in both. Note the two flattenings differ (``U_A`` rows run
rank-major, ``U_B`` columns basis-major): that pairing is PEFT's, kept for parity.

Per layer: ``<path>.randlora_lambda`` ``(r, n)`` and ``<path>.randlora_gamma`` ``(n, d)``,
PEFT's names and default init (λ zero: a fresh adapter is the identity; γ ``1 / max(n, d)``).
``scaling = alpha / r`` (PEFT's ``randlora_alpha``, default 640 with ``r = 32``: 20). Merge is
additive and exact. Linear layers only (GPT-2's Conv1D included), as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import Layer, Role, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext

from graphpeft.plan import (Rule, check_bool, check_choice, check_int, check_number, check_positive_int,
                            check_probability)
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .layer_rewrite import (LayerRewrite, SharedTensorsMethod, SharedTensorsPass, adapter_dropout, branch_builder,
                            join_output, layer_generator, layer_input, record_adapter, tied_weights_reason)

aten = torch.ops.aten

INITS = ("default", "random")
#: graph names of the shared bases (PEFT: ``base_model.randlora_A`` / ``base_model.randlora_B``)
SHARED_A = "randlora_A"
SHARED_B = "randlora_B"


@register_rule
@dataclasses.dataclass
class RandLoRA(Rule):
    """RandLoRA: shared frozen random bases, trainable per-layer ``λ`` and ``γ`` scalings.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: rank of each random basis (PEFT's default 32). Unlike LoRA, a smaller ``r`` means
            more bases (``ceil(min(in, out) / r)``) and more trainable parameters.
        alpha: scaling numerator, the branch is multiplied by ``alpha / r`` (PEFT's
            ``randlora_alpha``, default 640: "typically 20 times the rank").
        dropout: dropout probability on the adapter's input (training only).
        projection_prng_key: seed of the shared bases (PEFT's name and default, so a PEFT
            RandLoRA adapter with the same key has the same ``randlora_A`` / ``randlora_B``).
        sparse: ternary sparse bases (entries -1/0/1 with probabilities 1/6, 2/3, 1/6), as PEFT.
        very_sparse: ternary bases with probability ``1/sqrt(min_dim)`` for ±1 (wins over
            ``sparse`` when both are set, as in PEFT).
        init: ``"default"`` (λ zero, γ ``1/max(n, d)``: the identity, PEFT's init) or
            ``"random"`` (λ standard normal, γ normal with std ``1/d``: a non-identity start,
            for tests).
    """

    key: ClassVar[str] = "randlora"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    r: int = 32
    alpha: float = 640
    dropout: float = 0.0
    projection_prng_key: int = 0
    sparse: bool = False
    very_sparse: bool = False
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_number(self, "alpha", "dropout")
        check_probability(self, "dropout")
        check_int(self, "projection_prng_key")
        check_bool(self, "sparse", "very_sparse")
        check_choice(self, "init", INITS)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def check(self, layer: Layer) -> Optional[str]:
        return tied_weights_reason(layer)


def num_bases(min_dim: int, r: int) -> int:
    """PEFT's number of bases for full rank: ``ceil(min_dim / r)``."""
    return -(-min_dim // r)


def _kaiming_bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    # PEFT's _kaiming_init draws in bfloat16 (float16 only where accelerate reports no bf16
    # support, i.e. on a CUDA device without it); drawing in float32 would give other values
    t = torch.empty(shape, dtype=torch.bfloat16)
    return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator)


def shared_bases(r: int, max_out: int, max_in: int, key: int, sparse: bool = False,
                 very_sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``randlora_A`` ``(r, 1, min_dim)`` and ``randlora_B`` ``(max_dim, n, r)`` as PEFT draws
    them from ``key`` (float32; PEFT casts them to the layers' dtype the same way)."""
    max_dim, min_dim = max(max_out, max_in), min(max_out, max_in)
    n = num_bases(min_dim, r)
    gen = torch.Generator(device="cpu").manual_seed(key)
    if very_sparse or sparse:
        sparsity = math.sqrt(min_dim) if very_sparse else 3
        a = torch.rand((r, 1, min_dim), generator=gen)
        b = torch.rand((max_dim, n, r), generator=gen)
        ternary = []
        for dense in (a, b):
            t = torch.zeros(dense.shape)
            t[dense < 1 / (2 * sparsity)] = -1
            t[dense > 1 - 1 / (2 * sparsity)] = 1
            ternary.append(t / t.std())
        return ternary[0], ternary[1]
    a = _kaiming_bf16((r, 1, min_dim), gen)
    b = torch.cat([_kaiming_bf16((max_dim, 1, r), gen) for _ in range(n)], dim=1)
    return (a / a.std()).float(), (b / b.std()).float()


class RandLoRARewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``y + scaling · (x U_Aᵀ) U_Bᵀ`` (or its ``in > out`` form)."""

    rule: RandLoRA

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        shared_a, shared_b = (scoped_tensor_name(n, ctx.adapter_name) for n in (SHARED_A, SHARED_B))
        big_a, big_b = get_tensor(gm, shared_a), get_tensor(gm, shared_b)
        r = rule.r
        d, big_d = min(layer.in_features, layer.out_features), max(layer.in_features, layer.out_features)
        n = num_bases(d, r)
        lam, gam = _init_scalings(layer, rule, ctx.seed, n, d)
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        aid, y, g = branch_builder(gm, layer, ctx, InsertRandLoRA.name, rule)
        lam_node = g.param(names["lambda"], lam.to(weight), Role.ADAPTER)
        gam_node = g.param(names["gamma"], gam.to(weight), Role.ADAPTER)
        a = g.attr(shared_a)
        b = g.attr(shared_b)
        # slice only what is larger than this layer (no op for the largest layer)
        if d != big_a.shape[2]:
            a = g.call(aten.slice.Tensor, a, 2, 0, d)
        if big_d != big_b.shape[0]:
            b = g.call(aten.slice.Tensor, b, 0, 0, big_d)
        if n != big_b.shape[1]:
            b = g.call(aten.slice.Tensor, b, 1, 0, n)
        # PEFT's UniqueBaseGrad: λ[:, :, None] * A * γ[None], in that order
        scaled = g.call(aten.mul.Tensor, g.call(aten.mul.Tensor, g.call(aten.unsqueeze.default, lam_node, -1), a),
                        g.call(aten.unsqueeze.default, gam_node, 0))
        u_a = g.call(aten.view.default, scaled, [r * n, d])
        # a basis slice of B is not contiguous: reshape, not view
        u_b = g.call(aten.reshape.default, b, [big_d, n * r])
        x = adapter_dropout(g, layer_input(layer), rule.dropout)
        if layer.in_features <= layer.out_features:  # U_A reads the input (PEFT: min_dim == in_features)
            low = g.call(aten.linear.default, x, u_a)
            up = g.call(aten.linear.default, low, u_b)
        else:
            low = g.call(aten.linear.default, x, g.call(aten.t.default, u_b))
            up = g.call(aten.linear.default, low, g.call(aten.t.default, u_a))
        joined = join_output(g, y, g.call(aten.mul.Tensor, up, rule.scaling))
        record_adapter(gm, aid, layer, ctx, rule, RandLoRAMethod.name, {**names, "A": shared_a, "B": shared_b},
                       joined, scaling=rule.scaling, num_bases=n)


def _init_scalings(layer: Layer, rule: RandLoRA, seed: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    if rule.init == "random":
        gen = layer_generator(seed, layer)
        return torch.randn(rule.r, n, generator=gen), torch.randn(n, d, generator=gen) / d
    # PEFT's reset_randlora_parameters: λ = 0, γ = 1 / max(γ.shape)
    return torch.zeros(rule.r, n), torch.full((n, d), 1.0 / max(n, d))


def tensor_names(layer: Layer) -> dict[str, str]:
    """PEFT's state-dict keys for a RandLoRA layer's own tensors."""
    return {"lambda": f"{layer.path}.randlora_lambda", "gamma": f"{layer.path}.randlora_gamma"}


@register_pass
class InsertRandLoRA(SharedTensorsPass):
    """Creates the shared bases, then inserts a RandLoRA branch on every selected layer.

    All RandLoRA rules of a plan share one ``randlora_A`` / ``randlora_B`` (per adapter name,
    PEFT's ``base_model.randlora_A.<adapter name>``, sized as PEFT's ``_find_dim``), so they must
    agree on ``r``, ``projection_prng_key``, ``sparse`` and ``very_sparse`` (one PEFT config holds
    one of each).
    """

    name = "insert_randlora"
    rewrite_class = RandLoRARewrite
    shared_names = (SHARED_A, SHARED_B)
    shared_options = ("r", "projection_prng_key", "sparse", "very_sparse")
    label = "RandLoRA"
    shared_noun = "bases"

    def make_shared(self, rule: RandLoRA, max_in: int,  # type: ignore[override]
                    max_out: int) -> tuple[torch.Tensor, ...]:
        return shared_bases(rule.r, max_out, max_in, rule.projection_prng_key, rule.sparse, rule.very_sparse)


class RandLoRAMethod(SharedTensorsMethod):
    """RandLoRA for the core: additive merge ``ΔW = scaling · U_B U_A`` (``U_Aᵀ U_Bᵀ`` when
    ``in > out``), PEFT interop under ``peft_type`` ``RANDLORA``."""

    name = "randlora"
    rule = RandLoRA
    shared_names = InsertRandLoRA.shared_names
    peft_type = "RANDLORA"
    peft_options = {"r": "r", "alpha": "randlora_alpha", "dropout": "randlora_dropout",
                    "projection_prng_key": "projection_prng_key", "sparse": "sparse", "very_sparse": "very_sparse"}

    def peft_aliases(self, records: Sequence[dict[str, Any]]) -> dict[str, str]:
        """PEFT's file repeats the shared bases under every adapted layer (each layer holds a
        reference to the tuner's buffers): ``<layer>.randlora_A`` -> ``base_model.randlora_A``."""
        return {f"base_model.model.{rec['layer']}.{shared}": f"base_model.{shared}"
                for rec in records for shared in self.shared_names}

    def make_pass(self, rules: Sequence[Rule]) -> InsertRandLoRA:
        return InsertRandLoRA([r for r in rules if isinstance(r, RandLoRA)])

    def scaled_bases(self, gm: fx.GraphModule, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, second)`` with ``ΔW = scaling · second @ first`` in ``(out, in)`` layout:
        the two matrices the forward applies to the input, in order."""
        t = record["tensors"]
        n = record["num_bases"]
        d = min(record["in_features"], record["out_features"])
        big_d = max(record["in_features"], record["out_features"])
        lam = get_tensor(gm, t["lambda"]).detach()
        gam = get_tensor(gm, t["gamma"]).detach()
        a = get_tensor(gm, t["A"]).detach()[:, :, :d]
        b = get_tensor(gm, t["B"]).detach()[:big_d, :n, :]
        u_a = (lam[:, :, None] * a * gam[None]).reshape(-1, d)
        u_b = b.reshape(big_d, -1)
        if record["in_features"] <= record["out_features"]:
            return u_a, u_b
        return u_b.T, u_a.T

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        first, second = self.scaled_bases(gm, record)
        delta = (second @ first) * record["scaling"]
        return delta.T if record["fan_in_fan_out"] else delta


register_method(RandLoRAMethod.name, RandLoRAMethod())
