"""``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` of a ``CompiledModel`` and a
``TrainingStep`` (issue 14): the copy computes the same outputs (also for other batch shapes),
keeps provenance, dropout tags and the explain report, merges, exports, trains on independently
of the original, and a copied step continues exactly as the original would."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import META_KEY, adapters

from conftest import max_diff
from models import tiny_llama, token_batch


def _torch_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)),
          "torch.save": _torch_roundtrip}


@pytest.fixture(scope="module")
def llama_cm():
    ids = token_batch()
    plan = gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.1, init="random")])
    return gp.compile(tiny_llama(), plan, (ids,), {"use_cache": False}), ids


@pytest.mark.parametrize("how", list(COPIES))
def test_compiled_model_copies(llama_cm, how):
    cm, ids = llama_cm
    cm.eval()
    new = COPIES[how](cm)
    assert type(new) is gp.CompiledModel and new is not cm
    with torch.no_grad():
        assert max_diff(new(ids), cm(ids)) == 0.0
        other = token_batch(batch=3, seq=5)  # dynamic batch and sequence survive the copy
        assert max_diff(new(other), cm(other)) == 0.0
    # node metadata: provenance, dropout tags, fake tensors
    old_nodes = {n.name: n for n in cm.graph_module.graph.nodes}
    for n in new.graph_module.graph.nodes:
        assert n.meta.get(META_KEY) == old_nodes[n.name].meta.get(META_KEY)
        if "val" in old_nodes[n.name].meta:
            assert "val" in n.meta
    assert adapters(new.graph_module) == adapters(cm.graph_module)
    assert new.explain() == cm.explain()
    assert [(m.rule, m.ok, m.reason) for m in new.match_report()] == [(m.rule, m.ok, m.reason) for m in cm.match_report()]
    # independent tensors
    name = next(iter(new.trainable_parameters()))
    with torch.no_grad():
        new.trainable_parameters()[name].add_(1.0)
    assert not torch.equal(new.trainable_parameters()[name], cm.trainable_parameters()[name])


def test_copy_keeps_dropout_switch_and_merges(llama_cm):
    cm, ids = llama_cm
    new = copy.deepcopy(cm)
    new.train()
    torch.manual_seed(0)
    a = new(ids).logits
    torch.manual_seed(1)
    b = new(ids).logits
    assert not torch.equal(a, b)  # adapter dropout is live in train mode
    new.eval()
    with torch.no_grad():
        assert max_diff(new.merge()(ids), cm.eval()(ids)) < 1e-5


def test_copy_exports_to_onnx(llama_cm, tmp_path):
    from graphpeft.backends.onnx import OnnxRunner

    cm, ids = llama_cm
    new = pickle.loads(pickle.dumps(cm.eval()))
    new.export_onnx(tmp_path / "m.onnx", merged=False)
    ort = OnnxRunner(str(tmp_path / "m.onnx")).run(new.flat_inputs(ids))[0]
    with torch.no_grad():
        assert (torch.as_tensor(ort) - cm(ids).logits).abs().max().item() < 1e-4


def test_named_adapters_survive_a_copy(llama_cm):
    cm, ids = llama_cm
    cm = copy.deepcopy(cm).eval()
    cm.add_adapter("second", gp.Plan([gp.LoRA(targets=["v_proj"], r=2, init="random")]))
    new = pickle.loads(pickle.dumps(cm))
    assert new.adapter_names == cm.adapter_names
    for name in ("second", "default"):
        cm.set_adapter(name)
        new.set_adapter(name)
        with torch.no_grad():
            assert max_diff(new(ids), cm(ids)) == 0.0


@pytest.mark.parametrize("how", list(COPIES))
def test_training_step_copies_continue_identically(how):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["0", "2"], r=2, init="random")]), (x,))
    step = cm.compile_training("mse", gp.optim.AdamW(lr=1e-2))
    step(x, y)
    new = COPIES[how](step)
    assert new.cm is not cm and new.graph_module is not step.graph_module
    assert new.signature == step.signature
    for _ in range(3):
        assert torch.equal(new(x, y), step(x, y))
    assert all(torch.equal(a, b) for a, b in zip(new.cm.trainable_parameters().values(),
                                                 cm.trainable_parameters().values()))
    assert torch.equal(new.state_dict()["optimizer"]["step"], step.state_dict()["optimizer"]["step"])


def test_copied_step_exports_and_runs_in_onnxruntime(tmp_path):
    from graphpeft.backends.onnx import OnnxTrainer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    cm = gp.compile(model, gp.Plan([gp.LoRA(targets=["0", "2"], r=2, init="random")]), (x,))
    step = pickle.loads(pickle.dumps(cm.compile_training("mse", gp.optim.SGD(lr=1e-3))))
    step.export_onnx(tmp_path / "t.onnx")
    trainer = OnnxTrainer(str(tmp_path / "t.onnx"))
    for _ in range(2):
        ort, ours = float(trainer.step(x, y)), float(step(x, y))
        assert abs(ort - ours) <= 1e-5 * abs(ours)
