"""Checks shared by the adapter-method tests (tests/test_methods_*.py).

Every method is tested the same way: structure (ops created per layer, provenance), match
count, numerical parity with peft (or a plain PyTorch reference), exact merge, ONNX export run
in onnxruntime, and a few training steps in which the loss falls, run again by onnxruntime from
the exported training step (:func:`check_training_export`). Models are tiny (hidden 32,
2 layers, batch 2 x 8 tokens) so the whole set stays fast on 2 cores.

A test file's compiled models are module fixtures made by :func:`compiled_fixture`; tests that
change a fixture's adapter tensors put them back (``try``/``finally``, or the helpers here do).
:func:`compile_model` traces each tiny model once per session and compiles copies of the trace.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import META_KEY, get_tensor, iter_created, op_count

from models import tiny_bert, tiny_gpt2, tiny_llama, token_batch

IDS = token_batch()
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], dict[str, Any]]] = {
    "llama": (tiny_llama, {"use_cache": False}),
    "gpt2": (tiny_gpt2, {"use_cache": False}),
    "bert": (tiny_bert, {}),
}


def main_output(out: Any) -> torch.Tensor:
    """The tensor to compare: logits (decoders) or the last hidden state (BERT)."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0] if isinstance(out, (tuple, list)) else out


#: (arch, model builder) -> (the traced model, its flat example inputs, its training flag)
_TRACES: dict[tuple[str, Callable[[], torch.nn.Module]], tuple[Any, tuple[torch.Tensor, ...], bool]] = {}


def compile_model(arch: str, rules: list, seed: int = 0,
                  make: Optional[Callable[[], torch.nn.Module]] = None) -> gp.CompiledModel:
    """``arch``'s tiny model (or ``make()``, a variant of it taking the same inputs) compiled
    with ``rules`` on the test batch, as ``gp.compile`` does it: trace, then the adapter
    pipeline (``compile_traced``). The builders are deterministic (seeded weights), so each is
    traced once per session and every compile runs on a deep copy of that trace (tensors
    included): tracing is most of a compile's time (~1-1.5 s of ~2 s for the tiny Llama), and
    tracing itself is tested in test_trace.py."""
    from graphpeft.api import compile_traced
    from graphpeft.infra import clone_graph_module

    build, kwargs = MODELS[arch]
    make = make or build
    if (arch, make) not in _TRACES:
        model = make()
        traced = gp.trace(model, (IDS,), dict(kwargs))
        flat = tuple(t.detach().clone() for t in traced.flatten_inputs((IDS,), dict(kwargs)))
        _TRACES[arch, make] = (traced, flat, model.training)
    traced, flat, training = _TRACES[arch, make]
    copy = dataclasses.replace(traced, gm=clone_graph_module(traced.gm))
    cm = compile_traced(copy, gp.Plan(rules), tuple(t.clone() for t in flat), seed=seed)
    cm.train(training)
    return cm


def run(model: torch.nn.Module, arch: str, ids: torch.Tensor = IDS) -> torch.Tensor:
    return main_output(model(ids, **MODELS[arch][1]))


def randomize(cm: gp.CompiledModel, scale: float = 0.3, seed: int = 7) -> None:
    """Move every trainable tensor off its init so adapters change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.trainable_parameters().values():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def compile_randomized(arch: str, rules: list, *, make: Optional[Callable[[], torch.nn.Module]] = None,
                       randomizer: Optional[Callable[[gp.CompiledModel], None]] = randomize) -> gp.CompiledModel:
    """:func:`compile_model`, then the trainable tensors moved off their init by ``randomizer``
    (:func:`randomize` unless given; None leaves them as compiled) so that the adapters change
    the outputs. ``cm.initial_state`` keeps the adapter tensors as compiled (the method's init)."""
    cm = compile_model(arch, rules, make=make)
    cm.initial_state = cm.adapter_state_dict()
    if randomizer is not None:
        randomizer(cm)
    return cm


def compiled_fixture(arch: str, rules: list, **kwargs: Any) -> Any:
    """A module-scoped fixture giving :func:`compile_randomized` (``arch``, ``rules``, ``kwargs``),
    compiled once per test file on first use. Bind it to the fixture's name::

        llama = compiled_fixture("llama", [gp.VeRA(targets=["q_proj"], r=4)])
    """

    @pytest.fixture(scope="module")
    def fixture() -> gp.CompiledModel:
        return compile_randomized(arch, rules, **kwargs)

    return fixture


#: the tiny Llama's attention query and value projections and MLP down-projection (a common plan)
QVD = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def llama_paths(*kinds: str) -> list[str]:
    """The tiny Llama's module paths ``model.layers.<i>.<kind>``, layer by layer."""
    return [f"model.layers.{i}.{kind}" for i in (0, 1) for kind in kinds]


def weight_out_in(module: torch.nn.Module, t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``t`` (the module's weight unless given, or a tensor of its shape such as its gradient)
    as (out, in): GPT-2's Conv1D stores its weight (in, out)."""
    t = module.weight if t is None else t
    return t.T if type(module).__name__ == "Conv1D" else t


def created_ops(cm: gp.CompiledModel, adapter: str) -> list[str]:
    """Names of the aten ops a pass created for one adapter, in graph order."""
    return [n.target._opname if hasattr(n.target, "_opname") else str(n.target)
            for n in iter_created(cm.graph_module, adapter) if n.op == "call_function"]


def check_structure(cm: gp.CompiledModel, paths: list[str], pass_name: str, rule_name: str) -> None:
    """The plan adapted exactly ``paths`` (one ``+`` line each in ``explain()``), and every created
    node carries the pass, the rule and its layer (:func:`check_provenance`)."""
    assert sorted(cm.adapters()) == sorted(paths)
    assert sum(line.startswith("  + ") for line in cm.explain().splitlines()) == len(paths)
    check_provenance(cm, pass_name, rule_name)


def check_provenance(cm: gp.CompiledModel, pass_name: str, rule_name: str) -> None:
    """Every created node names the pass, the rule and the layer it adapts (its adapter id)."""
    per_adapter = collections.Counter()
    for node in cm.graph_module.graph.nodes:
        prov = node.meta.get(META_KEY)
        if not prov:
            continue
        assert prov["pass_name"] == pass_name, (node.name, prov)
        assert prov["rule"] == rule_name, (node.name, prov)
        assert prov["origin"] == prov["adapter"] and prov["origin"] in cm.adapters(), (node.name, prov)
        assert "nn_module_stack" in node.meta, node.name
        per_adapter[prov["adapter"]] += 1
    assert set(per_adapter) == set(cm.adapters())


def check_weight_join(cm: gp.CompiledModel, path: str) -> Any:
    """A weight-form adapter (the pass builds the adapted weight beside W): the layer's one
    linear op reads the adapter's join node, the adapted weight, in place of W. Returns the join."""
    nodes = {n.name: n for n in cm.graph_module.graph.nodes}
    join = nodes[cm.adapters()[path]["join"]]
    (op,) = join.users
    assert op.target == torch.ops.aten.linear.default and op.args[1] is join, (path, op.format_node())
    return join


def peft_model(arch: str, config: Any, cm: gp.CompiledModel, extra: Optional[dict] = None) -> torch.nn.Module:
    """A peft model of the same base weights holding cm's adapter tensors (plus ``extra``:
    tensors under full peft keys, e.g. VeRA's shared projections)."""
    from peft import get_peft_model, set_peft_model_state_dict

    make, _ = MODELS[arch]
    pm = get_peft_model(make(), config)
    state = {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()}
    state.update(extra or {})
    result = set_peft_model_state_dict(pm, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return pm.eval()


def check_merge(cm: gp.CompiledModel, arch: str, atol: float = 1e-5) -> gp.CompiledModel:
    """Merging folds every adapter: base op count, same outputs, no adapter tensor left."""
    merged = cm.merge()
    assert op_count(merged.graph_module) == cm.base_op_count
    assert not merged.adapters() and not merged.trainable_parameters()
    assert not any(r in (gp.Role.ADAPTER, gp.Role.ADAPTER_CONST) for r in merged.roles().values())
    with torch.no_grad():
        diff = (run(merged, arch) - run(cm, arch)).abs().max().item()
    assert diff < atol, diff
    return merged


def merged_weight_error(cm: gp.CompiledModel, merged: gp.CompiledModel,
                        delta: Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]) -> float:
    """The largest abs difference between an adapted weight of ``merged`` and W + ΔW, in float64:
    ``delta(t, rec)`` gives ΔW as (out, in) from the adapter's tensors ``t`` (float64, by role:
    ``rec["tensors"]``) and its record (transposed here for layers storing W as (in, out))."""
    worst = 0.0
    for rec in cm.adapters().values():
        t = {k: get_tensor(cm.graph_module, v).detach().double() for k, v in rec["tensors"].items()}
        d = delta(t, rec)
        expected = get_tensor(cm.graph_module, rec["weight"]).detach().double() + (d.T if rec["fan_in_fan_out"] else d)
        worst = max(worst, float((get_tensor(merged.graph_module, rec["weight"]).double() - expected).abs().max()))
    return worst


def check_onnx(cm: gp.CompiledModel, path: str, merged: bool, atol: float = 1e-4) -> float:
    """Export, run in onnxruntime, compare every output with torch; returns the max diff."""
    from graphpeft.backends.onnx import OnnxRunner, max_abs_diff

    model = cm.merge() if merged else cm
    # model is already what to export; the graph is translated directly (no re-trace)
    model.export_onnx(path, merged=False)
    model.eval()
    with torch.no_grad():
        expected = list(model.graph_module(*cm.example_inputs))
    got = OnnxRunner(path).run(cm.example_inputs)
    diff = max_abs_diff(got, expected)
    assert diff < atol, diff
    return diff


def check_onnx_merged_and_unmerged(cm: gp.CompiledModel, tmp_path: Path, parity: Any, name: str) -> None:
    """:func:`check_onnx` of ``cm`` as it is and merged, recorded as ``"<name> onnxruntime
    unmerged"`` / ``"... merged"`` (name: ``"<method> <arch>"``)."""
    parity.record(f"{name} onnxruntime unmerged", check_onnx(cm, str(tmp_path / "model.onnx"), merged=False))
    parity.record(f"{name} onnxruntime merged", check_onnx(cm, str(tmp_path / "merged.onnx"), merged=True))


def lm_loss(cm: gp.CompiledModel, arch: str) -> torch.Tensor:
    """Next-token cross-entropy on the test batch (what ``"causal_lm"`` computes)."""
    out = run(cm, arch)
    return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), IDS[:, 1:].reshape(-1))


def _param_diffs(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, float]:
    """The max abs difference over tensors, and the same with each tensor's difference divided
    by max(1, max |expected tensor|)."""
    assert set(got) == set(expected)
    diffs = [((got[k] - t).abs().max(), t.abs().max().clamp_min(1.0)) for k, t in expected.items()]
    return max(float(d) for d, _ in diffs), max(float(d / m) for d, m in diffs)


@dataclasses.dataclass
class TrainingRun:
    """What :func:`check_training_export` measured."""

    step: Any  #: the compiled training step (a ``TrainingStep``)
    torch_losses: list[float]  #: the loss of every torch step
    ort_losses: list[float]  #: onnxruntime's losses, the first ``compared`` steps
    loss_diff: float  #: max |onnxruntime - torch| over those losses
    param_diff: float  #: max abs difference of the trained tensors after the compared steps
    param_rel_diff: float  #: the same, each tensor's divided by max(1, its max |value|)
    trained: dict[str, torch.Tensor]  #: torch's adapter tensors after the compared steps
    ort_trained: dict[str, torch.Tensor]  #: onnxruntime's, after the same steps
    final: dict[str, torch.Tensor]  #: torch's adapter tensors after all the steps

    def record(self, parity: Any, name: str, relative: bool = True) -> tuple[float, float]:
        """Record the usual figures as ``"<name> train ..."`` (name: ``"<method> <arch>"``): the
        first and last torch loss, and onnxruntime vs torch for the loss and the parameters
        (relative, or absolute); returns those two differences."""
        parity.record(f"{name} train loss first", self.torch_losses[0])
        parity.record(f"{name} train loss last", self.torch_losses[-1])
        kind, params = ("params, rel", self.param_rel_diff) if relative else ("params", self.param_diff)
        return (parity.record(f"{name} train onnxruntime vs torch (loss)", self.loss_diff),
                parity.record(f"{name} train onnxruntime vs torch ({kind})", params))


def fx_graph_of(build: Callable[..., Any], *examples: torch.Tensor, part: str = "forward") -> Any:
    """An fx graph of aten ops with fake values and provenance, as the step compiler makes them."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(build, tracing_mode="fake")(*examples)
    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.meta[META_KEY] = {"pass_name": "test", "part": part}
    return gm


def check_step_in_onnxruntime(cm: gp.CompiledModel, step: Any, batch: torch.Tensor, tmp_path: Path,
                              steps: int = 2) -> None:
    """``step``'s ONNX export run by ``OnnxTrainer`` beside the torch step: the same losses and
    adapter tensors after ``steps`` steps."""
    from graphpeft.backends.onnx import OnnxTrainer

    step.export_onnx(tmp_path / "train.onnx")
    trainer = OnnxTrainer(tmp_path / "train.onnx")
    for _ in range(steps):
        torch.testing.assert_close(torch.as_tensor(trainer.step(batch)), step(batch).detach(), rtol=1e-5, atol=1e-5)
    ours, theirs = cm.adapter_state_dict(), trainer.adapter_state_dict()
    for k in ours:
        torch.testing.assert_close(torch.as_tensor(theirs[k]), ours[k], rtol=1e-4, atol=1e-5)


def check_training_export(cm: gp.CompiledModel, optimizer: Optional[Any], tmp_path: Path, steps: int = 8,
                          compared: int = 3, *, step: Any = None, start: Optional[dict[str, torch.Tensor]] = None,
                          lockstep: bool = False, **options: Any) -> TrainingRun:
    """Run ``cm``'s compiled training step in torch and its ONNX export in onnxruntime, from the
    same state, on the test batch; return the losses and differences (:class:`TrainingRun`).

    The step (next-token loss, ``optimizer``; or ``step``, an already compiled one, as it is,
    optimizer state included) is compiled with ``example_batch`` and ``options`` (the verifier
    runs after every training pass unless ``verify=False``), checked to train exactly
    ``cm.trainable_parameters()``, and exported to ``tmp_path / "train.onnx"`` (the file holds the
    current tensors: ``start``, when given, is loaded first). Torch then runs ``steps`` steps;
    ``OnnxTrainer`` runs the first ``compared`` of them, either free-running from the exported
    state, or with ``lockstep`` each from torch's state before that step (for methods whose
    trajectories may part over steps, e.g. routing near a top-k tie). The differences are taken
    after the compared steps (lockstep: the largest over them).

    Compare few steps with AdamW: its early updates are ``lr·sign(g)``-like, so a gradient entry
    near zero whose sign differs in the last float32 bit moves its parameter by up to ``2·lr``
    and the runs drift apart. ``cm``'s adapter tensors are restored afterwards.
    """
    from graphpeft.backends.onnx import OnnxTrainer

    assert 1 <= compared <= steps
    saved = cm.adapter_state_dict()
    try:
        if start is not None:
            cm.load_adapter_state_dict(start)
        if step is None:
            step = cm.compile_training("causal_lm", optimizer, example_batch=(IDS,), **options)
        assert set(step.signature.params) == set(cm.trainable_parameters())
        path = tmp_path / "train.onnx"
        step.export_onnx(path)
        trainer = OnnxTrainer(path)
        torch_losses: list[float] = []
        ort_losses: list[float] = []
        param_diff = param_rel_diff = 0.0
        for i in range(steps):
            if lockstep and i < compared:
                trainer.load_state_dict(step.state_dict())
                ort_losses.append(float(trainer.step(IDS)))
            torch_losses.append(float(step(IDS)))
            if lockstep and i < compared:
                d, rel = _param_diffs(trainer.adapter_state_dict(), cm.adapter_state_dict())
                param_diff, param_rel_diff = max(param_diff, d), max(param_rel_diff, rel)
            if i + 1 == compared:
                trained = cm.adapter_state_dict()
        if not lockstep:
            ort_losses = [float(trainer.step(IDS)) for _ in range(compared)]
            param_diff, param_rel_diff = _param_diffs(trainer.adapter_state_dict(), trained)
        loss_diff = max(abs(a - b) for a, b in zip(ort_losses, torch_losses))
        return TrainingRun(step, torch_losses, ort_losses, loss_diff, param_diff, param_rel_diff, trained,
                           trainer.adapter_state_dict(), cm.adapter_state_dict())
    finally:
        cm.load_adapter_state_dict(saved)


def assert_loss_falls(losses: list[float], by: float = 0.1) -> None:
    """The loss fell steadily: the last is ``by`` below the first and below every early one."""
    assert losses[-1] < losses[0] - by, losses
    assert losses[-1] < min(losses[:3]), losses
