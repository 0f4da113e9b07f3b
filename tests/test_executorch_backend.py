"""ExecuTorch backend (issue 13): every program is run by ExecuTorch's own runtime
(``executorch.runtime``) and compared with torch.

Per architecture (Llama, GPT-2, BERT for sequence classification, ViT, a ResNet-style CNN; one
layer, hidden 16, so the lowering stays seconds):

* inference ``.pte``, merged (adapters folded) and unmerged (adapter branch kept): outputs
  within 1e-4 of the torch graph;
* training ``.pte``: forward, pruned backward and AdamW in one method; 5 steps from the same
  start as the compiled torch step: losses within 1e-4 relative, parameters within 1e-3.

Lowering is slow (ExecuTorch re-traces and re-verifies the graph; XNNPACK preprocesses each
partition), so most tests lower to the portable kernels; XNNPACK runs Llama's merged and
unmerged programs, the adapters-as-inputs + .ptd program and GPT-2's training step.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("executorch.runtime", reason="ExecuTorch is an optional extra: pip install 'graphpeft[executorch]'")

import graphpeft as gp  # noqa: E402
from graphpeft.backends.executorch import ExecuTorchRunner, ExecuTorchTrainer  # noqa: E402

import models as M  # noqa: E402

INFER_TOL = 1e-4
LOSS_TOL = 1e-4
PARAM_TOL = 1e-3
STEPS = 5


def _bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def _ids() -> torch.Tensor:
    return M.token_batch(vocab=128, batch=2, seq=8)


def _causal(out: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


_MASK = torch.ones(2, 8, dtype=torch.long)
_MASK[0, 5:] = 0
_LABELS = torch.tensor([2, 0])
_IMAGES = M.image_batch(batch=2)

# name -> (build, LoRA targets, model args, model kwargs, loss for compile_training, targets)
ARCHS: dict[str, tuple] = {
    "llama": (lambda: M.tiny_llama(layers=1, hidden=16), ["q_proj", "v_proj"], (_ids(),), {"use_cache": False},
              "causal_lm", ()),
    "gpt2": (lambda: M.tiny_gpt2(layers=1, hidden=16), ["c_attn"], (_ids(),), {"use_cache": False}, "causal_lm", ()),
    "bert_cls": (_bert_cls, ["query", "value"], (_ids(),), {"attention_mask": _MASK},
                 lambda out, y: F.cross_entropy(out.logits, y), (_LABELS,)),
    "vit": (lambda: M.tiny_vit(layers=1, hidden=16), ["q_proj", "v_proj"], (_IMAGES,), {},
            lambda out, y: F.mse_loss(out.last_hidden_state, y),
            (torch.randn(2, 17, 16, generator=torch.Generator().manual_seed(4)),)),
    "cnn": (M.tiny_cnn, ["layer1.conv2", "fc"], (_IMAGES,), {}, "cross_entropy", (torch.tensor([1, 7]),)),
}

_CACHE: dict[str, Any] = {}


def compiled(arch: str) -> gp.CompiledModel:
    if arch not in _CACHE:
        build, targets, args, kwargs, _, _ = ARCHS[arch]
        cm = gp.compile(build(), gp.Plan([gp.LoRA(targets=targets, r=2, alpha=4, init="random")]),
                        example_inputs=args, example_kwargs=kwargs)
        cm.eval()
        _CACHE[arch] = cm
    return _CACHE[arch]


def torch_outputs(cm: gp.CompiledModel) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(cm.graph_module(*cm.example_inputs))


def max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


# one XNNPACK export per kind (its lowering costs tens of seconds); the rest portable
# unmerged Llama through XNNPACK guards against its linear fusion taking the LoRA branch into the
# base layer's partition (silently wrong outputs before legalize_executorch's partition_meta rule)
XNNPACK_INFER = {("llama", True), ("llama", False)}
XNNPACK_TRAIN = {"gpt2"}


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_inference_pte_matches_torch(arch: str, merged: bool, tmp_path: Any, parity: Any) -> None:
    cm = compiled(arch)
    delegate = "xnnpack" if (arch, merged) in XNNPACK_INFER else "portable"
    path = tmp_path / f"{arch}.pte"
    result = cm.export_executorch(path, merged=merged, delegate=delegate)
    assert result.delegate == delegate, result.fallback_reason
    if delegate == "xnnpack":
        assert result.delegated_ops > 0
    reference = torch_outputs(cm.merge() if merged else cm)
    got = ExecuTorchRunner(path).run(list(cm.example_inputs))
    d = max_abs(got, reference)
    parity.record(f"executorch {arch} {'merged' if merged else 'unmerged'} ({delegate}) max abs", d)
    assert d <= INFER_TOL, d


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-12))
               for k in a)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_pte_matches_torch_step(arch: str, tmp_path: Any, parity: Any) -> None:
    cm = compiled(arch)
    _, _, args, _, loss, targets = ARCHS[arch]
    initial = cm.adapter_state_dict()
    batch = (*cm.example_inputs, *targets)
    try:
        cm.train()
        step = cm.compile_training(loss, gp.optim.AdamW(lr=1e-2, weight_decay=0.1), example_batch=batch)
        delegate = "xnnpack" if arch in XNNPACK_TRAIN else "portable"
        path = tmp_path / f"{arch}_train.pte"
        result = step.export_executorch(path, delegate=delegate)
        assert result.delegate == delegate, result.fallback_reason
        torch_losses = [float(step(*batch)) for _ in range(STEPS)]
        trained = cm.adapter_state_dict()
        trainer = ExecuTorchTrainer(path)
        et_losses = [trainer.step(*batch) for _ in range(STEPS)]
    finally:
        cm.load_adapter_state_dict(initial)
        cm.eval()
    assert max(float((trained[k] - initial[k]).abs().max()) for k in trained) > 1e-3  # it trained
    loss_rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(et_losses, torch_losses))
    params_rel = rel_diff(trainer.adapter_state_dict(), trained)
    parity.record(f"executorch train {arch} adamw x{STEPS} ({delegate}) loss rel", loss_rel)
    parity.record(f"executorch train {arch} adamw x{STEPS} ({delegate}) params rel", params_rel)
    assert loss_rel <= LOSS_TOL, (et_losses, torch_losses)
    assert params_rel <= PARAM_TOL, params_rel


def test_program_data_separation_one_base_many_adapters(tmp_path: Any, parity: Any) -> None:
    """adapters_as_inputs + external_data: the .pte holds the program, the .ptd the base weights,
    and no adapter tensor; each adapter's tensors are fed as inputs and match torch."""
    cm = compiled("llama")
    path = tmp_path / "base.pte"
    result = cm.export_executorch(path, merged=False, adapters_as_inputs=True, external_data=True)  # XNNPACK
    assert result.delegate == "xnnpack", result.fallback_reason
    assert result.data_path == str(tmp_path / "base.ptd") and result.data_bytes > 0
    assert len(result.adapter_inputs) == 4  # q_proj and v_proj: A and B
    state = cm.adapter_state_dict("default", include_constants=True)
    other = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in state.items()}
    runner = ExecuTorchRunner(path)
    assert runner.adapter_inputs == result.adapter_inputs
    inputs = list(cm.example_inputs)
    d = max_abs(runner.run(inputs + [state[k] for k in result.adapter_inputs]), torch_outputs(cm))
    parity.record("executorch llama adapters-as-inputs + .ptd, adapter 'default' max abs", d)
    assert d <= INFER_TOL
    try:
        cm.load_adapter_state_dict(other)
        d_other = max_abs(runner.run(inputs + [other[k] for k in result.adapter_inputs]), torch_outputs(cm))
    finally:
        cm.load_adapter_state_dict(state)
    assert d_other <= INFER_TOL
    # the weights really are outside the program: without its data file it does not run
    os.rename(result.data_path, str(tmp_path / "elsewhere.ptd"))
    with pytest.raises(gp.ExportError, match="data_path"):
        ExecuTorchRunner(path).run(inputs + [state[k] for k in result.adapter_inputs])
    d = max_abs(ExecuTorchRunner(path, data_path=tmp_path / "elsewhere.ptd").run(
        inputs + [state[k] for k in result.adapter_inputs]), torch_outputs(cm))
    assert d <= INFER_TOL


def test_sora_sgd_step_and_checkpoints_move_between_runtimes(tmp_path: Any, parity: Any) -> None:
    """SoRA's proximal gate step and SGD with momentum run inside the program; a checkpoint
    written by the ExecuTorch trainer resumes the torch step (and back) with the same result."""
    build, _, args, kwargs, loss, targets = ARCHS["llama"]
    cm = gp.compile(build(), gp.Plan([gp.SoRA(targets=["q_proj"], r=2, sparse_lambda=1.0)]), example_inputs=args,
                    example_kwargs=kwargs)
    batch = (*cm.example_inputs, *targets)
    step = cm.compile_training(loss, gp.optim.SGD(lr=0.5, momentum=0.9), example_batch=batch)
    path = tmp_path / "sora.pte"
    step.export_executorch(path, delegate="portable")
    trainer = ExecuTorchTrainer(path)
    start = step.state_dict()
    for _ in range(2):
        step(*batch)
        trainer.step(*batch)
    d = rel_diff(trainer.adapter_state_dict(), cm.adapter_state_dict())
    parity.record("executorch train llama SoRA sgd x2 params rel", d)
    assert d <= PARAM_TOL
    gates = {k: v for k, v in trainer.adapter_state_dict().items() if "gate" in k}
    assert gates and any(float((v == 0).sum()) > 0 for v in gates.values())  # the proximal step zeroed some
    ckpt = tmp_path / "et.safetensors"
    trainer.save_checkpoint(ckpt)
    trainer.step(*batch)
    step.load_state_dict(start)
    step.load_checkpoint(ckpt)  # ExecuTorch -> torch
    step(*batch)
    d = rel_diff(trainer.adapter_state_dict(), cm.adapter_state_dict())
    assert d <= PARAM_TOL
    back = ExecuTorchTrainer(path)
    torch_ckpt = tmp_path / "torch.safetensors"
    step.save_checkpoint(torch_ckpt)
    back.load_checkpoint(torch_ckpt)  # torch -> ExecuTorch
    assert rel_diff(back.adapter_state_dict(), cm.adapter_state_dict()) == 0.0
    with pytest.raises(gp.ExportError, match="must be int64"):
        trainer.step(batch[0].float())


def test_errors_are_typed(tmp_path: Any) -> None:
    with pytest.raises(gp.ExportError, match="does not exist"):
        ExecuTorchRunner(tmp_path / "missing.pte")
    with pytest.raises(gp.ExportError, match="unknown delegate"):
        compiled("cnn").export_executorch(tmp_path / "x.pte", delegate="coreml")
