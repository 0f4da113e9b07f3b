"""Read and write PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

    gp.export_peft(cm, "out/")                       # PeftModel.from_pretrained(base, "out/") loads it
    cm = gp.import_peft(model, "peft_folder/", (input_ids,), {"use_cache": False})
    gp.import_peft(cm, "other_folder/", adapter_name="fr")   # a second, named adapter

The mapping is declarative and lives with each method (``AdapterMethod.peft_type``,
``peft_options``, ``peft_fixed``, ``peft_patterns``, ``peft_key``, ``peft_export_config``), so
this module only uses the registry: LoRA (and rsLoRA), DoRA (PEFT LoRA with ``use_dora``), IA3,
VeRA, SHiRA, RandLoRA and TrainableTokens go both ways; LoRA-FA exports as a PEFT LoRA (PEFT's LoRA-FA is a LoRA
whose A its optimizer freezes) and a PEFT LoRA imports as LoRA-FA on request (``method="lora_fa"``).
A method whose PEFT file repeats a tensor under several keys (RandLoRA: its shared bases under
every layer too) names the copies in an optional ``peft_aliases(records)``.

Our tensor names are PEFT's module-relative names already; PEFT's file prefixes them with
``base_model.model.`` (VeRA's shared projections: ``base_model.``). Exported files hold every
tensor PEFT saves, frozen constants included (VeRA's projections, LoRA-FA's A, SHiRA's indices),
and ``target_modules`` lists the adapted module paths, so PEFT adapts exactly the same layers.

``modules_to_save`` (modules PEFT trains in full beside the adapter, e.g. a classification head)
maps to a ``gp.Update(targets=..., part="module")`` rule: the module's own parameters train, and
the folder holds them under their model names (``base_model.model.classifier.weight``, as PEFT
saves its ``classifier.modules_to_save.default.weight``). graphpeft trains the model's tensors,
not a per-adapter copy, so they belong to the model's first adapter ("default") only.

Trainable tokens (``gp.TrainableTokens``) are PEFT's ``TRAINABLE_TOKENS`` adapter on their own;
beside a LoRA they are its config's ``trainable_token_indices`` (``{module: indices}``; a list
names the model's input embeddings) and the file holds their rows under
``<module>.token_adapter.trainable_tokens_delta``; their indices stay in the config
(``AdapterMethod.peft_unsaved``). An ``nn.MultiheadAttention`` is one PEFT target: its out_proj's
tensors are saved under ``<attention>.base_layer.out_proj.``.

On import, every other config entry graphpeft does not map must have its default value (no
``bias``, ``layer_replication`` ...): anything else raises
:class:`~graphpeft.errors.AdapterFileError` naming it, as does a config that does not fit the
model (no layer matches, shapes differ). Writes are atomic, tensor file first.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from .paths import atomic_write
from .errors import AdapterFileError, PlanError
from .paths import check_output_folder
from .graph import (DEFAULT_ADAPTER, Layer, Role, adapter_name_of, adapters, find_layers, get_tensor, graph_meta,
                    register_tensor, roles, unscoped_tensor_name)
from .plan import Plan, Rule
from .trace import CLASSIFIER_HEAD_KEY, classifier_head_path
from .registry import METHODS, RULES, get_method, load_plugins

if TYPE_CHECKING:
    from .compiled import CompiledModel
    from .method import AdapterMethod

log = logging.getLogger(__name__)

__all__ = ["export_peft", "import_peft", "peft_config", "plan_from_peft", "read_peft_folder"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
#: rule options every method shares -> PEFT config keys
COMMON_OPTIONS = {"targets": "target_modules", "exclude": "exclude_modules", "layers": "layers_to_transform"}
#: PEFT config entries that do not change what the adapter computes once its tensors are loaded
#: (initialisation, bookkeeping; ``fan_in_fan_out`` is read off the graph, layer by layer)
IGNORED = {"peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
           "inference_mode", "init_lora_weights", "init_ia3_weights", "init_weights", "megatron_core",
           "qalora_group_size", "fan_in_fan_out", "save_projection", "layers_pattern"}
_DEFAULTISH = (None, False, "none", "")
#: PEFT's file prefix of every model tensor
PREFIX = "base_model.model."
#: ``graph_meta`` key of the sparse-update records (``passes/update``'s ``UPDATES_META``); a
#: record with a ``"module"`` came from ``Update(part="module")``: PEFT's modules_to_save
_UPDATES_META = "updates"
#: the method of PEFT's trainable tokens: an adapter of its own (``TRAINABLE_TOKENS``), or beside
#: a LoRA as its config's ``trainable_token_indices``, the rows then saved under ``token_adapter.``
TOKENS = "trainable_tokens"


# --- choosing the method ----------------------------------------------------------------------


def _peft_methods() -> list["AdapterMethod"]:
    load_plugins()
    return [m for m in METHODS.values() if getattr(m, "peft_type", None)]


def method_for(config: dict[str, Any], method: Optional[str] = None) -> "AdapterMethod":
    """The registered method a PEFT config belongs to (``method`` forces one of the same type)."""
    ptype = config.get("peft_type")
    fits = [m for m in _peft_methods() if m.peft_type == ptype
            and all(bool(config.get(k, False)) == bool(v) for k, v in m.peft_fixed.items())]
    if method is not None:
        chosen = get_method(method)
        if chosen is None or chosen not in fits:
            raise AdapterFileError(f"a PEFT {ptype} adapter{_fixed_note(config)} cannot be imported as {method!r}; "
                                   f"it fits {[m.name for m in fits] or 'no graphpeft method'}")
        return chosen
    fits = [m for m in fits if m.peft_import]
    if not fits:
        known = sorted({f"{m.peft_type}{_fixed_note(m.peft_fixed)}" for m in _peft_methods() if m.peft_import})
        raise AdapterFileError(f"PEFT adapters of type {ptype!r}{_fixed_note(config)} are not supported; graphpeft "
                               f"imports {known}")
    return fits[0]


def _fixed_note(config: dict[str, Any]) -> str:
    flags = [k for k in ("use_dora",) if config.get(k)]
    return f" ({', '.join(flags)})" if flags else ""


# --- PEFT config -> plan ------------------------------------------------------------------------


def plan_from_peft(config: dict[str, Any], layers: Sequence[Layer], method: Optional[str] = None,
                   input_embeddings: Optional[str] = None, classifier_head: Optional[str] = None) -> Plan:
    """The plan equivalent to a PEFT adapter config, for a model with ``layers``.

    Per-layer overrides (LoRA's ``rank_pattern`` / ``alpha_pattern``) become one rule per group
    of layers that share their values, matched as PEFT matches them. ``modules_to_save`` and
    LoRA's ``trainable_token_indices`` become rules of their own; the latter's list form names
    the model's ``input_embeddings`` (a module path; PEFT falls back on ``embed_tokens``).
    LoRA's ``target_parameters`` become the rule's own. ``target_modules="all-linear"`` with
    ``task_type="SEQ_CLS"`` leaves out ``classifier_head`` too (the model's ``score`` or
    ``classifier``: :func:`graphpeft.trace.classifier_head_path`), as PEFT does.
    """
    m = method_for(config, method)
    known = (IGNORED | set(COMMON_OPTIONS.values()) | set(m.peft_options.values()) | set(m.peft_fixed)
             | set(m.peft_patterns) | {"modules_to_save"}
             | ({"trainable_token_indices", "target_parameters"} if m.peft_type == "LORA" else set()))
    unsupported = sorted(k for k, v in config.items()
                         if k not in known and v not in _DEFAULTISH and v != {} and v != [])
    if unsupported:
        raise AdapterFileError(f"the PEFT {config.get('peft_type')} config sets {unsupported}, which graphpeft does not "
                               "support; only adapters without them can be imported")
    body: dict[str, Any] = {}
    for ours, theirs in {**COMMON_OPTIONS, **m.peft_options}.items():
        value = config.get(theirs)
        if value is not None and value != []:
            body[ours] = sorted(value) if isinstance(value, (set, frozenset)) else value
    if m.peft_type == "LORA" and config.get("target_parameters"):
        body["target_parameters"] = list(config["target_parameters"])
        if any(config.get(k) for k in m.peft_patterns):
            raise AdapterFileError("the PEFT config has target_parameters and rank_pattern/alpha_pattern together, "
                                   "which graphpeft does not import yet; save the adapter without per-layer patterns")
    if "targets" not in body and "target_parameters" not in body:
        raise AdapterFileError("the PEFT config has no target_modules: save it again from a PEFT model (saved "
                               "configs list the modules PEFT adapted)")
    _exclude_classifier(body, config, classifier_head)
    try:
        rule = m.rule.from_body(body)
    except PlanError as e:
        raise AdapterFileError(f"the PEFT config does not translate into a {m.name} rule: {e}") from e
    saved = _modules_to_save_rule(config) + _token_rules(config, input_embeddings)
    patterns = {ours: config.get(theirs) or {} for theirs, ours in m.peft_patterns.items()}
    if not any(patterns.values()):
        return Plan([rule, *saved])
    groups: dict[tuple, list[str]] = collections.OrderedDict()
    for layer in layers:
        if rule.select(layer) is not None:
            continue
        overrides = []
        for option, pattern in patterns.items():
            key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", layer.path)), None)  # PEFT's get_pattern_key
            if key is not None:
                overrides.append((option, pattern[key]))
        groups.setdefault(tuple(overrides), []).append(layer.path)
    rules: list[Rule] = []
    for overrides, paths in groups.items():
        targets = "|".join(re.escape(p) for p in paths)
        try:
            rules.append(dataclasses.replace(rule, targets=targets, exclude=None, layers=None, **dict(overrides)))
        except (PlanError, TypeError) as e:
            raise AdapterFileError(f"the PEFT config's per-layer values {dict(overrides)} do not fit: {e}") from e
    return Plan([*(rules or [rule]), *saved])


def _exclude_classifier(body: dict[str, Any], config: dict[str, Any], head: Optional[str]) -> None:
    """PEFT's ``"all-linear"`` under ``task_type="SEQ_CLS"`` also leaves the classification head
    out (``_maybe_include_all_linear_layers``): add its exact path to the rule's ``exclude``."""
    targets = body.get("targets")
    if head is None or config.get("task_type") != "SEQ_CLS" or not (
            isinstance(targets, str) and targets.lower() == "all-linear"):
        return
    exclude = body.get("exclude")
    if exclude is None:
        body["exclude"] = re.escape(head)
    elif isinstance(exclude, str):
        body["exclude"] = f"(?:{exclude})|{re.escape(head)}"
    else:
        body["exclude"] = [*exclude, head]


def _modules_to_save_rule(config: dict[str, Any]) -> list[Rule]:
    """``[Update(part="module")]`` for a config's ``modules_to_save`` (none: ``[]``). PEFT
    wraps every module whose path ends with an entry (plain ``str.endswith``): the regex
    ``.*<entry>`` matches the same paths."""
    names = config.get("modules_to_save") or []
    if isinstance(names, str):
        names = [names]
    if not names:
        return []
    load_plugins()
    targets = "|".join(f".*{re.escape(n)}" for n in names)
    return [RULES["update"].from_body({"targets": targets, "part": "module"})]


def _token_rules(config: dict[str, Any], input_embeddings: Optional[str]) -> list[Rule]:
    """``[TrainableTokens(...)]`` for a LoRA config's ``trainable_token_indices``: a dict
    ``{module name: indices}`` (matched as PEFT matches ``target_modules`` names), or a list for
    the model's input embeddings."""
    value = config.get("trainable_token_indices")
    if not value:
        return []
    items = value.items() if isinstance(value, dict) else [(input_embeddings or "embed_tokens", value)]
    load_plugins()
    try:
        return [RULES[TOKENS].from_body({"targets": [name], "token_indices": list(indices)}) for name, indices in items]
    except PlanError as e:
        raise AdapterFileError(f"the PEFT config's trainable_token_indices do not translate: {e}") from e


def _main_method(recs: Sequence[dict[str, Any]]) -> Optional["AdapterMethod"]:
    """The method of an adapter's records, trainable tokens beside another method not counted."""
    names = sorted({r["method"] for r in recs} - {TOKENS}) or [TOKENS]
    return get_method(names[0])


def _file_keys(m: "AdapterMethod", recs: Sequence[dict[str, Any]], adapter_name: str,
               live: Sequence[str]) -> dict[str, str]:
    """Live tensor key -> PEFT file key, for the tensors PEFT's file holds: a method's
    ``peft_unsaved`` tensors (kept in PEFT's config) are left out, and trainable tokens beside
    another method are saved under PEFT's ``<module>.token_adapter.trainable_tokens_delta``."""
    unsaved: set[str] = set()
    special: dict[str, str] = {}
    for rec in recs:
        rm = get_method(rec["method"])
        for role, name in rec["tensors"].items():
            key = unscoped_tensor_name(name, adapter_name)
            if rm is not None and role in rm.peft_unsaved:
                unsaved.add(key)
            elif rec["method"] == TOKENS and m.name != TOKENS:
                special[key] = f"{PREFIX}{rec['layer']}.token_adapter.trainable_tokens_delta"
            elif rec["kind"] == "parameter":
                # PEFT names a parameter's tensors after its module (nested wrappers: base_layer.)
                special[key] = f"{PREFIX}{_parameter_prefix(rec, recs)}.{key.rsplit('.', 2)[-2]}.weight"
            elif _attention_out_proj(rec) and key.startswith(rec["layer"] + "."):
                # PEFT wraps the attention module; its out_proj sits under the wrapper's base_layer
                parent = rec["layer"].rsplit(".", 1)[0]
                special[key] = f"{PREFIX}{parent}.base_layer.out_proj{key[len(rec['layer']):]}"
    return {k: special.get(k) or m.peft_key(k) for k in live if k not in unsaved}


def _parameter_prefix(record: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """PEFT's module path for the tensors of an adapter on a parameter (``target_parameters``):
    the owning module, under one ``base_layer.`` per parameter of that module adapted after it
    (PEFT wraps them in model order, each ``ParamWrapper`` around the previous one)."""
    module = record["layer"].rsplit(".", 1)[0]
    later = [r for r in records if r["kind"] == "parameter" and r["layer"].rsplit(".", 1)[0] == module
             and r["order"] > record["order"]]
    return module + ".base_layer" * len(later)


def _attention_out_proj(rec: dict[str, Any]) -> bool:
    """Whether an adapter record is on the ``out_proj`` of an ``nn.MultiheadAttention``."""
    return rec.get("module_class") == "MultiheadAttention" and rec["layer"].endswith(".out_proj")


def _peft_targets(recs: Sequence[dict[str, Any]], adapter_name: str) -> list[str]:
    """PEFT's ``target_modules`` for adapter records: their layers, an attention's out_proj left
    to its attention module (PEFT adapts both when it targets the module, and ignores an adapter
    on out_proj alone: nn.MultiheadAttention does not call it)."""
    layers = [r["layer"] for r in recs]
    other = sorted({r["method"] for r in recs if r.get("module_class") == "MultiheadAttention"} - {"lora"})
    if other:
        raise AdapterFileError(f"adapter {adapter_name!r} puts {other} on an nn.MultiheadAttention: PEFT adapts it "
                               "with plain LoRA only; save with cm.save_adapter")
    alone = [r["layer"] for r in recs if _attention_out_proj(r) and r["layer"].rsplit(".", 1)[0] not in layers]
    if alone:
        raise AdapterFileError(f"adapter {adapter_name!r} adapts {alone} without their nn.MultiheadAttention's "
                               "in_proj: PEFT adapts both together (it would ignore out_proj alone); target the "
                               "attention module, or save with cm.save_adapter")
    return [r["layer"] for r in recs if not _attention_out_proj(r) and r["kind"] != "parameter"]


def saved_modules(cm: "CompiledModel") -> dict[str, list[str]]:
    """PEFT's ``modules_to_save`` of ``cm``: module path -> the graph tensors it trains
    (from its ``Update(part="module")`` rules)."""
    out: dict[str, set[str]] = {}
    for rec in graph_meta(cm.graph_module).get(_UPDATES_META, {}).values():
        if rec.get("module"):
            out.setdefault(rec["module"], set()).update(rec["tensors"])
    return {k: sorted(v) for k, v in sorted(out.items())}


# --- reading and writing folders -----------------------------------------------------------------


def read_peft_folder(folder: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT adapter folder's config and tensors. Raises :class:`AdapterFileError`."""
    from safetensors.torch import load

    folder = os.fspath(folder)
    config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(config_path):
        raise AdapterFileError(f"{config_path} does not exist: pass the folder PEFT's save_pretrained wrote")
    if not os.path.isfile(weights_path):
        extra = (" (it holds adapter_model.bin: save it with safe_serialization=True)"
                 if os.path.isfile(os.path.join(folder, "adapter_model.bin")) else "")
        raise AdapterFileError(f"{weights_path} does not exist{extra}")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_path} is corrupted (not valid JSON: {e})") from e
    if not isinstance(config, dict) or "peft_type" not in config:
        hint = " (a graphpeft adapter: use gp.load_adapter)" if isinstance(config, dict) and config.get("format") else ""
        raise AdapterFileError(f"{config_path} is not a PEFT adapter config: it has no peft_type{hint}")
    try:
        with open(weights_path, "rb") as f:
            state = load(f.read())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterFileError(f"{weights_path} is not a valid safetensors file: {e}") from e
    return config, state


def _records_of(cm: "CompiledModel", adapter_name: str) -> list[dict[str, Any]]:
    if cm._bank is not None:
        recs = list(cm._bank.records_of(adapter_name).values())
    else:
        recs = [r for r in adapters(cm.graph_module).values() if adapter_name_of(r) == adapter_name]
    if not recs:
        raise AdapterFileError(f"no adapter named {adapter_name!r} to export; this model has {cm.adapter_names}")
    return recs


def peft_config(cm: "CompiledModel", adapter_name: str = DEFAULT_ADAPTER) -> dict[str, Any]:
    """The PEFT ``adapter_config.json`` content for one adapter of ``cm``."""
    recs = _records_of(cm, adapter_name)
    tokens = [r for r in recs if r["method"] == TOKENS]
    if tokens and len(tokens) < len(recs):  # beside another method: PEFT's trainable_token_indices
        recs = [r for r in recs if r["method"] != TOKENS]
    else:
        tokens = []
    names = sorted({r["method"] for r in recs})
    if len(names) != 1:
        raise AdapterFileError(f"adapter {adapter_name!r} mixes methods {names}; a PEFT adapter has one method: "
                               "compile each method under its own adapter name")
    m = get_method(names[0])
    if m is None or not getattr(m, "peft_type", None):
        raise AdapterFileError(f"PEFT has no counterpart of {names[0]!r} adapters; save with cm.save_adapter instead")
    rules = [m.rule.from_body(r["config"]) for r in recs]
    options = [{ours: getattr(rule, ours) for ours in m.peft_options} for rule in rules]
    # each option's most common value is the config's; the other layers go into the patterns
    base_options = {ours: json.loads(collections.Counter(json.dumps(o[ours], default=str) for o in options)
                                     .most_common(1)[0][0]) for ours in m.peft_options}
    config: dict[str, Any] = {"peft_type": m.peft_type, **m.peft_fixed}
    config.update({theirs: base_options[ours] for ours, theirs in m.peft_options.items()})
    pattern_of = {ours: theirs for theirs, ours in m.peft_patterns.items()}
    for rec, opts in zip(recs, options):
        for ours, value in opts.items():
            if value == base_options[ours]:
                continue
            if ours not in pattern_of:
                raise AdapterFileError(f"adapter {adapter_name!r} uses {ours}={value!r} on {rec['layer']} but "
                                       f"{base_options[ours]!r} elsewhere; PEFT holds one {ours} per adapter")
            config.setdefault(pattern_of[ours], {})[re.escape(rec["layer"])] = value
    modules = saved_modules(cm) if adapter_name == DEFAULT_ADAPTER else {}
    config.update({
        "modules_to_save": sorted(modules) or None,
        "target_modules": _peft_targets(recs, adapter_name),  # exactly our layers, whatever the rules said
        # a 3-D parameter stored (experts, in, out) is its module's is_transposed, not fan_in_fan_out
        "fan_in_fan_out": any(r.get("fan_in_fan_out") for r in recs if r["kind"] != "parameter"),
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
    })
    params = [r["layer"] for r in recs if r["kind"] == "parameter"]
    if params:
        config["target_parameters"] = params  # exactly our parameters (PEFT matches them as suffixes)
    if tokens:
        if m.peft_type != "LORA":
            raise AdapterFileError(f"adapter {adapter_name!r} has trainable tokens beside {m.name}: PEFT holds them "
                                   "only beside a LoRA (trainable_token_indices) or alone; put them in an adapter of "
                                   "their own")
        config["trainable_token_indices"] = {r["layer"]: list(r["config"]["token_indices"]) for r in tokens}
    return m.peft_export_config(config, recs)


def export_peft(cm: "CompiledModel", folder: Union[str, os.PathLike],
                adapter_name: str = DEFAULT_ADAPTER) -> dict[str, str]:
    """Write one adapter of ``cm`` as a PEFT adapter folder; returns the two paths.

    ``peft.PeftModel.from_pretrained(base_model, folder)`` then gives the same outputs as
    ``cm`` with that adapter active. Raises :class:`AdapterFileError` for a method PEFT does
    not have or an adapter PEFT cannot hold (mixed methods, per-layer options other than
    LoRA's rank and alpha).
    """
    from safetensors.torch import save

    folder = check_output_folder(folder, "export_peft", AdapterFileError)  # before any work
    config = peft_config(cm, adapter_name)
    recs = _records_of(cm, adapter_name)
    m = _main_method(recs)
    live = cm._live_tensors(adapter_name)
    keys = _file_keys(m, recs, adapter_name, list(live))
    saved = {t for ts in (saved_modules(cm) if adapter_name == DEFAULT_ADAPTER else {}).values() for t in ts}
    if any(r in (Role.TRAINABLE, Role.TRAINABLE_SLICE) and n not in saved for n, r in cm.roles().items()):
        log.warning("the model also trains base weights (sparse updates) outside modules_to_save: a PEFT adapter "
                    "folder does not hold them")
    state = {keys[k]: t.detach().contiguous() for k, (t, _) in live.items() if k in keys}
    state.update({PREFIX + n: get_tensor(cm.graph_module, n).detach().contiguous() for n in saved})
    # copies, not shared storage: safetensors refuses tensors that share memory
    state.update({alias: state[key].clone() for alias, key in _aliases(m, recs).items() if key in state})
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    weights_path, config_path = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, CONFIG_NAME)
    atomic_write(weights_path, save(state, metadata={"format": "pt"}))
    atomic_write(config_path, json.dumps(config, indent=2, sort_keys=True).encode())
    return {"weights": weights_path, "config": config_path}


def import_peft(model: Union[torch.nn.Module, "CompiledModel"], folder: Union[str, os.PathLike],
                example_inputs: Sequence[Any] = (), example_kwargs: Optional[dict[str, Any]] = None, *,
                adapter_name: str = DEFAULT_ADAPTER, method: Optional[str] = None, seed: int = 0,
                **compile_options: Any) -> "CompiledModel":
    """Build the adapter a PEFT folder (``peft_model.save_pretrained(folder)``) describes and load
    its tensors.

    Args:
        model: the base ``nn.Module`` (it is compiled with the plan the PEFT config describes,
            using ``example_inputs`` / ``example_kwargs`` and ``compile_options`` as
            :func:`graphpeft.compile` takes them), or a :class:`CompiledModel` to add the
            adapter to under ``adapter_name`` (inactive until ``cm.set_adapter``; nothing is
            re-traced).
        folder: the PEFT adapter folder.
        adapter_name: the name of the imported adapter.
        method: import as this graphpeft method (``"lora_fa"`` for a PEFT LoRA).
        seed: seeds the initialisation the file does not overwrite (constants PEFT did not save).

    Returns the compiled model. Raises :class:`AdapterFileError` for an unsupported
    ``peft_type`` or config entry, a config that does not fit the model, or tensors that do not.
    """
    from .api import compile as compile_model
    from .compiled import CompiledModel

    config, state = read_peft_folder(folder)
    if config.get("modules_to_save") and (isinstance(model, CompiledModel) or adapter_name != DEFAULT_ADAPTER):
        raise AdapterFileError(f"the PEFT adapter in {os.fspath(folder)} trains modules_to_save "
                               f"{config['modules_to_save']}; graphpeft trains those modules' own tensors (not a copy "
                               "per adapter), so import it as the model's first adapter: "
                               "gp.import_peft(base_model, folder, example_inputs)")
    if isinstance(model, CompiledModel):
        cm = model
        plan = plan_from_peft(config, find_layers(cm.graph_module), method,
                              classifier_head=graph_meta(cm.graph_module).get(CLASSIFIER_HEAD_KEY))
        _add(cm, adapter_name, plan, seed)
    else:
        traced_layers = None
        if any(config.get(k) for k in ("rank_pattern", "alpha_pattern")):
            from .trace import trace

            traced_layers = find_layers(trace(model, example_inputs, example_kwargs).gm)
        plan = plan_from_peft(config, traced_layers or [], method, _input_embeddings(model),
                              classifier_head_path(model))
        try:
            cm = compile_model(model, plan if adapter_name == DEFAULT_ADAPTER else Plan([]), example_inputs,
                               example_kwargs, seed=seed, **compile_options)
        except PlanError as e:
            raise AdapterFileError(f"the PEFT adapter in {os.fspath(folder)} does not fit this model: {e}") from e
        if adapter_name != DEFAULT_ADAPTER:
            _add(cm, adapter_name, plan, seed)
            cm.set_adapter(adapter_name)
    try:
        _load(cm, adapter_name, state, os.fspath(folder))
    except BaseException:
        if isinstance(model, CompiledModel):
            cm.delete_adapter(adapter_name)  # leave the model as it was
        raise
    return cm


def _input_embeddings(model: torch.nn.Module) -> Optional[str]:
    """The module path of ``model.get_input_embeddings()`` (transformers models), else None."""
    try:
        emb = model.get_input_embeddings()  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - not a transformers model, or one without input embeddings
        return None
    return next((name for name, mod in model.named_modules() if mod is emb), None)


def _add(cm: "CompiledModel", adapter_name: str, plan: Plan, seed: int) -> None:
    if adapter_name in cm.adapter_names:
        raise AdapterFileError(f"the model already has an adapter named {adapter_name!r}; pass another adapter_name")
    try:
        cm.add_adapter(adapter_name, plan, seed=seed)
    except PlanError as e:
        raise AdapterFileError(f"the PEFT adapter does not fit this model: {e}") from e


def _aliases(m: "AdapterMethod", records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """PEFT file keys that repeat another key's tensor, alias -> key (RandLoRA's file holds its
    shared bases on the tuner and again under every layer). A method declares them with an
    optional ``peft_aliases(records)``; export writes the copies, import checks and drops them."""
    declare = getattr(m, "peft_aliases", None)
    return declare(records) if declare is not None else {}


def _load(cm: "CompiledModel", adapter_name: str, state: dict[str, torch.Tensor], where: str) -> None:
    recs = _records_of(cm, adapter_name)
    m = _main_method(recs)
    live = cm._live_tensors(adapter_name)
    by_peft_key = {v: k for k, v in _file_keys(m, recs, adapter_name, list(live)).items()}
    state = dict(state)
    base = _pop_saved_modules(cm, state, where) if adapter_name == DEFAULT_ADAPTER else {}
    for alias, key in _aliases(m, recs).items():
        if alias not in state:
            continue
        copy = state.pop(alias)
        if key in state and not torch.equal(copy, state[key]):
            raise AdapterFileError(f"{where}: {alias} should repeat {key} but differs from it; the file is "
                                   "inconsistent")
        state.setdefault(key, copy)
    unknown = sorted(k for k in state if k not in by_peft_key)
    if unknown:
        raise AdapterFileError(f"{where} holds tensors the adapter does not have: {unknown[:5]}"
                               f"{' ...' if len(unknown) > 5 else ''}; does its config fit this model?")
    # constants PEFT did not save (VeRA with save_projection=False) keep their regenerated values
    cm.load_adapter_state_dict({by_peft_key[k]: v for k, v in state.items()}, adapter_name=adapter_name)
    _load_saved_modules(cm, base)


def _pop_saved_modules(cm: "CompiledModel", state: dict[str, torch.Tensor],
                       where: str) -> dict[str, torch.Tensor]:
    """Take the modules_to_save tensors out of ``state`` (graph name -> value), checked: every
    trained tensor of those modules present, shapes equal. Buffers of the modules (a norm's
    running statistics) may be there too."""
    modules = saved_modules(cm)
    if not modules:
        return {}
    gm = cm.graph_module
    wanted = {t for ts in modules.values() for t in ts}
    buffers = {n for n, r in roles(gm).items() if r == Role.BUFFER and any(n.startswith(p + ".") for p in modules)}
    out = {k[len(PREFIX):]: state.pop(k) for k in list(state)
           if k.startswith(PREFIX) and k[len(PREFIX):] in wanted | buffers}
    problems = [f"missing {n}" for n in sorted(wanted - set(out))]
    problems += [f"{n} has shape {tuple(v.shape)}, the model needs {tuple(get_tensor(gm, n).shape)}"
                 for n, v in out.items() if tuple(v.shape) != tuple(get_tensor(gm, n).shape)]
    if problems:
        raise AdapterFileError(f"{where}: the modules_to_save tensors do not fit this model (nothing was loaded): "
                               + "; ".join(problems[:5]))
    return out


def _load_saved_modules(cm: "CompiledModel", values: dict[str, torch.Tensor]) -> None:
    """Give the modules_to_save tensors the file's values: trained parameters in place (they are
    the graph's private copies); a buffer gets a new tensor, as the frozen graph shares its
    buffers with the user's model."""
    gm = cm.graph_module
    with torch.no_grad():
        for name, value in values.items():
            own = get_tensor(gm, name)
            if roles(gm)[name] == Role.BUFFER:
                if not torch.equal(own, value.to(own)):
                    register_tensor(gm, name, value.to(own).clone(), Role.BUFFER)
            else:
                own.copy_(value.to(own.dtype))
