"""Several named adapters on one compiled model: add, select, combine, delete, fuse.

A :class:`~graphpeft.compiled.CompiledModel` starts with the adapters of its plan, all named
"default". The first time a second adapter is added (or one is selected, deleted or fused) the
model gets an :class:`AdapterBank`, which holds the *full* adapted graph: every adapter's branch
present and joined in. The model's ``graph_module`` is then a view derived from it: the branches
of the active adapters only, with their records and tensors; the other adapters' tensors are
kept in the bank, not on the graph module. So every pass, the merge, the exporters and the
training compiler see an ordinary adapted graph (the invariants of :mod:`graphpeft.graph` hold)
and only the active adapters cost compute.

Deriving the view never re-traces the model: it copies the full graph, bypasses each inactive
adapter's join (a join's first argument is what it wraps, the invariant merge relies on) and
erases the nodes that adapter created; then regenerates the module's Python code.

Fused mode (:meth:`AdapterBank.fuse`): one adapter is folded into private copies of the base
weights in place and its branch leaves the graph, so inference runs the base graph. Switching
the fused adapter unfuses the old one and fuses the new one. Additive methods do this through
``AdapterMethod.add_delta_`` (LoRA: ``W ± s·BA`` by one GEMM; SHiRA: a scatter of its sparse
values, which is why SHiRA switches fast); others (IA3, DoRA) save the touched base tensors and
restore them.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import torch
import torch.fx as fx

from .errors import AdapterError
from .graph import (META_KEY, Role, adapter_joins, adapter_name_of, adapters, check_adapter_name, get_tensor,
                    register_tensor, remove_tensor, roles, unscoped_tensor_name)
from .registry import get_method

if TYPE_CHECKING:
    from .compiled import CompiledModel
    from .plan import Plan

log = logging.getLogger(__name__)

__all__ = ["AdapterBank"]


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A structural copy of ``graph`` (same node names, shared ``meta`` values): cheap, no
    tensors are copied."""
    new = fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)  # the flat calling convention of traced graphs
    val_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, val_map)
    new.output(out)
    return new


def adapter_tensor_names(records: Iterable[dict[str, Any]]) -> set[str]:
    """Graph names of every tensor the given adapter records read."""
    return {t for rec in records for t in rec["tensors"].values()}


@dataclasses.dataclass
class _Fused:
    name: str
    #: base tensor name -> saved original (non-additive methods only)
    saved: dict[str, torch.Tensor]


class AdapterBank:
    """Every named adapter of one compiled model and which are active (see the module doc)."""

    def __init__(self, cm: "CompiledModel") -> None:
        gm = cm.graph_module
        self.cm = cm
        self.graph = copy_graph(gm.graph)  # every adapter present and joined in
        self.records: dict[str, dict[str, Any]] = dict(adapters(gm))
        role_map = roles(gm)
        self.tensors: dict[str, tuple[torch.Tensor, Role]] = {
            n: (get_tensor(gm, n), role_map[n]) for n in adapter_tensor_names(self.records.values())}
        names = self.names()
        self.plans: dict[str, Any] = {n: cm.plan for n in names}
        self.active: list[str] = list(names)
        self.fused: Optional[_Fused] = None
        self._private: set[str] = set()  # base tensors already copied for in-place fusing
        self._views: dict[str, Any] = {}  # adapter name -> tensor view for fusing (rebuilt on change)

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle: the graph as plain data
        from .serialize import graph_state

        return {**self.__dict__, "graph": graph_state(self.graph)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from .serialize import graph_from_state

        self.__dict__.update(state, graph=graph_from_state(state["graph"]))

    # -- queries ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Adapter names, in the order they were added."""
        return list(dict.fromkeys(adapter_name_of(r) for r in self.records.values()))

    def records_of(self, name: str) -> dict[str, dict[str, Any]]:
        return {k: r for k, r in self.records.items() if adapter_name_of(r) == name}

    def require(self, name: str) -> None:
        if name not in self.names():
            raise AdapterError(f"no adapter named {name!r}; this model has {self.names()}")

    # -- deriving the view -----------------------------------------------------------------------

    def _graph_without(self, excluded: set[str]) -> fx.Graph:
        """A copy of the full graph without the branches of the adapter names ``excluded``."""
        g = copy_graph(self.graph)
        if not excluded:
            return g
        nodes = {n.name: n for n in g.nodes}
        gone = {k for k, r in self.records.items() if adapter_name_of(r) in excluded}
        for aid in gone:
            for name in adapter_joins(self.records[aid]):
                join = nodes[name]
                join.replace_all_uses_with(join.args[0])
        for node in reversed(list(g.nodes)):
            prov = node.meta.get(META_KEY)
            if prov and prov.get("adapter") in gone:
                if node.users:
                    raise AdapterError(f"node {node.name} of adapter {prov.get('adapter')} is still read by "
                                       f"{list(node.users)}: another adapter reads into its branch")
                g.erase_node(node)
        return g

    def apply(self, present: Optional[Sequence[str]] = None) -> None:
        """Make the model's graph module hold the branches of ``present`` (default: the active,
        non-fused adapters) with their records and tensors; the rest stays in the bank."""
        if present is None:
            present = [n for n in self.active if not (self.fused and self.fused.name == n)]
        keep = set(present)
        gm = self.cm.graph_module
        graph = self._graph_without(set(self.names()) - keep)
        live = {k: r for k, r in self.records.items() if adapter_name_of(r) in keep}
        needed = adapter_tensor_names(live.values())
        role_map = roles(gm)
        for name, (tensor, role) in self.tensors.items():
            if name in needed and name not in role_map:
                register_tensor(gm, name, tensor, role)
            elif name not in needed and name in role_map:
                remove_tensor(gm, name)
        records = adapters(gm)
        records.clear()
        records.update(live)
        gm.graph = graph  # the setter regenerates the Python code: no tracing
        self.cm._dropout_training = None  # the new nodes carry the dropout flag of the full graph
        self.cm.train(self.cm.training)

    def snapshot(self, name: str, plan: Any) -> None:
        """Take the model's graph module (every adapter present, ``name`` just added) as the
        new full graph."""
        gm = self.cm.graph_module
        self.graph = copy_graph(gm.graph)
        self.records = dict(adapters(gm))
        role_map = roles(gm)
        self.tensors = {n: (get_tensor(gm, n), role_map[n]) for n in adapter_tensor_names(self.records.values())}
        self.plans[name] = plan
        self._views.clear()

    # -- operations ------------------------------------------------------------------------------

    def add(self, name: str, plan: "Plan", seed: int = 0) -> None:
        """Compile ``plan``'s adapters onto the model under ``name`` (inactive until selected)."""
        from .api import build_pipeline  # the public API module builds pipelines (core only)
        from .infra import PassContext, PassManager

        check_adapter_name(name)
        if name in self.names():
            raise AdapterError(f"the model already has an adapter named {name!r}; delete it first or pick another name")
        not_adapters = [r.name for r in plan.rules if not r.is_adapter]
        if not_adapters:
            raise AdapterError(f"only adapter rules can be added by name; {not_adapters} change base weights "
                               "(compile them into the model instead)")
        scope = f"adapters.{name}."
        gm = self.cm.graph_module
        self.apply(self.names())  # every adapter present: the new one is inserted beside them
        try:
            if any(n.startswith(scope) for n in roles(gm)):
                raise AdapterError(f"the model already has tensors under {scope!r}; pick another adapter name")
            resolution = plan.resolve(plan.layers_of(gm))
            ctx = PassContext(plan=plan, resolution=resolution, verify=True, seed=seed, adapter_name=name,
                              options={"example_inputs": self.cm.example_inputs, "out_spec": self.cm._traced.out_spec})
            PassManager().run(gm, build_pipeline(plan), ctx)
            if not any(adapter_name_of(r) == name for r in adapters(gm).values()):
                raise AdapterError(f"the plan put no adapter on the model (see its match report): {plan}")
            self.snapshot(name, plan)
        finally:
            self.apply()

    def delete(self, name: str) -> None:
        """Remove adapter ``name``: its branch, records and tensors."""
        self.require(name)
        if self.fused and self.fused.name == name:
            self.unfuse()
        self.graph = self._graph_without({name})
        for aid in list(self.records_of(name)):
            del self.records[aid]
        still = adapter_tensor_names(self.records.values())
        gm = self.cm.graph_module
        for t in [t for t in self.tensors if t not in still]:
            del self.tensors[t]
            if t in roles(gm):
                remove_tensor(gm, t)
        self.plans.pop(name, None)
        self._views.clear()
        self.active = [n for n in self.active if n != name]
        self.apply()

    def set_active(self, names: Union[str, Sequence[str]]) -> None:
        """Only the adapters ``names`` contribute (a fused adapter named here is unfused first)."""
        wanted = [names] if isinstance(names, str) else list(names)
        for n in wanted:
            self.require(n)
        if self.fused and self.fused.name in wanted:
            self.unfuse()
        self.active = list(dict.fromkeys(wanted))
        self.apply()

    def add_weighted(self, sources: Sequence[str], weights: Sequence[float], name: str,
                     combination_type: str = "linear", **options: Any) -> None:
        """Add adapter ``name`` combining ``sources`` with ``weights`` (see
        ``CompiledModel.add_weighted_adapter``); the method of the sources does the math."""
        import re

        from .plan import Plan
        from .registry import RULES

        sources = list(sources)
        weights = [float(w) for w in weights]
        if not sources or len(sources) != len(weights):
            raise AdapterError(f"give one weight per adapter: {len(sources)} adapters, {len(weights)} weights")
        for s in sources:
            self.require(s)
        if len(sources) == 1:
            combination_type = "linear"  # as PEFT: one adapter can only be scaled
        by_source = [self.records_of(s) for s in sources]
        methods = {r["method"] for recs in by_source for r in recs.values()}
        if len(methods) != 1:
            raise AdapterError(f"adapters {sources} use methods {sorted(methods)}; only adapters of one method combine")
        method = get_method(methods.pop())
        order = {n.name: i for i, n in enumerate(self.graph.nodes)}
        layers = sorted({r["layer"]: order[r["join"]] for recs in by_source for r in recs.values()}.items(),
                        key=lambda kv: kv[1])
        paths = [p for p, _ in layers]
        try:
            body = method.combined_rule_body([[r["config"] for r in recs.values()] for recs in by_source],
                                             combination_type, **options)
        except (NotImplementedError, ValueError) as e:  # the method cannot combine these adapters so
            raise AdapterError(str(e)) from e
        body["targets"] = "|".join(re.escape(p) for p in paths)  # exactly the layers of the sources
        self.add(name, Plan([RULES[method.rule.key].from_body(body)]))
        new_recs = {r["layer"]: r for r in self.records_of(name).values()}
        per_source = [{r["layer"]: r for r in recs.values()} for recs in by_source]
        with torch.no_grad():
            for path in paths:  # graph order: DARE's random draws come in PEFT's layer order
                have = [(layers[path], w) for layers, w in zip(per_source, weights) if path in layers]
                recs = [rec for rec, _ in have]
                parts = [{k: self.tensors[t][0] for k, t in rec["tensors"].items()} for rec in recs]
                new = {k: self.tensors[t][0] for k, t in new_recs[path]["tensors"].items()}
                values = method.combine(parts, recs, [w for _, w in have], combination_type, new=new, **options)
                for k, v in values.items():
                    new[k].copy_(v.to(new[k].dtype))

    # -- tensors of one adapter --------------------------------------------------------------------

    def live_tensors(self, name: str) -> dict[str, tuple[torch.Tensor, Role]]:
        """PEFT file name -> (the live tensor, its role) for every tensor of adapter ``name``."""
        self.require(name)
        names = adapter_tensor_names(self.records_of(name).values())
        return {unscoped_tensor_name(t, name): self.tensors[t] for t in sorted(names)}

    # -- fused mode ----------------------------------------------------------------------------------

    def _view(self, name: str) -> Any:
        """An object ``get_tensor`` can read adapter ``name``'s base and adapter tensors from
        (the method hooks take a graph module; inactive adapters' tensors are not on it).
        Cached: switching fused adapters should cost the weight updates, not this."""
        if name not in self._views:
            self._views[name] = self._build_view(self.records_of(name).values())
        return self._views[name]

    def _build_view(self, recs: Iterable[dict[str, Any]]) -> Any:
        gm = self.cm.graph_module
        root = types.SimpleNamespace()
        names = set()
        for rec in recs:
            names |= set(rec["tensors"].values()) | {rec["weight"]} | ({rec["bias"]} if rec.get("bias") else set())
        for n in names:
            t = self.tensors[n][0] if n in self.tensors else get_tensor(gm, n)
            *path, leaf = n.split(".")
            node = root
            for p in path:
                if not hasattr(node, p):
                    setattr(node, p, types.SimpleNamespace())
                node = getattr(node, p)
            setattr(node, leaf, t)
        return root

    def _privatize(self, names: Iterable[str]) -> None:
        # the graph's base tensors share storage with the user's model: fusing in place must
        # not change the model the user passed to compile()
        gm = self.cm.graph_module
        for n in names:
            if n not in self._private:
                t = get_tensor(gm, n)
                register_tensor(gm, n, t.detach().clone(), roles(gm)[n])
                self._private.add(n)
                self._views.clear()

    def fuse(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights in place (any fused adapter is unfused
        first); the graph then runs without its branch."""
        self.require(name)
        if self.fused and self.fused.name == name:
            return
        if self.fused:
            self.unfuse()
        recs = list(self.records_of(name).values())
        for rec in recs:
            method = get_method(rec["method"])
            if method is None or not method.mergeable:
                raise AdapterError(f"adapter {name!r} ({rec['method']}) cannot be fused into base weights")
        touched = {rec["weight"] for rec in recs} | {rec["bias"] for rec in recs if rec.get("bias")}
        self._privatize(touched)
        if name in self.active:  # its branch leaves the graph before its ΔW enters the weights
            self.fused = _Fused(name, {})
            self.apply()
        saved: dict[str, torch.Tensor] = {}
        view = self._view(name)
        with torch.no_grad():
            for rec in recs:
                method = get_method(rec["method"])
                if method.additive:
                    method.add_delta_(view, rec, 1.0)
                else:
                    new = method.merged_tensors(view, rec)
                    for t, value in new.items():
                        live = get_tensor(view, t)
                        saved.setdefault(t, live.detach().clone())
                        live.copy_(value.to(live.dtype))
        self.fused = _Fused(name, saved)

    def unfuse(self) -> None:
        """Take the fused adapter out of the base weights again (subtracting ΔW, or restoring
        the saved tensors); its branch comes back if it is active."""
        if self.fused is None:
            return
        fused, recs = self.fused, list(self.records_of(self.fused.name).values())
        view = self._view(fused.name)
        with torch.no_grad():
            for rec in reversed(recs):
                method = get_method(rec["method"])
                if method.additive:
                    method.add_delta_(view, rec, -1.0)
            for t, value in fused.saved.items():
                get_tensor(view, t).copy_(value)
        self.fused = None
        if fused.name in self.active:
            self.apply()
