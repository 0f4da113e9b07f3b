"""SLTrain (Han et al., 2024, arXiv 2406.02214): a sparse plus low-rank update of a frozen weight.

SLTrain parameterises a weight as a low-rank product plus a sparse matrix whose support is drawn
uniformly at random once and then fixed; only the low-rank factors and the sparse values train.
For fine-tuning the pretrained weight stays frozen and the sum is the adapter::

    y = linear(x, W + ΔW, b),    ΔW = scaling · B A + S,    scaling = alpha / r

Tensors per layer, prefixed with the method's name as PEFT names its tensors: ``<path>.sltrain_A``
``(r, in)`` and ``<path>.sltrain_B`` ``(out, r)``, :attr:`Role.ADAPTER`; ``<path>.sltrain_values``
``(nnz,)``, :attr:`Role.ADAPTER`, the values of ``S``; ``<path>.sltrain_indices`` ``(nnz,)``
int64, :attr:`Role.ADAPTER_CONST`, the support as sorted flat indices into the weight as stored
(the official code's ``sparse_index``: ``randperm(out·in)[:nnz]`` sorted), regenerated from the
seed on compile and saved in adapter files. ``nnz = int(density · out · in)`` as in the official
code. Initialisation follows the official code for the factors (A Kaiming-uniform with
``a = sqrt(5)``, B zero); the sparse values start at zero (``init="default"``) so a fresh adapter
is the identity, as a fine-tuning adapter must be. The official code, written for pretraining
where ``BA + S`` *is* the weight, draws them uniform in ``±1/sqrt(in)``: ``init="uniform"``.

Forward form. The graph builds the dense ``ΔW`` and re-points the layer op's weight argument to
``W + ΔW`` (one matmul per layer, like SHiRA), instead of adding a LoRA branch on the output
beside a sparse-updated weight. Training the sparse values needs the dense weight gradient
``dW = dyᵀx`` of the layer in either form; from it the factors' gradients cost ``out·in·r`` each
whatever the batch, while a LoRA branch costs ``3·T·r·(in + out)`` for ``T`` tokens. The weight
form is therefore cheaper once ``T > out·in / (in + out)`` (512 tokens on a 1024 x 1024 layer),
i.e. for training batches, and it is what the official kernel computes (``W = B·(A·s)``,
``scatter_add`` of the values, one ``linear``; backward from the dense weight gradient). A
branch would be cheaper only for tiny unmerged batches (decoding), where a merged model
(exact) is the better choice anyway. One node, ``W + ΔW``, is the adapter's join: merge points
the op back at ``W`` and folds ``ΔW`` in.

Linear layers only (GPT-2's Conv1D included: ``ΔW`` and its support are built in the stored
``(in, out)`` layout). PEFT has no SLTrain, so there is no PEFT interop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import PlanError
from graphpeft.graph import GraphBuilder, Layer, Provenance, Role, adapter_id, get_tensor, scoped_tensor_name
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice, check_int, check_number, check_positive_int, is_number
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .layer_rewrite import (LayerRewrite, LayerRewritePass, layer_generator, layer_weight, rank_reason, record_adapter,
                            tied_weights_reason)

aten = torch.ops.aten

INITS = ("default", "uniform", "random")


@register_rule
@dataclasses.dataclass
class SLTrain(Rule):
    """Sparse plus low-rank adapter: ``ΔW = (alpha / r) · B A + S``, ``S`` on a fixed random support.

    Args:
        targets: layers to adapt (regex on the module path, list of name suffixes, or
            ``"all-linear"``).
        r: rank of ``B A`` (8: the rank of the paper's GLUE fine-tuning runs).
        alpha: scaling numerator; the low-rank part is multiplied by ``alpha / r`` (32: the
            official code's ``lora_alpha`` default).
        density: share ``δ`` of the weight's entries in the sparse support (0.03: the paper's
            value throughout); ``int(δ · out · in)`` entries per layer.
        random_seed: seed of the sparse support; ``None`` derives it from the compile seed and
            the layer path.
        init: ``"default"`` (A Kaiming-uniform, B and S zero: the identity), ``"uniform"`` (the
            official pretraining init: S uniform in ``±1/sqrt(in)``, not the identity) or
            ``"random"`` (A, B and S all random: a non-identity start, for tests).
    """

    key: ClassVar[str] = "sltrain"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    r: int = 8
    alpha: float = 32.0
    density: float = 0.03
    random_seed: Optional[int] = None
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r")
        check_number(self, "alpha")
        if not is_number(self.density) or not 0.0 < float(self.density) < 1.0:
            raise PlanError(f"sltrain: density must be a number in (0, 1) (the share of entries in the sparse "
                            f"support; the paper uses 0.03), got {self.density!r}")
        check_int(self, "random_seed", optional=True)
        check_choice(self, "init", INITS)

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor of the low-rank part."""
        return float(self.alpha) / self.r

    def num_entries(self, layer: Layer) -> int:
        """Entries of the sparse support on ``layer``: ``int(density · out · in)`` (official)."""
        return int(float(self.density) * layer.out_features * layer.in_features)

    def check(self, layer: Layer) -> Optional[str]:
        if (reason := rank_reason(self.r, layer)) is not None:
            return reason
        if self.num_entries(layer) < 1:
            return (f"density={self.density} gives no sparse entry on this {layer.out_features} x "
                    f"{layer.in_features} weight; use a larger density")
        return tied_weights_reason(layer)


def sparse_support(numel: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct flat indices into a weight of ``numel`` entries, uniformly at random
    and sorted, as the official code draws them (``randperm(numel)[:count]``, sorted)."""
    return torch.randperm(numel, generator=generator)[:count].sort().values.to(torch.int64)


def init_tensors(layer: Layer, rule: SLTrain, seed: int) -> dict[str, torch.Tensor]:
    """A ``(r, in)``, B ``(out, r)``, the support (flat, sorted) and its values, drawn from the
    layer's generator in the official order (A, then the support, then the values)."""
    gen = layer_generator(seed, layer)
    a = torch.empty(rule.r, layer.in_features)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    b = torch.zeros(layer.out_features, rule.r)
    support_gen = torch.Generator().manual_seed(rule.random_seed) if rule.random_seed is not None else gen
    indices = sparse_support(layer.out_features * layer.in_features, rule.num_entries(layer), support_gen)
    values = torch.zeros(indices.numel())
    if rule.init == "uniform":
        bound = 1.0 / math.sqrt(layer.in_features)
        values.uniform_(-bound, bound, generator=gen)
    elif rule.init == "random":
        torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)
        values.normal_(0.0, 0.02, generator=gen)
    return {"A": a, "B": b, "indices": indices, "values": values}


class SLTrainRewrite(LayerRewrite):
    """Rewrites ``op(x, W)`` into ``op(x, W + ΔW)`` with
    ``ΔW = view(index_put(view(B · (A · scaling), -1), [indices], values, accumulate))``."""

    rule: SLTrain

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        init = init_tensors(layer, rule, ctx.seed)
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        aid = adapter_id(layer.path, ctx.adapter_name)
        prov = Provenance(InsertSLTrain.name, rule.name, layer.path, adapter=aid)
        y = layer.node
        w_node = layer_weight(layer)  # W, or the join of an adapter already re-pointing it
        # ΔW must exist before the layer op reads it: build just before the op
        g = GraphBuilder(gm, y.prev, prov, module_stack=y.meta.get("nn_module_stack"))
        a = g.param(names["A"], init["A"].to(weight), Role.ADAPTER)
        b = g.param(names["B"], init["B"].to(weight), Role.ADAPTER)
        v = g.param(names["values"], init["values"].to(weight), Role.ADAPTER)
        idx = g.param(names["indices"], init["indices"].to(weight.device), Role.ADAPTER_CONST)
        # the scaling goes on the small factor (r x in), as the official kernel does: not on ΔW
        a_s = g.call(aten.mul.Tensor, a, rule.scaling)
        if layer.fan_in_fan_out:  # stored (in, out): ΔWᵀ = (A s)ᵀ Bᵀ, contiguous for the flat view
            low = g.call(aten.mm.default, g.call(aten.t.default, a_s), g.call(aten.t.default, b))
        else:
            low = g.call(aten.mm.default, b, a_s)
        flat = g.call(aten.view.default, low, [-1])
        flat = g.call(aten.index_put.default, flat, [idx], v, True)
        delta = g.call(aten.view.default, flat, list(weight.shape))
        joined = g.call(aten.add.Tensor, w_node, delta)
        joined.meta["graphpeft"]["part"] = "join"
        y.replace_input_with(w_node, joined)
        record_adapter(gm, aid, layer, ctx, rule, SLTrainMethod.name, names, joined, scaling=rule.scaling)


def tensor_names(layer: Layer) -> dict[str, str]:
    """Graph (and adapter-file) names of one layer's SLTrain tensors."""
    return {"A": f"{layer.path}.sltrain_A", "B": f"{layer.path}.sltrain_B",
            "values": f"{layer.path}.sltrain_values", "indices": f"{layer.path}.sltrain_indices"}


@register_pass
class InsertSLTrain(LayerRewritePass):
    """Inserts an SLTrain update on every layer selected by the given SLTrain rules."""

    name = "insert_sltrain"
    rewrite_class = SLTrainRewrite


class SLTrainMethod(AdapterMethod):
    """SLTrain for the core: additive, exact merge ``W + scaling · B A + scatter(S)``."""

    name = "sltrain"
    rule = SLTrain

    def make_pass(self, rules: Sequence[Rule]) -> InsertSLTrain:
        return InsertSLTrain([r for r in rules if isinstance(r, SLTrain)])

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        t = record["tensors"]
        w = get_tensor(gm, record["weight"])
        a = get_tensor(gm, t["A"]).detach()
        b = get_tensor(gm, t["B"]).detach()
        values = get_tensor(gm, t["values"]).detach()
        indices = get_tensor(gm, t["indices"]).long()
        # the same products as the forward (scaling on A), so merged and unmerged outputs agree
        a_s = a * record["scaling"]
        low = a_s.T @ b.T if record["fan_in_fan_out"] else b @ a_s
        return low.reshape(-1).index_put((indices,), values, accumulate=True).view(w.shape)

    def add_delta_(self, gm: fx.GraphModule, record: dict[str, Any], alpha: float = 1.0) -> None:
        # fuse / unfuse in place without an (out x in) ΔW temporary: one GEMM accumulated into W,
        # then a scatter of the sparse values into the flat weight
        t = record["tensors"]
        w = get_tensor(gm, record["weight"])
        a = get_tensor(gm, t["A"]).detach().to(w.dtype)
        b = get_tensor(gm, t["B"]).detach().to(w.dtype)
        values = get_tensor(gm, t["values"]).detach().to(w.dtype)
        indices = get_tensor(gm, t["indices"]).long()
        s = record["scaling"] * alpha
        if record["fan_in_fan_out"]:
            w.addmm_(a.T, b.T, alpha=s)
        else:
            w.addmm_(b, a, alpha=s)
        if w.is_contiguous():
            w.view(-1).scatter_add_(0, indices, values if alpha == 1.0 else values * alpha)
        else:  # no flat view of a strided weight: scatter by (row, column)
            w.index_put_((indices // w.shape[1], indices % w.shape[1]), values * alpha, accumulate=True)


register_method(SLTrainMethod.name, SLTrainMethod())
