"""One ONNX file for every adapter of the same shapes (issue 6): an unmerged export whose adapter
tensors (trainable ones and constants: SHiRA's indices) are graph inputs. Exported once, then
run in onnxruntime with two different adapters' tensors, each matching torch with that adapter
active; the file holds no adapter weights. One export only (they cost seconds).
"""

from __future__ import annotations

import onnx
import pytest
import torch

import graphpeft as gp
from graphpeft.backends.onnx import OnnxRunner, max_abs_diff

from method_helpers import compile_model
from models import token_batch

# one adapter mixing a float-only method and one with integer constants (SHiRA's indices)
PLAN = [gp.LoRA(targets=["q_proj"], r=4, alpha=8, init="random"), gp.SHiRA(targets=["v_proj"], r=2, init="random")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cm = compile_model("llama", PLAN)
    # a second adapter of the same shapes: other values and other SHiRA masks (another seed)
    cm.add_adapter("other", PLAN, seed=5)
    gen = torch.Generator().manual_seed(3)
    state = cm.adapter_state_dict("other")
    cm.load_adapter_state_dict({k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in state.items()},
                               adapter_name="other")
    cm.eval()
    path = tmp_path_factory.mktemp("onnx") / "adapters_as_inputs.onnx"
    result = cm.export_onnx(path, merged=False, adapters_as_inputs=True)
    return cm, result, OnnxRunner(path)


def run_torch(cm, name, ids):
    cm.set_adapter(name)
    try:
        with torch.no_grad():
            return list(cm.graph_module(*cm.flat_inputs(ids, use_cache=False)))
    finally:
        cm.set_adapter("default")


def feed(cm, result, name, ids):
    state = cm.adapter_state_dict(name, include_constants=True)
    return list(cm.flat_inputs(ids, use_cache=False)) + [state[k] for k in result.adapter_inputs]


def test_adapter_tensors_are_inputs_not_weights(exported):
    cm, result, runner = exported
    keys = set(cm.adapter_state_dict("default", include_constants=True))
    assert sorted(result.adapter_inputs) == sorted(keys) and len(keys) == 8  # 2 x (A, B) + 2 x (values, indices)
    assert runner.input_names == ["input_ids", *result.adapter_inputs]
    proto = onnx.load(result.path, load_external_data=False)
    weights = {i.name for i in proto.graph.initializer}
    assert not any("lora_" in w or "shira_" in w for w in weights)
    kinds = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert kinds["model.layers.0.self_attn.v_proj.shira_indices"] == onnx.TensorProto.INT64


@pytest.mark.parametrize("name", ["default", "other"])
def test_one_file_runs_each_adapter(exported, name, parity):
    cm, result, runner = exported
    for batch, seq in ((2, 8), (3, 5)):  # the model's input dimensions stay dynamic
        ids = token_batch(batch=batch, seq=seq)
        got = runner.run(feed(cm, result, name, ids))
        d = max_abs_diff(got, run_torch(cm, name, ids))
        assert d < 1e-4, (batch, seq, d)
    parity.record(f"adapters-as-inputs onnxruntime, adapter {name!r}", d)
    other = "other" if name == "default" else "default"
    assert max_abs_diff(got, run_torch(cm, other, ids)) > 1e-3  # the fed tensors really decide


def test_merged_export_has_no_adapter_inputs(exported, tmp_path):
    cm, _, _ = exported
    with pytest.raises(gp.ExportError, match="merged=False"):
        cm.export_onnx(tmp_path / "m.onnx", merged=True, adapters_as_inputs=True)
