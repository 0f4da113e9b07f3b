"""onnxruntime sessions that reuse their optimized graph: the first load saves onnxruntime's
optimized model beside the file (``SessionOptions.optimized_model_filepath``), later loads run
that file with graph optimizations off.

A training step's load is mostly onnxruntime's graph optimizer (fusing ``Transpose`` into
``FusedMatMul``, ``MatMul`` + ``Add`` into ``Gemm``, constant folding over the frozen weights);
its result depends only on the model file, the onnxruntime version, the providers, the
optimization level, the disabled optimizers and the CPU (level "all" lays out data for the CPU
it runs on), so all of these go into the cache file's name:
``<model>.ortopt-<key>.onnx`` (tensors in ``<that>.bin``). A stale or unreadable cache is
replaced; a read-only folder means no cache, with a log line.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import platform
from typing import Any, Optional, Sequence

from graphpeft.paths import atomic_write

log = logging.getLogger(__name__)

SUFFIX = ".ortopt-"


def _cpu_fingerprint() -> str:
    """The CPU's model name and feature flags (what a level-"all" optimized graph may depend on)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "|" + "|".join(lines)


def cache_path(path: str, options: Any, providers: Sequence[str], disabled_optimizers: Sequence[str] = ()) -> str:
    """Where the optimized form of ``path`` under these settings is kept."""
    import onnxruntime as ort

    st = os.stat(path)
    key = json.dumps([ort.__version__, list(providers), int(options.graph_optimization_level),
                      sorted(disabled_optimizers), st.st_size, st.st_mtime_ns, _cpu_fingerprint()])
    return f"{path}{SUFFIX}{hashlib.sha1(key.encode()).hexdigest()[:16]}.onnx"


def _remove(paths: Sequence[str]) -> None:
    for p in paths:
        for f in (p, p + ".bin"):
            try:
                os.unlink(f)
            except OSError:
                pass


def open_session(path: str, options: Any, *, providers: Sequence[str], cache: bool = True,
                 disabled_optimizers: Optional[Sequence[str]] = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``path``; with ``cache``, through the saved
    optimized model (made on the first call). ``options`` is left as it was given."""
    import onnxruntime as ort

    disabled = list(disabled_optimizers or ())

    def session(p: str) -> Any:
        return ort.InferenceSession(p, options, providers=list(providers), disabled_optimizers=disabled)

    if not cache or options.optimized_model_filepath:
        return session(path)
    cached = cache_path(path, options, providers, disabled)
    level = options.graph_optimization_level
    if os.path.isfile(cached):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return session(cached)
        except Exception as e:  # noqa: BLE001 - a damaged cache file: make it again
            log.info("the optimized model %s did not load (%s); optimizing %s again", cached, e, path)
            _remove([cached])
        finally:
            options.graph_optimization_level = level
    made: list[Any] = []

    def optimize_into(tmp: str) -> None:
        options.optimized_model_filepath = tmp
        # tensors to a data file named after the final path (the model refers to it by name)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         os.path.basename(cached) + ".bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            made.append(session(path))
        finally:
            options.optimized_model_filepath = ""

    try:
        atomic_write(cached, optimize_into)
    except OSError as e:
        log.info("could not keep onnxruntime's optimized model beside %s (%s); loading without a cache", path, e)
        return made[0] if made else session(path)
    _remove([p for p in glob.glob(glob.escape(path) + SUFFIX + "*.onnx") if p != cached])
    log.info("saved onnxruntime's optimized model to %s (the next load skips graph optimization)", cached)
    return made[0]


__all__ = ["cache_path", "open_session"]
