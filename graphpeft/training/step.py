"""The training-step compiler: forward, pruned backward and optimizer update as ONE fx graph.

    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3, weight_decay=0.01))
    for batch in data:
        loss = step(*batch)              # trains cm through the compiled graph
    step.export_onnx("train.onnx")       # the same step for plain onnxruntime

How the graph is made: :mod:`graphpeft.training.trace_step`. Its parts: :mod:`.signature`,
:mod:`.options`, :mod:`.memory_report`, :mod:`.checkpoints`.

The graph's signature (flat, in this order)::

    inputs:  trainable tensors..., optimizer state..., lr, batch...
    outputs: loss, updated trainable tensors..., updated optimizer state...

Frozen weights and buffers are ``get_attr`` nodes named by their original paths (the IR
convention), sharing storage with the compiled model. The trainable tensors and the state have
stable names (:class:`TrainingSignature`), which the ONNX export uses for its inputs/outputs.

Shapes are static: a step is compiled for the shapes of the batch it is first given (or
``example_batch``); a batch of other shapes compiles (and caches) another graph.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import GraphPeftError, NonFiniteError, PlanError, WeightsError
from ..graph import get_tensor, graph_meta, roles
from ..infra import PassContext, PassManager, Pipeline, TimingHook
from ..registry import PASSES, get_backend, load_plugins
from .checkpoints import TrainerCheckpoints, load_training_state, save_training_state
from .distributed import (COMMUNICATION_META, SHARD_SUFFIX, CommunicationReport, ProcessGroupInfo, barrier,
                          broadcast_from_rank0, check_same_frozen, data_parallel_graph, held_frozen_bytes,
                          is_main_process, process_group, release_whole_weights)
from .losses import LossSpec, make_loss
from .memory_report import MemoryReport, with_memory_budget_passes
from .optim import Optimizer, make_optimizer
from .options import (DEFAULT_FORWARD_LOWERING, DEFAULT_TRAINING_PASSES, EXECUTORS, INFERENCE_FORWARD_LOWERING,
                      TrainingOptions)
from .runner import TensorRefs, native_runner
from .signature import IOSpec, TrainingSignature, phase_of, signature_of, verify_training
from .trace_step import (_passes_named, after_update_hooks, apply_after_update, lower_forward,
                         trace_training_step)

if TYPE_CHECKING:
    from .backward_report import BackwardReport
    from ..compiled import CompiledModel

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# --- the step -----------------------------------------------------------------------------------


def _batch_key(batch: Sequence[Any]) -> tuple:
    # the device is part of the key: a step traced on the meta device (a model compiled without
    # weights, for its memory report) is traced again for real tensors once weights are loaded
    return tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, Tensor) else (type(t).__name__,)
                 for t in batch)


def _on_meta(cm: "CompiledModel") -> bool:
    """Whether ``cm`` holds tensors on the meta device (compiled without weights); whole weights
    a sharded data-parallel step released (or read as shards only) do not count."""
    gm = cm.graph_module
    return any(t.is_meta and n not in cm.released_weights for n, t in (*gm.named_parameters(), *gm.named_buffers()))


class TrainingStep:
    """One compiled training step of a :class:`~graphpeft.compiled.CompiledModel`.

    Call it with a batch (the model's inputs, then the targets): it runs the compiled graph,
    writes the updated trainable tensors back into the model (in place) and keeps the optimizer
    state. ``lr`` may be changed between steps (it is a graph input).

    Attributes:
        graph_module: the training graph for the first compiled batch shape.
        signature: its :class:`TrainingSignature`.
        timings: seconds per compile phase (``trace``, each pass, ``total``).
    """

    def __init__(self, cm: "CompiledModel", loss: LossSpec, optimizer: Union[Optimizer, str, Mapping[str, Any]],
                 options: Optional[TrainingOptions] = None) -> None:
        load_plugins()
        self.cm = cm
        self.loss = make_loss(loss)
        self.optimizer = make_optimizer(optimizer)
        self.options = options or TrainingOptions()
        self.lr: float = float(self.optimizer.lr)
        self.param_names = [n for n, r in roles(cm.graph_module).items() if r.trainable]
        self._state = self.optimizer.init_state({n: get_tensor(cm.graph_module, n) for n in self.param_names})
        self._graphs: dict[tuple, fx.GraphModule] = {}
        self._runners: dict[tuple, Callable[..., Any]] = {}  # per batch shape: what runs the graph
        self._main: Optional[fx.GraphModule] = None
        self.timings: dict[str, float] = {}
        self.ctx: Optional[PassContext] = None
        #: steps skipped because the loss, a gradient or the lr was not finite (tensors unchanged)
        self.skipped_steps = 0
        # data parallelism: the process group, the graphs with collectives (per batch shape), and
        # whether rank 0's tensors were broadcast yet
        self._dp: Optional[ProcessGroupInfo] = process_group() if self.options.data_parallel else None
        self._dp_graphs: dict[tuple, fx.GraphModule] = {}
        self._dp_synced = False
        #: frozen weights released after sharding (``shard_frozen=True``)
        self._released: set[str] = set()
        self._released_bytes = 0
        #: this rank's shard of each sharded frozen weight (read by a sharded load, or stored by
        #: the first sharded graph): every batch shape's sharded graph shares them
        self._shards: dict[str, Tensor] = {}
        batch = self.options.example_batch
        if batch is None:
            batch = self._default_batch()
        if batch is not None:
            self.compile(*batch)

    def _default_batch(self) -> Optional[list[Tensor]]:
        """The model's example inputs plus targets shaped by a named loss (None if unknown)."""
        inputs = list(self.cm.example_inputs)
        if not inputs:
            return None
        if _on_meta(self.cm):
            inputs = [t.to("meta") for t in inputs]
        with torch.no_grad():
            flat = self.cm.graph_module(*inputs)
        outputs = pytree.tree_unflatten(list(flat), self.cm._traced.out_spec)
        try:
            targets = self.loss.example_targets(outputs, inputs)
        except GraphPeftError:
            return None
        return None if targets is None else inputs + list(targets)

    # -- compiling -------------------------------------------------------------------------------

    def compile(self, *batch: Tensor) -> fx.GraphModule:
        """Compile (or fetch from the cache) the graph for this batch's shapes."""
        if _on_meta(self.cm):  # no weights yet: the step is traced (and cached) for meta tensors
            batch = tuple(t.to("meta") if isinstance(t, Tensor) else t for t in batch)
        key = _batch_key(batch)
        if key in self._graphs:
            return self._graphs[key]
        n_in = len(self.cm._input_specs())
        if len(batch) >= n_in and all(isinstance(t, Tensor) for t in batch[:n_in]):
            self.cm._check_inputs(list(batch[:n_in]))  # a wrong dtype/rank: InputError naming the signature
        timing = TimingHook()
        start = time.perf_counter()
        gm = trace_training_step(self.cm, self.loss, self.optimizer, batch, self.options, self.lr,
                                 stand_ins=self._shards)
        traced_at = time.perf_counter()
        names = list(self.options.passes if self.options.passes is not None else DEFAULT_TRAINING_PASSES)
        if self.options.memory_budget is not None:  # met by passes/memory/rematerialize.py
            names = with_memory_budget_passes(names)
            graph_meta(gm)["memory_budget"] = int(self.options.memory_budget)
        passes = _passes_named(names, "training")
        ctx = PassContext(verify=self.options.verify, hooks=[timing, *self.options.hooks])
        if self.options.verify:
            verify_training(gm)
        result = PassManager(verifier=verify_training).run(gm, Pipeline("training", passes), ctx)
        gm = result.gm
        end = time.perf_counter()
        timings = {"trace": traced_at - start, **{f"pass:{n}": s for n, s in timing.timings}, "total": end - start}
        log.info("compiled a training step: %d nodes in %.2f s (trace %.2f s)", len(gm.graph.nodes), end - start,
                 traced_at - start)
        self._graphs[key] = gm
        if self._main is None:
            self._main, self.timings, self.ctx = gm, timings, ctx
        return gm

    @property
    def graph_module(self) -> fx.GraphModule:
        if self._main is None:
            raise GraphPeftError("the step is not compiled yet: call step(*batch) once, or pass "
                                 "example_batch=(...) to compile_training")
        return self._main

    @property
    def signature(self) -> TrainingSignature:
        return signature_of(self.graph_module)

    def graph_for(self, *batch: Tensor) -> fx.GraphModule:
        """The training graph used for a batch of these shapes (compiled on first use)."""
        return self.compile(*batch)

    # -- running ---------------------------------------------------------------------------------

    def flat_inputs(self, *batch: Tensor) -> list[Tensor]:
        """The graph's flat inputs for one call: trainable tensors, state, lr, batch."""
        self._check_weights(batch)
        sig = signature_of(self.graph_for(*batch))
        return self._graph_inputs(sig, self._trainable_refs(sig.params).get(), batch)

    def _graph_inputs(self, sig: TrainingSignature, params: Sequence[Tensor], batch: Sequence[Tensor]) -> list[Tensor]:
        return [*(t.detach() for t in params), *[self._state[s] for s in sig.state],
                torch.tensor(self.lr, dtype=torch.float32), *batch]

    def __call__(self, *batch: Tensor) -> Tensor:
        """Run one training step on ``batch``; returns the loss (a detached scalar; with
        ``data_parallel``, this rank's part of the batch and the global mean loss)."""
        self._check_weights(batch)
        if self._released - self._shards.keys() and _batch_key(batch) not in self._graphs:
            raise WeightsError(f"this sharded step released the whole frozen weights (shard_frozen=True): it runs "
                               f"the batch shapes compiled before ({[k for k in self._graphs]}), not {_batch_key(batch)}; "
                               "compile with example_batch=... per shape first, or with shard_frozen='keep'")
        key = _batch_key(batch)
        gm = self._graphs.get(key)  # a compiled real batch skips compile()'s scan for meta tensors
        if gm is None:
            gm = self.graph_for(*batch)
        sig = signature_of(gm)
        if self._dp is not None:
            gm = self._distributed_graph(key, gm)
            if not self._dp_synced:
                self._sync_ranks()
        params = self._trainable_refs(sig.params)
        inputs = self._graph_inputs(sig, params.get(), batch)
        run = self._runner(key, gm)
        with torch.no_grad():
            out = run(*inputs)
            n_p = len(sig.params)
            for old, new in zip(params.get(), out[1:1 + n_p]):
                old.copy_(new)
            self._state = dict(zip(sig.state, (t.detach() if t.requires_grad else t for t in out[1 + n_p:])))
            skipped = sig.outputs[-1].kind == "skipped" and bool(out[-1])
        if skipped:
            self.skipped_steps += 1
            if self.options.nonfinite == "raise":
                raise NonFiniteError(f"non-finite training step (loss {float(out[0])}, lr {self.lr}): the trainable "
                                     "tensors and the optimizer state were left unchanged; lower the learning rate, "
                                     "check the batch, or compile with nonfinite='skip' to skip such steps")
        return out[0].detach()

    step = __call__

    # -- base weights (a model compiled on the meta device) --------------------------------------

    def load_base_weights(self, path: Union[str, os.PathLike], **options: Any) -> Any:
        """Load the model's base weights (:meth:`CompiledModel.load_base_weights`, same options)
        and make the step ready to run on them: the optimizer state of a meta compile is
        created again (zeros) and the next real batch traces the step for real tensors (graphs
        traced on meta stay cached for their memory reports). On a ``data_parallel`` step with
        ``shard_frozen=True`` each frozen floating-point weight is read as this rank's
        ``1/world`` slice only (its whole tensor never exists here; headers are checked first)."""
        if self._dp is not None and self.options.shard_frozen is True:
            return self._load_shards(path, options)
        report = self.cm.load_base_weights(path, **options)
        self._reinit_meta_state()
        return report

    def _load_shards(self, path: Union[str, os.PathLike], options: Mapping[str, Any]) -> Any:
        """``shard_frozen=True``: each frozen weight is read as this rank's shard only; its whole
        tensor stays meta (released), and every sharded graph stores the shard as it is read."""
        from ..weights import load_base_weights

        assert self._dp is not None
        report = load_base_weights(self.cm, path, shard=(self._dp.rank, self._dp.world_size), **options)
        names = list(report.shards)
        release_whole_weights(names, [self.cm.graph_module, *self._graphs.values()])  # a reload into real weights
        with torch.no_grad():
            for name, part in report.shards.items():
                held = self._shards.get(name)
                if held is not None and held.shape == part.shape and held.dtype == part.dtype:
                    held.copy_(part)  # sharded graphs built before store this very tensor
                else:
                    self._shards[name] = part
        self._released.update(names)
        self.cm.released_weights.update(names)
        self.cm._weights_changed()
        self._reinit_meta_state()
        self._dp_synced = False  # rank 0's trainable tensors are broadcast again
        return report

    def _reinit_meta_state(self) -> None:
        if any(t.is_meta for t in self._state.values()) and not any(
                get_tensor(self.cm.graph_module, n).is_meta for n in self.param_names):
            self._state = self.optimizer.init_state({n: get_tensor(self.cm.graph_module, n) for n in self.param_names})

    def _check_weights(self, batch: Sequence[Any]) -> None:
        """Real batches need real weights: a clear error for a model still on the meta device."""
        if all(getattr(t, "is_meta", False) for t in batch):
            return
        self.cm._check_materialized(list(batch), allow_released=True)
        self._reinit_meta_state()

    # -- data parallelism (graphpeft.training.distributed) -------------------------------------

    def _distributed_graph(self, key: tuple, gm: fx.GraphModule) -> fx.GraphModule:
        """The graph with collectives for this batch shape (built from ``gm`` on first use)."""
        if key not in self._dp_graphs:
            assert self._dp is not None
            release = None
            if self.options.shard_frozen is True:  # whole weights leave as their shards are made
                if not self._dp_synced:
                    self._sync_ranks()  # the ranks' whole weights are compared first
                release = self._release_whole_weight
                # the compile's temporaries (graph copies sharing the weights, closures) sit in
                # reference cycles: until the cyclic collector runs they keep every released
                # weight alive, and the shards pile up on top (+the shards' bytes at the peak)
                gc.collect()
            shards = self._shards if self.options.shard_frozen is True else None
            self._dp_graphs[key] = dp = data_parallel_graph(gm, self._dp, self.options, release, shards)
            if shards is not None:  # later batch shapes share the shards stored here
                held = roles(dp)
                shards.update({n: get_tensor(dp, n + SHARD_SUFFIX) for n in self._released
                               if n not in shards and n + SHARD_SUFFIX in held})
            report = graph_meta(dp).get(COMMUNICATION_META)
            if release is not None and report is not None:
                report.released_bytes, self._released_bytes = self._released_bytes, 0
                log.info("shard_frozen: released %.1f MiB of whole frozen weights", report.released_bytes / 2**20)
        return self._dp_graphs[key]

    def _sync_ranks(self) -> None:
        """Before the first step (and after a load): every rank takes rank 0's trainable tensors
        and optimizer state; frozen tensors must already agree."""
        check_same_frozen(self.graph_module)
        broadcast_from_rank0([get_tensor(self.cm.graph_module, n) for n in self.param_names]
                             + list(self._state.values()))
        self._dp_synced = True

    def _release_whole_weight(self, name: str) -> None:
        """``shard_frozen=True``: once the sharded graph stores this rank's shard of ``name`` (the
        ranks checked to agree before), the whole tensor leaves the compiled model and the
        single-device graphs (a meta tensor of its shape takes its place)."""
        self._released_bytes += release_whole_weights([name], [self.cm.graph_module, *self._graphs.values()])
        self._released.add(name)
        self.cm.released_weights.add(name)
        self.cm._weights_changed()

    def frozen_bytes_held(self) -> int:
        """Bytes of frozen weights this process holds for the step: its model, its single-device
        graphs and, with ``data_parallel``, its sharded graphs (distinct storages only). With
        ``shard_frozen=True`` about ``1/world`` of the unsharded figure after the first step
        (when nothing else, e.g. the original ``nn.Module``, keeps the whole weights)."""
        held = held_frozen_bytes([self.cm.graph_module, *self._graphs.values(), *self._dp_graphs.values()])
        counted = {t.untyped_storage().data_ptr() for g in self._dp_graphs.values() for t in g.parameters()}
        return held + sum(t.untyped_storage().nbytes() for t in self._shards.values()
                          if t.untyped_storage().data_ptr() not in counted)

    @property
    def distributed_graph_module(self) -> fx.GraphModule:
        """The graph a ``data_parallel`` step runs (its single-device ``graph_module`` plus the
        collectives) for the first compiled batch shape."""
        if self._dp is None:
            raise GraphPeftError("this step is not data-parallel: compile it with data_parallel=True")
        key = next(k for k, g in self._graphs.items() if g is self.graph_module)
        if key[0][-1] == "meta" and any(k[0][-1] != "meta" for k in self._dp_graphs):
            # compiled on meta, then loaded: the first shape that ran on real tensors
            return next(g for k, g in self._dp_graphs.items() if k[0][-1] != "meta")
        return self._distributed_graph(key, self.graph_module)

    def communication_report(self) -> "CommunicationReport":
        """What a ``data_parallel`` step all-reduces per step (the trainable gradients and the
        loss) against what full fine-tuning would: ``print(step.communication_report())``."""
        return graph_meta(self.distributed_graph_module)[COMMUNICATION_META]

    def _runner(self, key: tuple, gm: fx.GraphModule) -> Callable[..., Any]:
        run = self._runners.get(key)
        if run is None:
            executor = self.options.executor
            if isinstance(executor, str):
                executor = EXECUTORS[executor]
            run = self._runners[key] = executor(gm) if executor is not None else native_runner(gm)
        return run

    def _trainable_refs(self, names: Sequence[str]) -> TensorRefs:
        """The trainable tensors ``names`` of the model, resolved once per model graph."""
        refs = self.__dict__.get("_refs")
        if refs is None or not refs.valid_for(self.cm.graph_module) or refs.names != list(names):
            refs = self.__dict__["_refs"] = TensorRefs(self.cm.graph_module, names)
        return refs

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"params": {name: tensor}, "optimizer": {key: tensor}, "lr": float}`` (copies)."""
        return {
            "params": {n: get_tensor(self.cm.graph_module, n).detach().clone() for n in self.param_names},
            "optimizer": {k: v.clone() for k, v in self._state.items()},
            "lr": self.lr,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (from this step or an ``OnnxTrainer``); checks first."""
        params = {k: torch.as_tensor(v) for k, v in state.get("params", {}).items()}
        opt = {k: torch.as_tensor(v) for k, v in state.get("optimizer", {}).items()}
        problems = []
        for k in self.param_names:
            if k not in params:
                problems.append(f"missing parameter {k}")
            elif tuple(params[k].shape) != tuple(get_tensor(self.cm.graph_module, k).shape):
                problems.append(f"{k} has shape {tuple(params[k].shape)}")
        for k, v in self._state.items():
            if k not in opt:
                problems.append(f"missing optimizer state {k}")
            elif tuple(opt[k].shape) != tuple(v.shape):
                problems.append(f"optimizer state {k} has shape {tuple(opt[k].shape)}")
        if problems:
            raise GraphPeftError("state does not fit this training step (nothing was loaded): "
                                 + "; ".join(problems[:10]) + ". Was it saved with the same plan and optimizer?")
        with torch.no_grad():
            for k in self.param_names:
                get_tensor(self.cm.graph_module, k).copy_(params[k])
        self._state = {k: opt[k].clone().to(v.dtype) for k, v in self._state.items()}
        if "lr" in state:
            self.lr = float(state["lr"])
        self._dp_synced = False  # data-parallel: the next step starts every rank from rank 0's state

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write trainable tensors, optimizer state and lr to ``path`` (safetensors, atomic);
        an ``OnnxTrainer`` of the exported step can resume from it, and vice versa. With
        ``data_parallel`` only rank 0 writes (the state is the same on every rank) and every
        rank returns once the file is complete; a step of any world size resumes from it."""
        if is_main_process():
            save_training_state(path, self.state_dict(), signature=self._signature_or_none())
        if self._dp is not None:
            barrier()

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Resume from a checkpoint written by :meth:`save_checkpoint` (or an ``OnnxTrainer``)."""
        state, _ = load_training_state(path, signature=self._signature_or_none())
        self.load_state_dict(state)

    def _signature_or_none(self) -> Optional[TrainingSignature]:
        return signature_of(self._main) if self._main is not None else None

    # -- reports and export ----------------------------------------------------------------------

    def memory_report(self, measure: bool = False, batch: Optional[Sequence[Tensor]] = None) -> MemoryReport:
        """The static memory plan of the training graph (``print(step.memory_report())``).

        ``measure=True`` also runs the graph once with the torch executor (nothing is written
        back; the RNG state is restored) and records the measured peak of live tensor storage
        beside the plan (``measured_peak_bytes``, ``plan_vs_measured``), on ``batch`` (default:
        the example batch the step was compiled for)."""
        gm = self.graph_module
        report = graph_meta(gm).get("memory")
        if report is None:
            if "plan_memory" not in PASSES:
                raise GraphPeftError("no plan_memory pass is registered (import graphpeft.passes)")
            PASSES["plan_memory"]()(gm, PassContext(verify=False))
            report = graph_meta(gm)["memory"]
        if measure and report.measured_peak_bytes is None:
            if batch is None:
                batch = self.options.example_batch if self.options.example_batch is not None else self._default_batch()
            if batch is None:
                raise GraphPeftError("memory_report(measure=True) needs a batch: pass batch=(...) or compile with "
                                     "example_batch=(...)")
            gm = self.graph_for(*batch)
            PASSES["measure_memory"](self.flat_inputs(*batch))(gm, PassContext(verify=False))
            report = graph_meta(gm)["memory"]
        return report

    def backward_report(self) -> "BackwardReport":
        """Per layer, whether the pruned backward reaches it and what it computes there (input
        grad only, full weight grad, weight-slice grad, bias / norm / adapter grads, nothing):
        ``print(step.backward_report())``. Computed on first use by the ``report_backward`` pass."""
        gm = self.graph_module
        report = graph_meta(gm).get("backward")
        if report is None:
            if "report_backward" not in PASSES:
                raise GraphPeftError("no report_backward pass is registered (import graphpeft.passes)")
            PASSES["report_backward"](self.cm.graph_module)(gm, PassContext(verify=False))
            report = graph_meta(gm)["backward"]
        return report

    def export_onnx(self, path: Union[str, os.PathLike], **options: Any) -> Any:
        """Export the training step to ONNX (see ``graphpeft.backends.onnx.export_training``)."""
        from ..errors import ExportError
        from ..paths import check_output_file

        check_output_file(path, "export_onnx", ExportError)  # before any work: nothing half-written
        return get_backend("onnx").export_training(self, path, **options)

    def onnx_initializers(self) -> dict[str, Tensor]:
        """The stored tensors of the step's graph (frozen weights, constants, buffers; not the
        trainable ones) by the names its ONNX export gives their initializers, sharing memory
        with the model: ``OnnxTrainer(path, initializers=step.onnx_initializers())`` runs the
        exported step without a second copy of the weights."""
        gm = self.graph_module
        role_map = roles(gm)
        out: dict[str, Tensor] = {}
        for node in gm.graph.nodes:
            if node.op != "get_attr" or node.target in out:
                continue
            if isinstance(getattr(gm, node.target, None), torch.nn.Module):
                continue  # a higher-order op's subgraph
            role = role_map.get(node.target)
            if role is None or not role.trainable:
                out[node.target] = get_tensor(gm, node.target).detach()
        return out

    def export_executorch(self, path: Union[str, os.PathLike], **options: Any) -> Any:
        """Export the training step as one ExecuTorch method (see
        ``graphpeft.backends.executorch.export_training``)."""
        from ..errors import ExportError
        from ..paths import check_output_file

        check_output_file(path, "export_executorch", ExportError)  # before any work: nothing half-written
        return get_backend("executorch").export_training(self, path, **options)

    # -- copy.deepcopy, pickle, torch.save/torch.load (graphpeft.serialize) --------------------

    def __getstate__(self) -> dict[str, Any]:
        from ..serialize import graph_module_state

        state = dict(self.__dict__)
        state["_graphs"] = {key: graph_module_state(gm) for key, gm in self._graphs.items()}
        state["_main"] = next((key for key, gm in self._graphs.items() if gm is self._main), None)
        state["_runners"] = {}  # executors (torch.compile ...) are rebuilt on the next call
        state.pop("_refs", None)  # module references: resolved again on the next call
        state["_dp_graphs"], state["_dp_synced"] = {}, False  # rebuilt in the process group of the next call
        state["ctx"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from ..serialize import graph_module_from_state

        self.__dict__.update(state)
        self._graphs = {key: graph_module_from_state(gs) for key, gs in state["_graphs"].items()}
        self._main = self._graphs.get(state["_main"]) if state["_main"] is not None else None

    def __repr__(self) -> str:
        n = len(self._main.graph.nodes) if self._main is not None else 0
        return (f"TrainingStep(loss={self.loss.name}, optimizer={self.optimizer.name}, "
                f"{len(self.param_names)} trainable tensors, {n} nodes)")


def compile_training(cm: "CompiledModel", loss: LossSpec, optimizer: Union[Optimizer, str, Mapping[str, Any]],
                     **options: Any) -> TrainingStep:
    """Compile one training step of ``cm``: forward, pruned backward and optimizer update.

    Args:
        cm: the compiled (adapted) model; its trainable tensors are trained in place.
        loss: ``"cross_entropy"``, ``"causal_lm"``, ``"mse"``, a :class:`~graphpeft.training.losses.Loss` or
            a callable ``(outputs, *targets) -> scalar``.
        optimizer: ``gp.optim.SGD(...)`` / ``gp.optim.AdamW(...)`` (or ``"sgd"`` / ``"adamw"``).
        **options: see :class:`TrainingOptions` (``accumulation_steps``, ``clip_grad_norm``,
            ``passes``, ``verify``, ``hooks``, ``example_batch``).
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainingOptions)}
    if unknown:
        raise PlanError(f"unknown training option(s) {sorted(unknown)}; known: "
                        f"{[f.name for f in dataclasses.fields(TrainingOptions)]}")
    return TrainingStep(cm, loss, optimizer, TrainingOptions(**options))


__all__ = ["TrainerCheckpoints", "DEFAULT_FORWARD_LOWERING", "INFERENCE_FORWARD_LOWERING", "DEFAULT_TRAINING_PASSES", "lower_forward", "IOSpec", "after_update_hooks", "apply_after_update", "load_training_state", "save_training_state", "MemoryReport", "TrainingOptions", "TrainingSignature",
           "TrainingStep", "compile_training", "phase_of", "signature_of", "trace_training_step",
           "verify_training"]
