"""Tracing one training step (forward, pruned backward, optimizer update) into one fx graph:
:func:`trace_training_step`, the functional interpreter it differentiates through, and the
update forms (one update per tensor, or fused over 1 MiB chunks of the trainable tensors).

How the graph is made. The adapted graph is called functionally (an ``fx.Interpreter`` that
reads every tensor from an explicit dict) with the trainable tensors as explicit inputs;
``torch.func.grad_and_value`` differentiates the loss toward them only, so autograd never builds
a backward for frozen parts; a functional optimizer (:mod:`graphpeft.training.optim`) turns gradients
and state into new tensors; ``make_fx`` with the core ATen decomposition table traces all of it
into one graph. An adapter method may finish its tensors' update with a step of its own
(:meth:`~graphpeft.method.AdapterMethod.after_update`, e.g. SoRA's proximal L1 step on its
gates): it is traced right after the optimizer's update, so it is in the graph and in its ONNX
export too (:func:`apply_after_update` runs the same step in an eager ``torch.optim`` loop).
Every node is tagged with its phase (``forward``, ``loss``, ``backward``,
``accumulate``, ``clip``, ``optimizer``) in its provenance, which the training passes use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Optional, Sequence, Union

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


@dataclasses.dataclass
class _StepParts:
    """What the traced step function closes over: the lowered forward and the names and
    example tensors of its inputs (made by :func:`_step_parts`)."""

    src: fx.GraphModule
    loss: Loss
    role_map: dict[str, Role]
    param_names: list[str]
    const_names: list[str]
    state_names: list[str]
    n_in: int
    num_targets: int
    params: list[Tensor]
    consts: list[Tensor]
    batch: list[Any]
    out_spec: Any
    fake_mode: Any = None


def trace_training_step(cm: "CompiledModel", loss: Loss, optimizer: Optimizer, batch: Sequence[Tensor],
                        options: TrainingOptions, lr: Optional[float] = None,
                        stand_ins: Collection[str] = ()) -> fx.GraphModule:
    """Trace one training step of ``cm`` for ``batch`` into a graph (no passes run yet).
    ``stand_ins``: frozen tensors that are meta here but real on every rank as shards (a sharded
    step's released weights): traced as fake tensors on the device of the others."""
    parts = _step_parts(cm, loss, optimizer, batch, options, stand_ins)
    state = optimizer.init_state(dict(zip(parts.param_names, parts.params)))
    lr_value = float(optimizer.lr if lr is None else lr)
    lr_example = torch.tensor(lr_value, dtype=torch.float32)
    example_state = [state[s] for s in parts.state_names]
    if parts.params and parts.params[0].is_meta:  # a meta trace: every input on meta
        lr_example, example_state = lr_example.to("meta"), [t.to("meta") for t in example_state]
    elif parts.fake_mode is not None:  # stand-ins: every input fake, in their mode
        lr_example = parts.fake_mode.from_tensor(lr_example)
        example_state = [_fake(parts.fake_mode, t) for t in example_state]
    train_step = _step_function(parts, optimizer, options)
    traced = _trace(cm, train_step, options, parts.params + parts.consts,
                    (parts.params, parts.consts, example_state, lr_example, *parts.batch))
    gm = _lift_frozen_tensors(traced, parts)
    _tag_provenance(gm)
    graph_meta(gm)[TRAINING_META] = _signature(gm, parts, example_state, lr_example, optimizer, options, lr_value)
    gm.recompile()
    return gm


def _step_parts(cm: "CompiledModel", loss: Loss, optimizer: Optimizer, batch: Sequence[Tensor],
                options: TrainingOptions, stand_ins: Collection[str]) -> _StepParts:
    """The lowered forward (logits fused into the loss where they are only its input), the
    trainable and frozen tensors, and the example inputs on the device the trace runs on."""
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
    batch = _checked_batch(batch, n_in)
    parts = _StepParts(src, loss, role_map, param_names, const_names, optimizer.state_names(param_names), n_in,
                       len(batch) - n_in, [get_tensor(src, n).detach() for n in param_names],
                       [get_tensor(src, n).detach() for n in const_names], batch, cm._traced.out_spec)
    _place_examples(parts, stand_ins)
    return parts


def _checked_batch(batch: Sequence[Tensor], n_in: int) -> list[Tensor]:
    batch = list(batch)
    if len(batch) < n_in:
        raise PlanError(f"the batch has {len(batch)} tensors but the model takes {n_in} inputs: call "
                        "step(*model_inputs, *targets) with the inputs the model was compiled with")
    for i, t in enumerate(batch):
        if not isinstance(t, Tensor):
            raise PlanError(f"batch element {i} is a {type(t).__name__}; every batch element must be a tensor")
    return batch


def _place_examples(parts: _StepParts, stand_ins: Collection[str]) -> None:
    """Move the example tensors to where the trace runs: all on meta for a model compiled on the
    meta device (its memory report), or all fake when some frozen tensors are stand-ins."""
    names = parts.param_names + parts.const_names
    if any(t.is_meta for n, t in zip(names, parts.params + parts.consts) if n not in stand_ins):
        # real tensors beside meta ones (buffers of accelerate.init_empty_weights, the batch)
        # go to meta too: fake tensors must share one device
        from ..weights import retarget

        parts.params = [t.to("meta") for t in parts.params]
        parts.consts = [t.to("meta") for t in parts.consts]
        parts.batch = [t.to("meta") if isinstance(t, Tensor) else t for t in parts.batch]
        parts.src = retarget(copy_graph(parts.src), "meta", source=None, fake_values=False)
    elif any(t.is_meta for t in parts.consts):
        parts.fake_mode, parts.consts = _fake_stand_ins(parts.const_names, parts.consts, parts.params, stand_ins)
        parts.params = [parts.fake_mode.from_tensor(t) for t in parts.params]
        parts.batch = [_fake(parts.fake_mode, t) for t in parts.batch]


def _step_function(parts: _StepParts, optimizer: Optimizer, options: TrainingOptions) -> Callable[..., Any]:
    """The function ``make_fx`` traces: ``(params, consts, state, lr, *batch) -> (loss, *new
    params, *new state, skipped)``."""
    src, param_names = parts.src, parts.param_names
    # methods with a step of their own after the optimizer's (SoRA's proximal L1 step) run per
    # tensor, before the non-finite check
    hooks = after_update_hooks(src, param_names)
    own_steps = any(type(m).after_update is not AdapterMethod.after_update for m, _, _ in hooks.values())
    fuse_update = _fuse_update(options.fuse_optimizer, parts.params) and not own_steps

    def train_step(p_list: list[Tensor], c_list: list[Tensor], s_list: list[Tensor], lr_t: Tensor,
                   *batch_t: Tensor) -> tuple[Tensor, ...]:
        pdict = dict(zip(param_names, p_list))
        sdict = dict(zip(parts.state_names, s_list))
        loss_value, grads = _loss_and_grads(parts, dict(zip(parts.const_names, c_list)), pdict, batch_t,
                                            options.accumulation_steps)
        if options.clip_grad_norm is not None:
            grads = _clip(grads, param_names, float(options.clip_grad_norm))
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
        return (loss_value, *new_params, *[new_state[s] for s in parts.state_names], skipped)

    return train_step


def _loss_and_grads(parts: _StepParts, cdict: dict[str, Tensor], pdict: dict[str, Tensor],
                    batch_t: Sequence[Tensor], k: int) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss and the trainable tensors' gradients, accumulated over ``k`` micro-batches
    (each weighted by its share of the loss's elements)."""
    n_in, loss = parts.n_in, parts.loss
    micro_inputs = _split_batch(batch_t[:n_in], k)
    micro_targets = _split_batch(batch_t[n_in:], k) if parts.num_targets else [[] for _ in range(k)]
    weights: list[Any] = [None] * k
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
        objective = _objective(parts, cdict, mi, mt, i, weights[i])
        with _annotate("backward", micro=i):
            g, (_, scaled) = torch.func.grad_and_value(objective, has_aux=True)(pdict)
        for n in parts.param_names:
            _tag_traced(g[n], GRAD_KEY, n)
        if grads is None or loss_value is None:
            grads, loss_value = g, scaled
        else:
            with _annotate("accumulate", micro=i):
                loss_value = loss_value + scaled
                grads = {n: grads[n] + g[n] for n in parts.param_names}
    assert grads is not None and loss_value is not None
    return loss_value, grads


def _objective(parts: _StepParts, cdict: dict[str, Tensor], mi: Sequence[Tensor], mt: Sequence[Tensor], micro: int,
               weight: Any) -> Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]:
    """The (weighted) loss of one micro-batch as a function of the trainable tensors."""

    def objective(trainable: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        tensors = {**cdict, **trainable}
        flat = _FunctionalInterpreter(parts.src, tensors, {"phase": "forward", "micro": micro}).run(*mi)
        outputs = pytree.tree_unflatten(list(flat), parts.out_spec)
        if isinstance(parts.loss, FusedHeadLoss):
            parts.loss.bind(tensors)
        with _annotate("loss", micro=micro):
            value = parts.loss(outputs, mi, mt)
            if value.dim() != 0:
                raise PlanError(f"the loss must be a scalar, got shape {tuple(value.shape)}")
            scaled = value * weight if weight is not None else value
        return scaled, scaled

    return objective


def _clip(grads: dict[str, Tensor], names: Sequence[str], clip: float) -> dict[str, Tensor]:
    """``torch.nn.utils.clip_grad_norm_`` on the gradients, functionally."""
    with _annotate("clip"):
        norms = [torch.linalg.vector_norm(grads[n], 2.0) for n in names]
        total_norm = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        coef = torch.clamp(clip / (total_norm + 1e-6), max=1.0)
        return {n: grads[n] * coef for n in names}


def _trace(cm: "CompiledModel", train_step: Callable[..., Any], options: TrainingOptions, tensors: Sequence[Tensor],
           args: tuple) -> fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    was_training = cm.training
    cm.train(True)  # adapter dropout on in the training graph
    try:
        attention, table = _attention_tracing(options.fused_attention, tensors)
        with fxt.preserve_node_meta(), attention:
            return make_fx(train_step, decomposition_table=table, tracing_mode="fake")(*args)
    except GraphPeftError:
        raise
    except Exception as e:
        raise TraceError(f"could not trace the training step: {type(e).__name__}: {str(e)[:1500]}. "
                         "Check that the loss takes the model's outputs and the batch's targets and "
                         "returns a scalar, and that the batch matches the compiled model's inputs.") from e
    finally:
        cm.train(was_training)


def _lift_frozen_tensors(traced: fx.GraphModule, parts: _StepParts) -> fx.GraphModule:
    """Frozen tensors become ``get_attr`` nodes named by their paths (sharing the model's
    storage); the other inputs get stable names (``param_i``, ``state_i``, ``lr``, ``batch_i``)."""
    graph = traced.graph
    graph._codegen = fx.graph.CodeGen()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    n_p, n_c, n_s = len(parts.param_names), len(parts.const_names), len(parts.state_names)
    if len(placeholders) != n_p + n_c + n_s + 1 + len(parts.batch):
        raise TraceError(f"internal: traced graph has {len(placeholders)} inputs, expected "
                         f"{n_p + n_c + n_s + 1 + len(parts.batch)}")
    root = torch.nn.Module()
    for name in parts.const_names:
        attach_tensor(root, name, get_tensor(parts.src, name), parts.role_map[name])
    extra_consts: list[str] = []
    for node in graph.nodes:  # constants make_fx lifted while tracing (e.g. torch.tensor(...))
        if node.op == "get_attr" and isinstance(value := getattr(traced, node.target), Tensor):
            attach_tensor(root, node.target, value, Role.BUFFER)
            extra_consts.append(node.target)
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    for node, name in zip(placeholders[n_p:n_p + n_c], parts.const_names):
        with graph.inserting_before(first_op):
            attr = graph.create_node("get_attr", name)  # (get_attr() warns: the root is built below)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    kept = placeholders[:n_p] + placeholders[n_p + n_c:]
    names = ([f"param_{i}" for i in range(n_p)] + [f"state_{i}" for i in range(n_s)] + ["lr"]
             + [f"batch_{i}" for i in range(len(parts.batch))])
    for node, name in zip(kept, names):
        _rename(node, name)
    gm = fx.GraphModule(root, graph)
    rmap = roles(gm)
    for name in parts.const_names:
        rmap[name] = parts.role_map[name]
    for name in extra_consts:
        rmap[name] = Role.BUFFER
    return gm


def _tag_provenance(gm: fx.GraphModule) -> None:
    """Provenance with a phase (and the trace order) on every node of the traced step."""
    for i, node in enumerate(gm.graph.nodes):
        node.meta[ORDER_KEY] = i
        if node.op == "get_attr":  # tensors read by the step (adapter constants included)
            node.meta[META_KEY] = Provenance(COMPILER_PASS_NAME, rule="input", origin=str(node.target),
                                             part="input").as_dict()
        elif node.op == "call_function":
            node.meta[META_KEY] = _op_provenance(node)


def _op_provenance(node: fx.Node) -> dict[str, Any]:
    custom = node.meta.get("custom") or {}
    phase = custom.get("phase", "forward")
    prov = Provenance(COMPILER_PASS_NAME, rule=custom.get("src_rule", "") or phase,
                      origin=custom.get("src_origin") or _module_path(node), adapter=custom.get("src_adapter", ""),
                      part=phase).as_dict()
    for key in ("param", "micro"):
        if key in custom:
            prov[key] = custom[key]
    if custom.get(RECOMPUTE_KEY):
        prov["recompute"] = custom[RECOMPUTE_KEY]
    for key, tag in ((GRAD_KEY, "grad_of"), (FINAL_GRAD_KEY, "final_grad_of")):
        if key in node.meta:
            prov[tag] = list(node.meta.pop(key))
    return prov


def _signature(gm: fx.GraphModule, parts: _StepParts, example_state: Sequence[Tensor], lr_example: Tensor,
               optimizer: Optimizer, options: TrainingOptions, lr_value: float) -> TrainingSignature:
    """The step's inputs and outputs with their stable (ONNX) names, shapes and dtypes."""
    pairs = list(zip(parts.param_names, parts.params))
    state = list(zip(parts.state_names, example_state))
    inputs = ([IOSpec.of("param", n, PARAM_IN + n, t) for n, t in pairs]
              + [IOSpec.of("state", s, STATE_IN + s, t) for s, t in state]
              + [IOSpec.of("lr", LR_NAME, LR_NAME, lr_example)]
              + [IOSpec.of("batch", str(i), f"{BATCH_IN}{i}", t) for i, t in enumerate(parts.batch)])
    loss_val = next(n for n in gm.graph.nodes if n.op == "output").args[0][0].meta.get("val")
    loss_dtype = str(getattr(loss_val, "dtype", torch.float32)).replace("torch.", "")
    outputs = ([IOSpec("loss", LOSS_NAME, LOSS_NAME, [], loss_dtype)]
               + [IOSpec.of("param", n, PARAM_OUT + n, t) for n, t in pairs]
               + [IOSpec.of("state", s, STATE_OUT + s, t) for s, t in state]
               + [IOSpec("skipped", SKIPPED_NAME, SKIPPED_NAME, [], "bool")])
    clip = options.clip_grad_norm
    return TrainingSignature(
        inputs=inputs, outputs=outputs, params=parts.param_names,
        param_roles={n: parts.role_map[n].value for n in parts.param_names}, state=parts.state_names,
        num_model_inputs=parts.n_in, num_targets=parts.num_targets, optimizer=optimizer.to_dict(),
        loss=parts.loss.name, lr=lr_value, accumulation_steps=options.accumulation_steps,
        clip_grad_norm=None if clip is None else float(clip), nonfinite=options.nonfinite)


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
