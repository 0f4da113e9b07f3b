"""Options of ``compile_training`` (:class:`TrainingOptions`), the default pass lists and the
named executors.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx

from ..errors import PlanError
from ..infra import PassHook

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

#: what TrainingOptions.nonfinite may say
NONFINITE = ("skip", "raise")

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
            graph's ATen ops one by one through PyTorch's Python bindings, after the lowering
            passes ``runner.TORCH_EXECUTOR_LOWERING`` on its own copy of the graph (silu kernels,
            float32 CPU GEMMs through oneDNN, fused AdamW kernel: equal to the graph up to
            rounding; :mod:`graphpeft.training.runner`);
            ``"fx"`` runs the ``fx.GraphModule`` itself; ``"inductor"`` hands it to
            ``torch.compile`` (fused kernels: on an H100 the compiled LoRA step ran 0.41× the
            time of peft eager, the plain graph 1.64×, ``python -m benchmarks.gpu_step``; the
            first call per batch shape compiles, tens of seconds) after the lowering passes
            :data:`INDUCTOR_LOWERING` on its own copy of the graph (float32 CPU GEMMs through
            oneDNN, which uses AVX-512 on AMD CPUs where MKL does not); ``torch.compile`` itself
            is ``executor=lambda gm: torch.compile(gm)``; or any callable taking the
            graph module and returning a callable with the same inputs and outputs. The
            exported (ONNX) step is the same graph either way.
        memory_budget: bytes the step's planned peak (``step.memory_report().peak_bytes``) must
            not exceed. When the plain graph exceeds it, the ``rematerialize`` pass recomputes
            forward values in the backward instead of keeping them (a min-cut over the graph:
            cheap ops first, matrix multiplies only when those cannot meet the budget; random,
            attention and convolution ops are never recomputed) and
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


#: lowering passes (by registered name) the inductor executor applies to its own copy of a step
#: graph before ``torch.compile`` (float32 CPU GEMMs through oneDNN: ``passes/lower/onednn_matmul.py``)
INDUCTOR_LOWERING: tuple[str, ...] = ("onednn_matmul",)


def _inductor(gm: fx.GraphModule) -> Callable[..., Any]:
    from .runner import lower_for_torch

    graph = lower_for_torch(gm, INDUCTOR_LOWERING)
    return torch.compile(gm if graph is gm.graph else fx.GraphModule(gm, graph), dynamic=False)


#: named executors of :attr:`TrainingOptions.executor`
EXECUTORS: dict[str, Callable[[fx.GraphModule], Callable[..., Any]]] = {"inductor": _inductor,
                                                                    "fx": lambda gm: gm}
