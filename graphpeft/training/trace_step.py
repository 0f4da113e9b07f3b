"""Tracing one training step (forward, pruned backward, optimizer update) into one fx graph:
:func:`trace_training_step`, the functional interpreter it differentiates through, and the
update forms (one update per tensor, or fused over 1 MiB chunks of the trainable tensors).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Collection, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.fx.traceback as fxt
from torch.utils import _pytree as pytree

from ..errors import GraphPeftError, PlanError, TraceError
from ..graph import META_KEY, Provenance, Role, adapters, attach_tensor, get_tensor, graph_meta, roles
from ..infra import PassContext, PassManager, Pipeline, copy_graph
from ..method import AdapterMethod
from ..registry import PASSES, get_method
from .head_loss import FusedHeadLoss, find_head, without_logits
from .losses import Loss
from .optim import STEP_KEY, Optimizer
from .options import DEFAULT_FORWARD_LOWERING, TrainingOptions
from .signature import (BATCH_IN, COMPILER_PASS_NAME, LOSS_NAME, LR_NAME, ORDER_KEY, PARAM_IN, PARAM_OUT,
                        SKIPPED_NAME, STATE_IN, STATE_OUT, TRAINING_META, IOSpec, TrainingSignature)

if TYPE_CHECKING:
    from ..compiled import CompiledModel

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# --- tracing ------------------------------------------------------------------------------------


class _FunctionalInterpreter(fx.Interpreter):
    """Runs the adapted graph with every tensor read from ``tensors`` (a functional call) and
    tags each op it runs with ``annotation`` (its phase)."""

    def __init__(self, gm: fx.GraphModule, tensors: Mapping[str, Tensor], annotation: dict[str, Any]) -> None:
        super().__init__(gm)
        self.tensors = tensors
        self.annotation = annotation

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.tensors:
            return self.tensors[target]
        return super().get_attr(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        self._source = n
        return super().run_node(n)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        src = getattr(self, "_source", None)
        prov = (src.meta.get(META_KEY) if src is not None else None) or {}
        tags = dict(self.annotation)
        tags.update({f"src_{k}": prov[k] for k in ("origin", "adapter", "rule") if prov.get(k)})
        with fxt.annotate(tags):
            return super().call_function(target, args, kwargs)


def _annotate(phase: str, **extra: Any) -> Any:
    return fxt.annotate({"phase": phase, **extra})


GRAD_KEY = "graphpeft_grad_of"
FINAL_GRAD_KEY = "graphpeft_final_grad_of"
#: annotation (``fx.traceback.annotate``) an op's backward puts on a value it computes again
#: rather than keep from the forward; provenance carries it as ``recompute`` and CSE keeps it
RECOMPUTE_KEY = "graphpeft_recompute"


def _tag_traced(t: Tensor, key: str, value: str) -> None:
    """Mark the node that computes ``t`` in the graph being traced (no node is added)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

    mode = get_proxy_mode()
    if mode is None:
        return
    try:
        node = get_proxy_slot(t, mode.tracer).proxy.node
    except Exception:  # noqa: BLE001 - a constant or an untracked tensor: nothing to mark
        return
    node.meta.setdefault(key, []).append(value)


def _split_batch(tensors: Sequence[Tensor], k: int) -> list[list[Tensor]]:
    if k == 1:
        return [list(tensors)]
    out: list[list[Tensor]] = [[] for _ in range(k)]
    for t in tensors:
        if t.dim() == 0 or t.shape[0] % k:
            raise PlanError(f"accumulation_steps={k} must divide the batch dimension, but a batch tensor has "
                            f"shape {tuple(t.shape)}; use a batch size divisible by {k}")
        for i, chunk in enumerate(torch.split(t, t.shape[0] // k)):
            out[i].append(chunk)
    return out


#: the fused CPU attention ops a step keeps with ``fused_attention`` (exports rewrite them:
#: ``passes/legalize/decompose_attention.py``)
FUSED_ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention",
                       "_scaled_dot_product_attention_math")


def _attention_tracing(fused: bool, tensors: Sequence[Tensor]) -> tuple[Any, dict]:
    """The attention backend and decomposition table to trace the step with.

    Fused (float32 tensors on the CPU only): ``_scaled_dot_product_flash_attention_for_cpu`` and
    its backward stay single ops, which the torch executor runs as fused kernels (the causal
    half skipped; the backward keeps the output and the row log-sum-exp instead of the scores).
    float32 meta tensors (a meta plan of the step the CPU runs after loading) get the kernel the
    CPU would pick (:mod:`.meta_attention`). Otherwise attention is traced in its math form, whose
    backward is core ATen."""
    from torch._decomp import core_aten_decompositions
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = core_aten_decompositions()
    floats = [t for t in tensors if t.is_floating_point()]
    if fused and floats and all(t.dtype == torch.float32 for t in floats):
        fused_table = {k: v for k, v in table.items()
                       if getattr(getattr(k, "overloadpacket", None), "__name__", "") not in FUSED_ATTENTION_OPS}
        backend = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
        if all(t.device.type == "cpu" for t in floats):
            return backend, fused_table
        if all(t.device.type == "meta" for t in floats):  # a meta plan of the CPU step: the CPU's kernel
            from .meta_attention import CpuAttentionOnMeta

            stack = contextlib.ExitStack()
            stack.enter_context(backend)
            stack.enter_context(CpuAttentionOnMeta())
            return stack, fused_table
    return sdpa_kernel([SDPBackend.MATH]), table


def after_update_hooks(gm: fx.GraphModule, names: Sequence[str]) -> dict[str, tuple[Any, dict[str, Any], str]]:
    """For the trainable tensors ``names`` that belong to an adapter: tensor name ->
    ``(method, record, key)``, whose ``method.after_update(record, key, p, lr)`` finishes that
    tensor's update (:meth:`~graphpeft.method.AdapterMethod.after_update`). A tensor shared by
    several adapters gets the hook of the first one only."""
    wanted = set(names)
    hooks: dict[str, tuple[Any, dict[str, Any], str]] = {}
    for rec in adapters(gm).values():
        method = get_method(rec["method"])
        if method is None:
            continue
        for key, name in rec["tensors"].items():
            if name in wanted and name not in hooks:
                hooks[name] = (method, rec, key)
    return hooks


def apply_after_update(cm: "CompiledModel", lr: float, methods: Optional[Sequence[str]] = None) -> None:
    """The eager twin of the compiled step's post-update hooks: call it after
    ``torch.optim``'s ``step()`` in a plain PyTorch loop, with that step's learning rate, and
    each adapter's :meth:`~graphpeft.method.AdapterMethod.after_update` (SoRA's proximal step
    on its gates) runs on the model's tensors in place, exactly as the compiled step runs it.
    ``methods`` restricts it to those method names (default: every method)."""
    gm = cm.graph_module
    names = [n for n, r in roles(gm).items() if r.trainable]
    lr_t = torch.tensor(float(lr), dtype=torch.float32)  # what the compiled step receives
    with torch.no_grad():
        for name, (method, rec, key) in after_update_hooks(gm, names).items():
            if methods is not None and rec["method"] not in methods:
                continue
            p = get_tensor(gm, name)
            p.copy_(method.after_update(rec, key, p.detach(), lr_t))


#: ``fuse_optimizer="auto"`` fuses the update when the trainable tensors take at most this many bytes
FUSED_UPDATE_MAX_BYTES = 64 << 20
#: a fused update runs on concatenations of at most this many bytes of trainable tensors at a time:
#: its flat copies (tensors, slots, gradients, results: ~8x the bytes) then stay small
FUSED_CHUNK_BYTES = 1 << 20


def _fuse_update(option: Union[bool, str], params: Sequence[Tensor]) -> bool:
    if option == "auto":
        return (len({p.dtype for p in params}) == 1
                and sum(p.numel() * p.element_size() for p in params) <= FUSED_UPDATE_MAX_BYTES)
    return bool(option) and len({p.dtype for p in params}) == 1


def _finite_flag(loss: Tensor, lr_t: Tensor, grads: Sequence[Tensor]) -> Tensor:
    """True when the loss, the lr and every gradient are finite: checked once the gradients
    exist and before any update, so each update is kept or dropped (a ``where`` on this flag,
    which the exported step does the same way) as soon as it is computed, and no updated
    tensor waits for the others. A NaN or inf anywhere makes a sum non-finite: one reduction
    per tensor and one ``isfinite`` (only sums beyond float32's range, ~3e38, would skip a
    finite step)."""
    with _annotate("check"):
        sums = [torch.sum(g, dtype=torch.float32) for g in grads]
        return torch.isfinite(torch.stack([loss.float(), lr_t.float(), *sums]).sum())


def _keep_if(finite: Tensor, olds: Sequence[Tensor], news: Sequence[Tensor]) -> list[Tensor]:
    return [torch.where(finite, new, old) for old, new in zip(olds, news)]


def _update_each(optimizer: Optimizer, names: Sequence[str], pdict: Mapping[str, Tensor], grads: Mapping[str, Tensor],
                 sdict: Mapping[str, Tensor], shared: dict[str, Any], lr_t: Tensor, finite: Tensor,
                 hooks: Mapping[str, Any]) -> tuple[list[Tensor], dict[str, Tensor]]:
    """The update one parameter at a time, each kept or dropped on ``finite`` right away
    (``hooks``: methods' own steps after the optimizer's, e.g. SoRA's proximal step)."""
    new_params, new_state = [], {}
    for n in names:
        with _annotate("optimizer", param=n):
            slots = {s: sdict[f"{n}:{s}"] for s in optimizer.param_slots()}
            new_p, new_slots = optimizer.update_one(pdict[n], grads[n], slots, shared, lr_t)
            if n in hooks:
                method, rec, key = hooks[n]
                new_p = method.after_update(rec, key, new_p, lr_t)
            keys = list(new_slots)
            kept = _keep_if(finite, [pdict[n], *(slots[s] for s in keys)], [new_p, *(new_slots[s] for s in keys)])
        new_params.append(kept[0])
        new_state.update({f"{n}:{s}": v for s, v in zip(keys, kept[1:])})
    return new_params, new_state


def _chunks(names: Sequence[str], pdict: Mapping[str, Tensor], limit: int) -> list[list[str]]:
    """``names`` in order, cut into runs of at most ``limit`` bytes (a bigger tensor alone)."""
    out: list[list[str]] = []
    size = limit
    for n in names:
        b = pdict[n].numel() * pdict[n].element_size()
        if size + b > limit:
            out.append([])
            size = 0
        out[-1].append(n)
        size += b
    return out


def _flat(ts: Sequence[Tensor], copy: bool = False) -> Tensor:
    # gradients are copied contiguous first: a kernel may hand back other strides than the
    # trace saw (convolution weight gradients), and a view traced as valid would then fail
    return torch.cat([(t.clone(memory_format=torch.contiguous_format) if copy else t).reshape(-1) for t in ts])


def _flat_grads(names: Sequence[str], pdict: Mapping[str, Tensor], grads: Mapping[str, Tensor]
                ) -> list[tuple[list[str], Tensor]]:
    """The gradients of a fused update, concatenated per chunk of :data:`FUSED_CHUNK_BYTES` (the
    finite check then sums a few flat tensors instead of every gradient)."""
    with _annotate("optimizer"):
        return [(chunk, _flat([grads[n] for n in chunk], copy=True))
                for chunk in _chunks(names, pdict, FUSED_CHUNK_BYTES)]


def _update_fused(optimizer: Optimizer, pdict: Mapping[str, Tensor], flat_grads: Sequence[tuple[list[str], Tensor]],
                  sdict: Mapping[str, Tensor], shared: dict[str, Any], lr_t: Tensor,
                  finite: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The update of many parameters at once, on their concatenation (a multi-tensor update,
    like ``torch.optim``'s foreach path), a chunk of :func:`_flat_grads` at a time: the
    optimizers' updates are elementwise, so each element gets the very same arithmetic, in a
    dozen ops per chunk instead of a dozen per tensor (dozens of small adapter tensors made the
    per-tensor form mostly dispatch overhead); the concatenated copies cost a few times a
    chunk's bytes."""
    slot_names = list(optimizer.param_slots())
    new_params: dict[str, Tensor] = {}
    new_state: dict[str, Tensor] = {}
    for chunk, grad in flat_grads:
        sizes = [pdict[n].numel() for n in chunk]
        with _annotate("optimizer"):
            old_p = _flat([pdict[n] for n in chunk])
            old_slots = [_flat([sdict[f"{n}:{s}"] for n in chunk]) for s in slot_names]
            new_p, slots = optimizer.update_one(old_p, grad, dict(zip(slot_names, old_slots)), shared, lr_t)
            kept = _keep_if(finite, [old_p, *old_slots], [new_p, *[slots[s] for s in slot_names]])
            for key, v in zip([None, *slot_names], kept):
                for n, part in zip(chunk, torch.split(v, sizes)):
                    part = part.view(pdict[n].shape)
                    if key is None:
                        new_params[n] = part
                    else:
                        new_state[f"{n}:{key}"] = part
    return new_params, new_state


def _passes_named(names: Sequence[str], what: str) -> list[Any]:
    missing = [n for n in names if n not in PASSES]
    if missing:
        raise PlanError(f"unknown {what} pass(es) {missing}; registered: {sorted(PASSES)}")
    return [PASSES[n]() for n in names]


def lower_forward(gm: fx.GraphModule, options: TrainingOptions) -> fx.GraphModule:
    """The adapted graph the step is traced from: a copy of ``gm`` (sharing its tensors) after
    the forward lowering passes (:attr:`TrainingOptions.lowering`); ``gm`` itself is unchanged."""
    names = list(options.lowering if options.lowering is not None else DEFAULT_FORWARD_LOWERING)
    if not names:
        return gm
    from ..verify import verify

    lowered = copy_graph(gm)
    ctx = PassContext(verify=options.verify, hooks=list(options.hooks))
    pipeline = Pipeline("forward_lowering", _passes_named(names, "lowering"))
    return PassManager(verifier=verify).run(lowered, pipeline, ctx).gm


def trace_training_step(cm: "CompiledModel", loss: Loss, optimizer: Optimizer, batch: Sequence[Tensor],
                        options: TrainingOptions, lr: Optional[float] = None,
                        stand_ins: Collection[str] = ()) -> fx.GraphModule:
    """Trace one training step of ``cm`` for ``batch`` into a graph (no passes run yet).
    ``stand_ins``: frozen tensors that are meta here but real on every rank as shards (a sharded
    step's released weights): traced as fake tensors on the device of the others."""
    from torch.fx.experimental.proxy_tensor import make_fx

    was_training = cm.training
    cm.train(True)  # adapter dropout on in the graph the step is traced from (a lowered copy)
    try:
        src = lower_forward(cm.graph_module, options)
        head = find_head(src, cm._traced.out_spec, loss) if options.fuse_head_loss else None
        if head is not None:  # the logits are only the loss's input: never made in full
            src = without_logits(copy_graph(src), head)
    finally:
        cm.train(was_training)
    role_map = roles(src)
    param_names = [n for n, r in role_map.items() if r.trainable]
    if head is not None:
        loss = FusedHeadLoss(loss, head, param_names)
    const_names = [n for n, r in role_map.items() if not r.trainable]
    if not param_names:
        raise PlanError("the model has no trainable tensors: the plan selected no layer (see cm.explain())")
    n_in = sum(1 for n in src.graph.nodes if n.op == "placeholder")
    batch = list(batch)
    if len(batch) < n_in:
        raise PlanError(f"the batch has {len(batch)} tensors but the model takes {n_in} inputs: call "
                        "step(*model_inputs, *targets) with the inputs the model was compiled with")
    for i, t in enumerate(batch):
        if not isinstance(t, Tensor):
            raise PlanError(f"batch element {i} is a {type(t).__name__}; every batch element must be a tensor")
    num_targets = len(batch) - n_in
    k = options.accumulation_steps
    clip = options.clip_grad_norm
    state_names = optimizer.state_names(param_names)
    out_spec = cm._traced.out_spec
    params = [get_tensor(src, n).detach() for n in param_names]
    consts = [get_tensor(src, n).detach() for n in const_names]
    fake_mode = None
    if any(t.is_meta for n, t in zip(param_names + const_names, params + consts) if n not in stand_ins):
        # a model compiled on the meta device (its memory report): trace every tensor on meta,
        # real ones (buffers of accelerate.init_empty_weights, the batch) included, as fake
        # tensors must share one device
        from ..weights import retarget

        params, consts = [t.to("meta") for t in params], [t.to("meta") for t in consts]
        batch = [t.to("meta") if isinstance(t, Tensor) else t for t in batch]
        src = retarget(copy_graph(src), "meta", source=None, fake_values=False)
    elif any(t.is_meta for t in consts):
        fake_mode, consts = _fake_stand_ins(const_names, consts, params, stand_ins)
        params, batch = [fake_mode.from_tensor(t) for t in params], [_fake(fake_mode, t) for t in batch]
    state = optimizer.init_state(dict(zip(param_names, params)))
    lr_value = float(optimizer.lr if lr is None else lr)
    # methods with a step of their own after the optimizer's (SoRA's proximal L1 step)
    hooks = after_update_hooks(src, param_names)
    # a method's own post-update step (SoRA) runs per tensor, before the non-finite check
    own_steps = any(type(m).after_update is not AdapterMethod.after_update for m, _, _ in hooks.values())
    fuse_update = _fuse_update(options.fuse_optimizer, params) and not own_steps

    def run_model(tensors: dict[str, Tensor], inputs: Sequence[Tensor], micro: int) -> Any:
        flat = _FunctionalInterpreter(src, tensors, {"phase": "forward", "micro": micro}).run(*inputs)
        return pytree.tree_unflatten(list(flat), out_spec)

    def train_step(p_list: list[Tensor], c_list: list[Tensor], s_list: list[Tensor], lr_t: Tensor,
                   *batch_t: Tensor) -> tuple[Tensor, ...]:
        pdict = dict(zip(param_names, p_list))
        cdict = dict(zip(const_names, c_list))
        sdict = dict(zip(state_names, s_list))
        micro_inputs = _split_batch(batch_t[:n_in], k)
        micro_targets = _split_batch(batch_t[n_in:], k) if num_targets else [[] for _ in range(k)]
        weights: list[Any] = [1.0]
        if k > 1:
            with _annotate("accumulate"):
                raw = [loss.weight(mi, mt) for mi, mt in zip(micro_inputs, micro_targets)]
                total = raw[0]
                for w in raw[1:]:
                    total = total + w
                weights = [w / total for w in raw]
        grads: Optional[dict[str, Tensor]] = None
        loss_value: Optional[Tensor] = None
        for i, (mi, mt) in enumerate(zip(micro_inputs, micro_targets)):
            w = weights[i] if k > 1 else None

            def objective(trainable: dict[str, Tensor], mi: list = mi, mt: list = mt, i: int = i, w: Any = w) -> Any:
                outputs = run_model({**cdict, **trainable}, mi, i)
                if isinstance(loss, FusedHeadLoss):
                    loss.bind({**cdict, **trainable})
                with _annotate("loss", micro=i):
                    value = loss(outputs, mi, mt)
                    if value.dim() != 0:
                        raise PlanError(f"the loss must be a scalar, got shape {tuple(value.shape)}")
                    scaled = value * w if w is not None else value
                return scaled, scaled

            with _annotate("backward", micro=i):
                g, (_, scaled) = torch.func.grad_and_value(objective, has_aux=True)(pdict)
            for n in param_names:
                _tag_traced(g[n], GRAD_KEY, n)
            if grads is None:
                grads, loss_value = g, scaled
            else:
                with _annotate("accumulate", micro=i):
                    loss_value = loss_value + scaled
                    grads = {n: grads[n] + g[n] for n in param_names}
        assert grads is not None and loss_value is not None
        if clip is not None:
            with _annotate("clip"):
                norms = [torch.linalg.vector_norm(grads[n], 2.0) for n in param_names]
                total_norm = torch.linalg.vector_norm(torch.stack(norms), 2.0)
                coef = torch.clamp(float(clip) / (total_norm + 1e-6), max=1.0)
                grads = {n: grads[n] * coef for n in param_names}
        for n in param_names:
            _tag_traced(grads[n], FINAL_GRAD_KEY, n)
        flat_grads = _flat_grads(param_names, pdict, grads) if fuse_update else []
        finite = _finite_flag(loss_value, lr_t, [g for _, g in flat_grads] or [grads[n] for n in param_names])
        with _annotate("optimizer"):
            shared = optimizer.prepare(sdict, lr_t)
            (step_count,) = _keep_if(finite, [sdict[STEP_KEY]], [shared["step"]])
        if fuse_update:
            by_name, new_state = _update_fused(optimizer, pdict, flat_grads, sdict, shared, lr_t, finite)
            new_params = [by_name[n] for n in param_names]
        else:
            new_params, new_state = _update_each(optimizer, param_names, pdict, grads, sdict, shared, lr_t, finite,
                                                 hooks)
        new_state[STEP_KEY] = step_count
        with _annotate("check"):
            skipped = torch.logical_not(finite)
        return (loss_value, *new_params, *[new_state[s] for s in state_names], skipped)

    lr_example = torch.tensor(lr_value, dtype=torch.float32)
    example_state = [state[s] for s in state_names]
    if params and params[0].is_meta:  # a meta trace (above): every input on meta
        lr_example, example_state = lr_example.to("meta"), [t.to("meta") for t in example_state]
    elif fake_mode is not None:  # stand-ins (above): every input fake, in their mode
        lr_example, example_state = fake_mode.from_tensor(lr_example), [_fake(fake_mode, t) for t in example_state]
    was_training = cm.training
    cm.train(True)  # adapter dropout on in the training graph
    try:
        attention, table = _attention_tracing(options.fused_attention, params + consts)
        with fxt.preserve_node_meta(), attention:
            traced = make_fx(train_step, decomposition_table=table,
                             tracing_mode="fake")(params, consts, example_state, lr_example, *batch)
    except GraphPeftError:
        raise
    except Exception as e:
        raise TraceError(f"could not trace the training step: {type(e).__name__}: {str(e)[:1500]}. "
                         "Check that the loss takes the model's outputs and the batch's targets and "
                         "returns a scalar, and that the batch matches the compiled model's inputs.") from e
    finally:
        cm.train(was_training)

    # -- frozen tensors become get_attr nodes named by their paths; the rest keep stable names
    graph = traced.graph
    graph._codegen = fx.graph.CodeGen()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    n_p, n_c, n_s = len(param_names), len(const_names), len(state_names)
    if len(placeholders) != n_p + n_c + n_s + 1 + len(batch):
        raise TraceError(f"internal: traced graph has {len(placeholders)} inputs, expected "
                         f"{n_p + n_c + n_s + 1 + len(batch)}")
    root = torch.nn.Module()
    for name in const_names:
        attach_tensor(root, name, get_tensor(src, name), role_map[name])
    extra_consts: dict[str, Tensor] = {}
    for node in graph.nodes:  # constants make_fx lifted while tracing (e.g. torch.tensor(...))
        if node.op == "get_attr":
            value = getattr(traced, node.target)
            if isinstance(value, Tensor):
                attach_tensor(root, node.target, value, Role.BUFFER)
                extra_consts[node.target] = value
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for node, name in zip(placeholders[n_p:n_p + n_c], const_names):
        with graph.inserting_before(first_op):
            attr = graph.create_node("get_attr", name)  # (get_attr() warns: the root is built below)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    kept = placeholders[:n_p] + placeholders[n_p + n_c:]
    names = ([f"param_{i}" for i in range(n_p)] + [f"state_{i}" for i in range(n_s)] + ["lr"]
             + [f"batch_{i}" for i in range(len(batch))])
    for node, name in zip(kept, names):
        _rename(node, name)
    gm = fx.GraphModule(root, graph)
    rmap = roles(gm)
    for name in const_names:
        rmap[name] = role_map[name]
    for name in extra_consts:
        rmap[name] = Role.BUFFER

    # -- provenance and phases on every op
    for i, node in enumerate(gm.graph.nodes):
        node.meta[ORDER_KEY] = i
        if node.op == "get_attr":  # tensors read by the step (adapter constants included)
            node.meta[META_KEY] = Provenance(COMPILER_PASS_NAME, rule="input", origin=str(node.target),
                                             part="input").as_dict()
            continue
        if node.op != "call_function":
            continue
        custom = node.meta.get("custom") or {}
        origin = custom.get("src_origin") or _module_path(node)
        phase = custom.get("phase", "forward")
        prov = Provenance(COMPILER_PASS_NAME, rule=custom.get("src_rule", "") or phase, origin=origin,
                          adapter=custom.get("src_adapter", ""), part=phase).as_dict()
        if "param" in custom:
            prov["param"] = custom["param"]
        if "micro" in custom:
            prov["micro"] = custom["micro"]
        if custom.get(RECOMPUTE_KEY):
            prov["recompute"] = custom[RECOMPUTE_KEY]
        for key, tag in ((GRAD_KEY, "grad_of"), (FINAL_GRAD_KEY, "final_grad_of")):
            if key in node.meta:
                prov[tag] = list(node.meta.pop(key))
        node.meta[META_KEY] = prov

    # -- signature
    inputs = ([IOSpec.of("param", n, PARAM_IN + n, t) for n, t in zip(param_names, params)]
              + [IOSpec.of("state", s, STATE_IN + s, t) for s, t in zip(state_names, example_state)]
              + [IOSpec.of("lr", LR_NAME, LR_NAME, lr_example)]
              + [IOSpec.of("batch", str(i), f"{BATCH_IN}{i}", t) for i, t in enumerate(batch)])
    loss_val = next(n for n in gm.graph.nodes if n.op == "output").args[0][0].meta.get("val")
    outputs = ([IOSpec("loss", LOSS_NAME, LOSS_NAME, [], str(getattr(loss_val, "dtype", torch.float32)).replace("torch.", ""))]
               + [IOSpec.of("param", n, PARAM_OUT + n, t) for n, t in zip(param_names, params)]
               + [IOSpec.of("state", s, STATE_OUT + s, t) for s, t in zip(state_names, example_state)]
               + [IOSpec("skipped", SKIPPED_NAME, SKIPPED_NAME, [], "bool")])
    graph_meta(gm)[TRAINING_META] = TrainingSignature(
        inputs=inputs, outputs=outputs, params=param_names,
        param_roles={n: role_map[n].value for n in param_names}, state=state_names,
        num_model_inputs=n_in, num_targets=num_targets, optimizer=optimizer.to_dict(), loss=loss.name,
        lr=lr_value, accumulation_steps=k, clip_grad_norm=None if clip is None else float(clip),
        nonfinite=options.nonfinite)
    gm.recompile()
    return gm


def _fake_stand_ins(const_names: Sequence[str], consts: Sequence[Tensor], params: Sequence[Tensor],
                    stand_ins: Collection[str]) -> tuple[Any, list[Tensor]]:
    """A fake mode and the constants as its fake tensors: each meta stand-in on the device of
    the real tensors (its values are never read: the trace needs shapes, dtypes and strides)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)  # as make_fx's own fake tracing
    device = next((t.device for t in [*params, *consts] if not t.is_meta), torch.device("cpu"))
    out = []
    for name, t in zip(const_names, consts):
        if t.is_meta and name not in stand_ins:
            raise TraceError(f"internal: {name} is on the meta device but is no released weight")
        out.append(FakeTensor(mode, t, device) if t.is_meta else mode.from_tensor(t))
    return mode, out


def _fake(mode: Any, t: Any) -> Any:
    return mode.from_tensor(t) if isinstance(t, Tensor) else t


def _rename(node: fx.Node, name: str) -> None:
    try:
        node._rename(name)  # type: ignore[attr-defined]
        node.target = node.name
    except Exception:  # noqa: BLE001 - names are cosmetic
        pass


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    import re

    path = re.sub(r"^L\['self'\]\.?", "", str(path))
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")
