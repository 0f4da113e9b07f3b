"""Linear layers however they are written (issue 14): ``x @ W.T`` (Falcon's ``FalconLinear``),
``mm`` against ``W.t()``, ``addmm``, ``matmul`` with ``W.transpose`` and einsum all become
``aten.linear`` at trace time, so LoRA (and every other method) targets them, merges into the
weight and exports. ``peft`` is the oracle where it can wrap the module (an ``nn.Linear``
subclass); a hand-written LoRA is the reference for modules peft cannot wrap."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn

import graphpeft as gp
from graphpeft.linear_forms import LINEAR_FORM_KEY

aten = torch.ops.aten


class FalconLinear(nn.Linear):
    """transformers' Falcon: an nn.Linear whose forward is a matmul against ``weight.T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class Proj(nn.Module):
    """A projection with its own parameter, written one of several ways (peft cannot wrap it)."""

    def __init__(self, n_in: int, n_out: int, form: str, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1) if bias else None
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.form == "matmul_T":
            y = x @ w.T
        elif self.form == "transpose":
            y = torch.matmul(x, w.transpose(0, 1))
        elif self.form == "permute":
            y = x @ w.permute(1, 0)
        elif self.form == "einsum":
            y = torch.einsum("...i,oi->...o", x, w)
        elif self.form == "einsum_wx":
            y = torch.einsum("oi,bsi->bso", w, x)
        elif self.form == "mm":
            y = x.reshape(-1, x.shape[-1]).mm(w.t()).reshape(*x.shape[:-1], -1)
        elif self.form == "addmm":
            y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), w.t()).reshape(*x.shape[:-1], -1)
            return y
        else:
            raise ValueError(self.form)
        return y if self.bias is None else y + self.bias


FORMS = ["matmul_T", "transpose", "permute", "einsum", "einsum_wx", "mm", "addmm"]
#: the op each form is traced as (recorded on the linear node that replaces it)
TRACED_AS = {"matmul_T": "matmul", "transpose": "matmul", "permute": "matmul", "einsum": "einsum",
             "einsum_wx": "einsum", "mm": "mm", "addmm": "addmm"}


class Block(nn.Module):
    """A Falcon-like MLP block built from one kind of projection."""

    def __init__(self, form: str, bias: bool = False, d: int = 8, h: int = 12) -> None:
        super().__init__()
        self.up = Proj(d, h, form, bias or form == "addmm")
        self.down = Proj(h, d, form, bias or form == "addmm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _lora_reference(model: Block, cm: gp.CompiledModel, x: torch.Tensor) -> torch.Tensor:
    """The LoRA forward written by hand: each Proj's output plus s · B(A(x))."""
    params = cm.trainable_parameters()
    s = 16 / 4

    def hooked(name):
        def hook(mod, inp, out):
            a, b = params[f"{name}.lora_A.weight"], params[f"{name}.lora_B.weight"]
            return out + (inp[0] @ a.T @ b.T) * s
        return hook

    ref = copy.deepcopy(model)
    for name in ("up", "down"):
        getattr(ref, name).register_forward_hook(hooked(name))
    return ref(x)


def _compile(model: nn.Module, x: torch.Tensor, targets, **kw) -> gp.CompiledModel:
    plan = gp.Plan([gp.LoRA(targets=targets, r=4, alpha=16, init="random", **kw)])
    return gp.compile(model, plan, (x,))


@pytest.mark.parametrize("form,frontend", [(f, "export") for f in FORMS] + [("matmul_T", "fx"), ("einsum", "fx")])
def test_every_form_becomes_one_linear(form, frontend):
    torch.manual_seed(0)
    model, x = Block(form).eval(), torch.randn(2, 5, 8)
    gm = gp.trace(model, (x,), frontend=frontend).gm
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(aten.linear.default) == 2
    assert not {aten.matmul.default, aten.mm.default, aten.addmm.default, aten.einsum.default,
                aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int} & set(ops)
    forms = {n.meta[LINEAR_FORM_KEY] for n in gm.graph.nodes if n.target == aten.linear.default}
    assert forms == {TRACED_AS[form]}
    layers = gp.find_layers(gm)
    assert [(l.path, l.kind, l.in_features, l.out_features) for l in layers] == [("up", "linear", 8, 12),
                                                                              ("down", "linear", 12, 8)]
    with torch.no_grad():  # the canonical form computes the same bits
        assert torch.equal(gm(x)[0], model(x))


@pytest.mark.parametrize("form,bias", [("matmul_T", False), ("einsum_wx", False), ("mm", False), ("addmm", False),
                                       ("matmul_T", True), ("einsum", True)])
def test_lora_matches_a_hand_written_reference_and_merges(form, bias):
    torch.manual_seed(0)
    model, x = Block(form, bias).eval(), torch.randn(2, 5, 8)
    cm = _compile(model, x, ["up", "down"])
    assert sorted(r["layer"] for r in cm.adapters().values()) == ["down", "up"]
    if bias or form == "addmm":  # the bias add is folded into the layer, as nn.Linear holds it
        assert {l.bias for l in gp.find_layers(cm.graph_module)} >= {"up.bias", "down.bias"}
    with torch.no_grad():
        ref = _lora_reference(model, cm, x)
        out = cm(x)
        assert (out - ref).abs().max().item() < 1e-6
        merged = cm.merge()
        assert (merged(x) - ref).abs().max().item() < 1e-5
        p = cm.trainable_parameters()
        w = model.up.weight + 4 * p["up.lora_B.weight"] @ p["up.lora_A.weight"]
        assert torch.allclose(merged.graph_module.get_parameter("up.weight"), w, atol=1e-6)
    ops = {n.target for n in merged.graph_module.graph.nodes if n.op == "call_function"}
    assert ops.isdisjoint({aten.mm.default, aten.matmul.default})


def test_falcon_linear_matches_peft_and_exports():
    """An nn.Linear subclass computing ``x @ W.T`` (Falcon): peft wraps it; so does graphpeft."""
    from graphpeft.backends.onnx import OnnxRunner
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)

    class Falcon(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query_key_value = FalconLinear(8, 24, bias=False)
            self.dense = FalconLinear(24, 8, bias=True)

        def forward(self, x):
            return self.dense(torch.tanh(self.query_key_value(x)))

    model, x = Falcon().eval(), torch.randn(2, 5, 8)
    targets = ["query_key_value", "dense"]
    cm = _compile(model, x, targets)
    assert len(cm.adapters()) == 2
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    res = set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
    assert not res.unexpected_keys
    pm.eval()
    with torch.no_grad():
        assert (cm(x) - pm(x)).abs().max().item() == 0.0
        merged = cm.merge()
        assert (merged(x) - pm(x)).abs().max().item() < 1e-5
        with tempfile.TemporaryDirectory() as d:
            cm.export_onnx(os.path.join(d, "u.onnx"), merged=False)  # the adapter branch on a matmul layer
            ort = OnnxRunner(os.path.join(d, "u.onnx")).run(cm.flat_inputs(x))[0]
            assert abs(ort - pm(x).numpy()).max() < 1e-5


def test_all_linear_and_ia3_on_matmul_layers():
    """Falcon-style layers are ``linear`` layers for every method; IA3 on the output sees the
    bias inside the layer as peft's IA3 on an nn.Linear subclass does."""
    from peft import IA3Config, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(0)
    model = nn.Sequential(FalconLinear(8, 12), nn.ReLU(), FalconLinear(12, 4)).eval()
    x = torch.randn(3, 8)
    layers = gp.find_layers(gp.trace(model, (x,)).gm)
    assert [(l.path, l.kind, l.bias) for l in layers] == [("0", "linear", "0.bias"), ("2", "linear", "2.bias")]
    cm = gp.compile(model, gp.Plan([gp.IA3(targets="all-linear", feedforward_modules=["2"])]), (x,))
    with torch.no_grad():
        for p in cm.trainable_parameters().values():
            p.uniform_(0.5, 1.5)
    pm = get_peft_model(copy.deepcopy(model), IA3Config(target_modules="all-linear", feedforward_modules=["2"]))
    set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()})
    with torch.no_grad():
        assert (cm(x) - pm.eval()(x)).abs().max().item() < 1e-6


def test_training_step_on_einsum_layers():
    torch.manual_seed(0)
    model, x = Block("einsum").eval(), torch.randn(2, 5, 8)
    cm = _compile(model, x, ["up", "down"])
    before = {k: v.clone() for k, v in cm.trainable_parameters().items()}
    step = cm.compile_training("mse", gp.optim.SGD(lr=1e-2))
    step(x, torch.randn(2, 5, 8))
    after = cm.trainable_parameters()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(cm.graph_module.get_parameter("up.weight"), model.up.weight)


def test_untransposed_weights_and_other_einsums_stay_as_written():
    """``x @ W`` with W stored (in, out), a weight computed in forward and a batched einsum are
    not linear layers of a parameter: nothing is rewritten, nothing is matched."""

    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 6))
            self.v = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            y = x @ self.w                      # stored (in, out): not a transposed weight
            y = y @ (self.v * 2).T              # computed weight
            return torch.einsum("bsi,bti->bst", y, y)  # attention-like: no weight

    model, x = Other().eval(), torch.randn(2, 3, 8)
    gm = gp.trace(model, (x,)).gm
    assert not any(n.target == aten.linear.default for n in gm.graph.nodes)
    assert gp.find_layers(gm) == []
