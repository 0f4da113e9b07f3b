"""Quantized weights in an exported ONNX graph as standard ``DequantizeLinear`` nodes.

By default the export keeps ``gp.Quantize``'s own storage (packed bytes and the plain ONNX ops of
its dequantization: Cast, Floor, Sub, Mul, Reshape ...). With ``quantized_weights="qdq"`` each
int8 / int4 weight becomes one ``DequantizeLinear`` with blocked quantization (ONNX opset 21:
``axis=1``, ``block_size`` = the group size): the codes as an ``INT8`` / ``UINT4`` initializer
(ONNX packs 4-bit values low nibble first), one float scale per group and, for int4, a ``UINT4``
zero point per group. onnxruntime dequantizes them exactly as the graph did (``(q - zero) *
scale`` in float32), so parity with torch is unchanged, and tools that read QDQ graphs see
the quantization.

Rewrite on the ONNX graph (after translation), per quantized-weight record: match the value of
the weight's shape that the stored tensors compute (the dequantization's last ``Reshape``) ->
check the format has a standard form (nf4's lookup table and the float casts do not; weights
read as gathered rows or row blocks have no whole dequantized value) -> replace its uses by the
``DequantizeLinear`` output; the old nodes and initializers are then unused and removed.

With ``quantized_weights="matmulnbits"`` (inference) an int4 weight read only by a linear layer
(exported as ``Transpose`` -> ``MatMul(x, W^T)``) goes further: the ``MatMul`` becomes
onnxruntime's ``com.microsoft.MatMulNBits`` on the packed codes (``bits=4``, ``block_size`` =
the group size, a power of two >= 16; codes low nibble first, one float scale and one 4-bit zero
point per block), so the float weight is never made. Weights it does not fit (int8, other
readers, other group sizes) fall back to ``DequantizeLinear``; the report says why.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx

log = logging.getLogger(__name__)

#: the opset that has blocked DequantizeLinear and 4-bit types
QDQ_OPSET = 21
QDQ_FORMATS = ("int8", "int4")
#: onnxruntime's contrib-op domain (``MatMulNBits``)
MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class QDQReport:
    """Which quantized weights became ``DequantizeLinear`` nodes, and why the others did not."""

    converted: list[str] = dataclasses.field(default_factory=list)
    kept: dict[str, str] = dataclasses.field(default_factory=dict)
    #: weights whose every reader became a ``MatMulNBits`` (``quantized_weights="matmulnbits"``)
    matmul_nbits: list[str] = dataclasses.field(default_factory=list)


def use_dequantize_linear(model: Any, gm: fx.GraphModule) -> QDQReport:
    """Rewrite ``model`` (an ``onnx_ir`` model exported from ``gm``) in place; see the module doc."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    from graphpeft.graph import get_tensor
    from graphpeft.passes.quantize.quantize_weights import quantized

    report = QDQReport()
    for name, rec in quantized(gm).items():
        why = _problem(model, rec)
        targets = [] if why else _dequantized_values(model, rec)
        if not why and not targets:
            why = "its whole dequantized weight is not one value of the graph (read as gathered rows or row blocks)"
        if why:
            report.kept[name] = why
            continue
        tensors = {k: get_tensor(gm, n).detach().cpu() for k, n in rec["tensors"].items()}
        stored = _stored_initializers(model.graph, rec, tensors)
        # one node per use site (a training step dequantizes again for the backward), placed
        # where the old chain ended, so onnxruntime frees each float weight after its use
        for i, value in enumerate(targets):
            ir.convenience.replace_all_uses_with(value, _dequantize_linear(model.graph, rec, stored, value, i))
        report.converted.append(name)
    if report.converted:
        model.opset_imports[""] = max(model.opset_imports.get("", QDQ_OPSET), QDQ_OPSET)
        common.RemoveUnusedNodesPass()(model)
    for name, why in report.kept.items():
        log.info("quantized weight %s keeps its packed form in ONNX: %s", name, why)
    return report


def use_matmul_nbits(model: Any, gm: fx.GraphModule) -> QDQReport:
    """Rewrite ``model`` in place: each int4 weight read only by ``MatMul(x, Transpose(W))``
    becomes ``MatMulNBits`` nodes; every other int8 / int4 weight a ``DequantizeLinear``
    (:func:`use_dequantize_linear`). See the module doc."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    from graphpeft.graph import get_tensor
    from graphpeft.passes.quantize.quantize_weights import quantized

    done: list[str] = []
    why_not: dict[str, str] = {}
    for name, rec in quantized(gm).items():
        why = _problem(model, rec) or _nbits_problem(rec)
        matmuls = [] if why else [m for v in _dequantized_values(model, rec) for m in _linear_matmuls(v)]
        if not why and (not matmuls or any(m is None for m in matmuls)):
            why = "its dequantized weight has readers other than a linear layer's MatMul"
        if why:
            why_not[name] = why
            continue
        tensors = {k: get_tensor(gm, n).detach().cpu() for k, n in rec["tensors"].items()}
        stored = _nbits_initializers(model.graph, rec, tensors)
        for i, matmul in enumerate(matmuls):
            ir.convenience.replace_all_uses_with(matmul.outputs[0], _matmul_nbits(model.graph, rec, stored, matmul, i),
                                                 replace_graph_outputs=True)
        done.append(name)
    if done:
        model.opset_imports[MS_DOMAIN] = 1
        common.RemoveUnusedNodesPass()(model)
    report = use_dequantize_linear(model, gm) if len(done) < len(quantized(gm)) else QDQReport()
    report.matmul_nbits = done
    for name in report.converted:
        log.info("quantized weight %s is a DequantizeLinear, not MatMulNBits: %s", name, why_not.get(name))
    return report


def _nbits_problem(rec: dict[str, Any]) -> Optional[str]:
    g = rec["group_size"] or (_rows_cols(rec)[1])
    if rec["dtype"] != "int4":
        return f"MatMulNBits is for 4-bit weights here, this one is {rec['dtype']}"
    if len(rec["shape"]) != 2:
        return "MatMulNBits takes a 2-d linear weight"
    if g < 16 or g & (g - 1):
        return f"MatMulNBits needs a block size that is a power of two >= 16, the group size is {g}"
    return None


def _linear_matmuls(value: Any) -> list[Any]:
    """The ``MatMul(x, Transpose(value))`` nodes reading the dequantized weight ``value``; None in
    the list for any other reader."""
    out: list[Any] = []
    for node, _ in list(value.uses()):
        perm = node.attributes.get("perm") if node.op_type == "Transpose" else None
        if perm is None or list(perm.as_ints()) != [1, 0]:
            out.append(None)
            continue
        for user, index in list(node.outputs[0].uses()):
            out.append(user if user.op_type == "MatMul" and index == 1 and user.domain == "" else None)
    return out


def _nbits_initializers(graph: Any, rec: dict[str, Any], t: dict[str, torch.Tensor]) -> list[Any]:
    """``MatMulNBits`` inputs B, scales and zero points: ``(N, blocks, block/2)`` uint8 codes and
    ``(N * ceil(blocks/2))`` uint8 zero points, both low nibble first (ours: high first)."""
    import onnx_ir as ir

    rows, cols = _rows_cols(rec)
    group = int(rec["group_size"] or cols)
    blocks = cols // group
    packed = t["qdata"].numpy().reshape(rows, cols // 2)
    b = ((packed >> 4) | ((packed & 15) << 4)).astype(np.uint8).reshape(rows, blocks, group // 2)
    zero = t["zero"].reshape(rows, blocks).numpy().astype(np.uint8)
    if blocks % 2:
        zero = np.concatenate([zero, np.zeros((rows, 1), np.uint8)], axis=1)
    zp = (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    base = rec["weight"]
    scale = t["scale"].reshape(rows * blocks).float().numpy()
    return [_initializer(graph, ir.Tensor(np.ascontiguousarray(b), name=f"{base}_nbits")),
            _initializer(graph, ir.Tensor(scale, name=f"{base}_nbits_scale")),
            _initializer(graph, ir.Tensor(np.ascontiguousarray(zp), name=f"{base}_nbits_zp"))]


def _matmul_nbits(graph: Any, rec: dict[str, Any], stored: list[Any], matmul: Any, i: int) -> Any:
    """A ``MatMulNBits`` computing what ``matmul`` did, placed before it; returns its output."""
    import onnx_ir as ir

    rows, cols = _rows_cols(rec)
    name = f"{rec['weight']}_matmul_nbits{i}"
    node = ir.node("MatMulNBits", [matmul.inputs[0], *stored], domain=MS_DOMAIN, name=name, num_outputs=1,
                   attributes={"K": cols, "N": rows, "bits": 4, "block_size": int(rec["group_size"] or cols)})
    out, old = node.outputs[0], matmul.outputs[0]
    # the new value takes the old one's name (it may be a graph output)
    out.name, old.name = old.name, f"{name}_replaced"
    out.dtype, out.shape = old.dtype, old.shape
    graph.insert_before(matmul, node)
    return out


def _problem(model: Any, rec: dict[str, Any]) -> Optional[str]:
    if rec["dtype"] not in QDQ_FORMATS:
        return f"{rec['dtype']} has no standard ONNX form (DequantizeLinear is affine per block)"
    missing = [n for n in rec["tensors"].values() if n not in model.graph.initializers]
    if missing:
        return f"its stored tensors {missing} are not initializers of the graph"
    return None


def _dequantized_values(model: Any, rec: dict[str, Any]) -> list[Any]:
    """The values of the weight's shape computed from all of its stored tensors and from nothing
    else (the dequantization's output), earliest first per chain."""
    stored = {model.graph.initializers[n] for n in rec["tensors"].values()}
    shape = tuple(rec["shape"])
    deps: dict[Any, frozenset] = {v: frozenset([v]) for v in stored}
    found: list[Any] = []
    frontier = list(stored)
    while frontier:
        value = frontier.pop()
        for node, _ in list(value.uses()):
            inputs = [i for i in node.inputs if i is not None]
            if any(i not in deps and not _constant(i) for i in inputs) or all(o in deps for o in node.outputs):
                continue
            need = frozenset().union(*(deps.get(i, frozenset()) for i in inputs))
            for out in node.outputs:
                deps[out] = need
                if need == stored and node.op_type == "Reshape" and _shape(out) == shape:
                    found.append(out)  # complete: not followed further (a Transpose after it is the layer's)
                else:
                    frontier.append(out)
    return found


def _constant(value: Any) -> bool:
    return value.const_value is not None or (value.producer() is not None and value.producer().op_type == "Constant")


def _shape(value: Any) -> Optional[tuple]:
    try:
        return tuple(int(d) for d in value.shape) if value.shape is not None else None
    except (TypeError, ValueError):
        return None


def _stored_initializers(graph: Any, rec: dict[str, Any], t: dict[str, torch.Tensor]) -> list[Any]:
    """The ``DequantizeLinear`` inputs as new initializers: codes, scales (and int4 zero points)."""
    import onnx_ir as ir

    rows, cols = _rows_cols(rec)
    group = rec["group_size"] or cols
    base = rec["weight"]
    scale = ir.Tensor(t["scale"].reshape(rows, cols // group).float().numpy(), name=f"{base}_s")
    if rec["dtype"] == "int8":
        return [_initializer(graph, ir.Tensor(t["qdata"].reshape(rows, cols).numpy(), name=f"{base}_q")),
                _initializer(graph, scale)]
    import ml_dtypes

    packed = t["qdata"].numpy().reshape(rows, cols // 2)  # ours: high nibble first; ONNX packs low first
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(rows, cols).astype(ml_dtypes.uint4)
    zero = t["zero"].reshape(rows, cols // group).numpy().astype(ml_dtypes.uint4)
    return [_initializer(graph, ir.Tensor(codes, name=f"{base}_q")), _initializer(graph, scale),
            _initializer(graph, ir.Tensor(zero, name=f"{base}_zp"))]


def _rows_cols(rec: dict[str, Any]) -> tuple[int, int]:
    shape = [int(s) for s in rec["shape"]]
    return shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1


def _dequantize_linear(graph: Any, rec: dict[str, Any], stored: list[Any], old: Any, i: int) -> Any:
    """A ``DequantizeLinear`` (and a ``Reshape`` for weights of more than two dimensions) before
    the producer of ``old``, making the weight from ``stored``; returns its output value."""
    import onnx_ir as ir

    shape = [int(s) for s in rec["shape"]]
    rows, cols = _rows_cols(rec)
    base, at = f"{rec['weight']}_dq{i}", old.producer()
    dq = ir.node("DequantizeLinear", stored, attributes={"axis": 1, "block_size": int(rec["group_size"] or cols)},
                 name=base, num_outputs=1)
    out = dq.outputs[0]
    out.name, out.dtype, out.shape = base, ir.DataType.FLOAT, ir.Shape([rows, cols])
    graph.insert_before(at, dq)
    if len(shape) == 2:
        return out
    dims = _initializer(graph, ir.Tensor(np.array(shape, dtype=np.int64), name=f"{base}_shape"))
    reshape = ir.node("Reshape", [out, dims], name=f"{base}_reshape", num_outputs=1)
    reshape.outputs[0].name, reshape.outputs[0].dtype = f"{base}_{len(shape)}d", ir.DataType.FLOAT
    reshape.outputs[0].shape = ir.Shape(shape)
    graph.insert_before(at, reshape)
    return reshape.outputs[0]


def _initializer(graph: Any, tensor: Any) -> Any:
    import onnx_ir as ir

    value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value
