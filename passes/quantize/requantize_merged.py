"""After merge: quantize the merged weights again, in the format they had (a merge step).

:mod:`.dequantize_for_merge` gave the adapted layers float weights so that ``merge_adapters``
could fold ``W + ΔW``; this pass stores each such weight quantized again (same dtype and group
size, a fresh scale per group). The round trip adds one rounding error on top of the adapter's
update, as peft's ``merge_and_unload`` on a 4-bit base does; each record says
``requantized_after_merge`` and a warning names the weights. ``cm.merge(requantize=False)``
leaves them float (no new error, float bytes).
"""

from __future__ import annotations

import logging
import warnings

import torch.fx as fx

from graphpeft.graph import find_layers, graph_meta
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_merge_step, register_pass

from .dequantize_for_merge import PENDING
from .quantize_weights import store_quantized

log = logging.getLogger(__name__)


@register_pass
class RequantizeMerged(PassBase):
    """Stores the merged weights that were quantized before the merge quantized again (in place)."""

    name = "requantize_merged"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        pending = graph_meta(gm).pop(PENDING, None) or {}
        if not pending:
            return PassResult(gm, False)
        stacks = {l.weight: l.node.meta.get("nn_module_stack") for l in find_layers(gm)}
        for name, old in pending.items():
            rec = store_quantized(gm, name, old["dtype"], old["group_size"], pass_name=self.name,
                                  rule_name=old["rule"], origin=old["layers"][0], module_stack=stacks.get(name))
            rec["layers"] = old["layers"]
            rec["requantized_after_merge"] = True
        msg = (f"merge re-quantized {len(pending)} merged weight(s) ({', '.join(sorted({r['dtype'] for r in pending.values()}))}): "
               "W + ΔW was rounded to the quantized format again, which adds a quantization error; "
               "merge(requantize=False) keeps merged weights in float")
        log.warning(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
        return PassResult(gm, True)


register_merge_step(RequantizeMerged.name)
