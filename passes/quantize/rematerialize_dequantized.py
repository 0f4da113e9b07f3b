"""Training pass: dequantize a quantized weight again for the backward instead of keeping it.

In a training step traced through autograd, a layer's dequantized weight ``W = dequant(q)`` is
read by the forward op and again by the backward (the input gradient ``dY @ W``), so the float
``W`` of every layer stays alive from its forward use to its backward use: at the end of the
forward, all of them at once, which takes back most of what quantization saved. QLoRA's
kernels dequantize again in the backward; this pass does the same in the graph: for every value
computed only from stored tensors, at least one of them quantized (``int8`` / ``uint8`` /
``bfloat16`` / ``float16``), that a backward op reads, it clones the chain of ops that computes
it right before that backward op and points the backward readers at the clone. The forward
copy then dies after its forward use. Cost: the dequantize ops run twice (elementwise work on
the weight, no matmul). Clones carry the original nodes' metadata with phase ``backward`` and
``remat: True``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY, is_constant_factory, roles
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import phase_of

FORWARD_PHASES = ("forward", "loss", "input")
LOW = (torch.int8, torch.uint8, torch.bfloat16, torch.float16)


@register_pass
class RematerializeDequantized(PassBase):
    """Recompute quantized weights' dequantization before their backward readers (in place)."""

    name = "rematerialize_dequantized"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        role_map = roles(gm)
        nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        const: set[fx.Node] = set()  # computed from stored, non-trainable tensors only
        quant: set[fx.Node] = set()  # ... at least one of them low-precision (a quantized weight)
        for n in nodes:
            if n.op == "get_attr":
                role = role_map.get(n.target)
                if role is not None and not role.trainable:
                    const.add(n)
                    v = n.meta.get("val")
                    if isinstance(v, torch.Tensor) and v.dtype in LOW:
                        quant.add(n)
            elif n.op == "call_function" and not n.all_input_nodes:
                if is_constant_factory(n):  # e.g. the int4 unpacking's arange of nibble divisors
                    const.add(n)
            elif n.op == "call_function" and all(a in const for a in n.all_input_nodes):
                const.add(n)
                if any(a in quant for a in n.all_input_nodes):
                    quant.add(n)
        changed = False
        for f in nodes:
            if f.op == "get_attr" or f not in quant:
                continue
            late = [u for u in f.users if u not in const and phase_of(u) not in FORWARD_PHASES]
            if not late:
                continue
            first = min(late, key=index.__getitem__)
            clones: dict[fx.Node, fx.Node] = {}

            def clone(x: fx.Node) -> fx.Node:
                if x.op != "call_function" or x not in const:
                    return x
                if x not in clones:
                    args = fx.map_arg(x.args, clone)
                    kwargs = fx.map_arg(x.kwargs, clone)
                    with graph.inserting_before(first):
                        c = graph.call_function(x.target, args, kwargs)
                    c.meta = dict(x.meta)
                    prov = dict(x.meta.get(META_KEY) or {})
                    prov.update(part=phase_of(first), remat=True)
                    c.meta[META_KEY] = prov
                    clones[x] = c
                return clones[x]

            copy = clone(f)
            for user in late:
                user.replace_input_with(f, copy)
            changed = True
        if changed:
            for n in reversed(list(graph.nodes)):
                if n.op == "call_function" and n in const and not n.users:
                    graph.erase_node(n)
            graph.lint()
            gm.recompile()
        return PassResult(gm, changed)
