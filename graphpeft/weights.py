"""Big models: compile on the meta device, then bring the base weights in from safetensors.

    with torch.device("meta"):                       # no weight memory at all
        model = LlamaForCausalLM(config)
    cm = gp.compile(model, plan, example_inputs=(ids,), example_kwargs={"use_cache": False})
    cm.load_base_weights("path/to/checkpoint")       # a file, or a folder of shards

The checkpoint is read with ``safetensors.safe_open`` (memory-mapped), one tensor at a time:
each graph tensor is materialized from its slice of the file and the meta placeholder dropped,
and the file's pages are released before the next tensor, so the weights never exist twice in
memory and no state dict is built. Every header is checked first (names, shapes, dtypes): on a
mismatch nothing is loaded.

Names: the graph names base tensors by their ``state_dict`` paths (the IR convention), which
are the names ``save_pretrained`` and ``safetensors.torch.save_model`` write, so a checkpoint
of the original model loads as it is (``key_map`` renames other layouts).

Stored forms: a base weight stored in another form (``gp.Quantize``: int8/int4/nf4 tensors) is
read in float from the checkpoint and converted as it is loaded, by the form's registered
loader (:data:`graphpeft.registry.WEIGHT_FORMATS`), so the float model never exists in full.

Adapters: tensors created by a meta compile are meta too. While a layer's weight is in hand, its
adapters are initialized by the method's own rewrite run on that one layer with the real weight
(same seed, same values as a compile from real weights: LoRA's A Kaiming-uniform and B zero,
DoRA's magnitude from the weight ...). Methods whose adapters share tensors across layers
(VeRA, RandLoRA) are left on meta: load their adapter afterwards (``cm.load_adapter`` /
``load_adapter_state_dict``). A model that still holds meta tensors raises
:class:`WeightsError` when called.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

import torch
import torch.fx as fx

from .errors import WeightsError
from .graph import Role, adapter_name_of, adapters, attach_tensor, find_layers, get_tensor, graph_meta, roles
from .trace import ALIASES_KEY
from .registry import PASSES, WEIGHT_FORMATS, get_method, load_plugins

if TYPE_CHECKING:
    from .compiled import CompiledModel

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors dtype names -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

KeyMap = Union[Mapping[str, Optional[str]], Callable[[str], Optional[str]]]


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_base_weights` did."""

    files: list[str]
    #: graph tensors materialized or overwritten (a quantized weight counts once)
    loaded: int = 0
    #: bytes of the tensors now held by the graph for them (stored form: the quantized bytes)
    bytes: int = 0
    #: float weights converted to a stored form as they were loaded (weight name -> form)
    converted: dict[str, str] = dataclasses.field(default_factory=dict)
    #: graph tensors the checkpoint did not have (only with ``strict=False``; meta ones stay meta)
    missing: list[str] = dataclasses.field(default_factory=list)
    #: checkpoint keys the graph has no tensor for (ignored with ``strict=False``)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    #: adapters (ids) initialized from their loaded layer weight
    adapters_initialized: list[str] = dataclasses.field(default_factory=list)
    #: tensors still on the meta device afterwards (the model cannot run until they are loaded)
    still_meta: list[str] = dataclasses.field(default_factory=list)
    #: with ``shard=(rank, world)``: frozen weight name -> this rank's shard (flattened, padded to
    #: a multiple of ``world``, as :func:`shard_of` cuts it); their whole tensors stay on meta
    shards: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors ({self.bytes / 2**20:,.1f} MiB) from {len(self.files)} file(s)"]
        if self.converted:
            lines.append(f"  converted on load: {len(self.converted)} weights "
                         f"({', '.join(sorted(set(self.converted.values())))})")
        if self.adapters_initialized:
            lines.append(f"  adapters initialized from their weights: {len(self.adapters_initialized)}")
        if self.shards:
            lines.append(f"  frozen weights read as this rank's shards only: {len(self.shards)}")
        for what in ("missing", "unexpected", "still_meta"):
            names = getattr(self, what)
            if names:
                lines.append(f"  {what.replace('_', ' ')}: {len(names)} ({', '.join(names[:5])}"
                             f"{' ...' if len(names) > 5 else ''})")
        return "\n".join(lines)


@dataclasses.dataclass
class _Target:
    """One thing the graph wants from the checkpoint: a graph tensor, or a float weight that a
    stored form (``fmt``) turns into its own tensors."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fmt: Optional[str] = None  # WEIGHT_FORMATS key (None: a plain graph tensor)
    meta: bool = False  # the graph does not hold its values yet


# --- the checkpoint ----------------------------------------------------------------------------


def checkpoint_files(path: Union[str, os.PathLike]) -> dict[str, str]:
    """Checkpoint key -> file, from the headers only: a ``.safetensors`` file, or a folder with
    ``model.safetensors.index.json`` (shards, as ``save_pretrained`` writes them), one
    ``model.safetensors``, or ``*.safetensors`` files."""
    from safetensors import safe_open

    p = os.fspath(path)
    if os.path.isfile(p):
        files = [p]
    elif os.path.isdir(p):
        index = os.path.join(p, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise WeightsError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {e}") from e
            files = [os.path.join(p, name) for name in dict.fromkeys(weight_map.values())]
        elif os.path.isfile(os.path.join(p, SINGLE_NAME)):
            files = [os.path.join(p, SINGLE_NAME)]
        else:
            files = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith(".safetensors"))
            if not files:
                raise WeightsError(f"{p} holds no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors file; "
                                   "save the model with save_pretrained() or safetensors.torch.save_model()")
    else:
        raise WeightsError(f"{p} does not exist: give a .safetensors file or the folder save_pretrained() wrote")
    keys: dict[str, str] = {}
    for file in files:
        if not os.path.isfile(file):
            raise WeightsError(f"the index names {file}, which does not exist: the checkpoint is incomplete")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    keys[key] = file
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightsError(f"{file} is not a valid safetensors file: {e}") from e
    return keys


def _header(file: str, key: str) -> tuple[tuple[int, ...], Optional[torch.dtype], str]:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        sl = f.get_slice(key)
        name = sl.get_dtype()
        return tuple(int(s) for s in sl.get_shape()), _DTYPES.get(name), name


def _read(file: str, key: str) -> torch.Tensor:
    """One tensor, memory-mapped: a view of the file's pages, released when the tensor is (the
    file is opened per tensor, so no other tensor's pages stay mapped)."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return f.get_tensor(key)


# --- what the graph wants ------------------------------------------------------------------------


def _targets(gm: fx.GraphModule) -> dict[str, _Target]:
    """Checkpoint-facing names of the base tensors: every frozen/trainable/buffer tensor, with a
    stored weight under its float name (its stored tensors also load directly by their names)."""
    role_map = roles(gm)
    out: dict[str, _Target] = {}
    for fmt_name, fmt in WEIGHT_FORMATS.items():
        for weight, rec in fmt.records(gm).items():
            stored = list(rec["tensors"])
            out[weight] = _Target(weight, tuple(rec["shape"]), rec["dtype"], fmt_name,
                                  any(get_tensor(gm, n).is_meta for n in stored))
    for name, role in role_map.items():
        if role in (Role.ADAPTER, Role.ADAPTER_CONST):
            continue
        t = get_tensor(gm, name)
        out[name] = _Target(name, tuple(t.shape), t.dtype, None, t.is_meta)
    return out


def _stored_names(gm: fx.GraphModule) -> dict[str, str]:
    """Stored tensor name -> the float weight it stands for."""
    return {n: weight for fmt in WEIGHT_FORMATS.values() for weight, rec in fmt.records(gm).items()
            for n in rec["tensors"]}


def _map_keys(keys: Mapping[str, str], key_map: Optional[KeyMap]) -> dict[str, tuple[str, str]]:
    """graph name -> (checkpoint key, file)."""
    if key_map is None:
        return {k: (k, f) for k, f in keys.items()}
    out: dict[str, tuple[str, str]] = {}
    for key, file in keys.items():
        name = key_map.get(key, key) if isinstance(key_map, Mapping) else key_map(key)
        if name is not None:
            out[name] = (key, file)
    return out


def _plan(gm: fx.GraphModule, keys: Mapping[str, tuple[str, str]], extra: Mapping[str, torch.Tensor],
          strict: bool, cast: bool) -> tuple[list[tuple[_Target, Any]], list[str], list[str]]:
    """Check every header against the graph; return (what to load, missing, unexpected). Raises
    :class:`WeightsError` listing every problem before anything is loaded."""
    targets = _targets(gm)
    stored = _stored_names(gm)
    problems: list[str] = []
    todo: list[tuple[_Target, Any]] = []
    seen: set[str] = set()
    sources: dict[str, Any] = {**{n: ("file", *v) for n, v in keys.items()}, **{n: ("extra", t) for n, t in extra.items()}}
    # a tied tensor (GPT-2's lm_head / wte) is one graph tensor: its other names load into it
    for alias, name in graph_meta(gm).get(ALIASES_KEY, {}).items():
        if alias in sources:
            src = sources.pop(alias)
            sources.setdefault(name, src)
    unexpected = []
    for name, src in sources.items():
        target = targets.get(name)
        if target is None:
            unexpected.append(src[1] if src[0] == "file" else name)
            continue
        if target.fmt is not None:
            recs = WEIGHT_FORMATS[target.fmt].records(gm)[name]["tensors"]
            if all(n in sources for n in recs):
                continue  # the checkpoint holds the stored form itself: loaded tensor by tensor
        if src[0] == "file":
            shape, dtype, dtype_name = _header(src[2], src[1])
            where = f"{src[1]} (in {os.path.basename(src[2])})"
        else:
            shape, dtype, dtype_name = tuple(src[1].shape), src[1].dtype, str(src[1].dtype)
            where = f"{name} (extra)"
        if shape != target.shape:
            problems.append(f"{where} has shape {list(shape)}, the graph's {name} needs {list(target.shape)}")
        elif dtype != target.dtype and not (cast and dtype is not None and dtype.is_floating_point
                                            and target.dtype.is_floating_point):
            problems.append(f"{where} is {dtype_name}, the graph's {name} is "
                            f"{str(target.dtype).replace('torch.', '')}")
        todo.append((target, src))
        seen.add(name)
    # a stored weight comes as its float form (converted) or as all of its stored tensors
    seen |= {n for n, weight in stored.items() if weight in seen}
    seen |= {weight for weight in set(stored.values()) if all(n in seen for n, w in stored.items() if w == weight)}
    missing = [n for n, t in targets.items() if n not in seen and (t.meta or _is_parameter(gm, n, t))]
    if strict and missing:
        metas = [n for n in missing if targets[n].meta]
        hint = (" Tensors that are not in a checkpoint (non-persistent buffers such as rotary inv_freq) "
                "need values: build the model with accelerate.init_empty_weights() (parameters on meta, "
                "buffers real) or pass extra={name: tensor}." if any(roles(gm).get(n) == Role.BUFFER for n in metas)
                else "")
        if any(not targets[n].fmt and roles(gm).get(n) != Role.BUFFER for n in missing):
            hint += (" A tied weight (an lm_head sharing the embeddings) is stored once: call model.tie_weights() "
                     "on the model without weights before compiling it.")
        problems.append(f"missing from the checkpoint: {_some(missing)}.{hint}")
    if strict and unexpected:
        problems.append(f"unexpected checkpoint keys (no graph tensor of that name): {_some(unexpected)}; "
                        "rename them with key_map=..., or pass strict=False to ignore them")
    if problems:
        raise WeightsError("the checkpoint does not fit the compiled model (nothing was loaded): "
                           + "; ".join(problems[:20]) + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else "")
                           + ". Is it the checkpoint of the model that was compiled (same config and dtype)?")
    return todo, missing, unexpected


def _is_parameter(gm: fx.GraphModule, name: str, target: _Target) -> bool:
    return target.fmt is not None or roles(gm).get(name) in (Role.FROZEN, Role.TRAINABLE, Role.TRAINABLE_SLICE)


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


# --- loading ---------------------------------------------------------------------------------------


def set_tensor(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """Give graph tensor ``name`` the values of ``value``: copied in place when it has storage
    (other graphs sharing the tensor see the change), or registered anew for a meta tensor (a
    meta tensor cannot take a storage on another device)."""
    cur = get_tensor(gm, name)
    with torch.no_grad():
        if not cur.is_meta and cur.device == value.device and cur.dtype == value.dtype:
            cur.copy_(value)
            return
        attach_tensor(gm, name, value.to(cur.dtype) if cur.dtype != value.dtype else value, roles(gm)[name])


def load_base_weights(cm: "CompiledModel", path: Union[str, os.PathLike], *, strict: bool = True,
                      key_map: Optional[KeyMap] = None, extra: Optional[Mapping[str, torch.Tensor]] = None,
                      cast: bool = False, init_adapters: bool = True,
                      device: Union[str, torch.device] = "cpu",
                      shard: Optional[tuple[int, int]] = None) -> LoadReport:
    """Load base weights from a safetensors checkpoint into ``cm``'s graph; see the module doc
    and :meth:`CompiledModel.load_base_weights`.

    ``shard=(rank, world)`` (a sharded data-parallel step's load): every frozen floating-point
    weight in plain form is read as this rank's ``1/world`` slice only (``report.shards``); its
    graph tensor stays on meta, so the whole weight never exists in this process."""
    load_plugins()
    gm = cm.graph_module
    if cm._bank is not None and any(t.is_meta for t in gm.parameters()):
        raise WeightsError("this model has named adapters added on the meta device; load the base weights "
                           "before cm.add_adapter(...)")
    if graph_meta(gm).get("slices"):
        raise WeightsError("load_base_weights does not load into sparse-update slices (gp.Update row slices) yet; "
                           "compile such plans from a model with real weights")
    keys = _map_keys(checkpoint_files(path), key_map)
    todo, missing, unexpected = _plan(gm, keys, dict(extra or {}), strict, cast)
    report = LoadReport(sorted(set(f for _, f in keys.values())), missing=missing, unexpected=unexpected)
    pending = _pending_adapters(gm) if init_adapters else {}
    device = torch.device(device)
    for target, src in todo:
        if shard is not None and _shardable(gm, target):
            report.shards[target.name] = part = _read_shard(src, target, shard, device)
            report.bytes += part.numel() * part.element_size()
            report.loaded += 1
            if pending.get(target.name):
                report.adapters_initialized += _init_adapters_of_shard(cm, target, src, pending.pop(target.name),
                                                                       device, cast)
            continue
        value = _read(src[2], src[1]) if src[0] == "file" else src[1].detach()
        if cast and value.dtype != target.dtype:
            value = value.to(target.dtype)
        if pending.get(target.name):
            report.adapters_initialized += _init_adapters(cm, target.name, value, pending.pop(target.name), device)
        if target.fmt is not None:
            stored = WEIGHT_FORMATS[target.fmt].encode(gm, target.name, value.to(device))
            for n, t in stored.items():
                set_tensor(gm, n, _own(t, value))
                report.bytes += t.numel() * t.element_size()
            report.converted[target.name] = WEIGHT_FORMATS[target.fmt].describe(gm, target.name)
        else:
            set_tensor(gm, target.name, _own(value.to(device), value))
            report.bytes += value.numel() * value.element_size()
        report.loaded += 1
        del value  # the file's pages go with the last view of them
    report.still_meta = sorted(n for n in roles(gm) if get_tensor(gm, n).is_meta and n not in report.shards)
    if report.loaded:
        retarget(gm, device)
    cm._weights_changed()
    if report.still_meta:
        log.warning("after loading, %d tensors are still on the meta device (%s); load them (an adapter: "
                    "cm.load_adapter) before running the model", len(report.still_meta), _some(report.still_meta))
    log.info("%s", report)
    return report


def _shardable(gm: fx.GraphModule, target: _Target) -> bool:
    """A frozen floating-point weight in plain form: what a sharded load reads as its shard
    (stored forms are encoded from the whole float weight, so they load whole)."""
    return target.fmt is None and roles(gm).get(target.name) == Role.FROZEN and target.dtype.is_floating_point


def _read_shard(src: Any, target: _Target, shard: tuple[int, int], device: torch.device) -> torch.Tensor:
    """This rank's flat shard of one weight (``shard_of`` of the whole, bit for bit), read
    from the file as the rows that hold it: at most the shard plus two rows is ever read."""
    from .training.distributed import pad_shard, shard_range

    rank, world = shard
    numel = math.prod(target.shape)
    start, stop, chunk = shard_range(numel, rank, world)
    if src[0] != "file":
        part = src[1].detach().reshape(-1)[start:stop]
    elif not target.shape or start >= stop:
        part = _read(src[2], src[1]).reshape(-1)[start:stop]  # a scalar, or an empty shard
    else:
        row = numel // target.shape[0]
        first, last = start // row, -(-stop // row)
        from safetensors import safe_open

        with safe_open(src[2], framework="pt") as f:
            rows = f.get_slice(src[1])[first:last]
        part = rows.reshape(-1)[start - first * row:stop - first * row]
    if part.dtype != target.dtype:
        part = part.to(target.dtype)
    return pad_shard(part.to(device), chunk)


def _init_adapters_of_shard(cm: "CompiledModel", target: _Target, src: Any,
                            pending: list[tuple[str, dict[str, Any]]], device: torch.device, cast: bool) -> list[str]:
    """Initialize the meta adapters on a weight loaded as a shard. Methods whose initialization
    reads only the weight's shape (LoRA) get it from a fake weight; one that reads its values
    (DoRA's magnitude) gets the whole weight read once, as a plain load would."""
    from torch._subclasses.fake_tensor import FakeTensor

    try:
        tensors = [_layer_adapter_tensors(cm, rec, None, stand_in=target) for _, rec in pending]
        if not any(isinstance(t, FakeTensor) or t.is_meta for ts in tensors for t in ts.values()):
            return _init_adapters(cm, target.name, torch.empty(0), pending, device, given=tensors)
    except Exception:  # noqa: BLE001 - reading the weight's values on meta fails: read it below
        pass
    log.info("initializing the adapters of %s reads its whole weight once", target.name)
    value = _read(src[2], src[1]) if src[0] == "file" else src[1].detach()
    value = value.to(target.dtype) if cast and value.dtype != target.dtype else value
    return _init_adapters(cm, target.name, value, pending, device)


def retarget(gm: fx.GraphModule, device: Union[str, torch.device], source: Optional[str] = "meta",
             fake_values: bool = True) -> fx.GraphModule:
    """Move the devices the trace baked into ``gm``'s ops (``arange(device=meta)`` ...) to
    ``device``, in place (the ``retarget_device`` pass)."""
    from .infra import PassContext

    PASSES["retarget_device"](device, source, fake_values)(gm, PassContext(verify=False))
    return gm


def _own(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``t`` in memory of its own (not a view of the memory-mapped file)."""
    if source.device.type == "cpu" and t.device.type == "cpu" and \
            t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return t.clone()
    return t


# --- adapters of a meta compile ------------------------------------------------------------------


def _pending_adapters(gm: fx.GraphModule) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Weight name -> the adapters (id, record) on it whose tensors are still meta."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for aid, rec in adapters(gm).items():
        if adapter_name_of(rec) != "default" or "weight" not in rec:
            continue
        if any(get_tensor(gm, n).is_meta for n in rec["tensors"].values() if n in roles(gm)):
            out.setdefault(rec["weight"], []).append((aid, rec))
    return out


def _init_adapters(cm: "CompiledModel", weight: str, value: torch.Tensor,
                   pending: list[tuple[str, dict[str, Any]]], device: torch.device,
                   given: Optional[list[dict[str, torch.Tensor]]] = None) -> list[str]:
    """Initialize the meta adapters on ``weight``'s layer from its real value: the method's own
    rewrite, run on a graph of that one layer, gives the tensors a compile from real weights
    gives (same rule, same seed); they are copied into ``cm``'s graph by name (``given``: the
    tensors per pending adapter, already made)."""
    done = []
    for i, (aid, rec) in enumerate(pending):
        try:
            tensors = given[i] if given is not None else _layer_adapter_tensors(cm, rec, value)
        except Exception as e:  # noqa: BLE001 - a method that cannot init on one layer stays meta (reported)
            log.warning("could not initialize adapter %s (%s) from its weight: %s; load it with cm.load_adapter",
                        aid, rec["method"], e)
            continue
        gm = cm.graph_module
        for name, t in tensors.items():
            if name in roles(gm) and tuple(get_tensor(gm, name).shape) == tuple(t.shape):
                set_tensor(gm, name, t.to(device))
        done.append(aid)
    return done


def _layer_adapter_tensors(cm: "CompiledModel", rec: dict[str, Any], value: Optional[torch.Tensor],
                           stand_in: Optional[_Target] = None) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``rec`` made from its layer's weight ``value`` (``stand_in``: from
    a fake weight of that shape on the CPU instead, whose values cannot be read: a method that
    reads them returns fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from .infra import PassContext
    from .rewrite import MatchResult

    gm = cm.graph_module
    method = get_method(rec["method"])
    rule = next((r for r in (cm.plan.rules if cm.plan is not None else [])
                 if r.name == rec["rule"] and r.to_dict().get(r.key) == rec.get("config")), None)
    if method is None or rule is None:
        raise WeightsError(f"no rule {rec['rule']} of method {rec['method']} in the plan")
    rewrite = next(iter(getattr(method.make_pass([rule]), "rules", [])), None)
    if rewrite is None or not hasattr(rewrite, "rewrite"):
        raise WeightsError(f"{rec['method']} has no per-layer rewrite")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    if stand_in is not None:
        value = FakeTensor(mode, torch.empty(stand_in.shape, dtype=stand_in.dtype, device="meta"), torch.device("cpu"))
    mini = _layer_graph(gm, rec, value, mode)
    layer = next(l for l in find_layers(mini) if l.path == rec["layer"])
    seed = cm._ctx.seed if cm._ctx is not None else 0
    ctx = PassContext(plan=cm.plan, verify=False, seed=seed)
    rewrite.rewrite(mini, MatchResult.success(rule.name, layer.node, layer.path, layer=layer), ctx)
    return {n: get_tensor(mini, n).detach() for n, r in roles(mini).items() if r in (Role.ADAPTER, Role.ADAPTER_CONST)}


def _layer_node(gm: fx.GraphModule, rec: dict[str, Any]) -> tuple[fx.Node, int]:
    """The layer op of an adapter record and the position of its weight argument (read directly,
    through a join, or through a stored form's decode subgraph)."""
    from .graph import META_KEY

    decoded = {out for fmt in WEIGHT_FORMATS.values() for w, r in fmt.records(gm).items() if w == rec["weight"]
               for out in r.get("outputs", [])}

    def is_weight(a: Any) -> bool:
        while isinstance(a, fx.Node) and a.op == "call_function" and (a.meta.get(META_KEY) or {}).get("part") == "join":
            a = a.args[0]
        return isinstance(a, fx.Node) and ((a.op == "get_attr" and a.target == rec["weight"]) or a.name in decoded)

    for node in gm.graph.nodes:
        if node.op == "call_function" and META_KEY not in node.meta:
            for i, a in enumerate(node.args):
                if is_weight(a):
                    return node, i
    raise WeightsError(f"the layer op of {rec['layer']} is not in the graph")


def _layer_graph(gm: fx.GraphModule, rec: dict[str, Any], value: torch.Tensor, mode: Any) -> fx.GraphModule:
    """A graph of one layer op: its inputs as placeholders (fake values of their hinted shapes, on
    the CPU), its weight ``value``, its other tensors (bias) as in ``gm``, same module stack."""
    node, wpos = _layer_node(gm, rec)
    graph = fx.Graph()
    root = torch.nn.Module()
    role_map: dict[str, Role] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        shape = [d.node.hint if isinstance(d, torch.SymInt) else int(d) for d in t.shape]
        return mode.from_tensor(torch.empty(shape, dtype=t.dtype))

    args = []
    for i, a in enumerate(node.args):
        if not isinstance(a, fx.Node):
            args.append(a)
            continue
        if i == wpos:
            name, tensor = rec["weight"], value
        elif a.op == "get_attr" and a.target in roles(gm):
            name, tensor = a.target, get_tensor(gm, a.target)
            tensor = torch.zeros(tensor.shape, dtype=tensor.dtype) if tensor.is_meta else tensor
        else:
            p = graph.placeholder(f"in_{i}")
            p.meta["val"] = fake(a.meta["val"])
            args.append(p)
            continue
        attach_tensor(root, name, tensor, Role.FROZEN)
        role_map[name] = Role.FROZEN
        g = graph.get_attr(name)
        g.meta["val"] = mode.from_tensor(tensor)
        args.append(g)
    op = graph.call_function(node.target, tuple(args), dict(node.kwargs))
    op.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
    from .graph import fake_eval

    op.meta["val"] = fake_eval(mode, node.target, op.args, op.kwargs)
    graph.output((op,))
    mini = fx.GraphModule(root, graph)
    roles(mini).update(role_map)
    return mini


__all__ = ["LoadReport", "checkpoint_files", "load_base_weights", "set_tensor"]
