"""``graphpeft export``: a transformers folder or module:factory, compiled with a plan, exported
for onnx / ort / executorch (inference and a training step), run there and compared with torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from graphpeft.cli import main
from models import tiny_llama

PLAN = {"version": 1, "rules": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}}]}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture()
def plan_file(tmp_path: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(PLAN))
    return path


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_export_onnx_with_training_step(llama_folder: Path, plan_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["export", str(llama_folder), "--plan", str(plan_file), "--target", "onnx", "--train",
                 "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "model.onnx" in table and "train_step.onnx" in table
    rows = {r["file"]: r for r in _summary(out)["files"]}
    assert rows["model.onnx"]["parity"] <= 1e-4
    assert rows["train_step.onnx"]["parity"] <= 1e-4  # no dropout: the losses agree exactly
    assert (out / "model.onnx").stat().st_mode & 0o044  # readable by others, like any written file
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left


def test_export_ort_unmerged(llama_folder: Path, plan_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["export", str(llama_folder), "--plan", str(plan_file), "--target", "ort", "--unmerged",
                 "--out", str(out), "--quiet"]) == 0
    summary = _summary(out)
    rows = {r["file"]: r for r in summary["files"]}
    assert summary["merged"] is False
    assert rows["model.ort"]["parity"] <= 1e-4


def test_export_executorch_from_factory(tmp_path: Path, plan_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("executorch")
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def mlp():\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
        "    return m, (torch.randn(2, 8),)\n")
    plan = tmp_path / "mlp.yaml"
    plan.write_text(yaml.safe_dump({"rules": [{"lora": {"targets": ["0", "2"], "r": 2}}]}))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    # inference only: the .pte training step's parity is tests/test_executorch_backend.py's (slow) job
    assert main(["export", "my_models:mlp", "--plan", str(plan), "--target", "executorch", "--unmerged",
                 "--out", str(out), "--quiet"]) == 0
    rows = {r["file"]: r for r in _summary(out)["files"]}
    assert rows["model.pte"]["parity"] <= 1e-5
    sys.modules.pop("my_models", None)


def test_export_with_adapter_folder(llama_folder: Path, plan_file: Path, tmp_path: Path) -> None:
    import graphpeft as gp

    model = tiny_llama()
    cm = gp.compile(model, gp.Plan.from_yaml(str(plan_file)), (torch.randint(0, 128, (2, 16)),),
                    {"attention_mask": torch.ones(2, 16, dtype=torch.long), "use_cache": False})
    state = {k: torch.randn_like(v) * 0.1 for k, v in cm.adapter_state_dict().items()}
    cm.load_adapter_state_dict(state)
    cm.save_adapter(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["export", str(llama_folder), "--plan", str(plan_file), "--adapter", str(tmp_path / "adapter"),
                 "--target", "onnx", "--out", str(out), "--quiet"]) == 0
    assert _summary(out)["files"][0]["parity"] <= 1e-4


@pytest.mark.parametrize("argv, message", [
    (["MODEL", "--target", "onnx"], "neither a folder"),  # no such model
    (["FOLDER", "--target", "onnx"], "no plan"),
    (["FOLDER", "--target", "onnx", "--plan", "missing.yaml"], "plan file"),
    (["FOLDER", "--target", "onnx", "--adapter", "nowhere"], "is not a folder"),
    (["FOLDER", "--target", "onnx", "--out", "FILE"], "is a file"),
    (["nosuchmodule:factory", "--target", "onnx"], "cannot import"),
])
def test_bad_input_exits_2(argv: list, message: str, llama_folder: Path, plan_file: Path, tmp_path: Path,
                           capsys) -> None:
    (tmp_path / "FILE").write_text("x")
    argv = [str(llama_folder) if a == "FOLDER" else str(tmp_path / a) if a in ("FILE", "MODEL") else a
            for a in argv]
    if "--plan" not in argv and message != "no plan":
        argv += ["--plan", str(plan_file)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(["export", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
