"""Dead-code elimination that also drops tensors no node reads any more."""

from __future__ import annotations

import torch.fx as fx

from graphpeft.graph import remove_tensor, roles
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass


@register_pass
class RemoveDeadCode(PassBase):
    """Removes side-effect-free nodes whose results are unused, then unreferenced tensors."""

    name = "remove_dead_code"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = gm.graph.eliminate_dead_code()
        referenced = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in [n for n in roles(gm) if n not in referenced]:
            remove_tensor(gm, name)
            modified = True
        return PassResult(gm, modified)
