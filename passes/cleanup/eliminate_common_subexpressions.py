"""Common-subexpression elimination: identical pure ops on identical inputs are computed once.

A training graph traced through autograd repeats work the forward already did (the same
transpose of a weight in forward and backward, the same mask or scale); this pass keeps the
first occurrence and points every user of a duplicate at it. Random ops, ops that write to an
input, ops whose result something writes to, and uninitialised allocations are never merged.

One exception keeps training steps lean: a pointwise op the backward recomputes (``sigmoid`` in
``silu``'s backward) is not merged into its forward twin when that twin has no backward reader
yet and the recompute's inputs are alive in the backward anyway. Merging would keep the forward
value alive from the forward to the backward (a saved activation) to spare one elementwise op;
torch's min-cut partitioner makes the same trade. Likewise a loss that sweeps a quantized head's
blocks twice (``graphpeft.training.head_loss``) marks its second sweep as a recompute, and it stays.
"""

from __future__ import annotations

import operator
from typing import Any, Hashable, Optional

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import phase_of

_NEVER = ("empty", "new_empty", "empty_like", "empty_permuted", "empty_strided", "rand", "randn", "randint",
          "bernoulli", "native_dropout", "dropout", "normal", "uniform")


def _key(x: Any) -> Hashable:
    """A hashable key for an argument that tells 1, 1.0 and True apart."""
    if isinstance(x, fx.Node):
        return ("node", x)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_key(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in x.items())))
    if isinstance(x, float) and x != x:  # nan is not equal to itself
        return ("float", "nan")
    if isinstance(x, (bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout,
                      torch.memory_format)):
        return (type(x).__name__, x)
    raise TypeError(f"unhashable argument {type(x).__name__}")


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def is_pure(node: fx.Node) -> bool:
    """Whether merging two copies of ``node`` keeps the graph's meaning."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.is_impure() or _mutates(node):
        return False
    if torch.Tag.nondeterministic_seeded in node.target.tags:
        return False
    if node.target._schema.name.split("::")[-1] in _NEVER:
        return False
    return not any(_mutates(u) for u in node.users)  # something writes into the result


def _signature(node: fx.Node) -> Optional[Hashable]:
    try:
        return (node.op, node.target, _key(node.args), _key(dict(node.kwargs)))
    except TypeError:
        return None


def _saved(node: fx.Node) -> bool:
    """A forward value some later phase reads (alive into the backward anyway)."""
    return any(phase_of(u) != "forward" for u in node.users)


def keeps_recompute(dup: fx.Node, first: fx.Node) -> Optional[str]:
    """Why ``dup`` (a backward recompute of ``first``) should stay, or None to merge."""
    if _sweep_recompute(dup, first):
        return "a second sweep of the loss recomputes it rather than keep it (a quantized head's blocks)"
    if phase_of(first) != "forward" or phase_of(dup) == "forward" or _saved(first):
        return None
    if (dup.meta.get(META_KEY) or {}).get("recompute"):
        return "the op that made it recomputes it in the backward rather than keep it (a merged weight)"
    if not isinstance(dup.target, torch._ops.OpOverload) or torch.Tag.pointwise not in dup.target.tags:
        return None
    if all(phase_of(a) != "forward" or _saved(a) for a in dup.all_input_nodes):
        return "a pointwise backward recompute whose inputs are saved anyway: merging would save its output too"
    return None


def _sweep_recompute(dup: fx.Node, first: fx.Node) -> bool:
    """``dup`` is a loss-phase recompute of a loss-phase value that no later phase reads
    (``blocked_linear_cross_entropy``'s second sweep): merging would keep every block alive."""
    if phase_of(first) != "loss" or phase_of(dup) != "loss" or any(phase_of(u) != "loss" for u in first.users):
        return False
    return bool((dup.meta.get(META_KEY) or {}).get("recompute")) and \
        not (first.meta.get(META_KEY) or {}).get("recompute")


def _keep_tags(dup: fx.Node, first: fx.Node) -> None:
    """Gradient marks of a removed duplicate move to the node that replaces it."""
    src = dup.meta.get(META_KEY) or {}
    dst = first.meta.get(META_KEY)
    if dst is None:
        return
    for tag in ("grad_of", "final_grad_of"):
        if tag in src:
            dst[tag] = sorted(set(dst.get(tag, [])) | set(src[tag]))


@register_pass
class EliminateCommonSubexpressions(PassBase):
    """Replaces every pure op that repeats an earlier one (same op, same inputs) by the earlier
    one; also merges duplicate ``get_attr`` nodes of the same tensor. Creates no nodes."""

    name = "eliminate_common_subexpressions"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        seen: dict[Hashable, fx.Node] = {}
        removed = kept = 0
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                sig: Optional[Hashable] = ("get_attr", node.target)
            elif is_pure(node):
                sig = _signature(node)
            else:
                continue
            if sig is None:
                continue
            first = seen.get(sig)
            if first is None:
                seen[sig] = node
                continue
            if keeps_recompute(node, first):
                kept += 1
                continue
            _keep_tags(node, first)
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            removed += 1
        ctx.options.setdefault("cse_removed", 0)
        ctx.options["cse_removed"] += removed
        ctx.options["cse_kept_recomputes"] = ctx.options.get("cse_kept_recomputes", 0) + kept
        return PassResult(gm, removed > 0)
