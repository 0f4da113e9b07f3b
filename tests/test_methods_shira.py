"""SHiRA: structure, match count, the random mask equal to peft's for the same seed, parity with
peft, exact scatter-add merge touching only the masked entries, ONNX export, a verified training
step run by torch and, exported, by onnxruntime; the paper's magnitude, gradient and SNIP masks
(the top entries of |W|, |∂L/∂W| and |W ⊙ ∂L/∂W| on the probe batch, checked against eager
PyTorch) and their round trip through adapter files."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.errors import PlanError
from graphpeft.graph import find_layers, get_tensor
from graphpeft.infra import PassContext, PassManager, clone_graph_module

from method_helpers import (IDS, assert_loss_falls, check_merge, check_onnx_merged_and_unmerged, check_structure,
                            check_training_export, check_weight_join, compiled_fixture, created_ops, llama_paths,
                            peft_model, randomize, run)
from models import tiny_llama, token_batch

RULE = dict(targets=["q_proj", "v_proj"], r=2, random_seed=3)


def _peft_config():
    from peft import ShiraConfig

    return ShiraConfig(r=RULE["r"], target_modules=RULE["targets"], random_seed=RULE["random_seed"])


def _indices(cm) -> dict:
    # the masks are adapter-const (regenerated from the seed; adapter_state_dict leaves them out
    # unless include_constants=True)
    return {f"base_model.model.{r['tensors']['indices']}": get_tensor(cm.graph_module, r["tensors"]["indices"])
            for r in cm.adapters().values()}


llama = compiled_fixture("llama", [gp.SHiRA(**RULE)])


def test_structure_roles_and_match_count(llama):
    paths = llama_paths("self_attn.q_proj", "self_attn.v_proj")
    check_structure(llama, paths, "insert_shira", "shira[q_proj,v_proj]")
    roles = llama.roles()
    for path in paths:
        assert created_ops(llama, path) == ["select", "select", "index_put"]
        check_weight_join(llama, path)  # the layer op now reads the scattered weight instead of W
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
        gp.SHiRA(targets=["q_proj"], mask_type="struct")
    with pytest.raises(PlanError, match="random_seed seeds the random mask"):
        gp.SHiRA(targets=["q_proj"], mask_type="magnitude", random_seed=3)
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
    check_onnx_merged_and_unmerged(llama, tmp_path, parity, "shira llama")


def test_training_step_in_torch_and_onnxruntime(llama, tmp_path, parity):
    # the step trains the values only (trainable_parameters), and its graph verifies (the masks
    # are read through adapter-const get_attr nodes); AdamW, 3 steps compared
    result = check_training_export(llama, gp.optim.AdamW(lr=3e-2), tmp_path, steps=12, compared=3)
    assert_loss_falls(result.torch_losses)
    loss_diff, param_diff = result.record(parity, "shira llama")
    assert loss_diff < 1e-4 and param_diff < 1e-4


# --- the paper's data-dependent masks -----------------------------------------------------------

#: one rule per mask, each on its own layers (one compile covers the three)
MASK_RULES = lambda: [gp.SHiRA(targets=["q_proj"], r=2, mask_type="magnitude"),  # noqa: E731
                      gp.SHiRA(targets=["v_proj"], r=2, mask_type="gradient"),
                      gp.SHiRA(targets=["o_proj"], r=2, mask_type="snip")]
PROBE = token_batch(seed=11)  # the probe batch differs from the example inputs (IDS)


def _compile_masks(**options):
    return gp.compile(tiny_llama(), gp.Plan(MASK_RULES()), (IDS,), {"use_cache": False}, options=options)


@pytest.fixture(scope="module")
def masks():
    return _compile_masks(probe_batch=(PROBE,), probe_loss="causal_lm")


def _eager_gradients(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """∂L/∂W of every weight, next-token cross-entropy on ``batch``, by plain eager autograd."""
    model = tiny_llama()
    logits = model(batch, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_masks_pick_the_top_entries(masks):
    grads = _eager_gradients(PROBE)
    base = dict(tiny_llama().named_parameters())
    for path, rec in masks.adapters().items():
        w = base[rec["weight"]].detach()
        score = {"magnitude": w.abs(), "gradient": grads[rec["weight"]].abs(),
                 "snip": (w * grads[rec["weight"]]).abs()}[rec["config"]["mask_type"]]
        rows, cols = get_tensor(masks.graph_module, rec["tensors"]["indices"])
        count = 2 * (rec["in_features"] + rec["out_features"])
        flat = rows * w.shape[1] + cols
        assert flat.numel() == count and torch.equal(flat, flat.unique())  # distinct, row-major
        chosen = torch.zeros(w.numel(), dtype=torch.bool)
        chosen[flat] = True
        # every chosen entry scores at least as high as every other one (up to the rounding of
        # the graph's gradient against eager autograd's), and the chosen set is not trivial
        top, rest = score.flatten()[chosen], score.flatten()[~chosen]
        assert top.min() >= rest.max() - 1e-6 * score.max(), (path, top.min(), rest.max())
        assert top.min() > 0
    kinds = {rec["config"]["mask_type"] for rec in masks.adapters().values()}
    assert kinds == {"magnitude", "gradient", "snip"} and len(masks.adapters()) == 6


@pytest.fixture(scope="module")
def probed_on_ids():
    return _compile_masks()  # no probe options: the example inputs (IDS) are the probe batch


def test_masks_are_deterministic_and_follow_the_probe_batch(masks, probed_on_ids):
    again = _compile_masks(probe_batch=(PROBE,), probe_loss="causal_lm")
    differs = {}
    for rec in masks.adapters().values():
        ours = get_tensor(masks.graph_module, rec["tensors"]["indices"])
        assert torch.equal(get_tensor(again.graph_module, rec["tensors"]["indices"]), ours)
        differs[rec["config"]["mask_type"]] = not torch.equal(
            get_tensor(probed_on_ids.graph_module, rec["tensors"]["indices"]), ours)
    assert differs == {"magnitude": False, "gradient": True, "snip": True}


def _same_masks(a: gp.CompiledModel, b: gp.CompiledModel) -> bool:
    return all(torch.equal(get_tensor(a.graph_module, r["tensors"]["indices"]),
                           get_tensor(b.graph_module, r["tensors"]["indices"])) for r in a.adapters().values())


def test_data_dependent_masks_round_trip(masks, probed_on_ids, tmp_path):
    # probed_on_ids chose other gradient/SNIP masks; loading restores the saved ones over them
    saved, own = masks.adapter_state_dict(), probed_on_ids.adapter_state_dict(include_constants=True)
    try:
        randomize(masks)
        # in memory: the masks travel with include_constants=True (the default leaves them out)
        state = masks.adapter_state_dict(include_constants=True)
        assert {k for k in state if k.endswith("shira_indices")} == {r["tensors"]["indices"]
                                                                    for r in masks.adapters().values()}
        assert not any(k.endswith("shira_indices") for k in masks.adapter_state_dict())
        probed_on_ids.load_adapter_state_dict(state)
        assert _same_masks(masks, probed_on_ids)
        probed_on_ids.load_adapter_state_dict(own)
        assert not _same_masks(masks, probed_on_ids)
        # adapter files hold every constant: save_adapter / load_adapter restore the masks
        masks.save_adapter(tmp_path / "masks")
        gp.load_adapter(probed_on_ids, tmp_path / "masks")
        assert _same_masks(masks, probed_on_ids)
        with torch.no_grad():
            assert torch.equal(run(probed_on_ids, "llama"), run(masks, "llama"))
        check_merge(probed_on_ids, "llama")
    finally:
        masks.load_adapter_state_dict(saved)
        probed_on_ids.load_adapter_state_dict(own)


def test_gradient_mask_needs_a_probe_batch(masks):
    gm = clone_graph_module(masks.graph_module)
    insert = gp.passes.InsertSHiRA([gp.SHiRA(targets=["k_proj"], r=2, mask_type="gradient")])
    with pytest.raises(PlanError, match="shira mask_type='gradient' needs a probe batch"):
        PassManager().run(gm, [insert], PassContext())
