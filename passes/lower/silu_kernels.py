"""Torch executor only: silu and its backward, traced in their math form, → ATen's silu kernels.

A step is traced with the core ATen decomposition table, which writes ``silu(x)`` as
``x * sigmoid(x)`` and its backward as ``dy * s * (1 + x * (1 - s))`` with ``s = sigmoid(x)``
recomputed: eight elementwise passes over a (tokens × intermediate) tensor per SwiGLU layer
where ATen has two kernels (``silu``, ``silu_backward``). On the benchmark Llama at 4 × 256 the
math form cost ~13 ms of a 165 ms step. This pass puts the kernels back:

- ``silu_forward``  — ``mul(x, sigmoid(x))`` → ``silu(x)``;
- ``silu_backward`` — ``mul(mul(dy, s), add(mul(x, rsub(s, 1)), 1))`` (operands in either order;
  ``1 - s`` as ``rsub.Scalar`` or ``sub``) → ``silu_backward(dy, x)``.

Executor: torch (the default runner applies it to its own copy of the graph). Exports, memory
plans and inductor read the stored graph, which keeps the math form (exporters and inductor
decompose silu anyway). Exact up to rounding: the kernels compute the same formula with the
products in another order (a few units in the last place).
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, GraphBuilder, Provenance, val
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

aten = torch.ops.aten
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _call(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_one(x: object) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool) and x == 1


def _pair(node: fx.Node, pred: Callable[[object], bool]) -> Optional[tuple[fx.Node, object]]:
    """``(a, b)`` for a two-operand ``node`` whose operand ``a`` satisfies ``pred`` (either order)."""
    if len(node.args) != 2 or node.kwargs:
        return None
    x, y = node.args
    if pred(x):
        return x, y
    if pred(y):
        return y, x
    return None


def _sigmoid_of(node: object) -> bool:
    return _call(node, aten.sigmoid.default)


def _one_minus(node: object, s: fx.Node) -> bool:
    """``1 - s`` as ``rsub(s, 1)`` or ``sub(1, s)``."""
    if _call(node, aten.rsub.Scalar) and len(node.args) == 2 and not node.kwargs:
        return node.args[0] is s and _is_one(node.args[1])
    if _call(node, aten.sub.Tensor) and len(node.args) == 2 and not node.kwargs:
        return _is_one(node.args[0]) and node.args[1] is s
    return False


def _same_float_shape(*nodes: fx.Node) -> Optional[str]:
    vals = [val(n) for n in nodes]
    if any(v is None for v in vals):
        return "no traced tensor value"
    if any(v.dtype not in FLOATS for v in vals):
        return "not a floating-point tensor"
    if len({tuple(v.shape) for v in vals}) != 1 or len({v.dtype for v in vals}) != 1:
        return "operands of different shapes or dtypes (a broadcast, not silu)"
    return None


def _origin(node: fx.Node) -> str:
    return (node.meta.get(META_KEY) or {}).get("origin", "")


class SiluForward(RewriteRule):
    """``mul(x, sigmoid(x))`` → ``silu(x)``."""

    name = "silu_forward"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if not _call(node, aten.mul.Tensor):
            return None
        pair = _pair(node, _sigmoid_of)
        if pair is None or pair[0].args[0] is not pair[1]:
            return None
        return MatchResult.success(self.name, node, _origin(node), x=pair[1])

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        return _same_float_shape(match.bindings["x"], match.node)

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        node = match.node
        g = GraphBuilder(gm, node, Provenance(SiluKernels.name, self.name, match.origin, part=_part(node)))
        node.replace_all_uses_with(g.call(aten.silu.default, match.bindings["x"]))


class SiluBackward(RewriteRule):
    """``mul(mul(dy, s), add(mul(x, 1 - s), 1))`` with ``s = sigmoid(x)`` → ``silu_backward(dy, x)``."""

    name = "silu_backward"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if not _call(node, aten.mul.Tensor):
            return None
        pair = _pair(node, lambda n: _call(n, aten.add.Scalar, aten.add.Tensor) and len(n.args) == 2
                     and _is_one(n.args[1]) and _call(n.args[0], aten.mul.Tensor))
        if pair is None or not _call(pair[1], aten.mul.Tensor):
            return None
        add, dy_s = pair
        inner = _pair(dy_s, _sigmoid_of)  # (s, dy)
        if inner is None:
            return None
        s, dy = inner
        x_term = _pair(add.args[0], lambda n: _one_minus(n, s))  # (1 - s, x)
        if x_term is None or x_term[1] is not s.args[0] or not isinstance(dy, fx.Node):
            return None
        return MatchResult.success(self.name, node, _origin(node), dy=dy, x=x_term[1])

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        return _same_float_shape(match.bindings["dy"], match.bindings["x"], match.node)

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        node, b = match.node, match.bindings
        g = GraphBuilder(gm, node, Provenance(SiluKernels.name, self.name, match.origin, part=_part(node)))
        node.replace_all_uses_with(g.call(aten.silu_backward.default, b["dy"], b["x"]))


def _part(node: fx.Node) -> str:
    return (node.meta.get(META_KEY) or {}).get("part", "")


@register_pass
class SiluKernels(RewritePass):
    """silu's math form → ATen's ``silu`` / ``silu_backward`` kernels (torch executor)."""

    name = "silu_kernels"
    sweep_dead_code = True  # the math form the kernels replaced

    def __init__(self) -> None:
        super().__init__([SiluForward(), SiluBackward()])


__all__ = ["SiluKernels"]
