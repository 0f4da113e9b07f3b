"""Run exported ExecuTorch programs with ExecuTorch's own runtime (``executorch.runtime``)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Union

import torch

from graphpeft.errors import ExportError


def _tensor(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    return t.detach().cpu().contiguous()


def default_data_path(path: str) -> Optional[str]:
    """``<stem>.ptd`` beside the program, if it exists (what ``external_data=True`` writes)."""
    candidate = os.path.splitext(path)[0] + ".ptd"
    return candidate if os.path.isfile(candidate) else None


def load_program(path: Union[str, os.PathLike], data_path: Optional[Union[str, os.PathLike]] = None) -> Any:
    """An ``executorch.runtime.Program`` for ``path`` (and its ``.ptd``), with typed errors."""
    from .export import require_executorch

    require_executorch()
    from executorch.runtime import Runtime

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ExportError(f"{path} does not exist: export it with cm.export_executorch(path) or "
                          "step.export_executorch(path)")
    data = os.fspath(data_path) if data_path is not None else default_data_path(path)
    try:
        return Runtime.get().load_program(path, data_path=data)
    except Exception as e:  # noqa: BLE001 - the runtime raises RuntimeError with a status code
        raise ExportError(f"ExecuTorch could not load {path}{' with ' + data if data else ''}: {e}. If the program "
                          "keeps its weights in a .ptd file, pass data_path") from e


def load_method(program: Any, name: str, path: str, data_path: Any = None) -> Any:
    """``program.load_method(name)`` with an error that says what to do."""
    try:
        return program.load_method(name)
    except Exception as e:  # noqa: BLE001
        hint = ""
        if data_path is None and default_data_path(path) is None:
            hint = (f". If the program keeps its weights in a .ptd data file (export with external_data=True), pass "
                    f"data_path (none at {os.path.splitext(path)[0]}.ptd)")
        raise ExportError(f"ExecuTorch could not load the {name} method of {path}: {e}{hint}") from e


def read_meta(program: Any, path: str) -> dict[str, Any]:
    """The JSON the exporter stored in the program's ``graphpeft`` method ({} if none)."""
    if "graphpeft" not in program.method_names:
        return {}
    try:
        return json.loads(program.load_method("graphpeft").execute([])[0])
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: its graphpeft description is unreadable ({e}); export it again") from e


class ExecuTorchRunner:
    """An ExecuTorch program's ``forward`` method that takes and returns the graph's flat inputs.

    Args:
        path: the ``.pte`` file.
        data_path: its ``.ptd`` weights file (default: ``<stem>.ptd`` beside it, if present).
    """

    def __init__(self, path: Union[str, os.PathLike], data_path: Optional[Union[str, os.PathLike]] = None) -> None:
        self.path = os.fspath(path)
        self.program = load_program(self.path, data_path)
        self.meta = read_meta(self.program, self.path)
        self.input_names: list[str] = list(self.meta.get("inputs", []))
        self.output_names: list[str] = list(self.meta.get("outputs", []))
        self.adapter_inputs: list[str] = list(self.meta.get("adapter_inputs", []))
        self.method = load_method(self.program, "forward", self.path, data_path)

    def run(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        tensors = [_tensor(x) for x in inputs]
        if self.input_names and len(tensors) != len(self.input_names):
            raise ExportError(f"the program takes {len(self.input_names)} inputs {self.input_names}, got {len(tensors)}")
        shapes = self.meta.get("input_shapes")
        if shapes:
            bad = [(n, list(t.shape), s) for n, t, s in zip(self.input_names, tensors, shapes) if list(t.shape) != s]
            if bad:
                name, got, want = bad[0]
                raise ExportError(f"input {name} has shape {got}; the program was exported for {want} (ExecuTorch "
                                  "programs have static shapes): export it again with example_inputs of this shape")
        try:
            return list(self.method.execute(tensors))
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"ExecuTorch failed to run {self.path}: {e}") from e

    __call__ = run

    def __repr__(self) -> str:
        return f"ExecuTorchRunner({self.path!r}, inputs={self.input_names})"


__all__ = ["ExecuTorchRunner", "default_data_path", "load_method", "load_program", "read_meta"]
