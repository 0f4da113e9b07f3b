"""Data-parallel training steps on ``torch.distributed`` (the core side).

    torch.distributed.init_process_group("gloo")       # launched by torchrun; "nccl" on GPUs
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3), data_parallel=True)
    loss = step(local_batch)                            # the global mean loss; ranks stay identical

A compiled step knows exactly which tensors train, so data parallelism is a graph rewrite: the
``allreduce_gradients`` pass (``passes/training/``) sums the trainable tensors' gradients and the
loss across ranks with torch.distributed's functional collectives, bucketed by size, and divides
by the world size. The optimizer then sees the same averaged gradients on every rank, so ranks
that start equal (rank 0's tensors are broadcast before the first step) stay bit-identical.

The step keeps two graphs per batch shape: the single-device graph (what ``graph_module``,
the memory and backward reports and every export see) and a copy with the collectives, which
is what runs. Checkpoints are written by rank 0 only; the state is replicated, so any world
size resumes from them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from ..errors import DistributedError, GraphPeftError
from ..graph import Role, attach_tensor, get_tensor, graph_meta, roles
from ..infra import PassContext, PassManager, Pipeline, copy_graph
from ..registry import PASSES

if TYPE_CHECKING:
    from .options import TrainingOptions

log = logging.getLogger(__name__)

Tensor = torch.Tensor

#: the pass that inserts the collectives (``passes/training/allreduce_gradients.py``)
ALLREDUCE_PASS = "allreduce_gradients"
#: the pass that shards frozen weights (``shard_frozen=True``)
SHARD_PASS = "shard_frozen_weights"
#: where that pass stores its :class:`CommunicationReport` in ``gm.meta["graphpeft"]``
COMMUNICATION_META = "communication"
#: the phase of the nodes it creates (see :data:`graphpeft.training.PHASES`)
COMMUNICATE_PHASE = "communicate"
#: roles whose bytes full fine-tuning would all-reduce (the base model's own weights)
BASE_WEIGHT_ROLES = (Role.FROZEN, Role.TRAINABLE, Role.TRAINABLE_SLICE)
#: the sharded graph stores a frozen weight's shard under ``<name><SHARD_SUFFIX>``
SHARD_SUFFIX = "_shard"


def shard_range(numel: int, rank: int, world: int) -> tuple[int, int, int]:
    """``(start, stop, chunk)``: the elements of a flattened tensor of ``numel`` elements that
    ``rank`` stores, and the shard's length (the tensor is zero-padded to ``world * chunk``)."""
    chunk = -(-numel // world)
    return min(rank * chunk, numel), min((rank + 1) * chunk, numel), chunk


def pad_shard(part: Tensor, chunk: int) -> Tensor:
    """``part`` (a flat slice) as a shard of its own memory, zero-padded to ``chunk`` elements."""
    return torch.nn.functional.pad(part, (0, chunk - part.numel())) if part.numel() < chunk else part.clone()


def shard_of(t: Tensor, rank: int, world: int) -> Tensor:
    """This rank's part of ``t`` flattened and zero-padded to a multiple of ``world`` (a copy;
    only the shard is padded, so no second whole-size tensor is made)."""
    flat = t.detach().reshape(-1)
    start, stop, chunk = shard_range(flat.numel(), rank, world)
    return pad_shard(flat[start:stop], chunk)


@dataclasses.dataclass(frozen=True)
class ProcessGroupInfo:
    """The process group a data-parallel step communicates in."""

    group_name: str
    world_size: int
    rank: int
    backend: str


def process_group() -> ProcessGroupInfo:
    """The default (world) process group; raises :class:`DistributedError` if there is none."""
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("data_parallel=True needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise DistributedError(
            "data_parallel=True needs an initialized torch.distributed process group: launch with "
            "`torchrun --nproc_per_node=N script.py` and call torch.distributed.init_process_group('gloo') "
            "(CPU) or ('nccl') (GPU) before compile_training; or compile without data_parallel")
    group = dist.group.WORLD
    return ProcessGroupInfo(group.group_name, dist.get_world_size(), dist.get_rank(), str(dist.get_backend()))


def is_main_process() -> bool:
    """True on rank 0, or when no process group is initialized (the process that writes files)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclasses.dataclass
class CommunicationReport:
    """What a data-parallel step sends per step, filled by the ``allreduce_gradients`` pass.

    ``gradient_bytes`` is the payload all-reduced per step (the trainable tensors' gradients;
    adapters only), ``full_finetune_bytes`` what DDP over the whole model would all-reduce (the
    base weights' bytes as stored), ``wire_bytes_per_rank`` what a ring all-reduce sends from
    each rank (``2 (world - 1) / world`` × payload)."""

    world_size: int
    backend: str
    gradient_bytes: int
    loss_bytes: int
    full_finetune_bytes: int
    #: (tensors, bytes) per bucket, in the order the buckets are issued
    buckets: list[tuple[int, int]]
    bucket_cap_bytes: int
    #: with ``shard_frozen``: the frozen bytes this rank stores (its shards), the bytes it
    #: all-gathers per step, and the frozen tensors kept whole (name -> why)
    frozen_shard_bytes: int = 0
    gathered_bytes: int = 0
    frozen_whole: dict[str, str] = dataclasses.field(default_factory=dict)
    #: the frozen tensors stored as shards, and the whole-weight bytes the step then released
    #: from the compiled model (``shard_frozen=True``; 0 with ``shard_frozen="keep"``)
    frozen_sharded: list[str] = dataclasses.field(default_factory=list)
    released_bytes: int = 0

    @property
    def bytes_per_step(self) -> int:
        return self.gradient_bytes + self.loss_bytes

    @property
    def wire_bytes_per_rank(self) -> int:
        return int(2 * (self.world_size - 1) / max(self.world_size, 1) * self.bytes_per_step)

    @property
    def fraction_of_full_finetune(self) -> float:
        return self.gradient_bytes / self.full_finetune_bytes if self.full_finetune_bytes else float("nan")

    def __str__(self) -> str:
        mib = 1 / (1 << 20)
        return (f"data-parallel communication per step ({self.world_size} ranks, {self.backend}): "
                f"{self.bytes_per_step * mib:.3f} MiB all-reduced in {len(self.buckets)} bucket(s) "
                f"(gradients {self.gradient_bytes * mib:.3f} MiB + loss), {self.wire_bytes_per_rank * mib:.3f} MiB "
                f"sent per rank; full fine-tuning would all-reduce {self.full_finetune_bytes * mib:.3f} MiB "
                f"({self.fraction_of_full_finetune:.2%} of it)"
                + (f"; frozen weights sharded: {self.frozen_shard_bytes * mib:.3f} MiB stored on this rank, "
                   f"{self.gathered_bytes * mib:.3f} MiB all-gathered per step" if self.frozen_shard_bytes else "")
                + (f", {self.released_bytes * mib:.3f} MiB of whole weights released" if self.released_bytes else ""))


def data_parallel_graph(gm: fx.GraphModule, group: ProcessGroupInfo, options: "TrainingOptions",
                        release: Optional[Callable[[str], None]] = None,
                        shards: Optional[Mapping[str, Tensor]] = None) -> fx.GraphModule:
    """A copy of the single-device training graph ``gm`` (sharing its tensors) with the
    collectives inserted by the ``allreduce_gradients`` pass; ``gm`` is unchanged. With
    ``shard_frozen``, ``release(name)`` is called as each frozen weight's shard is stored, and
    ``shards`` (name -> this rank's shard) are used as they are (their whole tensors may be meta)."""
    from .signature import verify_training

    names = [ALLREDUCE_PASS] + ([SHARD_PASS] if options.shard_frozen else [])
    missing = [n for n in names if n not in PASSES]
    if missing:
        raise GraphPeftError(f"no {', '.join(missing)} pass is registered (import graphpeft.passes)")
    dp = copy_graph(gm)
    passes = [PASSES[ALLREDUCE_PASS](group_name=group.group_name, world_size=group.world_size, backend=group.backend,
                                     bucket_cap_bytes=int(options.bucket_cap_mb * (1 << 20)))]
    if options.shard_frozen:
        passes.append(PASSES[SHARD_PASS](group_name=group.group_name, world_size=group.world_size, rank=group.rank,
                                         release=release, shards=shards))
    ctx = PassContext(verify=options.verify, hooks=list(options.hooks))
    dp = PassManager(verifier=verify_training).run(dp, Pipeline("data_parallel", passes), ctx).gm
    log.info("%s", graph_meta(dp).get(COMMUNICATION_META))
    return dp


def release_whole_weights(names: Sequence[str], holders: Sequence[fx.GraphModule]) -> int:
    """Replace each tensor of ``names`` by a meta tensor of its shape and dtype in every graph of
    ``holders`` that registers it (the compiled model and its single-device step graphs share
    one tensor), so its storage is freed once nothing else holds it; returns the bytes released.
    Run after the sharded graph copied this rank's shards: the whole weights are no longer read."""
    released, seen = 0, set()
    for gm in holders:
        held = roles(gm)
        for name in names:
            if name not in held:
                continue
            t = get_tensor(gm, name)
            if t.is_meta:
                continue
            if id(t) not in seen:
                seen.add(id(t))
                released += t.numel() * t.element_size()
            attach_tensor(gm, name, torch.empty_like(t, device="meta"), held[name])
    return released


def held_frozen_bytes(modules: Sequence[fx.GraphModule]) -> int:
    """The bytes of distinct frozen (and ``adapter-const``) tensor storages ``modules`` hold (meta
    tensors hold none): what the sharded step keeps per rank against the whole weights."""
    storages: dict[int, int] = {}
    for gm in modules:
        for name, role in roles(gm).items():
            t = get_tensor(gm, name)
            if role.trainable or role == Role.BUFFER or t.is_meta:
                continue
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _comm_device() -> torch.device:
    """Where eager collectives take their tensors: the current GPU under nccl, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(tensors: Sequence[Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's (one broadcast each; a tensor on another
    device than the backend's, e.g. the CPU step counter under nccl, travels through a copy)."""
    import torch.distributed as dist

    device = _comm_device()
    with torch.no_grad():
        for t in tensors:
            if t.device.type == "meta":
                continue
            buf = t if t.device == device else t.to(device)
            dist.broadcast(buf, src=0)
            if buf is not t:
                t.copy_(buf)


#: elements per block of a frozen tensor's float64 checksum (a whole-tensor float64 sum would
#: first make a float64 copy of it: twice the weight's bytes, once per rank, for a float32 weight)
CHECKSUM_BLOCK = 1 << 20


def _checksum(t: Tensor) -> Tensor:
    """The float64 sum of ``t``, block by block (a transient of one block, not of the tensor)."""
    flat = t.reshape(-1)
    if flat.numel() <= CHECKSUM_BLOCK:
        return torch.sum(flat, dtype=torch.float64).reshape(())
    return torch.stack([torch.sum(b, dtype=torch.float64) for b in flat.split(CHECKSUM_BLOCK)]).sum()


def check_same_frozen(gm: fx.GraphModule) -> None:
    """Raise :class:`DistributedError` when the ranks hold different frozen tensors: a float64
    sum per tensor, compared by all-reducing its maximum and minimum (one pass over the weights)."""
    import torch.distributed as dist

    names, sums = [], []
    for name, role in roles(gm).items():
        t = get_tensor(gm, name)
        if role.trainable or t.device.type == "meta":
            continue
        try:
            sums.append(_checksum(t.detach()))
        except (RuntimeError, TypeError):  # a packed or exotic tensor type: not compared
            continue
        names.append(name)
    if not sums:
        return
    high = torch.stack([v.to(_comm_device()) for v in sums]).nan_to_num(nan=0.0)
    low = -high
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    differ = [n for n, hi, lo in zip(names, high.tolist(), (-low).tolist()) if hi != lo]
    if differ:
        raise DistributedError(
            f"the ranks hold different frozen weights ({', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}): "
            "load the same base weights on every rank (same checkpoint, or the same seed before building "
            "the model) before the first data-parallel step")


__all__ = ["ALLREDUCE_PASS", "COMMUNICATE_PHASE", "COMMUNICATION_META", "CommunicationReport", "ProcessGroupInfo", "SHARD_PASS",
           "SHARD_SUFFIX", "pad_shard", "shard_of", "shard_range",
           "barrier", "broadcast_from_rank0", "check_same_frozen", "data_parallel_graph", "held_frozen_bytes",
           "release_whole_weights",
           "is_main_process", "process_group"]
