"""Sparse updates of base parameters (PockEngine / tiny-training style): the ``update`` plan rule.

Instead of adding adapters, a sparse-update scheme trains part of the model's own parameters:

* ``gp.Update(targets=..., part="all")`` — the weight (and bias) of every matched layer;
* ``part="bias"`` — only the biases of matched layers (layers without a bias are skipped);
* ``part="norm"`` — the affine weight (and bias) of matched norm modules (LayerNorm, RMSNorm,
  BatchNorm ...), found by module path (:func:`graphpeft.graph.find_norms`);
* ``part="module"`` — every parameter of the matched modules, whatever they hold (PEFT's
  ``modules_to_save``: a classification head trained in full). ``targets`` names modules, not
  layers: a layer or norm inside a matched module (``classifier.dense`` under ``classifier``)
  selects that module, and all its parameters train;
* ``fraction=0.25`` — only a share of the output channels (rows) of each matched weight, chosen
  ``select="first"`` (rows ``0..k-1``), ``"magnitude"`` (largest row L2 norm) or
  ``"gradient"`` (largest gradient row norm on one probe batch). The weight is reparameterised
  as a trainable slice plus a frozen rest (:mod:`graphpeft.passes.update.slice_rows`), so autograd
  computes the weight gradient of the slice only; the bias of a sliced layer trains in full
  (tiny-training's sparse update does the same: biases are cheap and their gradient needs no
  activation). ``merge()`` / ``export_onnx()`` reassemble the weight exactly;
* ``layers=[-2, -1]`` — the last two numbered blocks (negative indices count back from the
  deepest one).

Update rules are not adapters (``is_adapter = False``): they combine with LoRA rules, and with
each other, in one plan::

    gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=8), gp.Update(targets=".*", part="bias")])
    {"rules": [{"update": {"targets": ".*", "layers": [-1], "fraction": 0.25, "select": "magnitude"}}]}

This module holds the rule, :class:`UpdateParameters` (the pass that gives the selected tensors
their trainable role) and :class:`UpdateMethod` (what ``compile`` runs for ``update`` rules: the
gradient probe, this pass, then the row slicing).
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from typing import Any, ClassVar, Optional, Sequence, Union

import torch.fx as fx

from graphpeft.errors import PlanError
from graphpeft.graph import (Layer, Role, find_layers, find_norms, get_tensor, graph_meta, op_args, register_tensor,
                             roles, set_role)
from graphpeft.infra import PassContext, Pipeline
from graphpeft.method import AdapterMethod
from graphpeft.plan import Rule, Targets
from graphpeft.registry import register_method, register_pass, register_rule
from graphpeft.rewrite import MatchResult, RewritePass, RewriteRule

from .probe_gradients import ProbeGradients
from .slice_rows import SliceRows, slices_layer

PARTS = ("all", "bias", "norm", "module")
SELECTS = ("first", "magnitude", "gradient")

#: ``gm.meta["graphpeft"]["updates"]``: layer path -> what an update rule made trainable there
UPDATES_META = "updates"


@register_rule
@dataclasses.dataclass(init=False, repr=False)
class Update(Rule):
    """Train part of the model's own parameters (a sparse update); see the module docstring.

    Args:
        targets: layers (or norm modules, with ``part="norm"``) to update: a regex on the whole
            module path, a list of name suffixes, or ``"all-linear"``.
        kind / layers / exclude: the usual selection options; ``layers`` accepts negative
            indices (``[-1]``: the deepest numbered block).
        part: ``"all"`` (weight and bias), ``"bias"``, ``"norm"`` or ``"module"`` (every
            parameter of the modules ``targets`` names: PEFT's ``modules_to_save``).
        fraction: train only this share (0, 1] of the output channels of each weight
            (``part="all"`` on linear and conv layers).
        select: which channels a ``fraction`` trains: ``"first"``, ``"magnitude"`` (row L2
            norm of the weight) or ``"gradient"`` (row norm of the weight gradient on a probe
            batch: ``compile(..., options={"probe_batch": batch, "probe_loss": "causal_lm"})``,
            by default the example inputs and a next-token / output-energy objective).

    The ``select`` option is stored as the field ``selection`` (``Rule.select`` is the method
    that decides whether the rule wants a layer); its data form is ``select``.
    """

    key: ClassVar[str] = "update"
    supported_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding", "norm")
    is_adapter: ClassVar[bool] = False

    part: str = "all"
    fraction: Optional[float] = None
    selection: str = "first"

    def __init__(self, targets: Targets = "", kind: Optional[Union[str, Sequence[str]]] = None,
                 layers: Optional[Union[int, Sequence[int]]] = None, exclude: Optional[Targets] = None,
                 part: str = "all", fraction: Optional[float] = None, select: str = "first") -> None:
        self.targets = list(targets) if isinstance(targets, tuple) else targets
        self.kind = kind
        self.layers = layers
        self.exclude = exclude
        self.part = part
        self.fraction = fraction
        self.selection = select
        self.__post_init__()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.part not in PARTS:
            raise PlanError(f"update: unknown part {self.part!r}; use one of {list(PARTS)} "
                            "(all: weight and bias, bias: biases only, norm: norm modules, "
                            "module: every parameter of the named modules)")
        if self.part == "module" and self.targets == "all-linear":
            raise PlanError("update: part='module' trains whole modules named by targets (PEFT's modules_to_save); "
                            "'all-linear' names layers: give module names, e.g. targets=['classifier']")
        if self.selection not in SELECTS:
            raise PlanError(f"update: unknown select {self.selection!r}; use one of {list(SELECTS)}")
        if self.fraction is not None:
            f = self.fraction
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 < float(f) <= 1.0:
                raise PlanError(f"update: fraction must be a number in (0, 1] (the share of output channels "
                                f"to train), got {f!r}")
            if self.part != "all":
                raise PlanError(f"update: fraction slices weight rows, so it needs part='all' (got part={self.part!r}); "
                                "drop fraction to train every bias / norm weight")
        elif self.selection != "first":
            raise PlanError(f"update: select={self.selection!r} chooses which rows a fraction trains; "
                            "give fraction=... (e.g. 0.25) or drop select")

    def __repr__(self) -> str:
        opts = [f"targets={self.targets!r}"]
        for name, default in (("kind", None), ("layers", None), ("exclude", None), ("part", "all"),
                              ("fraction", None)):
            if getattr(self, name) != default:
                opts.append(f"{name}={getattr(self, name)!r}")
        if self.selection != "first":
            opts.append(f"select={self.selection!r}")
        return f"Update({', '.join(opts)})"

    @property
    def name(self) -> str:
        # two update rules on the same targets differ by part / layers / fraction, and the plan
        # forbids two rules with one name
        t = self.targets if isinstance(self.targets, str) else ",".join(self.targets)
        extra = [f"part={self.part}"] if self.part != "all" else []
        for opt in ("kind", "exclude"):
            if getattr(self, opt) is not None:
                extra.append(f"{opt}={getattr(self, opt)}")
        if self.layers is not None:
            extra.append(f"layers={self.layers}")
        if self.fraction is not None:
            extra.append(f"fraction={self.fraction}")
            extra.append(f"select={self.selection}")
        return f"{self.key}[{t}{'; ' + '; '.join(extra) if extra else ''}]"

    @property
    def selects_norms(self) -> bool:
        return self.part in ("norm", "module")

    def module_of(self, layer: Layer) -> Optional[str]:
        """For ``part="module"``: the outermost module on ``layer``'s path that ``targets``
        names (the layer itself, or a module holding it), or None."""
        parts = layer.path.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if self._path_matches(self.targets, dataclasses.replace(layer, path=prefix)):
                return prefix
        return None

    @property
    def sliced(self) -> bool:
        """Whether the rule trains a row slice of each weight (instead of whole tensors)."""
        return self.fraction is not None and float(self.fraction) < 1.0

    def select(self, layer: Layer) -> Optional[str]:
        if self.part == "module":
            module = self.module_of(layer)
            if module is None:
                return f"no module on its path matches targets {self.targets!r}"
            return super().select(dataclasses.replace(layer, path=module))
        why = super().select(layer)
        if why is not None:
            return why
        if self.part == "norm" and layer.kind != "norm":
            return f"part='norm' selects norm modules; this is a {layer.kind} layer"
        if self.part != "norm" and layer.kind == "norm":
            return f"part={self.part!r} selects weight layers; use part='norm' for norm modules"
        if self.part == "bias" and layer.bias is None:
            return "the layer has no bias"
        if self.sliced and layer.kind not in ("linear", "conv"):
            return f"fraction slices the output channels of linear and conv layers, not {layer.kind} layers"
        return None

    def check(self, layer: Layer) -> Optional[str]:
        if self.part == "module" and layer.tied_to:  # a module called several times is one module: fine
            return (f"its weight {layer.weight} is shared with {layer.tied_to} (tied weights): training the module "
                    "would change both (PEFT trains a copy); exclude this module")
        if not self.sliced:
            return None
        if layer.shared_with:
            return (f"its weight {layer.weight} is shared with {layer.shared_with} (tied weights): a row slice "
                    "would untie them; exclude this layer or update it fully (no fraction)")
        if layer.kind == "conv" and op_args(layer.node).get("groups", 1) != 1:
            return "grouped convolutions cannot be sliced by output channel; update them fully (no fraction)"
        if layer.fan_in_fan_out and (op_args(layer.node).get("beta", 1) != 1 or op_args(layer.node).get("alpha", 1) != 1):
            return "addmm with beta/alpha other than 1 cannot be sliced"
        return None

    # -- data form: the option is ``select`` (the field is ``selection``) ---------------------------

    def to_dict(self) -> dict[str, Any]:
        body = next(iter(super().to_dict().values()))
        if "selection" in body:
            body["select"] = body.pop("selection")
        return {self.key: body}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Rule":
        if not isinstance(body, dict):
            raise PlanError(f"{cls.key}: expected a mapping of options, got {type(body).__name__}")
        allowed = sorted({f.name for f in dataclasses.fields(cls)} - {"selection"} | {"select"})
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, allowed, 1)) else repr(u)
                     for u in unknown]
            raise PlanError(f"{cls.key}: unknown option(s) {', '.join(hints)}; allowed: {allowed}")
        if "targets" not in body:
            raise PlanError(f"{cls.key}: 'targets' is required (a regex, a list of names, or 'all-linear')")
        try:
            return cls(**body)
        except TypeError as e:
            raise PlanError(f"{cls.key}: {e}") from e


# --- the pass -------------------------------------------------------------------------------------


def candidates(gm: fx.GraphModule, rule: Update) -> list[Layer]:
    """The layers (and, for ``part="norm"``, norm modules) ``rule`` chooses among."""
    return find_layers(gm) + (find_norms(gm) if rule.selects_norms else [])


def tensors_to_train(rule: Update, layer: Layer) -> dict[str, Role]:
    """The whole tensors ``rule`` makes trainable on ``layer`` (a layer whose weight the rule
    slices belongs to :mod:`slice_rows` instead)."""
    if rule.part == "bias":
        return {layer.bias: Role.TRAINABLE} if layer.bias else {}
    if rule.part == "module":
        return dict.fromkeys(module_parameters(layer.node.graph.owning_module, rule.module_of(layer)), Role.TRAINABLE)
    out = {layer.weight: Role.TRAINABLE}
    if layer.bias:
        out[layer.bias] = Role.TRAINABLE
    return out


def module_parameters(gm: fx.GraphModule, module: Optional[str]) -> list[str]:
    """The base parameters (frozen or already trained; not adapters, not buffers) under the
    module path ``module``: what PEFT's ``modules_to_save`` copies and trains."""
    if module is None:
        return []
    prefix = module + "."
    return sorted(n for n, r in roles(gm).items() if n.startswith(prefix) and r in (Role.FROZEN, Role.TRAINABLE)
                  and get_tensor(gm, n).is_floating_point())


class UpdateRolesRewrite(RewriteRule):
    """Match a layer (or norm module) an update rule selects; rewrite = give its tensors the
    trainable role. No node is created: the graph is unchanged, only roles (and so which
    gradients the training step computes) change."""

    def __init__(self, rule: Update) -> None:
        self.rule = rule
        self.name = rule.name
        self._layers: dict[fx.Node, Layer] = {}

    def match(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional[MatchResult]:
        if not self._layers:
            self._layers = {l.node: l for l in candidates(gm, self.rule)}
        layer = self._layers.get(node)
        if layer is None or (self.rule.select(layer) is None and slices_layer(self.rule, layer)):
            return None  # not a layer, or one whose weight slice_rows reparameterises
        why = self.rule.select(layer)
        if why is not None:
            return MatchResult.fail(self.name, node, why, layer.path)
        return MatchResult.success(self.name, node, layer.path, layer=layer)

    def check(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> Optional[str]:
        layer: Layer = match.bindings["layer"]
        for name in tensors_to_train(self.rule, layer):
            if not get_tensor(gm, name).is_floating_point():
                return f"{name} is not floating point (quantized weights cannot be trained)"
        return self.rule.check(layer)

    def rewrite(self, gm: fx.GraphModule, match: MatchResult, ctx: PassContext) -> None:
        layer: Layer = match.bindings["layer"]
        tensors = tensors_to_train(self.rule, layer)
        for name, role in tensors.items():
            if Role(role).trainable and not roles(gm)[name].trainable:
                # a private copy: training must not write into the user's model (the graph
                # shares storage with it for everything frozen)
                register_tensor(gm, name, get_tensor(gm, name).detach().clone(), role)
            else:
                set_role(gm, name, role)
        rec = graph_meta(gm).setdefault(UPDATES_META, {}).setdefault(
            layer.path, {"kind": layer.kind, "rules": [], "tensors": []})
        rec["rules"].append(self.rule.name)
        rec["tensors"] = sorted(set(rec["tensors"]) | set(tensors))
        if self.rule.part == "module":  # PEFT interop saves these as modules_to_save
            rec["module"] = self.rule.module_of(layer)


@register_pass
class UpdateParameters(RewritePass):
    """Gives the tensors that update rules select the trainable role (in place; no new nodes)."""

    name = "update_parameters"

    def __init__(self, rules: Sequence[Update]) -> None:
        super().__init__([UpdateRolesRewrite(r) for r in rules])

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        from graphpeft.errors import VerificationError

        role_map = roles(gm)
        for path, rec in graph_meta(gm).get(UPDATES_META, {}).items():
            for name in rec["tensors"]:
                if name in role_map and not role_map[name].trainable:
                    raise VerificationError(f"{name} of {path} was selected for update but is {role_map[name].value}")


class UpdateMethod(AdapterMethod):
    """What ``compile`` runs for ``update`` rules: the gradient probe (``select="gradient"``),
    :class:`UpdateParameters`, then :class:`~graphpeft.passes.update.slice_rows.SliceRows`."""

    name = "update"
    rule = Update
    mergeable = False  # nothing to fold: a sliced weight is reassembled by merge's own step

    def make_pass(self, rules: Sequence[Rule]) -> Any:
        ours = [r for r in rules if isinstance(r, Update)]
        return Pipeline("update", [ProbeGradients(ours), UpdateParameters(ours), SliceRows(ours)])


register_method(UpdateMethod.name, UpdateMethod())
