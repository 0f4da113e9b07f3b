"""Export a compiled training step to ExecuTorch: one method (``forward``) of a ``.pte`` runs
forward, pruned backward and the optimizer update (SGD, AdamW, an adapter method's own step
such as SoRA's proximal L1 step), as traced by the training-step compiler.

The method takes the flat inputs of the training graph (trainable tensors, optimizer state,
``lr``, batch) and returns ``loss``, the updated trainable tensors and the updated state, in
the order of the training signature; frozen weights are constants of the program (or of its
``.ptd`` data file with ``external_data=True``). The program also holds two constant methods:
``graphpeft`` (the training signature as JSON) and ``graphpeft_initial`` (the trainable tensors,
state and ``lr`` at export time), so the one file is all
:class:`~graphpeft.backends.executorch.ExecuTorchTrainer` needs.

ExecuTorch's own training export (``_export_forward_backward``) leaves the optimizer out; here
the optimizer is part of the traced graph, so nothing runs outside the program but the swap of
the returned tensors into the next call's inputs.

The graph is wrapped as an ``ExportedProgram`` directly (no re-trace: it is functional core
ATen with static shapes already), legalized on a copy (``legalize_executorch``) and lowered
with :func:`~graphpeft.backends.executorch.export.lower` (XNNPACK, portable fallback).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from graphpeft.errors import ExportError
from graphpeft.training import signature_of, verify_training

from .export import FORMAT, check_delegate, FORMAT_VERSION, META_METHOD, legalized_copy, lower, require_executorch

if TYPE_CHECKING:
    from graphpeft.training import TrainingStep

log = logging.getLogger(__name__)

INITIAL_METHOD = "graphpeft_initial"


@dataclasses.dataclass
class ExecuTorchTrainingExportResult:
    """Where the training step went, its interface, how it was lowered and where the time went."""

    path: str
    data_path: Optional[str]
    input_names: list[str]
    output_names: list[str]
    delegate: str
    delegated_ops: int
    portable_ops: int
    num_nodes: int
    bytes: int
    data_bytes: int
    seconds: float
    timings: dict[str, float]
    legalized: dict[str, int]
    fallback_reason: str = ""


def export_training(step: "TrainingStep", path: Union[str, os.PathLike], *, delegate: str = "xnnpack",
                    external_data: bool = False, verify: bool = True,
                    batch: Optional[Sequence[torch.Tensor]] = None) -> ExecuTorchTrainingExportResult:
    """Export ``step`` (its graph for the first compiled batch shape, or for ``batch``'s) to an
    ExecuTorch program at ``path``.

    Args:
        delegate: ``"xnnpack"`` (default; portable kernels where it declines, and for everything
            if its lowering fails) or ``"portable"``.
        external_data: frozen weights go to ``<stem>.ptd`` beside the program.
        verify: run the training verifier around the legalization pass.
        batch: a batch whose shapes select which compiled graph to export.
    """
    from graphpeft.backends.onnx.train_export import _example_batch, _flat_inputs_for, exported_program

    require_executorch()
    check_delegate(delegate)
    path = os.fspath(path)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    src = step.graph_for(*batch) if batch is not None else step.graph_module
    sig = signature_of(src)
    gm, legalized = legalized_copy(src, training=True, verifier=verify_training, verify=verify)
    timings["legalize"] = time.perf_counter() - start
    example_batch = list(batch) if batch is not None else _example_batch(sig)
    inputs = step.flat_inputs(*example_batch) if batch is not None else _flat_inputs_for(step, sig, example_batch)
    t = time.perf_counter()
    try:
        ep = exported_program(gm)
    except Exception as e:
        raise ExportError(f"could not wrap the training graph as an ExportedProgram: {type(e).__name__}: {e}") from e
    timings["capture"] = time.perf_counter() - t
    meta = sig.to_dict()
    meta["format"], meta["format_version"], meta["kind"] = FORMAT, FORMAT_VERSION, "training"
    initial = [x.detach().clone().contiguous() for x, s in zip(inputs, sig.inputs) if s.kind in ("param", "state", "lr")]
    constant_methods = {META_METHOD: json.dumps(meta), INITIAL_METHOD: initial}
    used, delegated, portable, reason, data_path, data_bytes = lower(
        ep, path, delegate=delegate, external_data=external_data, constant_methods=constant_methods, timings=timings)
    seconds = time.perf_counter() - start
    log.info("exported training step %s (%s: %d delegated ops, %d portable) in %.1f s (%s)", path, used, delegated,
             portable, seconds, ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return ExecuTorchTrainingExportResult(path, data_path, [s.name for s in sig.inputs], [s.name for s in sig.outputs],
                                          used, delegated, portable, len(gm.graph.nodes), os.path.getsize(path),
                                          data_bytes, seconds, timings, legalized, reason)


__all__ = ["ExecuTorchTrainingExportResult", "INITIAL_METHOD", "export_training"]
