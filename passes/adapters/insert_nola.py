"""NOLA (Koohpayegani et al., ICLR 2024): LoRA whose factors are linear combinations of frozen
seeded random bases; only the mixing coefficients train::

    A = A₀ + Σᵢ αᵢ Aᵢ          (k bases Aᵢ of shape r × in)
    B =      Σⱼ βⱼ Bⱼ          (l bases Bⱼ of shape out × r)
    y + scaling · B (A x),     scaling = alpha / r,    ΔW = scaling · B A

This follows the official code (github.com/UCDvision/NOLA, ``NOLALinear`` in its GPT-2 and
LLaMA ``lora.py``): each factor is a frozen ``nn.Linear`` weight plus the generated mixture;
the A weight ``A₀`` is Kaiming-uniform (``a = √5``, LoRA's init of A), the B weight is zero,
and both coefficient vectors start at zero, so a fresh adapter is the identity and β gets a
gradient at once (through ``A₀ x``). The bases are uniform in ``[-1, 1]`` divided by
``sqrt(num_basis)``, as its ``GenerateParams`` draws them. The paper writes the same update
without ``A₀`` (``A = Σ αᵢ Aᵢ``); with α and β both zero that form has no gradient, which is why
the code keeps the frozen A weight.

Tensors: per layer ``<path>.nola_alpha`` ``(k,)`` and ``<path>.nola_beta`` ``(l,)``
(:attr:`Role.ADAPTER`), and ``<path>.nola_A0`` ``(r, in)`` (:attr:`Role.ADAPTER_CONST`); the bases
``nola_basis_A_<k>x<r>x<in>`` ``(k, r, in)`` and ``nola_basis_B_<l>x<out>x<r>`` ``(l, out, r)``
(:attr:`Role.ADAPTER_CONST`) are shared by every adapted layer of that input (output) size, which
bounds their memory the way VeRA's shared projections do (the official code draws bases per layer
on the fly). All constants are regenerated from ``projection_prng_key`` (and the layer path for
``A₀``), so adapter files hold only the ``k + l`` coefficients per layer. Merge is additive and
exact. Linear layers only (GPT-2's Conv1D included). PEFT has no NOLA.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import Layer, Role, get_tensor, register_tensor, roles, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice, check_int, check_number, check_positive_int, check_probability
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .layer_rewrite import (LayerRewrite, LayerRewritePass, adapter_dropout, branch_builder, join_output,
                            layer_generator, layer_input, rank_reason, record_adapter, tied_weights_reason)

aten = torch.ops.aten

INITS = ("default", "random")


@register_rule
@dataclasses.dataclass
class NOLA(Rule):
    """NOLA: LoRA factors mixed from frozen random bases; only the coefficients train.

    Defaults are the official code's LLaMA-2 setting (``scripts/finetune_llama2_*_nola.sh``:
    ``--lora_r 16 --nola_num_basis 512 --lora_alpha 4``): ``k + l = 1024`` trainable numbers
    per layer, whatever its size.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: rank of the LoRA factors.
        num_basis_A: number of random bases ``k`` mixed into A (``r × in``).
        num_basis_B: number of random bases ``l`` mixed into B (``out × r``).
        alpha: scaling numerator; the branch is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter's input (training only).
        projection_prng_key: seed of the bases and of ``A₀`` (they are regenerated from it).
        init: ``"default"`` (α = β = 0: the identity, as the official code) or ``"random"``
            (α, β standard normal: a non-identity start, for tests).
    """

    key: ClassVar[str] = "nola"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    r: int = 16
    num_basis_A: int = 512
    num_basis_B: int = 512
    alpha: float = 4.0
    dropout: float = 0.0
    projection_prng_key: int = 0
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r", "num_basis_A", "num_basis_B")
        check_number(self, "alpha", "dropout")
        check_probability(self, "dropout")
        check_int(self, "projection_prng_key")
        check_choice(self, "init", INITS)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def check(self, layer: Layer) -> Optional[str]:
        if (reason := rank_reason(self.r, layer)) is not None:
            return reason
        # more bases than entries span nothing new but cost (k, r, in) floats: refuse rather
        # than silently build huge constants on a small layer
        if self.num_basis_A > self.r * layer.in_features:
            return (f"num_basis_A={self.num_basis_A} exceeds the {self.r * layer.in_features} entries of A "
                    f"(r x in = {self.r} x {layer.in_features}); use num_basis_A <= {self.r * layer.in_features}")
        if self.num_basis_B > self.r * layer.out_features:
            return (f"num_basis_B={self.num_basis_B} exceeds the {self.r * layer.out_features} entries of B "
                    f"(out x r = {layer.out_features} x {self.r}); use num_basis_B <= {self.r * layer.out_features}")
        return tied_weights_reason(layer)


def basis_names(rule: NOLA, layer: Layer) -> dict[str, str]:
    """Graph names of the shared bases a layer reads (one pair per factor shape)."""
    return {"bases_A": f"nola_basis_A_{rule.num_basis_A}x{rule.r}x{layer.in_features}",
            "bases_B": f"nola_basis_B_{rule.num_basis_B}x{layer.out_features}x{rule.r}"}


def random_bases(shape: tuple[int, int, int], key: int) -> torch.Tensor:
    """``shape[0]`` bases uniform in ``[-1, 1] / sqrt(shape[0])`` (the official ``GenerateParams``),
    from a generator seeded by ``key`` and the shape, so every compile regenerates them."""
    tag = zlib.crc32("x".join(map(str, shape)).encode())
    gen = torch.Generator(device="cpu").manual_seed(key * 1_000_003 + tag)
    return torch.empty(shape).uniform_(-1.0, 1.0, generator=gen) / math.sqrt(shape[0])


def frozen_a(rule: NOLA, layer: Layer) -> torch.Tensor:
    """``A₀`` ``(r, in)``: Kaiming-uniform with ``a = √5`` (the official code's A weight),
    seeded by ``projection_prng_key`` and the layer path."""
    a0 = torch.empty(rule.r, layer.in_features)
    gen = layer_generator(rule.projection_prng_key, layer)
    return torch.nn.init.kaiming_uniform_(a0, a=math.sqrt(5), generator=gen)


class NOLARewrite(LayerRewrite):
    """Rewrites ``y = op(x, W)`` into ``y + scaling · B (A x)`` with A and B mixed from bases."""

    rule: NOLA

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        k, l, r = rule.num_basis_A, rule.num_basis_B, rule.r
        n_in, n_out = layer.in_features, layer.out_features
        bases = {key: scoped_tensor_name(name, ctx.adapter_name) for key, name in basis_names(rule, layer).items()}
        # a basis shape another layer (or rule) already registered is shared, not drawn again
        for key, shape in (("bases_A", (k, r, n_in)), ("bases_B", (l, n_out, r))):
            if bases[key] not in roles(gm):
                register_tensor(gm, bases[key], random_bases(shape, rule.projection_prng_key).to(weight),
                                Role.ADAPTER_CONST)
        if rule.init == "random":
            gen = layer_generator(ctx.seed, layer)
            alpha, beta = torch.randn(k, generator=gen), torch.randn(l, generator=gen)
        else:
            alpha, beta = torch.zeros(k), torch.zeros(l)
        names = {key: scoped_tensor_name(v, ctx.adapter_name) for key, v in tensor_names(layer).items()}
        aid, y, g = branch_builder(gm, layer, ctx, InsertNOLA.name, rule)
        alpha_node = g.param(names["alpha"], alpha.to(weight), Role.ADAPTER)
        beta_node = g.param(names["beta"], beta.to(weight), Role.ADAPTER)
        a0 = g.param(names["A0"], frozen_a(rule, layer).to(weight), Role.ADAPTER_CONST)
        # Σ αᵢ Aᵢ as one (1, k) @ (k, r·in) product, then back to (r, in)
        flat_a = g.call(aten.view.default, g.attr(bases["bases_A"]), [k, r * n_in])
        mix_a = g.call(aten.mm.default, g.call(aten.unsqueeze.default, alpha_node, 0), flat_a)
        a = g.call(aten.add.Tensor, g.call(aten.view.default, mix_a, [r, n_in]), a0)
        flat_b = g.call(aten.view.default, g.attr(bases["bases_B"]), [l, n_out * r])
        mix_b = g.call(aten.mm.default, g.call(aten.unsqueeze.default, beta_node, 0), flat_b)
        b = g.call(aten.view.default, mix_b, [n_out, r])
        x = adapter_dropout(g, layer_input(layer), rule.dropout)
        up = g.call(aten.linear.default, g.call(aten.linear.default, x, a), b)
        joined = join_output(g, y, g.call(aten.mul.Tensor, up, rule.scaling))
        record_adapter(gm, aid, layer, ctx, rule, NOLAMethod.name, {**names, **bases}, joined, scaling=rule.scaling)


def tensor_names(layer: Layer) -> dict[str, str]:
    """Names of a NOLA layer's own tensors: the coefficients and the frozen A weight."""
    return {"alpha": f"{layer.path}.nola_alpha", "beta": f"{layer.path}.nola_beta", "A0": f"{layer.path}.nola_A0"}


@register_pass
class InsertNOLA(LayerRewritePass):
    """Inserts a NOLA branch on every layer selected by the given NOLA rules (registering each
    basis shape once; rules may differ in every option)."""

    name = "insert_nola"
    rewrite_class = NOLARewrite


class NOLAMethod(AdapterMethod):
    """NOLA for the core: additive merge ``ΔW = scaling · B A``."""

    name = "nola"
    rule = NOLA

    def make_pass(self, rules: Sequence[Rule]) -> InsertNOLA:
        return InsertNOLA([r for r in rules if isinstance(r, NOLA)])

    def factors(self, gm: fx.GraphModule, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed factors ``A`` ``(r, in)`` and ``B`` ``(out, r)`` of one adapter."""
        t = record["tensors"]
        alpha = get_tensor(gm, t["alpha"]).detach()
        beta = get_tensor(gm, t["beta"]).detach()
        bases_a = get_tensor(gm, t["bases_A"]).detach()
        bases_b = get_tensor(gm, t["bases_B"]).detach()
        a = (alpha @ bases_a.flatten(1)).view(bases_a.shape[1:]) + get_tensor(gm, t["A0"]).detach()
        b = (beta @ bases_b.flatten(1)).view(bases_b.shape[1:])
        return a, b

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        a, b = self.factors(gm, record)
        delta = (b @ a) * record["scaling"]
        return delta.T if record["fan_in_fan_out"] else delta


register_method(NOLAMethod.name, NOLAMethod())
