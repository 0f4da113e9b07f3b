"""Non-finite steps (issue 14): a NaN/inf loss, gradient or learning rate leaves the trainable
tensors and the optimizer state unchanged, inside the graph (torch and onnxruntime), and is
counted; ``nonfinite="raise"`` raises a typed error after leaving them unchanged."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.backends.onnx import OnnxTrainer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()


X, Y = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
Y_NAN = Y.clone()
Y_NAN[0, 0] = float("nan")
X_INF = X.clone()
X_INF[1, 2] = float("inf")


def _step(optimizer=None, **options):
    cm = gp.compile(_model(), gp.Plan([gp.LoRA(targets=["0", "2"], r=2, init="random")]), (X,))
    return cm, cm.compile_training("mse", optimizer or gp.optim.AdamW(lr=1e-2), **options)


def _snapshot(step):
    return step.state_dict()


def _same(a, b):
    return (all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
            and all(torch.equal(a["optimizer"][k], b["optimizer"][k]) for k in a["optimizer"]))


@pytest.fixture(scope="module")
def adamw_step():
    cm, step = _step(accumulation_steps=2, clip_grad_norm=1.0)
    step(X, Y)
    return step


@pytest.mark.parametrize("case", ["nan_target", "inf_input", "nan_lr", "inf_lr"])
def test_nonfinite_step_is_skipped_and_counted(adamw_step, case):
    step = adamw_step
    before, skipped = _snapshot(step), step.skipped_steps
    lr = step.lr
    try:
        if case == "nan_target":
            step(X, Y_NAN)
        elif case == "inf_input":
            step(X_INF, Y)
        else:
            step.lr = float("nan") if case == "nan_lr" else float("inf")
            step(X, Y)
    finally:
        step.lr = lr
    assert step.skipped_steps == skipped + 1
    assert _same(_snapshot(step), before)
    step(X, Y)  # a finite step afterwards trains again
    assert step.skipped_steps == skipped + 1 and not _same(_snapshot(step), before)


def test_skipped_steps_do_not_change_the_trajectory():
    """NaN batches interleaved with good ones: the same parameters as the good batches alone
    (AdamW's step counter is not advanced by a skipped step)."""
    _, clean = _step()
    _, noisy = _step()
    for _ in range(3):
        clean(X, Y)
        noisy(X, Y)
        noisy(X, Y_NAN)
    assert noisy.skipped_steps == 3 and clean.skipped_steps == 0
    assert _same(_snapshot(noisy), _snapshot(clean))


def test_signature_has_the_skipped_flag(adamw_step):
    last = adamw_step.signature.outputs[-1]
    assert (last.kind, last.name, last.dtype, last.shape) == ("skipped", "skipped", "bool", [])
    assert adamw_step.signature.nonfinite == "skip"


def test_raise_option():
    _, step = _step(nonfinite="raise")
    step(X, Y)
    before = _snapshot(step)
    with pytest.raises(gp.NonFiniteError, match="left unchanged.*nonfinite='skip'"):
        step(X, Y_NAN)
    assert step.skipped_steps == 1 and _same(_snapshot(step), before)
    assert isinstance(gp.NonFiniteError("x"), gp.GraphPeftError)


def test_bad_nonfinite_option():
    with pytest.raises(gp.PlanError, match=r"nonfinite must be one of \['skip', 'raise'\]"):
        _step(nonfinite="ignore")


@pytest.mark.parametrize("io_binding", [True, False])
def test_onnxruntime_skips_and_counts(tmp_path, io_binding):
    _, step = _step(gp.optim.SGD(lr=1e-2, momentum=0.9))
    step(X, Y)
    step.export_onnx(tmp_path / "t.onnx")
    trainer = OnnxTrainer(tmp_path / "t.onnx", io_binding=io_binding)
    before = trainer.state_dict()
    trainer.step(X, Y_NAN)
    assert trainer.skipped_steps == 1 and trainer.steps == 1 and _same(trainer.state_dict(), before)
    trainer.lr = float("nan")
    trainer.step(X, Y)
    trainer.lr = step.lr
    assert trainer.skipped_steps == 2 and _same(trainer.state_dict(), before)
    for _ in range(2):  # then it trains as the torch step does
        ort, ours = trainer.step(X, Y), float(step(X, Y))
        assert abs(ort - ours) <= 1e-5 * max(1.0, abs(ours))
    assert trainer.skipped_steps == 2 and step.skipped_steps == 0


def test_onnxruntime_raise(tmp_path):
    _, step = _step(gp.optim.SGD(lr=1e-2), nonfinite="raise")
    step.export_onnx(tmp_path / "t.onnx")
    trainer = OnnxTrainer(tmp_path / "t.onnx")
    before = trainer.state_dict()
    with pytest.raises(gp.NonFiniteError):
        trainer.step(X, Y_NAN)
    assert trainer.skipped_steps == 1 and _same(trainer.state_dict(), before)


def test_executorch_skips_and_counts(tmp_path):
    pytest.importorskip("executorch")
    from graphpeft.backends.executorch import ExecuTorchTrainer

    _, step = _step(gp.optim.SGD(lr=1e-2))
    step.export_executorch(tmp_path / "t.pte")
    trainer = ExecuTorchTrainer(tmp_path / "t.pte")
    before = trainer.state_dict()
    trainer.step(X, Y_NAN)
    assert trainer.skipped_steps == 1 and _same(trainer.state_dict(), before)
    et, ours = trainer.step(X, Y), float(step(X, Y))
    assert abs(et - ours) <= 1e-5 * max(1.0, abs(ours)) and trainer.skipped_steps == 1
