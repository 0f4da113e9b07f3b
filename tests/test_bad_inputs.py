"""Bad input at every public entry (issue 14): each case raises a typed ``gp.GraphPeftError``
subclass whose message says what is wrong and what to do, and a failed write leaves nothing
behind. Small models only; the compiled fixtures are shared by the whole module."""

from __future__ import annotations

import json
import os

import pytest
import torch

import graphpeft as gp
from graphpeft.backends.onnx import OnnxRunner, OnnxTrainer


class TwoInputs(torch.nn.Module):
    """``forward(x, mask=None, scale=False)``: two tensor inputs and a baked-in flag."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x, mask, scale=False):
        h = torch.relu(self.a(x * mask))
        return self.b(h) * (2.0 if scale else 1.0)


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
MASK = torch.ones(4, 6)
Y = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cm():
    torch.manual_seed(0)
    return gp.compile(TwoInputs().eval(), gp.Plan([gp.LoRA(targets=["a", "b"], r=2)]), (X,),
                      {"mask": MASK, "scale": False})


@pytest.fixture(scope="module")
def step(cm):
    return cm.compile_training("mse", gp.optim.SGD(lr=1e-2))


@pytest.fixture(scope="module")
def exported_step(step, tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "t.onnx"
    step.export_onnx(path)
    return path


def _raises(error, match, fn, *args, **kwargs):
    with pytest.raises(error, match=match) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, gp.GraphPeftError)
    return info.value


def _listing(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs + _)


SIGNATURE = r"compiled signature: \(args\[0\]: float32\[s\d+, 6\], mask: float32\[s\d+, 6\]\)"

# --- calling a compiled model ----------------------------------------------------------------------

CALLS = {
    "float64 input": ((X.double(),), {"mask": MASK}, r"input args\[0\] has dtype float64, but the model was compiled "
                                                     r"for args\[0\]: float32\[s\d+, 6\].*" + SIGNATURE),
    "int input": ((X.long(),), {"mask": MASK}, r"dtype int64.*\.to\(dtype\)"),
    "mask dtype": ((X,), {"mask": MASK.bool()}, r"input mask has dtype bool"),
    "rank 1": ((X[0],), {"mask": MASK}, r"input args\[0\] has 1 dimensions \(shape \[6\]\)"),
    "rank 3": ((X[None],), {"mask": MASK}, r"has 3 dimensions"),
    "fixed dim": ((torch.randn(4, 7),), {"mask": MASK}, r"shape \[4, 7\] \(dimension 1 is fixed to 6\)"),
    "too many args": ((X, MASK), {"mask": MASK}, r"compiled with 1 positional argument.*got 2.*" + SIGNATURE),
    "no args": ((), {"mask": MASK}, r"got 0 positional argument"),
    "unknown kwarg": ((X,), {"mask": MASK, "other": 1}, r"keyword arguments \['other'\] were not given when the model "
                                                       r"was compiled"),
    "list for a tensor": (([1.0] * 6,), {"mask": MASK}, r"positional argument 0 was a tensor .* got list"),
    "None for a tensor": ((X,), {"mask": None}, r"keyword argument mask was a tensor .* got NoneType"),
    "changed constant": ((X,), {"mask": MASK, "scale": True}, r"was False when the model was compiled and is True "
                                                             r"now; constants are baked into the graph"),
}


@pytest.mark.parametrize("case", list(CALLS))
def test_bad_call(cm, case):
    args, kwargs, match = CALLS[case]
    err = _raises(gp.InputError, match, cm, *args, **kwargs)
    assert isinstance(err, TypeError)  # what such calls raised before: old `except TypeError` still works
    _raises(gp.InputError, match, cm.flat_inputs, *args, **kwargs)


def test_dynamic_batch_is_not_an_error(cm):
    assert cm(torch.randn(7, 6), mask=torch.ones(7, 6)).shape == (7, 3)


# --- writing files ---------------------------------------------------------------------------------


def _unwritable(tmp_path):
    """A folder nobody may write into: a read-only folder, or /proc (root ignores permissions)."""
    if os.geteuid() == 0:
        return "/proc/graphpeft-test"
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return str(folder)


def _a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a folder")
    return f


FILE_PATHS = {
    "a folder": (lambda t: t, r"is a folder; give a file path such as"),
    "parent is a file": (lambda t: _a_file(t) / "m.onnx", r"is a file, not a folder; choose another path"),
    "ancestor is a file": (lambda t: _a_file(t) / "x" / "y" / "m.onnx", r"is a file, not a folder"),
    "unwritable": (lambda t: os.path.join(_unwritable(t), "m.onnx"), r"is not writable .*choose a writable path"),
    "not a path": (lambda t: 12, r"the path must be a str or os.PathLike, got int 12"),
    "empty": (lambda t: "", r"the path is empty"),
}


@pytest.mark.parametrize("case", list(FILE_PATHS))
def test_export_onnx_bad_path(cm, tmp_path, case):
    make, match = FILE_PATHS[case]
    before = _listing(tmp_path)
    _raises(gp.ExportError, "export_onnx: .*" + match, cm.export_onnx, make(tmp_path))
    assert _listing(tmp_path) == before or case in ("parent is a file", "ancestor is a file")  # (the fixture file)
    assert not [f for f in _listing(tmp_path) if f.endswith((".onnx", ".tmp", ".data"))]


@pytest.mark.parametrize("case", ["a folder", "parent is a file", "unwritable"])
def test_training_export_bad_path(step, tmp_path, case):
    make, match = FILE_PATHS[case]
    _raises(gp.ExportError, "export_onnx: .*" + match, step.export_onnx, make(tmp_path))
    assert not [f for f in _listing(tmp_path) if f.endswith((".onnx", ".tmp", ".data"))]


@pytest.mark.parametrize("case", ["a folder", "parent is a file"])
def test_executorch_export_bad_path(cm, tmp_path, case):
    make, match = FILE_PATHS[case]
    _raises(gp.ExportError, "export_executorch: .*" + match, cm.export_executorch, make(tmp_path))


@pytest.mark.parametrize("case", ["a folder", "parent is a file", "unwritable"])
def test_save_checkpoint_bad_path(step, tmp_path, case):
    make, match = FILE_PATHS[case]
    _raises(gp.GraphPeftError, "save_checkpoint: .*" + match, step.save_checkpoint, make(tmp_path))
    assert not [f for f in _listing(tmp_path) if f.endswith((".safetensors", ".tmp"))]


FOLDER_PATHS = {
    "a file": (lambda t: _a_file(t), r"is a file, not a folder; give a folder path"),
    "parent is a file": (lambda t: _a_file(t) / "adapter", r"is a file, not a folder; choose another path"),
    "unwritable": (lambda t: os.path.join(_unwritable(t), "adapter"), r"is not writable"),
    "not a path": (lambda t: None, r"the path must be a str or os.PathLike, got NoneType"),
}


@pytest.mark.parametrize("case", list(FOLDER_PATHS))
def test_save_adapter_bad_folder(cm, tmp_path, case):
    make, match = FOLDER_PATHS[case]
    _raises(gp.AdapterFileError, "save_adapter: .*" + match, cm.save_adapter, make(tmp_path))
    assert not [f for f in _listing(tmp_path) if f.endswith((".safetensors", ".json", ".tmp"))]


@pytest.mark.parametrize("case", ["a file", "unwritable"])
def test_export_peft_bad_folder(cm, tmp_path, case):
    make, match = FOLDER_PATHS[case]
    _raises(gp.AdapterFileError, "export_peft: .*" + match, gp.export_peft, cm, make(tmp_path))


# --- reading files and state -----------------------------------------------------------------------


def test_load_adapter_missing_folder(cm, tmp_path):
    _raises(gp.AdapterFileError, r"", gp.load_adapter, cm, tmp_path / "nothing")


def test_load_adapter_corrupted_config(cm, tmp_path):
    cm.save_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    _raises(gp.AdapterFileError, r"", gp.load_adapter, cm, tmp_path / "a")


def test_load_adapter_tampered_weights(cm, tmp_path):
    cm.save_adapter(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-20:-16] = b"\x7f\x7f\x7f\x7f"  # a changed value: the checksum no longer matches
    path.write_bytes(bytes(data))
    _raises(gp.AdapterFileError, r"", gp.load_adapter, cm, tmp_path / "a")


def test_load_state_dict_wrong_shape(cm):
    sd = cm.adapter_state_dict()
    key = next(iter(sd))
    _raises(gp.GraphPeftError, key, cm.load_adapter_state_dict, {**sd, key: torch.zeros(1)})


def test_load_state_dict_unknown_key(cm):
    _raises(gp.GraphPeftError, "nope.lora_A.weight", cm.load_adapter_state_dict,
            {**cm.adapter_state_dict(), "nope.lora_A.weight": torch.zeros(2, 6)})


def test_load_state_dict_non_finite(cm):
    sd = cm.adapter_state_dict()
    key = next(iter(sd))
    _raises(gp.GraphPeftError, "finite", cm.load_adapter_state_dict, {**sd, key: torch.full_like(sd[key], float("nan"))})


def test_onnx_trainer_missing_file(tmp_path):
    _raises(gp.ExportError, r"does not exist: export a training step", OnnxTrainer, tmp_path / "none.onnx")


def test_onnx_trainer_not_onnx(tmp_path):
    (tmp_path / "bad.onnx").write_text("hello")
    _raises(gp.ExportError, r"not a readable ONNX file .*export it again", OnnxTrainer, tmp_path / "bad.onnx")


def test_onnx_trainer_wrong_batch_shape(exported_step):
    _raises(gp.ExportError, r"must be float32\[4, 6\] .*export the step for this batch shape",
            OnnxTrainer(exported_step).step, torch.randn(2, 6), MASK, Y)


def test_onnx_trainer_wrong_batch_count(exported_step):
    _raises(gp.ExportError, r"takes 3 batch tensors \(2 model inputs, 1 targets\), got 1", OnnxTrainer(exported_step).step, X)


def test_onnx_runner_wrong_input_count(cm, tmp_path):
    cm.export_onnx(tmp_path / "m.onnx")
    _raises(gp.ExportError, r"the graph takes 2 inputs", OnnxRunner(tmp_path / "m.onnx").run, [X])


def test_onnx_runner_missing_file(tmp_path):
    _raises(gp.ExportError, r"onnxruntime could not load", OnnxRunner, tmp_path / "none.onnx")


def test_load_checkpoint_missing(step, tmp_path):
    _raises(gp.GraphPeftError, r"does not exist", step.load_checkpoint, tmp_path / "none.safetensors")


def test_load_checkpoint_corrupted(step, tmp_path):
    (tmp_path / "c.safetensors").write_bytes(b"garbage")
    _raises(gp.GraphPeftError, r"corrupted or not a safetensors file", step.load_checkpoint, tmp_path / "c.safetensors")


def test_step_load_state_dict_wrong_shape(step):
    sd = step.state_dict()
    key = next(iter(sd["params"]))
    sd["params"][key] = torch.zeros(1)
    _raises(gp.GraphPeftError, r"does not fit this training step \(nothing was loaded\)", step.load_state_dict, sd)


# --- plans, compile, training options --------------------------------------------------------------


def test_unknown_rule_option():
    _raises(gp.PlanError, r"unknown option\(s\) 'rank' \(did you mean 'r'\?\)", gp.Plan.from_dict,
            {"rules": [{"lora": {"targets": ["a"], "rank": 4}}]})


def test_bad_regex():
    _raises(gp.PlanError, r"", gp.Plan.from_dict, {"rules": [{"lora": {"targets": "(unclosed"}}]})


def test_zero_rank():
    _raises(gp.PlanError, r"r must be", gp.LoRA, targets=["a"], r=0)


def test_dropout_out_of_range():
    _raises(gp.PlanError, r"dropout", gp.LoRA, targets=["a"], dropout=1.5)


def test_rule_matching_nothing():
    _raises(gp.PlanError, r"", gp.compile, TwoInputs().eval(), gp.Plan([gp.LoRA(targets=["q_proj"])]), (X,),
            {"mask": MASK})


def test_unknown_training_option(cm):
    _raises(gp.PlanError, r"unknown training option\(s\) \['acumulation_steps'\]", cm.compile_training, "mse",
            gp.optim.SGD(lr=0.1), acumulation_steps=2)


def test_bad_accumulation_steps(cm):
    _raises(gp.PlanError, r"accumulation_steps must be a positive integer", cm.compile_training, "mse",
            gp.optim.SGD(lr=0.1), accumulation_steps=0)


def test_unknown_loss(cm):
    _raises(gp.PlanError, r"unknown loss 'msee'", cm.compile_training, "msee", gp.optim.SGD(lr=0.1))


def test_step_with_too_few_batch_tensors(step):
    _raises(gp.PlanError, r"the batch has 1 tensors but the model takes 2 inputs", step, X)


def test_unknown_adapter_name(cm):
    _raises(gp.AdapterError, r"no adapter named 'other'", cm.set_adapter, "other")


def test_import_peft_missing_folder(tmp_path):
    _raises(gp.AdapterFileError, r"", gp.import_peft, TwoInputs().eval(), tmp_path / "none", (X,), {"mask": MASK})


def test_step_with_a_wrong_dtype_batch(step):
    _raises(gp.InputError, r"input args\[0\] has dtype float64.*compiled signature", step, X.double(), MASK, Y)


def test_step_with_a_wrong_rank_batch(step):
    _raises(gp.InputError, r"input mask has 3 dimensions", step, X, MASK[None], Y)


@pytest.mark.parametrize("case", ["a folder", "parent is a file"])
def test_training_executorch_export_bad_path(step, tmp_path, case):
    make, match = FILE_PATHS[case]
    _raises(gp.ExportError, "export_executorch: .*" + match, step.export_executorch, make(tmp_path))
