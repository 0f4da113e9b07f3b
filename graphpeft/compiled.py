"""``CompiledModel``: the adapted graph as an ``nn.Module`` you call and train like the model."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import AdapterFileError
from .graph import META_KEY, Role, adapters, get_tensor, graph_meta, op_count, roles
from .infra import PassContext, PassManager, Pipeline, clone_graph_module
from .registry import MERGE_STEPS, PASSES, get_backend, load_plugins
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
        self.train(True)

    # -- calling -------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._traced.flatten_inputs(args, kwargs)
        out = self.graph_module(*flat)
        return pytree.tree_unflatten(list(out), self._traced.out_spec)

    def flat_inputs(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        """The graph's flat input list for a model-style call (what exporters take)."""
        return self._traced.flatten_inputs(args, kwargs)

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
        """Adapter records: layer path -> method, tensors, scaling, rule."""
        return {k: dict(v) for k, v in adapters(self.graph_module).items()}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors under PEFT key names (``<module path>.lora_A.weight`` ...)."""
        return {n: get_tensor(self.graph_module, n).detach().clone()
                for n, r in roles(self.graph_module).items() if r in (Role.ADAPTER, Role.TRAINABLE, Role.TRAINABLE_SLICE)}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load adapter tensors. Checks every key and shape first: on error nothing changes."""
        own = self.adapter_state_dict()
        state = {_strip_peft_prefix(k): v for k, v in state.items()}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        problems = []
        if strict and missing:
            problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        for k in sorted(set(own) & set(state)):
            v = state[k]
            if not isinstance(v, torch.Tensor):
                problems.append(f"{k} is a {type(v).__name__}, not a tensor")
            elif tuple(v.shape) != tuple(own[k].shape):
                problems.append(f"{k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}")
            elif not v.is_floating_point() or not torch.isfinite(v).all():
                problems.append(f"{k} holds non-finite or non-float values")
        if problems:
            raise AdapterFileError("adapter does not fit this model (nothing was loaded): " + "; ".join(problems)
                                   + ". Was it saved from a model compiled with the same plan?")
        with torch.no_grad():
            for k in set(own) & set(state):
                get_tensor(self.graph_module, k).copy_(state[k])

    def save_adapter(self, folder: Union[str, os.PathLike]) -> None:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (atomically)."""
        from .adapter_io import save_adapter

        save_adapter(self, folder)

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

    def merge(self) -> "CompiledModel":
        """A new model with every adapter folded into its base weight (this one is unchanged)."""
        load_plugins()
        gm = clone_graph_module(self.graph_module)
        ctx = PassContext(verify=True)
        merge = PASSES["merge_adapters"]()
        folds = [PASSES[name]() for name in MERGE_STEPS]  # e.g. reassemble row-sliced weights
        result = PassManager().run(gm, Pipeline("merge", [merge, *folds, PASSES["remove_dead_code"](),
                                                          PASSES["freeze"]()]), ctx)
        merged = CompiledModel(result.gm, self._traced, self.plan, self._resolution, ctx,
                               self._example_inputs, self.base_op_count)
        merged.train(self.training)
        return merged

    def export_onnx(self, path: Union[str, os.PathLike], merged: bool = True, **options: Any) -> Any:
        """Export to ONNX (merged: adapters folded; ``merged=False`` keeps the adapter branch)."""
        reparameterized = bool(graph_meta(self.graph_module).get("slices"))  # sparse-update weight slices
        model = self.merge() if merged and (adapters(self.graph_module) or reparameterized) else self
        return get_backend("onnx").export(model, path, **options)

    def compile_training(self, loss: Any, optimizer: Any, **options: Any) -> Any:
        """Compile one training step (forward, pruned backward, optimizer update) as one graph.

        ``step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3))``; ``step(*batch)``
        trains this model in place. See :func:`graphpeft.training.compile_training`."""
        from .training import compile_training

        return compile_training(self, loss, optimizer, **options)

    def __repr__(self) -> str:
        return (f"CompiledModel({len(adapters(self.graph_module))} adapters, "
                f"{self.num_parameters(True):,} trainable parameters, {op_count(self.graph_module)} ops)")


def _strip_peft_prefix(key: str) -> str:
    # keys from peft's get_peft_model_state_dict start with "base_model.model."
    return key[len("base_model.model."):] if key.startswith("base_model.model.") else key
