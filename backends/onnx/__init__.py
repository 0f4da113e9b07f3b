"""ONNX backend: export graphs with ``torch.onnx`` (dynamo) and run them in onnxruntime."""

from __future__ import annotations

from graphpeft.registry import register_backend

from .export import ExportResult, export
from .mobile import OnnxAdapterSession, add_adapter_defaults, read_onnx_adapter, to_ort, write_onnx_adapter
from .runner import OnnxRunner, max_abs_diff
from .train_export import TrainingExportResult, export_training
from .trainer import OnnxTrainer

__all__ = ["ExportResult", "OnnxRunner", "export", "max_abs_diff"]
__all__ += ["OnnxTrainer", "TrainingExportResult", "export_training"]
__all__ += ["OnnxAdapterSession", "add_adapter_defaults", "read_onnx_adapter", "to_ort", "write_onnx_adapter"]


class _OnnxBackend:
    name = "onnx"
    export = staticmethod(export)
    runner = OnnxRunner
    export_training = staticmethod(export_training)
    trainer = OnnxTrainer
    to_ort = staticmethod(to_ort)


register_backend("onnx", _OnnxBackend())
