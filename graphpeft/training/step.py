"""The training-step compiler: forward, pruned backward and optimizer update as ONE fx graph.

    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3, weight_decay=0.01))
    for batch in data:
        loss = step(*batch)              # trains cm through the compiled graph
    step.export_onnx("train.onnx")       # the same step for plain onnxruntime

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

The graph's signature (flat, in this order)::

    inputs:  trainable tensors..., optimizer state..., lr, batch...
    outputs: loss, updated trainable tensors..., updated optimizer state...

Frozen weights and buffers are ``get_attr`` nodes named by their original paths (the IR
convention), sharing storage with the compiled model. The trainable tensors and the state have
stable names (:class:`TrainingSignature`), which the ONNX export uses for its inputs/outputs.

Shapes are static: a step is compiled for the shapes of the batch it is first given (or
``example_batch``); a batch of other shapes compiles (and caches) another graph.
"""

from __future__ import annotations

import dataclasses
import contextlib
import gc
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.fx.traceback as fxt
from torch.utils import _pytree as pytree

from ..errors import GraphPeftError, NonFiniteError, PlanError, TraceError, VerificationError, WeightsError
from ..graph import META_KEY, Provenance, Role, adapters, attach_tensor, get_tensor, graph_meta, roles
from ..infra import PassContext, PassHook, PassManager, Pipeline, TimingHook, copy_graph
from .losses import Loss, LossSpec, make_loss
from .head_loss import FusedHeadLoss, find_head, without_logits
from .optim import STEP_KEY, Optimizer, make_optimizer
from .runner import TensorRefs, native_runner
from .distributed import (COMMUNICATION_META, SHARD_SUFFIX, CommunicationReport, ProcessGroupInfo, barrier, broadcast_from_rank0,
                          check_same_frozen, data_parallel_graph, held_frozen_bytes, is_main_process, process_group,
                          release_whole_weights)
from ..registry import PASSES, get_backend, get_method, load_plugins

from ..method import AdapterMethod

if TYPE_CHECKING:
    from .backward_report import BackwardReport
    from ..compiled import CompiledModel

log = logging.getLogger(__name__)

Tensor = torch.Tensor

#: the training passes run by default, in order (names in ``graphpeft.registry.PASSES``)
DEFAULT_TRAINING_PASSES: tuple[str, ...] = (
    "simplify_algebra",
    "eliminate_common_subexpressions",
    "use_causal_attention",  # before dead code: the constant causal mask's ops die
    "remove_dead_code",
    "check_gradient_flow",
    "reorder_updates",
    "rematerialize_dequantized",  # quantized bases (gp.Quantize): dequantize again in the backward
    "plan_memory",
)

#: forward lowering run on a copy of the adapted graph before the step is traced (names in
#: ``PASSES``): autograd then differentiates the cheaper forward (``passes/lower/``)
DEFAULT_FORWARD_LOWERING: tuple[str, ...] = (
    "fold_linear_scale",
    "merge_low_rank_branch",  # before the fusion: it reads each A factor on its own
    "fuse_shared_input_linears",
)
#: the forward lowering of an inference export (no op with a training-only backward)
INFERENCE_FORWARD_LOWERING: tuple[str, ...] = ("fold_linear_scale", "fuse_shared_input_linears")

#: phases of a training graph, in the order they are traced
PHASES = ("input", "forward", "loss", "backward", "accumulate", "clip", "optimizer", "check",
          "communicate")  # communicate: data-parallel collectives (passes/training/allreduce_gradients.py)
#: phases that make up the update (what ``reorder_updates`` moves next to the gradients)
UPDATE_PHASES = ("accumulate", "clip", "optimizer")

TRAINING_META = "training"
ORDER_KEY = "graphpeft_trace_order"
COMPILER_PASS_NAME = "compile_training"

# ONNX-facing names of the graph's inputs and outputs
PARAM_IN, PARAM_OUT, STATE_IN, STATE_OUT, LR_NAME, LOSS_NAME = "param/", "param_out/", "state/", "state_out/", "lr", "loss"
#: the last output of a training graph: true when the step was skipped (non-finite loss, gradient or lr)
SKIPPED_NAME = "skipped"
#: what TrainingOptions.nonfinite may say
NONFINITE = ("skip", "raise")
BATCH_IN = "batch/"


# --- signature ------------------------------------------------------------------------------


@dataclasses.dataclass
class IOSpec:
    """One input or output of the training graph."""

    kind: str  # "param" | "state" | "lr" | "batch" | "loss"
    key: str  # parameter name, state key, "lr", batch index, "loss"
    name: str  # stable external (ONNX) name
    shape: list[int]
    dtype: str

    @staticmethod
    def of(kind: str, key: str, name: str, t: Tensor) -> "IOSpec":
        return IOSpec(kind, key, name, [int(s) for s in t.shape], str(t.dtype).replace("torch.", ""))


@dataclasses.dataclass
class TrainingSignature:
    """What the training graph takes and returns, with stable names; stored in ``gm.meta``
    and in exported files."""

    inputs: list[IOSpec]
    outputs: list[IOSpec]
    params: list[str]
    param_roles: dict[str, str]
    state: list[str]
    num_model_inputs: int
    num_targets: int
    optimizer: dict[str, Any]
    loss: str
    lr: float
    accumulation_steps: int = 1
    clip_grad_norm: Optional[float] = None
    #: what a step with a non-finite loss, gradient or lr does (it is skipped in the graph either
    #: way; "raise" also raises after it): see TrainingOptions.nonfinite
    nonfinite: str = "skip"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "TrainingSignature":
        data = dict(data)
        data["inputs"] = [IOSpec(**d) for d in data["inputs"]]
        data["outputs"] = [IOSpec(**d) for d in data["outputs"]]
        return TrainingSignature(**data)


def signature_of(gm: fx.GraphModule) -> TrainingSignature:
    """The :class:`TrainingSignature` of a training graph (raises if ``gm`` is not one)."""
    sig = graph_meta(gm).get(TRAINING_META)
    if sig is None:
        raise VerificationError("this graph is not a training-step graph (no training signature in its meta)")
    return sig


def phase_of(node: fx.Node) -> str:
    """The phase of a node of a training graph (``"input"`` for placeholders and tensors)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return "input" if node.op != "output" else "output"
    prov = node.meta.get(META_KEY) or {}
    return prov.get("part") or "forward"


# --- memory report (filled by the plan_memory pass) -------------------------------------------

MEMORY_CATEGORIES = ("weights", "activations", "gradients", "optimizer_state")


@dataclasses.dataclass
class MemoryReport:
    """Static memory plan of a training graph: liveness in graph order -> peak bytes.

    ``at_peak`` splits the peak by category (weights: frozen and trainable tensors, old and
    updated; activations: batch and forward values; gradients: backward values; optimizer
    state: state in and out plus update temporaries). ``category_peaks`` is each category's own
    maximum over the step, ``totals`` the bytes of the graph's inputs by category, and
    ``trace_order_peak_bytes`` the peak of the same graph in the order it was traced (before
    ``reorder_updates``).
    """

    peak_bytes: int
    peak_node: str
    at_peak: dict[str, int]
    category_peaks: dict[str, int]
    totals: dict[str, int]
    trace_order_peak_bytes: Optional[int]
    num_nodes: int
    #: live bytes after each node, in graph order (for plots)
    timeline: list[int] = dataclasses.field(default_factory=list, repr=False)
    #: live bytes per category after each node (``timeline`` split by :data:`MEMORY_CATEGORIES`)
    timeline_by_category: dict[str, list[int]] = dataclasses.field(default_factory=dict, repr=False)
    #: the node names of the timeline's positions
    node_names: list[str] = dataclasses.field(default_factory=list, repr=False)
    #: measured by the ``measure_memory`` pass (``memory_report(measure=True)``): the peak of live
    #: tensor-storage bytes while the torch executor runs the graph once, where, and per node
    measured_peak_bytes: Optional[int] = None
    measured_peak_node: str = ""
    measured_timeline: list[int] = dataclasses.field(default_factory=list, repr=False)
    #: the planned peak before the ``schedule_memory`` pass reordered the graph (None: it did not run)
    unscheduled_peak_bytes: Optional[int] = None
    #: ``memory_budget`` of the step (None: no budget) and what ``rematerialize`` did to meet it:
    #: the planned peak before, and the forward values now recomputed in the backward
    memory_budget: Optional[int] = None
    peak_before_remat_bytes: Optional[int] = None
    recomputed: list[str] = dataclasses.field(default_factory=list)

    @property
    def plan_vs_measured(self) -> Optional[float]:
        """Planned peak / measured peak (None until measured)."""
        if not self.measured_peak_bytes:
            return None
        return self.peak_bytes / self.measured_peak_bytes

    def plot(self, path: Union[str, os.PathLike], title: Optional[str] = None) -> None:
        """Draw the memory timeline to an image file (``step.memory_report().plot("timeline.png")``):
        live bytes by category over the schedule (stacked), the peak, the measured live bytes if
        measured, and the budget if any. Needs matplotlib (``pip install graphpeft[bench]``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise GraphPeftError("MemoryReport.plot needs matplotlib: pip install matplotlib "
                                 "(or graphpeft[bench])") from e
        mib = 1 / (1 << 20)
        fig, ax = plt.subplots(figsize=(10, 4.5))
        xs = list(range(len(self.timeline)))
        cats = [c for c in MEMORY_CATEGORIES if self.timeline_by_category.get(c)]
        if cats:
            ax.stackplot(xs, *[[v * mib for v in self.timeline_by_category[c]] for c in cats],
                         labels=[c.replace("_", " ") for c in cats], alpha=0.8)
        else:
            ax.plot(xs, [v * mib for v in self.timeline], label="planned")
        if self.measured_timeline:
            ax.plot(list(range(len(self.measured_timeline))), [v * mib for v in self.measured_timeline],
                    color="black", linewidth=0.8, linestyle="--", label="measured (torch)")
        peak_x = self.node_names.index(self.peak_node) if self.peak_node in self.node_names else None
        ax.axhline(self.peak_bytes * mib, color="red", linewidth=0.8)
        ax.annotate(f"peak {self.peak_bytes * mib:.1f} MiB", (peak_x or 0, self.peak_bytes * mib),
                    textcoords="offset points", xytext=(4, 4), color="red", fontsize=8)
        if self.memory_budget is not None:
            ax.axhline(self.memory_budget * mib, color="purple", linestyle=":", label="budget")
        ax.set_xlabel("op (schedule order)")
        ax.set_ylabel("live MiB")
        ax.set_title(title or f"training-step memory ({self.num_nodes} nodes)")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)
        plt.close(fig)

    def __str__(self) -> str:
        mib = 1 / (1 << 20)
        lines = [f"training-step memory plan ({self.num_nodes} nodes)",
                 f"  peak {self.peak_bytes * mib:10.3f} MiB at {self.peak_node}"]
        if self.trace_order_peak_bytes is not None:
            lines.append(f"  peak in trace order (no reordering) {self.trace_order_peak_bytes * mib:10.3f} MiB")
        if self.unscheduled_peak_bytes is not None:
            lines.append(f"  peak before schedule_memory {self.unscheduled_peak_bytes * mib:10.3f} MiB")
        if self.memory_budget is not None:
            lines.append(f"  budget {self.memory_budget * mib:10.3f} MiB; peak before rematerialization "
                         f"{(self.peak_before_remat_bytes or self.peak_bytes) * mib:10.3f} MiB; "
                         f"{len(self.recomputed)} forward values recomputed in the backward")
        if self.measured_peak_bytes is not None:
            lines.append(f"  measured peak (torch executor, live tensor storage) {self.measured_peak_bytes * mib:10.3f} MiB"
                         f" at {self.measured_peak_node}; plan / measured = {self.plan_vs_measured:.3f}")
        lines.append(f"  {'category':16s} {'at peak MiB':>12s} {'own peak MiB':>13s} {'inputs MiB':>11s}")
        for c in MEMORY_CATEGORIES:
            lines.append(f"  {c:16s} {self.at_peak.get(c, 0) * mib:12.3f} {self.category_peaks.get(c, 0) * mib:13.3f} "
                         f"{self.totals.get(c, 0) * mib:11.3f}")
        return "\n".join(lines)


#: what ``memory_budget`` adds to the training passes, before ``plan_memory``
MEMORY_BUDGET_PASSES: tuple[str, ...] = ("rematerialize", "schedule_memory")


def with_memory_budget_passes(names: Sequence[str]) -> list[str]:
    """``names`` with :data:`MEMORY_BUDGET_PASSES` added before ``plan_memory`` (or at the end)."""
    names = list(names)
    for extra in MEMORY_BUDGET_PASSES:
        if extra not in names:
            at = names.index("plan_memory") if "plan_memory" in names else len(names)
            names.insert(at, extra)
    return names


# --- options ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingOptions:
    """Options of :func:`compile_training`.

    Args:
        accumulation_steps: split each batch (along dim 0) into this many micro-batches, run
            forward and backward on each in turn inside the graph and update once with the
            accumulated gradient; equals the big batch's gradient.
        clip_grad_norm: clip gradients to this global L2 norm (``torch.nn.utils.clip_grad_norm_``).
        passes: names of the training passes to run (default :data:`DEFAULT_TRAINING_PASSES`).
        lowering: names of the forward lowering passes run on a copy of the adapted graph before
            the step is traced (default :data:`DEFAULT_FORWARD_LOWERING`; ``()`` for none).
        verify: run the verifier after every pass.
        hooks: pass instrumentation (``TimingHook``, ``IRDumpHook``).
        example_batch: a batch to compile for at once. By default the step compiles for the
            model's example inputs (plus targets shaped by a named loss); with a user loss
            callable, the first call compiles.
        executor: what runs the finished graph in PyTorch. ``None`` (default) runs the fx
            graph's ATen ops one by one through PyTorch's Python bindings
            (:mod:`graphpeft.training.runner`: bit-identical, less dispatch per node);
            ``"fx"`` runs the ``fx.GraphModule`` itself; ``"inductor"`` hands it to
            ``torch.compile`` (fused kernels: on an H100 the compiled LoRA step ran 0.41× the
            time of peft eager, the plain graph 1.64×, ``python -m benchmarks.gpu_step``; the
            first call per batch shape compiles, tens of seconds); or any callable taking the
            graph module and returning a callable with the same inputs and outputs. The
            exported (ONNX) step is the same graph either way.
        memory_budget: bytes the step's planned peak (``step.memory_report().peak_bytes``) must
            not exceed. When the plain graph exceeds it, the ``rematerialize`` pass recomputes
            cheap forward values in the backward instead of keeping them (a min-cut over the
            graph; random, matrix-multiply and convolution ops are never recomputed) and
            ``schedule_memory`` reorders; a budget that cannot be met raises
            :class:`~graphpeft.errors.GraphPeftError` naming the smallest feasible one.
        fuse_head_loss: when the logits are an output projection read only by the built-in
            ``causal_lm`` / ``cross_entropy`` loss, compute projection, loss and their gradients
            chunk by chunk (``graphpeft.training.head_loss``): no full logits tensor exists.
        fused_attention: keep a float32 CPU model's attention (``F.scaled_dot_product_attention``)
            and its backward as the fused CPU kernels in the step graph, which the torch
            executor and inductor run; ONNX and ExecuTorch exports rewrite them into math
            (``passes/legalize/decompose_attention.py``). ``False`` traces the math form.
        fuse_optimizer: update the trainable tensors on their concatenation, a chunk of
            :data:`FUSED_CHUNK_BYTES` at a time (a dozen ops per chunk instead of a dozen per
            tensor; the same numbers); ``"auto"`` (default) does when the trainable tensors take
            at most :data:`FUSED_UPDATE_MAX_BYTES` (adapters), ``False`` keeps one update per
            tensor. Either way the updates run once the finite flag (every gradient) exists.
        nonfinite: a step whose loss, any gradient or the learning rate is NaN or infinite
            leaves the trainable tensors and the optimizer state unchanged (a ``where`` on a
            finite flag inside the graph, so the exported step does the same) and is counted
            in ``step.skipped_steps`` (``OnnxTrainer.skipped_steps``); ``"skip"`` (default)
            goes on, ``"raise"`` raises :class:`~graphpeft.errors.NonFiniteError` after it.
        data_parallel: train data-parallel in the initialized ``torch.distributed`` process group
            (launch with ``torchrun``; gloo on CPU, nccl on GPU): each rank calls the step on its
            part of the batch; the graph all-reduces the trainable tensors' gradients (only
            those) and the loss, so every rank applies the same averaged update and gets the
            global mean loss (the mean of the ranks' mean losses: the whole batch's mean when
            the ranks' batches hold equally many loss elements). Rank 0's trainable tensors and
            optimizer state are broadcast before the first step; frozen weights must already
            agree (checked). Exports write the single-device graph. See
            :mod:`graphpeft.training.distributed`.
        bucket_cap_mb: with ``data_parallel``, the most gradient MiB one all-reduce carries
            (gradients are bucketed in the order the backward produces them; DDP's default 25).
        shard_frozen: with ``data_parallel``, the graph that runs stores only this rank's
            ``1/world`` of every frozen floating-point weight and all-gathers a weight right
            before its forward and backward uses (FSDP-style; the same numbers). As each
            weight is sharded (when the first step builds that graph, after the ranks' weights
            were compared) its whole tensor is released from the compiled model and the
            single-device graphs, so the process keeps ``1/world`` of
            them (when nothing else, e.g. the original ``nn.Module``, holds them): the model's
            own forward and exports then need ``cm.load_base_weights`` again (other batch
            shapes train on the same shards). Compiled on meta, ``step.load_base_weights``
            reads only this rank's shards. ``"keep"``: shard, but keep the whole weights
            (exports; no memory saved).
    """

    accumulation_steps: int = 1
    clip_grad_norm: Optional[float] = None
    passes: Optional[Sequence[str]] = None
    lowering: Optional[Sequence[str]] = None
    verify: bool = True
    hooks: Sequence[PassHook] = ()
    example_batch: Optional[Sequence[Tensor]] = None
    executor: Union[None, str, Callable[[fx.GraphModule], Callable[..., Any]]] = None
    memory_budget: Optional[int] = None
    nonfinite: str = "skip"
    fuse_optimizer: Union[bool, str] = "auto"
    fuse_head_loss: bool = True
    fused_attention: bool = True
    data_parallel: bool = False
    bucket_cap_mb: float = 25.0
    shard_frozen: Union[bool, str] = False

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE:
            raise PlanError(f"nonfinite must be one of {list(NONFINITE)}, got {self.nonfinite!r}")
        if self.fuse_optimizer not in (True, False, "auto"):
            raise PlanError(f"fuse_optimizer must be True, False or 'auto', got {self.fuse_optimizer!r}")
        if self.memory_budget is not None and (isinstance(self.memory_budget, bool)
                                               or not isinstance(self.memory_budget, (int, float))
                                               or not self.memory_budget > 0):
            raise PlanError(f"memory_budget must be a positive number of bytes (or None), got {self.memory_budget!r}")
        if isinstance(self.executor, str) and self.executor not in EXECUTORS:
            raise PlanError(f"executor must be one of {sorted(EXECUTORS)} or a callable, got {self.executor!r}")
        if not isinstance(self.accumulation_steps, int) or self.accumulation_steps < 1:
            raise PlanError(f"accumulation_steps must be a positive integer, got {self.accumulation_steps!r}")
        if self.clip_grad_norm is not None and not float(self.clip_grad_norm) > 0:
            raise PlanError(f"clip_grad_norm must be > 0 (or None), got {self.clip_grad_norm!r}")
        if not isinstance(self.data_parallel, bool):
            raise PlanError(f"data_parallel must be True or False, got {self.data_parallel!r}")
        if isinstance(self.bucket_cap_mb, bool) or not isinstance(self.bucket_cap_mb, (int, float)) \
                or not self.bucket_cap_mb > 0:
            raise PlanError(f"bucket_cap_mb must be a positive number of MiB, got {self.bucket_cap_mb!r}")
        if self.shard_frozen not in (False, True, "keep"):
            raise PlanError(f"shard_frozen must be True, False or 'keep', got {self.shard_frozen!r}")
        if self.shard_frozen and not self.data_parallel:
            raise PlanError("shard_frozen=True shards frozen weights across data-parallel ranks: "
                            "compile with data_parallel=True too")


def _inductor(gm: fx.GraphModule) -> Callable[..., Any]:
    return torch.compile(gm, dynamic=False)


#: named executors of :attr:`TrainingOptions.executor`
EXECUTORS: dict[str, Callable[[fx.GraphModule], Callable[..., Any]]] = {"inductor": _inductor,
                                                                    "fx": lambda gm: gm}


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


# --- verification --------------------------------------------------------------------------------


def verify_training(gm: fx.GraphModule) -> None:
    """The verifier for training graphs: graph lint and role invariants, plus the signature
    (inputs and outputs agree with it in number, shape and dtype), no trainable tensor stored
    in the graph, and provenance with a phase on every op."""
    from ..verify import verify

    verify(gm, check_shapes=False)
    sig = signature_of(gm)
    problems: list[str] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    for what, nodes, specs in (("input", placeholders, sig.inputs), ("output", list(outputs), sig.outputs)):
        if len(nodes) != len(specs):
            problems.append(f"the graph has {len(nodes)} {what}s, its signature {len(specs)}")
            continue
        for node, spec in zip(nodes, specs):
            v = node.meta.get("val") if isinstance(node, fx.Node) else None
            if isinstance(v, Tensor) and ([int(s) for s in v.shape] != spec.shape
                                          or str(v.dtype).replace("torch.", "") != spec.dtype):
                problems.append(f"{what} {spec.name} is {v.dtype}{list(v.shape)}, its signature says "
                                f"{spec.dtype}{spec.shape}")
    for name, role in roles(gm).items():
        if role.trainable:
            problems.append(f"trainable tensor {name} is stored in the graph; it must be an input")
    for node in gm.graph.nodes:
        if node.op == "call_function" and not (node.meta.get(META_KEY) or {}).get("part"):
            problems.append(f"node {node.name} has no provenance/phase")
    if problems:
        raise VerificationError("; ".join(problems[:20]))


# --- checkpoints ---------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "graphpeft-training-state"


def _signature_digest(sig: TrainingSignature) -> str:
    import hashlib
    import json

    data = {"params": [[s.key, s.shape, s.dtype] for s in sig.inputs if s.kind == "param"],
            "state": [[s.key, s.shape, s.dtype] for s in sig.inputs if s.kind == "state"],
            "optimizer": sig.optimizer}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def save_training_state(path: Union[str, os.PathLike], state: Mapping[str, Any],
                        signature: Optional[TrainingSignature] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write a training state (``{"params", "optimizer", "lr"}``) to one safetensors file,
    atomically (temporary file, fsync, rename). ``signature`` records what it fits."""
    import json

    from safetensors.torch import save

    from ..paths import atomic_write

    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in state["params"].items()}
    tensors.update({f"state/{k}": v.detach().cpu().contiguous() for k, v in state["optimizer"].items()})
    meta = {"format": CHECKPOINT_FORMAT, "lr": repr(float(state.get("lr", 0.0))),
            "extra": json.dumps(dict(extra or {}))}
    if signature is not None:
        meta["signature_sha256"] = _signature_digest(signature)
    from ..paths import check_output_file

    path = check_output_file(path, "save_checkpoint", GraphPeftError)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.abspath(path), save(tensors, metadata=meta))


def load_training_state(path: Union[str, os.PathLike], signature: Optional[TrainingSignature] = None
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a file written by :func:`save_training_state`: ``(state, extra)``. Raises
    :class:`~graphpeft.errors.GraphPeftError` if it is not one or does not fit ``signature``."""
    import json

    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GraphPeftError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise GraphPeftError(f"checkpoint {path} is corrupted or not a safetensors file ({e})") from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise GraphPeftError(f"{path} is not a graphpeft training checkpoint")
    if signature is not None and meta.get("signature_sha256") not in (None, _signature_digest(signature)):
        raise GraphPeftError(f"checkpoint {path} was written for another training step (different trainable "
                             "tensors, shapes or optimizer): resume with the step it was saved from")
    state = {"params": {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")},
             "optimizer": {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")},
             "lr": float(meta.get("lr", "0"))}
    return state, json.loads(meta.get("extra", "{}"))


class TrainerCheckpoints:
    """Checkpoint methods shared by the runtime trainers (``OnnxTrainer``, ``ExecuTorchTrainer``):
    a trainer provides ``signature``, ``steps``, ``state_dict()`` and ``load_state_dict()``; the
    files are :func:`save_training_state`'s, so torch, onnxruntime and ExecuTorch resume each
    other's."""

    signature: TrainingSignature
    steps: int

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trained tensors under the model's (PEFT) key names: load them with
        ``cm.load_adapter_state_dict``."""
        return self.state_dict()["params"]

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write parameters, optimizer state, lr and step count to ``path`` (safetensors, atomic)."""
        save_training_state(path, self.state_dict(), signature=self.signature, extra={"steps": self.steps})

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Resume from a checkpoint written by :meth:`save_checkpoint` (or by a ``TrainingStep``
        or another runtime's trainer)."""
        state, extra = load_training_state(path, signature=self.signature)
        self.load_state_dict(state)
        self.steps = int(extra.get("steps", 0))

    @classmethod
    def resume(cls, path: Union[str, os.PathLike], checkpoint: Union[str, os.PathLike], **kwargs: Any) -> Any:
        """A trainer for ``path`` that continues from ``checkpoint``."""
        trainer = cls(path, **kwargs)  # type: ignore[call-arg]
        trainer.load_checkpoint(checkpoint)
        return trainer


# --- the step -----------------------------------------------------------------------------------


def _batch_key(batch: Sequence[Any]) -> tuple:
    # the device is part of the key: a step traced on the meta device (a model compiled without
    # weights, for its memory report) is traced again for real tensors once weights are loaded
    return tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, Tensor) else (type(t).__name__,)
                 for t in batch)


def _on_meta(cm: "CompiledModel") -> bool:
    """Whether ``cm`` holds tensors on the meta device (compiled without weights); whole weights
    a sharded data-parallel step released (or read as shards only) do not count."""
    released = cm.__dict__.get("_released_weights", set())
    gm = cm.graph_module
    return any(t.is_meta and n not in released for n, t in (*gm.named_parameters(), *gm.named_buffers()))


class TrainingStep:
    """One compiled training step of a :class:`~graphpeft.compiled.CompiledModel`.

    Call it with a batch (the model's inputs, then the targets): it runs the compiled graph,
    writes the updated trainable tensors back into the model (in place) and keeps the optimizer
    state. ``lr`` may be changed between steps (it is a graph input).

    Attributes:
        graph_module: the training graph for the first compiled batch shape.
        signature: its :class:`TrainingSignature`.
        timings: seconds per compile phase (``trace``, each pass, ``total``).
    """

    def __init__(self, cm: "CompiledModel", loss: LossSpec, optimizer: Union[Optimizer, str, Mapping[str, Any]],
                 options: Optional[TrainingOptions] = None) -> None:
        load_plugins()
        self.cm = cm
        self.loss = make_loss(loss)
        self.optimizer = make_optimizer(optimizer)
        self.options = options or TrainingOptions()
        self.lr: float = float(self.optimizer.lr)
        self.param_names = [n for n, r in roles(cm.graph_module).items() if r.trainable]
        self._state = self.optimizer.init_state({n: get_tensor(cm.graph_module, n) for n in self.param_names})
        self._graphs: dict[tuple, fx.GraphModule] = {}
        self._runners: dict[tuple, Callable[..., Any]] = {}  # per batch shape: what runs the graph
        self._main: Optional[fx.GraphModule] = None
        self.timings: dict[str, float] = {}
        self.ctx: Optional[PassContext] = None
        #: steps skipped because the loss, a gradient or the lr was not finite (tensors unchanged)
        self.skipped_steps = 0
        # data parallelism: the process group, the graphs with collectives (per batch shape), and
        # whether rank 0's tensors were broadcast yet
        self._dp: Optional[ProcessGroupInfo] = process_group() if self.options.data_parallel else None
        self._dp_graphs: dict[tuple, fx.GraphModule] = {}
        self._dp_synced = False
        #: frozen weights released after sharding (``shard_frozen=True``)
        self._released: set[str] = set()
        self._released_bytes = 0
        #: this rank's shard of each sharded frozen weight (read by a sharded load, or stored by
        #: the first sharded graph): every batch shape's sharded graph shares them
        self._shards: dict[str, Tensor] = {}
        batch = self.options.example_batch
        if batch is None:
            batch = self._default_batch()
        if batch is not None:
            self.compile(*batch)

    def _default_batch(self) -> Optional[list[Tensor]]:
        """The model's example inputs plus targets shaped by a named loss (None if unknown)."""
        inputs = list(self.cm.example_inputs)
        if not inputs:
            return None
        if _on_meta(self.cm):
            inputs = [t.to("meta") for t in inputs]
        with torch.no_grad():
            flat = self.cm.graph_module(*inputs)
        outputs = pytree.tree_unflatten(list(flat), self.cm._traced.out_spec)
        try:
            targets = self.loss.example_targets(outputs, inputs)
        except GraphPeftError:
            return None
        return None if targets is None else inputs + list(targets)

    # -- compiling -------------------------------------------------------------------------------

    def compile(self, *batch: Tensor) -> fx.GraphModule:
        """Compile (or fetch from the cache) the graph for this batch's shapes."""
        if _on_meta(self.cm):  # no weights yet: the step is traced (and cached) for meta tensors
            batch = tuple(t.to("meta") if isinstance(t, Tensor) else t for t in batch)
        key = _batch_key(batch)
        if key in self._graphs:
            return self._graphs[key]
        n_in = len(self.cm._input_specs())
        if len(batch) >= n_in and all(isinstance(t, Tensor) for t in batch[:n_in]):
            self.cm._check_inputs(list(batch[:n_in]))  # a wrong dtype/rank: InputError naming the signature
        timing = TimingHook()
        start = time.perf_counter()
        gm = trace_training_step(self.cm, self.loss, self.optimizer, batch, self.options, self.lr,
                                 stand_ins=self._shards)
        traced_at = time.perf_counter()
        names = list(self.options.passes if self.options.passes is not None else DEFAULT_TRAINING_PASSES)
        if self.options.memory_budget is not None:  # met by passes/memory/rematerialize.py
            names = with_memory_budget_passes(names)
            graph_meta(gm)["memory_budget"] = int(self.options.memory_budget)
        passes = _passes_named(names, "training")
        ctx = PassContext(verify=self.options.verify, hooks=[timing, *self.options.hooks])
        if self.options.verify:
            verify_training(gm)
        result = PassManager(verifier=verify_training).run(gm, Pipeline("training", passes), ctx)
        gm = result.gm
        end = time.perf_counter()
        timings = {"trace": traced_at - start, **{f"pass:{n}": s for n, s in timing.timings}, "total": end - start}
        log.info("compiled a training step: %d nodes in %.2f s (trace %.2f s)", len(gm.graph.nodes), end - start,
                 traced_at - start)
        self._graphs[key] = gm
        if self._main is None:
            self._main, self.timings, self.ctx = gm, timings, ctx
        return gm

    @property
    def graph_module(self) -> fx.GraphModule:
        if self._main is None:
            raise GraphPeftError("the step is not compiled yet: call step(*batch) once, or pass "
                                 "example_batch=(...) to compile_training")
        return self._main

    @property
    def signature(self) -> TrainingSignature:
        return signature_of(self.graph_module)

    def graph_for(self, *batch: Tensor) -> fx.GraphModule:
        """The training graph used for a batch of these shapes (compiled on first use)."""
        return self.compile(*batch)

    # -- running ---------------------------------------------------------------------------------

    def flat_inputs(self, *batch: Tensor) -> list[Tensor]:
        """The graph's flat inputs for one call: trainable tensors, state, lr, batch."""
        self._check_weights(batch)
        sig = signature_of(self.graph_for(*batch))
        return self._graph_inputs(sig, self._trainable_refs(sig.params).get(), batch)

    def _graph_inputs(self, sig: TrainingSignature, params: Sequence[Tensor], batch: Sequence[Tensor]) -> list[Tensor]:
        return [*(t.detach() for t in params), *[self._state[s] for s in sig.state],
                torch.tensor(self.lr, dtype=torch.float32), *batch]

    def __call__(self, *batch: Tensor) -> Tensor:
        """Run one training step on ``batch``; returns the loss (a detached scalar; with
        ``data_parallel``, this rank's part of the batch and the global mean loss)."""
        self._check_weights(batch)
        if self._released - self._shards.keys() and _batch_key(batch) not in self._graphs:
            raise WeightsError(f"this sharded step released the whole frozen weights (shard_frozen=True): it runs "
                               f"the batch shapes compiled before ({[k for k in self._graphs]}), not {_batch_key(batch)}; "
                               "compile with example_batch=... per shape first, or with shard_frozen='keep'")
        key = _batch_key(batch)
        gm = self._graphs.get(key)  # a compiled real batch skips compile()'s scan for meta tensors
        if gm is None:
            gm = self.graph_for(*batch)
        sig = signature_of(gm)
        if self._dp is not None:
            gm = self._distributed_graph(key, gm)
            if not self._dp_synced:
                self._sync_ranks()
        params = self._trainable_refs(sig.params)
        inputs = self._graph_inputs(sig, params.get(), batch)
        run = self._runner(key, gm)
        with torch.no_grad():
            out = run(*inputs)
            n_p = len(sig.params)
            for old, new in zip(params.get(), out[1:1 + n_p]):
                old.copy_(new)
            self._state = dict(zip(sig.state, (t.detach() if t.requires_grad else t for t in out[1 + n_p:])))
            skipped = sig.outputs[-1].kind == "skipped" and bool(out[-1])
        if skipped:
            self.skipped_steps += 1
            if self.options.nonfinite == "raise":
                raise NonFiniteError(f"non-finite training step (loss {float(out[0])}, lr {self.lr}): the trainable "
                                     "tensors and the optimizer state were left unchanged; lower the learning rate, "
                                     "check the batch, or compile with nonfinite='skip' to skip such steps")
        return out[0].detach()

    step = __call__

    # -- base weights (a model compiled on the meta device) --------------------------------------

    def load_base_weights(self, path: Union[str, os.PathLike], **options: Any) -> Any:
        """Load the model's base weights (:meth:`CompiledModel.load_base_weights`, same options)
        and make the step ready to run on them: the optimizer state of a meta compile is
        created again (zeros) and the next real batch traces the step for real tensors (graphs
        traced on meta stay cached for their memory reports). On a ``data_parallel`` step with
        ``shard_frozen=True`` each frozen floating-point weight is read as this rank's
        ``1/world`` slice only (its whole tensor never exists here; headers are checked first)."""
        if self._dp is not None and self.options.shard_frozen is True:
            return self._load_shards(path, options)
        report = self.cm.load_base_weights(path, **options)
        self._reinit_meta_state()
        return report

    def _load_shards(self, path: Union[str, os.PathLike], options: Mapping[str, Any]) -> Any:
        """``shard_frozen=True``: each frozen weight is read as this rank's shard only; its whole
        tensor stays meta (released), and every sharded graph stores the shard as it is read."""
        from ..weights import load_base_weights

        assert self._dp is not None
        report = load_base_weights(self.cm, path, shard=(self._dp.rank, self._dp.world_size), **options)
        names = list(report.shards)
        release_whole_weights(names, [self.cm.graph_module, *self._graphs.values()])  # a reload into real weights
        with torch.no_grad():
            for name, part in report.shards.items():
                held = self._shards.get(name)
                if held is not None and held.shape == part.shape and held.dtype == part.dtype:
                    held.copy_(part)  # sharded graphs built before store this very tensor
                else:
                    self._shards[name] = part
        self._released.update(names)
        self.cm.__dict__.setdefault("_released_weights", set()).update(names)
        self.cm._weights_changed()
        self._reinit_meta_state()
        self._dp_synced = False  # rank 0's trainable tensors are broadcast again
        return report

    def _reinit_meta_state(self) -> None:
        if any(t.is_meta for t in self._state.values()) and not any(
                get_tensor(self.cm.graph_module, n).is_meta for n in self.param_names):
            self._state = self.optimizer.init_state({n: get_tensor(self.cm.graph_module, n) for n in self.param_names})

    def _check_weights(self, batch: Sequence[Any]) -> None:
        """Real batches need real weights: a clear error for a model still on the meta device."""
        if all(getattr(t, "is_meta", False) for t in batch):
            return
        self.cm._check_materialized(list(batch), allow_released=True)
        self._reinit_meta_state()

    # -- data parallelism (graphpeft.training.distributed) -------------------------------------

    def _distributed_graph(self, key: tuple, gm: fx.GraphModule) -> fx.GraphModule:
        """The graph with collectives for this batch shape (built from ``gm`` on first use)."""
        if key not in self._dp_graphs:
            assert self._dp is not None
            release = None
            if self.options.shard_frozen is True:  # whole weights leave as their shards are made
                if not self._dp_synced:
                    self._sync_ranks()  # the ranks' whole weights are compared first
                release = self._release_whole_weight
                # the compile's temporaries (graph copies sharing the weights, closures) sit in
                # reference cycles: until the cyclic collector runs they keep every released
                # weight alive, and the shards pile up on top (+the shards' bytes at the peak)
                gc.collect()
            shards = self._shards if self.options.shard_frozen is True else None
            self._dp_graphs[key] = dp = data_parallel_graph(gm, self._dp, self.options, release, shards)
            if shards is not None:  # later batch shapes share the shards stored here
                held = roles(dp)
                shards.update({n: get_tensor(dp, n + SHARD_SUFFIX) for n in self._released
                               if n not in shards and n + SHARD_SUFFIX in held})
            report = graph_meta(dp).get(COMMUNICATION_META)
            if release is not None and report is not None:
                report.released_bytes, self._released_bytes = self._released_bytes, 0
                log.info("shard_frozen: released %.1f MiB of whole frozen weights", report.released_bytes / 2**20)
        return self._dp_graphs[key]

    def _sync_ranks(self) -> None:
        """Before the first step (and after a load): every rank takes rank 0's trainable tensors
        and optimizer state; frozen tensors must already agree."""
        check_same_frozen(self.graph_module)
        broadcast_from_rank0([get_tensor(self.cm.graph_module, n) for n in self.param_names]
                             + list(self._state.values()))
        self._dp_synced = True

    def _release_whole_weight(self, name: str) -> None:
        """``shard_frozen=True``: once the sharded graph stores this rank's shard of ``name`` (the
        ranks checked to agree before), the whole tensor leaves the compiled model and the
        single-device graphs (a meta tensor of its shape takes its place)."""
        self._released_bytes += release_whole_weights([name], [self.cm.graph_module, *self._graphs.values()])
        self._released.add(name)
        self.cm.__dict__.setdefault("_released_weights", set()).add(name)
        self.cm._weights_changed()

    def frozen_bytes_held(self) -> int:
        """Bytes of frozen weights this process holds for the step: its model, its single-device
        graphs and, with ``data_parallel``, its sharded graphs (distinct storages only). With
        ``shard_frozen=True`` about ``1/world`` of the unsharded figure after the first step
        (when nothing else, e.g. the original ``nn.Module``, keeps the whole weights)."""
        held = held_frozen_bytes([self.cm.graph_module, *self._graphs.values(), *self._dp_graphs.values()])
        counted = {t.untyped_storage().data_ptr() for g in self._dp_graphs.values() for t in g.parameters()}
        return held + sum(t.untyped_storage().nbytes() for t in self._shards.values()
                          if t.untyped_storage().data_ptr() not in counted)

    @property
    def distributed_graph_module(self) -> fx.GraphModule:
        """The graph a ``data_parallel`` step runs (its single-device ``graph_module`` plus the
        collectives) for the first compiled batch shape."""
        if self._dp is None:
            raise GraphPeftError("this step is not data-parallel: compile it with data_parallel=True")
        key = next(k for k, g in self._graphs.items() if g is self.graph_module)
        if key[0][-1] == "meta" and any(k[0][-1] != "meta" for k in self._dp_graphs):
            # compiled on meta, then loaded: the first shape that ran on real tensors
            return next(g for k, g in self._dp_graphs.items() if k[0][-1] != "meta")
        return self._distributed_graph(key, self.graph_module)

    def communication_report(self) -> "CommunicationReport":
        """What a ``data_parallel`` step all-reduces per step (the trainable gradients and the
        loss) against what full fine-tuning would: ``print(step.communication_report())``."""
        return graph_meta(self.distributed_graph_module)[COMMUNICATION_META]

    def _runner(self, key: tuple, gm: fx.GraphModule) -> Callable[..., Any]:
        run = self._runners.get(key)
        if run is None:
            executor = self.options.executor
            if isinstance(executor, str):
                executor = EXECUTORS[executor]
            run = self._runners[key] = executor(gm) if executor is not None else native_runner(gm)
        return run

    def _trainable_refs(self, names: Sequence[str]) -> TensorRefs:
        """The trainable tensors ``names`` of the model, resolved once per model graph."""
        refs = self.__dict__.get("_refs")
        if refs is None or not refs.valid_for(self.cm.graph_module) or refs.names != list(names):
            refs = self.__dict__["_refs"] = TensorRefs(self.cm.graph_module, names)
        return refs

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"params": {name: tensor}, "optimizer": {key: tensor}, "lr": float}`` (copies)."""
        return {
            "params": {n: get_tensor(self.cm.graph_module, n).detach().clone() for n in self.param_names},
            "optimizer": {k: v.clone() for k, v in self._state.items()},
            "lr": self.lr,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (from this step or an ``OnnxTrainer``); checks first."""
        params = {k: torch.as_tensor(v) for k, v in state.get("params", {}).items()}
        opt = {k: torch.as_tensor(v) for k, v in state.get("optimizer", {}).items()}
        problems = []
        for k in self.param_names:
            if k not in params:
                problems.append(f"missing parameter {k}")
            elif tuple(params[k].shape) != tuple(get_tensor(self.cm.graph_module, k).shape):
                problems.append(f"{k} has shape {tuple(params[k].shape)}")
        for k, v in self._state.items():
            if k not in opt:
                problems.append(f"missing optimizer state {k}")
            elif tuple(opt[k].shape) != tuple(v.shape):
                problems.append(f"optimizer state {k} has shape {tuple(opt[k].shape)}")
        if problems:
            raise GraphPeftError("state does not fit this training step (nothing was loaded): "
                                 + "; ".join(problems[:10]) + ". Was it saved with the same plan and optimizer?")
        with torch.no_grad():
            for k in self.param_names:
                get_tensor(self.cm.graph_module, k).copy_(params[k])
        self._state = {k: opt[k].clone().to(v.dtype) for k, v in self._state.items()}
        if "lr" in state:
            self.lr = float(state["lr"])
        self._dp_synced = False  # data-parallel: the next step starts every rank from rank 0's state

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write trainable tensors, optimizer state and lr to ``path`` (safetensors, atomic);
        an ``OnnxTrainer`` of the exported step can resume from it, and vice versa. With
        ``data_parallel`` only rank 0 writes (the state is the same on every rank) and every
        rank returns once the file is complete; a step of any world size resumes from it."""
        if is_main_process():
            save_training_state(path, self.state_dict(), signature=self._signature_or_none())
        if self._dp is not None:
            barrier()

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Resume from a checkpoint written by :meth:`save_checkpoint` (or an ``OnnxTrainer``)."""
        state, _ = load_training_state(path, signature=self._signature_or_none())
        self.load_state_dict(state)

    def _signature_or_none(self) -> Optional[TrainingSignature]:
        return signature_of(self._main) if self._main is not None else None

    # -- reports and export ----------------------------------------------------------------------

    def memory_report(self, measure: bool = False, batch: Optional[Sequence[Tensor]] = None) -> MemoryReport:
        """The static memory plan of the training graph (``print(step.memory_report())``).

        ``measure=True`` also runs the graph once with the torch executor (nothing is written
        back; the RNG state is restored) and records the measured peak of live tensor storage
        beside the plan (``measured_peak_bytes``, ``plan_vs_measured``), on ``batch`` (default:
        the example batch the step was compiled for)."""
        gm = self.graph_module
        report = graph_meta(gm).get("memory")
        if report is None:
            if "plan_memory" not in PASSES:
                raise GraphPeftError("no plan_memory pass is registered (import graphpeft.passes)")
            PASSES["plan_memory"]()(gm, PassContext(verify=False))
            report = graph_meta(gm)["memory"]
        if measure and report.measured_peak_bytes is None:
            if batch is None:
                batch = self.options.example_batch if self.options.example_batch is not None else self._default_batch()
            if batch is None:
                raise GraphPeftError("memory_report(measure=True) needs a batch: pass batch=(...) or compile with "
                                     "example_batch=(...)")
            gm = self.graph_for(*batch)
            PASSES["measure_memory"](self.flat_inputs(*batch))(gm, PassContext(verify=False))
            report = graph_meta(gm)["memory"]
        return report

    def backward_report(self) -> "BackwardReport":
        """Per layer, whether the pruned backward reaches it and what it computes there (input
        grad only, full weight grad, weight-slice grad, bias / norm / adapter grads, nothing):
        ``print(step.backward_report())``. Computed on first use by the ``report_backward`` pass."""
        gm = self.graph_module
        report = graph_meta(gm).get("backward")
        if report is None:
            if "report_backward" not in PASSES:
                raise GraphPeftError("no report_backward pass is registered (import graphpeft.passes)")
            PASSES["report_backward"](self.cm.graph_module)(gm, PassContext(verify=False))
            report = graph_meta(gm)["backward"]
        return report

    def export_onnx(self, path: Union[str, os.PathLike], **options: Any) -> Any:
        """Export the training step to ONNX (see ``graphpeft.backends.onnx.export_training``)."""
        from ..errors import ExportError
        from ..paths import check_output_file

        check_output_file(path, "export_onnx", ExportError)  # before any work: nothing half-written
        return get_backend("onnx").export_training(self, path, **options)

    def export_executorch(self, path: Union[str, os.PathLike], **options: Any) -> Any:
        """Export the training step as one ExecuTorch method (see
        ``graphpeft.backends.executorch.export_training``)."""
        from ..errors import ExportError
        from ..paths import check_output_file

        check_output_file(path, "export_executorch", ExportError)  # before any work: nothing half-written
        return get_backend("executorch").export_training(self, path, **options)

    # -- copy.deepcopy, pickle, torch.save/torch.load (graphpeft.serialize) --------------------

    def __getstate__(self) -> dict[str, Any]:
        from ..serialize import graph_module_state

        state = dict(self.__dict__)
        state["_graphs"] = {key: graph_module_state(gm) for key, gm in self._graphs.items()}
        state["_main"] = next((key for key, gm in self._graphs.items() if gm is self._main), None)
        state["_runners"] = {}  # executors (torch.compile ...) are rebuilt on the next call
        state.pop("_refs", None)  # module references: resolved again on the next call
        state["_dp_graphs"], state["_dp_synced"] = {}, False  # rebuilt in the process group of the next call
        state["ctx"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from ..serialize import graph_module_from_state

        self.__dict__.update(state)
        self._graphs = {key: graph_module_from_state(gs) for key, gs in state["_graphs"].items()}
        self._main = self._graphs.get(state["_main"]) if state["_main"] is not None else None

    def __repr__(self) -> str:
        n = len(self._main.graph.nodes) if self._main is not None else 0
        return (f"TrainingStep(loss={self.loss.name}, optimizer={self.optimizer.name}, "
                f"{len(self.param_names)} trainable tensors, {n} nodes)")


def compile_training(cm: "CompiledModel", loss: LossSpec, optimizer: Union[Optimizer, str, Mapping[str, Any]],
                     **options: Any) -> TrainingStep:
    """Compile one training step of ``cm``: forward, pruned backward and optimizer update.

    Args:
        cm: the compiled (adapted) model; its trainable tensors are trained in place.
        loss: ``"cross_entropy"``, ``"causal_lm"``, ``"mse"``, a :class:`~graphpeft.training.losses.Loss` or
            a callable ``(outputs, *targets) -> scalar``.
        optimizer: ``gp.optim.SGD(...)`` / ``gp.optim.AdamW(...)`` (or ``"sgd"`` / ``"adamw"``).
        **options: see :class:`TrainingOptions` (``accumulation_steps``, ``clip_grad_norm``,
            ``passes``, ``verify``, ``hooks``, ``example_batch``).
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainingOptions)}
    if unknown:
        raise PlanError(f"unknown training option(s) {sorted(unknown)}; known: "
                        f"{[f.name for f in dataclasses.fields(TrainingOptions)]}")
    return TrainingStep(cm, loss, optimizer, TrainingOptions(**options))


__all__ = ["TrainerCheckpoints", "DEFAULT_FORWARD_LOWERING", "INFERENCE_FORWARD_LOWERING", "DEFAULT_TRAINING_PASSES", "lower_forward", "IOSpec", "after_update_hooks", "apply_after_update", "load_training_state", "save_training_state", "MemoryReport", "TrainingOptions", "TrainingSignature",
           "TrainingStep", "compile_training", "phase_of", "signature_of", "trace_training_step",
           "verify_training"]
