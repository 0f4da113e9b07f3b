"""Storage formats of quantized weights: the quantization math (torchao) and the dequantization
as aten ops, written once for both the graph and eager torch.

A format turns a float weight ``W`` (any shape; viewed as ``rows x cols`` with ``rows =
W.shape[0]``, grouped along ``cols`` in groups of ``group_size``) into named tensors (suffix ->
tensor), and :func:`dequantize` rebuilds ``W`` from them with plain aten ops through an
:class:`Ops` object: :class:`EagerOps` runs them, the rewrite's builder
(:class:`graphpeft.graph.GraphBuilder`) emits them as graph nodes. The same op list therefore
runs in the graph, in its ONNX export and in merge (dequantize, add ΔW, re-quantize), so the
three agree bit for bit.

Formats (bytes per weight, with per-group scales of 64 weights, float32 scales):

- ``int8``: symmetric per-group int8 (torchao ``choose_qparams_affine`` / ``quantize_affine``,
  ``MappingType.SYMMETRIC``); ``qdata`` int8 ``(rows, cols)``, ``scale`` float32
  ``(rows, groups, 1)``: 1 + 4/64 bytes.
- ``int4``: asymmetric per-group 4-bit (torchao, ``MappingType.ASYMMETRIC``, quant range
  0..15), packed two per byte (high nibble first, as torchao's NF4 packs);
  ``qdata`` uint8 ``(rows, cols/2)``, ``scale`` float32 and ``zero`` uint8
  ``(rows, groups, 1)``: 0.5 + 5/64 bytes.
- ``nf4``: QLoRA's NormalFloat4 with double-quantized absmax scalers, computed by torchao's
  ``NF4Tensor.from_tensor`` and stored as its inner tensors: ``qdata`` uint8 (packed codes),
  ``qscalers`` int8 (one per group), ``qfactor`` float32 (one per scaler block of up to 256
  groups), ``scaler_mean`` and ``table`` (the 16 NF4 levels): about 0.5 + 1/64 bytes.
- ``bfloat16`` / ``float16``: the weight cast (torch), dequantized by a cast back.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Protocol

import torch

aten = torch.ops.aten

#: the ``dtype`` options of ``gp.Quantize``
DTYPES = ("int8", "int4", "nf4", "bfloat16", "float16")
#: formats that pack two 4-bit codes per byte (their groups must be even)
PACKED = ("int4", "nf4")
FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: formats whose stored tensors hold whole weight rows (row ``r`` of each stored tensor belongs to
#: row ``r`` of the weight): rows can be gathered (an embedding lookup) or sliced (a head read in
#: chunks) before they are dequantized. NF4's scalers are double-quantized in blocks across rows.
ROW_FORMATS = ("int8", "int4", "bfloat16", "float16")


class Ops(Protocol):
    def call(self, target: Callable, *args: Any, **kwargs: Any) -> Any: ...


class EagerOps:
    """Runs the dequantization ops on tensors (merge, references, tests)."""

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> Any:
        return target(*args, **kwargs)


def layout(shape: torch.Size | tuple, group_size: Optional[int]) -> tuple[int, int, int]:
    """``(rows, cols, group)`` of a weight of ``shape``: ``group_size=None`` is one group per row."""
    rows = int(shape[0])
    cols = int(math.prod(shape[1:])) if len(shape) > 1 else 1
    return rows, cols, cols if group_size is None else int(group_size)


def layout_problem(shape: torch.Size | tuple, dtype: str, group_size: Optional[int]) -> Optional[str]:
    """Why a weight of ``shape`` cannot be stored as ``dtype`` with ``group_size`` (None: it can)."""
    if dtype in FLOAT_DTYPES:
        return None
    rows, cols, g = layout(shape, group_size)
    if cols % g:
        return (f"its rows have {cols} values, not a multiple of group_size={group_size}; "
                f"use a group_size that divides {cols} (or group_size=None: one scale per row)")
    if dtype in PACKED and g % 2:
        return f"{dtype} packs two values per byte, so a group needs an even size, got {g}"
    return None


def quantize(w: torch.Tensor, dtype: str, group_size: Optional[int]) -> dict[str, torch.Tensor]:
    """The stored tensors (suffix -> tensor, on ``w``'s device) of ``w`` in format ``dtype``."""
    w = w.detach()
    if dtype in FLOAT_DTYPES:
        return {"qdata": w.to(FLOAT_DTYPES[dtype]).contiguous()}
    rows, cols, g = layout(w.shape, group_size)
    w2 = w.reshape(rows, cols).float()
    ng = cols // g
    if dtype == "nf4":
        return _quantize_nf4(w2, g)
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    if dtype == "int8":
        scale, zero = choose_qparams_affine(w2, MappingType.SYMMETRIC, (1, g), torch.int8,
                                            scale_dtype=torch.float32)
        q = quantize_affine(w2, (1, g), scale, zero, torch.int8)
        # symmetric int8 maps 0 to 0: the zero points are all zero and are not stored
        assert w.is_meta or not zero.any(), "torchao's symmetric int8 zero point is expected to be 0"
        return {"qdata": q.contiguous(), "scale": scale.reshape(rows, ng, 1).contiguous()}
    if dtype == "int4":
        scale, zero = choose_qparams_affine(w2, MappingType.ASYMMETRIC, (1, g), torch.uint8, quant_min=0,
                                            quant_max=15, scale_dtype=torch.float32,
                                            zero_point_dtype=torch.int32)
        q = quantize_affine(w2, (1, g), scale, zero, torch.uint8, quant_min=0, quant_max=15)
        return {"qdata": pack_nibbles(q), "scale": scale.reshape(rows, ng, 1).contiguous(),
                "zero": zero.reshape(rows, ng, 1).to(torch.uint8).contiguous()}
    raise ValueError(f"unknown quantized dtype {dtype!r}; use one of {list(DTYPES)}")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``(..., 2k)`` -> bytes ``(..., k)``, the first of each pair in the high nibble.
    (torchao packs NF4 the same way inside ``NF4Tensor``; its generic ``uintx`` packing is laid
    out for its own kernels, so the graph's unpacking is simpler with this one.)"""
    codes = codes.to(torch.uint8)
    return (codes[..., ::2] << 4 | codes[..., 1::2]).contiguous()


def _quantize_nf4(w2: torch.Tensor, g: int) -> dict[str, torch.Tensor]:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    n_blocks = w2.numel() // g
    # torchao double-quantizes the scalers in blocks of scaler_block_size groups (QLoRA: 256);
    # it needs that to divide the number of groups, so small weights use the largest divisor
    sbs = math.gcd(n_blocks, 256)
    t = NF4Tensor.from_tensor(w2.contiguous(), g, sbs)
    return {"qdata": t.quantized_data.reshape(w2.shape[0], -1).contiguous(),
            "qscalers": t.quantized_scalers.contiguous(),
            "qfactor": t.quantization_factor.float().reshape(-1, 1).contiguous(),
            "scaler_mean": t.scaler_mean.float().reshape(()).clone(),
            "table": t.nf4.float().contiguous()}


def take_rows(ops: Ops, t: Mapping[str, Any], index: Any) -> dict[str, Any]:
    """The stored tensors of the weight rows ``index`` (1-D int64): dequantize them with
    ``shape=(-1, cols)``. Only for :data:`ROW_FORMATS`."""
    return {k: ops.call(aten.index_select.default, v, 0, index) for k, v in t.items()}


def slice_rows(ops: Ops, t: Mapping[str, Any], start: int, end: int) -> dict[str, Any]:
    """The stored tensors of weight rows ``start:end``. Only for :data:`ROW_FORMATS`."""
    return {k: ops.call(aten.slice.Tensor, v, 0, start, end) for k, v in t.items()}


def _unpack(ops: Ops, packed: Any) -> Any:
    """Bytes ``(..., k)`` -> float32 codes ``(..., k, 2)`` (high nibble first). Unpacked in
    float32 (exact for 0..255): ``floor(p / 16)`` and ``p - 16 * hi`` translate to plain ONNX
    ops, where torch.onnx's translation of a uint8 ``bitwise_right_shift`` gave a graph that
    onnxruntime rejects (mismatched int16/uint8 types)."""
    p = ops.call(aten._to_copy.default, packed, dtype=torch.float32)
    hi = ops.call(aten.div.Tensor_mode, p, 16.0, rounding_mode="floor")
    lo = ops.call(aten.sub.Tensor, p, ops.call(aten.mul.Tensor, hi, 16.0))
    return ops.call(aten.stack.default, [hi, lo], -1)


def _device(x: Any) -> torch.device:
    """The device of a tensor, or of a graph node's value."""
    return x.meta["val"].device if hasattr(x, "meta") else x.device


def _dequantize_int4(ops: Ops, t: Mapping[str, Any], rows: int, ng: int, g: int) -> Any:
    """int4 codes -> ``(codes - zero) * scale`` as ``(rows, ng, g)`` float32 (high nibble first)
    with a single weight-sized temporary: the floor division of the packed bytes (viewed
    ``(rows, cols/2, 1)``) by ``[16, 1]`` makes ``[high, byte]`` pairs straight in the final
    layout, and the remainder by 16 (``[high, low]``), the zero point and the scale are applied
    in place. Out of place (unpack, stack, subtract, multiply) two float weights were alive at
    each step; the memory plan counts an in-place op as its input's storage. Exact as before:
    every value is an integer below 256 until the one multiplication by the scale. Every op
    translates to plain ONNX (Range, Div + Floor, Mod's Floor/Sub, Sub, Mul: the export makes the
    writes into this fresh tensor functional); the float scales are read as stored (a reshape of
    them would be folded into a new initializer by the ONNX export)."""
    packed = ops.call(aten.view.default, t["qdata"], [rows, ng * g // 2, 1])
    shifts = ops.call(aten.arange.start_step, 16, 0, -15, dtype=torch.float32, device=_device(t["qdata"]))
    x = ops.call(aten.div.Tensor_mode, packed, shifts, rounding_mode="floor")  # [high, byte]: a new tensor
    x = ops.call(aten.remainder_.Scalar, x, 16)  # [high, low]
    x = ops.call(aten.view.default, x, [rows, ng, g])
    x = ops.call(aten.sub_.Tensor, x, t["zero"])
    return ops.call(aten.mul_.Tensor, x, t["scale"])


def dequantize(ops: Ops, t: Mapping[str, Any], dtype: str, shape: tuple, group_size: Optional[int],
               out_dtype: torch.dtype) -> Any:
    """The weight (``shape``, ``out_dtype``) from its stored tensors ``t`` (tensors, or graph
    nodes when ``ops`` builds a graph), as plain aten ops. ``shape[0]`` may be -1 (rows taken
    with :func:`take_rows`) except for nf4."""
    shape = [int(s) for s in shape]
    if dtype in FLOAT_DTYPES:
        return ops.call(aten._to_copy.default, t["qdata"], dtype=out_dtype)
    rows, cols, g = layout(shape, group_size)
    ng = cols // g
    if dtype == "int8":
        q = ops.call(aten.view.default, t["qdata"], [rows, ng, g])
        x = ops.call(aten._to_copy.default, q, dtype=torch.float32)
        x = ops.call(aten.mul.Tensor, x, t["scale"])
    elif dtype == "int4":
        x = _dequantize_int4(ops, t, rows, ng, g)
    elif dtype == "nf4":
        n_blocks = rows * ng
        codes = ops.call(aten.view.default, _unpack(ops, t["qdata"]), [n_blocks, g])
        codes = ops.call(aten._to_copy.default, codes, dtype=torch.int64)
        levels = ops.call(aten.index.Tensor, t["table"], [codes])
        n_sb = t["qfactor"].meta["val"].shape[0] if hasattr(t["qfactor"], "meta") else t["qfactor"].shape[0]
        s = ops.call(aten.view.default, t["qscalers"], [n_sb, n_blocks // n_sb])
        s = ops.call(aten._to_copy.default, s, dtype=torch.float32)
        s = ops.call(aten.div.Tensor, s, t["qfactor"])
        s = ops.call(aten.view.default, s, [n_blocks, 1])
        s = ops.call(aten.add.Tensor, s, t["scaler_mean"])
        x = ops.call(aten.mul.Tensor, levels, s)
    else:
        raise ValueError(f"unknown quantized dtype {dtype!r}; use one of {list(DTYPES)}")
    x = ops.call(aten.view.default, x, shape)
    if out_dtype != torch.float32:
        x = ops.call(aten._to_copy.default, x, dtype=out_dtype)
    return x


def stored_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
