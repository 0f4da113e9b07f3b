"""onnxruntime for mobile (issue 13): an adapters-as-inputs export converted to ORT format and
run with onnxruntime's own adapter files (``.onnx_adapter``, ``RunOptions.add_active_adapter``);
each adapter matches torch with that adapter active."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import graphpeft as gp
from graphpeft.backends.onnx.mobile import OnnxAdapterSession, read_onnx_adapter, to_ort, write_onnx_adapter

from method_helpers import compile_model
from models import token_batch


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cm = compile_model("llama", [gp.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8, init="random")])
    cm.add_adapter("other", [gp.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8, init="random")], seed=5)
    cm.eval()
    folder = tmp_path_factory.mktemp("mobile")
    result = cm.export_onnx(folder / "base.onnx", merged=False, adapters_as_inputs=True)
    return cm, result, folder


def torch_out(cm, name, ids):
    cm.set_adapter(name)
    try:
        with torch.no_grad():
            return cm.graph_module(*cm.flat_inputs(ids, use_cache=False))[0]
    finally:
        cm.set_adapter("default")


def test_ort_format_with_onnx_adapters_matches_torch(exported: Any, parity: Any) -> None:
    cm, result, folder = exported
    ort_path = to_ort(result.path, adapter_inputs=result.adapter_inputs)
    assert ort_path == str(folder / "base.ort")
    with open(ort_path, "rb") as f:
        assert f.read(8)[4:8] == b"ORTM"  # the flatbuffer identifier of ORT-format models
    session = OnnxAdapterSession(ort_path)
    ids = token_batch()
    outs = {}
    for name in ("default", "other"):
        state = cm.adapter_state_dict(name, include_constants=True)
        path = write_onnx_adapter(folder / f"{name}.onnx_adapter", {k: state[k] for k in result.adapter_inputs})
        assert set(read_onnx_adapter(path)) == set(result.adapter_inputs)
        got = session.run([ids], adapter=path)[0]
        d = float(np.abs(got - torch_out(cm, name, ids).numpy()).max())
        parity.record(f"onnxruntime .ort + .onnx_adapter {name!r} max abs", d)
        assert d < 1e-4
        outs[name] = got
    assert float(np.abs(outs["default"] - outs["other"]).max()) > 1e-3  # the adapter decides
    # no adapter active: the zero defaults make it the base model
    base = session.run([ids])[0]
    with torch.no_grad():
        state = cm.adapter_state_dict("default")
        cm.load_adapter_state_dict({k: torch.zeros_like(v) for k, v in state.items()})
        want = torch_out(cm, "default", ids).numpy()
        cm.load_adapter_state_dict(state)
    assert float(np.abs(base - want).max()) < 1e-4


def test_mobile_errors_are_typed(exported: Any, tmp_path: Any) -> None:
    _, result, _ = exported
    with pytest.raises(gp.ExportError, match="does not exist"):
        to_ort(tmp_path / "missing.onnx")
    session = OnnxAdapterSession(result.path)  # no defaults for the adapter inputs
    with pytest.raises(gp.ExportError, match="adapter must provide"):
        session.run([token_batch()])
    with pytest.raises(gp.ExportError, match="adapters_as_inputs=True"):
        to_ort(result.path, tmp_path / "x.ort", adapter_inputs=["nope"])
    with pytest.raises(gp.ExportError, match="no adapter tensors"):
        write_onnx_adapter(tmp_path / "empty.onnx_adapter", {})
