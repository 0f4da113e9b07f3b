"""Trainable tokens, as PEFT's ``TrainableTokens`` (and LoRA's ``trainable_token_indices``):
chosen rows of an embedding (token ids) train, the rest of the matrix stays frozen.

The layer reads ``W' = W.index_put([indices], values)``: the rows ``indices`` of the weight are
replaced by the trainable ``values``, as PEFT's ``get_merged_weights`` does (``index_copy``), so
outputs equal PEFT's bit for bit, and merging writes ``values`` into ``W``. The new weight is
the join (its first argument is ``W``, what it wraps), feeding every layer that reads ``W``: a
tied output head (``lm_head`` sharing the input embedding) gets the same rows, as PEFT ties its
adapter there. On a linear layer the rows are output features (an output head's tokens).

Tensors (PEFT's names): ``<path>.trainable_tokens_delta`` ``(len(indices), dim)`` -- despite the
name, the rows' new values, not a difference -- and the frozen constant
``<path>.trainable_tokens_indices`` (PEFT keeps the indices in its config, not in the file).
Init: the rows' current values (a no-op until trained), or standard normal (``init="random"``,
PEFT's ``init_weights=False``). Like PEFT the weight is rebuilt every forward (a copy of the
matrix) and its gradient is dense before the rows are taken.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import PlanError
from graphpeft.graph import (GraphBuilder, Layer, Provenance, Role, adapter_id, adapter_name_of, adapters,
                             find_layers, get_tensor, scoped_tensor_name)
from graphpeft.infra import PassContext
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, check_choice
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult

from .layer_rewrite import LayerRewrite, LayerRewritePass, layer_generator, layer_weight, record_adapter

aten = torch.ops.aten

INITS = ("default", "random")


@register_rule
@dataclasses.dataclass
class TrainableTokens(Rule):
    """Train the rows ``token_indices`` of an embedding (or of a linear output head).

    Args:
        targets: the embedding layer(s) (PEFT: ``embed_tokens``, or the model's input embeddings).
        token_indices: the token ids whose rows train (PEFT's ``token_indices``).
        init: ``"default"`` (the rows' current values: a no-op start) or ``"random"``
            (standard normal, as PEFT's ``init_weights=False``).
    """

    key: ClassVar[str] = "trainable_tokens"
    supported_kinds: ClassVar[tuple[str, ...]] = ("embedding", "linear")

    token_indices: Sequence[int] = ()
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        idx = self.token_indices
        if (not isinstance(idx, (list, tuple)) or not idx
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx)):
            raise PlanError(f"{self.key}: token_indices must be a non-empty list of token ids (integers >= 0), "
                            f"got {idx!r}")
        if len(set(idx)) != len(idx):
            twice = sorted(i for i in set(idx) if list(idx).count(i) > 1)
            raise PlanError(f"{self.key}: token_indices lists tokens twice: {twice}")
        self.token_indices = list(idx)
        check_choice(self, "init", INITS)

    def check(self, layer: Layer) -> Optional[str]:
        vocab = vocab_size(layer)
        if max(self.token_indices) >= vocab:
            return f"token index {max(self.token_indices)} is out of range: the layer has {vocab} tokens (rows)"
        if layer.fan_in_fan_out:
            return "the weight is stored (in, out) (GPT-2's Conv1D): its tokens are not rows; PEFT has no such layer"
        if layer.calls:
            return f"the module is called {len(layer.calls)} times; trainable tokens there are not supported"
        return None


def vocab_size(layer: Layer) -> int:
    """Rows of the layer's weight: an embedding's tokens, a linear head's outputs."""
    return layer.in_features if layer.kind == "embedding" else layer.out_features


class TrainableTokensRewrite(LayerRewrite):
    """Rewrites ``op(x, W)`` (every op reading ``W``) into ``op(x, W.index_put([indices], values))``."""

    rule: TrainableTokens

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        layer: Layer = match.bindings["layer"]
        for rec in adapters(gm).values():
            if (rec["method"] == TrainableTokensMethod.name and rec["weight"] == layer.weight
                    and adapter_name_of(rec) == ctx.adapter_name):
                return f"its weight is tied to {rec['layer']}, which already has trainable tokens (they are shared)"
        return super().check(gm, match, ctx)

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        rule = self.rule
        weight = get_tensor(gm, layer.weight)
        indices = torch.tensor(rule.token_indices, dtype=torch.long)
        if rule.init == "random":
            values = torch.randn(len(indices), weight.shape[1], generator=layer_generator(ctx.seed, layer))
        else:
            values = weight.detach()[indices].clone()
        names = {k: scoped_tensor_name(v, ctx.adapter_name) for k, v in tensor_names(layer).items()}
        aid = adapter_id(layer.path, ctx.adapter_name)
        # every op reading W (a tied head too) reads the new weight; build it before the first
        readers = [l for l in find_layers(gm) if l.weight == layer.weight]
        first = min((l.node for l in readers), key=_position(gm))
        g = GraphBuilder(gm, first.prev, Provenance(InsertTrainableTokens.name, rule.name, layer.path, adapter=aid),
                         module_stack=first.meta.get("nn_module_stack"))
        v_node = g.param(names["values"], values.to(weight), Role.ADAPTER)
        i_node = g.param(names["indices"], indices.to(weight.device), Role.ADAPTER_CONST)
        w_node = layer_weight(layer)
        joined = g.call(aten.index_put.default, w_node, [i_node], v_node)
        joined.meta["graphpeft"]["part"] = "join"
        for reader in readers:
            reader.node.replace_input_with(layer_weight(reader), joined)
        tied = sorted({l.path for l in readers} - {layer.path})
        record_adapter(gm, aid, layer, ctx, rule, TrainableTokensMethod.name, names, joined, tied=tied)


def _position(gm: fx.GraphModule) -> Any:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda node: order[node]


def tensor_names(layer: Layer) -> dict[str, str]:
    """PEFT's state-dict key for the rows, and ours for the (unsaved) indices."""
    return {"values": f"{layer.path}.trainable_tokens_delta", "indices": f"{layer.path}.trainable_tokens_indices"}


@register_pass
class InsertTrainableTokens(LayerRewritePass):
    """Makes the chosen rows of every layer the given rules select trainable."""

    name = "insert_trainable_tokens"
    rewrite_class = TrainableTokensRewrite


class TrainableTokensMethod(AdapterMethod):
    """Trainable tokens for the core: the merge writes the rows into the weight."""

    name = "trainable_tokens"
    rule = TrainableTokens
    additive = False
    peft_type = "TRAINABLE_TOKENS"
    peft_options = {"token_indices": "token_indices"}
    #: the indices live in PEFT's config (token_indices), not in its file
    peft_unsaved = ("indices",)

    def make_pass(self, rules: Sequence[Rule]) -> InsertTrainableTokens:
        return InsertTrainableTokens([r for r in rules if isinstance(r, TrainableTokens)])

    def merged_tensors(self, gm: fx.GraphModule, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        weight = get_tensor(gm, record["weight"]).detach()
        values = get_tensor(gm, record["tensors"]["values"]).detach().to(weight.dtype)
        indices = get_tensor(gm, record["tensors"]["indices"]).to(weight.device)
        return {record["weight"]: weight.index_put((indices,), values)}

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        weight = get_tensor(gm, record["weight"]).detach()
        return self.merged_tensors(gm, record)[record["weight"]] - weight


register_method(TrainableTokensMethod.name, TrainableTokensMethod())
