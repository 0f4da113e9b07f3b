"""Torch executor only: each fused AdamW chunk of a step graph → one call of PyTorch's fused kernel.

A step's fused update (``TrainingOptions.fuse_optimizer``) is traced as AdamW's arithmetic on
the concatenation of a chunk's trainable tensors, their two slots and their gradients, the
results kept or dropped on the step's finite flag (``where``) and split back into tensors: for
the benchmark Llama's 56 LoRA tensors ~600 nodes, most of them views, concatenations and splits
that the torch executor calls one by one. This pass replaces, per chunk, everything from the
concatenated parameters and slots to the per-tensor results by one
``graphpeft::adamw_update`` (:mod:`graphpeft.training.fused_kernels`: ``torch._fused_adamw_``
on copies, dropped on the same flag). The concatenated gradients stay: the finite flag reads
them.

Executor: torch (the default runner applies it to its own copy of the graph). Exports and
memory plans read the stored graph, which never holds the fused op; inductor compiles the
flat arithmetic itself.

Exact up to rounding: the kernel computes AdamW's step in another order (bias corrections in
double precision), so results differ from the traced arithmetic by a few units in the last
place (the same as ``torch.optim.AdamW(fused=True)`` against ``foreach=False``).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from graphpeft.graph import GraphBuilder, Provenance, graph_meta, val
from graphpeft.infra import PassContext
from graphpeft.registry import register_pass
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule
from graphpeft.training.fused_kernels import adamw_update
from graphpeft.training.optim import STEP_KEY
from graphpeft.training.signature import TRAINING_META, TrainingSignature, phase_of

aten = torch.ops.aten
VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
SLOTS = ("exp_avg", "exp_avg_sq")


def _flat_sources(cat: object) -> Optional[list[fx.Node]]:
    """The tensors ``cat`` concatenates flattened (``cat([view(t, [-1]), ...])``), else None."""
    if not isinstance(cat, fx.Node) or cat.target != aten.cat.default or cat.kwargs:
        return None
    if len(cat.args) > 1 and cat.args[1] not in (0, -1):
        return None
    out = []
    for piece in cat.args[0]:
        if not isinstance(piece, fx.Node) or piece.target not in VIEWS or val(piece) is None \
                or val(piece).dim() != 1:
            return None
        out.append(piece.args[0])
    return out


def _kept(split: fx.Node) -> Optional[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """For ``split_with_sizes(where(flag, new, cat(flat inputs)))``: (flag, new, inputs)."""
    w = split.args[0]
    if not isinstance(w, fx.Node) or w.target != aten.where.self or len(w.args) != 3:
        return None
    sources = _flat_sources(w.args[2])
    return (w.args[0], w.args[1], sources) if sources is not None else None


def _inputs(gm: fx.GraphModule) -> dict[tuple[str, str], fx.Node]:
    sig = _signature(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {(s.kind, s.key): n for s, n in zip(sig.inputs, placeholders)} if sig is not None else {}


def _signature(gm: fx.GraphModule) -> Optional[TrainingSignature]:
    """The step's signature (None on a graph that is not a training step: nothing to match)."""
    return graph_meta(gm).get(TRAINING_META)


def _slot_split(ph: fx.Node, count: int) -> Optional[fx.Node]:
    """The ``split_with_sizes`` that returns the kept update of the chunk whose first slot
    input is ``ph``."""
    for view in ph.users:
        for cat in view.users:
            for w in cat.users:
                if w.target == aten.where.self and len(w.args) == 3 and w.args[2] is cat:
                    for s in w.users:
                        if s.target == aten.split_with_sizes.default and len(s.args[1]) == count:
                            return s
    return None


def _reads_only(new: fx.Node, allowed: set[fx.Node]) -> Optional[str]:
    """None when ``new`` is computed from ``allowed`` and constants only, else what else it reads."""
    seen, stack = set(), [new]
    while stack:
        n = stack.pop()
        if n in seen or n in allowed:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr"):
            return f"the update reads {n.name}"
        stack.extend(n.all_input_nodes)
    return None


def _grad_cat(new_m: fx.Node, cats: set[fx.Node], count: int) -> Optional[fx.Node]:
    """The one concatenation of ``count`` computed (not input) tensors that the first moment's
    update reads, besides the chunk's own ``cats``: the flat gradients."""
    found, seen, stack = set(), set(), [new_m]
    while stack:
        n = stack.pop()
        if n in seen or n in cats or n.op != "call_function":
            continue
        seen.add(n)
        sources = _flat_sources(n)
        if sources is not None:
            if len(sources) == count and all(s.op == "call_function" for s in sources):
                found.add(n)
            continue
        stack.extend(n.all_input_nodes)
    return found.pop() if len(found) == 1 else None


class AdamWChunk(RewriteRule):
    """``split(where(flag, adamw(...), cat(params)))`` and its two slot twins → ``adamw_update``."""

    name = "adamw_chunk"

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if node.target != aten.split_with_sizes.default or phase_of(node) != "optimizer":
            return None
        kept = _kept(node)
        if kept is None:
            return None
        inputs = _inputs(gm)
        names = {n: key for (kind, key), n in inputs.items() if kind == "param"}
        if not kept[2] or any(p not in names for p in kept[2]):
            return None  # a slot's split (matched through its parameters' split)
        return MatchResult.success(self.name, node, "", flag=kept[0], new=kept[1], params=kept[2],
                                   names=[names[p] for p in kept[2]], inputs=inputs)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        sig = _signature(gm)
        opt = dict(sig.optimizer) if sig is not None else {}
        if opt.get("name") != "adamw" or opt.get("amsgrad"):
            return f"optimizer {opt.get('name')!r}{' with amsgrad' if opt.get('amsgrad') else ''}: only AdamW has a kernel here"
        b = match.bindings
        if any(val(p) is None or val(p).dtype != torch.float32 for p in b["params"]):
            return "not every tensor is float32 (the kernel computes low precision in float32: other rounding)"
        inputs, names = b["inputs"], b["names"]
        splits, slots = [match.node], []
        for slot in SLOTS:
            phs = [inputs.get(("state", f"{n}:{slot}")) for n in names]
            split = _slot_split(phs[0], len(names)) if phs[0] is not None else None
            kept = _kept(split) if split is not None else None
            if kept is None or kept[2] != phs or kept[0] is not b["flag"]:
                return f"no kept {slot} update over the same tensors and flag"
            splits.append(split)
            slots.append((kept[1], kept[2]))
        cats = {s.args[0].args[2] for s in splits}
        g_cat = _grad_cat(slots[0][0], cats, len(names))
        grads = _flat_sources(g_cat) if g_cat is not None else None
        if grads is None:
            return "the first moment does not read one concatenation of the chunk's gradients"
        grads = [g.args[0] if g.target == aten.clone.default else g for g in grads]
        if any(val(g) is None or val(g).shape != val(p).shape for g, p in zip(grads, b["params"])):
            return "a gradient's shape differs from its tensor's"
        step, lr = inputs.get(("state", STEP_KEY)), inputs.get(("lr", "lr"))
        if step is None or lr is None:
            return "the step count or lr input is missing"
        allowed = cats | {g_cat, step, lr}
        for new in (b["new"], *(n for n, _ in slots)):
            reason = _reads_only(new, allowed)
            if reason is not None:
                return reason + " (not only the chunk's tensors, slots, gradients, lr and step)"
        for split, tensors in zip(splits, (b["params"], *(t for _, t in slots))):
            for item in split.users:
                if item.target is not operator.getitem:
                    return f"{split.name} is read by {item.name}, not only indexed"
                shape = val(tensors[item.args[1]]).shape
                if any(u.target not in VIEWS or val(u).shape != shape for u in item.users) \
                        and val(item).shape != shape:
                    return f"{item.name} is read other than viewed back to its tensor's shape"
        b.update(splits=splits, slots=[t for _, t in slots], grads=grads, step=step, lr=lr, optimizer=opt)
        return None

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        b = match.bindings
        opt = b["optimizer"]
        beta1, beta2 = (float(x) for x in opt["betas"])
        anchor = max((s.args[0] for s in b["splits"]), key=_order(gm))
        g = GraphBuilder(gm, anchor, Provenance(FusedOptimizerKernel.name, self.name, part="optimizer"))
        fused = g.call(torch.ops.graphpeft.adamw_update.default, list(b["params"]), list(b["grads"]),
                       list(b["slots"][0]), list(b["slots"][1]), b["step"], b["lr"], b["flag"], beta1, beta2,
                       float(opt["eps"]), float(opt["weight_decay"]))
        count = len(b["params"])
        for k, split in enumerate(b["splits"]):
            for item in list(split.users):
                new = g.call(operator.getitem, fused, k * count + item.args[1])
                for u in list(item.users):
                    if u.target in VIEWS and val(u).shape == val(new).shape:
                        u.replace_all_uses_with(new)
                item.replace_all_uses_with(new)


def _order(gm: fx.GraphModule):  # noqa: ANN202 - key function
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    return pos.__getitem__


@register_pass
class FusedOptimizerKernel(RewritePass):
    """Replaces each fused AdamW chunk's flat arithmetic by one fused-kernel op (torch executor)."""

    name = "fused_optimizer_kernel"
    sweep_dead_code = True  # the flat arithmetic the kernel replaced

    def __init__(self) -> None:
        super().__init__([AdamWChunk()])


__all__ = ["FusedOptimizerKernel", "adamw_update"]
