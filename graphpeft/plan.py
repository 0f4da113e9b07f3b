"""Plans: what to adapt, declared as rules (Python objects or plain data with one schema).

A rule selects layers (module paths of weight-carrying ops) and says what to do with them::

    Plan([LoRA(targets=r".*\\.(q_proj|v_proj)", r=8, alpha=16)])
    Plan.from_dict({"rules": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 8}}]})

Selection: ``targets`` as a string is a regular expression that must match the whole module
path; as a list it is PEFT-style (a path matches when it equals an entry or ends with
``"." + entry``); ``"all-linear"`` selects every linear layer except the output head.
``kind`` restricts to ``linear`` / ``conv`` / ``embedding`` (``norm`` for rules that select norm
modules); ``layers`` keeps only paths whose first integer component (``model.layers.3.mlp`` -> 3)
is listed, negative entries counting back from the deepest index (``layers=[-1]``: the last
block); ``exclude`` removes paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from typing import Any, ClassVar, Iterable, Optional, Sequence, Union

from .errors import PlanError
from .graph import META_KEY, Layer, find_layers, find_norms, find_parameters
from .registry import RULES, load_plugins

PLAN_VERSION = 1
KINDS = ("linear", "conv", "embedding")
#: kinds a ``kind=`` option may name: the layer kinds plus norm modules (``find_norms``)
SELECTABLE_KINDS = KINDS + ("norm",)
#: last path components of an output head, for graphs whose model did not say (see _is_output_head)
HEAD_NAMES = {"lm_head", "score", "classifier", "head", "output", "embed_out"}
#: PEFT option names that mean the same as a selector of every rule (accepted in the data form)
PEFT_SELECTOR_ALIASES = {"target_modules": "targets", "layers_to_transform": "layers", "exclude_modules": "exclude"}
#: option names users bring from PEFT's configs -> ours (for "did you mean" hints)
PEFT_NAMES = {"rank": "r", "target_modules": "targets", "lora_alpha": "alpha", "lora_dropout": "dropout",
              "exclude_modules": "exclude", "layers_to_transform": "layers"}

Targets = Union[str, Sequence[str]]


def _as_list(x: Any) -> Optional[list]:
    if x is None:
        return None
    if isinstance(x, (str, int)):
        return [x]
    return list(x)


@dataclasses.dataclass
class Rule:
    """Base class of plan rules. Subclasses are dataclasses with a ``key`` (their data name).

    ``select`` and ``check`` are the rule's half of match -> check -> rewrite: ``select`` says
    whether the rule wants a layer, ``check`` whether the layer can take it (with a reason).
    """

    key: ClassVar[str] = ""
    #: kinds of layer the method can adapt
    supported_kinds: ClassVar[tuple[str, ...]] = KINDS
    #: whether the rule puts an adapter on a layer (two such rules may not share a layer)
    is_adapter: ClassVar[bool] = True

    targets: Targets = ""
    kind: Optional[Union[str, Sequence[str]]] = None
    layers: Optional[Union[int, Sequence[int]]] = None
    exclude: Optional[Targets] = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) and self.targets.lower() == "all-linear":
            self.targets = "all-linear"  # PEFT accepts any case
        if isinstance(self.targets, str) and self.targets != "all-linear":
            try:
                re.compile(self.targets)
            except re.error as e:
                raise PlanError(f"{self.key}: targets {self.targets!r} is not a valid regular expression: {e}") from e
        elif not isinstance(self.targets, str):
            if (not isinstance(self.targets, (list, tuple)) or not self.targets
                    or not all(isinstance(t, str) for t in self.targets)):
                raise PlanError(f"{self.key}: targets must be a regex string or a non-empty list of names, "
                                f"got {self.targets!r}")
        if isinstance(self.exclude, str):
            try:
                re.compile(self.exclude)
            except re.error as e:
                raise PlanError(f"{self.key}: exclude {self.exclude!r} is not a valid regular expression: {e}") from e
        elif self.exclude is not None and (not isinstance(self.exclude, (list, tuple))
                                           or not all(isinstance(t, str) for t in self.exclude)):
            raise PlanError(f"{self.key}: exclude must be a regex string or a list of names, got {self.exclude!r}")
        for k in _as_list(self.kind) or []:
            if k not in SELECTABLE_KINDS:
                raise PlanError(f"{self.key}: unknown kind {k!r}; use one of {list(SELECTABLE_KINDS)}")
        for i in _as_list(self.layers) or []:
            if not isinstance(i, int) or isinstance(i, bool):
                raise PlanError(f"{self.key}: layers must be integers, got {i!r}")

    # -- selection -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        t = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
        return f"{self.key}[{t}]"

    def _path_matches(self, targets: Targets, layer: Layer) -> bool:
        if isinstance(targets, str):
            if targets == "all-linear":
                return layer.kind == "linear" and _is_linear_module(layer) and not _is_output_head(layer)
            return re.fullmatch(targets, layer.path) is not None
        return any(layer.path == t or layer.path.endswith("." + t) for t in targets)

    def select(self, layer: Layer) -> Optional[str]:
        """None when the rule wants ``layer``, else the reason it does not."""
        if not self._path_matches(self.targets, layer):
            return f"path does not match targets {self.targets!r}"
        if self.exclude is not None and self._path_matches(self.exclude, layer):
            return f"path matches exclude {self.exclude!r}"
        kinds = _as_list(self.kind)
        if kinds is not None and layer.kind not in kinds:
            return f"layer kind {layer.kind!r} is not in kind={kinds}"
        layers = _as_list(self.layers)
        if layers is not None:
            if any(i < 0 for i in layers) and layer.deepest_index is None:
                return (f"layers={layers} counts back from the deepest numbered layer, but no module path "
                        "of this model is numbered")
            wanted = {i if i >= 0 else layer.deepest_index + 1 + i for i in layers}  # type: ignore[operator]
            if layer.layer_index not in wanted:
                return f"layer index {layer.layer_index} is not in layers={layers}"
        if layer.kind not in self.supported_kinds:
            return f"{self.key} does not support {layer.kind} layers (supports {list(self.supported_kinds)})"
        return None

    def check(self, layer: Layer) -> Optional[str]:
        """None when ``layer`` can take this rule, else why not. Overridden by methods."""
        return None

    @property
    def selects_norms(self) -> bool:
        """Whether the rule chooses among norm modules (:func:`~graphpeft.graph.find_norms`) as
        well as weight layers; such rules make :meth:`Plan.layers_of` include them."""
        return False

    @property
    def selects_parameters(self) -> bool:
        """Whether the rule chooses among model parameters (:func:`~graphpeft.graph.find_parameters`,
        PEFT's ``target_parameters``) as well; such rules make :meth:`Plan.layers_of` include them."""
        return False

    # -- data form ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        body = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            if f.name == "targets" or v != f.default:
                body[f.name] = v
        return {self.key: body}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Rule":
        if not isinstance(body, dict):
            raise PlanError(f"{cls.key}: expected a mapping of options, got {type(body).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        body = dict(body)
        for alias, ours in PEFT_SELECTOR_ALIASES.items():  # PEFT's names for the selectors
            if alias in body and ours in fields:
                if ours in body:
                    raise PlanError(f"{cls.key}: give {ours!r} or PEFT's {alias!r}, not both")
                body[ours] = body.pop(alias)
        unknown = sorted(set(body) - fields)
        if "target_parameters" in unknown:
            raise PlanError(f"{cls.key}: target_parameters (adapting a parameter itself) is an option of 'lora' only "
                            "(PEFT's ParamWrapper is a LoRA layer); use a lora rule for those parameters")
        if unknown:
            hints = []
            for u in unknown:
                alias = PEFT_NAMES.get(u)
                m = [alias] if alias in fields else difflib.get_close_matches(u, fields, 1)
                hints.append(f"{u!r} (did you mean {m[0]!r}?)" if m else repr(u))
            raise PlanError(f"{cls.key}: unknown option(s) {', '.join(hints)}; allowed: {sorted(fields)}")
        if "targets" not in body:
            raise PlanError(f"{cls.key}: 'targets' is required (a regex, a list of names, or 'all-linear')")
        try:
            return cls(**body)
        except TypeError as e:
            raise PlanError(f"{cls.key}: {e}") from e


def _is_linear_module(layer: Layer) -> bool:
    """Whether ``layer`` is an ``nn.Linear``/``Conv1D`` module, as PEFT's ``"all-linear"`` asks
    (MoE routers computing ``F.linear`` with their own weight are left out, as PEFT does). True
    for graphs traced without that record."""
    gm = layer.node.graph.owning_module if layer.node is not None else None
    meta = (gm.meta.get(META_KEY) or {}) if gm is not None else {}
    paths = meta.get("linear_modules")
    return paths is None or layer.path in paths


def _is_output_head(layer: Layer) -> bool:
    """Whether ``"all-linear"`` leaves ``layer`` out, as PEFT's ``_maybe_include_all_linear_layers``
    does: only the output embeddings of a transformers model (``lm_head``; recorded at trace
    time), so a classification head or a plain module's last linear is adapted. For a graph
    traced without that record, layers whose last path component is in :data:`HEAD_NAMES`."""
    gm = layer.node.graph.owning_module if layer.node is not None else None
    meta = (gm.meta.get(META_KEY) or {}) if gm is not None else {}
    if "output_head" in meta:
        return meta["output_head"] is not None and layer.path == meta["output_head"]
    return layer.path.rsplit(".", 1)[-1] in HEAD_NAMES


# -- option checks for rules' __post_init__ ------------------------------------------------------
# One wording per kind of mistake, prefixed with the rule's key ("vera: r must be ..."), so every
# method reports a bad plan the same way.


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float; ``bool`` is not (``True`` in a plan file is a mistake)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(rule: Rule, *options: str, none_means: Optional[str] = None) -> None:
    """Raise :class:`PlanError` unless each named option of ``rule`` is an integer >= 1.

    ``none_means``: ``None`` is allowed as well, and the message says what it stands for
    (``"r must be a positive integer or null (all singular values)"``)."""
    for opt in options:
        value = getattr(rule, opt)
        if none_means is not None and value is None:
            continue
        if not _is_int(value) or value <= 0:
            null = f" or null ({none_means})" if none_means is not None else ""
            raise PlanError(f"{rule.key}: {opt} must be a positive integer{null}, got {value!r}")


def check_int(rule: Rule, *options: str, optional: bool = False) -> None:
    """Raise :class:`PlanError` unless each named option of ``rule`` is an integer (a seed);
    ``optional``: ``None`` is allowed too."""
    for opt in options:
        value = getattr(rule, opt)
        if optional and value is None:
            continue
        if not _is_int(value):
            null = " or null" if optional else ""
            raise PlanError(f"{rule.key}: {opt} must be an integer{null}, got {value!r}")


def check_number(rule: Rule, *options: str, finite: bool = False, what: str = "a number") -> None:
    """Raise :class:`PlanError` unless each named option of ``rule`` is a number (``finite``:
    also not inf or nan); the message says the option must be ``what``."""
    for opt in options:
        value = getattr(rule, opt)
        if not is_number(value) or (finite and not math.isfinite(value)):
            raise PlanError(f"{rule.key}: {opt} must be {what}, got {value!r}")


def check_probability(rule: Rule, option: str = "dropout") -> None:
    """Raise :class:`PlanError` unless the option is a number in ``[0, 1)`` (a dropout rate)."""
    check_number(rule, option)
    value = getattr(rule, option)
    if not 0.0 <= float(value) < 1.0:
        raise PlanError(f"{rule.key}: {option} must be in [0, 1), got {value!r}")


def check_bool(rule: Rule, *options: str) -> None:
    """Raise :class:`PlanError` unless each named option of ``rule`` is ``True`` or ``False``."""
    for opt in options:
        value = getattr(rule, opt)
        if not isinstance(value, bool):
            raise PlanError(f"{rule.key}: {opt} must be true or false, got {value!r}")


def check_choice(rule: Rule, option: str, allowed: Sequence[Any]) -> None:
    """Raise :class:`PlanError` unless the option is one of ``allowed`` (an ``init`` or a mask type)."""
    value = getattr(rule, option)
    if value not in allowed:
        raise PlanError(f"{rule.key}: {option} must be one of {list(allowed)}, got {value!r}")


@dataclasses.dataclass
class LayerDecision:
    """What the plan decided for one layer (shown by ``explain``)."""

    layer: Layer
    rule: Optional[str] = None  # the rule that took it
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # rule name -> why not


@dataclasses.dataclass
class Resolution:
    """A plan applied to a graph's layers: which rule takes which layer, and why not others."""

    decisions: list[LayerDecision]
    matches: dict[str, list[Layer]]  # rule name -> layers it takes

    def explain(self) -> str:
        lines = []
        for d in self.decisions:
            l = d.layer
            head = f"{l.path} ({l.kind} {l.module_class or '?'} {l.in_features}->{l.out_features})"
            if d.rule:
                lines.append(f"  + {head}: {d.rule}")
            else:
                why = "; ".join(f"{r}: {reason}" for r, reason in d.reasons.items()) or "no rule"
                lines.append(f"  - {head}: {why}")
        return "\n".join(lines)


class Plan:
    """An ordered list of rules. Construct from Python objects, a dict, YAML or JSON."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: list[Rule] = list(rules)
        for r in self.rules:
            if not isinstance(r, Rule):
                raise PlanError(f"plan entries must be rules like gp.LoRA(...), got {type(r).__name__}")
        names = [r.name for r in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise PlanError(f"the plan has the same rule twice: {sorted(dup)}")

    def __repr__(self) -> str:
        return f"Plan({self.rules!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    # -- data form ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, data: Union[dict[str, Any], list]) -> "Plan":
        load_plugins()
        if isinstance(data, list):
            data = {"rules": data}
        if not isinstance(data, dict):
            raise PlanError(f"a plan is a mapping with 'rules', got {type(data).__name__}")
        unknown = sorted(set(data) - {"version", "rules"})
        if unknown:
            raise PlanError(f"unknown plan key(s) {unknown}; a plan has 'version' and 'rules'")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"plan version {version} is not supported (this graphpeft reads version {PLAN_VERSION})")
        rules = []
        for i, entry in enumerate(data.get("rules") or []):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise PlanError(f"rule #{i} must be a mapping with exactly one method key, like "
                                "{'lora': {'targets': [...], 'r': 8}}")
            (key, body), = entry.items()
            if key not in RULES:
                near = difflib.get_close_matches(key, list(RULES), 1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise PlanError(f"rule #{i}: unknown method {key!r}{hint}; known: {sorted(RULES)}")
            rules.append(RULES[key].from_body(body))
        if not rules:
            raise PlanError("the plan has no rules")
        return cls(rules)

    @classmethod
    def from_yaml(cls, path_or_text: Union[str, os.PathLike]) -> "Plan":
        import yaml

        text = _read_or_text(path_or_text)
        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as e:
            raise PlanError(f"the plan is not valid YAML: {e}") from e

    @classmethod
    def from_json(cls, path_or_text: Union[str, os.PathLike]) -> "Plan":
        text = _read_or_text(path_or_text)
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"the plan is not valid JSON: {e}") from e

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- applying to a graph -----------------------------------------------------------------

    def layers_of(self, gm: Any) -> list[Layer]:
        """The candidates this plan's rules choose among in graph ``gm``: every weight layer
        (:func:`~graphpeft.graph.find_layers`), plus the norm modules or the parameters
        (``target_parameters``) when a rule selects them."""
        layers = find_layers(gm)
        if any(r.selects_norms for r in self.rules):
            layers += find_norms(gm)
        if any(r.selects_parameters for r in self.rules):
            layers += find_parameters(gm)
        return layers

    def resolve(self, layers: Sequence[Layer]) -> Resolution:
        """Decide which rule takes which layer; raise :class:`PlanError` on a bad fit.

        Errors: a rule that selects nothing (with the nearest candidate paths), a layer that
        a rule selects but cannot take (rank larger than the layer, tied weight ...), and two
        adapter rules claiming one layer. Rules that are not adapters (sparse updates) combine
        with an adapter and with each other on one layer.
        """
        decisions = [LayerDecision(l) for l in layers]
        matches: dict[str, list[Layer]] = {r.name: [] for r in self.rules}
        problems: list[str] = []
        adapter_of: dict[int, str] = {}  # id(decision) -> the adapter rule that took it
        for rule in self.rules:
            for d in decisions:
                why = rule.select(d.layer)
                if why is None:
                    why = rule.check(d.layer)
                    if why is not None:
                        problems.append(f"{rule.name} selects {d.layer.path} but cannot adapt it: {why}")
                if why is not None:
                    d.reasons[rule.name] = why
                    continue
                if rule.is_adapter and id(d) in adapter_of:
                    problems.append(f"{d.layer.path} is claimed by two rules: {adapter_of[id(d)]} and {rule.name}; "
                                    "narrow one of them with exclude= or a tighter targets")
                    continue
                if rule.is_adapter:
                    adapter_of[id(d)] = rule.name
                d.rule = rule.name if d.rule is None else f"{d.rule} + {rule.name}"
                matches[rule.name].append(d.layer)
            if not matches[rule.name] and not any(rule.name in p for p in problems):
                problems.append(_nothing_matched(rule, layers))
        if problems:
            raise PlanError("the plan does not fit this model:\n  " + "\n  ".join(problems))
        return Resolution(decisions, matches)


def _nothing_matched(rule: Rule, layers: Sequence[Layer]) -> str:
    paths = [l.path for l in layers]
    targets = [rule.targets] if isinstance(rule.targets, str) else list(rule.targets)
    leaves = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
    near: list[str] = []
    for t in targets:
        probe = re.sub(r"[\\^$.*+?()\[\]{}|]", "", t) if isinstance(rule.targets, str) else t
        near += difflib.get_close_matches(probe, paths, 3, 0.3)
        for leaf in difflib.get_close_matches(probe.rsplit(".", 1)[-1], leaves, 3, 0.5):
            near += [p for p in paths if p == leaf or p.endswith("." + leaf)][:2]  # full paths
    near = list(dict.fromkeys(near))[:5] or paths[:5]
    reasons = {}
    for l in layers:
        why = rule.select(l)
        if why and not why.startswith("path does not match"):
            reasons[l.path] = why
    extra = ""
    if reasons:
        p, w = next(iter(reasons.items()))
        extra = f"; e.g. {p} matched the path but {w}"
    return (f"{rule.name} matches no layer{extra}. Nearest candidates: {near}. "
            "Regex targets must match the whole module path (use '.*\\\\.q_proj'); "
            "list targets match path suffixes (['q_proj']).")


def _read_or_text(path_or_text: Union[str, os.PathLike]) -> str:
    s = os.fspath(path_or_text)
    if "\n" not in s and os.path.exists(s):
        with open(s, encoding="utf-8") as f:
            return f.read()
    if "\n" not in s and s.endswith((".yaml", ".yml", ".json")):
        raise PlanError(f"plan file {s!r} does not exist")
    return s
