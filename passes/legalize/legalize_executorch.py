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

* ``partition_meta`` (training graphs) — ``torch_fn`` / ``source_fn_stack`` / ``nn_module_stack``
  are dropped from every node. XNNPACK's ``ConvertToLinearPass`` groups the matmuls it finds
  under one ``nn.Linear`` source into one linear: in a training graph the backward matmuls of a
  layer carry the forward layer's source too, and the pass fails (``a and b must have same
  reduction dim``). Without the tags the matmuls are lowered as matmuls.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

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


def _strip_partition_meta(gm: fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        dropped = [k for k in PARTITION_META if node.meta.pop(k, None) is not None]
        if node.meta.get("nn_module_stack"):
            node.meta["nn_module_stack"] = {}
            dropped.append("nn_module_stack")
        count += bool(dropped)
    return count


#: rule name -> rewrite (returns its count), in the order they run
RULES: dict[str, Callable[[fx.GraphModule], int]] = {
    "inline_grad_regions": _inline_grad_regions,
    "drop_asserts": _drop_asserts,
    "functionalize": _functionalize,
    "empty": _replace_empty,
    "view_as_reshape": _view_as_reshape,
    "partition_meta": _strip_partition_meta,
}


@register_pass
class LegalizeExecuTorch(PassBase):
    """Rewrites a graph so ExecuTorch's ``to_edge`` (and the XNNPACK partitioner) take it; in
    place. ``training=True`` also drops the source-partition tags (see the module docstring);
    ``rules`` runs only the named rules (e.g. ``["partition_meta"]``).

    ``ctx.options["legalize_executorch"]`` receives the count of rewrites per rule."""

    name = PASS_NAME

    def __init__(self, training: bool = False, rules: Optional[Sequence[str]] = None) -> None:
        self.training = training
        unknown = set(rules or ()) - set(RULES)
        if unknown:
            raise ValueError(f"unknown legalize_executorch rule(s) {sorted(unknown)}; known: {list(RULES)}")
        self.rules = tuple(rules) if rules is not None else tuple(RULES)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts = {}
        for name, rule in RULES.items():  # in this order: the grad regions hold asserts and casts
            if name in self.rules and (name != "partition_meta" or self.training):
                counts[name] = rule(gm)
        ctx.options[self.name] = counts
        return PassResult(gm, any(counts.values()))

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        from graphpeft.errors import VerificationError

        refused = (EMPTY if "empty" in self.rules else set()) | (ASSERTS if "drop_asserts" in self.rules else set())
        bad = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in refused]
        if bad:
            raise VerificationError(f"legalize_executorch left ops to_edge cannot take: {bad[:10]}")
