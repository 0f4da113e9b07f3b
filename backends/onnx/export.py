"""Lower a compiled model's graph to an ONNX file (atomically written)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch

from graphpeft.errors import ExportError
from graphpeft.paths import atomic_write

if TYPE_CHECKING:
    from graphpeft.compiled import CompiledModel

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence torch.onnx's registry chatter ("torchvision is not installed ...") during export."""
    names = ["torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core",
             "onnxscript.optimizer", "onnx_ir.passes",
             "onnx_ir._convenience"]  # "attribute type is ambiguous" for index_put's empty lists
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
    #: with ``adapters_as_inputs``: the input names fed with adapter tensors, in order (PEFT
    #: file names, ``cm.adapter_state_dict(name, include_constants=True)`` keys), after the
    #: model's own inputs
    adapter_inputs: list[str] = dataclasses.field(default_factory=list)


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
           example_inputs: Optional[Sequence[torch.Tensor]] = None,
           adapters_as_inputs: bool = False, fast: bool = True, quantized_weights: str = "packed") -> ExportResult:
    """Export ``cm`` (its graph as it is: merged or not) to ``path``.

    Frozen weights become initializers; adapter tensors stay initializers too (inference),
    unless ``adapters_as_inputs``: then every adapter tensor (constants included) is a graph
    input after the model's inputs (named in ``ExportResult.adapter_inputs``), so the one file
    runs any adapter of the same shapes. ``dynamic`` keeps every model input dimension
    symbolic; ``external_data`` stores weights beside the file (default: only above 1.5 GB).
    ``fast`` translates the graph directly (it is ATen already, with the traced shapes) instead
    of letting ``torch.onnx.export`` re-trace it; it falls back to that on failure, and when
    ``dynamic`` asks for other shapes than the graph was traced with.

    ``quantized_weights``: ``"packed"`` (default) stores ``gp.Quantize`` weights as the graph
    does (packed bytes dequantized by plain ops); ``"qdq"`` makes each int8 / int4 weight one
    standard ``DequantizeLinear`` with blocked quantization (opset 21; see :mod:`.qdq`);
    ``"matmulnbits"`` makes each int4 linear layer onnxruntime's ``com.microsoft.MatMulNBits``
    on the packed codes (the float weight is never made; other weights as with ``"qdq"``).

    The ONNX graph is optimized with the safe subset of onnxscript's optimizer (constant
    folding, unused-node removal, deduplication, CSE): its pattern rewrites treat constants
    within 1e-8 of zero as zero and would delete e.g. a normalization's small epsilon.
    """
    path = os.fspath(path)
    check_quantized_weights(quantized_weights, inference=True)
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
    adapter_inputs: list[str] = []
    if adapters_as_inputs:
        try:
            gm, adapter_inputs, values = _lift_adapters(cm)
        except BaseException:
            cm.train(was_training)
            raise
        inputs, input_names = inputs + tuple(values), input_names + adapter_inputs
        dyn = dyn + (None,) * len(values) if dyn is not None else None  # adapter shapes are fixed
    start = time.perf_counter()
    try:
        program = _translate_inference(gm, inputs, dyn, input_names, output_names, opset_version, dynamic, fast)
    finally:
        cm.train(was_training)
    if quantized_weights == "qdq":
        from .qdq import use_dequantize_linear

        use_dequantize_linear(program.model, cm.graph_module)
    elif quantized_weights == "matmulnbits":
        from .qdq import use_matmul_nbits

        use_matmul_nbits(program.model, cm.graph_module)
    if external_data is None:
        external_data = sum(t.numel() * t.element_size() for t in gm.state_dict().values()) > 1_500_000_000
    _save_inference(program, path, bool(external_data))
    seconds = time.perf_counter() - start
    num_nodes = len(program.model.graph) if hasattr(program, "model") else -1
    log.info("exported %s: %d nodes in %.1f s", path, num_nodes, seconds)
    return ExportResult(path, input_names, output_names, num_nodes, os.path.getsize(path), seconds, adapter_inputs)


def _translate_inference(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor], dyn: Any, input_names: list[str],
                         output_names: list[str], opset_version: Optional[int], dynamic: bool, fast: bool) -> Any:
    """The ONNX program of an inference graph: translated directly (fast), else ``torch.onnx.export``."""
    try:
        program = _translate_graph(gm, input_names, output_names, opset_version, dynamic) if fast else None
        if program is None:
            with warnings.catch_warnings(), quiet_exporter():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(gm, inputs, dynamo=True, dynamic_shapes=dyn,
                                            input_names=input_names, output_names=output_names,
                                            opset_version=opset_version, verbose=False, optimize=False)
                _strip_and_optimize(program.model)
    except Exception as e:
        raise ExportError(f"torch.onnx could not export the graph: {type(e).__name__}: {str(e)[:2000]}") from e
    if program is None:
        raise ExportError("torch.onnx.export returned nothing")
    return program


def _save_inference(program: Any, path: str, external_data: bool) -> None:
    """Write ``program`` to ``path`` atomically; external data goes to ``<file>.data`` beside it."""
    import onnx

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)

    def write(tmp: str) -> None:
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

    atomic_write(path, write)


def check_quantized_weights(value: str, inference: bool = False) -> None:
    """Raise ``ExportError`` unless ``value`` is a ``quantized_weights`` choice (``"matmulnbits"``
    only for ``inference`` graphs: a training step's backward reads the float weight itself)."""
    if value in ("packed", "qdq") or (inference and value == "matmulnbits"):
        return
    extra = ", or 'matmulnbits' (onnxruntime's MatMulNBits for int4 linear layers)" if inference else \
        ("; 'matmulnbits' is for inference export (cm.export_onnx): the backward needs the float weight"
         if value == "matmulnbits" else "")
    raise ExportError(f"quantized_weights={value!r}: use 'packed' (the graph's own storage) or 'qdq' "
                      f"(standard DequantizeLinear nodes, opset 21){extra}")


def _symbolic_inputs(gm: torch.fx.GraphModule) -> Optional[bool]:
    """Whether the graph's inputs carry symbolic sizes (None: no fake values to tell)."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if not vals or any(not isinstance(v, torch.Tensor) for v in vals):
        return None
    return any(not isinstance(d, int) for v in vals for d in v.shape)


def _strip_and_optimize(model: Any) -> None:
    from .train_export import _safe_optimize

    for node in model.graph.all_nodes():  # stack traces per node: most of the file otherwise
        node.metadata_props.clear()
    _safe_optimize(model)


def _lowered(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` after the forward lowering the training step gets too (LoRA scaling folded into
    ``B``, shared-input ``A`` factors as one MatMul): with the adapters as initializers,
    onnxruntime folds the scaled and concatenated weights once at load time."""
    from graphpeft.training.options import INFERENCE_FORWARD_LOWERING, TrainingOptions
    from graphpeft.training.trace_step import lower_forward

    return lower_forward(gm, TrainingOptions(lowering=INFERENCE_FORWARD_LOWERING))


def _translate_graph(gm: torch.fx.GraphModule, input_names: list[str], output_names: list[str],
                     opset_version: Optional[int], dynamic: bool) -> Any:
    """The graph translated without re-tracing it (legalized copy -> ExportedProgram -> ONNX),
    or None where that does not apply or fails (the caller then uses ``torch.onnx.export``)."""
    from graphpeft.verify import verify

    from .train_export import _translate_fast, exported_program, legalized_copy

    symbolic = _symbolic_inputs(gm)
    if symbolic is None or symbolic != dynamic:
        return None  # the traced shapes are not the ones asked for: torch.onnx.export re-traces
    try:
        legal, _ = legalized_copy(_lowered(gm), verifier=verify)
        with warnings.catch_warnings(), quiet_exporter():
            warnings.simplefilter("ignore")
            program = _translate_fast(exported_program(legal), input_names, output_names, opset_version)
        _strip_and_optimize(program.model)
        return program
    except Exception as e:  # noqa: BLE001 - private exporter API: fall back to the public one
        log.info("direct ONNX translation failed (%s: %s); using torch.onnx.export", type(e).__name__, e)
        return None


def _lift_adapters(cm: "CompiledModel") -> tuple[Any, list[str], list[torch.Tensor]]:
    """A copy of ``cm``'s graph whose adapter tensors are inputs: (graph module, input names,
    the current tensors to export with)."""
    from graphpeft.graph import adapter_name_of, adapters, get_tensor, graph_meta, unscoped_tensor_name
    from graphpeft.infra import PassContext, PassManager, clone_graph_module
    from graphpeft.registry import PASSES

    gm = clone_graph_module(cm.graph_module)
    owner = {t: adapter_name_of(rec) for rec in adapters(gm).values() for t in rec["tensors"].values()}
    PassManager().run(gm, [PASSES["lift_adapter_tensors"]()], PassContext(verify=True))
    lifted = graph_meta(gm)["lifted_inputs"]
    if not lifted:
        raise ExportError("adapters_as_inputs: the graph has no adapter tensors (export with merged=False, and "
                          "compile with adapters)")
    # PEFT file names, so any adapter's adapter_state_dict(name, include_constants=True) feeds
    # the file; several active adapters sharing those names keep their graph names instead
    names = [unscoped_tensor_name(t, owner.get(t, "default")) for t in lifted]
    if len(set(names)) != len(names):
        names = list(lifted)
    return gm, names, [get_tensor(cm.graph_module, t).detach().clone() for t in lifted]
