"""Legalize a graph for ExecuTorch's ``to_edge`` and its XNNPACK delegate.

Shared with ``legalize_onnx`` (the problem is the same there; the rule functions are that
pass's, not copies):

* ``inline_grad_regions`` — ``wrap_with_set_grad_enabled`` regions (``torch.no_grad()`` blocks
  inside a model) are inlined: grad mode means nothing to an exported program.
* ``drop_asserts`` — value-less checks (``_assert_tensor_metadata`` ...) are removed: the edge
  dialect verifier rejects them, and shapes are static in a ``.pte``.
* ``functionalize`` — in-place ops on fresh tensors (silu backward's ``copy_`` / ``sub_``) become
  their out-of-place forms; ``to_edge`` takes functional graphs only.
* ``empty`` — ``empty_permuted`` / ``empty_strided`` ... (from attention backward) become
  zero-filled tensors; ``to_edge`` rejects ``empty_permuted`` (not core ATen).

ExecuTorch's own:

* ``view_as_reshape`` — ``aten.view`` becomes ``aten.reshape``. Re-traced through the core ATen
  decompositions, the fused attention's output comes out with other strides than its meta
  kernel gave at trace time, and the ``view`` that follows fails (GPT-2, ViT: "Cannot view a
  tensor with shape [2, 8, 16] and strides (16, 32, 1)"); ``reshape`` is the same value, a view
  wherever one is possible.

* ``linear_2d`` (run on the captured program, whose shapes are static) — a ``linear`` over more
  than two dimensions becomes reshape to 2-D, ``linear``, reshape back. Decomposed as it is, a
  linear whose input is not contiguous in the re-trace (Llama's ``o_proj`` after attention)
  becomes ``expand`` + ``bmm``, and XNNPACK's ``ConvertToLinearPass`` then builds a linear with
  a 3-D weight from that layer's partition and fails ("t() expects a tensor with <= 2
  dimensions"); the 2-D form decomposes to ``mm`` with the transposed weight, which it takes.

* ``partition_meta`` (training graphs) — ``torch_fn`` / ``source_fn_stack`` / ``nn_module_stack``
  are dropped from every node. XNNPACK's ``ConvertToLinearPass`` groups the matmuls it finds
  under one ``nn.Linear`` source into one linear: in a training graph the backward matmuls of a
  layer carry the forward layer's source too, and the pass fails (``a and b must have same
  reduction dim``). Without the tags the matmuls are lowered as matmuls. In inference graphs
  the adapter nodes lose their tags: they carry their layer's module path, so the pass puts the
  adapter's matmuls into the base layer's partition and builds its linears from the wrong inputs
  — **silently wrong outputs** (0.3 off on a LoRA Llama) rather than an error.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from graphpeft.graph import META_KEY
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass

from .legalize_onnx import ASSERTS, EMPTY, _drop_asserts, _functionalize, _inline_grad_regions, _replace_empty

aten = torch.ops.aten

PASS_NAME = "legalize_executorch"
#: node metadata that source partitioners (XNNPACK's linear fusion) group nodes by
PARTITION_META = ("torch_fn", "source_fn_stack")


def _view_as_reshape(gm: fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.view.default:
            node.target = aten.reshape.default  # same arguments, same value: retargeted in place
            count += 1
    return count


def _linear_2d(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        x, out = node.args[0], node.meta.get("val")
        xv = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(xv, torch.Tensor) or xv.dim() <= 2 or not isinstance(out, torch.Tensor):
            continue
        if any(not isinstance(d, int) for d in (*xv.shape, *out.shape)):
            continue  # symbolic shapes: this rule is for the captured (static) program
        with gm.graph.inserting_before(node):
            flat = gm.graph.call_function(aten.reshape.default, (x, [-1, int(xv.shape[-1])]))
            flat.meta = dict(node.meta, val=xv.reshape(-1, xv.shape[-1]))
            lin = gm.graph.call_function(aten.linear.default, (flat, *node.args[1:]), dict(node.kwargs))
            lin.meta = dict(node.meta, val=out.reshape(-1, out.shape[-1]))
            back = gm.graph.call_function(aten.reshape.default, (lin, [int(d) for d in out.shape]))
            back.meta = dict(node.meta)
        node.replace_all_uses_with(back)
        gm.graph.erase_node(node)
        count += 1
    return count


def _strip_partition_meta(gm: fx.GraphModule, adapters_only: bool = False) -> int:
    count = 0
    for node in gm.graph.nodes:
        if adapters_only and not (node.meta.get(META_KEY) or {}).get("adapter"):
            continue
        dropped = [k for k in PARTITION_META if node.meta.pop(k, None) is not None]
        if node.meta.get("nn_module_stack"):
            node.meta["nn_module_stack"] = {}
            dropped.append("nn_module_stack")
        count += bool(dropped)
    return count


#: rules that run only when named (``rules=[...]``): they are for the captured program
ON_REQUEST = ("linear_2d",)
#: rule name -> rewrite (returns its count), in the order they run
RULES: dict[str, Callable[[fx.GraphModule], int]] = {
    "inline_grad_regions": _inline_grad_regions,
    "drop_asserts": _drop_asserts,
    "functionalize": _functionalize,
    "empty": _replace_empty,
    "view_as_reshape": _view_as_reshape,
    "linear_2d": _linear_2d,
    "partition_meta": _strip_partition_meta,
}


@register_pass
class LegalizeExecuTorch(PassBase):
    """Rewrites a graph so ExecuTorch's ``to_edge`` (and the XNNPACK partitioner) take it; in
    place. ``training=True`` drops the source-partition tags of every node, else only those of
    adapter nodes (see the module docstring);
    ``rules`` runs only the named rules (``linear_2d`` runs only when named: on the captured
    program).

    ``ctx.options["legalize_executorch"]`` receives the count of rewrites per rule."""

    name = PASS_NAME

    def __init__(self, training: bool = False, rules: Optional[Sequence[str]] = None) -> None:
        self.training = training
        unknown = set(rules or ()) - set(RULES)
        if unknown:
            raise ValueError(f"unknown legalize_executorch rule(s) {sorted(unknown)}; known: {list(RULES)}")
        self.rules = tuple(rules) if rules is not None else tuple(RULES)
        self._rules_given = rules

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts = {}
        for name, rule in RULES.items():  # in this order: the grad regions hold asserts and casts
            if name not in self.rules or (name in ON_REQUEST and self._rules_given is None):
                continue
            if name == "partition_meta":  # training graphs: every node; inference: adapter nodes
                counts[name] = _strip_partition_meta(gm, adapters_only=not self.training)
            else:
                counts[name] = rule(gm)
        ctx.options[self.name] = counts
        return PassResult(gm, any(counts.values()))

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        from graphpeft.errors import VerificationError

        refused = (EMPTY if "empty" in self.rules else set()) | (ASSERTS if "drop_asserts" in self.rules else set())
        bad = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in refused]
        if bad:
            raise VerificationError(f"legalize_executorch left ops to_edge cannot take: {bad[:10]}")
