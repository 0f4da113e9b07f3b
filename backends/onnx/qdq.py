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


@dataclasses.dataclass
class QDQReport:
    """Which quantized weights became ``DequantizeLinear`` nodes, and why the others did not."""

    converted: list[str] = dataclasses.field(default_factory=list)
    kept: dict[str, str] = dataclasses.field(default_factory=dict)


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
