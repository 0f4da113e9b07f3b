"""Train with an exported training step in plain onnxruntime (no training package).

    trainer = OnnxTrainer("train.onnx")
    for batch in data:
        loss = trainer.step(*batch)
    trainer.save_checkpoint("ckpt.safetensors")          # atomic; resume with load_checkpoint
    cm.load_adapter_state_dict(trainer.adapter_state_dict())

With the torch model still alive (a script that compiled and exported the step), let the
session read the frozen weights from the model's memory instead of a copy of its own:

    trainer = OnnxTrainer("train.onnx", initializers=step.onnx_initializers())

The trainer keeps the trainable tensors and the optimizer state between steps as onnxruntime
values. With IO binding (the default) the step's inputs are bound to the current values and
its outputs to a second set of preallocated buffers, which then become current: no copies
of parameters or state through Python between steps.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from graphpeft.errors import ExportError, GraphPeftError, NonFiniteError
from graphpeft.training import TrainerCheckpoints, TrainingSignature

from .runner import disabled_optimizers as default_disabled
from .session_cache import open_session
from .train_export import read_signature

log = logging.getLogger(__name__)


#: ``OnnxTrainer(cache_optimized=None)`` keeps onnxruntime's optimized model only for files with at
#: most this many bytes of external data (the optimized model is another copy of the weights)
CACHE_MAX_EXTERNAL_BYTES = 1 << 30


def _external_bytes(proto: Any) -> int:
    """Bytes of the initializers an ``onnx.ModelProto`` (loaded without them) keeps in data files."""
    from onnx import TensorProto

    total = 0
    for init in proto.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            total += sum(int(kv.value) for kv in init.external_data if kv.key == "length")
    return total


def _numpy(x: Any) -> np.ndarray:
    """A C-contiguous numpy array of ``x`` (0-d stays 0-d, unlike ``np.ascontiguousarray``); a
    bfloat16 tensor becomes an ``ml_dtypes.bfloat16`` array (what ``onnx`` uses; numpy has none)."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.detach().cpu().contiguous().view(torch.uint16).numpy().view(ml_dtypes.bfloat16).copy()
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return a if a.flags.c_contiguous else a.copy()


def _ortvalue(ort: Any, a: np.ndarray) -> Any:
    """An onnxruntime value holding a copy of ``a``. ``OrtValue.ortvalue_from_numpy`` rejects
    bfloat16 (``ml_dtypes``) arrays: those are allocated by onnxruntime and filled bytewise."""
    if a.dtype.name != "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy(np.array(a, copy=True))
    import ctypes

    from onnx import TensorProto

    a = np.ascontiguousarray(a)
    value = ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), TensorProto.BFLOAT16, "cpu", 0)
    ctypes.memmove(value.data_ptr(), a.ctypes.data, a.nbytes)
    return value


def _shared_initializers(ort: Any, proto: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """OrtValues viewing the memory of ``given`` (name -> CPU tensor or array), for each stored
    initializer of ``proto`` with that name, dtype and shape; the graph's inputs' defaults
    (trainable tensors, state) are not taken. A tensor numpy cannot view (bfloat16, not
    contiguous, not on the CPU) is skipped: the session reads the file's copy of it."""
    from onnx.helper import tensor_dtype_to_np_dtype

    inputs = {i.name for i in proto.graph.input}
    out: dict[str, Any] = {}
    for init in proto.graph.initializer:
        if init.name in inputs or init.name not in given:
            continue
        x = given[init.name]
        if isinstance(x, torch.Tensor):
            if x.device.type != "cpu" or not x.is_contiguous() or x.dtype == torch.bfloat16:
                log.debug("initializer %s: the file's copy (the tensor is not viewable as numpy)", init.name)
                continue
            x = x.detach().numpy()  # a view: no copy
        a = np.asarray(x)
        expected = (np.dtype(tensor_dtype_to_np_dtype(init.data_type)), list(init.dims))
        if (a.dtype, list(a.shape)) != expected:
            raise ExportError(f"initializers[{init.name!r}] is {a.dtype}{list(a.shape)}, the file stores "
                              f"{expected[0]}{expected[1]}: pass the tensors of the model the step was exported from")
        if a.flags.c_contiguous:
            out[init.name] = ort.OrtValue.ortvalue_from_numpy(a)  # wraps a's memory; keeps a alive
    return out


def _value_tensor(value: Any) -> torch.Tensor:
    """A torch copy of an onnxruntime value or a numpy array (bfloat16 ones included)."""
    from onnx import TensorProto

    if isinstance(value, np.ndarray):
        if value.dtype.name == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(value).view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(value.copy())
    if value.element_type() == TensorProto.BFLOAT16:
        import ctypes

        out = torch.empty(value.shape(), dtype=torch.bfloat16)
        ctypes.memmove(out.data_ptr(), value.data_ptr(), out.numel() * 2)
        return out
    return torch.from_numpy(value.numpy().copy())


class OnnxTrainer(TrainerCheckpoints):
    """Runs an exported training step (see ``TrainingStep.export_onnx``) in onnxruntime.

    Args:
        path: the ``.onnx`` file (external data, if any, beside it).
        providers: onnxruntime execution providers.
        threads: intra-op threads (0: onnxruntime's default).
        io_binding: keep parameters and state in onnxruntime buffers between steps.
        session_options: an ``onnxruntime.SessionOptions`` to start from.
        disabled_optimizers: onnxruntime graph optimizers to switch off (default:
            :func:`~graphpeft.backends.onnx.runner.disabled_optimizers`, which keeps onnxruntime
            from merging recomputed values and from folding packed quantized weights to float;
            ``()`` keeps all of them).
        session_path: run this file instead (the ``.ort`` conversion of ``path``, see
            :func:`~graphpeft.backends.onnx.to_ort`); the signature and the initial values are
            read from ``path``, which ORT-format files do not carry in a readable form.
        cache_optimized: keep onnxruntime's optimized graph beside ``path`` (``<path>.ortopt-<key>.onnx``)
            and load that on later runs, skipping graph optimization (see
            :mod:`graphpeft.backends.onnx.session_cache`). ``None`` (default): only when the file's
            external data is at most ``CACHE_MAX_EXTERNAL_BYTES`` (1 GiB): the optimized model
            holds every weight again, and writing that copy doubled a Qwen2-0.5B-shaped step's
            first load (15.6 vs 7.3 s; later loads 4.5 s).
        prepack_weights: let onnxruntime lay out each stored GEMM weight for its kernels when
            the session is created (its default). Most of a large step's load time, and a packed
            copy of the weights beside the file's: ``False`` loads a Qwen2-0.5B-shaped step about
            10x faster holding no weight copy, but each step repacks them (that step: 1.38x slower;
            a small Llama's: the same). For short runs and evaluation of big models.
        initializers: stored tensors (name -> CPU tensor or numpy array) the session reads in
            place of the file's copies, without copying them: usually
            ``step.onnx_initializers()``, the frozen weights of the live torch model. The trainer
            keeps them alive; do not change them while it lives (onnxruntime reads some directly,
            and its packed copies of others would not see the change). Names the file does not
            store as weights are ignored; a dtype or shape other than the file's raises
            :class:`~graphpeft.errors.ExportError`. Turns ``cache_optimized`` off. A
            Qwen2-0.5B-shaped step's peak RSS with the torch model alive: 2.44x the weight bytes,
            3.43x with the session's own copy.
        memory_pattern: onnxruntime's memory pattern (``SessionOptions.enable_mem_pattern``: from
            the second step on, all intermediate values in one block planned from the first).
            ``None`` (default): off when the file's external data exceeds
            ``CACHE_MAX_EXTERNAL_BYTES`` (a model whose weights dominate memory), else on. The
            block comes on top of what the first step left in onnxruntime's memory arena
            (Qwen2-0.5B-shaped step: +0.5 GiB at the second step; without the pattern, none; step
            time within noise).

    Attributes:
        signature: the training signature stored in the file.
        lr: the learning rate fed to the next step (change it for schedules).
        steps: how many steps this trainer has run (since creation or the last checkpoint load).
        skipped_steps: how many of them were skipped because the loss, a gradient or the lr was
            not finite (the step graph left the tensors and the optimizer state unchanged); a step
            compiled with ``nonfinite="raise"`` raises :class:`~graphpeft.errors.NonFiniteError`.
    """

    def __init__(self, path: Union[str, os.PathLike], *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int = 0, io_binding: bool = True, session_options: Any = None,
                 disabled_optimizers: Optional[Sequence[str]] = None,
                 session_path: Optional[Union[str, os.PathLike]] = None, cache_optimized: Optional[bool] = None,
                 prepack_weights: bool = True, initializers: Optional[Mapping[str, Any]] = None,
                 memory_pattern: Optional[bool] = None) -> None:
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ExportError(f"{self.path} does not exist: export a training step with step.export_onnx(path)")
        try:
            proto = onnx.load(self.path, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - onnx raises DecodeError and friends
            raise ExportError(f"{self.path} is not a readable ONNX file ({e}); export it again") from e
        self.signature: TrainingSignature = read_signature(proto)
        sig = self.signature
        base_dir = os.path.dirname(os.path.abspath(self.path))
        wanted = {s.name: s for s in sig.inputs if s.kind in ("param", "state", "lr")}
        initial: dict[str, np.ndarray] = {}
        for init in proto.graph.initializer:
            if init.name in wanted:
                initial[init.name] = numpy_helper.to_array(init, base_dir=base_dir)
        missing = sorted(set(wanted) - set(initial))
        if missing:
            raise ExportError(f"{self.path} lacks the initial values of {missing[:5]}: export it again")
        skip = list(disabled_optimizers) if disabled_optimizers is not None else default_disabled(proto, training=True)
        small = _external_bytes(proto) <= CACHE_MAX_EXTERNAL_BYTES
        if cache_optimized is None:
            cache_optimized = small
        #: the OrtValues the session reads in place of the file's weights (kept alive with it)
        self.shared_initializers = _shared_initializers(ort, proto, initializers) if initializers else {}
        del proto
        opts = session_options if session_options is not None else ort.SessionOptions()
        if session_options is None:
            # the trainable tensors and state are inputs with stored defaults; onnxruntime warns
            # about each such input at load time, which is expected here
            opts.log_severity_level = 3
            # idle worker threads spin by default and take the CPU from torch running beside
            # them in the same process (measured: the next eager step ran ~1.5x slower)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        if not prepack_weights:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if not (small if memory_pattern is None else memory_pattern):
            opts.enable_mem_pattern = False
        for name, value in self.shared_initializers.items():
            opts.add_initializer(name, value)
        run_path = os.fspath(session_path) if session_path is not None else self.path
        try:
            self.session = open_session(run_path, opts, providers=providers, disabled_optimizers=skip,
                                        cache=cache_optimized and session_path is None
                                        and not self.shared_initializers)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxruntime could not load {run_path}: {e}") from e
        self._ort = ort
        self.io_binding = io_binding
        self.lr = float(initial[sig.inputs[[s.kind for s in sig.inputs].index("lr")].name])
        self.steps = 0
        self.skipped_steps = 0
        self._param_specs = [s for s in sig.inputs if s.kind == "param"]
        self._state_specs = [s for s in sig.inputs if s.kind == "state"]
        self._batch_specs = [s for s in sig.inputs if s.kind == "batch"]
        self._out_name = {("param", s.key): s.name for s in sig.outputs if s.kind == "param"}
        self._out_name.update({("state", s.key): s.name for s in sig.outputs if s.kind == "state"})
        # current values, keyed by input name
        self._values: dict[str, Any] = {}
        self._spare: dict[str, Any] = {}
        self._set_values({s.name: initial[s.name] for s in self._param_specs + self._state_specs})

    # -- values ----------------------------------------------------------------------------------

    def _set_values(self, arrays: Mapping[str, np.ndarray]) -> None:
        if self.io_binding:
            self._values = {k: _ortvalue(self._ort, v) for k, v in arrays.items()}
            self._spare = {k: _ortvalue(self._ort, np.zeros_like(v)) for k, v in arrays.items()}
        else:
            self._values = {k: np.array(v, copy=True) for k, v in arrays.items()}

    def _array(self, input_name: str) -> np.ndarray:
        v = self._values[input_name]
        return v.numpy() if self.io_binding else v

    # -- stepping --------------------------------------------------------------------------------

    def step(self, *batch: Any) -> float:
        """Run one training step on ``batch`` (model inputs, then targets); returns the loss."""
        specs = self._batch_specs
        if len(batch) != len(specs):
            raise ExportError(f"the training step takes {len(specs)} batch tensors "
                              f"({self.signature.num_model_inputs} model inputs, {self.signature.num_targets} "
                              f"targets), got {len(batch)}")
        arrays = []
        for spec, x in zip(specs, batch):
            a = _numpy(x)
            if list(a.shape) != spec.shape or str(a.dtype) != spec.dtype:
                raise ExportError(f"{spec.name} must be {spec.dtype}{spec.shape} (the shapes it was exported for), "
                                  f"got {a.dtype}{list(a.shape)}; export the step for this batch shape")
            arrays.append(a)
        lr = np.array(self.lr, dtype=np.float32)
        if self.io_binding:
            loss, skipped = self._step_bound(arrays, lr)
        else:
            loss, skipped = self._step_plain(arrays, lr)
        self.steps += 1
        if skipped:
            self.skipped_steps += 1
            if self.signature.nonfinite == "raise":
                raise NonFiniteError(f"non-finite training step (loss {loss}, lr {self.lr}): the trainable tensors "
                                     "and the optimizer state were left unchanged; lower the learning rate, check "
                                     "the batch, or export a step compiled with nonfinite='skip'")
        return loss

    __call__ = step

    def _step_bound(self, arrays: list[np.ndarray], lr: np.ndarray) -> tuple[float, bool]:
        io = self.session.io_binding()
        for spec in self.signature.inputs:
            if spec.kind in ("param", "state"):
                io.bind_ortvalue_input(spec.name, self._values[spec.name])
            elif spec.kind == "lr":
                io.bind_ortvalue_input(spec.name, self._ort.OrtValue.ortvalue_from_numpy(lr))
        for spec, a in zip(self._batch_specs, arrays):
            io.bind_ortvalue_input(spec.name, self._ort.OrtValue.ortvalue_from_numpy(a))
        outs = self.signature.outputs
        for spec in outs:
            if spec.kind in ("loss", "skipped"):
                io.bind_output(spec.name, "cpu")
            else:
                in_name = self._input_name(spec.kind, spec.key)
                io.bind_ortvalue_output(spec.name, self._spare[in_name])
        self.session.run_with_iobinding(io)
        results = io.get_outputs()
        loss = float(results[0].numpy())
        skipped = outs[-1].kind == "skipped" and bool(results[len(outs) - 1].numpy())
        self._values, self._spare = self._spare, self._values
        return loss, skipped

    def _step_plain(self, arrays: list[np.ndarray], lr: np.ndarray) -> tuple[float, bool]:
        feed: dict[str, np.ndarray] = dict(self._values)
        feed["lr"] = lr
        for spec, a in zip(self._batch_specs, arrays):
            feed[spec.name] = a
        names = [s.name for s in self.signature.outputs]
        results = dict(zip(names, self.session.run(names, feed)))
        for spec in self.signature.outputs:
            if spec.kind in ("param", "state"):
                self._values[self._input_name(spec.kind, spec.key)] = results[spec.name]
        last = self.signature.outputs[-1]
        return float(results[names[0]]), last.kind == "skipped" and bool(results[last.name])

    def _input_name(self, kind: str, key: str) -> str:
        prefix = "param/" if kind == "param" else "state/"
        return prefix + key

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"params": {name: tensor}, "optimizer": {key: tensor}, "lr": float}`` (copies), the
        same structure as ``TrainingStep.state_dict()``."""
        return {
            "params": {s.key: _value_tensor(self._values[s.name]) for s in self._param_specs},
            "optimizer": {s.key: _value_tensor(self._values[s.name]) for s in self._state_specs},
            "lr": self.lr,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (from this trainer or a ``TrainingStep``); checks every key
        and shape first, so on error nothing changes."""
        params, opt = state.get("params", {}), state.get("optimizer", {})
        arrays: dict[str, np.ndarray] = {}
        problems = []
        for specs, source in ((self._param_specs, params), (self._state_specs, opt)):
            for s in specs:
                if s.key not in source:
                    problems.append(f"missing {s.key}")
                    continue
                a = _numpy(source[s.key])
                if list(a.shape) != s.shape:
                    problems.append(f"{s.key} has shape {list(a.shape)}, the step needs {s.shape}")
                    continue
                arrays[s.name] = a.astype(s.dtype, copy=False)
        if problems:
            raise GraphPeftError("state does not fit this training step (nothing was loaded): "
                                 + "; ".join(problems[:10]))
        self._set_values(arrays)
        if "lr" in state:
            self.lr = float(state["lr"])

    def __repr__(self) -> str:
        return (f"OnnxTrainer({self.path!r}, {len(self._param_specs)} trainable tensors, "
                f"optimizer={self.signature.optimizer.get('name')}, lr={self.lr:g}, steps={self.steps})")


__all__ = ["OnnxTrainer"]

