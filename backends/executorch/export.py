"""Lower a compiled model's graph to an ExecuTorch program (``.pte``, atomically written).

    cm.export_executorch("model.pte")                      # merged, XNNPACK delegate
    cm.export_executorch("lora.pte", merged=False)         # adapter branch kept
    cm.export_executorch("base.pte", merged=False, adapters_as_inputs=True, external_data=True)
    #   -> base.pte (program) + base.ptd (base weights); adapter tensors are fed as inputs

The graph is legalized on a copy (``legalize_executorch``), captured with ``torch.export`` for
the example inputs' shapes (an ExecuTorch program has static shapes and a static memory plan),
and lowered with ``to_edge_transform_and_lower``: with ``delegate="xnnpack"`` (default) the
XNNPACK partitioner takes what it supports and the rest runs on the portable kernels; if the
XNNPACK lowering fails the program is lowered to the portable kernels alone (``fallback``).
The file also holds a ``graphpeft`` method returning a JSON description (input and output
names, adapter inputs) that :class:`~graphpeft.backends.executorch.ExecuTorchRunner` reads.

With ``external_data`` the weights go to a data file ``<stem>.ptd`` beside the program
(ExecuTorch's program-data separation): portable-kernel constants through
``ExecutorchBackendConfig(external_constants=...)``, XNNPACK's through its
``delegate_constant_tag``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.fx as fx

from graphpeft.errors import ExportError
from graphpeft.paths import atomic_write
from graphpeft.infra import PassContext, PassManager, Pipeline, copy_graph
from graphpeft.registry import PASSES

if TYPE_CHECKING:
    from graphpeft.compiled import CompiledModel

log = logging.getLogger(__name__)

DELEGATES = ("xnnpack", "portable")
META_METHOD = "graphpeft"
FORMAT = "graphpeft-executorch"
FORMAT_VERSION = 1
#: the tag ExecuTorch names the data file after (``<tag>.ptd``); renamed to ``<stem>.ptd``
DATA_TAG = "graphpeft_weights"


def require_executorch() -> None:
    try:
        import executorch.exir  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        raise ExportError("ExecuTorch is not installed (or does not import): pip install 'graphpeft[executorch]' "
                          f"(executorch==1.5.1 beside torch 2.13) ({type(e).__name__}: {e})") from e


def check_delegate(delegate: str) -> None:
    if delegate not in DELEGATES:
        raise ExportError(f"unknown delegate {delegate!r}; choose one of {DELEGATES}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence ExecuTorch's and torch.export's warnings and info chatter during lowering."""
    names = ["executorch", "torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclasses.dataclass
class ExecuTorchExportResult:
    """Where the program went, what it takes and returns, and how it was lowered."""

    path: str
    #: the ``.ptd`` weights file beside the program (``external_data=True``), else None
    data_path: Optional[str]
    input_names: list[str]
    output_names: list[str]
    #: "xnnpack" (some ops delegated) or "portable" (asked for, or the XNNPACK lowering failed)
    delegate: str
    #: how many ops the XNNPACK delegate took (0 for portable)
    delegated_ops: int
    #: ops left to ExecuTorch's portable kernels
    portable_ops: int
    bytes: int
    data_bytes: int
    seconds: float
    #: seconds per phase: legalize, capture, to_edge (incl. delegation), to_executorch, save
    timings: dict[str, float]
    legalized: dict[str, int]
    #: with ``adapters_as_inputs``: the inputs fed with adapter tensors (PEFT names), in order
    adapter_inputs: list[str] = dataclasses.field(default_factory=list)
    #: why the XNNPACK lowering failed, when it fell back to portable
    fallback_reason: str = ""


def legalized_copy(gm: fx.GraphModule, *, training: bool, verifier: Optional[Callable[[fx.GraphModule], None]] = None,
                   verify: bool = True) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of the graph (tensors shared) run through ``legalize_executorch`` and dead-code
    removal, checked by ``verifier``."""
    new = copy_graph(gm)  # own node meta dicts: the pass edits them
    ctx = PassContext(verify=verify)
    pipeline = Pipeline("legalize_executorch", [PASSES["decompose_attention"](),  # the fused CPU attention as math
                                                PASSES["legalize_executorch"](training=training),
                                                PASSES["remove_dead_code"]()])
    result = PassManager(verifier=verifier).run(new, pipeline, ctx)
    return result.gm, dict(ctx.options.get("legalize_executorch", {}))


def _tag_weights(ep: Any) -> None:
    """Tag every lifted weight for the external data file (portable kernels read the tag
    through ``external_constants``; XNNPACK through ``custom["delegate_constant_tag"]``)."""
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in _constant_inputs(ep):
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG


def _constant_inputs(ep: Any) -> set[str]:
    sig = ep.graph_signature
    return set(sig.inputs_to_parameters) | set(sig.inputs_to_buffers) | set(sig.inputs_to_lifted_tensor_constants)


def lower(ep: Any, path: str, *, delegate: str = "xnnpack", external_data: bool = False,
          constant_methods: Optional[dict[str, Any]] = None, timings: Optional[dict[str, float]] = None
          ) -> tuple[str, int, int, str, Optional[str], int]:
    """``ExportedProgram`` -> ``.pte`` at ``path`` (atomic). Returns (delegate used, delegated
    ops, portable ops, fallback reason, data path, data bytes)."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    check_delegate(delegate)
    timings = timings if timings is not None else {}
    if external_data:
        _tag_weights(ep)
    reason = ""
    used = delegate
    t = time.perf_counter()
    edge = None
    # the graphs are core ATen already; the IR validity check re-verifies every node (seconds)
    config = EdgeCompileConfig(_check_ir_validity=False)
    if delegate == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        try:
            with quiet():
                edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], compile_config=config,
                                                   constant_methods=constant_methods)
        except Exception as e:  # noqa: BLE001 - any delegate failure: portable kernels run everything
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log.warning("the XNNPACK lowering failed (%s); lowering to ExecuTorch's portable kernels", reason)
            used = "portable"
    if edge is None:
        try:
            with quiet():
                edge = to_edge_transform_and_lower(ep, compile_config=config, constant_methods=constant_methods)
        except Exception as e:
            raise ExportError(f"ExecuTorch's to_edge rejected the graph: {type(e).__name__}: {str(e)[:1500]}. If an op "
                              "is not supported, add a rewrite for it to the legalize_executorch pass") from e
    timings["to_edge"] = time.perf_counter() - t
    delegated, portable = _count_ops(edge)
    t = time.perf_counter()
    backend_config = ExecutorchBackendConfig(external_constants=(lambda node: DATA_TAG) if external_data else False)
    try:
        with quiet():
            program = edge.to_executorch(backend_config)
    except Exception as e:
        raise ExportError(f"ExecuTorch could not emit the program: {type(e).__name__}: {str(e)[:1500]}") from e
    timings["to_executorch"] = time.perf_counter() - t
    t = time.perf_counter()
    data_path, data_bytes = _atomic_save(program, path, external_data)
    timings["save"] = time.perf_counter() - t
    return used, delegated, portable, reason, data_path, data_bytes


def _count_ops(edge: Any) -> tuple[int, int]:
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    gm = edge.exported_program().graph_module
    delegated = portable = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "executorch_call_delegate" in str(node.target):
            lowered = getattr(gm, node.args[0].target)
            if isinstance(lowered, LoweredBackendModule):
                delegated += sum(1 for n in lowered.original_module.graph.nodes if n.op == "call_function")
        elif "getitem" not in str(node.target):
            portable += 1
    return delegated, portable


def _atomic_save(program: Any, path: str, external_data: bool) -> tuple[Optional[str], int]:
    """Write the program (and its ``.ptd``, named ``<stem>.ptd``) atomically: temporary files,
    fsync, rename (data file first, so a program never points at a missing data file)."""
    import shutil

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    data_path: Optional[str] = None
    data_bytes = 0
    if external_data:
        scratch = tempfile.mkdtemp(prefix="." + base + ".", suffix=".data.tmp", dir=folder)
        try:
            program.write_tensor_data_to_file(scratch)
            written = sorted(os.listdir(scratch))
            if written != [f"{DATA_TAG}.ptd"]:
                raise ExportError(f"ExecuTorch wrote data files {written}, expected one {DATA_TAG}.ptd; export "
                                  "without external_data")
            src = os.path.join(scratch, written[0])
            with open(src, "rb") as f:
                os.fsync(f.fileno())
            data_path = os.path.join(folder, os.path.splitext(base)[0] + ".ptd")
            data_bytes = os.path.getsize(src)
            os.replace(src, data_path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            program.write_to_file(f)

    atomic_write(path, write)
    return data_path, data_bytes


def export(cm: "CompiledModel", path: Union[str, os.PathLike], *, delegate: str = "xnnpack",
           example_inputs: Optional[Sequence[torch.Tensor]] = None, adapters_as_inputs: bool = False,
           external_data: bool = False) -> ExecuTorchExportResult:
    """Export ``cm`` (its graph as it is: merged or not) to an ExecuTorch program at ``path``.

    Args:
        delegate: ``"xnnpack"`` (default; falls back to portable kernels if that lowering
            fails) or ``"portable"``.
        example_inputs: flat inputs whose shapes the program is made for (default: the ones
            the model was compiled with). ExecuTorch programs have static shapes.
        adapters_as_inputs: every adapter tensor becomes an input after the model's inputs
            (``result.adapter_inputs``, PEFT names): one program runs any adapter of the shapes.
            The adapter's matmuls then run on the portable kernels where XNNPACK declines a
            non-constant weight.
        external_data: weights go to ``<stem>.ptd`` beside the program.
    """
    from graphpeft.verify import verify

    require_executorch()
    check_delegate(delegate)
    path = os.fspath(path)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    inputs = tuple(example_inputs) if example_inputs is not None else tuple(cm.example_inputs)
    if not inputs:
        raise ExportError("no example inputs: compile the model with example_inputs first")
    gm = cm.graph_module
    input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    was_training = cm.training
    cm.eval()
    adapter_inputs: list[str] = []
    try:
        if adapters_as_inputs:
            from graphpeft.backends.onnx.export import _lift_adapters

            gm, adapter_inputs, values = _lift_adapters(cm)
            inputs, input_names = inputs + tuple(values), input_names + adapter_inputs
        legal, legalized = legalized_copy(gm, training=False, verifier=verify)
        timings["legalize"] = time.perf_counter() - start
        t = time.perf_counter()
        try:
            with quiet():
                ep = torch.export.export(legal, inputs, strict=False)
                PASSES["legalize_executorch"](rules=["linear_2d"])(ep.graph_module, PassContext(verify=False))
                # to core ATen in one re-trace (to_edge decomposes in two; with the fused attention
                # decomposed only in the second, GPT-2's and ViT's views see other strides)
                ep = ep.run_decompositions()
        except Exception as e:
            raise ExportError(f"torch.export could not capture the graph for ExecuTorch: {type(e).__name__}: "
                              f"{str(e)[:1500]}") from e
        timings["capture"] = time.perf_counter() - t
    finally:
        cm.train(was_training)
    n_out = len(ep.graph_signature.user_outputs)
    from graphpeft.backends.onnx.export import _output_names

    output_names = _output_names(cm, n_out)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "inference", "inputs": input_names,
            "outputs": output_names, "adapter_inputs": adapter_inputs,
            "input_shapes": [list(x.shape) for x in inputs], "input_dtypes": [str(x.dtype).replace("torch.", "")
                                                                             for x in inputs]}
    used, delegated, portable, reason, data_path, data_bytes = lower(
        ep, path, delegate=delegate, external_data=external_data, constant_methods={META_METHOD: json.dumps(meta)},
        timings=timings)
    seconds = time.perf_counter() - start
    log.info("exported %s (%s: %d delegated ops, %d portable) in %.1f s", path, used, delegated, portable, seconds)
    return ExecuTorchExportResult(path, data_path, input_names, output_names, used, delegated, portable,
                                  os.path.getsize(path), data_bytes, seconds, timings, legalized, adapter_inputs,
                                  reason)


__all__ = ["ExecuTorchExportResult", "export", "legalized_copy", "lower"]
