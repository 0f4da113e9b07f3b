"""Adapter files: ``adapter_model.safetensors`` (PEFT key names) + ``adapter_config.json``.

Writes are atomic (temporary file, fsync, rename) and the config records the SHA-256 of the
tensor file, so a truncated, corrupted or mismatched pair is detected on load; a failed load
leaves the model unchanged. The file holds the adapter constants too (VeRA's projections,
LoRA-FA's frozen A, SHiRA's indices), so it restores the adapter whatever seed the loading
model was compiled with. (PEFT's own folder format: :mod:`graphpeft.peft_interop`.)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Optional, Union

from .errors import AdapterFileError
from .paths import atomic_write, check_output_folder
from .graph import adapter_name_of

if TYPE_CHECKING:
    from .compiled import CompiledModel

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "graphpeft-adapter"
FORMAT_VERSION = 1


def save_adapter(cm: "CompiledModel", folder: Union[str, os.PathLike],
                 adapter_name: Optional[str] = None) -> dict[str, str]:
    """Save ``cm``'s adapter tensors (constants included) and config into ``folder``; returns
    the two paths. ``adapter_name``: one named adapter, under PEFT's file names (default: every
    trainable tensor of the graph, as :meth:`CompiledModel.adapter_state_dict` gives them)."""
    from safetensors.torch import save

    import graphpeft

    if adapter_name is None and cm._bank is not None and cm.active_adapters != ["default"]:
        # the file's plan would not describe the tensors the graph holds
        raise AdapterFileError(f"this model has named adapters (active: {cm.active_adapters}); save one of them: "
                               "save_adapter(folder, adapter_name=...)")
    folder = check_output_folder(folder, "save_adapter", AdapterFileError)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.contiguous() for k, v in cm.adapter_state_dict(adapter_name, include_constants=True).items()}
    if not state:
        raise AdapterFileError("the model has no adapter tensors to save (was the plan empty?)")
    blob = save(state, metadata={"format": "pt"})
    plan = cm.plan if adapter_name is None or cm._bank is None else cm._bank.plans.get(adapter_name)
    records = {k: v for k, v in cm.adapters().items()} if adapter_name is None else {
        k: v for k, v in (cm._bank.records_of(adapter_name) if cm._bank is not None else cm.adapters()).items()
        if adapter_name_of(v) == adapter_name}
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphpeft_version": graphpeft.__version__,
        "plan": plan.to_dict() if plan is not None else None,
        "adapters": {k: {"method": v["method"], "config": v.get("config"), "scaling": v.get("scaling")}
                     for k, v in records.items()},
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "tensors": {k: list(v.shape) for k, v in state.items()},
    }
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    config_path = os.path.join(folder, CONFIG_NAME)
    atomic_write(weights_path, blob)
    atomic_write(config_path, json.dumps(config, indent=2, sort_keys=True).encode())
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


def load_adapter(cm: "CompiledModel", folder: Union[str, os.PathLike],
                 adapter_name: Optional[str] = None) -> "CompiledModel":
    """Load an adapter saved by :func:`save_adapter` into ``cm``; on error ``cm`` is unchanged.

    ``adapter_name``: load into that named adapter; if ``cm`` has none of that name, it is
    added first from the plan saved in the file (inactive until ``cm.set_adapter``)."""
    config, state = read_adapter(folder)
    saved_plan = config.get("plan")
    if adapter_name is not None and adapter_name not in cm.adapter_names:
        from .plan import Plan

        if saved_plan is None:
            raise AdapterFileError(f"{os.fspath(folder)} has no plan: it cannot add adapter {adapter_name!r}; "
                                   "add the adapter with its plan first (cm.add_adapter)")
        cm.add_adapter(adapter_name, Plan.from_dict(saved_plan))
        try:
            cm.load_adapter_state_dict(state, adapter_name=adapter_name)
        except BaseException:
            cm.delete_adapter(adapter_name)  # leave the model as it was
            raise
        return cm
    own_plan = cm.plan if adapter_name is None or cm._bank is None else cm._bank.plans.get(adapter_name)
    if own_plan is not None and saved_plan is not None and saved_plan != own_plan.to_dict():
        raise AdapterFileError(
            f"the adapter in {os.fspath(folder)} was saved from a model compiled with a different plan "
            f"({saved_plan}) than this one ({own_plan.to_dict()}); compile with the same plan to load it")
    cm.load_adapter_state_dict(state, adapter_name=adapter_name)
    return cm
