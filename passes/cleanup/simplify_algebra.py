"""Algebraic clean-up of a traced graph: identities, view/permute chains, scalar ops before
broadcasts, the in-place ``1 - sigmoid`` of silu's decomposed backward, and the zero-filled
``slice_scatter`` sums of ``cat``'s backward.

Decomposing to core ATen leaves ops that compute nothing (``pow(x, 1)``, ``mul(x, 1)``, a
permute undone by the next one, a view of a view), runs scalar arithmetic on broadcast copies
(RMSNorm's backward divides an ``expand``-ed tensor by the width) and spells ``1 - s`` as four
ops with two in-place writes into an uninitialised buffer; the backward of a ``cat`` (rotary
embeddings' ``rotate_half``) writes each part into a tensor of zeros and adds them up, and a
slice of a whole dimension is scattered into zeros as a copy. Every op costs a dispatch in the
torch executor and a node in the ONNX exporter; these rules remove them. Each rule is
match → check (reason) → rewrite; a replaced node's provenance (phase, parameter) moves to the
node that replaces it.

Exact: no rule changes a value (``x * 1``, ``x ** 1`` and dropped assertions are identities;
the scalar moved before an ``expand`` is applied to the very same numbers; a power of two moved
through a product scales an exponent; a sum with zeros is its other term, but for the sign of a
zero). Only exact identity
constants match (an ``add`` of a tiny epsilon is never dropped: AdamW's ``eps``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, fake_eval, fake_mode_of, val
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

aten = torch.ops.aten

#: op -> the scalar that leaves its first argument unchanged
IDENTITIES: dict[Any, float] = {
    aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
    aten.pow.Tensor_Scalar: 1, aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0,
}
#: elementwise ops with a number as second argument that commute with ``expand``
SCALAR_OPS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
ASSERTS = (aten._assert_tensor_metadata.default,)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _same_tensor_type(a: fx.Node, b: fx.Node) -> bool:
    va, vb = val(a), val(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
            and tuple(va.shape) == tuple(vb.shape))


def _views_allowed(tensor: Any, node: fx.Node) -> bool:
    """Whether every ``view`` reading ``node`` could view ``tensor`` (its strides) instead."""
    for user in node.users:
        if user.target != aten.view.default:
            continue
        try:
            tensor.view([val(d) if isinstance(d, fx.Node) else d for d in user.args[1]])
        except Exception:  # noqa: BLE001 - any refusal: the strides do not allow that view
            return False
    return True


def _mutated(node: fx.Node) -> bool:
    """Whether an op writes into ``node`` (then removing a copy of it is not safe)."""
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False


_FAKE_MODE = "graphpeft_simplify_fake_mode"  # cached for the length of one pass run


def _make(gm: fx.GraphModule, old: fx.Node, target: Callable, args: tuple, rule: str) -> fx.Node:
    """A new ``target(*args)`` node just before ``old``, with ``old``'s provenance (and its fake
    value evaluated in the graph's fake mode, found once per pass run: finding it scans the graph)."""
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args)
    new.meta.update({k: v for k, v in old.meta.items() if k != "val"})  # module stack, trace order ...
    prov = dict(old.meta.get(META_KEY) or {})
    prov.update(pass_name=SimplifyAlgebra.name, rule=rule)
    new.meta[META_KEY] = prov
    mode = gm.meta.get(_FAKE_MODE) if _FAKE_MODE in gm.meta else gm.meta.setdefault(_FAKE_MODE, fake_mode_of(gm))
    new.meta["val"] = fake_eval(mode, target, args, {}) if mode is not None else old.meta.get("val")
    return new


def _replace(gm: fx.GraphModule, old: fx.Node, target: Callable, args: tuple, rule: str) -> fx.Node:
    """:func:`_make` a ``target(*args)`` node that takes ``old``'s users."""
    new = _make(gm, old, target, args, rule)
    old.replace_all_uses_with(new)
    return new


#: provenance keys that mark a node as a parameter's gradient (set by the step compiler)
GRADIENT_MARKS = ("grad_of", "final_grad_of")


def _forward(old: fx.Node, to: fx.Node) -> None:
    """Hand ``old``'s users to ``to``, and its gradient marks: ``to`` now is that gradient."""
    old.replace_all_uses_with(to)
    prov, target = old.meta.get(META_KEY) or {}, to.meta.get(META_KEY)
    for key in GRADIENT_MARKS:
        if prov.get(key) and target is not None:
            target[key] = list(dict.fromkeys([*(target.get(key) or []), *prov[key]]))


class DropIdentity(RewriteRule):
    """``x * 1``, ``x / 1``, ``x ** 1``, ``x + 0``, ``x - 0`` → ``x`` (same shape and dtype)."""

    name = "drop_identity"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target not in IDENTITIES or len(node.args) != 2 or node.kwargs:
            return None
        x, c = node.args
        if not isinstance(x, fx.Node) or not _is_number(c) or c != IDENTITIES[node.target]:
            return None
        return MatchResult.success(self.name, node, x=x)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        if not _same_tensor_type(match.node, match.bindings["x"]):
            return "the op changes the dtype or shape (type promotion or broadcast)"
        if _mutated(match.node):
            return "an in-place op writes into the result"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        _forward(match.node, match.bindings["x"])


def _is_gradient(node: fx.Node) -> bool:
    """Whether the step compiler marked ``node`` as a parameter's gradient (it must stay)."""
    prov = node.meta.get(META_KEY) or {}
    return any(prov.get(key) for key in GRADIENT_MARKS)


class FoldPermutes(RewriteRule):
    """``permute(permute(x, p), q)`` → ``permute(x, p∘q)``, or ``x`` when that is the identity."""

    name = "fold_permutes"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target != aten.permute.default:
            return None
        inner = node.args[0]
        if not isinstance(inner, fx.Node) or inner.target != aten.permute.default:
            return None
        p, q = list(inner.args[1]), list(node.args[1])
        return MatchResult.success(self.name, node, x=inner.args[0], dims=[p[i] for i in q], inner=inner)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        return "the inner permute is a parameter's gradient" if _is_gradient(match.bindings["inner"]) else None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        dims, x = match.bindings["dims"], match.bindings["x"]
        if dims == list(range(len(dims))):
            _forward(match.node, x)
        else:
            _replace(gm, match.node, aten.permute.default, (x, dims), self.name)


class FoldViews(RewriteRule):
    """``view(view(x, a), b)`` → ``view(x, b)``; ``view(x, x.shape)`` → ``x``."""

    name = "fold_views"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target not in VIEWS or not isinstance(node.args[0], fx.Node):
            return None
        return MatchResult.success(self.name, node, x=node.args[0])

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        node, x = match.node, match.bindings["x"]
        if _same_tensor_type(node, x):
            return None
        if node.target != aten.view.default or x.target != aten.view.default:
            return "not a view of a view"
        if _is_gradient(x):
            return "the inner view is a parameter's gradient"
        base = val(x.args[0]) if isinstance(x.args[0], fx.Node) else None
        if not isinstance(base, torch.Tensor) or not base.is_contiguous():
            return "the viewed tensor is not contiguous: a direct view may not exist"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        node, x = match.node, match.bindings["x"]
        if _same_tensor_type(node, x):
            _forward(node, x)
        else:
            _replace(gm, node, aten.view.default, (x.args[0], node.args[1]), self.name)


class ScalarBeforeExpand(RewriteRule):
    """``expand(x) * c`` → ``expand(x * c)``: the scalar op runs on the small tensor."""

    name = "scalar_before_expand"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target not in SCALAR_OPS or len(node.args) != 2 or node.kwargs:
            return None
        e, c = node.args
        if not _is_number(c) or not isinstance(e, fx.Node) or e.target != aten.expand.default:
            return None
        return MatchResult.success(self.name, node, expand=e, scalar=c)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        e = match.bindings["expand"]
        if len(e.users) != 1:
            return "the expanded tensor has other users"
        if not isinstance(val(e.args[0]), torch.Tensor) or val(e.args[0]).dtype != val(match.node).dtype:
            return "the op changes the dtype"
        if not _views_allowed(val(e), match.node):
            return "a view reads the product, which the expanded (stride 0) tensor cannot give"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        node, e = match.node, match.bindings["expand"]
        small = _replace(gm, e, node.target, (e.args[0], match.bindings["scalar"]), self.name)
        # ``small`` took e's users (only ``node``); rebuild the expand after it
        _replace(gm, node, aten.expand.default, (small, *e.args[1:]), self.name)
        gm.graph.erase_node(node)
        gm.graph.erase_node(e)


class OneMinus(RewriteRule):
    """``sub_(copy_(empty_permuted(..), full_like(.., c)), s)`` → ``rsub(s, c)`` (= ``c - s``)."""

    name = "one_minus"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target != aten.sub_.Tensor or len(node.args) != 2 or node.kwargs:
            return None
        buf, s = node.args
        if not (isinstance(buf, fx.Node) and buf.target == aten.copy_.default and isinstance(s, fx.Node)):
            return None
        empty, full = buf.args[0], buf.args[1]
        if not (isinstance(empty, fx.Node) and empty.target == aten.empty_permuted.default
                and isinstance(full, fx.Node) and full.target == aten.full_like.default and _is_number(full.args[1])):
            return None
        return MatchResult.success(self.name, node, buf=buf, empty=empty, full=full, s=s, c=full.args[1])

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        buf, empty = match.bindings["buf"], match.bindings["empty"]
        if set(buf.users) != {match.node} or set(empty.users) - {buf, match.bindings["full"]}:
            return "the buffer is read elsewhere"
        if not _same_tensor_type(match.node, match.bindings["s"]):
            return "the result has another shape or dtype than s"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        _replace(gm, match.node, aten.rsub.Scalar, (match.bindings["s"], match.bindings["c"]), self.name)
        for n in (match.node, match.bindings["buf"]):
            gm.graph.erase_node(n)
        for n in (match.bindings["full"], match.bindings["empty"]):
            if not n.users:
                gm.graph.erase_node(n)


def _zeros(node: object) -> bool:
    """Whether ``node`` is ``full(shape, 0)`` (a fresh tensor of zeros)."""
    return (isinstance(node, fx.Node) and node.target == aten.full.default and len(node.args) == 2
            and _is_number(node.args[1]) and node.args[1] == 0)


def _scatter_range(node: fx.Node) -> Optional[tuple[int, int, int]]:
    """``(dim, start, end)`` of ``slice_scatter(base, src, dim, start, end)``, normalized with
    the base's shape (step 1 only), else None."""
    args = list(node.args) + [0, None, None, 1][len(node.args) - 2:]
    base, dim, start, end, step = val(node.args[0]), args[2], args[3], args[4], args[5]
    if not isinstance(base, torch.Tensor) or step != 1 or node.kwargs:
        return None
    dim = dim % base.dim()
    size = int(base.shape[dim])
    start = 0 if start is None else (start + size if start < 0 else min(start, size))
    end = size if end is None else (end + size if end < 0 else min(end, size))
    return dim, start, end


class WholeSliceScatter(RewriteRule):
    """``slice_scatter(base, src, dim, 0, end)`` whose slice is the whole of ``base`` → ``src``
    (its values; nothing of ``base`` is left)."""

    name = "whole_slice_scatter"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target != aten.slice_scatter.default or not isinstance(node.args[1], fx.Node):
            return None
        return MatchResult.success(self.name, node, src=node.args[1])

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        node, src = match.node, match.bindings["src"]
        if not _same_tensor_type(node, src):
            return "the source is a part of the result (or another dtype)"
        if _mutated(node) or _mutated(src):
            return "an in-place op writes into the result or the source"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        _forward(match.node, match.bindings["src"])


class ScattersAsCat(RewriteRule):
    """``slice_scatter(zeros, a, d, 0, k) + slice_scatter(zeros, b, d, k, n)`` → ``cat([a, b], d)``:
    the backward of ``cat`` / ``rotate_half`` (rotary embeddings) writes each half into its own
    zero tensor and adds them, three passes over the whole tensor where one copy does."""

    name = "scatters_as_cat"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target != aten.add.Tensor or len(node.args) != 2 or node.kwargs:
            return None
        parts = node.args
        if not all(isinstance(p, fx.Node) and p.target == aten.slice_scatter.default and _zeros(p.args[0])
                   for p in parts):
            return None
        ranges = [_scatter_range(p) for p in parts]
        if None in ranges:
            return None
        return MatchResult.success(self.name, node, parts=parts, ranges=ranges)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        (d1, s1, e1), (d2, s2, e2) = match.bindings["ranges"]
        size = int(val(match.node).shape[d1]) if isinstance(val(match.node), torch.Tensor) else -1
        if d1 != d2:
            return "the slices are along different dimensions"
        if sorted([(s1, e1), (s2, e2)]) != [(0, min(e1, e2)), (min(e1, e2), size)]:
            return "the two slices do not tile the dimension"
        if not all(_same_tensor_type(match.node, p) for p in match.bindings["parts"]):
            return "the sum broadcasts or promotes"
        if _mutated(match.node):
            return "an in-place op writes into the sum"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        parts, ranges = match.bindings["parts"], match.bindings["ranges"]
        ordered = [p.args[1] for _, p in sorted(zip([r[1] for r in ranges], parts), key=lambda t: t[0])]
        _replace(gm, match.node, aten.cat.default, (ordered, ranges[0][0]), self.name)


class PowerOfTwoThroughExpand(RewriteRule):
    """``expand(s) * (x * c)`` with ``c`` a power of two → ``expand(s * c) * x``: the scaling
    runs on the small tensor (RMSNorm's backward scales the whole input by 2 for ``d(x²)``).
    Exact: multiplying by a power of two only changes the exponent (barring over/underflow)."""

    name = "power_of_two_through_expand"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target != aten.mul.Tensor or len(node.args) != 2 or node.kwargs:
            return None
        for e, m in (node.args, node.args[::-1]):
            if (isinstance(e, fx.Node) and e.target == aten.expand.default and isinstance(m, fx.Node)
                    and m.target in (aten.mul.Tensor, aten.mul.Scalar) and len(m.args) == 2
                    and isinstance(m.args[0], fx.Node) and _is_number(m.args[1])):
                return MatchResult.success(self.name, node, expand=e, scaled=m, x=m.args[0], c=m.args[1])
        return None

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        b = match.bindings
        c = float(b["c"])
        if c <= 0 or math.frexp(c)[0] != 0.5:
            return f"the scale {b['c']} is not a power of two: moving it would round differently"
        if len(b["scaled"].users) != 1 or len(b["expand"].users) != 1:
            return "the scaled or the expanded tensor has other users"
        small = val(b["expand"].args[0])
        if not (_same_tensor_type(match.node, b["x"]) and _same_tensor_type(b["scaled"], b["x"])
                and isinstance(small, torch.Tensor) and small.dtype == val(match.node).dtype):
            return "the ops change the dtype or shape"
        if not _views_allowed(val(match.node), match.node):
            return "a view reads the product"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        b, node = match.bindings, match.node
        e = b["expand"]
        small = _make(gm, node, aten.mul.Tensor, (e.args[0], b["c"]), self.name)
        wide = _make(gm, node, aten.expand.default, (small, *e.args[1:]), self.name)
        _replace(gm, node, aten.mul.Tensor, (wide, b["x"]), self.name)
        for n in (node, e, b["scaled"]):
            gm.graph.erase_node(n)


class DropAssertions(RewriteRule):
    """Drops ``_assert_tensor_metadata``: the step is compiled for fixed shapes and dtypes,
    which the step checks on every call, so the per-op runtime assertion is redundant."""

    name = "drop_assertions"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target not in ASSERTS:
            return None
        return MatchResult.success(self.name, node)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        return "its result is used" if match.node.users else None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        gm.graph.erase_node(match.node)


#: the rules, in the order they are tried at each node
RULES: tuple[type[RewriteRule], ...] = (DropIdentity, FoldPermutes, FoldViews, ScalarBeforeExpand, OneMinus,
                                        DropAssertions, WholeSliceScatter, ScattersAsCat, PowerOfTwoThroughExpand)


@register_pass
class SimplifyAlgebra(RewritePass):
    """Removes identity ops, folds view/permute chains, moves scalar ops before broadcasts."""

    name = "simplify_algebra"

    def __init__(self) -> None:
        super().__init__([rule() for rule in RULES])

    def call(self, gm: fx.GraphModule, ctx: PassContext):  # type: ignore[override]
        try:
            result = super().call(gm, ctx)
        finally:
            gm.meta.pop(_FAKE_MODE, None)
        if result.modified:
            gm.graph.eliminate_dead_code()  # the ops a fold bypassed (the pass manager recompiles)
        return result
