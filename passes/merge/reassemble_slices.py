"""Reassemble row-sliced weights (``slice_rows``) into the original layer op: run by ``merge()``.

For every record in ``gm.meta["graphpeft"]["slices"]`` the pass puts the trainable slice and
the frozen rest back into one weight under its original name (exactly: an index copy, no
arithmetic), replaces the slice / rest / concatenation / permutation nodes by the original op
``linear(x, W, b)`` (``addmm(b, x, W)``, ``conv2d(x, W, b, ...)``) and removes the slice
tensors. The restored op carries the original layer's module stack and no pass provenance, like
the op the trace made, so the merged graph is the base model's graph again (same op count) and
``find_layers`` sees the layer as before.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, Role, fake_eval, fake_mode_of, get_tensor, graph_meta, register_tensor, remove_tensor
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_merge_step, register_pass

from ..update.slice_rows import SLICES_META, SliceRows

aten = torch.ops.aten


def reassembled_weight(gm: fx.GraphModule, rec: dict) -> torch.Tensor:
    """The full weight of a sliced layer: slice rows and rest rows back in their places."""
    w_slice = get_tensor(gm, rec["tensors"]["slice"]).detach()
    w_rest = get_tensor(gm, rec["tensors"]["rest"]).detach()
    dim = 1 if rec["fan_in_fan_out"] else 0
    rows = torch.tensor(rec["rows"], dtype=torch.long)
    rest = torch.tensor([i for i in range(rec["out_features"]) if i not in set(rec["rows"])], dtype=torch.long)
    weight = torch.empty(rec["weight_shape"], dtype=w_slice.dtype, device=w_slice.device)
    weight.index_copy_(dim, rows, w_slice)
    weight.index_copy_(dim, rest, w_rest)
    return weight


def _conv_op(name: str) -> torch._ops.OpOverload:
    """The convolution op recorded as ``"aten.conv3d.default"`` (``str`` of the op)."""
    _, packet, overload = name.split(".")
    return getattr(getattr(aten, packet), overload)


@register_pass
class ReassembleSlices(PassBase):
    """Folds every row-sliced weight back into its original tensor and op (in place)."""

    name = "reassemble_slices"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records = graph_meta(gm).get(SLICES_META, {})
        if not records:
            return PassResult(gm, False)
        fake_mode = fake_mode_of(gm)
        for path in list(records):
            rec = records[path]
            nodes = {n.name: n for n in gm.graph.nodes}
            out, x = nodes[rec["output"]], nodes[rec["input"]]
            register_tensor(gm, rec["weight"], reassembled_weight(gm, rec), Role.FROZEN)
            with gm.graph.inserting_before(out):
                w = gm.graph.get_attr(rec["weight"])
                b = gm.graph.get_attr(rec["bias"]) if rec["bias"] else None
                if rec["kind"] == "conv":
                    c = rec["conv_args"]
                    target = _conv_op(rec["op"])
                    args: tuple = (x, w, b, c["stride"], c["padding"], c["dilation"], c["groups"])
                elif rec["fan_in_fan_out"]:
                    target, args = aten.addmm.default, (b, x, w)
                else:
                    target, args = aten.linear.default, (x, w, b)
                op = gm.graph.call_function(target, args)
            if rec["module_stack"]:
                op.meta["nn_module_stack"] = dict(rec["module_stack"])
            if fake_mode is not None:
                for attr in (w, b):
                    if attr is not None:
                        attr.meta["val"] = fake_mode.from_tensor(get_tensor(gm, attr.target), static_shapes=True)
                op.meta["val"] = fake_eval(fake_mode, target, args, {})
            out.replace_all_uses_with(op)
            created = [n for n in gm.graph.nodes
                       if (n.meta.get(META_KEY) or {}).get("pass_name") == SliceRows.name
                       and (n.meta.get(META_KEY) or {}).get("origin") == path]
            for node in reversed(created):
                gm.graph.erase_node(node)
            for name in rec["tensors"].values():
                if name:
                    remove_tensor(gm, name)
            del records[path]
        return PassResult(gm, True)


register_merge_step(ReassembleSlices.name)
