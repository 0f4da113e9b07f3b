"""Merge: fold each adapter into its base weight (``W <- W + ΔW``) and delete its branch.

The merged graph is the base model's graph again (same op count); only weights differ. The
method of each adapter supplies the merged base tensors (``AdapterMethod.merged_tensors``:
``W + ΔW`` by default, in the weight's own layout). Adapters of a method that cannot be merged
(routed experts, MoLE: their update depends on the input) raise, or with ``keep_unmergeable``
stay in the graph as they are (``CompiledModel.merge`` keeps them).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.errors import PassError
from graphpeft.graph import (META_KEY, adapter_joins, adapters, get_tensor, graph_meta, iter_created,
                             register_tensor, remove_tensor, roles)
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import get_method, register_pass


#: ``graph_meta(gm)`` key, while the pass runs: base tensor name -> its value before the pass
#: folded anything into it. A layer may carry several adapters (named adapters stacked); a
#: method whose merge depends on the weight itself (DoRA's norm, taken of the base weight as
#: the forward does) reads it there, as PEFT's merge does.
UNMERGED = "unmerged_weights"


def unmerged_weight(gm: fx.GraphModule, name: str) -> torch.Tensor:
    """Base tensor ``name`` as it was before the running merge folded other adapters into it."""
    pending = ((getattr(gm, "meta", None) or {}).get(META_KEY) or {}).get(UNMERGED) or {}
    return pending[name] if name in pending else get_tensor(gm, name).detach()


@register_pass
class MergeAdapters(PassBase):
    """Folds adapters (all, or the given layer paths) into base weights; in place.

    Args:
        layers: layer paths whose adapters to merge (default: every adapter).
        keep_unmergeable: leave adapters whose method is not mergeable (MoLE) in the graph,
            branch, record and tensors, instead of raising.
    """

    name = "merge_adapters"

    def __init__(self, layers: Optional[Sequence[str]] = None, keep_unmergeable: bool = False) -> None:
        self.layers = None if layers is None else set(layers)
        self.keep_unmergeable = keep_unmergeable

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records = adapters(gm)
        todo = [k for k in records if self.layers is None or records[k]["layer"] in self.layers]
        unmerged = graph_meta(gm).setdefault(UNMERGED, {})
        try:
            for adapter_id in list(todo):
                rec = records[adapter_id]
                method = get_method(rec["method"])
                if method is not None and not method.mergeable and self.keep_unmergeable:
                    todo.remove(adapter_id)  # stays: branch, record and tensors
                    continue
                if method is None:
                    raise PassError(self.name, f"adapter on {rec['layer']}: method {rec['method']!r} is not registered")
                if not method.mergeable:
                    raise PassError(self.name, f"adapter on {rec['layer']} ({rec['method']}) cannot be merged into "
                                    "its weight (method not mergeable); export with merged=False, or use "
                                    "CompiledModel.merge(), which folds the other adapters and keeps this one")
                with torch.no_grad():
                    # usually {weight: W + ΔW}; a method may also change the bias (IA3) or fold
                    # non-additively (DoRA). New tensors: the source model keeps its weights.
                    merged = method.merged_tensors(gm, rec)
                for name, value in merged.items():
                    old = get_tensor(gm, name)
                    unmerged.setdefault(name, old.detach())
                    register_tensor(gm, name, value.to(old.dtype).contiguous(), roles(gm)[name])
                self._remove_branch(gm, adapter_id, rec)
                del records[adapter_id]
        finally:
            graph_meta(gm).pop(UNMERGED, None)
        return PassResult(gm, bool(todo))

    @staticmethod
    def _remove_branch(gm: fx.GraphModule, adapter_id: str, rec: dict) -> None:
        nodes = {n.name: n for n in gm.graph.nodes}
        for name in adapter_joins(rec):  # one per call of a module called several times
            join = nodes[name]
            join.replace_all_uses_with(join.args[0])
        created = list(iter_created(gm, adapter_id))
        for node in reversed(created):
            if node.users:
                raise PassError(MergeAdapters.name, f"adapter node {node.name} still has users {list(node.users)}")
            gm.graph.erase_node(node)
        # a tensor shared by several adapters (VeRA's vera_A / vera_B) stays while others read it
        still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in rec["tensors"].values():
            if name not in still_read:
                remove_tensor(gm, name)
