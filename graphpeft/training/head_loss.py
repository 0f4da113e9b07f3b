"""The output projection and the cross-entropy as one chunked op (``fuse_head_loss``).

A language model's largest training tensors are its logits: ``tokens x vocab`` floats, made by
the output projection (``lm_head``) only to be reduced to one loss. When the logits are nothing
but the loss's input, the step computes the loss *and its gradients* chunk by chunk of tokens
inside the forward (the scheme of Liger-Kernel's fused linear cross-entropy): per chunk, the
logits, their log-softmax and ``(softmax - onehot) * scale``, then the chunk's input gradient
``p @ W`` and the weight gradient ``p^T @ h`` when ``W`` trains. No full-size logits tensor ever
exists, no GEMM is repeated, and the backward just scales the stored gradients by the incoming
one. The numbers are the same formulas as ``F.cross_entropy`` (summed chunk by chunk).

The rewrite applies when the model's primary output (``logits``) is an ``aten.linear`` of a
stored weight that nothing else reads, and the loss is the built-in ``causal_lm`` or
``cross_entropy``; otherwise the step is traced as before.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .losses import CausalLM, CrossEntropy, Loss, _need_target, primary_output

Tensor = torch.Tensor
CHUNK_BYTES = 2 * 2**20  # logits per chunk: small next to the activations, large enough for GEMM speed
#: fewest tokens per chunk: each chunk reads the whole weight twice (its logits and ``p @ W``), and
#: below ~64 rows that reading sets the GEMMs' time (Qwen2's 151936-token head at 128 tokens: 43 chunks of
#: 3 rows took 5-10x the time of 2 chunks, and onnxruntime prepacked the 545 MB weight once per GEMM at load)
MIN_CHUNK_ROWS = 64


@dataclasses.dataclass
class Head:
    """Where the logits come from: ``linear(input, weight, bias)`` at output leaf ``leaf``."""

    leaf: int
    weight: str
    bias: Optional[str]


def find_head(gm: fx.GraphModule, out_spec: Any, loss: Loss) -> Optional[Head]:
    """The head to fuse with ``loss``, or None (with nothing changed) when the rule does not apply."""
    if type(loss) not in (CausalLM, CrossEntropy):
        return None
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = list(pytree.tree_leaves(out.args[0]))
    try:
        marked = pytree.tree_unflatten(list(range(len(leaves))), out_spec)
        index = primary_output(_as_tensors(marked))
    except Exception:  # noqa: BLE001 - an output structure the loss cannot read: not ours to fuse
        return None
    leaf = int(index.item())
    node = leaves[leaf]
    if not (isinstance(node, fx.Node) and node.target is torch.ops.aten.linear.default):
        return None
    if set(node.users) != {out} or leaves.count(node) != 1:
        return None  # the logits are read elsewhere (or returned twice): they must exist
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    return Head(leaf, weight.target, bias.target if bias is not None else None)


def _as_tensors(tree: Any) -> Any:
    """Leaf indices as 0-d tensors, so :func:`primary_output` can pick one."""
    return pytree.tree_map(lambda i: torch.tensor(i) if isinstance(i, int) else i, tree)


def without_logits(gm: fx.GraphModule, head: Head) -> fx.GraphModule:
    """``gm`` (a copy the caller owns) returning the head's input in place of the logits."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(out.args[0])
    linear = leaves[head.leaf]
    leaves[head.leaf] = linear.args[0]
    out.args = (pytree.tree_unflatten(leaves, spec),)
    gm.graph.erase_node(linear)
    gm.recompile()
    return gm


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ W^T + b`` against ``labels``, with the gradients made in the
    forward chunk by chunk; outputs ``(loss, dh, dW, db)`` (dW/db zero-size when not needed)."""

    @staticmethod
    def forward(h: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int, chunk: int,
                w_grad: bool, b_grad: bool) -> tuple[Tensor, ...]:
        acc = torch.promote_types(h.dtype, torch.float32)  # the loss in float32 at least, as the losses do
        valid = labels != ignore_index
        scale = valid.to(acc) / valid.sum().to(acc)
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        total = h.new_zeros((), dtype=acc)
        dh, dw, db = [], h.new_zeros((0,)), h.new_zeros((0,))
        for start in range(0, h.shape[0], chunk):
            hc = h[start:start + chunk]
            logits = torch.nn.functional.linear(hc, w, b).to(acc)
            lsm = torch.log_softmax(logits, dim=-1)
            idx = safe[start:start + chunk].unsqueeze(1)
            sc = scale[start:start + chunk].unsqueeze(1)
            total = total - (lsm.gather(1, idx) * sc).sum()
            p = (torch.exp(lsm) * sc).scatter_add(1, idx, -sc).to(h.dtype)
            dh.append(p @ w)
            if w_grad:
                part = p.t() @ hc
                dw = part if dw.numel() == 0 else dw + part
            if b_grad:
                part = p.sum(0)
                db = part if db.numel() == 0 else db + part
        return total, torch.cat(dh), dw, db

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:  # functorch (make_fx) needs it apart
        ctx.save_for_backward(*output[1:])
        ctx.mark_non_differentiable(*output[1:])
        ctx.grads = inputs[6], inputs[7]

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_unused: Any) -> tuple[Optional[Tensor], ...]:
        dh, dw, db = ctx.saved_tensors
        w_grad, b_grad = ctx.grads
        return dh * grad, (dw * grad if w_grad else None), (db * grad if b_grad else None), None, None, None, None, None


def linear_cross_entropy(h: Tensor, w: Tensor, b: Optional[Tensor], labels: Tensor, ignore_index: int, *,
                         w_grad: bool, b_grad: bool = False, chunk_bytes: Optional[int] = None) -> Tensor:
    """``F.cross_entropy(F.linear(h, w, b), labels)`` for ``(N, H)`` inputs, chunked over N
    (chunks of about ``chunk_bytes`` of logits, default :data:`CHUNK_BYTES`, and at least
    :data:`MIN_CHUNK_ROWS` tokens)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = h.shape[0]
    chunk = max(1, min(rows, chunk_bytes // (4 * max(1, int(w.shape[0])))))
    if chunk < MIN_CHUNK_ROWS:  # fewer, larger even chunks (or one of all the rows)
        chunk = math.ceil(rows / max(1, rows // MIN_CHUNK_ROWS))
    else:
        chunk = math.ceil(rows / math.ceil(rows / chunk))  # even chunks
    return _LinearCrossEntropy.apply(h, w, b, labels, ignore_index, chunk, w_grad, b_grad)[0]


class FusedHeadLoss(Loss):
    """``loss`` on the logits of :class:`Head`, computed from the head's input by
    :func:`linear_cross_entropy`. :meth:`bind` gives it the step's tensors before each call."""

    def __init__(self, loss: Loss, head: Head, trainable: Sequence[str]) -> None:
        self.inner, self.head, self.name = loss, head, loss.name
        self.w_grad = head.weight in trainable
        self.b_grad = head.bias is not None and head.bias in trainable
        self._tensors: dict[str, Tensor] = {}

    def bind(self, tensors: dict[str, Tensor]) -> None:
        self._tensors = tensors

    def __call__(self, outputs: Any, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        h = primary_output(outputs)  # the head's input, where the logits were
        w = self._tensors[self.head.weight]
        b = self._tensors[self.head.bias] if self.head.bias else None
        if isinstance(self.inner, CausalLM):
            labels = self.inner._padded_labels(model_inputs, targets)
        else:
            labels = _need_target(self.inner.name, targets)
        if tuple(labels.shape) != tuple(h.shape[:-1]):  # the unfused loss on the logits gives the usual error
            return self.inner(torch.nn.functional.linear(h, w, b), model_inputs, targets)
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, b, labels.reshape(-1), self.inner.ignore_index,
                                    w_grad=self.w_grad, b_grad=self.b_grad)

    def weight(self, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Any:
        return self.inner.weight(model_inputs, targets)

    def example_targets(self, outputs: Any, model_inputs: Sequence[Tensor]) -> Optional[list[Tensor]]:
        return self.inner.example_targets(outputs, model_inputs)


__all__ = ["FusedHeadLoss", "Head", "find_head", "linear_cross_entropy", "without_logits"]
