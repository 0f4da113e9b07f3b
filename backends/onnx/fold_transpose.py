"""Transposes of 2-D operands folded into ``Gemm`` (``transA`` / ``transB``) in an exported graph.

A linear layer exports as ``MatMul(x, Transpose(W))``. When ``W`` is a stored (frozen) weight,
onnxruntime constant-folds that ``Transpose`` at load, before its ``MatMul`` + ``Transpose``
fusion runs: the session then keeps a transposed copy of the weight beside the original (on a
Qwen2-0.5B-shaped step, the tied 151936 x 896 embedding: 520 MiB more). On an activation the
``Transpose`` is a copy every step. ``Gemm(x, W, transB=1)`` reads ``W`` as stored: standard
ONNX, one kernel, no copy. Exact: the same products, summed by the same GEMM routine.

Rule: a ``Transpose`` with ``perm = [1, 0]`` whose every consumer is a ``MatMul`` of 2-D operands
(the transposed value as either operand) or a ``Gemm`` reading it as ``A`` or ``B`` is removed; each
such ``MatMul`` becomes a ``Gemm``, each such ``Gemm`` flips its ``transA`` / ``transB`` (a linear
layer with a bias exports as ``Gemm(x, Transpose(W), b)``).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def _rank(value: Any) -> int:
    shape = getattr(value, "shape", None)
    if shape is None and getattr(value, "const_value", None) is not None:
        shape = value.const_value.shape
    return len(shape) if shape is not None else -1


def _foldable(node: Any) -> bool:
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return False
    perm = node.attributes.get("perm")
    if perm is None or list(perm.as_ints()) != [1, 0] or _rank(node.inputs[0]) != 2:
        return False
    out = node.outputs[0]
    if out.is_graph_output() or not out.uses():
        return False
    for user, index in out.uses():
        if user.op_type not in ("Gemm", "MatMul") or user.domain not in ("", "ai.onnx") or user.graph is not node.graph:
            return False
        if user.inputs[0] is user.inputs[1]:
            return False
        if user.op_type == "Gemm" and index < 2:
            continue
        if user.op_type != "MatMul" or _rank(user.inputs[0]) != 2 or _rank(user.inputs[1]) != 2:
            return False
    return True


def _fold_into_gemm(user: Any, out: Any, source: Any) -> None:
    """A ``Gemm`` reading ``out`` (``source`` transposed) reads ``source`` with its flag flipped."""
    import onnx_ir as ir

    for index, flag in ((0, "transA"), (1, "transB")):
        if user.inputs[index] is out:
            old = user.attributes.get(flag)
            user.attributes[flag] = ir.AttrInt64(flag, 1 - (old.as_int() if old is not None else 0))
            user.replace_input_with(index, source)


def fold_transposes_into_gemm(model: Any) -> int:
    """Rewrite ``model`` (``onnx_ir``) in place; returns how many ``Transpose`` nodes went."""
    import onnx_ir as ir

    graph = model.graph
    count = made = 0
    for node in [n for n in graph if _foldable(n)]:
        source, out = node.inputs[0], node.outputs[0]
        for user in {u for u, _ in out.uses()}:
            if user.op_type == "Gemm":
                _fold_into_gemm(user, out, source)
                continue
            a, b = user.inputs
            attrs = [ir.AttrInt64("transA", int(a is out)), ir.AttrInt64("transB", int(b is out))]
            gemm = ir.Node("", "Gemm", [source if a is out else a, source if b is out else b], attrs,
                           name=f"fold_transpose_gemm_{made}")
            made += 1
            graph.insert_before(user, gemm)
            gemm.outputs[0].shape, gemm.outputs[0].dtype = user.outputs[0].shape, user.outputs[0].dtype
            name = user.outputs[0].name
            user.outputs[0].replace_all_uses_with(gemm.outputs[0], replace_graph_outputs=True)
            graph.remove(user, safe=True)
            gemm.outputs[0].name = name  # a graph output keeps its name
        graph.remove(node, safe=True)
        count += 1
    if count:
        log.debug("folded %d Transpose nodes into Gemm", count)
    return count


__all__ = ["fold_transposes_into_gemm"]
