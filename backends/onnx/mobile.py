"""onnxruntime for mobile: ORT-format models and onnxruntime's own adapter format.

    result = cm.export_onnx("base.onnx", merged=False, adapters_as_inputs=True)
    to_ort("base.onnx", "base.ort", adapter_inputs=result.adapter_inputs)   # ORT format
    write_onnx_adapter("a.onnx_adapter", cm.adapter_state_dict("a", include_constants=True))
    session = OnnxAdapterSession("base.ort")
    outputs = session.run(model_inputs, adapter="a.onnx_adapter")

* :func:`to_ort` converts an ``.onnx`` file with onnxruntime's own converter
  (``onnxruntime.tools.convert_onnx_models_to_ort``, fixed optimizations, the NCHWc layout kept
  out so the file runs on ARM too) and writes the ``.ort`` atomically.
* :func:`write_onnx_adapter` writes tensors in onnxruntime's adapter format
  (``onnxruntime.AdapterFormat``, ``.onnx_adapter``). With a model exported
  ``adapters_as_inputs=True`` the adapter's tensors are named like the model's adapter inputs
  (PEFT names), so the file is an adapter for that model.
* :class:`OnnxAdapterSession` runs such a model with one adapter active
  (``RunOptions.add_active_adapter``): the caller feeds only the model's own inputs, onnxruntime
  feeds the adapter's tensors (no copy through Python per call). onnxruntime applies adapters to
  inputs that have default values only, so :func:`add_adapter_defaults` (``to_ort(...,
  adapter_inputs=...)``) gives the adapter inputs zero defaults: no adapter active = base model.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from graphpeft.errors import ExportError
from graphpeft.paths import atomic_write

PathLike = Union[str, os.PathLike]


def add_adapter_defaults(onnx_path: PathLike, adapter_inputs: Sequence[str], out_path: Optional[PathLike] = None) -> str:
    """Give each adapter input of ``onnx_path`` a default value of zeros (written to ``out_path``,
    default in place; atomic). onnxruntime applies ``.onnx_adapter`` files to inputs that have
    defaults (overridable initializers): with zeros, a run with no adapter active is the base
    model (LoRA's ``B = 0``)."""
    import onnx
    from onnx import helper, numpy_helper

    src = os.path.abspath(os.fspath(onnx_path))
    dst = os.path.abspath(os.fspath(out_path)) if out_path is not None else src
    proto = onnx.load(src)
    inputs = {i.name: i for i in proto.graph.input}
    have = {i.name for i in proto.graph.initializer}
    missing = [n for n in adapter_inputs if n not in inputs]
    if missing:
        raise ExportError(f"{src} has no inputs {missing[:4]}: export it with cm.export_onnx(path, merged=False, "
                          "adapters_as_inputs=True) and pass its result.adapter_inputs")
    for name in adapter_inputs:
        if name in have:
            continue
        tt = inputs[name].type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        if any(d.dim_param or not d.HasField("dim_value") for d in tt.shape.dim):
            raise ExportError(f"adapter input {name} has a symbolic shape; cannot give it a default")
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros(dims, dtype=dtype), name=name))
    atomic_write(dst, lambda tmp: onnx.save_model(proto, tmp))
    return dst


def to_ort(onnx_path: PathLike, ort_path: Optional[PathLike] = None, *,
           adapter_inputs: Optional[Sequence[str]] = None) -> str:
    """Convert ``onnx_path`` to ORT format at ``ort_path`` (default: the same name with
    ``.ort``); returns the path written. External data must sit beside the ``.onnx`` file.
    ``adapter_inputs`` (an adapters-as-inputs export's ``result.adapter_inputs``) get zero
    defaults first (:func:`add_adapter_defaults`), so ``.onnx_adapter`` files apply to them."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    src = os.path.abspath(os.fspath(onnx_path))
    if not os.path.isfile(src):
        raise ExportError(f"{src} does not exist: export the model with cm.export_onnx(path) first")
    dst = os.path.abspath(os.fspath(ort_path)) if ort_path is not None else os.path.splitext(src)[0] + ".ort"
    folder = os.path.dirname(dst)
    os.makedirs(folder, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="." + os.path.basename(dst) + ".", suffix=".tmp", dir=folder)
    try:
        # the converter takes a file or a folder and converts every .onnx in it: give it a folder
        # holding only this model (and its external data), linked rather than copied where possible
        stage = os.path.join(scratch, "in")
        os.makedirs(stage)
        base = os.path.basename(src)
        if adapter_inputs:
            add_adapter_defaults(src, adapter_inputs, os.path.join(stage, base))
        else:
            for name in os.listdir(os.path.dirname(src)):
                if name == base or (name.startswith(base) and name.endswith(".data")):
                    _link_or_copy(os.path.join(os.path.dirname(src), name), os.path.join(stage, name))
        out = os.path.join(scratch, "out")
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter):
                convert_onnx_models_to_ort(_path(os.path.join(stage, base)), output_dir=_path(out),
                                           optimization_styles=[OptimizationStyle.Fixed])
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxruntime could not convert {src} to ORT format: {type(e).__name__}: {e}") from e
        made = [os.path.join(root, f) for root, _, files in os.walk(out) for f in files if f.endswith(".ort")]
        if len(made) != 1:
            raise ExportError(f"onnxruntime's converter wrote {len(made)} .ort files for {src}: "
                              f"{chatter.getvalue()[-500:]}")
        with open(made[0], "rb") as f:
            os.fsync(f.fileno())
        os.replace(made[0], dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dst


def _path(p: str) -> Any:
    import pathlib

    return pathlib.Path(p)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_onnx_adapter(path: PathLike, tensors: Mapping[str, Any], *, adapter_version: int = 1,
                       model_version: int = 1) -> str:
    """Write ``tensors`` (name -> tensor / array) in onnxruntime's adapter format, atomically.
    Names must be the model's adapter input names (``ExportResult.adapter_inputs``)."""
    import onnxruntime as ort

    if not tensors:
        raise ExportError("no adapter tensors to write: pass cm.adapter_state_dict(name, include_constants=True)")
    path = os.path.abspath(os.fspath(path))
    params = {}
    for name, value in tensors.items():
        a = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        params[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(model_version)
    fmt.set_parameters(params)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    atomic_write(path, fmt.export_adapter)
    return path


def read_onnx_adapter(path: PathLike) -> dict[str, np.ndarray]:
    """The tensors of an ``.onnx_adapter`` file, by name."""
    import onnxruntime as ort

    try:
        fmt = ort.AdapterFormat.read_adapter(os.fspath(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{os.fspath(path)} is not a readable onnxruntime adapter file: {e}") from e
    return {k: v.numpy() for k, v in fmt.get_parameters().items()}


class OnnxAdapterSession:
    """An onnxruntime session over a model exported ``adapters_as_inputs=True`` (``.onnx`` or
    ``.ort``) that runs it with an ``.onnx_adapter`` active: feed the model's own inputs only.

    Args:
        path: the model file.
        threads: intra-op threads (0: onnxruntime's default).
    """

    def __init__(self, path: PathLike, threads: int = 0) -> None:
        import onnxruntime as ort

        self._ort = ort
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxruntime could not load {os.fspath(path)}: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._adapters: dict[str, Any] = {}

    def load_adapter(self, path: PathLike) -> Any:
        """An ``onnxruntime.LoraAdapter`` for ``path`` (cached by path)."""
        key = os.path.abspath(os.fspath(path))
        if key not in self._adapters:
            if not os.path.isfile(key):
                raise ExportError(f"{key} does not exist: write it with write_onnx_adapter(path, tensors)")
            adapter = self._ort.LoraAdapter()
            try:
                adapter.Load(key)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"onnxruntime could not load the adapter {key}: {e}") from e
            self._adapters[key] = adapter
        return self._adapters[key]

    def run(self, inputs: Sequence[Any], adapter: Optional[PathLike] = None) -> list[np.ndarray]:
        """Run with ``inputs`` fed to the model's first inputs and ``adapter``'s tensors active."""
        if len(inputs) > len(self.input_names):
            raise ExportError(f"the model takes {len(self.input_names)} inputs, got {len(inputs)}")
        feed = {name: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
                for name, x in zip(self.input_names, inputs)}
        options = self._ort.RunOptions()
        if adapter is not None:
            options.add_active_adapter(self.load_adapter(adapter))
        try:
            return self.session.run(self.output_names, feed, options)
        except Exception as e:  # noqa: BLE001
            missing = self.input_names[len(inputs):]
            hint = (f"; the adapter must provide {missing[:4]}{'...' if len(missing) > 4 else ''}"
                    if missing else "")
            raise ExportError(f"onnxruntime could not run the model: {e}{hint}") from e

    __call__ = run


__all__ = ["OnnxAdapterSession", "add_adapter_defaults", "read_onnx_adapter", "to_ort", "write_onnx_adapter"]
