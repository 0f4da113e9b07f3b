"""Export a compiled training step to ONNX: one graph that a plain onnxruntime
``InferenceSession`` runs to train.

The file's graph takes ``param/<name>`` (trainable tensors), ``state/<key>`` (optimizer state,
``state/step`` included), ``lr`` and ``batch/<i>``, and returns ``loss``, ``param_out/<name>`` and
``state_out/<key>``. Frozen weights are initializers named by their original paths. The
current trainable tensors, state and ``lr`` are stored as the default values of their inputs
(initializers with the input's name), and the training signature (JSON) as the model's
``graphpeft.training`` metadata, so the one file is all :class:`OnnxTrainer` needs.

Before export the graph is legalized (``legalize_onnx``: in-place ops, ``empty_permuted``,
asserts) on a copy; it is core ATen already, so ``nll_loss`` (whose direct translation gives
N× too large mean cross-entropy gradients) never reaches the exporter. Writes are atomic: the
model goes to a temporary file renamed into place; with external data the tensors go to a
fresh ``<file>.<token>.data`` that only the new model references, and stale data files of
that model are removed afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.fx as fx

from graphpeft.errors import ExportError
from graphpeft.paths import atomic_write
from graphpeft.infra import PassContext, PassManager, Pipeline, copy_graph
from graphpeft.registry import PASSES
from graphpeft.training import TRAINING_META, TrainingSignature, signature_of, verify_training

from .fold_transpose import fold_transposes_into_gemm
from .pack_once import PACK_ONCE_MIN_BYTES, pack_weights_once

if TYPE_CHECKING:
    from graphpeft.training import TrainingStep

log = logging.getLogger(__name__)

METADATA_KEY = "graphpeft.training"
FORMAT = "graphpeft-training-step"
FORMAT_VERSION = 1
#: above this many bytes of tensors, weights go to an external data file (protobuf caps at 2 GB)
EXTERNAL_DATA_THRESHOLD = 1_500_000_000


@dataclasses.dataclass
class TrainingExportResult:
    """Where the training step went, its interface and where the export time went."""

    path: str
    data_path: Optional[str]
    input_names: list[str]
    output_names: list[str]
    num_nodes: int
    bytes: int
    seconds: float
    #: seconds per phase: legalize, capture (ExportedProgram), onnx_translate (incl. a one-time
    #: op registry build per process), onnx_optimize, save
    timings: dict[str, float]
    legalized: dict[str, int]


def legalized_copy(gm: fx.GraphModule, verify: bool = True,
                   verifier: Callable[[fx.GraphModule], None] = verify_training) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of the graph (tensors shared, not copied) run through ``legalize_onnx`` and
    dead-code removal, checked by ``verifier`` (the training verifier by default). The copy
    is a lazy graph module: it generates and compiles its Python code only if it is run, not
    after every pass (a 9,000-node step's code took ~0.5 s to make each time)."""
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    with _use_lazy_graph_module(True):
        new = copy_graph(gm)
    ctx = PassContext(verify=verify)
    # upcast_low_precision: bf16 / fp16 ops computed in float32 between casts (onnxruntime's CPU
    # provider lacks their kernels), attention first in torch's rounding order; no-ops on float32
    # slice_scatter_onnx: slice gradients as Pad / Concat instead of transposed ScatterND
    # decompose_attention: the fused CPU attention the torch executor runs, as math ONNX can express
    pipeline = Pipeline("legalize_onnx", [PASSES["decompose_attention"](), PASSES["legalize_onnx"](),
                                          PASSES["slice_scatter_onnx"](),
                                          PASSES["low_precision_attention"](),
                                          PASSES["upcast_low_precision"](), PASSES["remove_dead_code"]()])
    result = PassManager(verifier=verifier).run(new, pipeline, ctx)
    return result.gm, dict(ctx.options.get("legalize_onnx", {}))


def _example_batch(sig: TrainingSignature) -> list[torch.Tensor]:
    out = []
    for spec in sig.inputs:
        if spec.kind == "batch":
            out.append(torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype)))
    return out


def _atomic_save(model: Any, path: str, external_data: bool) -> Optional[str]:
    """Save an ``onnx_ir`` model to ``path`` atomically; with external data, the tensors go to a
    fresh ``<file>.<token>.data`` beside it, and older data files of ``path`` are removed once
    the new model is in place."""
    import onnx_ir as ir

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    data_name: Optional[str] = f"{base}.{uuid.uuid4().hex[:12]}.data" if external_data else None
    data_path = os.path.join(folder, data_name) if data_name else None

    def write(tmp: str) -> None:
        ir.save(model, tmp, external_data=data_name, size_threshold_bytes=1024)
        if data_path:
            with open(data_path, "rb") as f:
                os.fsync(f.fileno())

    try:
        atomic_write(path, write)
    except BaseException:
        if data_path and os.path.exists(data_path):
            os.unlink(data_path)
        raise
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(base) + ".*.data")):
        if data_name is None or os.path.basename(stale) != data_name:
            try:
                os.unlink(stale)
            except OSError:
                pass
    return os.path.join(folder, data_name) if data_name else None


def export_training(step: "TrainingStep", path: Union[str, os.PathLike], *, external_data: Optional[bool] = None,
                    opset_version: Optional[int] = None, optimize: Union[bool, str] = "safe", verify: bool = True,
                    batch: Optional[Sequence[torch.Tensor]] = None, fast: bool = True,
                    quantized_weights: str = "packed",
                    pack_once_min_bytes: Optional[int] = PACK_ONCE_MIN_BYTES) -> TrainingExportResult:
    """Export ``step`` (its graph for the first compiled batch shape, or for ``batch``'s) to
    ``path``.

    Args:
        external_data: store tensors in a data file beside the model (default: above 1.5 GB).
        opset_version: ONNX opset (default: the exporter's).
        optimize: ``"safe"`` (default) folds constants and removes unused and duplicate nodes;
            ``True`` runs onnxscript's full optimizer, whose ``Add(x, 0)`` rewrite matches
            constants within 1e-8 of zero and so deletes AdamW's ``eps = 1e-8`` (silently wrong
            updates where gradients are small); ``False`` leaves the graph as translated.
        verify: run the verifier around the legalization passes.
        batch: a batch whose shapes select which compiled graph to export.
        fast: translate with the exporter's internals, skipping its re-decomposition of a graph
            that is core ATen already and reusing the op registry between exports (falls back
            to ``torch.onnx.export`` if that fails).
        quantized_weights: ``"packed"`` or ``"qdq"`` (int8 / int4 base weights as standard
            ``DequantizeLinear`` nodes; see :func:`graphpeft.backends.onnx.export.export`).
        pack_once_min_bytes: frozen weights of at least this many bytes (default 1 MiB) get
            their input gradient with the weight as a ``Gemm``'s A operand, so onnxruntime keeps
            one packed copy of each instead of two (:mod:`~graphpeft.backends.onnx.pack_once`);
            ``None``: the plain ``MatMul`` (a little faster on small weights).
    """
    from .export import check_quantized_weights

    path = os.fspath(path)
    check_quantized_weights(quantized_weights)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    src = step.graph_for(*batch) if batch is not None else step.graph_module
    sig = signature_of(src)
    gm, legalized = legalized_copy(src, verify=verify)
    timings["legalize"] = time.perf_counter() - start

    example_batch = list(batch) if batch is not None else _example_batch(sig)
    inputs = step.flat_inputs(*example_batch) if batch is not None else _flat_inputs_for(step, sig, example_batch)
    input_names = [s.name for s in sig.inputs]
    output_names = [s.name for s in sig.outputs]

    t = time.perf_counter()
    ep = _capture(gm, inputs, fast)
    timings["capture"] = time.perf_counter() - t
    t = time.perf_counter()
    program = _translate(ep, gm, inputs, input_names, output_names, opset_version, fast)
    timings["onnx_translate"] = time.perf_counter() - t
    t = time.perf_counter()
    _optimize(program, optimize, quantized_weights, step, pack_once_min_bytes)
    timings["onnx_optimize"] = time.perf_counter() - t
    t = time.perf_counter()
    model = program.model
    total_bytes = _complete_model(model, sig, inputs, input_names, output_names)
    if external_data is None:
        external_data = total_bytes > EXTERNAL_DATA_THRESHOLD
    data_path = _atomic_save(model, path, bool(external_data))
    timings["save"] = time.perf_counter() - t
    num_nodes = len(model.graph)
    seconds = time.perf_counter() - start
    log.info("exported training step %s: %d ONNX nodes in %.1f s (%s)", path, num_nodes, seconds,
             ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    return TrainingExportResult(path, data_path, input_names, output_names, num_nodes, os.path.getsize(path),
                                seconds, timings, legalized)


def _capture(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], fast: bool) -> Any:
    """The legalized graph as an ``ExportedProgram``: wrapped directly (fast), else ``torch.export``."""
    if fast:
        try:
            return exported_program(gm)
        except Exception as e:  # noqa: BLE001 - fall back to capturing it with torch.export
            log.info("could not wrap the graph as an ExportedProgram (%s: %s); using torch.export", type(e).__name__, e)
    return _torch_export(gm, inputs)


def _translate(ep: Any, gm: fx.GraphModule, inputs: Sequence[torch.Tensor], input_names: list[str],
               output_names: list[str], opset_version: Optional[int], fast: bool) -> Any:
    """The ONNX program: the exporter's internals (fast), else ``torch.onnx.export``."""
    program = None
    if fast:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = _translate_fast(ep, input_names, output_names, opset_version)
        except Exception as e:  # noqa: BLE001 - private exporter API: fall back to the public one
            log.info("fast ONNX translation failed (%s: %s); using torch.onnx.export", type(e).__name__, e)
            program = None
            ep = _torch_export(gm, inputs)
    if program is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(ep, (), dynamo=True, input_names=input_names, output_names=output_names,
                                            opset_version=opset_version, optimize=False, verbose=False)
        except Exception as e:
            raise ExportError(f"torch.onnx could not translate the training graph: {type(e).__name__}: {str(e)[:2000]}. "
                              "If an op has no translation, add a rewrite for it to the legalize_onnx pass.") from e
    if program is None:
        raise ExportError("torch.onnx.export returned nothing")
    return program


def _optimize(program: Any, optimize: Union[bool, str], quantized_weights: str, step: "TrainingStep",
              pack_once_min_bytes: Optional[int]) -> None:
    for node in program.model.graph.all_nodes():  # stack traces per node: most of the file otherwise
        node.metadata_props.clear()
    if optimize == "safe":
        _safe_optimize(program.model)
    elif optimize:
        log.warning("optimize=True: onnxscript's optimizer drops additions of constants within 1e-8 of zero "
                    "(e.g. AdamW's eps); check parity with the torch step")
        program.optimize()
    if optimize:  # no per-step Transpose, no transposed copy of a frozen weight in onnxruntime
        fold_transposes_into_gemm(program.model)
        if pack_once_min_bytes is not None:  # after the fold: it reads the forward's Gemm(x, W, transB=1)
            pack_weights_once(program.model, pack_once_min_bytes)
    if quantized_weights == "qdq":
        from .qdq import use_dequantize_linear

        use_dequantize_linear(program.model, step.cm.graph_module)


def _complete_model(model: Any, sig: Any, inputs: Sequence[torch.Tensor], input_names: list[str],
                    output_names: list[str]) -> int:
    """Check the interface, add the trainable tensors, state and lr as initializers named like the
    inputs (their defaults) and the signature as metadata; returns the initializers' bytes."""
    import numpy as np
    import onnx_ir as ir

    graph_inputs = [v.name for v in model.graph.inputs]
    graph_outputs = [v.name for v in model.graph.outputs]
    if graph_inputs != input_names or graph_outputs != output_names:
        raise ExportError(f"the exported graph's interface does not match the training signature: inputs "
                          f"{graph_inputs[:4]}..., outputs {graph_outputs[:4]}...")
    for value, spec, tensor in zip(model.graph.inputs, sig.inputs, inputs):
        if spec.kind in ("param", "state", "lr") and value.name not in model.graph.initializers:
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: onnx_ir wraps the torch tensor
                from onnx_ir.tensor_adapters import TorchTensor

                value.const_value = TorchTensor(tensor.detach().cpu().clone().contiguous(), name=value.name)
            else:
                value.const_value = ir.tensor(np.array(tensor.detach().cpu().numpy(), copy=True), name=value.name)
            model.graph.register_initializer(value)
    meta = sig.to_dict()
    meta["format"], meta["format_version"] = FORMAT, FORMAT_VERSION
    model.metadata_props[METADATA_KEY] = json.dumps(meta)
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _torch_export(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(gm, tuple(inputs), strict=False)
    except Exception as e:
        raise ExportError(f"torch.export could not capture the training graph: {type(e).__name__}: {str(e)[:1500]}") from e


def exported_program(gm: fx.GraphModule) -> Any:
    """Wrap a training graph as a ``torch.export.ExportedProgram`` directly, without re-tracing
    it: its stored tensors become lifted parameters/buffers, its inputs user inputs. The graph
    is already functional core ATen with fake values on every node, which is all the ONNX
    translator reads (``torch.export`` would spend seconds re-deriving the same graph)."""
    from torch.export import ExportedProgram
    from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
    from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, OutputKind, OutputSpec,
                                              TensorArgument)
    from torch.utils import _pytree as pytree

    from graphpeft.graph import Role, get_tensor, roles

    role_map = roles(gm)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    specs: list[Any] = []
    state: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:  # lifted tensors first, as torch.export orders them
        if node.op == "get_attr" and isinstance(getattr(gm, node.target, None), torch.nn.Module):
            continue  # a higher-order op's subgraph (an inference graph's no_grad region): stays get_attr
        if node.op == "get_attr" and node.target not in state:
            ph = graph.placeholder("p_" + node.target.replace(".", "_"))
            ph.meta.update(node.meta)
            buffer = role_map.get(node.target) == Role.BUFFER
            specs.append(InputSpec(InputKind.BUFFER if buffer else InputKind.PARAMETER, TensorArgument(ph.name),
                                   node.target, True if buffer else None))
            state[node.target] = get_tensor(gm, node.target)
            env[node] = ph
        elif node.op == "get_attr":
            env[node] = next(p for p, spec in zip(graph.nodes, specs) if spec.target == node.target)
    users = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in users:
        ph = graph.placeholder(node.name)
        ph.meta.update(node.meta)
        specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(ph.name), None))
        env[node] = ph
    outputs: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (node.op == "get_attr" and node in env):
            continue
        if node.op == "output":
            outputs = [env[a] for a in node.args[0]]
            graph.output(tuple(outputs))
            continue
        new = graph.node_copy(node, lambda a: env[a])
        new.meta.setdefault("nn_module_stack", {})
        env[node] = new
    signature = ExportGraphSignature(specs, [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(o.name), None)
                                             for o in outputs])
    in_spec = pytree.tree_flatten((tuple(range(len(users))), {}))[1]
    out_spec = pytree.tree_flatten(tuple(range(len(outputs))))[1]
    call_graph = [ModuleCallEntry("", ModuleCallSignature(inputs=[], outputs=[], in_spec=in_spec, out_spec=out_spec))]
    return ExportedProgram(gm, graph, signature, state, {}, call_graph)


_REGISTRIES: dict[int, Any] = {}


def _translate_fast(ep: Any, input_names: list[str], output_names: list[str], opset_version: Optional[int]) -> Any:
    """ExportedProgram -> ONNXProgram as ``torch.onnx.export`` does it, minus the work a
    training graph does not need: the op registry is built once per process (seconds), and the
    decomposition pass (a full re-trace) runs only if an op lacks a direct ONNX translation."""
    from torch.onnx._internal.exporter import _constants, _core, _decomp, _fx_passes, _ir_passes, _registration

    opset = opset_version or _constants.TORCHLIB_OPSET
    if opset < _constants.TORCHLIB_OPSET:
        raise RuntimeError("an opset below torchlib's needs version conversion, which torch.onnx.export does")
    if opset not in _REGISTRIES:
        _REGISTRIES[opset] = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    registry = _REGISTRIES[opset]
    implemented = set(_decomp.get_onnx_implemented_overloads(registry))
    ops = {n.target for n in ep.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        if not ops <= implemented:
            log.debug("decomposing ops without direct ONNX translation: %s", sorted(map(str, ops - implemented)))
            ep = _fx_passes.decompose_with_registry(ep, registry)
        _insert_type_promotion(ep.graph_module)
        if any(n.op == "call_function" and ("assert" in str(n.target) or "constrain_range" in str(n.target))
               for n in ep.graph.nodes):
            ep._graph_module = _fx_passes.remove_assertion_nodes(ep.graph_module)  # recompiles the graph
    with _lean_translation():
        program = _core._exported_program_to_onnx_program(ep, registry=registry)
    _ir_passes.rename_inputs(program.model, input_names)
    _ir_passes.rename_outputs(program.model, output_names)
    return program


def _insert_type_promotion(gm: fx.GraphModule) -> None:
    """torch.onnx's explicit type promotion (``InsertTypePromotion``), re-evaluating only the
    nodes it changes. The stock pass re-runs every node of the graph on fake tensors to know
    its arguments' dtypes (Qwen2-0.5B-shaped step: ~5 s profiled); a training graph's nodes all carry
    their fake value already, so a node the rules leave as it is reads that value instead."""
    from torch.onnx._internal.fx import passes
    from torch.onnx._internal.fx.passes import type_promotion

    class _ChangedNodesOnly(type_promotion._TypePromotionInterpreter):
        def run_node(self, n: fx.Node) -> Any:
            recorded = n.meta.get("val")
            if n.op != "call_function" or recorded is None:
                return super().run_node(n)
            before = (n.target, n.args, n.kwargs)
            with self._set_current_node(n):
                if rule := type_promotion.get_type_promotion_rule(n, self.type_promotion_table):
                    self._maybe_promote_node(n, rule)
            if (n.target, n.args, n.kwargs) == before:
                return recorded  # unchanged: its recorded value is what re-running it gives
            return fx.Interpreter.run_node(self, n)

    for module in gm.modules():
        transform = passes.InsertTypePromotion(module)
        transform.interpreter = _ChangedNodesOnly(module, transform.interpreter.type_promotion_table)
        transform.run()


_OP_SIGNATURES: dict[tuple[str, str, int], Any] = {}


@contextlib.contextmanager
def _lean_translation() -> Iterator[None]:
    """torch.onnx's translation minus two per-node costs a training export does not need:
    torchlib's builder derives an ``OpSignature`` from the op's schema again for every op it
    emits (parsing each type constraint; here one per schema: domain, name, version; a
    signature is only read, so sharing it is safe), and every ONNX node gets the fx node's
    text, stack trace and module scopes as metadata, which the export then clears (a quarter
    of translating the Qwen2-0.5B-shaped step). Not thread-safe: it patches both for its
    duration."""
    from onnx_ir import schemas
    from torch.onnx._internal.exporter import _core

    original = schemas.OpSignature.__dict__["from_op_schema"]
    set_metadata = _core._set_node_metadata

    def cached(cls: Any, op_schema: Any) -> Any:
        key = (op_schema.domain, op_schema.name, op_schema.since_version)
        hit = _OP_SIGNATURES.get(key)
        if hit is None:
            hit = _OP_SIGNATURES[key] = original.__func__(cls, op_schema)
        return hit

    schemas.OpSignature.from_op_schema = classmethod(cached)  # type: ignore[method-assign]
    _core._set_node_metadata = lambda fx_node, ir_node: None
    try:
        yield
    finally:
        schemas.OpSignature.from_op_schema = original  # type: ignore[method-assign]
        _core._set_node_metadata = set_metadata


def _fold_unless_low_precision(node: Any) -> Any:
    """Constant folding's per-node decision: never fold an op that reads a stored int8 / uint8 /
    bfloat16 / float16 tensor (a quantized base weight, ``gp.Quantize``): folding its
    dequantization would store the float weight in the file. None: the optimizer decides."""
    import onnx_ir as ir

    low = (ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.BFLOAT16, ir.DataType.FLOAT16, ir.DataType.UINT4,
           ir.DataType.INT4)
    for value in node.inputs:
        if value is not None and value.const_value is not None and value.dtype in low:
            return False
    return None


def _safe_optimize(model: Any) -> None:
    """onnxscript's optimizer pipeline without its pattern rewrites (which treat constants
    within 1e-8 of zero as zero): inline, fold constants, drop unused nodes, lift constants,
    deduplicate, CSE. In place on an ``onnx_ir`` model; skipped if onnxscript lacks a part."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as common
        from onnxscript.optimizer import _constant_folding
    except Exception:  # noqa: BLE001 - optional optimization
        log.info("onnxscript's optimizer passes are unavailable; exporting the graph unoptimized")
        return
    # no per-node shape inference: the exporter gives every value its static shape already, and
    # it was half of this phase (2-layer step: 3.4 s vs 8.0 s, 3 fewer Casts folded of ~900 ops).
    # One folding sweep: it visits nodes in order, so folded values reach their users in the same
    # sweep; a second found nothing more on the training steps (identical files) and doubled the time
    passes = [
        common.InlinePass(),
        _constant_folding.FoldConstantsPass(shape_inference=False, input_size_limit=1024,
                                            output_size_limit=1024 * 1024, should_fold=_fold_unless_low_precision),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        _cse_keeping_stored_chains(),
        common.RemoveUnusedNodesPass(),
    ]
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)  # "Evaluation failed" for ops it cannot fold: expected
    try:
        ir.passes.Sequential(*passes)(model)
    finally:
        folding_log.setLevel(level)


def _stored_chains(graph: Any) -> list[Any]:
    """The nodes computed from initializers only (not graph inputs), at least one of them of a
    quantized weight's storage type (8-bit, 4-bit or 16-bit float): its dequantization."""
    import onnx_ir as ir

    low = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.UINT4, ir.DataType.INT4, ir.DataType.BFLOAT16,
           ir.DataType.FLOAT16)
    inputs = set(graph.inputs)
    const = {v for v in graph.initializers.values() if v not in inputs}
    quant = {v for v in const if v.dtype in low}
    out = []
    for node in graph:
        ins = [v for v in node.inputs if v is not None]
        if ins and all(v in const for v in ins):
            const.update(node.outputs)
            if any(v in quant for v in ins):
                quant.update(node.outputs)
                out.append(node)
    return out


def _cse_keeping_stored_chains() -> Any:
    """onnx_ir's common-subexpression elimination, except on a quantized weight's dequantization
    (:func:`_stored_chains`). The step computes those twice on purpose: ``rematerialize_dequantized`` dequantizes a
    quantized weight again for the backward so that the float weight does not live from the
    forward to the backward; merging the copies (as plain CSE does: measured, every int4
    weight's two dequantizations became one) undoes that. Each such node gets a unique
    temporary attribute, so no two of them compare equal; it is removed afterwards."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    class CSEKeepingStoredChains(ir.passes.InPlacePass):
        def call(self, model: Any) -> Any:
            kept = _stored_chains(model.graph)
            for i, node in enumerate(kept):
                node.attributes[_KEEP_ATTR] = ir.AttrInt64(_KEEP_ATTR, i)
            try:
                return common.CommonSubexpressionEliminationPass()(model)
            finally:
                for node in kept:
                    node.attributes.pop(_KEEP_ATTR, None)

    return CSEKeepingStoredChains()


_KEEP_ATTR = "_graphpeft_keep"


def _flat_inputs_for(step: "TrainingStep", sig: TrainingSignature, batch: list[torch.Tensor]) -> list[torch.Tensor]:
    from graphpeft.graph import get_tensor

    params = [get_tensor(step.cm.graph_module, n).detach() for n in sig.params]
    state = step.state_dict()["optimizer"]
    return [*params, *[state[s] for s in sig.state], torch.tensor(step.lr, dtype=torch.float32), *batch]


def read_signature(model: Any) -> TrainingSignature:
    """The training signature stored in an exported model (an ``onnx.ModelProto``)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            data = json.loads(prop.value)
            if data.get("format") != FORMAT:
                break
            if data.get("format_version") != FORMAT_VERSION:
                raise ExportError(f"the training step was exported with format version {data.get('format_version')}; "
                                  f"this graphpeft reads version {FORMAT_VERSION}: export it again")
            data.pop("format", None)
            data.pop("format_version", None)
            return TrainingSignature.from_dict(data)
    raise ExportError("this ONNX file is not a graphpeft training step (no graphpeft.training metadata); "
                      "export one with step.export_onnx(path)")


__all__ = ["TrainingExportResult", "export_training", "legalized_copy", "read_signature", "TRAINING_META"]
