"""Tracing frontends: ``nn.Module`` -> the graphpeft IR (see :mod:`graphpeft.graph`).

``torch.export`` (non-strict) is the default; ``torch.fx.symbolic_trace`` followed by
``make_fx`` is the fallback for simple modules. Both produce the same IR: aten ops at the
pre-dispatch level (``aten.linear`` stays whole), parameters as ``get_attr`` nodes named by
their original paths, ``nn_module_stack`` on every layer op, flat tensor inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
import traceback
import warnings
from typing import Any, Literal, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import InputError, TraceError
from .graph import TRANSPOSED_MODULES_KEY, Role, attach_tensor, graph_meta, roles
from .linear_forms import canonicalize_linears
from .opaque_ops import expand_grouped_mm

log = logging.getLogger(__name__)

Frontend = Literal["auto", "export", "fx"]


@dataclasses.dataclass
class TracedModel:
    """A traced model: the graph plus what is needed to call it like the original model."""

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec  # of (args, kwargs) including constant (non-tensor) leaves
    tensor_leaf_mask: list[bool]  # which flat leaves of in_spec are graph inputs
    const_leaves: list[Any]  # the constant leaves seen at trace time (checked at call time)
    out_spec: pytree.TreeSpec
    frontend: str
    kwarg_names: tuple[str, ...]

    def flatten_inputs(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Flatten a call's inputs the way the graph expects them, with clear errors."""
        if set(kwargs) - set(self.kwarg_names):
            extra = sorted(set(kwargs) - set(self.kwarg_names))
            raise InputError(
                f"keyword arguments {extra} were not given when the model was compiled "
                f"(compiled with {list(self.kwarg_names)}); pass them in example_kwargs to compile()"
            )
        n_args = self.in_spec.child(0).num_children
        if len(args) != n_args:
            raise InputError(
                f"the model was compiled with {n_args} positional argument(s) and keyword arguments "
                f"{list(self.kwarg_names)}; got {len(args)} positional argument(s): pass the same ones"
            )
        # a non-tensor where the graph takes a tensor: say so before the structure check does
        template_args, template_kwargs = pytree.tree_unflatten(list(range(len(self.tensor_leaf_mask))), self.in_spec)
        given = [(f"positional argument {i}", a, t) for i, (a, t) in enumerate(zip(args, template_args))]
        given += [(f"keyword argument {k}", kwargs[k], template_kwargs.get(k)) for k in kwargs]
        for where, value, slot in given:
            if isinstance(slot, int) and self.tensor_leaf_mask[slot] and not isinstance(value, torch.Tensor):
                raise InputError(f"{where} was a tensor when the model was compiled (a graph input): "
                                 f"pass a tensor, got {type(value).__name__}")
        full = dict(zip(self.kwarg_names, [None] * len(self.kwarg_names)))
        leaves_spec_kwargs = pytree.tree_unflatten(self.const_leaves_template(), self.in_spec)[1]
        for k in self.kwarg_names:
            full[k] = kwargs[k] if k in kwargs else leaves_spec_kwargs[k]
        leaves, spec = pytree.tree_flatten((tuple(args), full))
        if spec != self.in_spec:
            raise InputError(
                "inputs do not have the structure the model was compiled with: expected "
                f"{self.in_spec}, got {spec}"
            )
        out: list[torch.Tensor] = []
        for i, (leaf, is_tensor, const) in enumerate(zip(leaves, self.tensor_leaf_mask, self.const_leaves)):
            if is_tensor:
                if not isinstance(leaf, torch.Tensor):
                    path = pytree.keystr(pytree.tree_flatten_with_path(
                        pytree.tree_unflatten(list(range(len(leaves))), self.in_spec))[0][i][0])
                    name = path[3:][1:-1] if path[3:].count("[") == 1 else path[3:]  # "'mask'" / "0"
                    where = f"keyword argument {name}" if path.startswith("[1]") else f"positional argument {name}"
                    raise InputError(f"{where} was a tensor when the model was compiled (a graph input): "
                                    f"pass a tensor, got {type(leaf).__name__}")
                out.append(leaf)
            elif leaf is not const and leaf != const:
                raise InputError(
                    f"a non-tensor input was {const!r} when the model was compiled and is "
                    f"{leaf!r} now; constants are baked into the graph: compile again with it"
                )
        return out

    def const_leaves_template(self) -> list[Any]:
        return [None if t else c for t, c in zip(self.tensor_leaf_mask, self.const_leaves)]


#: ``graph_meta`` key: the module path PEFT's ``"all-linear"`` leaves out (None: none)
OUTPUT_HEAD_KEY = "output_head"


def output_head_path(model: torch.nn.Module) -> Optional[str]:
    """The module PEFT's ``"all-linear"`` excludes (``_maybe_include_all_linear_layers``): the
    output embeddings of a transformers ``PreTrainedModel`` (``lm_head`` ...), else none."""
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if pretrained is None or not isinstance(model, pretrained):
        return None
    try:
        head = model.get_output_embeddings()
    except Exception:  # noqa: BLE001 - a model without output embeddings
        return None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


#: ``graph_meta`` key: the paths of ``nn.Linear`` / transformers ``Conv1D`` modules, which PEFT's
#: ``"all-linear"`` takes (a router computing ``F.linear`` with its own weight is a layer, not one of them)
LINEAR_MODULES_KEY = "linear_modules"


def linear_module_paths(model: torch.nn.Module) -> list[str]:
    """Module paths of the ``nn.Linear`` (subclasses included) and ``Conv1D`` modules of ``model``."""
    transformers = sys.modules.get("transformers")
    conv1d = getattr(getattr(transformers, "pytorch_utils", None), "Conv1D", None) if transformers else None
    kinds = (torch.nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


def transposed_modules(model: torch.nn.Module) -> list[str]:
    """Module paths whose ``is_transposed`` is true: MoE experts storing ``(experts, in, out)``."""
    return [name for name, m in model.named_modules() if getattr(m, "is_transposed", False) is True]


#: ``graph_meta`` key: the classification head PEFT's ``"all-linear"`` leaves out with ``task_type="SEQ_CLS"``
CLASSIFIER_HEAD_KEY = "classifier_head"
#: attributes PEFT looks for, in order, as a sequence classifier's head (peft's ``SEQ_CLS_HEAD_NAMES``)
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def classifier_head_path(model: torch.nn.Module) -> Optional[str]:
    """The module PEFT's ``"all-linear"`` also excludes under ``task_type="SEQ_CLS"``: for a
    transformers ``PreTrainedModel`` without output embeddings, its first attribute named
    ``score`` or ``classifier`` (only that module: a head made of several linears, RoBERTa's
    ``classifier.dense``/``out_proj``, keeps them selected, as in PEFT); else none."""
    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if pretrained is None or not isinstance(model, pretrained) or output_head_path(model) is not None:
        return None
    for attr in SEQ_CLS_HEAD_NAMES:
        head = getattr(model, attr, None)
        if isinstance(head, torch.nn.Module):
            return next((name for name, module in model.named_modules() if module is head), None)
    return None


def trace(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: Optional[dict[str, Any]] = None,
    *,
    frontend: Frontend = "auto",
    dynamic: bool = True,
) -> TracedModel:
    """Trace ``model`` into the graphpeft IR.

    The model is traced in eval mode (dropout off, norm statistics fixed): the graph is the
    model's inference computation, and adapters add their own train-only dropout.
    ``dynamic=True`` lets batch and sequence dimensions vary between calls.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    example_inputs = tuple(example_inputs)
    example_kwargs = dict(example_kwargs or {})
    if not example_inputs and not example_kwargs:
        raise TraceError("example_inputs is empty: pass a batch the model's forward accepts, "
                         "e.g. compile(model, plan, example_inputs=(input_ids,))")
    was_training = model.training
    model.eval()
    errors: dict[str, BaseException] = {}
    try:
        order = ["export", "fx"] if frontend == "auto" else [frontend]
        for name in order:
            try:
                fn = _trace_export if name == "export" else _trace_fx
                traced = fn(model, example_inputs, example_kwargs, dynamic)
                log.info("traced %s with %s: %d nodes", type(model).__name__, name,
                         len(traced.gm.graph.nodes))
                graph_meta(traced.gm)[OUTPUT_HEAD_KEY] = output_head_path(model)
                graph_meta(traced.gm)[LINEAR_MODULES_KEY] = linear_module_paths(model)
                graph_meta(traced.gm)[CLASSIFIER_HEAD_KEY] = classifier_head_path(model)
                graph_meta(traced.gm)[TRANSPOSED_MODULES_KEY] = transposed_modules(model)
                return traced
            except TraceError:
                raise
            except Exception as e:  # noqa: BLE001 - reported below with the construct that failed
                log.debug("frontend %s failed", name, exc_info=True)
                errors[name] = e
    finally:
        model.train(was_training)
    raise TraceError(_explain_failure(model, errors))


def _explain_failure(model: torch.nn.Module, errors: dict[str, BaseException]) -> str:
    lines = [f"could not trace {type(model).__name__}:"]
    for name, e in errors.items():
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        lines.append(f"  - {name} frontend: {type(e).__name__}: {first[:300]}")
        where = _user_frame(e)
        if where:
            lines.append(f"    failing construct at {where}")
    lines.append(
        "What to do: make control flow independent of tensor values (use torch.cond or move the "
        "branch outside forward), avoid .item()/.tolist() and Python-side data on tensors in "
        "forward, check that example_inputs/example_kwargs match forward's signature, and pass "
        "use_cache=False to decoder models."
    )
    return "\n".join(lines)


def _user_frame(e: BaseException) -> Optional[str]:
    """The innermost traceback frame outside torch: usually the model's failing line."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(__file__)
    best = None
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename.startswith(torch_dir) or frame.filename.startswith(here):
            continue
        best = f"{frame.filename}:{frame.lineno} ({frame.line})"
    return best


# --- torch.export ----------------------------------------------------------------------------


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[dict]:
    from torch.export import Dim

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise TraceError(f"example inputs do not fit {type(model).__name__}.forward: {e}") from e

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            # images and feature maps (4-D+ floating): the batch only. Symbolic spatial sizes
            # made Swin's window partitioning export take minutes (500 s vs 8 s batch-only)
            dims = 1 if x.dim() >= 4 and x.is_floating_point() else x.dim()
            return {i: Dim.AUTO for i in range(dims)}
        return None

    return {k: pytree.tree_map(spec, v) for k, v in bound.arguments.items()}


def _trace_export(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> TracedModel:
    from torch.export.graph_signature import InputKind, OutputKind

    dyn = _dynamic_shapes(model, args, kwargs) if dynamic else None
    if dyn is not None and any(isinstance(v, dict) and set(v) == {"args", "kwargs"} for v in dyn.values()):
        dyn = None  # *args/**kwargs signatures: fall back to static shapes
    ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn)
    sig = ep.graph_signature
    gm_src = ep.graph_module
    graph = gm_src.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    tensors: dict[str, tuple[torch.Tensor, Role]] = {}
    state = {**ep.state_dict, **ep.constants}
    lifted: list[tuple[fx.Node, str]] = []
    user_nodes: list[fx.Node] = []
    # tied weights (GPT-2's lm_head / wte) are one tensor under several names: keep the first
    # name (the one named_parameters() gives) for every use, so both layers read one tensor
    canonical: dict[int, str] = {}
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            target = spec.target
            if spec.kind == InputKind.CONSTANT_TENSOR:
                target = "_constants." + target.replace(".", "_")
            role = Role.FROZEN if spec.kind == InputKind.PARAMETER else Role.BUFFER
            target = canonical.setdefault(id(state[spec.target]), target)
            tensors.setdefault(target, (state[spec.target], role))
            lifted.append((node, target))
        elif spec.kind == InputKind.USER_INPUT:
            user_nodes.append(node)
        else:
            raise TraceError(f"unsupported export input kind {spec.kind} for {spec.target}")
    for spec in sig.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise TraceError(
                f"the model mutates state in forward ({spec.kind.name} of {spec.target}); "
                "graphpeft traces the model in eval mode, so this should not happen: "
                "check for in-place updates of buffers in forward"
            )
    leaves, in_spec = pytree.tree_flatten((args, _ordered_kwargs(kwargs, ep.call_spec.in_spec)))
    mask = [isinstance(x, torch.Tensor) for x in leaves]
    if len(leaves) != len(user_nodes):
        raise TraceError("could not match export's inputs to the example inputs")
    for node, is_tensor, leaf in zip(user_nodes, mask, leaves):
        if not is_tensor:
            if node.users:
                raise TraceError(f"the constant input {node.name}={leaf!r} is used as a graph value")
            graph.erase_node(node)
    gm = _finish(graph, lifted, tensors, gm_src)
    _record_aliases(gm, ep.state_dict, canonical)
    return TracedModel(gm, in_spec, mask, [None if t else c for t, c in zip(mask, leaves)],
                       ep.call_spec.out_spec, "export", tuple(_ordered_kwargs(kwargs, ep.call_spec.in_spec)))


#: ``graph_meta`` key: the other names of tied tensors (``lm_head.weight`` -> ``transformer.wte.weight``),
#: so a checkpoint that stores a tied tensor under another of its names still loads
ALIASES_KEY = "aliases"


def _record_aliases(gm: fx.GraphModule, state: dict[str, Any], canonical: dict[int, str]) -> None:
    aliases = {k: canonical[id(v)] for k, v in state.items() if canonical.get(id(v), k) != k}
    if aliases:
        graph_meta(gm)[ALIASES_KEY] = aliases


def _ordered_kwargs(kwargs: dict, in_spec: pytree.TreeSpec) -> dict:
    keys = in_spec.child(1).context if in_spec.num_children == 2 else list(kwargs)
    return {k: kwargs[k] for k in keys}


def _finish(graph: fx.Graph, lifted: list[tuple[fx.Node, str]],
            tensors: dict[str, tuple[torch.Tensor, Role]], gm_src: fx.GraphModule) -> fx.GraphModule:
    """Replace lifted parameter placeholders by ``get_attr`` nodes and build the module."""
    graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs; pytree handling is ours
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for node, target in lifted:
        # the tensors are attached to the new root below; fx warns that they are not there yet
        with graph.inserting_before(first_op), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attr = graph.get_attr(target)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    root = torch.nn.Module()
    for node in graph.nodes:  # subgraphs of higher-order ops (e.g. wrap_with_set_grad_enabled)
        if node.op == "get_attr" and node.target not in tensors:
            sub = getattr(gm_src, node.target)
            if isinstance(sub, torch.nn.Module):
                root.add_module(node.target, sub)
    for target, (tensor, role) in tensors.items():
        attach_tensor(root, target, tensor.detach() if role != Role.BUFFER else tensor, role)
    # a fresh graph: the exported graph's erased placeholder nodes stay referenced from outside
    # graphpeft, and through that graph's owning module they kept every weight alive after the
    # CompiledModel and the model were dropped
    fresh = fx.Graph()
    fresh._codegen = graph._codegen
    out, old_output = fresh.graph_copy(graph, {}, return_output_node=True)
    fresh.output(out).meta = dict(old_output.meta)
    gm = fx.GraphModule(root, fresh)
    for target, (_, role) in tensors.items():
        roles(gm)[target] = role
    canonicalize_linears(gm)  # x @ W.T, mm, einsum ... -> aten.linear: one form for every layer
    expand_grouped_mm(gm)  # MoE experts' opaque grouped matmul -> aten ops (autograd, ONNX)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


# --- torch.fx fallback -----------------------------------------------------------------------


def _trace_fx(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> TracedModel:
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.nn.utils.stateless import _reparametrize_module
    import torch.fx.traceback as fxt

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    concrete = {k: v for k, v in bound.arguments.items() if not isinstance(v, torch.Tensor)}
    sig_tensor_names = [k for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)]
    positional = list(inspect.signature(model.forward).parameters)[: len(args)]
    flat_names = [k for k in positional + list(kwargs) if isinstance(bound.arguments.get(k), torch.Tensor)]
    tensor_args = [bound.arguments[k] for k in flat_names]
    if any(not isinstance(v, torch.Tensor) and isinstance(v, (list, tuple, dict)) for v in concrete.values()):
        raise TraceError("the fx frontend takes tensor or constant arguments only")
    sym = fx.symbolic_trace(model, concrete_args=concrete or None)
    for node in sym.graph.nodes:
        if node.op == "call_module":
            mod = sym.get_submodule(node.target)
            stack = dict(node.meta.get("nn_module_stack", {}))
            stack[node.target] = (node.target, type(mod).__qualname__)
            node.meta["nn_module_stack"] = stack
    named = {**dict(sym.named_parameters(remove_duplicate=False)), **dict(sym.named_buffers())}
    param_ids = {id(p) for p in sym.parameters()}
    names = list(named)
    out_spec_box: list[pytree.TreeSpec] = []

    def fn(plist: list[torch.Tensor], *inputs: torch.Tensor) -> list[torch.Tensor]:
        by_name = dict(zip(flat_names, inputs))
        with _reparametrize_module(sym, dict(zip(names, plist))):
            out = fx.Interpreter(sym).run(*[by_name[k] for k in sig_tensor_names])
        flat, spec = pytree.tree_flatten(out)
        out_spec_box.append(spec)
        return flat

    with fxt.preserve_node_meta():
        traced = make_fx(fn, tracing_mode="symbolic" if dynamic else "fake", pre_dispatch=True)(
            list(named.values()), *tensor_args)
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    lifted, tensors = [], {}
    canonical: dict[int, str] = {}  # tied weights: one tensor, one name (see _trace_export)
    for node, name in zip(placeholders, names):
        t = named[name]
        target = canonical.setdefault(id(t), name)
        tensors.setdefault(target, (t, Role.FROZEN if id(t) in param_ids else Role.BUFFER))
        lifted.append((node, target))
    out_node = next(n for n in graph.nodes if n.op == "output")
    flat_out = out_node.args[0]
    out_node.args = (tuple(flat_out) if isinstance(flat_out, (list, tuple)) else (flat_out,),)
    gm = _finish(graph, lifted, tensors, traced)
    _record_aliases(gm, named, canonical)
    # name the graph inputs after forward's arguments (as torch.export does), not arg1_1 ...
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], flat_names):
        node._rename(name)
        node.target = node.name
    gm.recompile()
    user_kwargs = {k: v for k, v in kwargs.items()}
    leaves, in_spec = pytree.tree_flatten((args, user_kwargs))
    mask = [isinstance(x, torch.Tensor) for x in leaves]
    return TracedModel(gm, in_spec, mask, [None if t else c for t, c in zip(mask, leaves)],
                       out_spec_box[-1], "fx", tuple(user_kwargs))
