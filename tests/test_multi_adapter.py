"""Several named adapters on one compiled model (issue 6, multi-adapter): add, select, weighted
merge (linear, cat, SVD, TIES, DARE, magnitude pruning), delete, load a file under a name, fused
switching, merge; PEFT is the oracle wherever it has the operation. Selecting adapters derives
the graph again without re-tracing; inactive adapters' branches are not in the graph.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import META_KEY, op_count

from method_helpers import IDS, compile_model, run
from models import tiny_llama

A_RULE = dict(targets=["q_proj", "v_proj"], r=4, alpha=8)
B_RULE = dict(targets=["q_proj", "down_proj"], r=4, alpha=16)


def perturb(cm: gp.CompiledModel, name: str, seed: int, scale: float = 0.3) -> None:
    """Move one adapter off its init (every trainable tensor, constants kept)."""
    gen = torch.Generator().manual_seed(seed)
    state = cm.adapter_state_dict(name)
    cm.load_adapter_state_dict({k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()},
                               adapter_name=name)


def peft_twin(cm: gp.CompiledModel, configs: dict, base=tiny_llama):
    """A PEFT model holding the same adapters (names, configs, tensors) as ``cm``."""
    from peft import get_peft_model, set_peft_model_state_dict

    names = list(configs)
    pm = get_peft_model(base(), configs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, configs[n])
    for n in names:
        state = {"base_model.model." + k: v for k, v in cm.adapter_state_dict(n, include_constants=True).items()}
        result = set_peft_model_state_dict(pm, state, adapter_name=n)
        assert not result.unexpected_keys, result.unexpected_keys
    return pm.eval()


def lora_config(rule: dict):
    from peft import LoraConfig

    return LoraConfig(r=rule["r"], lora_alpha=rule["alpha"], target_modules=rule["targets"])


@pytest.fixture(scope="module")
def pair():
    """(cm with LoRA adapters "default" and "b", PEFT twin, the default-only op count)."""
    cm = compile_model("llama", [gp.LoRA(**A_RULE)])
    perturb(cm, "default", 1)
    single_ops = op_count(cm.graph_module)
    cm.add_adapter("b", [gp.LoRA(**B_RULE)])
    perturb(cm, "b", 2)
    cm.eval()
    pm = peft_twin(cm, {"default": lora_config(A_RULE), "b": lora_config(B_RULE)})
    return cm, pm, single_ops


def compare(cm, pm) -> float:
    with torch.no_grad():
        return (run(cm, "llama") - run(pm, "llama")).abs().max().item()


def test_named_adapter_structure(pair):
    cm, _, single_ops = pair
    assert cm.adapter_names == ["default", "b"] and cm.active_adapters == ["default"]
    # the inactive adapter is not in the graph: same ops, records and tensors as before adding it
    assert op_count(cm.graph_module) == single_ops
    assert all(not k.startswith("b:") for k in cm.adapters())
    assert not any(n.startswith("adapters.b.") for n in cm.roles())
    cm.set_adapter("b")
    try:
        ids = sorted(cm.adapters())
        assert ids[0] == "b:model.layers.0.mlp.down_proj" and len(ids) == 4
        rec = cm.adapters()["b:model.layers.0.self_attn.q_proj"]
        assert rec["name"] == "b" and rec["layer"] == "model.layers.0.self_attn.q_proj"
        assert rec["tensors"]["A"] == "adapters.b.model.layers.0.self_attn.q_proj.lora_A.weight"
        assert cm.roles()[rec["tensors"]["B"]] == gp.Role.ADAPTER
        for node in cm.graph_module.graph.nodes:  # provenance names the adapter id
            prov = node.meta.get(META_KEY)
            if prov:
                assert prov["adapter"] in cm.adapters() and prov["adapter"].startswith("b:"), prov
        # PEFT file names (the name stripped), whichever adapter is active
        assert sorted(cm.adapter_state_dict("b"))[0] == "model.layers.0.mlp.down_proj.lora_A.weight"
        assert set(cm.adapter_state_dict("default")) == {f"model.layers.{i}.self_attn.{p}.lora_{f}.weight"
                                                         for i in (0, 1) for p in ("q_proj", "v_proj") for f in "AB"}
    finally:
        cm.set_adapter("default")


def test_set_adapter_matches_peft_without_retracing(pair, parity, monkeypatch):
    cm, pm, _ = pair

    def no_trace(*a, **k):
        raise AssertionError("set_adapter re-traced the model")

    tracing = sys.modules["graphpeft.trace"]  # the module (gp.trace is the function)
    for frontend in ("_trace_export", "_trace_fx"):
        monkeypatch.setattr(tracing, frontend, no_trace)
    monkeypatch.setattr(torch.export, "export", no_trace)
    monkeypatch.setattr(torch.fx, "symbolic_trace", no_trace)
    try:
        for selection in ("b", ["default", "b"], "default"):
            cm.set_adapter(selection)
            pm.base_model.set_adapter(selection)
            assert cm.active_adapters == ([selection] if isinstance(selection, str) else selection)
            parity.record(f"multi-adapter set_adapter({selection}) vs peft", compare(cm, pm))
            assert compare(cm, pm) < 1e-5
        both = None
        cm.set_adapter(["default", "b"])
        both = op_count(cm.graph_module)
        cm.set_adapter([])
        with torch.no_grad():
            assert (run(cm, "llama") - run(tiny_llama(), "llama")).abs().max().item() < 1e-6
        assert op_count(cm.graph_module) == cm.base_op_count < both
    finally:
        cm.set_adapter("default")
        pm.base_model.set_adapter("default")


COMBOS = [("linear", {}), ("cat", {}), ("svd", {}), ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.5}),
          ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.5, "majority_sign_method": "frequency"}),
          ("ties_svd", {"density": 0.6})]


@pytest.mark.parametrize("combination,options", COMBOS, ids=[c for c, _ in COMBOS])
def test_weighted_lora_matches_peft(pair, parity, monkeypatch, combination, options):
    from peft.tuners.lora.model import LoraModel

    cm, pm, _ = pair
    name = f"w_{combination}"
    # DARE draws random masks. PEFT draws from the global RNG after its new adapter's init has
    # used it; reseed it where its combination starts, and give ours the same sequence
    for attr in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
        original = getattr(LoraModel, attr)
        state = {"first": True}

        def reseeding(self, *a, _original=original, _state=state, **k):
            if _state["first"]:
                torch.manual_seed(11)
                _state["first"] = False
            return _original(self, *a, **k)

        monkeypatch.setattr(LoraModel, attr, reseeding)
    cm.add_weighted_adapter(["default", "b"], [0.7, -0.4], name, combination,
                            generator=torch.Generator().manual_seed(11), **options)
    pm.add_weighted_adapter(["default", "b"], [0.7, -0.4], name, combination, **options)
    try:
        cm.set_adapter(name)
        pm.base_model.set_adapter(name)
        rec = next(r for r in cm.adapters().values())
        assert gp.LoRA.from_body(rec["config"]).r == {"cat": 8}.get(combination, 4)
        assert rec["scaling"] == 1.0  # PEFT gives the combined adapter alpha = r
        assert sorted({r["layer"].rsplit(".", 1)[-1] for r in cm.adapters().values()}) == ["down_proj", "q_proj", "v_proj"]
        diff = parity.record(f"add_weighted_adapter {combination} vs peft", compare(cm, pm))
        assert diff < 1e-5
    finally:
        cm.set_adapter("default")
        pm.base_model.set_adapter("default")
        cm.delete_adapter(name)
        pm.delete_adapter(name)


def test_weighted_ia3_matches_peft(parity):
    from peft import IA3Config

    rule = dict(targets=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    cm = compile_model("llama", [gp.IA3(**rule)])
    cm.add_adapter("other", [gp.IA3(targets=["k_proj", "v_proj"])])
    perturb(cm, "default", 3, 0.2)
    perturb(cm, "other", 4, 0.2)
    cm.add_weighted_adapter(["default", "other"], [0.6, 0.5], "mix")
    cm.set_adapter("mix")
    cm.eval()
    configs = {"default": IA3Config(target_modules=rule["targets"], feedforward_modules=["down_proj"]),
               "other": IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[])}
    pm = peft_twin(cm, configs)
    pm.add_weighted_adapter(["default", "other"], [0.6, 0.5], "mix")
    pm.base_model.set_adapter("mix")
    assert parity.record("ia3 add_weighted_adapter linear vs peft", compare(cm, pm)) < 1e-5
    with pytest.raises(gp.AdapterError, match="linearly"):
        cm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "bad", "ties", density=0.5)
    assert "bad" not in cm.adapter_names


def test_stacked_lora_and_dora_on_one_layer_match_peft(parity):
    """Several active adapters apply one after the other, in the order they were added, as in
    PEFT's forward: DoRA's magnitude term rescales the result so far (the LoRA's included)."""
    from peft import LoraConfig

    dora = dict(targets=["q_proj", "v_proj"], r=2, alpha=4)
    cm = compile_model("llama", [gp.LoRA(**A_RULE)])
    cm.add_adapter("dora", [gp.DoRA(**dora)])
    cm.add_adapter("lora2", [gp.LoRA(targets=["v_proj"], r=2, alpha=2)])
    for i, name in enumerate(cm.adapter_names):
        perturb(cm, name, 30 + i, 0.2)
    cm.set_adapter(["default", "dora", "lora2"])
    cm.eval()
    configs = {"default": lora_config(A_RULE),
               "dora": LoraConfig(r=2, lora_alpha=4, target_modules=dora["targets"], use_dora=True),
               "lora2": LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"])}
    pm = peft_twin(cm, configs)
    pm.base_model.set_adapter(["default", "dora", "lora2"])
    assert parity.record("stacked lora + dora + lora on one layer vs peft", compare(cm, pm)) < 1e-5
    merged = cm.merge()  # folded one after the other, as PEFT merges them
    assert parity.record("merge of stacked lora + dora vs peft", compare(merged, pm.merge_and_unload().eval())) < 1e-5


def test_delete_adapter_matches_peft(pair, parity):
    cm, pm, _ = pair
    cm.add_adapter("tmp", [gp.LoRA(targets=["k_proj"], r=2)])
    cm.set_adapter(["default", "tmp"])
    cm.delete_adapter("tmp")
    assert cm.adapter_names == ["default", "b"] and cm.active_adapters == ["default"]
    assert not any("adapters.tmp" in n for n in cm.roles()) and not any(n.startswith("adapters.tmp") for n in cm._bank.tensors)
    assert not any(prov and prov.get("adapter", "").startswith("tmp:")
                   for prov in (n.meta.get(META_KEY) for n in cm._bank.graph.nodes))
    with pytest.raises(gp.AdapterError, match="no adapter named 'tmp'"):
        cm.set_adapter("tmp")
    assert parity.record("multi-adapter after delete vs peft", compare(cm, pm)) < 1e-5


def test_delete_the_default_adapter(parity):
    cm = compile_model("llama", [gp.LoRA(**A_RULE)])
    cm.add_adapter("b", [gp.LoRA(**B_RULE)])
    perturb(cm, "b", 2)
    cm.set_adapter("b")
    cm.delete_adapter("default")
    cm.eval()
    assert cm.adapter_names == ["b"] and not any(n.endswith("v_proj.lora_A.weight") for n in cm.roles())
    pm = peft_twin(cm, {"b": lora_config(B_RULE)})
    assert compare(cm, pm) < 1e-5


def test_load_adapter_file_under_a_name(pair, tmp_path):
    cm, _, _ = pair
    cm.save_adapter(tmp_path / "b", adapter_name="b")
    gp.load_adapter(cm, tmp_path / "b", adapter_name="c")  # added from the file's plan, then loaded
    try:
        assert cm.adapter_names[-1] == "c"
        for k, v in cm.adapter_state_dict("b").items():
            assert torch.equal(cm.adapter_state_dict("c")[k], v)
        with torch.no_grad():
            cm.set_adapter("b")
            out_b = run(cm, "llama")
            cm.set_adapter("c")
            assert torch.equal(run(cm, "llama"), out_b)
        with pytest.raises(gp.AdapterFileError, match="different plan"):
            gp.load_adapter(cm, tmp_path / "b", adapter_name="default")
    finally:
        cm.set_adapter("default")
        cm.delete_adapter("c")


def test_merge_with_two_active_adapters_matches_peft(pair, parity):
    cm, pm, _ = pair
    cm.set_adapter(["default", "b"])
    twin = copy.deepcopy(pm)
    twin.base_model.set_adapter(["default", "b"])
    try:
        merged = cm.merge()
        assert op_count(merged.graph_module) == cm.base_op_count and not merged.adapters()
        reference = twin.merge_and_unload().eval()
        assert parity.record("merge of two active adapters vs peft merge_and_unload", compare(merged, reference)) < 1e-5
    finally:
        cm.set_adapter("default")


@pytest.fixture(scope="module")
def fusable():
    """One model with two adapters of each of SHiRA (additive, scatter), LoRA (additive, GEMM)
    and IA3 (not additive: restored from a saved copy), and the user's model with its state."""
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    cm = gp.compile(base, [gp.SHiRA(targets=["q_proj", "v_proj"], r=2)], (IDS,), {"use_cache": False})
    cm.add_adapter("shira_b", [gp.SHiRA(targets=["q_proj", "v_proj"], r=2)], seed=3)
    for i, name in enumerate(("lora_a", "lora_b")):
        cm.add_adapter(name, [gp.LoRA(targets=["q_proj", "v_proj"], r=2)], seed=4 + i)
    for name in ("ia3_a", "ia3_b"):
        cm.add_adapter(name, [gp.IA3(targets=["q_proj", "down_proj"], feedforward_modules=["down_proj"])])
    for i, name in enumerate(cm.adapter_names):
        perturb(cm, name, 10 + i)
    return cm.eval(), base, before


@pytest.mark.parametrize("pair_names", [("default", "shira_b"), ("lora_a", "lora_b"), ("ia3_a", "ia3_b")],
                         ids=["shira", "lora", "ia3"])
def test_fused_switching(fusable, pair_names, parity):
    cm, base, before = fusable
    cm.set_adapter([])
    weights = {n: t.clone() for n, t in cm.graph_module.state_dict().items() if n.endswith("proj.weight")}
    with torch.no_grad():
        reference = {}
        for name in pair_names:
            cm.set_adapter(name)
            reference[name] = run(cm, "llama")
        cm.set_adapter([])
        worst = 0.0
        for name in pair_names * 4:  # switch back and forth
            cm.fuse_adapter(name)
            assert cm.fused_adapter == name and op_count(cm.graph_module) == cm.base_op_count
            worst = max(worst, (run(cm, "llama") - reference[name]).abs().max().item())
        cm.unfuse_adapter()
    method = cm._bank.records_of(pair_names[0]).popitem()[1]["method"]
    parity.record(f"{method} fused switching vs unfused", worst)
    assert worst < 1e-5 and cm.fused_adapter is None
    restored = cm.graph_module.state_dict()
    for n, w in weights.items():  # unfused: the weights are back (exactly where restored by copy;
        # to rounding where ΔW was subtracted again, as PEFT's unmerge)
        assert torch.equal(restored[n], w) if method == "ia3" else torch.allclose(restored[n], w, atol=1e-6), n
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the user's model untouched
    # fusing an active adapter takes its branch out of the graph first
    second = pair_names[1]
    cm.set_adapter(second)
    cm.fuse_adapter(second)
    assert cm.active_adapters == [] and op_count(cm.graph_module) == cm.base_op_count
    with torch.no_grad():
        assert (run(cm, "llama") - reference[second]).abs().max().item() < 1e-5
    cm.set_adapter(second)  # unfuses it and runs it unfused again
    assert cm.fused_adapter is None and cm.active_adapters == [second]
    with torch.no_grad():
        assert (run(cm, "llama") - reference[second]).abs().max().item() < 1e-5


def test_training_step_trains_the_active_adapter_only(pair):
    cm, _, _ = pair
    cm.add_adapter("trained", [gp.LoRA(targets=["q_proj", "down_proj"], r=4, init="random")])
    try:
        cm.set_adapter("trained")
        before = {n: cm.adapter_state_dict(n) for n in cm.adapter_names}
        step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-2))
        losses = [float(step(IDS)) for _ in range(3)]
        assert losses[-1] < losses[0]
        for name, state in before.items():
            changed = [not torch.equal(v, cm.adapter_state_dict(name)[k]) for k, v in state.items()]
            assert all(changed) if name == "trained" else not any(changed), name
    finally:
        cm.set_adapter("default")
        cm.delete_adapter("trained")


def test_errors(pair):
    cm, _, _ = pair
    with pytest.raises(gp.AdapterError, match="already has an adapter named 'b'"):
        cm.add_adapter("b", [gp.LoRA(targets=["k_proj"], r=2)])
    with pytest.raises(ValueError, match="identifiers"):
        cm.add_adapter("my.adapter", [gp.LoRA(targets=["k_proj"], r=2)])
    with pytest.raises(gp.PlanError, match="matches no layer"):
        cm.add_adapter("nothing", [gp.LoRA(targets=["no_such_proj"], r=2)])
    with pytest.raises(gp.AdapterError, match="only adapter rules"):
        cm.add_adapter("upd", [gp.Update(targets=["q_proj"])])
    with pytest.raises(gp.AdapterError, match="no adapter named 'zz'"):
        cm.set_adapter(["default", "zz"])
    with pytest.raises(ValueError, match="one rank"):
        cm.add_adapter("r2", [gp.LoRA(targets=["k_proj"], r=2)])
        try:
            cm.add_weighted_adapter(["default", "r2"], [1.0, 1.0], "x", "linear")
        finally:
            cm.delete_adapter("r2")
    with pytest.raises(gp.AdapterError, match="one weight per adapter"):
        cm.add_weighted_adapter(["default", "b"], [1.0], "x")
    assert cm.adapter_names == ["default", "b"] and cm.active_adapters == ["default"]
