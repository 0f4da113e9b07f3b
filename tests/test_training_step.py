"""The training step's options and lifecycle: gradient accumulation, clipping, the nll_loss
trap, checkpoints, external data, state dicts, shape changes and typed errors."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import graphpeft as gp
from graphpeft.backends.onnx import OnnxTrainer
from graphpeft.errors import ExportError, GraphPeftError, PlanError

from models import tiny_llama, token_batch

IDS = token_batch()
_CACHE: dict[str, Any] = {}


def cm() -> gp.CompiledModel:
    if "cm" not in _CACHE:
        _CACHE["cm"] = gp.compile(tiny_llama(), gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random")]),
                                  (IDS,), {"use_cache": False})
        _CACHE["init"] = _CACHE["cm"].adapter_state_dict()
    return _CACHE["cm"]


@pytest.fixture
def model() -> gp.CompiledModel:
    m = cm()
    m.load_adapter_state_dict(_CACHE["init"])
    yield m
    m.load_adapter_state_dict(_CACHE["init"])


def exported(tmp_path: Any, name: str = "adamw") -> tuple[Any, Any]:
    """An AdamW step of the model exported once per test session (from the initial adapters)."""
    key = f"onnx_{name}"
    if key not in _CACHE:
        m = cm()
        m.load_adapter_state_dict(_CACHE["init"])
        step = m.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3, weight_decay=0.1), example_batch=(IDS,))
        folder = tmp_path.parent / "shared_training_export"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.onnx"
        step.export_onnx(path)
        _CACHE[key] = (step, path)
    return _CACHE[key]


def rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)


def test_gradient_accumulation_equals_the_big_batch(model: gp.CompiledModel) -> None:
    ids = token_batch(batch=4, seed=5)
    labels = ids.clone()
    labels[0, :5] = -100  # ignored tokens only in the first micro-batch: micro-batches weigh differently
    labels[1, 2] = -100
    results = []
    for k in (1, 2):
        model.load_adapter_state_dict(_CACHE["init"])
        step = model.compile_training("causal_lm", gp.optim.SGD(lr=0.5, momentum=0.9), accumulation_steps=k,
                                      example_batch=(ids, labels))
        losses = [float(step(ids, labels)) for _ in range(3)]
        results.append((losses, model.adapter_state_dict()))
    (l1, p1), (l2, p2) = results
    assert max(abs(a - b) / abs(a) for a, b in zip(l1, l2)) < 1e-5
    assert rel(p2, p1) < 1e-5
    assert rel(p1, _CACHE["init"]) > 1e-3  # it trained


def test_gradient_clipping_matches_torch(model: gp.CompiledModel) -> None:
    max_norm = 0.05
    opt = gp.optim.SGD(lr=0.5, momentum=0.9)
    params = model.trainable_parameters()
    torch_opt = opt.torch_optimizer(params.values())
    norms = []
    for _ in range(3):
        torch_opt.zero_grad()
        logits = model(IDS).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)))
        torch_opt.step()
    eager = model.adapter_state_dict()
    for p in params.values():
        p.grad = None
    assert min(norms) > max_norm  # clipping was active on every step
    model.load_adapter_state_dict(_CACHE["init"])
    step = model.compile_training("causal_lm", opt, clip_grad_norm=max_norm)
    for _ in range(3):
        step(IDS)
    assert rel(model.adapter_state_dict(), eager) < 1e-4
    assert any(gp.training.phase_of(n) == "clip" for n in step.graph_module.graph.nodes)


def test_nll_loss_trap_mean_cross_entropy_gradients_in_onnxruntime(model: gp.CompiledModel, tmp_path: Any) -> None:
    """Mean cross-entropy over a batch > 1 (a user loss calling F.cross_entropy): the ONNX
    gradients equal torch's, not N times them (the exporter's nll_loss total_weight=1 trap)."""
    labels = token_batch(seed=9)

    def mean_ce(out: Any, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1))

    logits = model(IDS).logits
    mean_ce(type("O", (), {"logits": logits})(), labels).backward()
    grads = {k: p.grad.detach().clone() for k, p in model.trainable_parameters().items()}
    for p in model.trainable_parameters().values():
        p.grad = None
    step = model.compile_training(mean_ce, gp.optim.SGD(lr=1.0), example_batch=(IDS, labels))
    step.export_onnx(tmp_path / "ce.onnx")
    trainer = OnnxTrainer(tmp_path / "ce.onnx")
    trainer.step(IDS, labels)
    after = trainer.adapter_state_dict()
    ort_grads = {k: _CACHE["init"][k] - after[k] for k in after}  # SGD, lr 1: the update is the gradient
    assert rel(ort_grads, grads) < 1e-4
    assert not any("nll_loss" in str(n.target) for n in step.graph_module.graph.nodes)


def test_checkpoint_resume_gives_the_same_trajectory(tmp_path: Any) -> None:
    _, path = exported(tmp_path)
    straight = OnnxTrainer(path)
    losses = [straight.step(IDS) for _ in range(5)]
    first = OnnxTrainer(path)
    for _ in range(2):
        first.step(IDS)
    ckpt = tmp_path / "ckpt" / "state.safetensors"
    first.save_checkpoint(ckpt)
    assert os.path.isfile(ckpt) and not [f for f in os.listdir(ckpt.parent) if f.endswith(".tmp")]
    resumed = OnnxTrainer.resume(path, ckpt)
    assert resumed.steps == 2
    resumed_losses = [resumed.step(IDS) for _ in range(3)]
    assert resumed_losses == losses[2:]
    a, b = resumed.state_dict(), straight.state_dict()
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert all(torch.equal(a["optimizer"][k], b["optimizer"][k]) for k in a["optimizer"])
    assert float(a["optimizer"]["step"]) == 5.0


def test_torch_step_and_onnx_trainer_share_checkpoints(model: gp.CompiledModel, tmp_path: Any) -> None:
    step, path = exported(tmp_path)
    step.load_state_dict({"params": _CACHE["init"], "optimizer": step.optimizer.init_state(_CACHE["init"]),
                          "lr": 1e-3})
    for _ in range(2):
        step(IDS)
    step.save_checkpoint(tmp_path / "torch.safetensors")
    trainer = OnnxTrainer(path)
    trainer.load_checkpoint(tmp_path / "torch.safetensors")
    ort_loss = trainer.step(IDS)
    torch_loss = float(step(IDS))
    assert abs(ort_loss - torch_loss) / torch_loss < 1e-5
    assert rel(trainer.adapter_state_dict(), model.adapter_state_dict()) < 1e-4
    # and back: the torch step resumes from the trainer's state
    step.load_state_dict(trainer.state_dict())
    assert rel(model.adapter_state_dict(), trainer.adapter_state_dict()) == 0.0


def test_checkpoint_for_another_step_is_refused(tmp_path: Any) -> None:
    _, path = exported(tmp_path)
    trainer = OnnxTrainer(path)
    state = trainer.state_dict()
    state["optimizer"] = {k: v for k, v in state["optimizer"].items() if not k.endswith("exp_avg_sq")}
    with pytest.raises(GraphPeftError, match="nothing was loaded"):
        trainer.load_state_dict(state)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(GraphPeftError, match="corrupted"):
        trainer.load_checkpoint(bad)


def test_io_binding_and_plain_runs_agree(tmp_path: Any) -> None:
    _, path = exported(tmp_path)
    bound, plain = OnnxTrainer(path), OnnxTrainer(path, io_binding=False)
    assert [bound.step(IDS) for _ in range(3)] == [plain.step(IDS) for _ in range(3)]
    assert rel(bound.adapter_state_dict(), plain.adapter_state_dict()) == 0.0
    plain.lr = 0.0  # lr is an input: a schedule can change it
    before = plain.adapter_state_dict()
    plain.step(IDS)
    after = plain.adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_external_data_export(tmp_path: Any) -> None:
    step, inline_path = exported(tmp_path)
    state = step.state_dict()
    step.load_state_dict({"params": _CACHE["init"], "optimizer": step.optimizer.init_state(_CACHE["init"]),
                          "lr": 1e-3})
    try:
        first = step.export_onnx(tmp_path / "ext.onnx", external_data=True)
        assert first.data_path and os.path.isfile(first.data_path)
        second = step.export_onnx(tmp_path / "ext.onnx", external_data=True)  # re-export replaces atomically
    finally:
        step.load_state_dict(state)
    assert not os.path.exists(first.data_path) and os.path.isfile(second.data_path)
    assert os.path.getsize(tmp_path / "ext.onnx") < os.path.getsize(inline_path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    a, b = OnnxTrainer(inline_path), OnnxTrainer(second.path)
    assert a.step(IDS) == b.step(IDS)
    assert second.input_names[0].startswith("param/") and "lr" in second.input_names
    assert second.output_names[0] == "loss"


def test_new_batch_shape_compiles_a_second_graph(model: gp.CompiledModel) -> None:
    step = model.compile_training("causal_lm", gp.optim.SGD(lr=0.1))  # compiled for the example inputs
    assert len(step._graphs) == 1
    step(IDS)
    first = step.graph_module
    step(token_batch(batch=2, seq=6))
    assert step.graph_module is first and len(step._graphs) == 2


def test_memory_report_and_repr(model: gp.CompiledModel) -> None:
    step = model.compile_training("causal_lm", gp.optim.AdamW(), example_batch=(IDS,))
    report = step.memory_report()
    assert report.peak_bytes > 0 and "MiB" in str(report)
    assert "adamw" in repr(step) and "timings" not in repr(step)
    assert step.timings["trace"] > 0 and any(k.startswith("pass:reorder_updates") for k in step.timings)


def test_typed_errors(model: gp.CompiledModel, tmp_path: Any) -> None:
    with pytest.raises(PlanError, match="unknown loss"):
        model.compile_training("hinge", gp.optim.SGD())
    with pytest.raises(PlanError, match="unknown training option"):
        model.compile_training("causal_lm", gp.optim.SGD(), accumulate=2)
    with pytest.raises(PlanError, match="must divide the batch"):
        model.compile_training("causal_lm", gp.optim.SGD(), accumulation_steps=3, example_batch=(IDS,))
    with pytest.raises(PlanError, match="optimizer must be"):
        model.compile_training("causal_lm", 0.1)
    with pytest.raises(PlanError, match="betas"):
        gp.optim.AdamW(betas=(1.5, 0.9))
    with pytest.raises(PlanError, match="scalar"):
        model.compile_training(lambda out: out.logits, gp.optim.SGD(), example_batch=(IDS,))
    with pytest.raises(GraphPeftError, match="not compiled yet"):  # a user loss: compiled at the first call
        model.compile_training(lambda out, labels: out.logits.mean(), gp.optim.SGD()).graph_module
    with pytest.raises(ExportError, match="does not exist"):
        OnnxTrainer(tmp_path / "missing.onnx")
    _, path = exported(tmp_path)
    trainer = OnnxTrainer(path)
    with pytest.raises(ExportError, match="shapes it was exported for"):
        trainer.step(token_batch(seq=6))
    with pytest.raises(ExportError, match="batch tensors"):
        trainer.step(IDS, IDS)
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])),
              tmp_path / "inference.onnx")
    with pytest.raises(ExportError, match="not a graphpeft training step"):
        OnnxTrainer(tmp_path / "inference.onnx")


def test_optimizers_match_torch_optim_on_plain_tensors() -> None:
    """The functional optimizers against torch.optim on random tensors (no model involved)."""
    g = torch.Generator().manual_seed(0)
    for opt in (gp.optim.SGD(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
                gp.optim.SGD(lr=0.1, momentum=0.9, nesterov=True),
                gp.optim.AdamW(lr=1e-2, weight_decay=0.1), gp.optim.AdamW(lr=1e-2, amsgrad=True)):
        p0 = torch.randn(5, 3, generator=g)
        grads = [torch.randn(5, 3, generator=g) for _ in range(4)]
        ref = torch.nn.Parameter(p0.clone())
        torch_opt = opt.torch_optimizer([ref])
        params, state = {"w": p0.clone()}, opt.init_state({"w": p0})
        for gr in grads:
            ref.grad = gr.clone()
            torch_opt.step()
            params, state = opt.update(params, {"w": gr}, state, torch.tensor(opt.lr))
        torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-5, atol=1e-6)
        assert float(state["step"]) == 4.0


def _mlp_step(executor: Any) -> tuple[list[float], dict[str, torch.Tensor], Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["0", "2"], r=2, init="random")]), (x,))
    step = cm.compile_training("cross_entropy", gp.optim.SGD(lr=0.1, momentum=0.9), executor=executor)
    losses = [float(step(x, y)) for _ in range(3)]
    return losses, cm.adapter_state_dict(), step


def test_executor_runs_the_step_graph() -> None:
    calls = []

    def traced(gm: torch.fx.GraphModule) -> Any:
        calls.append(gm)
        return gm

    ref_losses, ref, _ = _mlp_step(None)
    losses, got, step = _mlp_step(traced)
    assert calls == [step.graph_module]  # built once per batch shape, then reused
    assert losses == ref_losses and all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(PlanError, match="executor must be one of"):
        _mlp_step("tvm")


def test_inductor_executor_matches_the_plain_graph() -> None:
    import shutil

    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    ref_losses, ref, _ = _mlp_step(None)
    losses, got, _ = _mlp_step("inductor")
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-5
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-5
