"""ONNX backend: export graphs with ``torch.onnx`` (dynamo) and run them in onnxruntime."""

from __future__ import annotations

from graphpeft.registry import register_backend

from .export import ExportResult, export
from .runner import OnnxRunner, max_abs_diff

__all__ = ["ExportResult", "OnnxRunner", "export", "max_abs_diff"]


class _OnnxBackend:
    name = "onnx"
    export = staticmethod(export)
    runner = OnnxRunner


register_backend("onnx", _OnnxBackend())
