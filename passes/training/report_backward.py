"""Report what the pruned backward of a training graph computes at each layer (analysis pass).

Given the adapted model graph (for the layers: weight layers, norm modules, row-sliced weights
and adapters) the pass reads the training graph and, per layer, finds:

* the backward ops that read the layer's weight (through views such as the transpose of a
  linear's weight): they compute the gradient *through* the layer, ``dx = dy · W`` (for ops
  with an ``output_mask``, such as ``convolution_backward``, only when its first entry is set);
* the gradients of the layer's trainable tensors (the nodes the training compiler tags
  ``grad_of``), described by what the tensor is: full weight, weight slice (rows), bias, norm
  weight, adapter tensors;
* the matrix products among them.

The result, a :class:`graphpeft.training.backward_report.BackwardReport`, goes to
``gm.meta["graphpeft"]["backward"]``; ``TrainingStep.backward_report()`` runs the pass on demand.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from typing import Optional

import torch
import torch.fx as fx

from graphpeft.training.backward_report import BackwardReport, LayerBackward
from graphpeft.graph import META_KEY, adapters, find_layers, find_norms, graph_meta
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass
from graphpeft.training import phase_of, signature_of

from ..update.slice_rows import SLICES_META

aten = torch.ops.aten

MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution_backward.default,
           aten._scaled_dot_product_flash_attention_for_cpu_backward.default}  # fused attention: its products
_VIEWS = {aten.t.default, aten.permute.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.expand.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
          aten.squeeze.dims, aten.alias.default, aten.clone.default, aten._to_copy.default, aten.detach.default,
          operator.getitem}


@dataclasses.dataclass
class _LayerTensors:
    path: str
    kind: str
    position: int
    reads: list[str]  # base weights whose backward use means "input grad"
    tensors: dict[str, str]  # tensor name -> what its gradient is called
    adapter_tensors: list[str] = dataclasses.field(default_factory=list)


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def layer_tensors(model: fx.GraphModule) -> list[_LayerTensors]:
    """The layers of an adapted model graph with their tensors, in graph order."""
    position = {n: i for i, n in enumerate(model.graph.nodes)}
    by_name = {n.name: n for n in model.graph.nodes}
    out: dict[str, _LayerTensors] = {}
    for l in find_layers(model):
        tensors = {l.weight: "weight grad"}
        if l.bias:
            tensors[l.bias] = "bias grad"
        # an embedding's input is indices: no gradient flows through it, and a weight tied to it
        # (GPT-2's lm_head) is read by the head's backward, not the embedding's
        reads = [] if l.kind == "embedding" else [l.weight]
        out[l.path] = _LayerTensors(l.path, l.kind, position[l.node], reads, tensors)
    for l in find_norms(model):
        tensors = {l.weight: "norm weight grad"}
        if l.bias:
            tensors[l.bias] = "norm bias grad"
        out[l.path] = _LayerTensors(l.path, "norm", position[l.node], [l.weight], tensors)
    for path, rec in graph_meta(model).get(SLICES_META, {}).items():
        k = len(rec["rows"])
        tensors = {rec["tensors"]["slice"]: f"weight-slice grad ({k} of {rec['out_features']} rows)"}
        if rec["bias"]:
            tensors[rec["bias"]] = "bias grad"
        node = by_name.get(rec["output"])
        out[path] = _LayerTensors(path, rec["kind"], position.get(node, len(position)),
                                  [rec["tensors"]["slice"], rec["tensors"]["rest"]], tensors)
    for rec in adapters(model).values():
        entry = out.get(rec["layer"])
        if entry is None:
            continue
        for name in rec["tensors"].values():
            entry.tensors[name] = f"adapter grads ({rec['method']})"
            entry.adapter_tensors.append(name)
    return sorted(out.values(), key=lambda e: e.position)


def _closure(node: fx.Node) -> set[fx.Node]:
    """``node`` and every view of it (transposes, reshapes ... of a weight)."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "call_function" and u.target in _VIEWS and u.args and u.args[0] is n and u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _source(node: fx.Node) -> fx.Node:
    """The op that computes ``node``'s data, looking through views."""
    while node.op == "call_function" and node.target in _VIEWS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _computes_input_grad(node: fx.Node) -> bool:
    mask = node.kwargs.get("output_mask")
    if mask is None and node.args and isinstance(node.args[-1], (list, tuple)) and node.args[-1] \
            and all(isinstance(b, bool) for b in node.args[-1]):
        mask = node.args[-1]
    return bool(mask[0]) if mask is not None else True


def backward_report(gm: fx.GraphModule, model: fx.GraphModule) -> BackwardReport:
    """Analyse training graph ``gm`` of adapted model graph ``model``."""
    sig = signature_of(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensor_node: dict[str, list[fx.Node]] = {}
    for node, name in zip(placeholders, sig.params):
        tensor_node.setdefault(name, []).append(node)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            tensor_node.setdefault(node.target, []).append(node)
    grads: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for name in (node.meta.get(META_KEY) or {}).get("grad_of", []):
            grads.setdefault(name, []).append(node)
    trained = set(sig.params)

    def backward_users(names: list[str]) -> set[fx.Node]:
        users: set[fx.Node] = set()
        for name in names:
            for start in tensor_node.get(name, []):
                for v in _closure(start):
                    users |= {u for u in v.users if u.op == "call_function" and u.target not in _VIEWS
                              and phase_of(u) == "backward"}
        return users

    entries: list[LayerBackward] = []
    for lt in layer_tensors(model):
        computes: list[str] = []
        matmuls: set[fx.Node] = set()
        through = [u for u in backward_users(lt.reads) if _computes_input_grad(u)]
        if through:
            computes.append("input grad")
            matmuls |= {u for u in through if u.target in MATMULS}
        matmuls |= {u for u in backward_users(lt.adapter_tensors) if u.target in MATMULS}
        seen_desc: set[str] = set()
        for name, desc in lt.tensors.items():
            if name not in trained or not grads.get(name):
                continue
            matmuls |= {s for s in (_source(g) for g in grads[name]) if s.target in MATMULS}
            if desc == "weight grad":
                shape = next((v.meta.get("val") for v in tensor_node.get(name, [])
                              if isinstance(v.meta.get("val"), torch.Tensor)), None)
                desc = f"weight grad (full{', ' + _shape(shape) if shape is not None else ''})"
            if desc not in seen_desc:
                seen_desc.add(desc)
                computes.append(desc)
        entries.append(LayerBackward(lt.path, lt.kind, bool(computes), computes, len(matmuls),
                                     sorted(n for n in lt.tensors if n in trained)))
    backward = [n for n in gm.graph.nodes if n.op == "call_function" and phase_of(n) == "backward"]
    counts = Counter(str(n.target).replace("aten.", "") for n in backward)
    return BackwardReport(entries, len(backward), sum(1 for n in backward if n.target in MATMULS),
                          dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))


@register_pass
class ReportBackward(PassBase):
    """Stores the :class:`BackwardReport` of a training graph in its meta (analysis).

    Args:
        model: the adapted model graph the training graph was compiled from (for its layers);
            ``CompiledModel.graph_module``.
    """

    name = "report_backward"

    def __init__(self, model: Optional[fx.GraphModule] = None) -> None:
        self.model = model

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.model is None:
            raise ValueError("report_backward needs the adapted model graph: ReportBackward(cm.graph_module)")
        graph_meta(gm)["backward"] = backward_report(gm, self.model)
        return PassResult(gm, False)
