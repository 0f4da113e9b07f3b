"""Retarget the devices a trace baked into a graph: ``arange(device=meta)``, ``to(x, meta)``,
``_assert_tensor_metadata(device=meta)`` ...

``torch.export`` records the device of every tensor an op creates or moves to. A model
compiled on the meta device therefore has ``device=meta`` in its graph, and after its weights
are loaded (``CompiledModel.load_base_weights``) those ops would still make meta tensors; the
other way round, tracing the training step of a meta model whose buffers are real
(``accelerate.init_empty_weights``) needs its ``device=cpu`` ops on meta. This pass rewrites every
``torch.device`` argument of type ``source`` (``"meta"``; ``None``: any) to ``device``, and with
``fake_values`` also the device of the nodes' fake values (``meta["val"]``), so that later
rewrites (an adapter added after loading) see the graph's real device.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass


@register_pass
class RetargetDevice(PassBase):
    """Every baked-in device of type ``source`` becomes ``device`` (in place)."""

    name = "retarget_device"

    def __init__(self, device: Union[str, torch.device] = "cpu", source: Optional[str] = "meta",
                 fake_values: bool = False) -> None:
        self.device = torch.device(device)
        self.source = source
        self.fake_values = fake_values

    def _wants(self, d: torch.device) -> bool:
        return d != self.device and (self.source is None or d.type == self.source)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modified = False

        def swap(a: Any) -> Any:
            nonlocal modified
            if isinstance(a, torch.device) and self._wants(a):
                modified = True
                return self.device
            return a

        for node in gm.graph.nodes:
            if self.fake_values:
                for v in pytree.tree_leaves(node.meta.get("val")):
                    fake = getattr(v, "fake_device", None)
                    if isinstance(fake, torch.device) and self._wants(fake):
                        v.fake_device = self.device  # the value's metadata follows its op
            if node.op == "call_function":
                node.args = pytree.tree_map(swap, node.args)
                node.kwargs = pytree.tree_map(swap, node.kwargs)
        if modified:
            gm.recompile()
        return PassResult(gm, modified)
