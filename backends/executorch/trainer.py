"""Train with an exported training step in ExecuTorch's runtime.

    trainer = ExecuTorchTrainer("train.pte")
    for batch in data:
        loss = trainer.step(*batch)
    trainer.save_checkpoint("ckpt.safetensors")          # atomic; resume with load_checkpoint
    cm.load_adapter_state_dict(trainer.adapter_state_dict())

Checkpoints are the same files as ``TrainingStep.save_checkpoint`` and ``OnnxTrainer``'s
(``graphpeft.training.save_training_state``): a run can move between torch, onnxruntime and
ExecuTorch.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch

from graphpeft.errors import ExportError, GraphPeftError, NonFiniteError
from graphpeft.training import TrainerCheckpoints, TrainingSignature

from .export import FORMAT, FORMAT_VERSION
from .runner import load_method, load_program, read_meta
from .train_export import INITIAL_METHOD


class ExecuTorchTrainer(TrainerCheckpoints):
    """Runs an exported training step (see ``TrainingStep.export_executorch``) in ExecuTorch.

    Args:
        path: the ``.pte`` file.
        data_path: its ``.ptd`` weights file (default: ``<stem>.ptd`` beside it, if present).

    Attributes:
        signature: the training signature stored in the file.
        lr: the learning rate fed to the next step (change it for schedules).
        steps: how many steps this trainer has run (since creation or the last checkpoint load).
    """

    def __init__(self, path: Union[str, os.PathLike], data_path: Optional[Union[str, os.PathLike]] = None) -> None:
        self.path = os.fspath(path)
        self.program = load_program(self.path, data_path)
        meta = read_meta(self.program, self.path)
        if meta.get("format") != FORMAT or meta.get("kind") != "training":
            raise ExportError(f"{self.path} is not a graphpeft training step (no training description); export one "
                              "with step.export_executorch(path)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{self.path} was exported with format version {meta.get('format_version')}; this "
                              f"graphpeft reads version {FORMAT_VERSION}: export it again")
        for key in ("format", "format_version", "kind"):
            meta.pop(key)
        self.signature: TrainingSignature = TrainingSignature.from_dict(meta)
        sig = self.signature
        self.method = load_method(self.program, "forward", self.path, data_path)
        try:
            initial = list(self.program.load_method(INITIAL_METHOD).execute([]))
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{self.path} has no readable initial state ({e}); export it again") from e
        self._param_specs = [s for s in sig.inputs if s.kind == "param"]
        self._state_specs = [s for s in sig.inputs if s.kind == "state"]
        self._batch_specs = [s for s in sig.inputs if s.kind == "batch"]
        stored = [s for s in sig.inputs if s.kind in ("param", "state", "lr")]
        if len(initial) != len(stored):
            raise ExportError(f"{self.path} holds {len(initial)} initial tensors, its signature {len(stored)}: "
                              "export it again")
        values = {s.name: t.clone() for s, t in zip(stored, initial)}
        self.lr = float(values.pop(next(s.name for s in stored if s.kind == "lr")))
        self._values: dict[str, torch.Tensor] = values
        self.steps = 0
        #: steps the program skipped (non-finite loss, gradient or lr: tensors and state unchanged)
        self.skipped_steps = 0

    # -- stepping --------------------------------------------------------------------------------

    def step(self, *batch: Any) -> float:
        """Run one training step on ``batch`` (model inputs, then targets); returns the loss."""
        specs = self._batch_specs
        if len(batch) != len(specs):
            raise ExportError(f"the training step takes {len(specs)} batch tensors "
                              f"({self.signature.num_model_inputs} model inputs, {self.signature.num_targets} "
                              f"targets), got {len(batch)}")
        tensors = []
        for spec, x in zip(specs, batch):
            t = (x if isinstance(x, torch.Tensor) else torch.as_tensor(x)).detach().cpu().contiguous()
            if list(t.shape) != spec.shape or str(t.dtype).replace("torch.", "") != spec.dtype:
                raise ExportError(f"{spec.name} must be {spec.dtype}{spec.shape} (the shapes it was exported for), "
                                  f"got {str(t.dtype).replace('torch.', '')}{list(t.shape)}; export the step for this "
                                  "batch shape")
            tensors.append(t)
        inputs: list[torch.Tensor] = []
        for spec in self.signature.inputs:
            if spec.kind in ("param", "state"):
                inputs.append(self._values[spec.name])
            elif spec.kind == "lr":
                inputs.append(torch.tensor(self.lr, dtype=torch.float32))
        inputs += tensors
        try:
            out = self.method.execute(inputs)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"ExecuTorch failed to run the training step of {self.path}: {e}") from e
        loss = float(out[0])
        # outputs live in the method's planned memory, which the next call reuses: keep copies
        for spec, t in zip(self.signature.outputs, out):
            if spec.kind in ("param", "state"):
                self._values[("param/" if spec.kind == "param" else "state/") + spec.key] = t.clone()
        self.steps += 1
        if self.signature.outputs[-1].kind == "skipped" and bool(out[len(self.signature.outputs) - 1]):
            self.skipped_steps += 1
            if self.signature.nonfinite == "raise":
                raise NonFiniteError(f"non-finite training step (loss {loss}, lr {self.lr}): the trainable tensors "
                                     "and the optimizer state were left unchanged; lower the learning rate, check "
                                     "the batch, or export a step compiled with nonfinite='skip'")
        return loss

    __call__ = step

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"params": {name: tensor}, "optimizer": {key: tensor}, "lr": float}`` (copies), the
        same structure as ``TrainingStep.state_dict()``."""
        return {
            "params": {s.key: self._values[s.name].clone() for s in self._param_specs},
            "optimizer": {s.key: self._values[s.name].clone() for s in self._state_specs},
            "lr": self.lr,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (from this trainer, an ``OnnxTrainer`` or a ``TrainingStep``);
        checks every key and shape first, so on error nothing changes."""
        params, opt = state.get("params", {}), state.get("optimizer", {})
        new: dict[str, torch.Tensor] = {}
        problems = []
        for specs, source in ((self._param_specs, params), (self._state_specs, opt)):
            for s in specs:
                if s.key not in source:
                    problems.append(f"missing {s.key}")
                    continue
                t = torch.as_tensor(source[s.key])
                if list(t.shape) != s.shape:
                    problems.append(f"{s.key} has shape {list(t.shape)}, the step needs {s.shape}")
                    continue
                new[s.name] = t.detach().to(getattr(torch, s.dtype)).clone().contiguous()
        if problems:
            raise GraphPeftError("state does not fit this training step (nothing was loaded): "
                                 + "; ".join(problems[:10]))
        self._values = new
        if "lr" in state:
            self.lr = float(state["lr"])

    def __repr__(self) -> str:
        return (f"ExecuTorchTrainer({self.path!r}, {len(self._param_specs)} trainable tensors, "
                f"optimizer={self.signature.optimizer.get('name')}, lr={self.lr:g}, steps={self.steps})")


__all__ = ["ExecuTorchTrainer"]
