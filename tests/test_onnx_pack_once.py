"""One packed copy per stored weight in onnxruntime (issue 10's memory target): the export's
``pack_weights_once`` rewrite (structure, counts, numerics), ``Gemm`` consumers of a transposed
weight folded, and ``OnnxTrainer(initializers=...)`` reading the torch model's weights in place."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pytest
import torch

import graphpeft as gp
from models import tiny_llama, token_batch

IDS = token_batch()
F = 1  # onnx.TensorProto.FLOAT


def _session(proto: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _weight_model() -> tuple[Any, dict[str, np.ndarray]]:
    """W read as B by a forward Gemm, a second (chunk's) Gemm and a gradient MatMul; V by one
    Gemm only; U by a 3-D MatMul."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w, v, u = (rng.standard_normal(s).astype(np.float32) for s in ((6, 4), (5, 4), (4, 3)))
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1),
             helper.make_node("Gemm", ["x2", "W"], ["y2"], transB=1, alpha=0.5),
             helper.make_node("MatMul", ["dy", "W"], ["dx"]),
             helper.make_node("Gemm", ["x", "V"], ["z"], transB=1),
             helper.make_node("MatMul", ["x3", "U"], ["t"])]
    inputs = {"x": (3, 4), "x2": (2, 4), "dy": (3, 6), "x3": (2, 3, 4)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, F, s) for k, s in inputs.items()],
                              [helper.make_tensor_value_info(n, F, None) for n in ("y", "y2", "dx", "z", "t")],
                              [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (v, "V"), (u, "U"))])
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    return proto, {k: rng.standard_normal(s).astype(np.float32) for k, s in inputs.items()}


def _b_readers(graph: Any, name: str) -> list[str]:
    return [n.op_type for n in graph.node if n.op_type in ("Gemm", "MatMul") and n.input[1] == name]


@pytest.mark.parametrize("unpacked", [False, True])
def test_pack_weights_once_structure_counts_numerics(unpacked: bool) -> None:
    import onnx
    import onnx_ir as ir

    from graphpeft.backends.onnx.pack_once import pack_weights_once

    proto, feed = _weight_model()
    expected = _session(proto).run(None, feed)
    model = ir.from_proto(proto)
    # all unpacked: W's three readers and V's one (U's is 3-D); else only the MatMul packing W otherwise
    rewritten = pack_weights_once(model, min_bytes=0, unpacked_min_bytes=0 if unpacked else 1 << 30)
    assert rewritten == (4 if unpacked else 1)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    assert _b_readers(out.graph, "W") == ([] if unpacked else ["Gemm", "Gemm"])  # the forward's, packing alike
    assert _b_readers(out.graph, "V") == ([] if unpacked else ["Gemm"]) and _b_readers(out.graph, "U") == ["MatMul"]
    a_gemms = [n for n in out.graph.node if n.op_type == "Gemm" and n.input[0] in ("W", "V")]
    assert len(a_gemms) == (4 if unpacked else 1)
    for n in a_gemms:  # a one-element zero C with beta=0: onnxruntime does not fuse the Transpose back
        attrs = {a.name: (a.i if a.type == a.INT else a.f) for a in n.attribute}
        assert len(n.input) == 3 and attrs["beta"] == 0.0
    assert collections.Counter(n.op_type for n in out.graph.node)["Transpose"] == len(a_gemms)
    for got, want in zip(_session(out).run(None, feed), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pack_weights_once_leaves_small_and_single_read_weights() -> None:
    import onnx_ir as ir

    from graphpeft.backends.onnx.pack_once import pack_weights_once

    proto, _ = _weight_model()
    assert pack_weights_once(ir.from_proto(proto)) == 0  # default: from 1 MiB on
    assert pack_weights_once(ir.from_proto(proto), min_bytes=0, unpacked_min_bytes=1 << 30) == 1


def test_fold_transposes_into_a_gemm_with_bias() -> None:
    import onnx
    import onnx_ir as ir
    from onnx import helper, numpy_helper

    from graphpeft.backends.onnx.fold_transpose import fold_transposes_into_gemm

    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("Gemm", ["x", "Wt", "b"], ["y"]),              # a linear with a bias
             helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("Gemm", ["xt", "Wt", "b"], ["y2"], transA=1),  # A flips back to 0
             helper.make_node("Transpose", ["W"], ["Wt2"], perm=[1, 0]),      # also read by a Relu: stays
             helper.make_node("Gemm", ["x", "Wt2"], ["y3"]),
             helper.make_node("Relu", ["Wt2"], ["r"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [3, 4])],
                              [helper.make_tensor_value_info(n, F, None) for n in ("y", "y2", "y3", "r")],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    feed = {"x": rng.standard_normal((3, 4)).astype(np.float32)}
    expected = _session(proto).run(None, feed)
    model = ir.from_proto(proto)
    assert fold_transposes_into_gemm(model) == 2
    out = ir.to_proto(model)
    assert [n.op_type for n in out.graph.node] == ["Gemm", "Gemm", "Transpose", "Gemm", "Relu"]
    assert [{a.name: a.i for a in n.attribute} for n in out.graph.node[:2]] == [{"transB": 1}, {"transA": 0, "transB": 1}]
    for got, want in zip(_session(out).run(None, feed), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def qv_step() -> Any:
    rule = gp.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8, init="random")
    cm = gp.compile(tiny_llama(layers=1), gp.Plan([rule]), (IDS,), {"use_cache": False})
    return cm, cm.compile_training("causal_lm", gp.optim.SGD(lr=0.5, momentum=0.9), example_batch=(IDS,))


def test_exported_step_packs_each_weight_once_and_matches_torch(qv_step: Any, tmp_path: Any) -> None:
    import copy

    import onnx

    from graphpeft.backends.onnx import OnnxTrainer

    cm, step = qv_step
    path = tmp_path / "train.onnx"
    step.export_onnx(path, pack_once_min_bytes=0)
    graph = onnx.load(str(path)).graph
    weights = [i.name for i in graph.initializer if len(i.dims) == 2 and not i.name.startswith(("param/", "state/"))]
    readers = {w: _b_readers(graph, w) for w in weights}
    assert all(len(r) <= 1 for r in readers.values())
    assert sum(n.op_type == "Gemm" and n.input[0] in readers for n in graph.node) >= 3  # input gradients
    state = copy.deepcopy(step.state_dict())
    trainer = OnnxTrainer(path, initializers=step.onnx_initializers())
    ort_losses = [trainer.step(IDS) for _ in range(3)]
    torch_losses = [float(step(IDS)) for _ in range(3)]
    assert max(abs(a - b) / abs(b) for a, b in zip(ort_losses, torch_losses)) < 1e-5
    ours, theirs = trainer.adapter_state_dict(), cm.adapter_state_dict()
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-5) for k in ours)
    step.load_state_dict(state)


def test_trainer_reads_shared_initializers_in_place(qv_step: Any, tmp_path: Any) -> None:
    from graphpeft.backends.onnx import OnnxTrainer

    _, step = qv_step
    path = tmp_path / "train.onnx"
    step.export_onnx(path, external_data=True)
    tensors = step.onnx_initializers()
    assert not any(n.startswith("param/") for n in tensors) and "model.embed_tokens.weight" in tensors
    shared = OnnxTrainer(path, initializers=tensors)
    emb = tensors["model.embed_tokens.weight"]
    assert set(shared.shared_initializers) >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert shared.shared_initializers["model.embed_tokens.weight"].data_ptr() == emb.data_ptr()  # no copy
    own = OnnxTrainer(path)
    assert shared.step(IDS) == own.step(IDS)
    saved = emb.clone()
    try:  # Gather reads the table as stored: the session sees the torch tensor's memory
        emb.zero_()
        assert shared.step(IDS) != own.step(IDS)
    finally:
        emb.copy_(saved)


def test_trainer_rejects_initializers_of_another_shape(qv_step: Any, tmp_path: Any) -> None:
    from graphpeft.backends.onnx import OnnxTrainer

    _, step = qv_step
    path = tmp_path / "train.onnx"
    step.export_onnx(path)
    with pytest.raises(gp.GraphPeftError, match="embed_tokens"):
        OnnxTrainer(path, initializers={"model.embed_tokens.weight": torch.zeros(3, 3), "unknown": torch.zeros(1)})


def test_trainer_turns_the_memory_pattern_off_for_big_files(qv_step: Any, tmp_path: Any, monkeypatch: Any) -> None:
    from graphpeft.backends.onnx import trainer as trainer_module

    _, step = qv_step
    path = tmp_path / "train.onnx"
    step.export_onnx(path, external_data=True)
    small = trainer_module.OnnxTrainer(path, cache_optimized=False)
    monkeypatch.setattr(trainer_module, "CACHE_MAX_EXTERNAL_BYTES", 1024)
    big = trainer_module.OnnxTrainer(path, cache_optimized=False)
    forced = trainer_module.OnnxTrainer(path, cache_optimized=False, memory_pattern=True)
    assert [t.session.get_session_options().enable_mem_pattern for t in (small, big, forced)] == [True, False, True]
    assert small.step(IDS) == big.step(IDS) == forced.step(IDS)


def test_pack_weights_once_keeps_the_cheaper_layout_and_a_biased_gemm() -> None:
    """out <= in: the forward's Gemm is rewritten and the gradient's MatMul keeps W packed; a
    Gemm with a bias keeps its layout whatever the shape."""
    import onnx
    import onnx_ir as ir
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(2)
    w, v, b = (rng.standard_normal(s).astype(np.float32) for s in ((3, 5), (4, 4), (4,)))
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1),
             helper.make_node("MatMul", ["dy", "W"], ["dx"]),
             helper.make_node("Gemm", ["x4", "V", "b"], ["z"], transB=1),
             helper.make_node("MatMul", ["dz", "V"], ["dx4"])]
    inputs = {"x": (2, 5), "dy": (2, 3), "x4": (2, 4), "dz": (2, 4)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, F, s) for k, s in inputs.items()],
                              [helper.make_tensor_value_info(n, F, None) for n in ("y", "dx", "z", "dx4")],
                              [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (v, "V"), (b, "b"))])
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    feed = {k: rng.standard_normal(s).astype(np.float32) for k, s in inputs.items()}
    expected = _session(proto).run(None, feed)
    model = ir.from_proto(proto)
    assert pack_weights_once_(model) == 2
    out = ir.to_proto(model)
    assert _b_readers(out.graph, "W") == ["MatMul"] and _b_readers(out.graph, "V") == ["Gemm"]
    a_reads = {n.input[0]: {a.name: a.i for a in n.attribute if a.name.startswith("trans")}
               for n in out.graph.node if n.op_type == "Gemm" and n.input[0] in ("W", "V")}
    assert a_reads == {"W": {"transA": 0, "transB": 1}, "V": {"transA": 1, "transB": 1}}
    for got, want in zip(_session(out).run(None, feed), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def pack_weights_once_(model: Any) -> int:
    from graphpeft.backends.onnx.pack_once import pack_weights_once

    return pack_weights_once(model, min_bytes=0, unpacked_min_bytes=1 << 30)
