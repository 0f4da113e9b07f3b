"""Parity of the compiled training step: torch eager vs compiled step vs onnxruntime.

For LoRA on Llama, GPT-2, BERT and a CNN, 5 steps of SGD (momentum, weight decay) and of AdamW
(weight decay) run three ways from the same initial adapters:

(a) eager: a plain PyTorch loop, ``torch.optim`` over the compiled model's trainable tensors,
    the loss written out by hand;
(b) the compiled training step (one fx graph: forward, backward, optimizer);
(c) the same step exported to ONNX and run by ``OnnxTrainer`` (plain onnxruntime).

Losses and parameters must agree to 1e-4 relative (parameters: max abs difference over the
largest magnitude, per tensor).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import graphpeft as gp
from graphpeft.backends.onnx import OnnxTrainer

from models import image_batch, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama, token_batch

STEPS = 5
TOL = 1e-4


@dataclasses.dataclass
class Case:
    build: Callable[[], torch.nn.Module]
    rule: gp.LoRA
    batch: tuple  # model inputs, then targets
    n_inputs: int
    kwargs: dict
    loss: Any  # what compile_training gets
    eager_loss: Callable[[Any, tuple], torch.Tensor]  # (outputs, batch) -> loss, written out by hand
    sgd_lr: float = 0.05


def _causal_lm(out: Any, batch: tuple) -> torch.Tensor:
    logits = out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[0][:, 1:].reshape(-1))


IDS = token_batch()
CASES: dict[str, Case] = {
    "llama": Case(tiny_llama, gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random"), (IDS,), 1,
                  {"use_cache": False}, "causal_lm", _causal_lm),
    "gpt2": Case(tiny_gpt2, gp.LoRA(targets=["c_attn"], r=4, init="random"), (IDS,), 1, {"use_cache": False},
                 "causal_lm", _causal_lm),
    "bert": Case(tiny_bert, gp.LoRA(targets=["query", "value"], r=4, init="random"),
                 (IDS, torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3))), 1, {}, "mse",
                 lambda out, b: F.mse_loss(out.last_hidden_state, b[1])),
    "cnn": Case(tiny_cnn, gp.LoRA(targets=["conv1", "conv2", "fc"], r=2, init="random"),
                (image_batch(), torch.tensor([1, 7])), 1, {}, "cross_entropy",
                lambda out, b: F.cross_entropy(out, b[1]), sgd_lr=0.01),
}


def optimizer(name: str, case: Case) -> gp.optim.Optimizer:
    if name == "sgd":
        return gp.optim.SGD(lr=case.sgd_lr, momentum=0.9, weight_decay=0.01)
    return gp.optim.AdamW(lr=1e-3, weight_decay=0.1)


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Max over tensors of max|a - b| / max|b|."""
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-12))
               for k in a)


def loss_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


_COMPILED: dict[str, gp.CompiledModel] = {}


def compiled(arch: str) -> gp.CompiledModel:
    if arch not in _COMPILED:
        case = CASES[arch]
        _COMPILED[arch] = gp.compile(case.build(), gp.Plan([case.rule]), case.batch[:case.n_inputs], case.kwargs)
    return _COMPILED[arch]


def run_three_ways(arch: str, opt_name: str, tmp_path: Any) -> dict[str, Any]:
    """Losses and final adapters of (a) eager, (b) compiled step, (c) onnxruntime."""
    case = CASES[arch]
    cm = compiled(arch)
    opt = optimizer(opt_name, case)
    cm.load_adapter_state_dict(_initial(arch))

    # (a) eager: plain PyTorch loop with torch.optim
    torch_opt = opt.torch_optimizer(cm.trainable_parameters().values())
    eager_losses = []
    for _ in range(STEPS):
        torch_opt.zero_grad()
        loss = case.eager_loss(cm(*case.batch[:case.n_inputs]), case.batch)
        loss.backward()
        torch_opt.step()
        eager_losses.append(float(loss))
    eager = cm.adapter_state_dict()
    for p in cm.trainable_parameters().values():
        p.grad = None

    # (b) compiled step, exported first (the file stores the initial tensors)
    cm.load_adapter_state_dict(_initial(arch))
    step = cm.compile_training(case.loss, opt, example_batch=case.batch)
    path = tmp_path / f"{arch}_{opt_name}.onnx"
    step.export_onnx(path)
    compiled_losses = [float(step(*case.batch)) for _ in range(STEPS)]
    comp = cm.adapter_state_dict()

    # (c) onnxruntime
    trainer = OnnxTrainer(path)
    ort_losses = [trainer.step(*case.batch) for _ in range(STEPS)]
    ort = trainer.adapter_state_dict()
    cm.load_adapter_state_dict(_initial(arch))
    return {"eager": (eager_losses, eager), "compiled": (compiled_losses, comp), "ort": (ort_losses, ort),
            "step": step}


_INITIAL: dict[str, dict[str, torch.Tensor]] = {}


def _initial(arch: str) -> dict[str, torch.Tensor]:
    if arch not in _INITIAL:
        _INITIAL[arch] = compiled(arch).adapter_state_dict()
    return _INITIAL[arch]


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("arch", list(CASES))
def test_eager_compiled_onnxruntime_agree(arch: str, opt_name: str, tmp_path: Any, parity: Any) -> None:
    r = run_three_ways(arch, opt_name, tmp_path)
    (el, ep), (cl, cp), (ol, op) = r["eager"], r["compiled"], r["ort"]
    # training did something
    assert max(float((ep[k] - _initial(arch)[k]).abs().max()) for k in ep) > 1e-4
    figures = {
        "loss eager-compiled": loss_diff(cl, el), "loss eager-ort": loss_diff(ol, el),
        "params eager-compiled": rel_diff(cp, ep), "params eager-ort": rel_diff(op, ep),
        "params compiled-ort": rel_diff(op, cp),
    }
    for what, value in figures.items():
        parity.record(f"train {arch} {opt_name} {what} (rel)", value)
    bad = {k: v for k, v in figures.items() if not v < TOL}
    assert not bad, f"{arch}/{opt_name}: {bad} (losses eager {el}, compiled {cl}, ort {ol})"


def test_adapters_load_back_into_the_model(tmp_path: Any) -> None:
    """trainer.adapter_state_dict() uses the model's (PEFT) key names: it loads into cm, and
    equals what the torch step trains from the same start."""
    case = CASES["gpt2"]
    cm = compiled("gpt2")
    cm.load_adapter_state_dict(_initial("gpt2"))
    step = cm.compile_training(case.loss, gp.optim.SGD(lr=0.1, momentum=0.5), example_batch=case.batch)
    step.export_onnx(tmp_path / "t.onnx")
    trainer = OnnxTrainer(tmp_path / "t.onnx")
    for _ in range(2):
        trainer.step(*case.batch)
        step(*case.batch)
    torch_trained = cm.adapter_state_dict()
    trained = trainer.adapter_state_dict()
    assert set(trained) == set(torch_trained)
    assert rel_diff(trained, torch_trained) < TOL
    cm.load_adapter_state_dict(_initial("gpt2"))
    cm.load_adapter_state_dict(trained)
    assert all(torch.equal(v, trained[k]) for k, v in cm.adapter_state_dict().items())
    cm.load_adapter_state_dict(_initial("gpt2"))
