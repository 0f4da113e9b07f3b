"""Lowering targets (importable as ``graphpeft.backends``); each registers with the core."""

from __future__ import annotations

from . import executorch, onnx

__all__ = ["executorch", "onnx"]
