"""Pickling of graphpeft's graphs: ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load``
of a :class:`~graphpeft.compiled.CompiledModel` or a training step go through here.

An fx graph cannot be pickled as it is: its nodes carry fake tensors (``meta["val"]``), their
targets are ATen operators (pybind objects), and ``GraphModule``'s own pickling re-traces the
generated code, which loses every node's metadata (provenance, adapter joins, dropout tags,
module paths). :func:`graph_module_state` turns a graph module into plain data instead: its
tensors (the objects themselves, so ties and ``Parameter`` types survive), one record per node
(name, op, target by qualified name, arguments with node references by name, metadata) and the
graph's ``meta``. A fake tensor is stored as its shape and strides (symbolic sizes as
expressions with their example values), dtype and device; :func:`graph_module_from_state`
builds a new fake mode and fake tensors from that, so shape checks, the verifier and the
exporters work on the restored graph as on the original. Metadata that does not pickle (e.g.
``source_fn_stack``) is dropped; classes in ``nn_module_stack`` are kept by qualified name.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Optional

import torch
import torch.fx as fx

from .graph import get_tensor

__all__ = ["graph_from_state", "graph_module_from_state", "graph_module_state", "graph_state"]

FORMAT = 1


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A reference to another node of the graph, by name."""

    name: str


@dataclasses.dataclass(frozen=True)
class _Op:
    """An ATen (or other ``torch.ops``) operator, by qualified name."""

    namespace: str
    name: str
    overload: Optional[str]

    def resolve(self) -> Any:
        packet = getattr(getattr(torch.ops, self.namespace), self.name)
        return packet if self.overload is None else getattr(packet, self.overload)


@dataclasses.dataclass(frozen=True)
class _Fake:
    """A fake tensor's metadata; sizes are ints or ``(expression, example value)``."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: str
    requires_grad: bool


@dataclasses.dataclass(frozen=True)
class _Sym:
    expr: str
    hint: Optional[int]


@dataclasses.dataclass(frozen=True)
class _TorchName:
    """A ``torch.memory_format`` / ``torch.layout`` (they do not pickle under protocol 2, which
    ``torch.save`` uses), by its name in ``torch``."""

    name: str


_DROP = object()


def _encode_arg(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return _Ref(a.name)
    if isinstance(a, (torch.memory_format, torch.layout)):
        return _TorchName(str(a).removeprefix("torch."))
    return a


def _decode_arg(a: Any, by_name: dict[str, fx.Node]) -> Any:
    if isinstance(a, _Ref):
        return by_name[a.name]
    if isinstance(a, _TorchName):
        return getattr(torch, a.name)
    return a


# -- encoding ---------------------------------------------------------------------------------------


def _encode_target(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::", 1)
        return _Op(ns, name, target._overloadname)
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns, name = target._qualified_op_name.split("::", 1)
        return _Op(ns, name, None)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _Op("higher_order", target.name(), None)
    return target


def _encode_int(s: Any) -> Any:
    if isinstance(s, torch.SymInt):
        node = s.node
        try:
            env = node.shape_env
            hint = int(env.optimization_hint(node.expr) if hasattr(env, "optimization_hint")
                       else env.size_hint(node.expr)) if env is not None else None
        except Exception:  # noqa: BLE001 - unbacked sizes have no example value
            hint = None
        return _Sym(str(node.expr), hint)
    return int(s)


def _encode_val(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        try:
            stride = tuple(_encode_int(s) for s in v.stride())
        except Exception:  # noqa: BLE001 - sparse / nested layouts have no strides
            stride = ()
        return _Fake(tuple(_encode_int(s) for s in v.shape), stride, v.dtype, str(v.device), bool(v.requires_grad))
    if isinstance(v, torch.SymInt):
        return _encode_int(v)
    if isinstance(v, (torch.SymFloat, torch.SymBool)):
        return _DROP
    if isinstance(v, (list, tuple)):
        items = [_encode_val(x) for x in v]
        return _DROP if any(x is _DROP for x in items) else type(v)(items) if type(v) in (list, tuple) else tuple(items)
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
        return v
    return _DROP


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value, protocol=2)  # torch.save's protocol
        return True
    except Exception:  # noqa: BLE001 - any failure means "leave it out"
        return False


def _encode_meta(meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key == "tensor_meta":
            continue  # derived from "val"; rebuilt on load
        if key == "val":
            enc = _encode_val(value)
            if enc is not _DROP:
                out[key] = enc
            continue
        if key == "nn_module_stack" and isinstance(value, dict):
            value = {k: (p, c if isinstance(c, str) else f"{getattr(c, '__module__', '')}.{getattr(c, '__qualname__', c)}")
                     for k, (p, c) in value.items()}
        if _picklable(value):
            out[key] = value
    return out


def graph_state(graph: fx.Graph) -> list[tuple]:
    """One picklable record per node of ``graph``: name, op, target, args, kwargs, metadata."""
    nodes = []
    for node in graph.nodes:
        args = fx.node.map_aggregate(node.args, _encode_arg)
        kwargs = fx.node.map_aggregate(node.kwargs, _encode_arg)
        nodes.append((node.name, node.op, _encode_target(node.target), args, kwargs, _encode_meta(node.meta)))
    return nodes


def graph_module_state(gm: fx.GraphModule) -> dict[str, Any]:
    """Plain, picklable data from which :func:`graph_module_from_state` rebuilds ``gm``."""
    tensors: dict[str, Any] = {}
    names = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    # tensors with a role that no node reads are kept too, so roles and state dicts stay whole
    names += list((gm.meta.get("graphpeft") or {}).get("roles", {}) or {})
    for name in names:
        if name not in tensors:
            try:
                tensors[name] = get_tensor(gm, name)
            except AttributeError:
                pass
    codegen = gm.graph._codegen
    return {"format": FORMAT, "tensors": tensors, "nodes": graph_state(gm.graph), "meta": gm.meta,
            "codegen": codegen if type(codegen) is not fx.graph.CodeGen and _picklable(codegen) else None}


# -- decoding ---------------------------------------------------------------------------------------


class _FakeBuilder:
    """Builds fake tensors of one new fake mode; symbols of the old graph map to new ones."""

    def __init__(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.symbols: dict[str, Any] = {}

    def _symbol(self, name: str, hint: Optional[int]) -> Any:
        from torch._dynamo.source import ConstantSource
        from torch.fx.experimental.symbolic_shapes import DimDynamic

        if name not in self.symbols:
            self.symbols[name] = self.shape_env.create_symbol(hint if hint is not None else 8, ConstantSource(name),
                                                              dynamic_dim=DimDynamic.DYNAMIC)
        return self.symbols[name]

    def size(self, s: Any) -> Any:
        if not isinstance(s, _Sym):
            return s
        import sympy

        try:
            expr = sympy.sympify(s.expr)
            if not expr.free_symbols or s.hint is None:
                raise ValueError(s.expr)
            # the expression's variables get the example values of the original graph: a plain
            # symbol gets its own hint; the others are solved only when the expression is one symbol
            if expr.is_Symbol:
                new = self._symbol(str(expr), s.hint)
                return self.shape_env.create_symintnode(new, hint=s.hint)
            subs = {sym: self.symbols[str(sym)] for sym in expr.free_symbols if str(sym) in self.symbols}
            if len(subs) != len(expr.free_symbols):
                raise ValueError(s.expr)
            return self.shape_env.create_symintnode(expr.xreplace(subs), hint=s.hint)
        except Exception:  # noqa: BLE001 - an expression we cannot rebuild: its example value
            return s.hint if s.hint is not None else 1

    def value(self, v: Any) -> Any:
        if isinstance(v, _Fake):
            shape = [self.size(s) for s in v.shape]
            with self.mode:
                if len(v.stride) == len(shape):
                    t = torch.empty_strided(shape, [self.size(s) for s in v.stride], dtype=v.dtype, device=v.device)
                else:
                    t = torch.empty(shape, dtype=v.dtype, device=v.device)
            return t.requires_grad_(v.requires_grad) if v.dtype.is_floating_point or v.dtype.is_complex else t
        if isinstance(v, _Sym):
            return self.size(v)
        if isinstance(v, (list, tuple)):
            return type(v)(self.value(x) for x in v)
        return v


def _attach(root: torch.nn.Module, name: str, tensor: Any) -> None:
    owner = root
    *path, leaf = name.split(".")
    for part in path:
        child = getattr(owner, part, None)
        if child is None:
            child = torch.nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(tensor, torch.nn.Parameter):
        owner.register_parameter(leaf, tensor)
    elif isinstance(tensor, torch.Tensor):
        owner.register_buffer(leaf, tensor)
    else:
        setattr(owner, leaf, tensor)


def graph_from_state(nodes: list[tuple], fakes: Optional[_FakeBuilder] = None) -> fx.Graph:
    """The graph :func:`graph_state` described, with fake tensors of ``fakes`` (a new fake mode
    by default) in ``meta["val"]``; node names are kept."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    fakes = fakes or _FakeBuilder()
    graph = fx.Graph()
    by_name: dict[str, fx.Node] = {}
    # placeholders first, so plain symbols get their hints before expressions use them
    for name, op, target, args, kwargs, meta in nodes:
        if op == "placeholder" and "val" in meta:
            fakes.value(meta["val"])

    def resolve(a: Any) -> Any:
        return fx.node.map_aggregate(a, lambda x: _decode_arg(x, by_name))

    for name, op, target, args, kwargs, meta in nodes:
        target = target.resolve() if isinstance(target, _Op) else target
        node = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name)
        if node.name != name:  # names are kept (adapter records and signatures refer to them), also
            ns = graph._graph_namespace  # the ones the namespace avoids, such as "input"
            ns._used_names.add(name)
            node.name = name
            ns._rename_object(node, name)
        node.meta.update(meta)
        if "val" in meta:
            node.meta["val"] = val = fakes.value(meta["val"])
            if isinstance(val, torch.Tensor):
                try:
                    node.meta["tensor_meta"] = _extract_tensor_metadata(val)
                except Exception:  # noqa: BLE001 - tensor_meta is informative only
                    pass
        by_name[name] = node
    return graph


def graph_module_from_state(state: dict[str, Any]) -> fx.GraphModule:
    """The graph module :func:`graph_module_state` described (new fake tensors in ``meta``)."""
    if state.get("format") != FORMAT:
        raise ValueError(f"unknown graph state format {state.get('format')!r}")
    root = torch.nn.Module()
    for name, tensor in state["tensors"].items():
        _attach(root, name, tensor)
    graph = graph_from_state(state["nodes"])
    if state.get("codegen") is not None:
        graph._codegen = state["codegen"]
    gm = fx.GraphModule(root, graph)
    for name, tensor in state["tensors"].items():  # tensors no node reads (GraphModule copies only the read ones)
        try:
            get_tensor(gm, name)
        except AttributeError:
            _attach(gm, name, tensor)
    gm.meta = state["meta"]
    return gm
