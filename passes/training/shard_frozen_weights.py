"""Shard the frozen base weights of a data-parallel step across ranks (FSDP-style).

Run by ``TrainingStep`` after ``allreduce_gradients`` when the step is compiled with
``data_parallel=True, shard_frozen=True``, on the graph with collectives (the single-device graph
that exports see keeps its whole weights).

Rule, per frozen floating-point weight the graph reads:

* match: its ``get_attr`` node;
* check (with a reason): a floating-point, contiguous tensor that is not on the meta device, or
  one whose shard was made before (``shards``: read from the checkpoint by a sharded
  ``load_base_weights``, its whole tensor never loaded);
* rewrite: the graph keeps only this rank's ``1/world`` of the flattened weight (padded to a
  multiple of the world size) as ``<name>_shard``; each window of use — the forward's uses, then
  the backward's — gets the whole weight back with a ``_c10d_functional.all_gather_into_tensor``,
  issued one window ahead (right before the previous window's first use, so the gather overlaps
  that compute) and waited for right before its own first use, then sliced to the weight's size
  and viewed to its shape. All-gathering returns every rank's shard unchanged, so the step
  computes exactly what the unsharded step does.

A forward value that the backward reuses (the transposed weight autograd saved) keeps that
gathered weight alive until its backward use; what the step *stores* is ``1/world`` either way.
Every created node carries provenance and the phase ``communicate``; the pass adds its figures
to the step's :class:`~graphpeft.training.distributed.CommunicationReport`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx

from graphpeft.errors import GraphPeftError
from graphpeft.graph import META_KEY, Provenance, Role, get_tensor, graph_meta, register_tensor, remove_tensor, roles
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import phase_of
from graphpeft.training.distributed import COMMUNICATE_PHASE, COMMUNICATION_META, SHARD_SUFFIX, shard_of

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

#: phases whose uses of a weight make up its forward window (the rest: its backward window)
FORWARD_PHASES = ("forward", "loss")


def check_shardable(t: torch.Tensor) -> Optional[str]:
    """Check: why the frozen tensor ``t`` stays whole (None: it can be sharded)."""
    if not t.is_floating_point():
        return f"it is {t.dtype}, not floating point (packed or integer tensors stay whole)"
    if t.device.type == "meta":
        return "it is on the meta device (load the base weights first)"
    if not t.is_contiguous():
        return "it is not contiguous"
    return None


@register_pass
class ShardFrozenWeights(PassBase):
    """Replaces every frozen weight by this rank's shard plus all-gathers before its uses."""

    name = "shard_frozen_weights"

    def __init__(self, group_name: str = "", world_size: int = 1, rank: int = 0,
                 release: Optional[Callable[[str], None]] = None,
                 shards: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        self.group_name = group_name
        self.world_size = int(world_size)
        self.rank = int(rank)
        #: this rank's shards made before (read from the checkpoint by a sharded load, or stored
        #: by an earlier batch shape's graph): used as they are, the whole tensor may be meta
        self.shards = dict(shards or {})
        #: called with each weight's name once its shard is stored: the caller drops the whole
        #: tensor from its other graphs, so a rank never holds every whole weight and every shard
        self.release = release
        #: tensor name -> why it stays whole
        self.declined: dict[str, str] = {}

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        role_map = roles(gm)
        nodes = list(gm.graph.nodes)
        first_op = next(n for n in nodes if n.op not in ("placeholder", "get_attr"))
        windows: list[tuple[int, fx.Node, list[fx.Node], fx.Node, torch.Size]] = []
        stored = gathered = 0
        pos = {n: i for i, n in enumerate(nodes)}
        for attr in [n for n in nodes if n.op == "get_attr" and role_map.get(n.target) == Role.FROZEN]:
            weight = get_tensor(gm, attr.target)
            shard = self._given_shard(attr.target, weight)
            why = None if shard is not None else check_shardable(weight)
            if why:
                self.declined[attr.target] = why
                continue
            if shard is None:
                shard = shard_of(weight, self.rank, self.world_size)
            register_tensor(gm, attr.target + SHARD_SUFFIX, shard, Role.FROZEN)
            with gm.graph.inserting_before(first_op):
                shard_node = gm.graph.get_attr(attr.target + SHARD_SUFFIX)
            self._tag(shard_node, attr.target, "shard", _fake_like(attr, shard.shape))
            stored += shard.numel() * shard.element_size()
            shape = weight.shape
            if self.release is not None and not weight.is_meta:  # the whole tensor leaves this graph and the caller's
                register_tensor(gm, attr.target, torch.empty_like(weight, device="meta"), Role.FROZEN)
                del weight
                self.release(attr.target)
            for group in self._windows(attr):
                windows.append((min(pos[u] for u in group), attr, group, shard_node, shape))
                gathered += shard.numel() * shard.element_size() * self.world_size
        windows.sort(key=lambda w: w[0])
        for k, (first, attr, group, shard_node, shape) in enumerate(windows):
            issue_before = nodes[windows[k - 1][0] if k else first]  # one window ahead: overlap
            self._gather(gm, attr, group, shard_node, shape, issue_before, nodes[first])
        for attr in {w[1] for w in windows}:
            if not attr.users:
                name = attr.target
                gm.graph.erase_node(attr)
                remove_tensor(gm, name)
        report = graph_meta(gm).get(COMMUNICATION_META)
        if report is not None:
            graph_meta(gm)[COMMUNICATION_META] = dataclasses.replace(
                report, frozen_shard_bytes=stored, gathered_bytes=gathered, frozen_whole=dict(self.declined),
                frozen_sharded=sorted({w[1].target for w in windows}))
        return PassResult(gm, bool(windows))

    def _given_shard(self, name: str, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """The shard of ``name`` made before, checked against the weight's size and dtype."""
        shard = self.shards.get(name)
        if shard is None:
            return None
        chunk = -(-weight.numel() // self.world_size)
        if tuple(shard.shape) != (chunk,) or shard.dtype != weight.dtype:
            raise GraphPeftError(f"the shard given for {name} is {shard.dtype} {list(shard.shape)}; "
                                 f"{self.world_size} ranks need {weight.dtype} [{chunk}] (reload the weights)")
        return shard

    @staticmethod
    def _windows(attr: fx.Node) -> list[list[fx.Node]]:
        """The weight's users split into its forward window and its backward window."""
        forward = [u for u in attr.users if phase_of(u) in FORWARD_PHASES]
        backward = [u for u in attr.users if phase_of(u) not in FORWARD_PHASES]
        return [g for g in (forward, backward) if g]

    def _gather(self, gm: fx.GraphModule, attr: fx.Node, group: list[fx.Node], shard_node: fx.Node,
                shape: torch.Size, issue_before: fx.Node, use_before: fx.Node) -> None:
        graph, name, numel = gm.graph, attr.target, shape.numel()
        padded = shard_node.meta["val"].numel() * self.world_size
        with graph.inserting_before(issue_before):
            issued = graph.call_function(c10d.all_gather_into_tensor.default,
                                         (shard_node, self.world_size, self.group_name))
        with graph.inserting_before(use_before):
            waited = graph.call_function(c10d.wait_tensor.default, (issued,))
            flat = graph.call_function(aten.slice.Tensor, (waited, 0, 0, numel)) if padded != numel else waited
            whole = graph.call_function(aten.view.default, (flat, list(shape)))
        for n, rule, size in ((issued, "all_gather", [padded]), (waited, "wait", [padded]),
                              (flat, "unpad", [numel]), (whole, "view", list(shape))):
            self._tag(n, name, rule, _fake_like(attr, size))
        for u in group:
            u.replace_input_with(attr, whole)

    def _tag(self, node: fx.Node, origin: str, rule: str, val: Any) -> None:
        node.meta[META_KEY] = Provenance(self.name, rule=rule, origin=origin, part=COMMUNICATE_PHASE).as_dict()
        if val is not None:
            node.meta["val"] = val


def _fake_like(attr: fx.Node, shape: Any) -> Any:
    """A fake tensor of ``shape`` in the mode of ``attr``'s value (None without one)."""
    val = attr.meta.get("val")
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return torch.empty(list(shape), dtype=val.dtype, device=val.device)
