"""ONNX export (issue 2, part 6): merged and ``merged=False`` files for every architecture, each
run in onnxruntime and compared with torch, at the traced shapes and at another batch size.

Structure: the merged file has the base model's matrix products; the ``merged=False`` file keeps
the adapter branch (two more MatMul/Gemm/Conv per adapter). Files are written atomically (no
temporary file is left beside them).
"""

from __future__ import annotations

import os

import onnx
import pytest
import torch

import graphpeft as gp
from graphpeft.backends.onnx import OnnxRunner, max_abs_diff

from conftest import ARCHS

NAMES = list(ARCHS)
MATMULS = {"MatMul", "Gemm", "Conv"}
ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(random_lora, tmp_path_factory):
    """(name, merged) -> (torch model that was exported, ExportResult, OnnxRunner, folder)."""
    cache: dict = {}

    def get(name: str, merged: bool):
        key = (name, merged)
        if key not in cache:
            _, _, cm = random_lora(name)
            folder = tmp_path_factory.mktemp(f"onnx_{name}_{'merged' if merged else 'unmerged'}")
            result = cm.export_onnx(folder / "model.onnx", merged=merged)
            ref = cm.merge() if merged else cm
            ref.eval()
            cache[key] = (ref, result, OnnxRunner(result.path), folder)
        return cache[key]

    return get


def torch_outputs(model, args, kwargs) -> list[torch.Tensor]:
    flat = model.flat_inputs(*args, **kwargs)
    with torch.no_grad():
        return list(model.graph_module(*flat)), flat


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("name", NAMES)
def test_onnxruntime_matches_torch(exported, random_lora, parity, name, merged):
    ref, result, runner, _ = exported(name, merged)
    _, _, cm = random_lora(name)
    args, kwargs = ARCHS[name].inputs()
    want, flat = torch_outputs(ref, args, kwargs)
    got = runner.run(flat)
    assert len(got) == len(want)
    label = "merged" if merged else "unmerged"
    assert parity.record(f"onnxruntime vs torch {name} {label}", max_abs_diff(want, got)) <= ATOL
    # the merged file also computes what the unmerged torch model computes
    unmerged, _ = torch_outputs(cm, args, kwargs)
    assert max_abs_diff(unmerged, got) <= ATOL
    # another batch size (and sequence length) through the same file
    args3, kwargs3 = ARCHS[name].inputs(batch=3, seq=5)
    want3, flat3 = torch_outputs(ref, args3, kwargs3)
    got3 = runner.run(flat3)
    assert got3[0].shape[0] == 3
    assert parity.record(f"onnxruntime vs torch {name} {label} batch 3", max_abs_diff(want3, got3)) <= ATOL


@pytest.mark.parametrize("name", NAMES)
def test_unmerged_file_keeps_the_adapter_branch(exported, random_lora, name):
    _, _, cm = random_lora(name)
    n_adapters = len(cm.adapters())
    counts = {}
    for merged in (True, False):
        _, result, runner, _ = exported(name, merged)
        proto = onnx.load(result.path)
        counts[merged] = sum(node.op_type in MATMULS for node in proto.graph.node)
        # inputs and outputs named like the model's
        assert runner.input_names == [n.name for n in cm.graph_module.graph.nodes if n.op == "placeholder"]
        assert runner.output_names == result.output_names
    # A and B per adapter, less the A projections the export fused (one MatMul per shared input)
    from graphpeft.backends.onnx.export import _lowered

    fused = [n for n in _lowered(cm.graph_module).graph.nodes
             if n.target == torch.ops.aten.cat.default
             and (n.meta.get("graphpeft") or {}).get("pass_name") == "fuse_shared_input_linears"]
    assert counts[False] == counts[True] + 2 * n_adapters - sum(len(c.args[0]) - 1 for c in fused)


def test_input_and_output_names(exported):
    _, result, runner, _ = exported("bert", True)
    assert runner.input_names == ["input_ids", "attention_mask"]
    assert runner.output_names == ["last_hidden_state", "pooler_output"]
    _, result, runner, _ = exported("llama", True)
    assert runner.input_names == ["input_ids"] and runner.output_names == ["logits"]


@pytest.mark.parametrize("name", NAMES)
def test_files_are_written_atomically(exported, name):
    for merged in (True, False):
        _, result, _, folder = exported(name, merged)
        assert sorted(os.listdir(folder)) == ["model.onnx"]  # no .tmp left behind
        assert result.path == os.fspath(folder / "model.onnx")
        assert result.bytes == os.path.getsize(result.path) > 0
        onnx.checker.check_model(result.path)


def test_failed_save_leaves_no_file(random_lora, tmp_path, monkeypatch):
    _, _, cm = random_lora("cnn")
    target = tmp_path / "model.onnx"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        cm.export_onnx(target, merged=True)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_runner_errors(exported, tmp_path):
    _, _, runner, _ = exported("bert", True)
    with pytest.raises(gp.ExportError, match=r"the graph takes 2 inputs \['input_ids', 'attention_mask'\], got 1"):
        runner.run([torch.zeros(2, 8, dtype=torch.long)])
    with pytest.raises(gp.ExportError, match="onnxruntime could not load"):
        OnnxRunner(tmp_path / "missing.onnx")


def test_external_data_file_is_renamed_and_runs(random_lora, tmp_path):
    _, _, cm = random_lora("cnn")
    result = cm.export_onnx(tmp_path / "model.onnx", merged=True, external_data=True)
    # weights beside the model under the final name (not the temporary one), nothing else left
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    args, kwargs = ARCHS["cnn"].inputs()
    want, flat = torch_outputs(cm, args, kwargs)
    assert max_abs_diff(want, OnnxRunner(result.path).run(flat)) <= ATOL
