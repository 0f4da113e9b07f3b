"""All-reduce the trainable tensors' gradients across ranks: a data-parallel training step.

Run by ``TrainingStep`` on a copy of the finished single-device graph when the step is compiled
with ``data_parallel=True`` (the copy runs; exports keep the single-device graph).

Rule, per trainable tensor:

* match: the node holding its gradient over this rank's whole batch — the ``final_grad_of``
  mark the step compiler sets (after gradient accumulation), or, under gradient clipping, the
  unclipped gradient the clip coefficient multiplies, so the norm is the global gradient's;
* check (with a reason): it is a computed floating-point tensor whose value some update reads;
* rewrite: gradients are grouped into buckets of at most ``bucket_cap_bytes`` (per dtype) in the
  order the backward produces them; each bucket is one ``_c10d_functional.all_reduce_coalesced``
  issued right after its last gradient exists, so the communication runs while the rest of the
  backward computes; each result's ``wait_tensor`` and division by the world size come where
  the update first needs it (the end of the backward), and every update, clip and non-finite
  check reads the average. The loss is all-reduced the same way right after it is computed: the
  step returns the global mean, and because the non-finite check reads only averaged values,
  every rank takes the same skip decision.

Every created node carries provenance (this pass, the rule, the tensor it averages) and the
phase ``communicate``; the pass stores a :class:`~graphpeft.training.distributed.CommunicationReport`.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.errors import VerificationError
from graphpeft.graph import META_KEY, Provenance, Role, get_tensor, graph_meta, roles, tensor_bytes
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import UPDATE_PHASES, phase_of, signature_of
from graphpeft.training.distributed import (BASE_WEIGHT_ROLES, COMMUNICATE_PHASE, COMMUNICATION_META,
                                            CommunicationReport)
from ..memory.reorder_updates import schedule

aten = torch.ops.aten
c10d = torch.ops._c10d_functional

#: phases whose ops read the averaged gradient (and loss) instead of this rank's
CONSUMER_PHASES = (*UPDATE_PHASES, "check")


def local_gradient(gm: fx.GraphModule, param: str) -> tuple[Optional[fx.Node], str]:
    """Match: the node holding ``param``'s gradient of this rank's batch, or None and why not."""
    final = [n for n in gm.graph.nodes if param in ((n.meta.get(META_KEY) or {}).get("final_grad_of") or [])]
    if len(final) != 1:
        return None, f"{len(final)} nodes are marked as its final gradient (expected 1)"
    node = final[0]
    if phase_of(node) == "clip":  # grad * coef: the gradient is the input the clip did not compute
        grads = [a for a in node.all_input_nodes if phase_of(a) != "clip"]
        if len(grads) != 1:
            return None, "its clipped gradient is not (gradient × clip coefficient)"
        node = grads[0]
    return node, ""


def check_gradient(node: fx.Node) -> Optional[str]:
    """Check: why ``node`` cannot be all-reduced (None: it can)."""
    if node.op != "call_function":
        return f"its gradient is a graph {node.op} ({node.name}), not a computed value"
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return f"its gradient {node.name} is not a floating-point tensor"
    if not _consumers(node):
        return f"no update reads its gradient {node.name}"
    return None


def _consumers(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.op == "output" or phase_of(u) in CONSUMER_PHASES]


def _nbytes(node: fx.Node) -> int:
    return tensor_bytes(node.meta.get("val"))


def _bytes_of_spec(shape: list[int], dtype: str) -> int:
    return math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def full_finetune_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the base model's weights (stored ones, and trainable inputs with a base role)."""
    total = sum(tensor_bytes(get_tensor(gm, n)) for n, r in roles(gm).items() if r in BASE_WEIGHT_ROLES)
    sig = signature_of(gm)
    for spec in sig.inputs:
        if spec.kind == "param" and Role(sig.param_roles[spec.key]) in BASE_WEIGHT_ROLES:
            total += _bytes_of_spec(spec.shape, spec.dtype)
    return total


@register_pass
class AllReduceGradients(PassBase):
    """Inserts bucketed gradient and loss all-reduces (torch.distributed functional collectives)
    into a training graph, averaging over ``world_size`` ranks of the group ``group_name``."""

    name = "allreduce_gradients"

    def __init__(self, group_name: str = "", world_size: int = 1, backend: str = "",
                 bucket_cap_bytes: int = 25 << 20) -> None:
        self.group_name = group_name
        self.world_size = int(world_size)
        self.backend = backend
        self.bucket_cap_bytes = int(bucket_cap_bytes)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sig = signature_of(gm)
        grads: dict[fx.Node, list[str]] = {}
        problems = []
        for p in sig.params:
            node, why = local_gradient(gm, p)
            why = why or check_gradient(node)
            if why:
                problems.append(f"{p}: {why}")
            else:
                grads.setdefault(node, []).append(p)
        if problems:
            raise VerificationError("cannot all-reduce the gradients of " + "; ".join(problems[:5]))
        nodes = list(gm.graph.nodes)
        output = nodes[-1]
        place: dict[fx.Node, tuple[int, int]] = {}  # new node -> where it goes in the start order
        buckets = self._buckets(grads, {n: i for i, n in enumerate(nodes)})
        waits_at = self._end_of_backward(nodes)
        for b, bucket in enumerate(buckets):
            self._reduce(gm, bucket, {g: ", ".join(grads[g]) for g in bucket}, f"bucket{b}", place, waits_at, nodes)
        loss = output.args[0][0]
        self._reduce(gm, [loss], {loss: "loss"}, "loss", place, waits_at, nodes)
        order = schedule(gm, self._start_order(nodes, place))
        for n in order[:-1]:
            output.prepend(n)
        graph_meta(gm)[COMMUNICATION_META] = CommunicationReport(
            world_size=self.world_size, backend=self.backend,
            gradient_bytes=sum(tensor_bytes(g.meta["val"]) for g in grads),
            loss_bytes=tensor_bytes(loss.meta.get("val")), full_finetune_bytes=full_finetune_bytes(gm),
            buckets=[(len(b), sum(tensor_bytes(g.meta["val"]) for g in b)) for b in buckets],
            bucket_cap_bytes=self.bucket_cap_bytes)
        return PassResult(gm, True)

    # -- rewrite helpers -----------------------------------------------------------------------

    def _buckets(self, grads: dict[fx.Node, list[str]], pos: dict[fx.Node, int]) -> list[list[fx.Node]]:
        """Gradients in the order they are produced, grouped per dtype into buckets of at most
        ``bucket_cap_bytes`` (a larger gradient gets a bucket of its own)."""
        open_: dict[Any, list[fx.Node]] = {}  # dtype -> the bucket being filled
        done: list[list[fx.Node]] = []
        for g in sorted(grads, key=pos.__getitem__):
            bucket = open_.setdefault(g.meta["val"].dtype, [])
            if bucket and sum(map(_nbytes, bucket)) + _nbytes(g) > self.bucket_cap_bytes:
                done.append(bucket)
                bucket = open_[g.meta["val"].dtype] = []
            bucket.append(g)
        done += open_.values()
        return sorted(done, key=lambda b: max(pos[g] for g in b))

    @staticmethod
    def _end_of_backward(nodes: list[fx.Node]) -> int:
        """Position of the last forward, loss or backward op: waits go right after it."""
        return max((i for i, n in enumerate(nodes) if n.op == "call_function"
                    and phase_of(n) in ("forward", "loss", "backward")), default=0)

    def _reduce(self, gm: fx.GraphModule, values: list[fx.Node], origins: dict[fx.Node, str], rule: str,
                place: dict[fx.Node, tuple[int, int]], waits_at: int, nodes: list[fx.Node]) -> None:
        """One collective over ``values``, issued right after the last of them; each result is
        waited for and averaged before its first consumer, which then reads the average."""
        pos = {n: i for i, n in enumerate(nodes)}
        issue_at = max(pos[v] for v in values)
        graph = gm.graph
        new: list[tuple[fx.Node, int]] = []

        def make(target: Any, args: tuple, origin: str, val: Any, at: int, sub_rule: str) -> fx.Node:
            with graph.inserting_before(nodes[-1]):
                n = graph.call_function(target, args)
            prov = Provenance(self.name, rule=f"{rule}:{sub_rule}", origin=origin, part=COMMUNICATE_PHASE).as_dict()
            n.meta[META_KEY] = prov
            n.meta["val"] = val
            new.append((n, at))
            return n

        if len(values) == 1:
            issued = [make(c10d.all_reduce.default, (values[0], "sum", self.group_name), origins[values[0]],
                           values[0].meta.get("val"), issue_at, "all_reduce")]
        else:
            coalesced = make(c10d.all_reduce_coalesced.default, (list(values), "sum", self.group_name),
                             "; ".join(origins[v] for v in values), [v.meta.get("val") for v in values], issue_at,
                             "all_reduce_coalesced")
            issued = [make(operator.getitem, (coalesced, i), origins[v], v.meta.get("val"), issue_at, "result")
                      for i, v in enumerate(values)]
        for v, result in zip(values, issued):
            consumers = _consumers(v)
            first = min((pos[u] for u in consumers if phase_of(u) not in UPDATE_PHASES), default=len(nodes) - 1)
            at = max(issue_at, min(waits_at, first - 1))
            waited = make(c10d.wait_tensor.default, (result,), origins[v], v.meta.get("val"), at, "wait")
            avg = make(aten.div.Tensor, (waited, float(self.world_size)), origins[v], v.meta.get("val"), at, "average")
            for u in consumers:
                u.replace_input_with(v, avg)
        for n, at in new:
            place[n] = (at, len(place))

    @staticmethod
    def _start_order(nodes: list[fx.Node], place: dict[fx.Node, tuple[int, int]]) -> list[fx.Node]:
        """The graph's order with each new node right after the position it was placed at
        (``schedule`` then moves the updates after the averages they read)."""
        after: dict[int, list[fx.Node]] = {}
        for n, (at, k) in sorted(place.items(), key=lambda item: item[1]):
            after.setdefault(int(at), []).append(n)
        order: list[fx.Node] = []
        for i, n in enumerate(nodes):
            if n.op == "output":
                continue
            order.append(n)
            order += after.get(i, [])
        order.append(nodes[-1])
        return order
