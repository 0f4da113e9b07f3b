"""A constant causal attention mask becomes the fused attention's ``is_causal`` flag.

Tracing a decoder (``torch.export`` of a transformers model) materializes its causal mask as
~35 ops on ``arange`` (positions, ``cumsum``, ``index``, ``le``, ``where``) whose result is a
``[batch, 1, L, L]`` tensor of ``0`` / ``-inf`` that every attention op of the step reads,
forward and backward. When the mask depends on no graph input and no model tensor, its value
is known at compile time: if it is exactly the causal pattern (``0`` / ``True`` on and below
the diagonal, ``-inf`` / ``False`` above), ``_scaled_dot_product_flash_attention_for_cpu`` and
its backward get ``is_causal=True`` and no mask. The kernels then skip the blocks above the
diagonal instead of adding ``-inf`` to them, and the mask's ops die (``remove_dead_code``).
Bit-identical: masked scores contribute ``exp(-inf) = 0`` either way.

A step traced on the meta device (a plan for a model without weights) computes the mask's
constants on the CPU, so its graph is the CPU step's. Declines (with the reason): a mask
computed from an input (padding) or from a model tensor, one that is not causal, a non-square
score matrix, or non-float32 attention (``low_precision_attention`` handles those masks itself).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, val
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

aten = torch.ops.aten

FORWARD = aten._scaled_dot_product_flash_attention_for_cpu.default
BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
#: ops a constant mask may be computed with: at most this many of them are evaluated
MAX_MASK_NODES = 200


def _ancestors(mask: fx.Node) -> Optional[list[fx.Node]]:
    """The nodes ``mask`` is computed from, in graph order (None: more than the cap)."""
    seen: set[fx.Node] = set()
    todo = [mask]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > MAX_MASK_NODES:
            return None
        todo.extend(n.all_input_nodes)
    return [n for n in mask.graph.nodes if n in seen]


def constant_value(mask: fx.Node) -> tuple[Optional[torch.Tensor], str]:
    """The value of ``mask`` when it is computed from constants only, else (None, why not)."""
    nodes = _ancestors(mask)
    if nodes is None:
        return None, f"the mask is computed by more than {MAX_MASK_NODES} ops"
    env: dict[fx.Node, Any] = {}
    for n in nodes:
        if n.op == "placeholder":
            return None, f"the mask reads the graph input {n.name!r} (a padding mask)"
        if n.op != "call_function":
            return None, f"the mask reads the model tensor {n.target!r}"
        args, kwargs = fx.map_arg((n.args, n.kwargs), env.__getitem__)
        if kwargs.get("device") == torch.device("meta"):  # a meta plan: the same constants, on the CPU
            kwargs = {**kwargs, "device": torch.device("cpu")}
        try:
            env[n] = n.target(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure: the mask stays as traced
            return None, f"evaluating the mask failed at {n.name!r}: {type(e).__name__}: {e}"
    if not isinstance(env[mask], torch.Tensor) or env[mask].device.type == "meta":
        return None, "the mask has no values (meta device)"
    return env[mask], ""


def is_causal_pattern(mask: torch.Tensor, length: int) -> bool:
    """Whether ``mask`` (broadcast to ``[..., length, length]``) keeps exactly the scores on and
    below the diagonal: ``True`` / ``0`` there and ``False`` / ``-inf`` above."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (length, length):
        return False
    keep = torch.ones(length, length, dtype=torch.bool).tril()
    if mask.dtype == torch.bool:
        return bool((mask == keep).all())
    want = torch.zeros(length, length, dtype=mask.dtype).masked_fill(~keep, float("-inf"))
    return bool((mask == want).all())


def _provenance(new: fx.Node, old: fx.Node, rule: str) -> None:
    new.meta.update(old.meta)
    prov = dict(old.meta.get(META_KEY) or {})
    prov.update(pass_name=UseCausalAttention.name, rule=rule)
    new.meta[META_KEY] = prov


class CausalMaskToFlag(RewriteRule):
    """``flash_attention(q, k, v, attn_mask=causal)`` and its backward → ``is_causal=True``."""

    name = "causal_mask_to_flag"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target != FORWARD or not isinstance(node.kwargs.get("attn_mask"), fx.Node):
            return None
        return MatchResult.success(self.name, node, mask=node.kwargs["attn_mask"])

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        node, mask = match.node, match.bindings["mask"]
        q, k = val(node.args[0]), val(node.args[1])
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            return "no shapes recorded for the query and key"
        if q.dtype != torch.float32:
            return f"{q.dtype} attention (low_precision_attention reads its mask)"
        if q.shape[-2] != k.shape[-2]:
            return f"query length {q.shape[-2]} != key length {k.shape[-2]} (is_causal aligns top-left)"
        if (node.args[4] if len(node.args) > 4 else node.kwargs.get("is_causal", False)):
            return "already causal with a mask as well"
        value, why = constant_value(mask)
        if value is None:
            return why
        if not is_causal_pattern(value, int(q.shape[-2])):
            return "the mask is not the causal pattern"
        match.bindings["backward"] = [u for u in mask.users if u.target == BACKWARD]
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        node = match.node
        q, k, v, *rest = node.args
        dropout = rest[0] if rest else node.kwargs.get("dropout_p", 0.0)
        kwargs = {key: a for key, a in node.kwargs.items() if key not in ("attn_mask", "dropout_p", "is_causal")}
        self._swap(gm, node, (q, k, v, dropout, True), kwargs)
        for bwd in match.bindings["backward"]:
            if bwd.kwargs.get("attn_mask") is not match.bindings["mask"]:
                continue
            args = (*bwd.args[:7], True)
            kwargs = {key: a for key, a in bwd.kwargs.items() if key != "attn_mask"}
            self._swap(gm, bwd, args, kwargs)

    def _swap(self, gm: fx.GraphModule, old: fx.Node, args: tuple, kwargs: dict) -> None:
        with gm.graph.inserting_before(old):
            new = gm.graph.call_function(old.target, args, kwargs)
        _provenance(new, old, self.name)
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)


@register_pass
class UseCausalAttention(RewritePass):
    """Fused CPU attention with a constant causal mask → ``is_causal=True`` (module docstring)."""

    name = "use_causal_attention"

    def __init__(self) -> None:
        super().__init__([CausalMaskToFlag()])
