"""Adapter files (issue 2, part 7): ``adapter_model.safetensors`` (PEFT key names) plus
``adapter_config.json``, written atomically.

Round trip: a new compile with the same plan plus ``load_adapter`` gives the same outputs.
Every broken file (corrupted JSON, truncated or bit-flipped weights, missing file, wrong shapes,
another plan) raises :class:`AdapterFileError` with a clear message, and the model's adapters
are exactly what they were before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

import graphpeft as gp
from graphpeft import adapter_io

from conftest import ARCHS, max_diff

PLAN = gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8, init="random")])
FILES = ["adapter_config.json", "adapter_model.safetensors"]


def compile_llama(plan=PLAN, seed=0):
    arch = ARCHS["llama"]
    args, kwargs = arch.inputs()
    cm = gp.compile(LLAMA, plan, example_inputs=args, example_kwargs=kwargs, seed=seed)
    return cm.eval()


LLAMA = ARCHS["llama"].build()


@pytest.fixture(scope="module")
def source():
    return compile_llama()


@pytest.fixture(scope="module")
def saved(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    source.save_adapter(folder)
    return folder


@pytest.fixture(scope="module")
def target():
    """Same plan, other seed: other adapters until a file is loaded into it."""
    return compile_llama(seed=1)


def out(cm):
    args, kwargs = ARCHS["llama"].inputs()
    with torch.no_grad():
        return cm(*args, **kwargs)


def snapshot(cm):
    return {k: v.clone() for k, v in cm.adapter_state_dict().items()}


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_writes_two_files_with_peft_names(source, saved):
    assert sorted(os.listdir(saved)) == FILES  # and no temporary files
    modules = dict(LLAMA.named_modules())
    with safe_open(os.fspath(saved / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        assert f.metadata() == {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in keys}
    assert len(keys) == 8  # 2 layers x (q, v) x (A, B)
    for k in keys:
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", k)
        assert m and m.group(1) in modules, k
    assert keys[0] == "model.layers.0.self_attn.q_proj.lora_A.weight"
    own = source.adapter_state_dict()
    assert all(torch.equal(tensors[k], own[k]) for k in keys)
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["format"] == "graphpeft-adapter" and config["format_version"] == 1
    assert config["plan"] == PLAN.to_dict()
    assert config["tensors"]["model.layers.0.self_attn.v_proj.lora_B.weight"] == [16, 4]
    assert config["weights_sha256"] == hashlib.sha256((saved / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert config["adapters"]["model.layers.1.self_attn.q_proj"]["scaling"] == 2.0


def test_round_trip_gives_the_same_outputs(source, saved):
    fresh = compile_llama(seed=1)
    assert max_diff(out(fresh), out(source)) > 1e-3  # different adapters before loading
    assert gp.load_adapter(fresh, saved) is fresh
    assert max_diff(out(fresh), out(source)) == 0.0
    assert same_state(fresh.adapter_state_dict(), source.adapter_state_dict())


def test_state_dict_round_trip_accepts_peft_prefixed_keys(source, target):
    before = snapshot(target)
    try:
        target.load_adapter_state_dict({"base_model.model." + k: v for k, v in source.adapter_state_dict().items()})
        assert same_state(target.adapter_state_dict(), source.adapter_state_dict())
    finally:
        target.load_adapter_state_dict(before)


# --- broken files ---------------------------------------------------------------------------------


def broken_copy(saved, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    edit(folder)
    return folder


def write_weights(folder, state, fix_checksum=True):
    """Replace the weights file (and, like a consistent but wrong save, its checksum)."""
    blob = save(state)
    (folder / "adapter_model.safetensors").write_bytes(blob)
    if fix_checksum:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        (folder / "adapter_config.json").write_text(json.dumps(cfg))


def corrupt_json(folder):
    (folder / "adapter_config.json").write_text('{"format": "graphpeft-adapter", ')


def truncate(folder):
    p = folder / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:100])


def flip_bit(folder):
    p = folder / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[-7] ^= 0x04  # inside the last tensor's values
    p.write_bytes(bytes(data))


def remove_weights(folder):
    os.unlink(folder / "adapter_model.safetensors")


def remove_config(folder):
    os.unlink(folder / "adapter_config.json")


def not_safetensors(folder):
    blob = b"this is not a safetensors file"
    (folder / "adapter_model.safetensors").write_bytes(blob)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def wrong_shapes(folder):
    with safe_open(os.fspath(folder / "adapter_model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k)[:2].contiguous() if k.endswith("lora_A.weight") else f.get_tensor(k)
                 for k in f.keys()}  # rank 2 instead of 4 in every A
    write_weights(folder, state)


def missing_key(folder):
    with safe_open(os.fspath(folder / "adapter_model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state.pop("model.layers.1.self_attn.v_proj.lora_B.weight")
    write_weights(folder, state)


def nan_values(folder):
    with safe_open(os.fspath(folder / "adapter_model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    write_weights(folder, state)


def other_format(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["format_version"] = 99
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def not_a_mapping(folder):
    (folder / "adapter_config.json").write_text("[1, 2, 3]")


@pytest.mark.parametrize("edit, message", [
    (corrupt_json, r"adapter_config.json is corrupted \(not valid JSON"),
    (not_a_mapping, r"adapter_config.json is not a graphpeft adapter config"),
    (other_format, r"has format version 99; this graphpeft reads version 1"),
    (truncate, r"adapter_model.safetensors does not match its config \(checksum differs\)"),
    (flip_bit, r"adapter_model.safetensors does not match its config \(checksum differs\)"),
    (remove_weights, r"adapter_model.safetensors does not exist: pass the folder that save_adapter\(\) wrote"),
    (remove_config, r"adapter_config.json does not exist"),
    (not_safetensors, r"adapter_model.safetensors is not a valid safetensors file"),
    (wrong_shapes, r"nothing was loaded.*q_proj.lora_A.weight has shape \(2, 32\), the model needs \(4, 32\)"),
    (missing_key, r"nothing was loaded.*missing keys \['model.layers.1.self_attn.v_proj.lora_B.weight'\]"),
    (nan_values, r"v_proj.lora_B.weight holds non-finite"),
], ids=lambda v: getattr(v, "__name__", None))
def test_broken_file_raises_and_leaves_the_model_unchanged(saved, target, tmp_path, edit, message):
    folder = broken_copy(saved, tmp_path, edit)
    before, before_out = snapshot(target), out(target)
    with pytest.raises(gp.AdapterFileError, match=message):
        gp.load_adapter(target, folder)
    assert same_state(target.adapter_state_dict(), before)
    assert max_diff(out(target), before_out) == 0.0


def test_missing_folder(target, tmp_path):
    with pytest.raises(gp.AdapterFileError, match="does not exist"):
        gp.load_adapter(target, tmp_path / "nowhere")


def test_plan_mismatch(saved, tmp_path):
    other = compile_llama(gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=2, alpha=8, init="random")]))
    before = snapshot(other)
    with pytest.raises(gp.AdapterFileError, match="saved from a model compiled with a different plan.*"
                                                  "compile with the same plan to load it"):
        gp.load_adapter(other, saved)
    assert same_state(other.adapter_state_dict(), before)


def test_state_dict_errors_load_nothing(source, target):
    before = snapshot(target)
    good = source.adapter_state_dict()
    bad = dict(good)
    bad["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 3)
    bad["model.layers.9.mlp.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(gp.AdapterFileError) as info:
        target.load_adapter_state_dict(bad)
    msg = str(info.value)
    assert "unexpected keys ['model.layers.9.mlp.lora_A.weight']" in msg
    assert "has shape (3, 3), the model needs (4, 32)" in msg
    assert "same plan" in msg
    assert same_state(target.adapter_state_dict(), before)  # the good keys were not loaded either
    with pytest.raises(gp.AdapterFileError, match="is a str, not a tensor"):
        target.load_adapter_state_dict({**good, "model.layers.0.self_attn.q_proj.lora_A.weight": "x"})
    assert same_state(target.adapter_state_dict(), before)


# --- atomic writes ------------------------------------------------------------------------------------


def test_failed_save_keeps_the_previous_files_and_leaves_no_temp(source, target, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    target.save_adapter(folder)
    old = {f: (folder / f).read_bytes() for f in FILES}
    calls = []

    def fail_second(src, dst):  # the weights are replaced, then the config write fails
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(adapter_io.os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"):
        source.save_adapter(folder)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == FILES  # no temporary file left
    assert (folder / "adapter_config.json").read_bytes() == old["adapter_config.json"]
    # the new weights with the old config: detected, not silently loaded
    with pytest.raises(gp.AdapterFileError, match="checksum differs"):
        gp.load_adapter(target, folder)
    # saving again repairs the folder
    source.save_adapter(folder)
    assert sorted(os.listdir(folder)) == FILES
    adapter_io.read_adapter(folder)


def test_saving_a_merged_model_is_an_error(source, tmp_path):
    with pytest.raises(gp.AdapterFileError, match="no adapter tensors to save"):
        source.merge().save_adapter(tmp_path / "x")
