"""Run exported graphs in plain onnxruntime."""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np
import torch

from graphpeft.errors import ExportError


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


#: suffix of the codes of a ``gp.Quantize`` weight exported in its packed form
PACKED_SUFFIX = "_qdata"


def packed_quantized(proto: Any) -> bool:
    """Whether an ``onnx.ModelProto`` stores ``gp.Quantize`` weights in the packed form (codes
    dequantized by plain ops on initializers)."""
    from onnx import TensorProto

    low = (TensorProto.UINT8, TensorProto.INT8, TensorProto.BFLOAT16, TensorProto.FLOAT16)
    return any(i.name.endswith(PACKED_SUFFIX) and i.data_type in low for i in proto.graph.initializer)


def disabled_optimizers(proto: Any, training: bool) -> list[str]:
    """onnxruntime graph optimizers a session of ``proto`` runs without (none unless the graph
    holds packed quantized weights).

    ``ConstantFolding``: a packed weight's dequantization reads initializers only, so onnxruntime
    would fold it into a float initializer at load time and the quantization would save nothing
    (measured on an int4 Llama training step: 638 MB loaded instead of 82 MB).
    ``CommonSubexpressionElimination`` (training steps): it would merge the weight's second
    dequantization, made for the backward on purpose, into the forward's, so that the float
    weight lives from the forward to the backward. (``DequantizeLinear`` weights are neither
    folded nor merged by onnxruntime: nothing to switch off for them.)"""
    if not packed_quantized(proto):
        return []
    return ["ConstantFolding", *(["CommonSubexpressionElimination"] if training else [])]


class OnnxRunner:
    """An ``onnxruntime.InferenceSession`` that takes and returns the graph's flat inputs."""

    def __init__(self, path: Union[str, os.PathLike], providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # idle worker threads spin by default and take the CPU from torch running beside them
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        try:
            import onnx

            # an .ort file is onnxruntime's own format, optimized already (and not an ONNX proto)
            skip = [] if os.fspath(path).endswith(".ort") else \
                disabled_optimizers(onnx.load(os.fspath(path), load_external_data=False), training=False)
            self.session = ort.InferenceSession(os.fspath(path), opts, providers=list(providers),
                                                disabled_optimizers=skip)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxruntime could not load {os.fspath(path)}: {e}") from e
        self._ort = ort
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise ExportError(f"the graph takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        feed = {name: _to_numpy(x) for name, x in zip(self.input_names, inputs)}
        if any(o.type == "tensor(bfloat16)" for o in self.session.get_outputs()) or any(
                isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 for x in inputs):
            return self._run_bfloat16(inputs)
        return self.session.run(self.output_names, feed)

    def _run_bfloat16(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """numpy has no bfloat16, so ``session.run`` cannot take or return it: bind onnxruntime
        values instead; bfloat16 outputs come back as ``ml_dtypes.bfloat16`` arrays."""
        from .trainer import _numpy, _ortvalue, _value_tensor

        io = self.session.io_binding()
        values = [_ortvalue(self._ort, _numpy(x)) for x in inputs]  # alive until the run returns
        for name, value in zip(self.input_names, values):
            io.bind_ortvalue_input(name, value)
        for name in self.output_names:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        return [_numpy(_value_tensor(v)) for v in io.get_outputs()]

    __call__ = run


def max_abs_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Largest absolute difference between two lists of tensors / arrays."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} outputs vs {len(b)}")
    return max(float(np.max(np.abs(_to_numpy(x).astype(np.float64) - _to_numpy(y).astype(np.float64))))
               for x, y in zip(a, b))
