"""ExecuTorch backend: ``.pte`` programs (XNNPACK delegate, portable kernels) for inference and
whole training steps, run by ExecuTorch's own runtime.

Importing this package does not import ExecuTorch (an optional extra:
``pip install 'graphpeft[executorch]'``); exporting or running without it raises an
:class:`~graphpeft.errors.ExportError` that says how to install it.
"""

from __future__ import annotations

from graphpeft.registry import register_backend

from .export import ExecuTorchExportResult, export
from .runner import ExecuTorchRunner
from .train_export import ExecuTorchTrainingExportResult, export_training
from .trainer import ExecuTorchTrainer

__all__ = ["ExecuTorchExportResult", "ExecuTorchRunner", "ExecuTorchTrainer", "ExecuTorchTrainingExportResult",
           "export", "export_training"]


class _ExecuTorchBackend:
    name = "executorch"
    export = staticmethod(export)
    runner = ExecuTorchRunner
    export_training = staticmethod(export_training)
    trainer = ExecuTorchTrainer


register_backend("executorch", _ExecuTorchBackend())
