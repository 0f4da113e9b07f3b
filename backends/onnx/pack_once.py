"""A stored weight packed by onnxruntime in one layout only: the GEMMs that would pack it in
another read it as their *A* operand, so the session keeps one packed copy of it instead of two.

onnxruntime pre-packs the constant *B* operand of every ``Gemm`` / ``MatMul`` when a session is
created (MLAS lays it out for its kernels once; the *A* operand is read as stored and never
packed). A training step reads each frozen linear weight ``W`` twice as *B*: the forward
``Gemm(x, W, transB=1)`` packs ``W^T``, the backward ``MatMul(dY, W)`` (the input gradient) packs
``W``. (Consumers packing alike, such as a chunked loss's per-chunk head GEMMs, share one pack.)
On a Qwen2-0.5B-shaped step the two packs were most of the session's memory (1.4 GiB each). The
other layout's consumers compute their result transposed, reading ``W`` as *A*:

    Y = Gemm(X, W, transA=a, transB=b)   ->   Y = Transpose(Gemm(W, X, C, transA=1-b, transB=1-a, beta=0))

(``(op(X) op(W))^T = op(W)^T op(X)^T``; a ``MatMul`` is ``a = b = 0``; exact up to summation
order.) ``C`` is a one-element zero that ``beta=0`` ignores: onnxruntime's ``GemmTransposeFusion``
turns a ``Gemm`` without ``C`` whose output is transposed back into the form that packs ``W``
(measured: the second packed copy came back), and it does not fuse a ``Gemm`` that has one.

Rule: a stored 2-D weight ``W`` (``out x in``) of at least ``min_bytes`` that 2-D ``MatMul`` /
``Gemm`` nodes read as their second operand in two layouts: one layout stays packed, the other's
consumers are rewritten. Which one stays: that of a ``Gemm`` with a bias (its transposed form
would need the bias transposed), else the forward's ``Gemm(x, W, transB=1)`` when ``out > in``
and the gradient's ``MatMul(dY, W)`` when ``out <= in`` (on this CPU at 128-512 tokens, reading
``W`` as *A* cost 1.06-1.36x the packed GEMM in the form chosen so, 1.16-1.69x in the other).
Small weights are left as they are: the transposes cost a little time per step, their packs
little memory. A weight of at least ``unpacked_min_bytes`` (a vocabulary head: Qwen2-0.5B's tied
151936 x 896 embedding, 519 MiB) is read as *A* by every consumer: no packed copy at all (and none
made per chunk at load, transiently, before onnxruntime finds them alike).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

#: ``export_onnx(pack_once_min_bytes=...)`` default: weights from 1 MiB on
PACK_ONCE_MIN_BYTES = 1 << 20
#: weights from 256 MiB on are never packed
UNPACKED_MIN_BYTES = 256 << 20


def _is(node: Any, op: str) -> bool:
    return node.op_type == op and node.domain in ("", "ai.onnx")


def _rank(value: Any) -> int:
    shape = getattr(value, "shape", None)
    return len(shape) if shape is not None else -1


def _flag(node: Any, name: str) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else 0


def _b_consumers(weight: Any) -> list[Any]:
    """The ``MatMul`` / ``Gemm`` nodes with a 2-D first operand reading ``weight`` as their second only."""
    out = []
    for user, index in weight.uses():
        if index != 1 or user.inputs[0] is weight or _rank(user.inputs[0]) != 2 or user in out:
            continue
        if _is(user, "MatMul") or _is(user, "Gemm"):
            out.append(user)
    return out


def _rewritable(node: Any) -> bool:
    """A ``Gemm`` with ``C`` (a bias) stays: its transposed form would need ``C`` transposed."""
    return _is(node, "MatMul") or len(node.inputs) < 3 or node.inputs[2] is None


def _layout(node: Any) -> tuple[str, int]:
    """How a consumer packs the weight (consumers packing alike share one packed copy)."""
    return node.op_type, _flag(node, "transB")


def _kept_layout(users: list[Any], shape: Sequence[int]) -> Optional[tuple[str, int]]:
    """The layout that stays packed: a non-rewritable consumer's, else the one whose other
    form is the cheaper (measured, 128-512 tokens: reading ``W`` as *A* costs least as the
    forward's ``Gemm(W, x, transB=1)`` when ``out <= in``, as the gradient's when ``out > in``),
    else the first consumer's; ``None`` if two layouts cannot be rewritten."""
    fixed = {_layout(u) for u in users if not _rewritable(u)}
    if fixed:
        return fixed.pop() if len(fixed) == 1 else None
    preferred = ("Gemm", 1) if shape[0] > shape[1] else ("MatMul", 0)
    return preferred if any(_layout(u) == preferred for u in users) else _layout(users[0])


def _rewrites(graph: Any, min_bytes: int, unpacked_min_bytes: int) -> list[tuple[Any, Any]]:
    """``(consumer, weight)`` pairs the rule rewrites, in graph order per weight."""
    inputs = set(graph.inputs)
    order = {node: i for i, node in enumerate(graph)}
    found = []
    for weight in graph.initializers.values():
        tensor = weight.const_value
        if weight in inputs or tensor is None or len(tensor.shape) != 2 or tensor.nbytes < min_bytes:
            continue
        users = sorted((u for u in _b_consumers(weight) if u.graph is graph), key=order.__getitem__)
        if not users:
            continue
        if tensor.nbytes >= unpacked_min_bytes:
            found += [(u, weight) for u in users if _rewritable(u)]
            continue
        keep = _kept_layout(users, tensor.shape)
        if keep is not None:
            found += [(u, weight) for u in users if _rewritable(u) and _layout(u) != keep]
    return found


def _zero_like(graph: Any, weight: Any) -> Any:
    """The one-element zero ``C`` of ``weight``'s dtype (one per dtype, shared)."""
    import numpy as np
    import onnx_ir as ir

    name = f"pack_once_zero_{weight.dtype.name.lower()}"
    if name not in graph.initializers:
        value = ir.Value(name=name, shape=ir.Shape([1]), type=ir.TensorType(weight.dtype))
        value.const_value = ir.tensor(np.zeros([1], dtype=weight.dtype.numpy()), name=name)
        graph.register_initializer(value)
    return graph.initializers[name]


def _transposed_gemm(graph: Any, user: Any, weight: Any, i: int) -> Any:
    """The two nodes computing ``user``'s output with ``weight`` as *A*, inserted before it;
    returns the ``Transpose``."""
    import onnx_ir as ir

    a, b = _flag(user, "transA"), _flag(user, "transB")
    alpha = user.attributes.get("alpha")
    attrs = [ir.AttrInt64("transA", 1 - b), ir.AttrInt64("transB", 1 - a), ir.AttrFloat32("beta", 0.0)]
    if alpha is not None:
        attrs.append(ir.AttrFloat32("alpha", alpha.as_float()))
    gemm = ir.Node("", "Gemm", [weight, user.inputs[0], _zero_like(graph, weight)], attrs, name=f"pack_once_gemm_{i}")
    transpose = ir.Node("", "Transpose", gemm.outputs, [ir.AttrInt64s("perm", [1, 0])], name=f"pack_once_transpose_{i}")
    graph.insert_before(user, [gemm, transpose])
    out = user.outputs[0]
    if out.shape is not None:
        gemm.outputs[0].shape = ir.Shape([out.shape[1], out.shape[0]])
    gemm.outputs[0].dtype = transpose.outputs[0].dtype = out.dtype
    transpose.outputs[0].shape = out.shape
    return transpose


def pack_weights_once(model: Any, min_bytes: int = PACK_ONCE_MIN_BYTES,
                      unpacked_min_bytes: int = UNPACKED_MIN_BYTES) -> int:
    """Rewrite ``model`` (``onnx_ir``) in place as the module says; returns how many GEMM
    nodes were rewritten."""
    graph = model.graph
    pairs = _rewrites(graph, min_bytes, max(min_bytes, unpacked_min_bytes))
    for i, (user, weight) in enumerate(pairs):
        out = user.outputs[0]
        transpose = _transposed_gemm(graph, user, weight, i)
        name = out.name
        out.replace_all_uses_with(transpose.outputs[0], replace_graph_outputs=True)
        graph.remove(user, safe=True)
        transpose.outputs[0].name = name  # a graph output keeps its name
    if pairs:
        log.debug("%d GEMMs read their stored weight as the A operand (one packed copy per weight)", len(pairs))
    return len(pairs)


__all__ = ["PACK_ONCE_MIN_BYTES", "UNPACKED_MIN_BYTES", "pack_weights_once"]
