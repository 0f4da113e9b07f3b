"""``make demo`` end to end (quick mode): the loss falls, ONNX matches torch, files are written."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_demo():
    spec = importlib.util.spec_from_file_location("graphpeft_demo", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_demo_quick(tmp_path: Path, capsys) -> None:
    demo = _load_demo()
    report = demo.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out

    # training worked: the loss fell by more than half and the task was learned
    assert len(report.losses) == 30
    assert report.loss_fell, report.losses
    assert report.losses[-1] < 0.5 * report.losses[0]
    assert report.acc_after > max(0.5, report.acc_before + 0.3), (report.acc_before, report.acc_after)

    # parity: merged == unmerged in torch, and onnxruntime == torch for both exports
    assert set(report.parity) == {"torch merged vs unmerged", "onnxruntime merged vs torch",
                                  "onnxruntime unmerged vs torch", "ORT train step adapters vs torch (rel)"}
    # the training step exported to ONNX trains in onnxruntime exactly like the compiled torch step
    t = report.extra["onnx_train"]
    assert len(t["torch"]) == len(t["onnxruntime"]) == 5
    for a, b in zip(t["torch"], t["onnxruntime"]):
        assert abs(a - b) <= 1e-4 * max(abs(a), 1e-3)
    assert report.parity_ok, report.parity
    assert all(v < demo.parity_tol(k) for k, v in report.parity.items())

    # merge restores the base graph; only the adapters train
    assert report.ops["merged"] == report.ops["base"] < report.ops["adapted"]
    assert 0 < report.trainable < 0.1 * report.total
    assert len(report.matched) == 6

    for name in ("merged.onnx", "unmerged.onnx", "train_step.onnx", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (tmp_path / name).is_file(), name
        assert report.files[name] == (tmp_path / name).stat().st_size
    assert report.ok
    for heading in ("trainable parameters", "matched layers", "loss (30 steps)", "parity", "timings", "result: OK"):
        assert heading in out
