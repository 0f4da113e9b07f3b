"""The torch executor's runner: a training-step graph run with as little Python per node as possible.

A step graph has ~2,000 ATen nodes; ``fx.GraphModule``'s generated code calls each one as
``torch.ops.aten.<op>.<overload>(...)``, which goes through ``OpOverload.__call__`` and the
schema-driven argument conversion of the JIT dispatcher: 2–3 µs more per call than the same
op through PyTorch's own Python bindings (``x.view(...)``, ``torch.mm(...)``), a few
milliseconds per step. :func:`native_runner` generates the step's code again with those
bindings for the ops in :data:`NATIVE_FUNCTIONS` / :data:`NATIVE_METHODS` — each binding
dispatches to the very same ATen kernel (a ``Scalar`` overload to its ``Tensor`` twin with a
wrapped number, which is how ATen implements the ``Scalar`` one), so results are bit-identical;
every other op keeps its ``torch.ops`` call; ``alias`` and the optimizer's copy-then-flatten of
a gradient go (see :func:`native_graph`). The stored graph (what passes, reports and exports
read) is not changed: the runner is a view of it for the torch executor only.

:class:`TensorRefs` resolves the trainable tensors' dotted names to their owner modules once,
so reading and writing them each step is one attribute lookup per tensor.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

aten = torch.ops.aten

#: ATen overloads run through a ``torch`` function that dispatches to the same kernel
NATIVE_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    aten.mm.default: torch.mm, aten.addmm.default: torch.addmm, aten.bmm.default: torch.bmm,
    aten.mul.Tensor: torch.mul, aten.mul.Scalar: torch.mul, aten.add.Tensor: torch.add, aten.add.Scalar: torch.add,
    aten.sub.Tensor: torch.sub, aten.rsub.Scalar: torch.rsub, aten.div.Tensor: torch.div, aten.div.Scalar: torch.div,
    aten.pow.Tensor_Scalar: torch.pow, aten.neg.default: torch.neg, aten.exp.default: torch.exp,
    aten.sigmoid.default: torch.sigmoid, aten.rsqrt.default: torch.rsqrt, aten.sqrt.default: torch.sqrt,
    aten.abs.default: torch.abs, aten.cos.default: torch.cos, aten.sin.default: torch.sin, aten.tanh.default: torch.tanh,
    aten.mean.dim: torch.mean, aten.sum.dim_IntList: torch.sum, aten.where.self: torch.where,
    aten.cat.default: torch.cat, aten.split_with_sizes.default: torch.split_with_sizes,
    aten.clone.default: torch.clone,
}
#: ATen view overloads run as the tensor method of that name
NATIVE_METHODS: dict[Any, str] = {
    aten.view.default: "view", aten.permute.default: "permute", aten.expand.default: "expand",
    aten.unsqueeze.default: "unsqueeze", aten.squeeze.dim: "squeeze", aten.t.default: "t",
    aten.transpose.int: "transpose",
}


def _mutates(graph: fx.Graph) -> bool:
    return any(getattr(getattr(n.target, "_schema", None), "is_mutable", False)
               for n in graph.nodes if n.op == "call_function")


def _copy_then_view(node: fx.Node) -> bool:
    """``clone(x)`` read only by a ``view``: the optimizer's flattening of a gradient (a copy
    made so that the view is valid whatever strides the kernel returns)."""
    return (node.target == aten.clone.default and len(node.users) == 1
            and next(iter(node.users)).target == aten.view.default and next(iter(node.users)).args[0] is node
            and node.kwargs.get("memory_format", torch.contiguous_format) == torch.contiguous_format)


def native_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` whose nodes in the native tables call PyTorch's Python bindings
    (same names, same order; metadata copied). In a graph that writes into no tensor, an
    ``alias`` is its input and ``view(clone(x))`` is ``x.reshape(...)`` (a copy only when ``x``
    cannot be viewed so: the same values, one op fewer)."""
    out = fx.Graph()
    out._codegen = graph._codegen  # the same signature handling (flat inputs and outputs)
    env: dict[fx.Node, fx.Node] = {}
    functional = not _mutates(graph)
    reshaped: set[fx.Node] = set()
    for node in graph.nodes:
        args, kwargs = fx.map_arg(node.args, env.__getitem__), fx.map_arg(node.kwargs, env.__getitem__)
        if functional and node.target == aten.alias.default:
            env[node] = args[0]
            continue
        if functional and _copy_then_view(node):
            env[node] = args[0]
            reshaped.add(node)
            continue
        if node.target == aten.view.default and node.args[0] in reshaped:
            new = out.create_node("call_method", "reshape", args, kwargs, name=node.name)
        elif node.op == "call_function" and node.target in NATIVE_FUNCTIONS:
            new = out.create_node("call_function", NATIVE_FUNCTIONS[node.target], args, kwargs, name=node.name)
        elif node.op == "call_function" and node.target in NATIVE_METHODS:
            new = out.create_node("call_method", NATIVE_METHODS[node.target], args, kwargs, name=node.name)
        else:
            new = out.node_copy(node, env.__getitem__)
        new.meta = dict(node.meta)
        env[node] = new
    return out


class NativeRunner:
    """Runs a graph module's graph with :func:`native_graph`'s code. Attribute reads
    (``get_attr``: frozen weights) go to ``gm`` itself at every call, so tensors a later load or
    release puts into ``gm`` are the ones used."""

    def __init__(self, gm: fx.GraphModule, graph: Optional[fx.Graph] = None) -> None:
        self.gm = gm
        code = native_graph(graph if graph is not None else gm.graph).python_code(root_module="self")
        scope: dict[str, Any] = dict(code.globals)
        exec(compile(code.src, f"<graphpeft native runner {id(self):x}>", "exec"), scope)  # noqa: S102 - our codegen
        self._forward: Callable[..., Any] = scope["forward"]
        self.num_native = sum(1 for n in gm.graph.nodes if n.op == "call_function"
                              and (n.target in NATIVE_FUNCTIONS or n.target in NATIVE_METHODS))

    def __call__(self, *args: Any) -> Any:
        return self._forward(self.gm, *args)


#: lowering passes (by registered name) the default runner applies to its own copy of a step graph
TORCH_EXECUTOR_LOWERING: tuple[str, ...] = ("silu_kernels", "onednn_matmul", "fused_optimizer_kernel")


def lower_for_torch(gm: fx.GraphModule, names: Sequence[str] = TORCH_EXECUTOR_LOWERING) -> fx.Graph:
    """The graph the torch executor runs: a copy of ``gm``'s graph after the torch-only
    lowering passes ``names`` (silu's math form as ATen's silu kernels, float32 CPU GEMMs through
    oneDNN, each fused AdamW chunk as one fused-kernel call), or ``gm``'s own graph when none
    applies. ``gm`` itself is not changed."""
    from ..infra import PassContext, PassManager, Pipeline, copy_graph
    from ..registry import PASSES

    passes = [PASSES[n]() for n in names if n in PASSES]
    if not passes:
        return gm.graph
    result = PassManager().run(copy_graph(gm), Pipeline("torch_executor_lowering", passes), PassContext(verify=False))
    return result.gm.graph if result.modified else gm.graph


def native_runner(gm: fx.GraphModule) -> Callable[..., Any]:
    """The torch executor's default runner for a step graph (see the module docstring): the
    graph after :func:`lower_for_torch`, through PyTorch's Python bindings."""
    return NativeRunner(gm, lower_for_torch(gm))


class TensorRefs:
    """Tensors of a module named by dotted paths, resolved to ``(owner module, attribute)``
    once: reading them is then one attribute lookup each (a walk down the module tree took
    ~25 µs per tensor). A tensor replaced on its owner (a loaded adapter) is read anew; valid
    while ``root`` keeps its submodules (:meth:`valid_for` checks the root)."""

    def __init__(self, root: torch.nn.Module, names: Sequence[str]) -> None:
        self.root = root
        self.names = list(names)
        self._slots: list[tuple[torch.nn.Module, str]] = []
        for name in self.names:
            *path, leaf = name.split(".")
            self._slots.append((operator.attrgetter(".".join(path))(root) if path else root, leaf))

    def valid_for(self, root: torch.nn.Module) -> bool:
        return root is self.root

    def get(self) -> list[torch.Tensor]:
        return [getattr(owner, leaf) for owner, leaf in self._slots]
