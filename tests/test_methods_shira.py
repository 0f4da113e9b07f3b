"""SHiRA: structure, match count, the random mask equal to peft's for the same seed, parity with
peft, exact scatter-add merge touching only the masked entries, ONNX export, training."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.errors import PlanError, VerificationError
from graphpeft.graph import find_layers, get_tensor

from method_helpers import (IDS, assert_loss_falls, check_merge, check_onnx, check_provenance, compile_model,
                            created_ops, peft_model, randomize, run, train_compiled)
from models import tiny_llama

RULE = dict(targets=["q_proj", "v_proj"], r=2, random_seed=3)


def _peft_config():
    from peft import ShiraConfig

    return ShiraConfig(r=RULE["r"], target_modules=RULE["targets"], random_seed=RULE["random_seed"])


def _indices(cm) -> dict:
    # the masks are adapter-const (regenerated from the seed, not in adapter_state_dict)
    return {f"base_model.model.{r['tensors']['indices']}": get_tensor(cm.graph_module, r["tensors"]["indices"])
            for r in cm.adapters().values()}


@pytest.fixture(scope="module")
def llama():
    cm = compile_model("llama", [gp.SHiRA(**RULE)])
    randomize(cm)
    return cm


def test_structure_roles_and_match_count(llama):
    paths = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert sorted(llama.adapters()) == paths
    assert sum(line.startswith("  + ") for line in llama.explain().splitlines()) == 4
    check_provenance(llama, "insert_shira", "shira[q_proj,v_proj]")
    nodes = {n.name: n for n in llama.graph_module.graph.nodes}
    roles = llama.roles()
    for path in paths:
        assert created_ops(llama, path) == ["select", "select", "index_put"]
        # the layer op now reads the scattered weight (the adapter's join) instead of W
        (op,) = nodes[llama.adapters()[path]["join"]].users
        assert op.target == torch.ops.aten.linear.default and op.args[1].name == llama.adapters()[path]["join"]
        idx = get_tensor(llama.graph_module, f"{path}.shira_indices")
        assert idx.dtype == torch.int64 and roles[f"{path}.shira_indices"] == gp.Role.ADAPTER_CONST
        assert roles[f"{path}.shira_weight"] == gp.Role.ADAPTER
    # r·(in + out): q 2·(32+32) = 128 entries, v 2·(32+16) = 96, as many as a rank-2 LoRA
    assert idx.shape == (2, 96) and len({tuple(p) for p in idx.T.tolist()}) == 96
    assert llama.num_parameters(trainable_only=True) == 2 * (128 + 96)


def test_mask_is_peft_random_mask_and_rejections(llama):
    from peft import get_peft_model

    pm = get_peft_model(tiny_llama(), _peft_config())
    for path in llama.adapters():
        theirs = pm.base_model.model.get_submodule(path).shira_indices["default"].long()
        assert torch.equal(get_tensor(llama.graph_module, f"{path}.shira_indices"), theirs)
    assert gp.SHiRA(targets=["q_proj"]).r == 32 and gp.SHiRA(targets=["q_proj"]).init == "default"
    with pytest.raises(PlanError, match="more than the layer"):
        gp.Plan([gp.SHiRA(targets=["k_proj"], r=16)]).resolve(find_layers(llama.graph_module))
    with pytest.raises(PlanError, match="mask_type"):
        gp.SHiRA(targets=["q_proj"], mask_type="magnitude")
    assert gp.Plan.from_dict([{"shira": RULE}]) == llama.plan


def test_peft_parity(llama, parity):
    pm = peft_model("llama", _peft_config(), llama, _indices(llama))
    with torch.no_grad():
        diff = (run(llama, "llama") - run(pm, "llama")).abs().max().item()
        assert (run(llama, "llama") - run(tiny_llama(), "llama")).abs().max().item() > 1e-2
    assert parity.record("shira llama vs peft", diff) < 1e-5


def test_merge_is_an_exact_scatter_add_and_matches_peft(llama):
    merged = check_merge(llama, "llama")
    peft_merged = peft_model("llama", _peft_config(), llama, _indices(llama)).merge_and_unload().state_dict()
    for path, rec in llama.adapters().items():
        ours = get_tensor(merged.graph_module, rec["weight"])
        torch.testing.assert_close(ours, peft_merged[rec["weight"]])
        changed = (ours != get_tensor(llama.graph_module, rec["weight"])).sum().item()
        assert changed <= get_tensor(llama.graph_module, f"{path}.shira_weight").numel()


def test_onnx_merged_and_unmerged(llama, tmp_path, parity):
    parity.record("shira llama onnxruntime unmerged", check_onnx(llama, str(tmp_path / "shira.onnx"), merged=False))
    parity.record("shira llama onnxruntime merged", check_onnx(llama, str(tmp_path / "shira_m.onnx"), merged=True))


def test_training_step_loss_falls(llama):
    saved = llama.adapter_state_dict()
    try:
        losses, step = train_compiled(llama, lr=3e-2, verify=False)
        assert set(step.signature.params) == set(llama.trainable_parameters())  # the values only
        assert_loss_falls(losses)
    finally:
        llama.load_adapter_state_dict(saved)


# As for VeRA and LoRA-FA: the training compiler leaves the get_attr nodes of adapter-const
# tensors (the masks) without provenance, and its verifier rejects the graph.
def test_training_graph_verifies(llama):
    llama.compile_training("causal_lm", gp.optim.AdamW(lr=1e-2), example_batch=(IDS,))
