"""``CompiledModel``: the adapted graph as an ``nn.Module`` you call and train like the model."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import AdapterError, AdapterFileError, ExportError
from .graph import (META_KEY, Role, adapter_name_of, adapters, get_tensor, graph_meta, op_count, roles,
                    unscoped_tensor_name)
from .infra import PassContext, PassManager, Pipeline, clone_graph_module
from .registry import MERGE_PREPARE_STEPS, MERGE_STEPS, PASSES, get_backend, load_plugins
from .paths import check_output_file
from .trace import TracedModel

log = logging.getLogger(__name__)


class CompiledModel(torch.nn.Module):
    """A model compiled with a plan. Call it with the same inputs as the original model.

    Attributes:
        graph_module: the adapted aten-level ``fx.GraphModule`` (the IR).
        plan: the plan it was compiled with.
    """

    def __init__(self, graph_module: fx.GraphModule, traced: TracedModel, plan: Any,
                 resolution: Any = None, ctx: Optional[PassContext] = None,
                 example_inputs: tuple = (), base_op_count: Optional[int] = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self._traced = traced
        self.plan = plan
        self._resolution = resolution
        self._ctx = ctx
        self._example_inputs = example_inputs
        self.base_op_count = base_op_count if base_op_count is not None else op_count(graph_module)
        self._dropout_training: Optional[bool] = None
        #: every named adapter once the model has more than its plan's (graphpeft.adapter_bank)
        self._bank: Any = None
        #: frozen weights whose whole tensors a sharded data-parallel step released (each rank
        #: keeps its shard): they are meta here, yet the model is not "compiled on meta"
        self.released_weights: set[str] = set()
        self.train(True)

    # -- calling -------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.flat_inputs(*args, **kwargs)
        self._check_materialized(flat)
        out = self.graph_module(*flat)
        return pytree.tree_unflatten(list(out), self._traced.out_spec)

    def flat_inputs(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """The graph's flat input list for a model-style call (what exporters take). Raises
        :class:`~graphpeft.errors.InputError`, naming the compiled signature, when the inputs
        do not fit it (count, structure, dtype, rank, fixed sizes)."""
        from .errors import InputError

        try:
            flat = self._traced.flatten_inputs(args, kwargs)
        except InputError as e:
            raise InputError(f"{e} (compiled signature: {self.input_signature()})") from None
        self._check_inputs(flat)
        return flat

    def _input_specs(self) -> list[tuple[str, Optional[torch.dtype], Optional[list[Optional[int]]], str]]:
        """(name, dtype, sizes (None: dynamic), text) per graph input, from the graph's fake values."""
        specs = self.__dict__.get("_input_specs_cache")
        if specs is None:
            traced = self._traced
            paths = [pytree.keystr(kp) for kp, _ in pytree.tree_flatten_with_path(
                pytree.tree_unflatten(list(range(len(traced.tensor_leaf_mask))), traced.in_spec))[0]]
            names = []
            for path, is_tensor in zip(paths, traced.tensor_leaf_mask):
                if is_tensor:  # "[0][1]" -> args[1]; "[1]['mask']" -> mask
                    names.append(f"args{path[3:]}" if path.startswith("[0]") else path[3:].strip("[]'\""))
            specs = []
            placeholders = [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]
            for i, node in enumerate(placeholders):
                name = names[i] if i < len(names) else node.name
                val = node.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    specs.append((name, None, None, f"{name}: ?"))
                    continue
                from torch.fx.experimental.symbolic_shapes import is_concrete_int

                sizes = [int(d) if is_concrete_int(d) else None for d in val.shape]  # (a specialised SymInt too)
                dims = ", ".join(str(d) for d in val.shape)
                specs.append((name, val.dtype, sizes, f"{name}: {str(val.dtype).replace('torch.', '')}[{dims}]"))
            self.__dict__["_input_specs_cache"] = specs
        return specs

    def input_signature(self) -> str:
        """The inputs the graph was compiled for, e.g. ``(args[0]: int64[s0, s1])`` (``s*`` are
        dynamic sizes; the others are fixed)."""
        return "(" + ", ".join(text for *_, text in self._input_specs()) + ")"

    def _check_inputs(self, flat: list[Any]) -> None:
        from .errors import InputError

        specs = self._input_specs()
        if len(flat) != len(specs):
            raise InputError(f"the model was compiled for {len(specs)} tensor inputs {self.input_signature()}, "
                             f"got {len(flat)}; call it with the inputs it was compiled with")
        for x, (name, dtype, sizes, text) in zip(flat, specs):
            if dtype is None:
                continue
            problem = None
            if x.dtype != dtype:
                problem = f"dtype {str(x.dtype).replace('torch.', '')}"
            elif x.dim() != len(sizes):
                problem = f"{x.dim()} dimensions (shape {list(x.shape)})"
            else:
                bad = [i for i, (got, want) in enumerate(zip(x.shape, sizes)) if want is not None and got != want]
                if bad:
                    problem = f"shape {list(x.shape)} (dimension {bad[0]} is fixed to {sizes[bad[0]]})"
            if problem is not None:
                raise InputError(f"input {name} has {problem}, but the model was compiled for {text} (compiled "
                                 f"signature: {self.input_signature()}; s* are dynamic sizes). Convert the input "
                                 "(e.g. .to(dtype)) or compile again for it")

    # -- base weights (graphpeft.weights) --------------------------------------------------------

    def load_base_weights(self, path: Union[str, os.PathLike], *, strict: bool = True, key_map: Any = None,
                          extra: Optional[dict[str, torch.Tensor]] = None, cast: bool = False,
                          init_adapters: bool = True, device: Union[str, torch.device] = "cpu") -> Any:
        """Load the base weights from safetensors (a file, or a folder as ``save_pretrained``
        writes it, sharded or not) into the graph, one memory-mapped tensor at a time: the way to
        fill a model compiled on the meta device (also overwrites real weights in place).

        Every header is checked first (names, shapes, dtypes; with ``strict``, no missing and no
        unexpected key): on a mismatch :class:`~graphpeft.errors.WeightsError` names the tensors
        and nothing is loaded. Quantized weights (``gp.Quantize``) are quantized as they are read.
        Adapters still on meta are initialized from their layer's loaded weight
        (``init_adapters``), as a compile from real weights would initialize them.

        Args:
            path: a ``.safetensors`` file or a checkpoint folder.
            strict: refuse missing and unexpected keys (else they are reported and skipped).
            key_map: renames checkpoint keys to graph names (a dict, or a function; None drops
                a key), e.g. for a checkpoint saved without the ``model.`` prefix.
            extra: graph name -> tensor for what a checkpoint does not hold (non-persistent
                buffers of a model built under ``torch.device("meta")``).
            cast: accept float tensors of another float dtype (cast on load).
            device: where the loaded tensors live.

        Returns a :class:`~graphpeft.weights.LoadReport`."""
        from .weights import load_base_weights

        return load_base_weights(self, path, strict=strict, key_map=key_map, extra=extra, cast=cast,
                                 init_adapters=init_adapters, device=device)

    def meta_tensors(self) -> list[str]:
        """Names of the graph's tensors that are still on the meta device (no values yet)."""
        gm = self.graph_module
        return [n for n in roles(gm) if get_tensor(gm, n).is_meta]

    def _weights_changed(self) -> None:
        self.__dict__.pop("_meta_cache", None)

    def _check_materialized(self, flat: list[Any], allow_released: bool = False) -> None:
        """A model holding meta tensors runs only on meta inputs (shape inference). Whole
        weights a sharded data-parallel step released are allowed to that step only."""
        meta = self.__dict__.get("_meta_cache")
        if meta is None:
            meta = self.__dict__["_meta_cache"] = self.meta_tensors()
        released = self.released_weights
        if allow_released:
            meta = [n for n in meta if n not in released]
        if meta and not all(getattr(x, "is_meta", False) for x in flat):
            from .errors import WeightsError

            if set(meta) <= released:
                raise WeightsError(f"{len(meta)} whole frozen weights (e.g. {meta[:3]}) were released by a sharded "
                                   "data-parallel step (shard_frozen=True keeps only this rank's shards): load them "
                                   "again with cm.load_base_weights(checkpoint), or train with shard_frozen='keep'")
            raise WeightsError(f"the model holds {len(meta)} tensors on the meta device (e.g. {meta[:3]}): it was "
                               "compiled without weights. Load them first: cm.load_base_weights(checkpoint) for the "
                               "base, cm.load_adapter(...) for adapters it could not initialize")

    @property
    def example_inputs(self) -> tuple:
        """The flat example inputs the model was traced with."""
        return self._example_inputs

    def train(self, mode: bool = True) -> "CompiledModel":
        super().train(mode)
        if self._dropout_training != mode:
            self._set_dropout(mode)
        return self

    def _set_dropout(self, mode: bool) -> None:
        changed = False
        for node in self.graph_module.graph.nodes:
            prov = node.meta.get(META_KEY) or {}
            if prov.get("part") == "dropout" and node.args[2] != mode:
                node.args = (node.args[0], node.args[1], mode)
                changed = True
        if changed:
            self.graph_module.recompile()
        self._dropout_training = mode

    # -- parameters ----------------------------------------------------------------------------

    def roles(self) -> dict[str, Role]:
        """Tensor name -> role."""
        return dict(roles(self.graph_module))

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Name -> parameter for every tensor that trains (adapters, trainable weights)."""
        return {n: get_tensor(self.graph_module, n) for n, r in roles(self.graph_module).items() if r.trainable}

    def num_parameters(self, trainable_only: bool = False) -> int:
        ps = self.trainable_parameters().values() if trainable_only else self.graph_module.parameters()
        return sum(p.numel() for p in ps)

    def adapters(self) -> dict[str, dict[str, Any]]:
        """Records of the adapters the graph runs (the active ones): adapter id (the layer path;
        ``"<name>:<layer path>"`` for adapters not named "default") -> method, layer, name,
        tensors, scaling, rule."""
        return {k: dict(v) for k, v in adapters(self.graph_module).items()}

    def _live_tensors(self, adapter_name: Optional[str]) -> dict[str, tuple[torch.Tensor, Role]]:
        # key -> (live tensor, role): the graph's own names, or one adapter's PEFT file names
        if adapter_name is None:
            gm = self.graph_module
            return {n: (get_tensor(gm, n), r) for n, r in roles(gm).items()
                    if r in (Role.ADAPTER, Role.ADAPTER_CONST, Role.TRAINABLE, Role.TRAINABLE_SLICE)}
        if self._bank is not None:
            return self._bank.live_tensors(adapter_name)
        recs = [r for r in adapters(self.graph_module).values() if adapter_name_of(r) == adapter_name]
        if not recs:
            raise AdapterError(f"no adapter named {adapter_name!r}; this model has {self.adapter_names}")
        names = sorted({t for rec in recs for t in rec["tensors"].values()})
        role_map = roles(self.graph_module)
        return {unscoped_tensor_name(n, adapter_name): (get_tensor(self.graph_module, n), role_map[n]) for n in names}

    def adapter_state_dict(self, adapter_name: Optional[str] = None, *,
                           include_constants: bool = False) -> dict[str, torch.Tensor]:
        """Adapter tensors (copies) under PEFT key names (``<module path>.lora_A.weight`` ...).

        Args:
            adapter_name: None: every trainable tensor of the graph (the active adapters, under
                their graph names, plus trainable base weights); a name: that adapter's tensors,
                active or not, under PEFT's file names (the name stripped).
            include_constants: also the :attr:`Role.ADAPTER_CONST` tensors (VeRA's shared
                projections, LoRA-FA's frozen A, SHiRA's indices), which a fresh compile with
                the same seed regenerates but PEFT and other seeds do not.
        """
        return {k: t.detach().clone() for k, (t, r) in self._live_tensors(adapter_name).items()
                if include_constants or r != Role.ADAPTER_CONST}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, *,
                                adapter_name: Optional[str] = None,
                                include_constants: Optional[bool] = None) -> None:
        """Load adapter tensors. Checks every key and shape first: on error nothing changes.

        Keys as :meth:`adapter_state_dict` gives them (for ``adapter_name``); a PEFT prefix
        ``base_model.model.`` is accepted. Constants (:attr:`Role.ADAPTER_CONST`) present in
        ``state`` are loaded (integer ones cast to the model's dtype); ``include_constants=True``
        also requires them, ``False`` rejects them.
        """
        live = self._live_tensors(adapter_name)
        consts = {k for k, (_, r) in live.items() if r == Role.ADAPTER_CONST}
        allowed = set(live) - (consts if include_constants is False else set())
        required = set(live) - (set() if include_constants else consts)
        state = {_strip_peft_prefix(k): v for k, v in state.items()}
        missing = sorted(required - set(state))
        unexpected = sorted(set(state) - allowed)
        problems = []
        if strict and missing:
            problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        for k in sorted(allowed & set(state)):
            v, own = state[k], live[k][0]
            if not isinstance(v, torch.Tensor):
                problems.append(f"{k} is a {type(v).__name__}, not a tensor")
            elif tuple(v.shape) != tuple(own.shape):
                problems.append(f"{k} has shape {tuple(v.shape)}, the model needs {tuple(own.shape)}")
            elif own.is_floating_point() and (not v.is_floating_point() or not torch.isfinite(v).all()):
                problems.append(f"{k} holds non-finite or non-float values")
            elif not own.is_floating_point() and v.is_floating_point():
                problems.append(f"{k} holds floats; the model needs {own.dtype} values (indices)")
        if problems:
            raise AdapterFileError("adapter does not fit this model (nothing was loaded): " + "; ".join(problems)
                                   + ". Was it saved from a model compiled with the same plan?")
        from .weights import set_tensor

        with torch.no_grad():
            for k in allowed & set(state):
                if live[k][0].is_meta:  # an adapter of a meta compile: the file gives it its values
                    set_tensor(self.graph_module, _graph_name(self, k, adapter_name), state[k].to(live[k][0].dtype))
                else:
                    live[k][0].copy_(state[k].to(live[k][0].dtype))
        self._weights_changed()

    def save_adapter(self, folder: Union[str, os.PathLike], adapter_name: Optional[str] = None) -> None:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (atomically), constants
        included; ``adapter_name``: one named adapter (default: what the graph trains)."""
        from .adapter_io import save_adapter

        save_adapter(self, folder, adapter_name=adapter_name)

    # -- named adapters (graphpeft.adapter_bank) -------------------------------------------------

    def _adapter_bank(self) -> Any:
        if self._bank is None:
            from .adapter_bank import AdapterBank

            self._bank = AdapterBank(self)
        return self._bank

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter name of the model, active or not, in the order they were added."""
        if self._bank is not None:
            return self._bank.names()
        return list(dict.fromkeys(adapter_name_of(r) for r in adapters(self.graph_module).values()))

    @property
    def active_adapters(self) -> list[str]:
        """The adapters whose branches the graph runs (a fused adapter is not among them)."""
        if self._bank is not None:
            fused = self._bank.fused.name if self._bank.fused else None
            return [n for n in self._bank.active if n != fused]
        return self.adapter_names

    def add_adapter(self, adapter_name: str, plan: Any, *, seed: int = 0) -> None:
        """Compile ``plan``'s adapters onto this model under ``adapter_name``, beside the
        adapters it has (a layer may carry several); the new adapter is inactive until
        :meth:`set_adapter`. Nothing is re-traced. Raises ``AdapterError`` (a ``ValueError``)
        for a taken or invalid name and ``PlanError`` when the plan does not fit."""
        from .plan import Plan

        if isinstance(plan, dict) or (isinstance(plan, list) and plan and isinstance(plan[0], dict)):
            plan = Plan.from_dict(plan)
        elif not isinstance(plan, Plan):
            plan = Plan(plan)
        self._adapter_bank().add(adapter_name, plan, seed)

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        """Make only ``adapter_names`` contribute (PEFT's ``set_adapter``; several may be active:
        their updates add up). Derives the graph again without re-tracing."""
        self._adapter_bank().set_active(adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter: its branch, records and tensors."""
        self._adapter_bank().delete(adapter_name)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear", **options: Any) -> None:
        """Add ``adapter_name`` combining ``adapters`` with ``weights``, as PEFT's
        ``add_weighted_adapter``: for LoRA ``combination_type`` is ``linear``, ``cat``, ``ties``,
        ``dare_linear``, ``dare_ties``, ``magnitude_prune`` or an ``_svd`` variant (``svd``,
        ``ties_svd`` ...), with ``density``, ``majority_sign_method``, ``svd_rank``,
        ``svd_clamp`` and, for DARE, an optional ``generator`` (default: torch's global RNG, as
        PEFT); IA3 combines linearly. The new adapter is inactive until :meth:`set_adapter`."""
        self._adapter_bank().add_weighted(adapters, weights, adapter_name, combination_type, **options)

    def fuse_adapter(self, adapter_name: str) -> None:
        """Fold one adapter into (private copies of) the base weights in place, so inference
        runs the base graph; fusing another adapter first unfuses this one (rapid switching:
        a SHiRA adapter switches by scattering its sparse values, a LoRA adapter by ``W ∓ s·BA``)."""
        self._adapter_bank().fuse(adapter_name)

    def unfuse_adapter(self) -> None:
        """Undo :meth:`fuse_adapter` (additive methods subtract ΔW, others restore the weights)."""
        if self._bank is not None:
            self._bank.unfuse()

    @property
    def fused_adapter(self) -> Optional[str]:
        """The name of the adapter fused into the base weights, if any."""
        return self._bank.fused.name if self._bank is not None and self._bank.fused else None

    # -- explain, merge, export ------------------------------------------------------------

    def match_report(self) -> list[Any]:
        """Every match -> check -> rewrite outcome of the compile (``MatchResult`` objects, in
        order): ``ok`` ones were rewritten; the others carry the reason they were not."""
        return list(self._ctx.report) if self._ctx is not None else []

    def explain(self) -> str:
        """Which rule matched which layer, and why every other layer was left alone."""
        lines = [f"plan: {len(self.plan.rules) if self.plan else 0} rule(s); "
                 f"{len(adapters(self.graph_module))} adapter(s); "
                 f"{self.num_parameters(True):,} trainable of {self.num_parameters():,} parameters"]
        if self._resolution is not None:
            lines.append(self._resolution.explain())
        if self._ctx is not None:
            declined = [m for m in self._ctx.report if not m.ok and m.stage == "check"]
            for m in declined:
                lines.append(f"  ! {m.origin}: {m.rule} declined: {m.reason}")
        return "\n".join(lines)

    def merge(self, *, requantize: bool = True) -> "CompiledModel":
        """A new model with every adapter folded into its base weight (this one is unchanged).

        Adapters whose method cannot be merged (MoLE's routed experts: the update depends on
        the input) stay in the new model as branches, with their records and tensors; the
        others are folded, so ``export_onnx(merged=True)`` exports routed experts beside
        merged weights. A quantized base weight (``gp.Quantize``) is dequantized, merged and,
        with ``requantize`` (the default), quantized again (with a warning: that adds a
        rounding error); ``requantize=False`` keeps merged weights in float."""
        load_plugins()
        gm = clone_graph_module(self.graph_module)
        ctx = PassContext(verify=True, options={"requantize": requantize})
        prepare = [PASSES[name]() for name in MERGE_PREPARE_STEPS]  # e.g. dequantize quantized weights
        merge = PASSES["merge_adapters"](keep_unmergeable=True)
        folds = [PASSES[name]() for name in MERGE_STEPS]  # e.g. reassemble row-sliced weights
        result = PassManager().run(gm, Pipeline("merge", [*prepare, merge, *folds, PASSES["remove_dead_code"](),
                                                          PASSES["freeze"]()]), ctx)
        merged = CompiledModel(result.gm, self._traced, self.plan, self._resolution, ctx,
                               self._example_inputs, self.base_op_count)
        merged.train(self.training)
        return merged

    def export_onnx(self, path: Union[str, os.PathLike], merged: bool = True, **options: Any) -> Any:
        """Export to ONNX (merged: adapters folded; ``merged=False`` keeps the adapter branch)."""
        check_output_file(path, "export_onnx", ExportError)  # before any work: nothing half-written
        reparameterized = bool(graph_meta(self.graph_module).get("slices"))  # sparse-update weight slices
        requantize = options.pop("requantize", True)  # quantized bases: see merge()
        model = (self.merge(requantize=requantize) if merged and (adapters(self.graph_module) or reparameterized)
                 else self)
        return get_backend("onnx").export(model, path, **options)

    def export_executorch(self, path: Union[str, os.PathLike], merged: bool = True, **options: Any) -> Any:
        """Export to an ExecuTorch program (``.pte``; merged: adapters folded; ``merged=False``
        keeps the adapter branch). Options: see ``graphpeft.backends.executorch.export``."""
        check_output_file(path, "export_executorch", ExportError)
        reparameterized = bool(graph_meta(self.graph_module).get("slices"))
        model = self.merge() if merged and (adapters(self.graph_module) or reparameterized) else self
        return get_backend("executorch").export(model, path, **options)

    def compile_training(self, loss: Any, optimizer: Any, **options: Any) -> Any:
        """Compile one training step (forward, pruned backward, optimizer update) as one graph.

        ``step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3))``; ``step(*batch)``
        trains this model in place. See :func:`graphpeft.training.compile_training`."""
        from .training import compile_training

        return compile_training(self, loss, optimizer, **options)

    # -- copy.deepcopy, pickle, torch.save/torch.load (graphpeft.serialize) -------------------

    def __getstate__(self) -> dict[str, Any]:
        import dataclasses

        from .serialize import graph_module_state

        state = super().__getstate__()
        modules = dict(state["_modules"])
        gm = modules.pop("graph_module")
        state["_modules"] = modules
        state["_graph_state"] = graph_module_state(gm)
        # the trace's graph is only needed to compile; the restored model points it at its own.
        # Tree specs go as JSON where they can (pickling them warns in torch 2.13)
        state["_traced"] = dataclasses.replace(self._traced, gm=None, in_spec=_spec_state(self._traced.in_spec),
                                               out_spec=_spec_state(self._traced.out_spec))
        # the compile reports hold graph nodes: keep what explain() and match_report() show
        state["_resolution"] = _without_nodes(self._resolution)
        state["_ctx"] = None
        state["_match_report"] = [dataclasses.replace(m, node=None, bindings={}) for m in self.match_report()]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from .serialize import graph_module_from_state

        gm = graph_module_from_state(state.pop("_graph_state"))
        report = state.pop("_match_report", [])
        super().__setstate__(state)
        self._modules["graph_module"] = gm
        self._traced.gm = gm
        self._traced.in_spec = _spec_from_state(self._traced.in_spec)
        self._traced.out_spec = _spec_from_state(self._traced.out_spec)
        self._ctx = PassContext(verify=False)
        self._ctx.report.extend(report)

    def __repr__(self) -> str:
        return (f"CompiledModel({len(adapters(self.graph_module))} adapters, "
                f"{self.num_parameters(True):,} trainable parameters, {op_count(self.graph_module)} ops)")


def _graph_name(cm: CompiledModel, key: str, adapter_name: Optional[str]) -> str:
    """The graph name of an adapter tensor that ``_live_tensors`` lists under ``key``."""
    from .graph import scoped_tensor_name

    return key if adapter_name is None else scoped_tensor_name(key, adapter_name)


def _strip_peft_prefix(key: str) -> str:
    # keys from peft's get_peft_model_state_dict start with "base_model.model."
    return key[len("base_model.model."):] if key.startswith("base_model.model.") else key


def _without_nodes(resolution: Any) -> Any:
    """A plan resolution whose layers no longer point at graph nodes (for pickling)."""
    import dataclasses

    if resolution is None:
        return None
    layers = {id(d.layer): dataclasses.replace(d.layer, node=None) for d in resolution.decisions}
    for ls in resolution.matches.values():
        for l in ls:
            layers.setdefault(id(l), dataclasses.replace(l, node=None))
    return dataclasses.replace(
        resolution, decisions=[dataclasses.replace(d, layer=layers[id(d.layer)]) for d in resolution.decisions],
        matches={k: [layers[id(l)] for l in ls] for k, ls in resolution.matches.items()})


def _spec_state(spec: Any) -> Any:
    try:
        return ("treespec-json", pytree.treespec_dumps(spec))
    except Exception:  # noqa: BLE001 - a container type without a serialized name: pickle it
        return spec


def _spec_from_state(state: Any) -> Any:
    if isinstance(state, tuple) and len(state) == 2 and state[0] == "treespec-json":
        return pytree.treespec_loads(state[1])
    return state
