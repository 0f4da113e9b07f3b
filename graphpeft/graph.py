"""The IR: an aten-level ``torch.fx.GraphModule`` plus graphpeft metadata.

Conventions every pass relies on:

* Parameters and buffers are ``get_attr`` nodes whose target is the tensor's original dotted
  path (``model.layers.0.self_attn.q_proj.weight``); new tensors are registered the same way
  (``...q_proj.lora_A.weight``), so names in the graph are the names in a state dict.
* Every parameter and buffer has exactly one :class:`Role`, kept in ``gm.meta``.
* Every node a pass creates carries :class:`Provenance` in ``node.meta["graphpeft"]`` and the
  ``nn_module_stack`` of the layer it belongs to, so it traces back to that layer.
* Nodes carry ``meta["val"]`` (a fake tensor) so shapes and dtypes can be checked without
  running the graph.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

aten = torch.ops.aten

META_KEY = "graphpeft"


class Role(str, enum.Enum):
    """What a tensor of the graph is for; decides gradients, checkpoints and export."""

    FROZEN = "frozen"
    TRAINABLE = "trainable"
    TRAINABLE_SLICE = "trainable-slice"
    ADAPTER = "adapter"
    ADAPTER_CONST = "adapter-const"
    BUFFER = "buffer"

    @property
    def trainable(self) -> bool:
        return self in (Role.TRAINABLE, Role.TRAINABLE_SLICE, Role.ADAPTER)


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a node came from: the pass, the rule and the layer (module path) it adapts."""

    pass_name: str
    rule: str = ""
    origin: str = ""
    adapter: str = ""
    part: str = ""

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (its order fixes what it draws)."""
    tags = getattr(node.target, "tags", ()) or ()
    if torch.Tag.nondeterministic_seeded in tags:
        return True
    name = str(getattr(node.target, "__name__", node.target))
    return any(k in name for k in ("rand", "bernoulli", "dropout", "normal_", "uniform_", "multinomial"))


def is_mutation(node: fx.Node) -> bool:
    """Whether ``node`` writes into one of its inputs (an in-place aten op)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def is_constant_factory(node: fx.Node) -> bool:
    """Whether ``node`` makes a tensor from literal arguments alone (``arange``, ``full``): no
    input node, no random draw, and no later op writes into it, so a copy of it made elsewhere
    (a recompute, a block of the fused head loss) has the same value."""
    return (node.op == "call_function" and not node.all_input_nodes and not is_random(node)
            and not any(is_mutation(u) and u.args and u.args[0] is node for u in node.users))


# --- graph-level metadata -------------------------------------------------------------------


def graph_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """graphpeft's metadata dictionary of a graph module (created on first use)."""
    return gm.meta.setdefault(META_KEY, {"roles": {}, "adapters": {}})


def roles(gm: fx.GraphModule) -> dict[str, Role]:
    """Mapping tensor name -> :class:`Role` for every parameter and buffer of ``gm``."""
    return graph_meta(gm)["roles"]


def set_role(gm: fx.GraphModule, name: str, role: Role) -> None:
    roles(gm)[name] = Role(role)
    tensor = _get_tensor(gm, name)
    if isinstance(tensor, torch.nn.Parameter):
        tensor.requires_grad_(Role(role).trainable)


def names_with_role(gm: fx.GraphModule, *wanted: Role) -> list[str]:
    return [n for n, r in roles(gm).items() if r in wanted]


def adapters(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Adapter records: adapter id -> {method, layer, name, tensors, config, join node name}."""
    return graph_meta(gm)["adapters"]


# --- named adapters ----------------------------------------------------------------------------
#
# One layer can carry several adapters, told apart by an adapter *name* (PEFT's adapter_name).
# The adapter "default" keeps the plain conventions (id = layer path, tensors under PEFT's file
# names), so a model with one adapter looks exactly as it always did; any other name gets the id
# ``"<name>:<layer path>"`` and its tensors live under ``adapters.<name>.<PEFT file name>``: the
# name is a prefix, not a PEFT-style infix, because infixing would turn a parameter leaf
# (``...ia3_l``) into a module for the other names.

DEFAULT_ADAPTER = "default"
ADAPTER_NAMESPACE = "adapters"
_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_adapter_name(name: str) -> str:
    """``name`` if it can name an adapter (an identifier: it becomes a module attribute)."""
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"adapter names are identifiers (letters, digits, '_'; not starting with a digit), got {name!r}")
    return name


def adapter_id(layer_path: str, name: str = DEFAULT_ADAPTER) -> str:
    """Key of one adapter's record: the layer path for "default", else ``"<name>:<layer path>"``."""
    return layer_path if name == DEFAULT_ADAPTER else f"{name}:{layer_path}"


def scoped_tensor_name(tensor_name: str, name: str = DEFAULT_ADAPTER) -> str:
    """Graph name of an adapter tensor whose PEFT file name is ``tensor_name``."""
    return tensor_name if name == DEFAULT_ADAPTER else f"{ADAPTER_NAMESPACE}.{name}.{tensor_name}"


def unscoped_tensor_name(graph_name: str, name: str = DEFAULT_ADAPTER) -> str:
    """Inverse of :func:`scoped_tensor_name`: the PEFT file name of an adapter tensor."""
    prefix = f"{ADAPTER_NAMESPACE}.{name}."
    return graph_name[len(prefix):] if name != DEFAULT_ADAPTER and graph_name.startswith(prefix) else graph_name


def adapter_name_of(record: dict[str, Any]) -> str:
    """The adapter name an adapter record belongs to (records from before names: "default")."""
    return record.get("name", DEFAULT_ADAPTER)


def _get_tensor(gm: fx.GraphModule, name: str) -> torch.Tensor:
    *path, leaf = name.split(".")
    mod: Any = gm
    for p in path:
        mod = getattr(mod, p)
    return getattr(mod, leaf)


def get_tensor(gm: fx.GraphModule, name: str) -> torch.Tensor:
    """The parameter or buffer registered in ``gm`` under a dotted name."""
    return _get_tensor(gm, name)


def _owner(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = name.split(".")
    mod: torch.nn.Module = root
    for p in path:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    return mod, leaf


def attach_tensor(root: torch.nn.Module, name: str, tensor: torch.Tensor, role: Role) -> None:
    """Register a parameter (or buffer, for :attr:`Role.BUFFER`) on ``root`` by dotted name."""
    owner, leaf = _owner(root, name)
    if Role(role) == Role.BUFFER:
        owner.register_buffer(leaf, tensor)
    else:
        # requires_grad is set at construction: a frozen integer constant (SHiRA's sparse
        # indices, adapter-const) cannot be a Parameter that requires grad even for a moment
        trainable = Role(role).trainable
        param = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor, requires_grad=trainable)
        param.requires_grad_(trainable)
        owner.register_parameter(leaf, param)


def register_tensor(gm: fx.GraphModule, name: str, tensor: torch.Tensor, role: Role) -> None:
    """Register a tensor on ``gm`` under a dotted name and record its role."""
    attach_tensor(gm, name, tensor, role)
    roles(gm)[name] = Role(role)


def remove_tensor(gm: fx.GraphModule, name: str) -> None:
    owner, leaf = _owner(gm, name)
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)
    roles(gm).pop(name, None)


def fake_mode_of(gm: fx.GraphModule):
    """The fake mode the graph's ``meta['val']`` tensors live in (None if there are none).

    Read from the first node with a fake value: a graph's values share one mode, and every
    builder asks this, so checking them all made legalizing a 9,000-node step quadratic
    (Qwen2-0.5B-shaped step: 190 builders, over half of the export's legalization, profiled)."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor

    first = next((n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), FakeTensor)), None)
    if first is not None:
        return detect_fake_mode([first])
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals) if vals else None


def val(node: object) -> Optional[torch.Tensor]:
    """The traced tensor value of ``node`` (``meta['val']``); None for a non-tensor or a non-node."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def numel_hint(node: fx.Node) -> int:
    """Elements of a node's value (-1 if unknown), symbolic sizes at their example value: read
    without guarding on them (``int()`` of a symbolic size would specialize a dynamic batch)."""
    v = val(node)
    if v is None:
        return -1
    n = 1
    for d in v.shape:
        if isinstance(d, torch.SymInt):
            d = d.node.hint if d.node.hint is not None else 1
        n *= int(d)
    return n


# --- building nodes --------------------------------------------------------------------------


class GraphBuilder:
    """Creates nodes after an anchor, stamping provenance, module stack and ``meta['val']``.

    Every rewrite goes through a builder, which is how the "provenance on every created node"
    invariant holds without each pass remembering it.
    """

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, provenance: Provenance,
                 module_stack: Optional[dict] = None) -> None:
        self.gm = gm
        self.provenance = provenance
        self._cursor = anchor
        self._module_stack = module_stack if module_stack is not None else anchor.meta.get("nn_module_stack")
        self._fake_mode = fake_mode_of(gm)
        self.created: list[fx.Node] = []

    def _stamp(self, node: fx.Node) -> fx.Node:
        node.meta[META_KEY] = self.provenance.as_dict()
        if self._module_stack is not None:
            node.meta["nn_module_stack"] = dict(self._module_stack)
        self.created.append(node)
        return node

    def _insert(self, make: Callable[[], fx.Node]) -> fx.Node:
        with self.gm.graph.inserting_after(self._cursor):
            node = make()
        self._cursor = node
        return node

    def param(self, name: str, tensor: torch.Tensor, role: Role) -> fx.Node:
        """Register ``tensor`` as ``name`` with ``role`` and return a ``get_attr`` node for it."""
        register_tensor(self.gm, name, tensor, role)
        node = self._insert(lambda: self.gm.graph.get_attr(name))
        if self._fake_mode is not None:
            node.meta["val"] = self._fake_mode.from_tensor(get_tensor(self.gm, name), static_shapes=True)
        return self._stamp(node)

    def attr(self, name: str) -> fx.Node:
        """A ``get_attr`` node for a tensor already registered on the graph (by this or an
        earlier rewrite), e.g. a basis shared by every adapted layer (VeRA's ``vera_A``).

        Each rewrite reads a shared tensor through its own stamped node, so deleting one
        adapter's nodes (merge) leaves the other adapters' reads in place.
        """
        if name not in roles(self.gm):
            raise KeyError(f"{name} is not a tensor of the graph; register it first (GraphBuilder.param)")
        node = self._insert(lambda: self.gm.graph.get_attr(name))
        if self._fake_mode is not None:
            node.meta["val"] = self._fake_mode.from_tensor(get_tensor(self.gm, name), static_shapes=True)
        return self._stamp(node)

    def call(self, target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        node = self._insert(lambda: self.gm.graph.call_function(target, args, kwargs))
        if self._fake_mode is not None:
            node.meta["val"] = fake_eval(self._fake_mode, target, args, kwargs)
        return self._stamp(node)


def fake_eval(fake_mode: Any, target: Callable, args: Sequence[Any], kwargs: dict) -> Any:
    """Evaluate ``target`` on the fake values of its argument nodes."""

    def to_val(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    fargs, fkwargs = pytree.tree_map(to_val, (tuple(args), dict(kwargs)))
    with fake_mode:
        return target(*fargs, **fkwargs)


def stamp_existing(node: fx.Node, provenance: Provenance) -> None:
    node.meta[META_KEY] = provenance.as_dict()


def provenance(node: fx.Node) -> Optional[dict[str, str]]:
    return node.meta.get(META_KEY)


# --- layers: the parameter-consuming ops passes target ---------------------------------------

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclasses.dataclass
class Layer:
    """One weight-carrying op of the graph, named by its module path."""

    path: str
    kind: str  # "linear" | "conv" | "embedding" | "norm" (find_norms) | "parameter" (find_parameters)
    node: fx.Node
    weight: str
    bias: Optional[str]
    in_features: int
    out_features: int
    module_class: str
    # Weight stored as (in, out) like GPT-2's Conv1D; PEFT calls this fan_in_fan_out.
    fan_in_fan_out: bool = False
    #: other layers that read the same weight (tied weights, e.g. GPT-2's lm_head and wte); a
    #: module called several times lists its own path once per other call
    shared_with: list[str] = dataclasses.field(default_factory=list)
    #: when the module is called several times with this weight (ALBERT's shared layers): the
    #: op node of every call, in graph order (``node`` is one of them); else empty
    calls: list[fx.Node] = dataclasses.field(default_factory=list)
    #: the largest :attr:`layer_index` of the graph (None if no path is numbered); lets a plan
    #: say "the last k layers" with negative indices (``layers=[-1]``)
    deepest_index: Optional[int] = None

    @property
    def tied_to(self) -> list[str]:
        """Other modules reading this layer's weight (tied weights), without its own other calls."""
        return [p for p in self.shared_with if p != self.path]

    @property
    def layer_index(self) -> Optional[int]:
        """The first integer component of the path (``model.layers.3.mlp`` -> 3)."""
        m = _LAYER_INDEX.search(self.path)
        return int(m.group(1)) if m else None


def _attr_name(node: Any) -> Optional[str]:
    # an adapter that rewrites the weight (SHiRA's scatter) feeds the layer op through its join,
    # whose first argument is what it replaces: the op still reads that weight, and is a layer
    while (isinstance(node, fx.Node) and node.op == "call_function"
           and (node.meta.get(META_KEY) or {}).get("part") == "join"):
        node = node.args[0]
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _module_of(node: fx.Node, weight: str) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        return _clean_path(path), cls_name.rsplit(".", 1)[-1]
    return weight.rsplit(".", 1)[0], ""


def _clean_path(path: str) -> str:
    # strict-mode stacks look like "L['self'].model.layers[0]"; normalise to "model.layers.0"
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def find_layers(gm: fx.GraphModule) -> list[Layer]:
    """Every linear, conv and embedding op whose weight is a graph tensor, in graph order."""
    layers: list[Layer] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or META_KEY in node.meta:
            continue  # nodes created by passes (adapter branches) are not layers
        layer = _as_layer(gm, node)
        if layer is not None:
            layers.append(layer)
    _name_uncalled_children(layers)
    for layer in layers:
        layer.shared_with = [o.path for o in layers if o.weight == layer.weight and o is not layer]
        calls = [o.node for o in layers if o.weight == layer.weight and o.path == layer.path]
        layer.calls = calls if len(calls) > 1 else []
    _set_deepest(layers)
    return layers


def _name_uncalled_children(layers: Sequence[Layer]) -> None:
    """A module may read a child's weight without calling the child (``nn.MultiheadAttention``
    uses ``out_proj.weight`` in its own forward): the op's module stack then names the parent.
    Such a layer is named by the child that owns the weight (``attn.out_proj``), as PEFT names
    it, when no other layer has that path (a tied head reading ``embed.weight`` stays apart)."""
    paths = {l.path for l in layers}
    for layer in layers:
        owner = layer.weight.rsplit(".", 1)[0] if "." in layer.weight else ""
        if owner not in paths and (owner.startswith(layer.path + ".") or (not layer.path and owner)):
            layer.path = owner


def _set_deepest(layers: Sequence[Layer]) -> None:
    deepest = max((l.layer_index for l in layers if l.layer_index is not None), default=None)
    for layer in layers:
        layer.deepest_index = deepest


def _is_norm_class(cls_name: str) -> bool:
    # LayerNorm, RMSNorm (LlamaRMSNorm ...), BatchNorm2d, GroupNorm, InstanceNorm ...
    return "norm" in cls_name.lower()


def find_norms(gm: fx.GraphModule) -> list[Layer]:
    """Every normalisation module with an affine weight that is a graph parameter, in graph order.

    Norm weights are read by elementwise ops (RMSNorm's ``mul``) or by the norm op itself
    (``layer_norm``, ``batch_norm``), so they are found by module path instead: a parameter
    ``<path>.weight`` (and ``<path>.bias``) read by an op whose innermost ``nn_module_stack``
    entry is the module ``<path>`` of a class named ``*Norm*``. Each is a :class:`Layer` of kind
    ``"norm"`` (``node``: the op reading the weight; features: the weight's size). Buffers
    (running statistics) are not parameters and are never selected.
    """
    role_map = roles(gm)
    found: dict[str, Layer] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or role_map.get(node.target) in (None, Role.BUFFER):
            continue
        owner, leaf = node.target.rsplit(".", 1) if "." in node.target else ("", node.target)
        if leaf not in ("weight", "bias"):
            continue
        for user in node.users:
            if user.op != "call_function" or META_KEY in user.meta or not user.meta.get("nn_module_stack"):
                continue
            path, cls = _module_of(user, node.target)
            if path != owner or not _is_norm_class(cls):
                continue
            tensor = get_tensor(gm, node.target)
            if not tensor.is_floating_point():
                continue
            layer = found.get(path)
            if layer is None:
                layer = Layer(path, "norm", user, "", None, tensor.numel(), tensor.numel(), cls)
                found[path] = layer
            if leaf == "weight":
                layer.weight, layer.node = node.target, user
            else:
                layer.bias = node.target
            break
    norms = [l for l in found.values() if l.weight]  # a norm without an affine weight has nothing to train
    indices = [l.layer_index for l in norms + find_layers(gm) if l.layer_index is not None]
    for layer in norms:
        layer.deepest_index = max(indices, default=None)
    return norms


#: ``graph_meta`` key: module paths whose 3-D parameters are stored ``(experts, in, out)``
#: (a module's ``is_transposed``, which PEFT's ``ParamWrapper`` reads); recorded at trace time
TRANSPOSED_MODULES_KEY = "transposed_modules"


def find_parameters(gm: fx.GraphModule) -> list[Layer]:
    """Every floating-point 2-D or 3-D model parameter the graph reads, in model order, as a
    :class:`Layer` of kind ``"parameter"`` named by the parameter's own path
    (``model.layers.0.mlp.experts.gate_up_proj``): the candidates of PEFT's
    ``target_parameters``, LoRA on the tensor itself wherever the graph reads it.

    Features follow PEFT's ``ParamWrapper``: a 2-D ``(out, in)``; a 3-D ``(experts, out, in)``,
    or ``(experts, in, out)`` (``fan_in_fan_out``) when its module sets ``is_transposed``.
    ``node`` is the first ``get_attr`` reading it.
    """
    role_map = roles(gm)
    first: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and META_KEY not in node.meta and role_map.get(node.target) in (Role.FROZEN,
                                                                                                Role.TRAINABLE):
            first.setdefault(node.target, node)
    transposed = set(graph_meta(gm).get(TRANSPOSED_MODULES_KEY) or ())
    found = []
    for name in role_map:  # model order: PEFT nests the wrappers of one module in this order
        tensor = get_tensor(gm, name) if name in first else None
        if tensor is None or tensor.dim() not in (2, 3) or not tensor.is_floating_point():
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        user = next(iter(first[name].users), None)
        cls = _module_of(user, name)[1] if user is not None else ""
        flip = tensor.dim() == 3 and owner in transposed
        out_f, in_f = (tensor.shape[-1], tensor.shape[-2]) if flip else (tensor.shape[-2], tensor.shape[-1])
        found.append(Layer(name, "parameter", first[name], name, None, in_f, out_f, cls, fan_in_fan_out=flip))
    _set_deepest(found)
    return found


#: the convolution ops a layer can be (``padding="same"``/``"valid"`` give the ``.padding`` forms)
CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
            aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)


def conv_groups(node: fx.Node) -> int:
    """The ``groups`` of a convolution op node (1 when not given)."""
    return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))


def _as_layer(gm: fx.GraphModule, node: fx.Node) -> Optional[Layer]:
    t = node.target
    if t == aten.linear.default:
        w, b = _attr_name(node.args[1]), _attr_name(node.args[2]) if len(node.args) > 2 else None
        if w is None:
            return None
        out_f, in_f = get_tensor(gm, w).shape
        path, cls = _module_of(node, w)
        return Layer(path, "linear", node, w, b, in_f, out_f, cls)
    if t in CONV_OPS:
        w = _attr_name(node.args[1])
        if w is None:
            return None
        b = _attr_name(node.args[2]) if len(node.args) > 2 else None
        weight = get_tensor(gm, w)
        path, cls = _module_of(node, w)
        # in_features counts every input channel (weight dim 1 holds in/groups of a grouped conv)
        return Layer(path, "conv", node, w, b, weight.shape[1] * conv_groups(node), weight.shape[0], cls)
    if t == aten.embedding.default:
        w = _attr_name(node.args[0])
        if w is None:
            return None
        num, dim = get_tensor(gm, w).shape
        path, cls = _module_of(node, w)
        return Layer(path, "embedding", node, w, None, num, dim, cls)
    if t == aten.addmm.default:
        # GPT-2's Conv1D: addmm(bias, x, W) with W stored (in, out)
        w, b = _attr_name(node.args[2]), _attr_name(node.args[0])
        if w is None:
            return None
        in_f, out_f = get_tensor(gm, w).shape
        path, cls = _module_of(node, w)
        return Layer(path, "linear", node, w, b, in_f, out_f, cls, fan_in_fan_out=True)
    return None


def adapter_joins(record: dict[str, Any]) -> list[str]:
    """Names of the join nodes of one adapter record: one per call of its layer (a module called
    several times has a branch at each call), the first being ``record["join"]``."""
    return list(record.get("joins") or [record["join"]])


def op_args(node: fx.Node) -> dict[str, Any]:
    """All arguments of an aten op node by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def tensor_users(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    """The nodes that read tensor ``name`` (through any ``get_attr`` of it)."""
    users: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == name:
            users.extend(node.users)
    return users


def op_count(gm: fx.GraphModule) -> int:
    """Number of ``call_function`` nodes: the size measure merge tests compare."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def iter_created(gm: fx.GraphModule, adapter: Optional[str] = None) -> Iterator[fx.Node]:
    for node in gm.graph.nodes:
        prov = node.meta.get(META_KEY)
        if prov and (adapter is None or prov.get("adapter") == adapter):
            yield node


# --- the graph as a networkx DiGraph (for analyses: liveness, scheduling, min-cuts) ---------------


def tensor_bytes(value: Any) -> int:
    """Bytes a (fake) tensor value, or a tuple/list of them, occupies (0 for anything else,
    and for sizes that are not concrete integers)."""
    if isinstance(value, torch.Tensor):
        try:
            return int(value.numel()) * value.element_size()
        except Exception:  # noqa: BLE001 - unbacked symbolic sizes
            return 0
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def alias_source(node: fx.Node) -> Optional[fx.Node]:
    """The node whose storage ``node`` shares (a view, an in-place write, a ``getitem`` of a
    tuple), or None when ``node`` allocates its own (or is not an op)."""
    import operator

    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        base = node.args[0]
        return base if isinstance(base, fx.Node) else None
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    want = schema.returns[0].alias_info
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.before_set & want.before_set:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if isinstance(value, fx.Node):
                return value
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None


def _target_text(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target.__name__}"
    if callable(target):
        return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', str(target))}".lstrip(".")
    return str(target)


def _node_role(gm: fx.GraphModule, node: fx.Node, input_kinds: dict[fx.Node, str]) -> str:
    if node.op == "get_attr":
        role = roles(gm).get(str(node.target))
        return role.value if role is not None else Role.BUFFER.value
    if node.op == "placeholder":
        return input_kinds.get(node, "input")
    return ""


def to_networkx(gm: fx.GraphModule) -> "Any":
    """The graph of ``gm`` as a ``networkx.DiGraph``, for analyses a pass author would
    otherwise write by hand (liveness, reachability, dominators, min-cuts, schedules).

    Nodes are keyed by the fx node's name and carry:

    * ``node`` — the ``torch.fx.Node`` itself (rewrite through it, not through the DiGraph);
    * ``index`` — its position in the graph's current order;
    * ``op`` / ``target`` — the fx opcode and the target as text (``"aten.mm.default"``);
    * ``bytes`` — the bytes the node *allocates*: the size of ``meta["val"]`` for an op that
      makes a new tensor, 0 for views, in-place writes and ``getitem`` (they share storage);
    * ``alias_of`` — the name of the node whose storage a view/in-place op shares (or None),
      resolved to the allocating root;
    * ``role`` — for ``get_attr`` tensors their :class:`Role` value (``frozen``, ``adapter``,
      ...); for inputs of a training graph their kind (``param``, ``state``, ``lr``,
      ``batch``); ``""`` for ops;
    * ``phase`` — the phase recorded in the node's provenance (``forward``, ``loss``,
      ``backward``, ``accumulate``, ``clip``, ``optimizer``; ``input`` for tensors and inputs,
      ``output`` for the output node; ``""`` when the graph has no phases).

    Edges go from producer to consumer (one per distinct input, the output node included) and
    carry ``bytes``: the producer's ``meta["val"]`` size. The DiGraph is a snapshot: it does not
    follow later edits of ``gm``.

    Example: the forward values the backward of a training graph reads::

        G = to_networkx(step.graph_module)
        saved = {u for u, v in G.edges if G.nodes[u]["phase"] == "forward" and G.nodes[v]["phase"] == "backward"}
    """
    import networkx as nx

    G = nx.DiGraph()
    input_kinds: dict[fx.Node, str] = {}
    sig = graph_meta(gm).get("training")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if sig is not None and len(getattr(sig, "inputs", ())) == len(placeholders):
        input_kinds = {n: spec.kind for n, spec in zip(placeholders, sig.inputs)}
    root: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(gm.graph.nodes):
        src = alias_source(node)
        root[node] = root.get(src, src) if src is not None else node
        if node.op in ("placeholder", "get_attr"):
            phase = "input"
        elif node.op == "output":
            phase = "output"
        else:
            phase = str((node.meta.get(META_KEY) or {}).get("part", ""))
        target = node.target
        G.add_node(node.name, node=node, index=i, op=node.op,
                   target=_target_text(target),
                   bytes=0 if (src is not None or node.op == "output") else tensor_bytes(node.meta.get("val")),
                   alias_of=None if src is None else root[node].name,
                   role=_node_role(gm, node, input_kinds), phase=phase)
        for a in node.all_input_nodes:
            G.add_edge(a.name, node.name, bytes=tensor_bytes(a.meta.get("val")))
    return G
