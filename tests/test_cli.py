"""The command line: ``graphpeft plan validate``, ``graphpeft adapter inspect``, ``graphpeft version``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import graphpeft as gp
from graphpeft.cli import main
from models import tiny_llama, token_batch

REPO = Path(__file__).resolve().parent.parent


def test_version(capsys) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"graphpeft {gp.__version__}"


def test_usage_errors_exit_2(capsys) -> None:
    assert main([]) == 2
    assert main(["plan"]) == 2
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# --- plan validate ----------------------------------------------------------------------------


def test_plan_validate_example_yaml(capsys) -> None:
    assert main(["plan", "validate", str(REPO / "examples" / "plan.yaml")]) == 0
    out = capsys.readouterr().out
    normalized = gp.Plan.from_dict(yaml.safe_load(out))
    assert normalized == gp.Plan.from_yaml(str(REPO / "examples" / "plan.yaml"))
    assert [r.key for r in normalized.rules] == ["lora", "lora"]


def test_plan_validate_normalizes_json(tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"rules": [{"lora": {"targets": ["q_proj"], "r": 8, "alpha": 16}}]}))
    assert main(["plan", "validate", str(plan), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # version filled in, default r=8 dropped, alpha kept
    assert data == {"version": 1, "rules": [{"lora": {"targets": ["q_proj"], "alpha": 16}}]}


@pytest.mark.parametrize("text, message", [
    ("rules:\n  - lora: {targets: [q_proj], alpah: 8}\n", "did you mean 'alpha'"),
    ("rules:\n  - loar: {targets: [q_proj]}\n", "unknown method 'loar'"),
    ("rules:\n  - lora: {targets: [q_proj], r: 0}\n", "r must be a positive integer"),
    ("rules:\n  - lora: {targets: '(unclosed'}\n", "not a valid regular expression"),
    ("rules: []\n", "the plan has no rules"),
    ("rules: [lora: {targets: [q]}\n", "not valid YAML"),
])
def test_plan_validate_rejects_bad_plans(tmp_path: Path, capsys, text: str, message: str) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    assert main(["plan", "validate", str(plan)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("graphpeft: error: invalid plan")
    assert message in captured.err


def test_plan_validate_missing_file(tmp_path: Path, capsys) -> None:
    assert main(["plan", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_entry_point_subprocess(tmp_path: Path) -> None:
    plan = tmp_path / "bad.yaml"
    plan.write_text("rules:\n  - lora: {targets: [q_proj], rnak: 4}\n")
    proc = subprocess.run([sys.executable, "-m", "graphpeft.cli", "plan", "validate", str(plan)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown option(s) 'rnak'" in proc.stderr


# --- adapter inspect --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory) -> tuple[Path, dict]:
    model = tiny_llama()
    ids = token_batch()
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=4)]), example_inputs=(ids,),
                    example_kwargs={"use_cache": False})
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    cm.save_adapter(folder)
    return folder, {k: tuple(v.shape) for k, v in cm.adapter_state_dict().items()}


def test_adapter_inspect(saved_adapter, capsys) -> None:
    folder, shapes = saved_adapter
    assert main(["adapter", "inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "format: graphpeft-adapter v1" in out
    assert f"tensors: {len(shapes)}" in out
    assert "adapters: 4" in out  # 2 layers x (q_proj, v_proj)
    for name, shape in shapes.items():
        line = next(l for l in out.splitlines() if l.strip().startswith(name + " "))
        assert str(list(shape)) in line and "float32" in line
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in shapes
    assert "lora:" in out and "q_proj" in out  # the plan is shown


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_adapter_inspect_corrupted_weights(saved_adapter, tmp_path: Path, capsys) -> None:
    bad = _copy(saved_adapter[0], tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["adapter", "inspect", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "checksum differs" in captured.err and captured.out == ""


def test_adapter_inspect_corrupted_config(saved_adapter, tmp_path: Path, capsys) -> None:
    bad = _copy(saved_adapter[0], tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    assert main(["adapter", "inspect", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_adapter_inspect_missing(tmp_path: Path, capsys) -> None:
    assert main(["adapter", "inspect", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["adapter", "inspect", str(empty)]) == 2
    assert "does not exist" in capsys.readouterr().err
    os.rmdir(empty)
