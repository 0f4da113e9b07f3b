"""Legalize a graph for the ONNX exporter: rewrite what ``torch.onnx`` cannot translate, or
translates wrongly.

Rules, each a rewrite with provenance on every node it makes:

* ``drop_asserts`` — ``aten._assert_tensor_metadata`` / ``_assert_async`` / ``_assert_scalar``
  (checks with no value) are removed.
* ``decompose`` — ops with a known wrong or missing translation are replaced by their core
  ATen decomposition: ``nll_loss_forward`` is exported with ``total_weight = 1``, which makes
  mean cross-entropy gradients N× too large in ONNX (see DESIGN.md).
* ``functionalize`` — an in-place op on a fresh tensor (``copy_``, ``sub_``, ... as the silu
  backward makes them) becomes its out-of-place form; ``copy_(dst, src)`` becomes ``src``
  broadcast and cast to ``dst``. In-place writes to graph inputs or views are refused with an
  :class:`~graphpeft.errors.ExportError`.
* ``conv_backward`` — ``aten.convolution_backward`` (a core ATen op with no ONNX translation
  and no decomposition) becomes convolutions: the input gradient a transposed convolution of
  the output gradient with the weight, the weight gradient a convolution of the input with the
  output gradient (batch and channel axes swapped, stride and dilation exchanged; for a grouped
  convolution the groups' batches side by side, one group each), the bias gradient a sum.
* ``squeeze`` — ``aten.squeeze.dims`` (no direct translation: the exporter would re-trace and
  decompose the whole graph for it) becomes a ``view`` to its recorded static shape.
* ``inline_grad_regions`` — ``wrap_with_set_grad_enabled`` regions (``torch.no_grad()`` blocks
  inside a model, e.g. HF rotary embeddings) are inlined: grad mode means nothing to an
  exported graph, and the exporter translates the subgraph without legalizing it.
* ``equivalents`` — ops without a direct translation that have an exact one-op (or two-op)
  equivalent that has one, rewritten here because one such op makes the exporter re-trace and
  decompose the whole graph (seconds): ``to.dtype`` / ``to.dtype_layout`` / ``to.device`` ->
  ``_to_copy`` (a pure device move is dropped),
  ``__and__`` / ``__or__`` -> ``bitwise_and`` / ``bitwise_or``, first-order ``diff`` -> a
  difference of two slices (of the concatenation with ``prepend`` / ``append``) (inference graphs of HF models have all of these),
  ``conv3d`` without a bias -> ``convolution`` (torchlib gives conv3d's missing bias a wrong shape),
  ``rsub.Scalar`` -> ``sub`` from a 0-d tensor (training steps have it from silu's backward).
* ``empty`` — ``aten.empty_permuted`` / ``empty.memory_format`` / ``empty_strided`` /
  ``empty_like`` (no ONNX translation) become zero-filled tensors of the same shape and dtype
  (their content is undefined, so zeros are a valid value).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from graphpeft.errors import ExportError
from graphpeft.graph import META_KEY, GraphBuilder, Provenance, op_args
from graphpeft.infra import PassBase, PassContext, PassResult
from graphpeft.registry import register_pass

aten = torch.ops.aten

ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_async.default, aten._assert_async.msg,
           aten._assert_scalar.default}
#: ops replaced by their core ATen decomposition before export
DECOMPOSE = {aten.nll_loss_forward.default, aten.nll_loss_backward.default, aten.nll_loss2d_forward.default,
             aten.nll_loss2d_backward.default, aten.nll_loss.default, aten.nll_loss_nd.default}
EMPTY = {aten.empty_permuted.default, aten.empty.memory_format, aten.empty_strided.default,
         aten.empty_like.default, aten.new_empty.default}

PASS_NAME = "legalize_onnx"


def _builder(gm: fx.GraphModule, node: fx.Node, rule: str, pass_name: str = PASS_NAME) -> GraphBuilder:
    """A builder inserting right before ``node`` with ``node``'s origin and phase."""
    prov = node.meta.get(META_KEY) or {}
    p = Provenance(pass_name, rule, prov.get("origin", ""), prov.get("adapter", ""), prov.get("part", ""))
    builder = GraphBuilder(gm, node.prev, p, module_stack=node.meta.get("nn_module_stack"))
    return builder


def _finish(builder: GraphBuilder, node: fx.Node) -> None:
    prov = node.meta.get(META_KEY) or {}
    for created in builder.created:  # keep phase-level tags the training passes read
        for k in ("param", "micro"):
            if k in prov:
                created.meta[META_KEY][k] = prov[k]


def _replace(gm: fx.GraphModule, node: fx.Node, rule: str, build: Callable[[GraphBuilder], Any]) -> None:
    """Replace ``node`` by what ``build`` makes (nodes inserted before it, stamped for ``rule``)."""
    builder = _builder(gm, node, rule)
    new = build(builder)
    _finish(builder, node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _drop_asserts(gm: fx.GraphModule) -> int:
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ASSERTS and not node.users:
            gm.graph.erase_node(node)
            n += 1
    return n


def _decompose(gm: fx.GraphModule, table: Optional[dict] = None) -> int:
    from torch._decomp import core_aten_decompositions

    todo = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in DECOMPOSE]
    if todo and table is None:
        table = core_aten_decompositions()
    cache: dict = {}
    for node in todo:
        # (the table may be a CustomDecompTable, whose .get() does not see lazily added entries)
        decomp = table[node.target] if node.target in table else getattr(node.target, "decompose", None)
        if decomp is None:
            raise ExportError(f"{node.target} has no core ATen decomposition to export it correctly")
        inline_decomposition(gm, node, decomp, table=table, cache=cache)
    return len(todo)


def inline_decomposition(gm: fx.GraphModule, node: fx.Node, decomp: Callable, pass_name: str = PASS_NAME,
                         rule: str = "decompose", table: Optional[dict] = None,
                         cache: Optional[dict] = None) -> None:
    """Replace ``node`` by ``decomp`` (a function of the node's arguments) traced into core ATen
    ops on its inputs' shapes; a tuple result replaces the node's ``getitem`` users. ``cache``
    (a dict the caller keeps) reuses the traced ops for nodes of the same op, layouts and
    constant arguments (every layer's attention)."""
    flat, spec = torch.utils._pytree.tree_flatten((node.args, node.kwargs))
    tensor_pos = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)]
    key = (node.target, str(spec), tuple(_layout(_val(a)) if i in tensor_pos else repr(a) for i, a in enumerate(flat)))
    sub = cache.get(key) if cache is not None else None
    if sub is None:
        sub = _trace_decomposition(decomp, flat, spec, tensor_pos, table)
        if cache is not None:
            cache[key] = sub
    _inline(gm, node, sub, [flat[i] for i in tensor_pos], rule, pass_name)


def _layout(v: Any) -> Any:
    return (tuple(v.shape), v.stride(), v.dtype) if isinstance(v, torch.Tensor) else repr(v)


def _trace_decomposition(decomp: Callable, flat: list, spec: Any, tensor_pos: list[int],
                         table: Optional[dict]) -> fx.GraphModule:
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    table = core_aten_decompositions() if table is None else table

    def concrete(v: Any) -> Any:
        if isinstance(v, torch.Tensor):  # the recorded layout: views traced on it stay valid
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).zero_()
        return v

    examples = [concrete(_val(flat[i])) for i in tensor_pos]

    def fn(*tensors: torch.Tensor) -> Any:
        values = list(flat)
        for i, t in zip(tensor_pos, tensors):
            values[i] = t
        args, kwargs = torch.utils._pytree.tree_unflatten(values, spec)
        out = decomp(*args, **kwargs)
        return tuple(out) if isinstance(out, tuple) else out  # named tuples would be traced as calls

    return make_fx(fn, decomposition_table=table)(*examples)


def _inline(gm: fx.GraphModule, node: fx.Node, sub: fx.GraphModule, inputs: list[fx.Node], rule: str,
            pass_name: str) -> None:
    builder = _builder(gm, node, rule, pass_name)
    env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    result: Any = None
    for s in sub.graph.nodes:
        if s.op == "placeholder":
            env[s] = next(placeholders)
        elif s.op == "get_attr":
            raise ExportError(f"the decomposition of {node.target} needs a constant tensor; cannot inline it")
        elif s.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((s.args, s.kwargs), lambda a: env[a])
            env[s] = builder.call(s.target, *args, **kwargs)
        elif s.op == "output":
            result = torch.fx.node.map_arg(s.args[0], lambda a: env[a])
    want = _val(node)
    if isinstance(result, (list, tuple)) and isinstance(want, (list, tuple)):
        result = [_with_layout(builder, r, w) for r, w in zip(result, want)]
    elif isinstance(result, fx.Node):
        result = _with_layout(builder, result, want)
    _finish(builder, node)
    if isinstance(result, (list, tuple)):
        for user in list(node.users):
            if user.target is operator.getitem:
                user.replace_all_uses_with(result[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:
            raise ExportError(f"cannot replace {node.name}: its tuple result is used whole")
    else:
        node.replace_all_uses_with(result)
    gm.graph.erase_node(node)


def _with_layout(builder: GraphBuilder, value: Any, want: Any) -> Any:
    """``value`` copied into the memory layout of ``want`` (the replaced op's recorded output)
    when they differ: the graph's later views were traced on that layout (a fused kernel's
    output may be stored transposed). ``permute -> clone -> permute back``; no-ops in ONNX."""
    have = _val(value)
    if not (isinstance(have, torch.Tensor) and isinstance(want, torch.Tensor)) or have.dim() != want.dim() \
            or have.stride() == want.stride():
        return value
    perm = sorted(range(want.dim()), key=lambda d: -want.stride()[d])  # outermost axis first
    inverse = [perm.index(d) for d in range(len(perm))]
    dense = builder.call(aten.clone.default, builder.call(aten.permute.default, value, perm),
                         memory_format=torch.contiguous_format)
    return builder.call(aten.permute.default, dense, inverse)


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.returns and schema.returns[0].alias_info is not None)


def _unobserved_view(view: fx.Node, write: fx.Node, index: dict[fx.Node, int]) -> bool:
    """Whether writing into ``view`` at ``write`` is seen only through ``view`` itself: a chain of
    views of a computed tensor whose members are read after the write by nothing but the next
    view. Then the write may produce a new tensor (the decomposition of a linear layer with a
    bias over 3-D+ inputs adds the bias in place into a view of its matmul: ConvNeXt, SigLIP)."""
    node = view
    while _is_view(node):
        base = node.args[0]
        if not isinstance(base, fx.Node) or base.op in ("placeholder", "get_attr"):
            return False
        if any(u is not node and index.get(u, -1) > index[write] for u in base.users):
            return False
        node = base
    return True


def _functionalize(gm: fx.GraphModule) -> int:
    count = 0
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not schema.is_mutable or not schema.arguments or schema.arguments[0].alias_info is None \
                or not schema.arguments[0].alias_info.is_write:
            continue
        dst = node.args[0]
        if not isinstance(dst, fx.Node) or dst.op in ("placeholder", "get_attr") \
                or _is_view(dst) and not _unobserved_view(dst, node, index):
            raise ExportError(f"{node.name} ({node.target}) writes into {getattr(dst, 'name', dst)}, a graph "
                              "input, stored tensor or view; ONNX has no in-place ops. Rewrite the model or "
                              "the pass that made it to compute a new tensor instead")
        later = [u for u in dst.users if u is not node and index.get(u, -1) > index[node]]
        builder = _builder(gm, node, "functionalize")
        base = schema.name.split("::")[-1]
        if base == "copy_":
            src = node.args[1]
            dv, sv = _val(dst), _val(src)
            new = src
            if list(sv.shape) != list(dv.shape):
                new = builder.call(aten.expand.default, new, list(dv.shape))
            if sv.dtype != dv.dtype:
                new = builder.call(aten._to_copy.default, new, dtype=dv.dtype)
            else:
                new = builder.call(aten.clone.default, new)
        else:
            packet = getattr(aten, base.rstrip("_"), None)
            overload = getattr(packet, node.target._overloadname, None) if packet is not None else None
            if overload is None:
                raise ExportError(f"{node.target} has no out-of-place form to export")
            new = builder.call(overload, *node.args, **node.kwargs)
        _finish(builder, node)
        node.replace_all_uses_with(new)
        for u in later:
            u.replace_input_with(dst, new)
        gm.graph.erase_node(node)
        count += 1
    return count


def _views_to_reshapes(gm: fx.GraphModule) -> int:
    """``aten.view`` of a tensor whose recorded strides do not allow that view becomes
    ``aten.reshape`` (the same ONNX Reshape). The training passes drop copies that only made a
    tensor contiguous (a ``clone`` before a ``view`` of a gradient: GPT-J's attention, the
    backward of a spatial mean), and the export's re-trace checks strides."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.view.default:
            continue
        x = _val(node.args[0])
        if not isinstance(x, torch.Tensor):
            continue
        shape = [_val(d) if isinstance(d, fx.Node) else d for d in node.args[1]]
        try:
            x.view(shape)
        except Exception:  # noqa: BLE001 - any refusal means the view is not valid for these strides
            node.target = aten.reshape.default
            count += 1
    return count


def _replace_empty(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in EMPTY:
            continue
        v = _val(node)
        if not node.users:
            gm.graph.erase_node(node)
            count += 1
            continue
        if not isinstance(v, torch.Tensor):
            raise ExportError(f"{node.name}: no shape recorded; cannot legalize {node.target}")
        _replace(gm, node, "empty", lambda b: b.call(aten.full.default, [int(s) for s in v.shape], 0, dtype=v.dtype,
                                                      layout=torch.strided, device=v.device, pin_memory=False))
        count += 1
    return count


def _inline_grad_regions(gm: fx.GraphModule) -> int:
    from torch._higher_order_ops.wrap import wrap_with_set_grad_enabled

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not wrap_with_set_grad_enabled:
            continue
        holder = node.args[1]
        sub = getattr(gm, holder.target)
        env: dict[fx.Node, Any] = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], node.args[2:]))
        result: Any = None
        with gm.graph.inserting_before(node):
            for s in sub.graph.nodes:
                if s.op == "placeholder":
                    continue
                if s.op == "output":
                    result = torch.fx.node.map_arg(s.args[0], lambda a: env[a])
                elif s.op == "call_function":
                    env[s] = gm.graph.node_copy(s, lambda a: env[a])  # original model nodes: meta kept
                else:
                    raise ExportError(f"cannot inline {node.name}: its region has a {s.op} node ({s.name})")
        outs = result if isinstance(result, (list, tuple)) else (result,)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise ExportError(f"cannot inline {node.name}: its result is used whole by {user.name}")
            user.replace_all_uses_with(outs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not holder.users:
            gm.graph.erase_node(holder)
            delattr(gm, holder.target)
        count += 1
    return count


#: op -> translatable op taking the same arguments
SAME_ARGS = {aten.__and__.Tensor: aten.bitwise_and.Tensor, aten.__or__.Tensor: aten.bitwise_or.Tensor}
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device}


def _equivalent(node: fx.Node) -> Optional[Callable[[GraphBuilder], Any]]:
    """How to build ``node``'s translatable equivalent, or None (not one of ours)."""
    if node.target in SAME_ARGS:
        return lambda b: b.call(SAME_ARGS[node.target], *node.args, **node.kwargs)
    if node.target in CASTS:
        names = [a.name for a in node.target._schema.arguments]
        dtype = dict(zip(names, node.args), **node.kwargs).get("dtype")
        if dtype is None:  # a pure device move: nothing to compute in an exported graph
            return lambda b: node.args[0]
        return lambda b: b.call(aten._to_copy.default, node.args[0], dtype=dtype)
    if node.target == aten.conv3d.default and op_args(node)["bias"] is None:
        # torchlib's conv3d builds a missing bias with shape (C, 2), which onnxruntime rejects
        c = op_args(node)
        return lambda b: b.call(aten.convolution.default, c["input"], c["weight"], None, c["stride"], c["padding"],
                                c["dilation"], False, [0], c["groups"])
    if node.target == aten.rsub.Scalar and isinstance(_val(node.args[0]), torch.Tensor):
        # c - x as sub(c as a 0-d tensor of x's dtype, x): the same one op, bit for bit (simplify_algebra
        # makes rsub for silu's backward; torchlib lacks it, so it cost a whole-graph re-decomposition)
        bound = dict(zip(("self", "other", "alpha"), node.args), **node.kwargs)
        x, c, alpha = bound["self"], bound["other"], bound.get("alpha", 1)
        dtype = _val(x).dtype
        if alpha != 1 or not isinstance(c, (int, float)) or not dtype.is_floating_point:
            return None
        return lambda b: b.call(aten.sub.Tensor, b.call(aten.scalar_tensor.default, c, dtype=dtype), x)
    if node.target == aten.diff.default:
        bound = dict(zip(("self", "n", "dim", "prepend", "append"), node.args), **node.kwargs)
        x, n, dim = bound["self"], bound.get("n", 1), bound.get("dim", -1)
        if n != 1 or _val(x).dtype == torch.bool:
            return None  # the general form is left to the exporter's decomposition

        def diff(b: GraphBuilder) -> fx.Node:
            parts = [t for t in (bound.get("prepend"), x, bound.get("append")) if t is not None]
            y = b.call(aten.cat.default, parts, dim) if len(parts) > 1 else x  # diff(cat([p, x, a]))
            upper = b.call(aten.slice.Tensor, y, dim, 1, torch.iinfo(torch.int64).max)
            return b.call(aten.sub.Tensor, upper, b.call(aten.slice.Tensor, y, dim, 0, -1))

        return diff
    return None


def _replace_equivalents(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        build = _equivalent(node) if node.op == "call_function" else None
        if build is not None:
            _replace(gm, node, "equivalents", build)
            count += 1
    return count


def _grouped_weight_grad_operands(builder: GraphBuilder, x: fx.Node, grad_out: fx.Node, groups: int,
                                  nd: int) -> tuple[fx.Node, fx.Node]:
    """Input and weight of the grouped convolution giving a grouped convolution's weight gradient
    (then permuted like the plain one): ``x (N, G·Ci, S)`` -> ``(Ci, G·N, S)`` and
    ``grad_out (N, G·Co, S')`` -> ``(G·Co, N, S')``, so group ``j`` of a ``groups=G`` convolution
    correlates group ``j``'s inputs with group ``j``'s output gradients over the batch."""
    spatial = list(range(3, 3 + nd))
    xs, gs = _val(x).shape, _val(grad_out).shape
    ci, co = int(xs[1]) // groups, int(gs[1]) // groups
    xg = builder.call(aten.reshape.default, x, [-1, groups, ci, *(int(d) for d in xs[2:])])
    xt = builder.call(aten.reshape.default, builder.call(aten.permute.default, xg, [2, 1, 0, *spatial]),
                      [ci, -1, *(int(d) for d in xs[2:])])
    gg = builder.call(aten.reshape.default, grad_out, [-1, groups, co, *(int(d) for d in gs[2:])])
    gt = builder.call(aten.reshape.default, builder.call(aten.permute.default, gg, [1, 2, 0, *spatial]),
                      [groups * co, -1, *(int(d) for d in gs[2:])])
    return xt, gt


def _replace_conv_backward(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.convolution_backward.default:
            continue
        (grad_out, x, weight, _bias_sizes, stride, padding, dilation, transposed, _output_padding, groups,
         mask) = node.args
        if transposed:
            raise ExportError(f"{node.name}: the backward of a transposed convolution is not supported for ONNX yet")
        go_v, x_v, w_v = _val(grad_out), _val(x), _val(weight)
        nd = w_v.dim() - 2
        stride, padding, dilation = (list(v) * nd if len(v) == 1 else list(v) for v in (stride, padding, dilation))
        kernel = [int(k) for k in w_v.shape[2:]]
        builder = _builder(gm, node, "conv_backward")
        results: list[Optional[fx.Node]] = [None, None, None]
        if mask[0]:
            out_pad = [int(x_v.shape[2 + i]) - ((int(go_v.shape[2 + i]) - 1) * stride[i] - 2 * padding[i]
                                                 + dilation[i] * (kernel[i] - 1) + 1) for i in range(nd)]
            results[0] = builder.call(aten.convolution.default, grad_out, weight, None, stride, padding, dilation,
                                      True, out_pad, groups)
        if mask[1]:
            perm = [1, 0] + list(range(2, 2 + nd))
            if groups == 1:
                xt = builder.call(aten.permute.default, x, perm)
                gt = builder.call(aten.permute.default, grad_out, perm)
            else:
                xt, gt = _grouped_weight_grad_operands(builder, x, grad_out, groups, nd)
            gw = builder.call(aten.convolution.default, xt, gt, None, dilation, padding, stride, False, [0] * nd,
                              groups)
            gw = builder.call(aten.permute.default, gw, perm)
            for i in range(nd):
                if int(_val(gw).shape[2 + i]) != kernel[i]:
                    gw = builder.call(aten.slice.Tensor, gw, 2 + i, 0, kernel[i])
            # contiguous, as convolution_backward's own result: later views of it (a flattened
            # multi-tensor update) rely on that (an Identity in ONNX)
            gw = builder.call(aten.clone.default, gw, memory_format=torch.contiguous_format)
            if list(_val(gw).shape) != list(w_v.shape):
                raise ExportError(f"{node.name}: internal error, weight gradient shape {list(_val(gw).shape)} "
                                  f"!= {list(w_v.shape)}")
            results[1] = gw
        if mask[2]:
            results[2] = builder.call(aten.sum.dim_IntList, grad_out, [0] + list(range(2, 2 + nd)))
        _finish(builder, node)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise ExportError(f"cannot replace {node.name}: its tuple result is used whole")
            new = results[user.args[1]]
            if new is None:
                raise ExportError(f"{node.name}: output {user.args[1]} is used but was not requested")
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        count += 1
    return count


def _replace_squeeze_dims(gm: fx.GraphModule) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.squeeze.dims:
            continue
        v = _val(node)
        if not isinstance(v, torch.Tensor) or any(not isinstance(s, int) for s in v.shape):
            continue  # symbolic shape: leave it to the exporter's decomposition
        _replace(gm, node, "squeeze", lambda b: b.call(aten.view.default, node.args[0], [int(s) for s in v.shape]))
        count += 1
    return count


@register_pass
class LegalizeOnnx(PassBase):
    """Rewrites a (training) graph so ``torch.onnx`` exports it correctly; in place.

    ``ctx.options["legalize_onnx"]`` receives the count of rewrites per rule."""

    name = PASS_NAME

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        counts = {
            "inline_grad_regions": _inline_grad_regions(gm),  # first: the regions hold asserts and casts
            "drop_asserts": _drop_asserts(gm),
            "decompose": _decompose(gm),
            "functionalize": _functionalize(gm),
        }
        counts["equivalents"] = _replace_equivalents(gm)
        counts["view_reshape"] = _views_to_reshapes(gm)
        counts["empty"] = _replace_empty(gm)
        counts["squeeze"] = _replace_squeeze_dims(gm)
        counts["conv_backward"] = _replace_conv_backward(gm)
        ctx.options[self.name] = counts
        return PassResult(gm, any(counts.values()))

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        from graphpeft.errors import VerificationError

        bad = [n.name for n in gm.graph.nodes if n.op == "call_function" and
               (n.target in EMPTY or n.target in DECOMPOSE or n.target in ASSERTS
                or n.target == aten.convolution_backward.default)]
        if bad:
            raise VerificationError(f"legalize_onnx left ops the exporter cannot take: {bad[:10]}")
