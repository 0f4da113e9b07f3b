"""``slice_scatter`` in forms onnxruntime runs without transposes.

The backward of a slice is ``slice_scatter(zeros, grad, dim, start, end)``. ``torch.onnx``
translates it as ``ScatterND`` on the sliced axis moved to the front: a ``Transpose`` of the
gradient, one of the zeros and one back, per op. In a Llama step these come from rotary
embeddings' ``rotate_half`` (slices of the last axis) and from no-op slices; onnxruntime then
spent 8–10 % of the step in those transposes (``python -m benchmarks.profile``). Rules, exact
(they copy values, never compute), run on the export copy only:

- ``full_slice_scatter`` — a scatter covering the whole axis with a source of the base's shape
  and dtype is the source itself (a contiguous ``clone`` of it when it is strided: later views
  rely on the scatter's fresh layout);
- ``halves_to_cat`` — ``add(slice_scatter(zeros, a, d, 0, k), slice_scatter(zeros, b, d, k, n))``
  (the two halves of ``rotate_half``'s gradient) is ``cat([a, b], d)``;
- ``zeros_to_pad`` — ``slice_scatter(zeros, x, d, s, e)`` is ``constant_pad_nd(x, ...)`` (ONNX
  ``Pad``), any other step-1 scatter ``cat([base[:s], x, base[e:]], d)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, GraphBuilder, Provenance, val
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

aten = torch.ops.aten
PASS_NAME = "slice_scatter_onnx"


def _scatter_range(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, int, int, int]]:
    """``(base, src, dim, start, end)`` of a step-1 ``slice_scatter`` with known shapes, the range
    clamped to the axis; None otherwise."""
    if node.op != "call_function" or node.target != aten.slice_scatter.default:
        return None
    base, src, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 2:])[:6]
    dim = node.kwargs.get("dim", dim)
    start, end, step = node.kwargs.get("start", start), node.kwargs.get("end", end), node.kwargs.get("step", step)
    b, s = val(base), val(src)
    if not isinstance(b, torch.Tensor) or not isinstance(s, torch.Tensor) or step != 1:
        return None
    if not isinstance(dim, int) or any(not isinstance(x, int) for x in b.shape):
        return None
    dim %= b.dim()
    size = b.shape[dim]
    lo = 0 if start is None else (start + size if start < 0 else start)
    hi = size if end is None else (end + size if end < 0 else end)
    lo, hi = max(0, min(lo, size)), max(0, min(hi, size))
    return base, src, dim, lo, hi


def _is_zeros(node: fx.Node) -> bool:
    """A ``full(shape, 0)`` / ``zeros`` / ``full_like(x, 0)`` / ``zeros_like`` node."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in (aten.zeros.default, aten.zeros_like.default):
        return True
    if node.target in (aten.full.default, aten.full_like.default) and len(node.args) > 1:
        return node.args[1] == 0 and not isinstance(node.args[1], bool)
    return False


def _builder(gm: fx.GraphModule, node: fx.Node, rule: str) -> GraphBuilder:
    prov = node.meta.get(META_KEY) or {}
    p = Provenance(PASS_NAME, rule, prov.get("origin", ""), prov.get("adapter", ""), prov.get("part", ""))
    return GraphBuilder(gm, node.prev, p, module_stack=node.meta.get("nn_module_stack"))


def _swap(gm: fx.GraphModule, node: fx.Node, new: fx.Node, builder: Optional[GraphBuilder] = None) -> None:
    prov = node.meta.get(META_KEY) or {}
    for created in builder.created if builder else ():  # phase tags the training passes read
        for k in ("param", "micro"):
            if k in prov:
                created.meta[META_KEY][k] = prov[k]
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


class FullSliceScatter(RewriteRule):
    """``slice_scatter(base, src, d, 0, n)`` over the whole axis → ``src``."""

    name = "full_slice_scatter"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        r = _scatter_range(node)
        if r is None:
            return None
        base, src, dim, lo, hi = r
        if lo != 0 or hi != val(base).shape[dim]:
            return None
        return MatchResult.success(self.name, node, (node.meta.get(META_KEY) or {}).get("origin", ""), src=src)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        b, s = val(match.node.args[0]), val(match.bindings["src"])
        if tuple(b.shape) != tuple(s.shape) or b.dtype != s.dtype:
            return f"source {s.dtype}{list(s.shape)} differs from the base {b.dtype}{list(b.shape)}"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        src = match.bindings["src"]
        if val(src).is_contiguous():
            _swap(gm, match.node, src)
            return
        # the scatter's result is contiguous and a later view may rely on it (ONNX: an Identity)
        g = _builder(gm, match.node, self.name)
        _swap(gm, match.node, g.call(aten.clone.default, src, memory_format=torch.contiguous_format), g)


class HalvesToCat(RewriteRule):
    """``add`` of two scatters into zeros that tile one axis → ``cat`` of their sources."""

    name = "halves_to_cat"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.op != "call_function" or node.target != aten.add.Tensor or len(node.args) != 2 or node.kwargs:
            return None
        parts = [_scatter_range(a) if isinstance(a, fx.Node) else None for a in node.args]
        if any(p is None for p in parts):
            return None
        return MatchResult.success(self.name, node, (node.meta.get(META_KEY) or {}).get("origin", ""), parts=parts)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        (b1, s1, d1, lo1, hi1), (b2, s2, d2, lo2, hi2) = match.bindings["parts"]
        if not (_is_zeros(b1) and _is_zeros(b2)):
            return "a scatter's base is not zeros"
        v1, v2, out = val(b1), val(b2), val(match.node)
        if d1 != d2 or tuple(v1.shape) != tuple(v2.shape) or tuple(out.shape) != tuple(v1.shape):
            return "the scatters differ in axis or shape"
        if v1.dtype != v2.dtype or out.dtype != v1.dtype or val(s1).dtype != v1.dtype or val(s2).dtype != v1.dtype:
            return "dtypes differ (the add would promote)"
        size = v1.shape[d1]
        if sorted([(lo1, hi1), (lo2, hi2)]) != [(0, min(hi1, hi2)), (min(hi1, hi2), size)]:
            return "the two ranges do not tile the axis"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        (_, s1, d, lo1, _), (_, s2, _, lo2, _) = match.bindings["parts"]
        first, second = (s1, s2) if lo1 == 0 else (s2, s1)
        g = _builder(gm, match.node, self.name)
        _swap(gm, match.node, g.call(aten.cat.default, [first, second], d), g)


class ZerosToPad(RewriteRule):
    """``slice_scatter(zeros, x, d, s, e)`` → ``constant_pad_nd``; other bases → ``cat`` of slices."""

    name = "zeros_to_pad"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        r = _scatter_range(node)
        if r is None:
            return None
        return MatchResult.success(self.name, node, (node.meta.get(META_KEY) or {}).get("origin", ""), range=r)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        base, src, dim, lo, hi = match.bindings["range"]
        b, s = val(base), val(src)
        if len(match.node.users) == 1:
            user = next(iter(match.node.users))
            pair = HalvesToCat().match(gm, user, ctx)
            if pair is not None and HalvesToCat().check(gm, pair, ctx) is None:
                return "its add joins it with the other half (halves_to_cat rewrites the add)"
        if b.dtype != s.dtype:
            return "the source's dtype differs from the base's (the scatter casts)"
        if s.shape[dim] != hi - lo or tuple(s.shape[:dim]) + tuple(s.shape[dim + 1:]) != \
                tuple(b.shape[:dim]) + tuple(b.shape[dim + 1:]):
            return "the source does not fill the range exactly (broadcast)"
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        base, src, dim, lo, hi = match.bindings["range"]
        size, ndim = val(base).shape[dim], val(base).dim()
        g = _builder(gm, match.node, self.name)
        if _is_zeros(base):
            pad = [0, 0] * (ndim - 1 - dim) + [lo, size - hi]  # constant_pad_nd lists the last axis first
            new = g.call(aten.constant_pad_nd.default, src, pad, 0.0)
        else:
            pieces = ([g.call(aten.slice.Tensor, base, dim, 0, lo)] if lo > 0 else []) + [src] + \
                ([g.call(aten.slice.Tensor, base, dim, hi, size)] if hi < size else [])
            new = g.call(aten.cat.default, pieces, dim)
        _swap(gm, match.node, new, g)


@register_pass
class SliceScatterOnnx(RewritePass):
    """Rewrites ``slice_scatter`` into copies (the source, ``cat``, ``constant_pad_nd``) that
    translate to ONNX without transposes; run before export (``legalized_copy``)."""

    name = PASS_NAME

    def __init__(self) -> None:
        super().__init__([FullSliceScatter(), HalvesToCat(), ZerosToPad()])
