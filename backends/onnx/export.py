"""Lower a compiled model's graph to an ONNX file (atomically written)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch

from graphpeft.errors import ExportError

if TYPE_CHECKING:
    from graphpeft.compiled import CompiledModel

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence torch.onnx's registry chatter ("torchvision is not installed ...") during export."""
    names = ["torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core",
             "onnxscript.optimizer", "onnx_ir.passes"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclasses.dataclass
class ExportResult:
    """Where the model went and what its graph looks like."""

    path: str
    input_names: list[str]
    output_names: list[str]
    num_nodes: int
    bytes: int
    seconds: float


def _output_names(cm: "CompiledModel", n: int) -> list[str]:
    spec = cm._traced.out_spec
    try:
        from torch.utils import _pytree as pytree

        leaves = pytree.tree_unflatten(list(range(n)), spec)
        paths = pytree.tree_flatten_with_path(leaves)[0]
        names = ["_".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) or f"output_{i}"
                 for i, (path, _) in enumerate(paths)]
        if len(set(names)) == n:
            return names
    except Exception:  # noqa: BLE001 - names are cosmetic
        pass
    return [f"output_{i}" for i in range(n)]


def export(cm: "CompiledModel", path: Union[str, os.PathLike], *, dynamic: bool = True,
           external_data: Optional[bool] = None, opset_version: Optional[int] = None,
           example_inputs: Optional[Sequence[torch.Tensor]] = None) -> ExportResult:
    """Export ``cm`` (its graph as it is: merged or not) to ``path``.

    Frozen weights become initializers; adapter tensors stay initializers too (inference).
    ``dynamic`` keeps every input dimension symbolic; ``external_data`` stores weights beside
    the file (default: only above 1.5 GB).
    """
    import onnx

    path = os.fspath(path)
    gm = cm.graph_module
    inputs = tuple(example_inputs) if example_inputs is not None else cm.example_inputs
    if not inputs:
        raise ExportError("no example inputs: compile the model with example_inputs first")
    input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    n_out = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    output_names = _output_names(cm, n_out)
    dyn = None
    if dynamic:
        from torch.export import Dim

        dyn = tuple({i: Dim.AUTO for i in range(x.dim())} for x in inputs)
    was_training = cm.training
    cm.eval()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm, inputs, dynamo=True, dynamic_shapes=dyn,
                                        input_names=input_names, output_names=output_names,
                                        opset_version=opset_version, verbose=False, optimize=True)
    except Exception as e:
        raise ExportError(f"torch.onnx could not export the graph: {type(e).__name__}: {str(e)[:2000]}") from e
    finally:
        cm.train(was_training)
    if program is None:
        raise ExportError("torch.onnx.export returned nothing")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    model_bytes = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    if external_data is None:
        external_data = model_bytes > 1_500_000_000
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        program.save(tmp, external_data=external_data)
        if external_data:
            # external data is named after the temporary file: rewrite it to the final name
            proto = onnx.load(tmp, load_external_data=True)
            os.unlink(tmp)
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(path) + ".data")
            for f in os.listdir(folder):
                if f.startswith(os.path.basename(tmp)) and f != os.path.basename(tmp):
                    os.unlink(os.path.join(folder, f))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    seconds = time.perf_counter() - start
    num_nodes = len(program.model.graph) if hasattr(program, "model") else -1
    log.info("exported %s: %d nodes in %.1f s", path, num_nodes, seconds)
    return ExportResult(path, input_names, output_names, num_nodes, os.path.getsize(path), seconds)
