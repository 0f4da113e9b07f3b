"""PEFT adapter folders both ways (issue 6, interop): our export loads into
``peft.PeftModel.from_pretrained`` and PEFT's ``save_pretrained`` folders load into graphpeft,
with the same outputs, for LoRA (rsLoRA, per-layer rank/alpha, GPT-2 with fan_in_fan_out),
DoRA, IA3, VeRA, SHiRA and LoRA-FA (a PEFT LoRA with A frozen). Frozen constants (VeRA's
projections, LoRA-FA's A, SHiRA's indices) travel in the files. Broken or unsupported folders
raise AdapterFileError and leave the model as it was.

Most adapters are compiled onto one traced model under names (``add_adapter``: no re-trace), so
the file stays fast; the plain path (``import_peft(model, ...)`` compiling a fresh model) is
tested for LoRA, rank patterns and GPT-2.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import graphpeft as gp

from method_helpers import IDS, compile_model, run
from models import tiny_gpt2, tiny_llama

FILES = ["adapter_config.json", "adapter_model.safetensors"]
TARGETS = ["q_proj", "v_proj", "down_proj"]

# name -> the rule compiled onto the hub under that name
OURS = {
    "dora": gp.DoRA(targets=["q_proj", "v_proj"], r=4, alpha=8, init="random"),
    "ia3": gp.IA3(targets=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init="random"),
    "vera": gp.VeRA(targets=TARGETS, r=4, projection_prng_key=5, init="random"),
    "shira": gp.SHiRA(targets=["q_proj", "v_proj"], r=2, init="random"),
    "lora_fa": gp.LoRAFA(targets=["q_proj", "v_proj"], r=4, alpha=16, init="random"),
}


def perturb(cm: gp.CompiledModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    state = cm.adapter_state_dict(name)
    cm.load_adapter_state_dict({k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in state.items()},
                               adapter_name=name)


def diff(a, b, arch: str = "llama") -> float:
    with torch.no_grad():
        return (run(a, arch) - run(b, arch)).abs().max().item()


@pytest.fixture(scope="module")
def hub():
    """Llama with a random LoRA "default" and each method of OURS as a named adapter."""
    cm = compile_model("llama", [gp.LoRA(targets=TARGETS, r=4, alpha=8, use_rslora=True, init="random")])
    for i, (name, rule) in enumerate(OURS.items()):
        cm.add_adapter(name, [rule], seed=i + 1)
        perturb(cm, name, 20 + i)
    return cm.eval()


def peft_saved(config, folder, base=tiny_llama, seed: int = 3):
    """A PEFT model with ``config`` and random adapter tensors, saved to ``folder``."""
    from peft import get_peft_model

    pm = get_peft_model(base(), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    pm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(folder)
    return pm


# --- ours -> PEFT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", *OURS])
def test_export_loads_into_peft(hub, name, tmp_path, parity):
    from peft import PeftModel

    paths = gp.export_peft(hub, tmp_path, adapter_name=name)
    assert sorted(os.listdir(tmp_path)) == FILES and paths["config"].endswith(FILES[0])  # no temporary files
    config = json.loads((tmp_path / FILES[0]).read_text())
    state = load_file(tmp_path / FILES[1])
    assert all(k.startswith("base_model.") for k in state)
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    hub.set_adapter(name)
    try:
        d = parity.record(f"export_peft {name} -> PeftModel.from_pretrained", diff(hub, pm))
    finally:
        hub.set_adapter("default")
    assert d < 1e-5
    peft_type = {"default": "LORA", "dora": "LORA", "lora_fa": "LORA"}.get(name, name.upper())
    assert config["peft_type"] == peft_type
    if name == "default":
        assert config["use_rslora"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    if name == "dora":
        assert config["use_dora"] is True
    if name == "vera":  # the shared projections travel (PEFT keeps them on the tuner)
        assert state["base_model.vera_A"].shape == (4, 64) and config["save_projection"] is True
    if name == "shira":
        assert state["base_model.model.model.layers.0.self_attn.q_proj.shira_indices"].dtype == torch.int64
    if name == "lora_fa":  # PEFT's LoRA-FA: a LoRA whose A the optimizer freezes; the frozen A is in the file
        assert "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight" in state


def test_export_rejects_what_peft_cannot_hold(hub, tmp_path):
    hub.add_adapter("mixed", [gp.LoRA(targets=["q_proj"], r=2), gp.IA3(targets=["v_proj"])])
    try:
        with pytest.raises(gp.AdapterFileError, match="mixes methods"):
            gp.export_peft(hub, tmp_path / "m", adapter_name="mixed")
        with pytest.raises(gp.AdapterFileError, match="no adapter named 'nope'"):
            gp.export_peft(hub, tmp_path / "n", adapter_name="nope")
        assert not os.path.exists(tmp_path / "m") or not os.listdir(tmp_path / "m")
    finally:
        hub.delete_adapter("mixed")


# --- PEFT -> ours -------------------------------------------------------------------------------


def _peft_configs():
    from peft import IA3Config, LoraConfig, ShiraConfig, VeraConfig

    return {
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
        "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "vera": VeraConfig(r=4, target_modules=["q_proj", "v_proj"], projection_prng_key=7),
        "shira": ShiraConfig(r=2, target_modules=["q_proj", "v_proj"]),
        "lora_fa": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    }


@pytest.mark.parametrize("name", ["dora", "ia3", "vera", "shira", "lora_fa"])
def test_peft_folder_imports_onto_a_compiled_model(hub, name, tmp_path, parity):
    pm = peft_saved(_peft_configs()[name], tmp_path / "peft")
    before = list(hub.adapter_names)
    imported = f"from_peft_{name}"
    method = "lora_fa" if name == "lora_fa" else None
    assert gp.import_peft(hub, tmp_path / "peft", adapter_name=imported, method=method) is hub
    try:
        assert hub.adapter_names == before + [imported] and imported not in hub.active_adapters
        hub.set_adapter(imported)
        d = parity.record(f"import_peft {name} (onto a compiled model) vs peft", diff(hub, pm))
        assert d < 1e-5
        rec = next(iter(hub.adapters().values()))
        assert rec["method"] == (name if name in ("ia3", "vera", "shira", "lora_fa", "dora") else "lora")
        if name == "lora_fa":
            assert hub.roles()[rec["tensors"]["A"]] == gp.Role.ADAPTER_CONST
        # nothing lost: exporting the imported adapter gives PEFT's file back, tensor for tensor
        gp.export_peft(hub, tmp_path / "again", adapter_name=imported)
        theirs, ours = load_file(tmp_path / "peft" / FILES[1]), load_file(tmp_path / "again" / FILES[1])
        assert sorted(theirs) == sorted(ours)
        assert all(torch.equal(theirs[k].to(ours[k].dtype), ours[k]) for k in theirs)
    finally:
        hub.set_adapter("default")
        hub.delete_adapter(imported)


def test_peft_lora_imports_into_a_fresh_model(tmp_path, parity):
    from peft import LoraConfig

    pm = peft_saved(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, use_rslora=True),
                    tmp_path / "peft")
    cm = gp.import_peft(tiny_llama(), tmp_path / "peft", (IDS,), {"use_cache": False}).eval()
    (rule,) = cm.plan.rules
    assert (type(rule), rule.r, rule.alpha, rule.dropout, rule.use_rslora) == (gp.LoRA, 4, 8, 0.1, True)
    assert sorted(rule.targets) == sorted(TARGETS) and len(cm.adapters()) == 6
    assert parity.record("import_peft lora (rsLoRA) fresh model vs peft", diff(cm, pm)) < 1e-5


def test_rank_and_alpha_patterns_both_ways(tmp_path, parity):
    from peft import LoraConfig, PeftModel

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                        alpha_pattern={"q_proj": 3})
    pm = peft_saved(config, tmp_path / "peft")
    cm = gp.import_peft(tiny_llama(), tmp_path / "peft", (IDS,), {"use_cache": False}).eval()
    ranks = {r["layer"]: (gp.LoRA.from_body(r["config"]).r, r["scaling"]) for r in cm.adapters().values()}
    assert ranks["model.layers.0.self_attn.v_proj"] == (2, 4.0) and ranks["model.layers.1.mlp.down_proj"] == (6, 8 / 6)
    assert ranks["model.layers.0.self_attn.q_proj"] == (4, 0.75) and ranks["model.layers.0.mlp.down_proj"] == (4, 2.0)
    assert parity.record("import_peft lora rank/alpha patterns vs peft", diff(cm, pm)) < 1e-5
    gp.export_peft(cm, tmp_path / "ours")  # several rules: written back as patterns
    exported = json.loads((tmp_path / "ours" / FILES[0]).read_text())
    assert exported["r"] == 4 and len(exported["rank_pattern"]) == 3 and len(exported["alpha_pattern"]) == 2
    assert diff(cm, PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()) < 1e-5


def test_gpt2_lora_fan_in_fan_out_both_ways(tmp_path, parity):
    from peft import LoraConfig, PeftModel

    cm = compile_model("gpt2", [gp.LoRA(targets=["c_attn", "mlp.c_proj"], r=4, alpha=8, init="random")]).eval()
    gp.export_peft(cm, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / FILES[0]).read_text())
    assert config["fan_in_fan_out"] is True  # GPT-2's Conv1D stores W as (in, out)
    pm = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours").eval()
    assert parity.record("export_peft gpt2 lora -> peft", diff(cm, pm, "gpt2")) < 1e-5
    theirs = peft_saved(LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True), tmp_path / "peft",
                        base=tiny_gpt2)
    imported = gp.import_peft(tiny_gpt2(), tmp_path / "peft", (IDS,), {"use_cache": False}).eval()
    assert all(r["fan_in_fan_out"] for r in imported.adapters().values())
    assert parity.record("import_peft gpt2 lora (fan_in_fan_out) vs peft", diff(imported, theirs, "gpt2")) < 1e-5


# --- constants --------------------------------------------------------------------------------------


def test_constants_in_state_dicts_and_graphpeft_files(hub, tmp_path):
    plain = hub.adapter_state_dict("vera")
    full = hub.adapter_state_dict("vera", include_constants=True)
    assert set(full) - set(plain) == {"vera_A", "vera_B"}
    assert {k for k in hub.adapter_state_dict("shira", include_constants=True) if k.endswith("indices")}
    assert not any(k.endswith("lora_A.weight") for k in hub.adapter_state_dict("lora_fa"))
    # graphpeft's own file keeps them: loading it under a new name, compiled with another seed
    # (other SHiRA masks), gives the same adapter back
    hub.save_adapter(tmp_path / "shira", adapter_name="shira")
    gp.load_adapter(hub, tmp_path / "shira", adapter_name="shira_copy")
    try:
        src = hub.adapter_state_dict("shira", include_constants=True)
        dst = hub.adapter_state_dict("shira_copy", include_constants=True)
        assert all(torch.equal(src[k], dst[k]) for k in src)
        with torch.no_grad():
            hub.set_adapter("shira")
            expected = run(hub, "llama")
            hub.set_adapter("shira_copy")
            assert torch.equal(run(hub, "llama"), expected)
        # constants are accepted when present, required only when asked, rejected when excluded
        with pytest.raises(gp.AdapterFileError, match="missing keys"):
            hub.load_adapter_state_dict(plain, adapter_name="vera", include_constants=True)
        with pytest.raises(gp.AdapterFileError, match="unexpected keys"):
            hub.load_adapter_state_dict(full, adapter_name="vera", include_constants=False)
        bad = dict(hub.adapter_state_dict("shira", include_constants=True))
        bad[next(k for k in bad if k.endswith("indices"))] = bad[next(k for k in bad if k.endswith("indices"))].float()
        with pytest.raises(gp.AdapterFileError, match="indices"):
            hub.load_adapter_state_dict(bad, adapter_name="shira")
    finally:
        hub.set_adapter("default")
        hub.delete_adapter("shira_copy")


# --- broken and unsupported folders -------------------------------------------------------------------


def _lora_folder(tmp_path):
    from peft import LoraConfig

    folder = tmp_path / "lora"
    if not folder.exists():
        peft_saved(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), folder)
    return folder


def _edited(tmp_path, edit, name):
    src = _lora_folder(tmp_path)
    dst = tmp_path / name
    dst.mkdir()
    config = json.loads((src / FILES[0]).read_text())
    state = load_file(src / FILES[1])
    config, state = edit(config, state)
    (dst / FILES[0]).write_text(json.dumps(config))
    save_file(state, dst / FILES[1])
    return dst


@pytest.mark.parametrize("case,edit,message", [
    ("loha", lambda c, s: ({**c, "peft_type": "LOHA"}, s), "type 'LOHA' are not supported"),
    ("bias", lambda c, s: ({**c, "bias": "all"}, s), r"sets \['bias'\]"),
    ("modules_to_save", lambda c, s: ({**c, "modules_to_save": ["lm_head"]}, s), "modules_to_save"),
    ("no_layer", lambda c, s: ({**c, "target_modules": ["nonexistent_proj"]}, s), "does not fit this model"),
    ("rank", lambda c, s: ({**c, "r": 2}, s), "has shape"),
    ("extra_tensor", lambda c, s: (c, {**s, "base_model.model.lm_head.weight": torch.zeros(2)}), "does not have"),
], ids=lambda x: x if isinstance(x, str) and " " not in x and "\\" not in x else "")
def test_bad_folders_raise_and_leave_the_model_alone(hub, tmp_path, case, edit, message):
    folder = _edited(tmp_path, edit, case)
    names, state = list(hub.adapter_names), hub.adapter_state_dict()
    with pytest.raises(gp.AdapterFileError, match=message):
        gp.import_peft(hub, folder, adapter_name="broken")
    assert hub.adapter_names == names and "broken" not in hub.adapter_names
    assert all(torch.equal(v, hub.adapter_state_dict()[k]) for k, v in state.items())


def test_missing_and_foreign_folders(hub, tmp_path):
    with pytest.raises(gp.AdapterFileError, match="does not exist"):
        gp.import_peft(hub, tmp_path / "nothing")
    folder = _lora_folder(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / FILES[0]).write_text((folder / FILES[0]).read_text())
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(gp.AdapterFileError, match="safe_serialization=True"):
        gp.import_peft(hub, tmp_path / "bin")
    hub.save_adapter(tmp_path / "ours")  # a graphpeft folder is not a PEFT one
    with pytest.raises(gp.AdapterFileError, match="gp.load_adapter"):
        gp.import_peft(hub, tmp_path / "ours")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / FILES[0]).write_text("{not json")
    (tmp_path / "bad" / FILES[1]).write_bytes(b"")
    with pytest.raises(gp.AdapterFileError, match="not valid JSON"):
        gp.import_peft(hub, tmp_path / "bad")
    with pytest.raises(gp.AdapterFileError, match="cannot be imported as 'ia3'"):
        gp.import_peft(hub, folder, adapter_name="x", method="ia3")
