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

A quantized head (``gp.Quantize`` on ``lm_head``: the logits are a ``cat`` of row-block linears,
each block's weight dequantized from frozen stored tensors) is fused too, blocked over the
vocabulary instead of the tokens (:func:`blocked_linear_cross_entropy`): a first sweep over the
row blocks gives each token's log-sum-exp (online, as FlashAttention's softmax) and target
logit, a second sweep dequantizes each block again and makes the input gradient. Neither the
float head nor the logits ever exist whole (one block of each at a time); the cost is a second
dequantization and logits GEMM per block. The second sweep is annotated as a recompute, so CSE
does not merge it into the first (which would keep every block alive between the sweeps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..graph import is_constant_factory
from .losses import CausalLM, CrossEntropy, Loss, _need_target, primary_output

Tensor = torch.Tensor
CHUNK_BYTES = 2 * 2**20  # logits per chunk: small next to the activations, large enough for GEMM speed
#: fewest tokens per chunk: each chunk reads the whole weight twice (its logits and ``p @ W``), and
#: below ~64 rows that reading sets the GEMMs' time (Qwen2's 151936-token head at 128 tokens: 43 chunks of
#: 3 rows took 5-10x the time of 2 chunks, and onnxruntime prepacked the 545 MB weight once per GEMM at load)
MIN_CHUNK_ROWS = 64


@dataclasses.dataclass(frozen=True)
class _Stored:
    """A stored tensor of the graph, by name (an argument of a :class:`WeightBlock` step)."""

    name: str


@dataclasses.dataclass(frozen=True)
class _Value:
    """The result of an earlier step of a :class:`WeightBlock`."""

    index: int


Ref = Union[_Stored, _Value]


@dataclasses.dataclass
class WeightBlock:
    """The ops that make one row block of a quantized head (weight and bias) from stored tensors,
    copied out of the graph so the loss can run them where it needs the block."""

    steps: list[tuple[Callable, tuple, dict]]
    weight: Ref
    bias: Optional[Ref]

    @property
    def stored(self) -> set[str]:
        names: set[str] = set()
        for _, args, kwargs in self.steps:
            torch.fx.node.map_aggregate((args, kwargs), lambda a: names.add(a.name) if isinstance(a, _Stored) else a)
        for r in (self.weight, self.bias):
            if isinstance(r, _Stored):
                names.add(r.name)
        return names

    def __call__(self, tensors: dict[str, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        values: list[Any] = []

        def get(a: Any) -> Any:
            if isinstance(a, _Stored):
                return tensors[a.name]
            return values[a.index] if isinstance(a, _Value) else a

        for target, args, kwargs in self.steps:
            args, kwargs = torch.fx.node.map_aggregate((args, kwargs), get)
            values.append(target(*args, **kwargs))
        return get(self.weight), (get(self.bias) if self.bias is not None else None)


@dataclasses.dataclass
class Head:
    """Where the logits come from: ``linear(input, weight, bias)`` at output leaf ``leaf``; a
    quantized head has ``blocks`` instead (``weight`` and ``bias`` None): the logits are the
    concatenation of ``linear(input, *block(tensors))`` over them."""

    leaf: int
    weight: Optional[str]
    bias: Optional[str]
    blocks: tuple[WeightBlock, ...] = ()


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
    if not isinstance(node, fx.Node) or set(node.users) != {out} or leaves.count(node) != 1:
        return None  # the logits are read elsewhere (or returned twice): they must exist
    if node.target is torch.ops.aten.cat.default:
        blocks = _weight_blocks(gm, node)
        return Head(leaf, None, None, blocks) if blocks else None
    if node.target is not torch.ops.aten.linear.default:
        return None
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    return Head(leaf, weight.target, bias.target if bias is not None else None)


def _weight_blocks(gm: fx.GraphModule, cat: fx.Node) -> Optional[tuple[WeightBlock, ...]]:
    """The blocks of a row-block head (``cat([linear(x, W_k, b_k) ...], -1)``, every ``W_k`` /
    ``b_k`` computed from frozen stored tensors only), or None when ``cat`` is something else."""
    from graphpeft.graph import roles

    val = cat.meta.get("val")
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if not isinstance(val, Tensor) or dim not in (-1, val.dim() - 1) or len(parts) < 2:
        return None
    role_map = roles(gm)
    x, blocks = None, []
    for p in parts:
        if not (isinstance(p, fx.Node) and p.target is torch.ops.aten.linear.default and set(p.users) == {cat}):
            return None
        if x is None:
            x = p.args[0]
        bias = p.args[2] if len(p.args) > 2 else None
        if p.args[0] is not x or x in p.args[1:]:
            return None
        block = _copy_chain(p.args[1], bias, role_map)
        if block is None:
            return None
        blocks.append(block)
    return tuple(blocks)


def _copy_chain(weight: Any, bias: Any, role_map: dict) -> Optional[WeightBlock]:
    """The ops computing ``weight`` (and ``bias``) from frozen stored tensors, or None."""
    steps: list[tuple[Callable, tuple, dict]] = []
    refs: dict[fx.Node, Ref] = {}

    def ref(n: fx.Node) -> Optional[Ref]:
        if n in refs:
            return refs[n]
        if n.op == "get_attr":
            role = role_map.get(n.target)
            if role is None or role.trainable:
                return None
            refs[n] = _Stored(n.target)
        elif n.op == "call_function" and (n.all_input_nodes or is_constant_factory(n)):
            # (no input nodes: a constant made from literals, e.g. the int4 unpacking's arange)
            inputs = [ref(a) for a in n.all_input_nodes]
            if any(r is None for r in inputs):
                return None
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: refs[a])
            steps.append((n.target, args, kwargs))
            refs[n] = _Value(len(steps) - 1)
        else:
            return None
        return refs[n]

    if not isinstance(weight, fx.Node) or (bias is not None and not isinstance(bias, fx.Node)):
        return None
    w = ref(weight)
    b = ref(bias) if bias is not None else None
    if w is None or (bias is not None and b is None):
        return None
    return WeightBlock(steps, w, b)


def _as_tensors(tree: Any) -> Any:
    """Leaf indices as 0-d tensors, so :func:`primary_output` can pick one."""
    return pytree.tree_map(lambda i: torch.tensor(i) if isinstance(i, int) else i, tree)


def without_logits(gm: fx.GraphModule, head: Head) -> fx.GraphModule:
    """``gm`` (a copy the caller owns) returning the head's input in place of the logits."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(out.args[0])
    logits = leaves[head.leaf]
    linears = logits.args[0] if head.blocks else [logits]
    leaves[head.leaf] = linears[0].args[0]
    out.args = (pytree.tree_unflatten(leaves, spec),)
    if head.blocks:
        gm.graph.erase_node(logits)
    dead, erased = list(linears), set()
    while dead:  # the linears, then what only they read (a quantized head's dequantization)
        n = dead.pop()
        if n in erased or n.users or n.op != "call_function":
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        erased.add(n)
        dead.extend(inputs)
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
                # accumulated by the GEMM itself: no chunk-sized product beside the running sum
                dw = p.t() @ hc if dw.numel() == 0 else torch.addmm(dw, p.t(), hc)
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


class _BlockedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``cat([h @ W_k^T + b_k], -1)`` against ``labels``, the weight made a
    row block at a time by ``blocks`` from ``stored`` (frozen: no weight gradient); outputs
    ``(loss, dh)``, the input gradient made in the forward."""

    @staticmethod
    def forward(h: Tensor, labels: Tensor, ignore_index: int, blocks: tuple[WeightBlock, ...],
                names: tuple[str, ...], *stored: Tensor) -> tuple[Tensor, Tensor]:
        tensors = dict(zip(names, stored))
        acc = torch.promote_types(h.dtype, torch.float32)
        valid = labels != ignore_index
        scale = valid.to(acc) / valid.sum().to(acc)
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        n = h.shape[0]
        # sweep 1: running max and sum of exponentials (online log-sum-exp), the target logits
        top = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
        sum_exp = torch.zeros((n,), dtype=acc, device=h.device)
        target = torch.zeros((n,), dtype=acc, device=h.device)
        start = 0
        for block in blocks:
            logits = torch.nn.functional.linear(h, *block(tensors)).to(acc)
            inside, local = _in_block(safe, start, logits.shape[1])
            new_top = torch.maximum(top, logits.amax(1))
            sum_exp = sum_exp * torch.exp(top - new_top) + torch.exp(logits - new_top.unsqueeze(1)).sum(1)
            top = new_top
            target = target + torch.where(inside, logits.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)
            start += logits.shape[1]
        lse = top + torch.log(sum_exp)
        total = ((lse - target) * scale).sum()
        # sweep 2: each block again (dequantized again: a recompute, not merged by CSE) for dh
        from .trace_step import RECOMPUTE_KEY

        dh, start = None, 0
        with torch.fx.traceback.annotate({RECOMPUTE_KEY: "quantized head block"}):
            for block in blocks:
                w, b = block(tensors)
                logits = torch.nn.functional.linear(h, w, b).to(acc)
                inside, local = _in_block(safe, start, logits.shape[1])
                p = torch.exp(logits - lse.unsqueeze(1)) * scale.unsqueeze(1)
                p = p.scatter_add(1, local.unsqueeze(1), -(scale * inside.to(acc)).unsqueeze(1)).to(h.dtype)
                part = p @ w
                dh = part if dh is None else dh + part
                start += logits.shape[1]
        assert dh is not None
        return total, dh

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.n_stored = len(inputs) - 5

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_unused: Any) -> tuple[Optional[Tensor], ...]:
        (dh,) = ctx.saved_tensors
        return (dh * grad, None, None, None, None, *([None] * ctx.n_stored))


def _in_block(labels: Tensor, start: int, rows: int) -> tuple[Tensor, Tensor]:
    """Which labels fall in vocabulary rows ``start:start+rows``, and their index in the block
    (clamped into it where they do not)."""
    inside = (labels >= start) & (labels < start + rows)
    return inside, (labels - start).clamp(0, rows - 1)


def blocked_linear_cross_entropy(h: Tensor, blocks: Sequence[WeightBlock], tensors: dict[str, Tensor],
                                 labels: Tensor, ignore_index: int) -> Tensor:
    """``F.cross_entropy(cat([F.linear(h, *block(tensors)) ...], -1), labels)`` for ``(N, H)``
    inputs, one weight block (and one ``N x rows`` block of logits) alive at a time."""
    names = tuple(sorted(set().union(*(b.stored for b in blocks))))
    return _BlockedLinearCrossEntropy.apply(h, labels, ignore_index, tuple(blocks), names,
                                            *(tensors[n] for n in names))[0]


class FusedHeadLoss(Loss):
    """``loss`` on the logits of :class:`Head`, computed from the head's input by
    :func:`linear_cross_entropy`. :meth:`bind` gives it the step's tensors before each call."""

    def __init__(self, loss: Loss, head: Head, trainable: Sequence[str]) -> None:
        self.inner, self.head, self.name = loss, head, loss.name
        self.w_grad = head.weight is not None and head.weight in trainable
        self.b_grad = head.bias is not None and head.bias in trainable
        self._tensors: dict[str, Tensor] = {}

    def bind(self, tensors: dict[str, Tensor]) -> None:
        self._tensors = tensors

    def __call__(self, outputs: Any, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        h = primary_output(outputs)  # the head's input, where the logits were
        if isinstance(self.inner, CausalLM):
            labels = self.inner._padded_labels(model_inputs, targets)
        else:
            labels = _need_target(self.inner.name, targets)
        if self.head.blocks:
            if tuple(labels.shape) != tuple(h.shape[:-1]):
                logits = torch.cat([torch.nn.functional.linear(h, *blk(self._tensors)) for blk in self.head.blocks], -1)
                return self.inner(logits, model_inputs, targets)
            return blocked_linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head.blocks, self._tensors,
                                                labels.reshape(-1), self.inner.ignore_index)
        w = self._tensors[self.head.weight]
        b = self._tensors[self.head.bias] if self.head.bias else None
        if tuple(labels.shape) != tuple(h.shape[:-1]):  # the unfused loss on the logits gives the usual error
            return self.inner(torch.nn.functional.linear(h, w, b), model_inputs, targets)
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, b, labels.reshape(-1), self.inner.ignore_index,
                                    w_grad=self.w_grad, b_grad=self.b_grad)

    def weight(self, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Any:
        return self.inner.weight(model_inputs, targets)

    def example_targets(self, outputs: Any, model_inputs: Sequence[Tensor]) -> Optional[list[Tensor]]:
        return self.inner.example_targets(outputs, model_inputs)


__all__ = ["FusedHeadLoss", "Head", "WeightBlock", "blocked_linear_cross_entropy", "find_head",
           "linear_cross_entropy", "without_logits"]
