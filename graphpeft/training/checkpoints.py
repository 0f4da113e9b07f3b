"""Training checkpoints: one safetensors file of parameters, optimizer state and lr, written
atomically; shared by ``TrainingStep`` and the runtime trainers.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import torch

from ..errors import GraphPeftError
from .signature import TrainingSignature

Tensor = torch.Tensor

# --- checkpoints ---------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "graphpeft-training-state"


def _signature_digest(sig: TrainingSignature) -> str:
    import hashlib
    import json

    data = {"params": [[s.key, s.shape, s.dtype] for s in sig.inputs if s.kind == "param"],
            "state": [[s.key, s.shape, s.dtype] for s in sig.inputs if s.kind == "state"],
            "optimizer": sig.optimizer}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def save_training_state(path: Union[str, os.PathLike], state: Mapping[str, Any],
                        signature: Optional[TrainingSignature] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write a training state (``{"params", "optimizer", "lr"}``) to one safetensors file,
    atomically (temporary file, fsync, rename). ``signature`` records what it fits."""
    import json

    from safetensors.torch import save

    from ..paths import atomic_write

    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in state["params"].items()}
    tensors.update({f"state/{k}": v.detach().cpu().contiguous() for k, v in state["optimizer"].items()})
    meta = {"format": CHECKPOINT_FORMAT, "lr": repr(float(state.get("lr", 0.0))),
            "extra": json.dumps(dict(extra or {}))}
    if signature is not None:
        meta["signature_sha256"] = _signature_digest(signature)
    from ..paths import check_output_file

    path = check_output_file(path, "save_checkpoint", GraphPeftError)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.abspath(path), save(tensors, metadata=meta))


def load_training_state(path: Union[str, os.PathLike], signature: Optional[TrainingSignature] = None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a file written by :func:`save_training_state`: ``(state, extra)``. Raises
    :class:`~graphpeft.errors.GraphPeftError` if it is not one or does not fit ``signature``."""
    import json

    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GraphPeftError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise GraphPeftError(f"checkpoint {path} is corrupted or not a safetensors file ({e})") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise GraphPeftError(f"{path} is not a graphpeft training checkpoint")
    if signature is not None and meta.get("signature_sha256") not in (None, _signature_digest(signature)):
        raise GraphPeftError(f"checkpoint {path} was written for another training step (different trainable "
                             "tensors, shapes or optimizer): resume with the step it was saved from")
    state = {"params": {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")},
             "optimizer": {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")},
             "lr": float(meta.get("lr", "0"))}
    return state, json.loads(meta.get("extra", "{}"))


class TrainerCheckpoints:
    """Checkpoint methods shared by the runtime trainers (``OnnxTrainer``, ``ExecuTorchTrainer``):
    a trainer provides ``signature``, ``steps``, ``state_dict()`` and ``load_state_dict()``; the
    files are :func:`save_training_state`'s, so torch, onnxruntime and ExecuTorch resume each
    other's."""

    signature: TrainingSignature
    steps: int

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trained tensors under the model's (PEFT) key names: load them with
        ``cm.load_adapter_state_dict``."""
        return self.state_dict()["params"]

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write parameters, optimizer state, lr and step count to ``path`` (safetensors, atomic)."""
        save_training_state(path, self.state_dict(), signature=self.signature, extra={"steps": self.steps})

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Resume from a checkpoint written by :meth:`save_checkpoint` (or by a ``TrainingStep``
        or another runtime's trainer)."""
        state, extra = load_training_state(path, signature=self.signature)
        self.load_state_dict(state)
        self.steps = int(extra.get("steps", 0))

    @classmethod
    def resume(cls, path: Union[str, os.PathLike], checkpoint: Union[str, os.PathLike], **kwargs: Any) -> Any:
        """A trainer for ``path`` that continues from ``checkpoint``."""
        trainer = cls(path, **kwargs)  # type: ignore[call-arg]
        trainer.load_checkpoint(checkpoint)
        return trainer
