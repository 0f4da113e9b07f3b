"""One form for every linear layer: ``x @ W.T``, ``mm``, ``addmm`` and einsum become ``aten.linear``.

A linear layer can be written many ways (Falcon's ``FalconLinear`` computes
``hidden_states @ self.weight.T``; other models use ``torch.einsum("...i,oi->...o", x, W)`` or
``x.mm(W.t())``). The frontends run :func:`canonicalize_linears` on every traced graph, so the
IR has a single linear op, ``aten.linear(x, W[, b])`` with ``W`` a parameter stored
``(out, in)``: layer matching, every adapter method, merging and the backends then see one form.

The rewrite is exact: ``at::linear`` without a bias *is* ``matmul(x, W.t())``, and an einsum of
that shape computes the same GEMM (checked bit for bit in ``tests/test_compat_linear_forms.py``).
A bias is folded in (``linear(x, W, b)``) only when it is a ``(out,)`` parameter added straight
to the product (``x @ W.T + b``), so methods that act on a layer's output (IA3, DoRA) see the
bias inside the layer, as PEFT does on an ``nn.Linear`` subclass.

Not rewritten: a weight stored ``(in, out)`` and used untransposed (``x @ W``), a weight that
is not a graph tensor (computed in forward), and einsums that are not a plain projection of the
last dimension.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

import torch
import torch.fx as fx

__all__ = ["canonicalize_linears", "LINEAR_FORM_KEY"]

log = logging.getLogger(__name__)
aten = torch.ops.aten

#: ``node.meta`` key on a rewritten ``aten.linear``: the op it was written as (``"matmul"``, ...)
LINEAR_FORM_KEY = "linear_form"

_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int)


def _get_attr_2d(node: object) -> Optional[fx.Node]:
    """``node`` if it is a ``get_attr`` of a 2-D floating-point tensor, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        try:
            v = _attr_tensor(node)
        except AttributeError:
            return None
    return node if v.dim() == 2 and v.is_floating_point() else None


def _attr_tensor(node: fx.Node) -> torch.Tensor:
    mod = node.graph.owning_module
    for part in str(node.target).split("."):
        mod = getattr(mod, part)
    return mod  # type: ignore[return-value]


def _transposed_weight(node: object) -> Optional[fx.Node]:
    """The weight ``W`` when ``node`` is ``W.T`` / ``W.t()`` / ``W.permute(1, 0)`` /
    ``W.transpose(0, 1)`` of a 2-D graph tensor, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    if node.target == aten.permute.default and [d % 2 for d in node.args[1]] != [1, 0]:
        return None
    if node.target == aten.transpose.int and {node.args[1] % 2, node.args[2] % 2} != {0, 1}:
        return None
    return _get_attr_2d(node.args[0])


def _einsum_operands(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """``(x, W)`` when ``node`` is an einsum that projects the last dimension of ``x`` with a
    weight ``W`` stored ``(out, in)`` (``"...i,oi->...o"``, ``"bsi,oi->bso"``, operands in
    either order), else None."""
    equation, operands = node.args[0], node.args[1]
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    subs = lhs.split(",")
    if len(subs) != 2:
        return None
    for w_i in (1, 0):
        w, x = _get_attr_2d(operands[w_i]), operands[1 - w_i]
        w_sub, x_sub = subs[w_i], subs[1 - w_i]
        if w is None or not isinstance(x, fx.Node) or not re.fullmatch(r"[a-zA-Z]{2}", w_sub):
            continue
        o, i = w_sub
        rest = x_sub[:-1]
        if (o != i and x_sub.endswith(i) and o not in x_sub and i not in rest
                and out == rest + o and len(set(rest.replace("...", ""))) == len(rest.replace("...", ""))):
            return x, w
    return None


def _linear_operands(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, Optional[fx.Node], str]]:
    """``(x, W, bias, form)`` when ``node`` computes a linear layer in another form."""
    t = node.target
    if t in (aten.matmul.default, aten.mm.default) and len(node.args) == 2:
        w = _transposed_weight(node.args[1])
        if w is not None and isinstance(node.args[0], fx.Node):
            return node.args[0], w, None, t.__name__.split(".")[0]
    if t == aten.addmm.default and not node.kwargs and len(node.args) == 3:
        w, b = _transposed_weight(node.args[2]), node.args[0]
        if w is not None and _is_bias_of(b, w):
            return node.args[1], w, b, "addmm"
    if t == aten.einsum.default:
        found = _einsum_operands(node)
        if found is not None:
            return found[0], found[1], None, "einsum"
    return None


def _is_bias_of(node: object, weight: fx.Node) -> bool:
    """Whether ``node`` is a ``get_attr`` of a 1-D tensor with one entry per output of ``weight``."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    try:
        b, w = _attr_tensor(node), _attr_tensor(weight)
    except AttributeError:
        return False
    return isinstance(b, torch.Tensor) and b.dim() == 1 and b.shape[0] == w.shape[0] and b.dtype == w.dtype


def _added_bias(node: fx.Node, weight: fx.Node) -> Optional[fx.Node]:
    """The add that puts a bias parameter onto ``node`` (its only user), or None."""
    if len(node.users) != 1:
        return None
    add = next(iter(node.users))
    if add.target != aten.add.Tensor or add.kwargs or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    same_module = add.meta.get("nn_module_stack") == node.meta.get("nn_module_stack")
    return add if same_module and _is_bias_of(other, weight) else None


def canonicalize_linears(gm: fx.GraphModule) -> int:
    """Rewrite every linear layer written as ``matmul``/``mm``/``addmm`` against a transposed
    weight, or as a projecting einsum, into ``aten.linear`` (in place); returns how many.

    The new node takes over the old one's metadata (``val``, ``nn_module_stack``) and records
    the original op under :data:`LINEAR_FORM_KEY`; transposes left without users are removed."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        found = _linear_operands(node)
        if found is None:
            continue
        x, w, bias, form = found
        replaced = node
        if bias is None:
            add = _added_bias(node, w)
            if add is not None:
                bias = add.args[1] if add.args[0] is node else add.args[0]
                replaced = add
        with gm.graph.inserting_before(replaced):
            linear = gm.graph.call_function(aten.linear.default, (x, w, bias) if bias is not None else (x, w))
        linear.meta.update(node.meta)
        if "val" in replaced.meta:
            linear.meta["val"] = replaced.meta["val"]
        linear.meta[LINEAR_FORM_KEY] = form
        replaced.replace_all_uses_with(linear)
        gm.graph.erase_node(replaced)
        if replaced is not node:
            gm.graph.erase_node(node)
        count += 1
    if count:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _TRANSPOSES and not node.users:
                gm.graph.erase_node(node)
        gm.recompile()
        log.info("canonicalized %d linear layer(s) written as matmul/mm/addmm/einsum", count)
    return count
