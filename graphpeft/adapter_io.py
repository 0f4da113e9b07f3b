"""Adapter files: ``adapter_model.safetensors`` (PEFT key names) + ``adapter_config.json``.

Writes are atomic (temporary file, fsync, rename) and the config records the SHA-256 of the
tensor file, so a truncated, corrupted or mismatched pair is detected on load; a failed load
leaves the model unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, Union

from .errors import AdapterFileError

if TYPE_CHECKING:
    from .compiled import CompiledModel

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "graphpeft-adapter"
FORMAT_VERSION = 1


def _atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(cm: "CompiledModel", folder: Union[str, os.PathLike]) -> dict[str, str]:
    """Save ``cm``'s adapter tensors and config into ``folder``; returns the two paths."""
    from safetensors.torch import save

    import graphpeft

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.contiguous() for k, v in cm.adapter_state_dict().items()}
    if not state:
        raise AdapterFileError("the model has no adapter tensors to save (was the plan empty?)")
    blob = save(state, metadata={"format": "pt"})
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphpeft_version": graphpeft.__version__,
        "plan": cm.plan.to_dict() if cm.plan is not None else None,
        "adapters": {k: {"method": v["method"], "config": v.get("config"), "scaling": v.get("scaling")}
                     for k, v in cm.adapters().items()},
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "tensors": {k: list(v.shape) for k, v in state.items()},
    }
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    config_path = os.path.join(folder, CONFIG_NAME)
    _atomic_write(weights_path, blob)
    _atomic_write(config_path, json.dumps(config, indent=2, sort_keys=True).encode())
    return {"weights": weights_path, "config": config_path}


def read_adapter(folder: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and check an adapter folder: (config, state dict). Raises :class:`AdapterFileError`."""
    from safetensors.torch import load

    folder = os.fspath(folder)
    config_path = os.path.join(folder, CONFIG_NAME)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise AdapterFileError(f"{p} does not exist: pass the folder that save_adapter() wrote")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_path} is corrupted (not valid JSON: {e}); save the adapter again") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise AdapterFileError(f"{config_path} is not a graphpeft adapter config (format={config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{config_path} has format version {config.get('format_version')}; "
                               f"this graphpeft reads version {FORMAT_VERSION}")
    with open(weights_path, "rb") as f:
        blob = f.read()
    if hashlib.sha256(blob).hexdigest() != config.get("weights_sha256"):
        raise AdapterFileError(f"{weights_path} does not match its config (checksum differs): the file is "
                               "corrupted or from another save; save the adapter again")
    try:
        state = load(blob)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterFileError(f"{weights_path} is not a valid safetensors file: {e}") from e
    return config, state


def load_adapter(cm: "CompiledModel", folder: Union[str, os.PathLike]) -> "CompiledModel":
    """Load an adapter saved by :func:`save_adapter` into ``cm``; on error ``cm`` is unchanged."""
    config, state = read_adapter(folder)
    saved_plan = config.get("plan")
    if cm.plan is not None and saved_plan is not None and saved_plan != cm.plan.to_dict():
        raise AdapterFileError(
            f"the adapter in {os.fspath(folder)} was saved from a model compiled with a different plan "
            f"({saved_plan}) than this one ({cm.plan.to_dict()}); compile with the same plan to load it")
    cm.load_adapter_state_dict(state)
    return cm
