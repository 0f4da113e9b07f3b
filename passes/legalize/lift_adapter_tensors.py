"""Lift adapter tensors out of the graph: each becomes a graph input instead of a constant.

An unmerged graph exported after this pass takes the adapter's tensors as inputs, so one
exported file serves every adapter of the same shapes (swap adapters by feeding other tensors,
no re-export). Both :attr:`Role.ADAPTER` and :attr:`Role.ADAPTER_CONST` tensors are lifted by
default: two adapters of one plan differ in their constants too (VeRA's seeded projections,
SHiRA's indices).

The new placeholders come after the model's own inputs, in the order the graph first reads the
tensors; ``graph_meta(gm)["lifted_inputs"]`` lists the lifted tensor names in that order. Each
tensor leaves the graph module (and its role map): the graph no longer holds it.
"""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from graphpeft.graph import Role, fake_mode_of, get_tensor, graph_meta, remove_tensor, roles
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass

META_LIFTED = "lifted_inputs"


@register_pass
class LiftAdapterTensors(PassBase):
    """Replaces every read of an adapter tensor by a new graph input; in place."""

    name = "lift_adapter_tensors"

    def __init__(self, lift_roles: Sequence[Role] = (Role.ADAPTER, Role.ADAPTER_CONST)) -> None:
        self.lift_roles = tuple(Role(r) for r in lift_roles)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        role_map = roles(gm)
        reads: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr" and role_map.get(node.target) in self.lift_roles:
                reads.setdefault(node.target, []).append(node)
        if not reads:
            graph_meta(gm)[META_LIFTED] = []
            return PassResult(gm, False)
        fake_mode = fake_mode_of(gm)
        last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        for name, nodes in reads.items():
            with gm.graph.inserting_after(last):
                # the placeholder's target is its name (the Python argument): a safe identifier
                ph = gm.graph.placeholder("adapter_" + name.replace(".", "_"))
            if fake_mode is not None:
                ph.meta["val"] = fake_mode.from_tensor(get_tensor(gm, name), static_shapes=True)
            for node in nodes:
                node.replace_all_uses_with(ph)
                gm.graph.erase_node(node)
            remove_tensor(gm, name)
            last = ph
        graph_meta(gm)[META_LIFTED] = list(reads)
        return PassResult(gm, True)
