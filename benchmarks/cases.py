"""Benchmark cases (models + data) and contenders (ways to run one step on them).

Every contender is a factory ``make(case) -> step()``; factories build their own model copy so
contenders never share state. graphpeft contenders that need parts not built yet are skipped
with a reason instead of failing the whole run.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    batch: tuple  # positional inputs
    kwargs: dict
    targets: Any  # LoRA targets (PEFT-style list)
    loss: str  # "causal_lm" | "cross_entropy"
    labels: Optional[torch.Tensor] = None
    last_layer: tuple[str, ...] = ()  # parameter-name prefixes for the "last layer + head" scheme

    def loss_of(self, out: Any) -> torch.Tensor:
        logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
        if self.loss == "causal_lm":
            ids = self.batch[0]
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        return F.cross_entropy(logits, self.labels)


def llama_case(quick: bool = False, seq: int = 128) -> Case:
    """The benchmark model of DESIGN.md: Llama, hidden 256, 4 layers, batch 4 x 128 tokens
    (``seq``: another sequence length; case ``llama256`` is 4 x 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, seq = (2, 64) if quick else (4, seq)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)

    ids = torch.randint(0, cfg.vocab_size, (4, seq), generator=torch.Generator().manual_seed(0))
    return Case("llama" if seq == 128 else f"llama{seq}", build, (ids,), {"use_cache": False}, LLAMA_LINEAR, "causal_lm",
                last_layer=(f"model.layers.{layers - 1}.", "model.norm.", "lm_head."))


def bert_case(quick: bool = False) -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    layers, seq = (2, 64) if quick else (4, 128)
    cfg = BertConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=512, num_labels=4,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(cfg)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, seq), generator=g)
    labels = torch.randint(0, 4, (4,), generator=g)
    return Case("bert", build, (ids,), {}, ["query", "key", "value", "dense"], "cross_entropy", labels,
                last_layer=(f"bert.encoder.layer.{layers - 1}.", "bert.pooler.", "classifier."))


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    def __init__(self, width: int = 32, blocks: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1)
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(torch.relu(self.stem(x))), 1).flatten(1))


def cnn_case(quick: bool = False) -> Case:
    blocks, size = (2, 16) if quick else (4, 32)

    def build() -> nn.Module:
        torch.manual_seed(0)
        return SmallResNet(blocks=blocks).eval()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, size, size, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    return Case("cnn", build, (x,), {}, r"blocks\.\d+\.conv\d", "cross_entropy", labels,
                last_layer=(f"blocks.{blocks - 1}.", "fc."))


def llama256_case(quick: bool = False) -> Case:
    """The benchmark Llama at batch 4 x 256 tokens."""
    return llama_case(quick, seq=256)


CASES = {"llama": llama_case, "llama256": llama256_case, "bert": bert_case, "cnn": cnn_case}


# --- training contenders ----------------------------------------------------------------------

def _eager_step(model: nn.Module, case: Case, params: list[torch.nn.Parameter], **adamw: Any) -> Callable[[], float]:
    opt = torch.optim.AdamW(params, lr=1e-4, **adamw)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = case.loss_of(model(*case.batch, **case.kwargs))
        loss.backward()
        opt.step()
        return float(loss)

    return step


def eager_full(case: Case) -> Callable[[], float]:
    model = case.build().eval()  # every contender runs in eval mode: no dropout, fixed BN statistics
    return _eager_step(model, case, list(model.parameters()))


def eager_last_layer(case: Case) -> Callable[[], float]:
    model = case.build().eval()
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(case.last_layer))
        if p.requires_grad:
            params.append(p)
    return _eager_step(model, case, params)


def _peft_model(case: Case) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(case.build().eval(), LoraConfig(r=8, lora_alpha=16, target_modules=case.targets))


def peft_lora_eager(case: Case) -> Callable[[], float]:
    model = _peft_model(case)
    return _eager_step(model, case, [p for p in model.parameters() if p.requires_grad])


def peft_lora_compiled(case: Case) -> Callable[[], float]:
    model = _peft_model(case)
    compiled = torch.compile(model)
    return _eager_step(compiled, case, [p for p in model.parameters() if p.requires_grad])


def _gp_compiled(case: Case):
    import graphpeft as gp

    model = case.build().eval()
    plan = gp.Plan([gp.LoRA(targets=case.targets, r=8, alpha=16)])
    return gp.compile(model, plan, case.batch, case.kwargs)


def gp_lora_eager(case: Case) -> Callable[[], float]:
    """graphpeft's adapted graph trained by a plain PyTorch loop (no training compiler)."""
    cm = _gp_compiled(case)
    return _eager_step(cm, case, list(cm.trainable_parameters().values()))


def _gp_training_step(case: Case, **options: Any):
    import graphpeft as gp

    cm = _gp_compiled(case)
    loss_fn = case.loss if case.loss == "causal_lm" else "cross_entropy"
    return cm, cm.compile_training(loss=loss_fn, optimizer=gp.optim.AdamW(lr=1e-4), **options)


def _targets(case: Case) -> tuple:
    return (case.labels,) if case.labels is not None else ()


def gp_step_torch(case: Case) -> Callable[[], Any]:
    _, step = _gp_training_step(case)
    batch = (*case.batch, *_targets(case))
    return lambda: step(*batch)


def gp_step_inductor(case: Case) -> Callable[[], Any]:
    """The compiled step run by torch.compile (the first call compiles: warm-up absorbs it)."""
    _, step = _gp_training_step(case, executor="inductor")
    batch = (*case.batch, *_targets(case))
    step(*batch)
    return lambda: step(*batch)


def gp_step_ort(case: Case, **export: Any) -> Callable[[], Any]:
    from graphpeft.backends.onnx import OnnxTrainer

    _, step = _gp_training_step(case)
    path = os.path.join(tempfile.mkdtemp(prefix="gp-bench-"), "train.onnx")
    step.export_onnx(path, **export)
    trainer = OnnxTrainer(path)
    batch = (*case.batch, *_targets(case))
    return lambda: trainer.step(*batch)


def _gp_step_pte(delegate: str) -> Callable[[Case], Callable[[], Any]]:
    """The compiled step exported to ExecuTorch and run by its runtime (XNNPACK or portable kernels)."""
    def make(case: Case) -> Callable[[], Any]:
        from graphpeft.backends.executorch import ExecuTorchTrainer

        _, step = _gp_training_step(case)
        path = os.path.join(tempfile.mkdtemp(prefix="gp-bench-"), "train.pte")
        step.export_executorch(path, delegate=delegate)
        trainer = ExecuTorchTrainer(path)
        batch = (*case.batch, *_targets(case))
        return lambda: trainer.step(*batch)

    return make


TRAIN = {
    "eager_full": eager_full,
    "eager_last_layer": eager_last_layer,
    "peft_lora_eager": peft_lora_eager,
    "peft_lora_compiled": peft_lora_compiled,
    "gp_lora_eager": gp_lora_eager,
    "gp_step_torch": gp_step_torch,
    "gp_step_inductor": gp_step_inductor,
    "gp_step_ort": gp_step_ort,
    # the export before pack_once (every frozen weight's input gradient a plain MatMul): A/B of its speed
    "gp_step_ort_pack_twice": lambda case: gp_step_ort(case, pack_once_min_bytes=None),
    "gp_step_pte_xnnpack": _gp_step_pte("xnnpack"),
}


# --- sparse schemes (issue 4): gp.Update plans, PockEngine-style sparse backpropagation ----------
#
# Each scheme runs as a compiled graphpeft step in torch (``gp_sparse_<scheme>_torch``) and in
# onnxruntime (``gp_sparse_<scheme>_ort``), beside its eager PyTorch counterpart:
#   bias_norm    biases of every linear/conv layer plus every norm weight (the model's own
#                parameters; Llama has no biases, so there it is its norms)
#   last_layer   the last block + the head: the same tensors as ``eager_last_layer``
#   channel25    25% of the output channels (largest row norm) of every linear/conv weight of the
#                last two blocks; eager: the full weights with the gradient masked to those rows
# The graphpeft callables carry ``planned_peak_bytes`` (the static planner's estimate of the step),
# which the memory worker reports beside the measured peak RSS.

SPARSE_FRACTION = 0.25


def _has_layer_bias(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.bias is not None for m in model.modules())


def _last_layer_regex(case: Case) -> str:
    import re

    return "(" + "|".join(re.escape(p.rstrip(".")) for p in case.last_layer) + r")(\..*)?"


def _sparse_rules(case: Case, scheme: str, model: nn.Module) -> list:
    import graphpeft as gp

    if scheme == "bias_norm":
        return ([gp.Update(targets=".*", part="bias")] if _has_layer_bias(model) else []) + \
            [gp.Update(targets=".*", part="norm")]
    if scheme == "bias":
        return [gp.Update(targets=".*", part="bias")]
    if scheme == "last_layer":
        rx = _last_layer_regex(case)
        return [gp.Update(targets=rx), gp.Update(targets=rx, part="norm")]
    if scheme == "channel25":
        return [gp.Update(targets=".*", kind=["linear", "conv"], layers=[-2, -1], fraction=SPARSE_FRACTION,
                          select="magnitude")]
    raise KeyError(scheme)


def _gp_sparse_step(case: Case, scheme: str, **options: Any):
    """A graphpeft step training ``scheme``'s tensors (``options``: of ``compile_training``)."""
    import graphpeft as gp

    model = case.build().eval()
    cm = gp.compile(model, gp.Plan(_sparse_rules(case, scheme, model)), case.batch, case.kwargs)
    loss_fn = case.loss if case.loss == "causal_lm" else "cross_entropy"
    batch = (*cm.flat_inputs(*case.batch, **case.kwargs), *_targets(case))
    step = cm.compile_training(loss=loss_fn, optimizer=gp.optim.AdamW(lr=1e-4), example_batch=batch, **options)
    return step, batch


def _gp_sparse_torch(scheme: str) -> Callable[[Case], Callable[[], Any]]:
    def make(case: Case) -> Callable[[], Any]:
        step, batch = _gp_sparse_step(case, scheme)

        def run() -> Any:
            return step(*batch)

        run.planned_peak_bytes = step.memory_report().peak_bytes  # type: ignore[attr-defined]
        return run

    return make


def _gp_sparse_ort(scheme: str) -> Callable[[Case], Callable[[], Any]]:
    def make(case: Case) -> Callable[[], Any]:
        from graphpeft.backends.onnx import OnnxTrainer

        step, batch = _gp_sparse_step(case, scheme)
        planned = step.memory_report().peak_bytes
        path = os.path.join(tempfile.mkdtemp(prefix="gp-bench-"), "train.onnx")
        step.export_onnx(path)
        trainer = OnnxTrainer(path)
        del step  # the torch step is not needed to train in onnxruntime

        def run() -> Any:
            return trainer.step(*batch)

        run.planned_peak_bytes = planned  # type: ignore[attr-defined]
        return run

    return make


def eager_bias_norm(case: Case) -> Callable[[], float]:
    model = case.build().eval()
    norm_params = {f"{n}.{k}" for n, m in model.named_modules() if "norm" in type(m).__name__.lower()
                   for k, _ in m.named_parameters(recurse=False)}
    layer_bias = {f"{n}.bias" for n, m in model.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.bias is not None}
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in norm_params or n in layer_bias)
        if p.requires_grad:
            params.append(p)
    return _eager_step(model, case, params)


def eager_channel25_masked(case: Case) -> Callable[[], float]:
    """What plain PyTorch does for a channel fraction: the whole weight trains and its gradient is
    masked to the chosen rows (the full weight gradient is still computed)."""
    import re

    model = case.build().eval()
    numbered = sorted({int(m.group(1)) for n, _ in model.named_modules() if (m := re.search(r"(?:^|\.)(\d+)(?:\.|$)", n))})
    last_two = set(numbered[-2:])
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(False)
    for name, mod in model.named_modules():
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or m is None or int(m.group(1)) not in last_two:
            continue
        w = mod.weight
        k = max(1, round(SPARSE_FRACTION * w.shape[0]))
        rows = torch.topk(w.detach().flatten(1).norm(dim=1), k).indices
        mask = torch.zeros(w.shape[0], *([1] * (w.dim() - 1)))
        mask[rows] = 1.0
        w.requires_grad_(True)
        w.register_hook(lambda g, mask=mask: g * mask)
        params.append(w)
    return _eager_step(model, case, params, weight_decay=0.0)  # decay would move the masked rows


SPARSE_TRAIN = {
    "eager_bias_norm": eager_bias_norm,
    "gp_sparse_bias_norm_torch": _gp_sparse_torch("bias_norm"),
    "gp_sparse_bias_norm_ort": _gp_sparse_ort("bias_norm"),
    "gp_sparse_last_layer_torch": _gp_sparse_torch("last_layer"),
    "gp_sparse_last_layer_ort": _gp_sparse_ort("last_layer"),
    "eager_channel25_masked": eager_channel25_masked,
    "gp_sparse_channel25_torch": _gp_sparse_torch("channel25"),
    "gp_sparse_channel25_ort": _gp_sparse_ort("channel25"),
}
TRAIN.update(SPARSE_TRAIN)


# --- inference contenders -----------------------------------------------------------------------

def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return fn()

    return run


def infer_base(case: Case) -> Callable[[], Any]:
    model = case.build().eval()
    return _no_grad(lambda: model(*case.batch, **case.kwargs))


def infer_peft_unmerged(case: Case) -> Callable[[], Any]:
    model = _peft_model(case).eval()
    return _no_grad(lambda: model(*case.batch, **case.kwargs))


def infer_gp_unmerged(case: Case) -> Callable[[], Any]:
    cm = _gp_compiled(case).eval()
    return _no_grad(lambda: cm(*case.batch, **case.kwargs))


def infer_gp_merged(case: Case) -> Callable[[], Any]:
    merged = _gp_compiled(case).merge().eval()
    return _no_grad(lambda: merged(*case.batch, **case.kwargs))


def _ort(case: Case, merged: bool) -> Callable[[], Any]:
    from graphpeft.backends.onnx import OnnxRunner

    cm = _gp_compiled(case)
    path = os.path.join(tempfile.mkdtemp(prefix="gp-bench-"), "model.onnx")
    cm.export_onnx(path, merged=merged)
    runner = OnnxRunner(path)
    flat = [t.numpy() for t in cm.flat_inputs(*case.batch, **case.kwargs)]
    return lambda: runner.run(flat)


def infer_gp_merged_ort(case: Case) -> Callable[[], Any]:
    return _ort(case, True)


def infer_gp_unmerged_ort(case: Case) -> Callable[[], Any]:
    return _ort(case, False)


def _pte(delegate: str) -> Callable[[Case], Callable[[], Any]]:
    def make(case: Case) -> Callable[[], Any]:
        from graphpeft.backends.executorch import ExecuTorchRunner

        cm = _gp_compiled(case)
        path = os.path.join(tempfile.mkdtemp(prefix="gp-bench-"), "model.pte")
        cm.export_executorch(path, merged=True, delegate=delegate, example_inputs=cm.flat_inputs(*case.batch,
                                                                                                   **case.kwargs))
        runner = ExecuTorchRunner(path)
        flat = cm.flat_inputs(*case.batch, **case.kwargs)
        return lambda: runner.run(flat)

    return make


INFER = {
    "base": infer_base,
    "peft_unmerged": infer_peft_unmerged,
    "gp_merged": infer_gp_merged,
    "gp_unmerged": infer_gp_unmerged,
    "gp_merged_ort": infer_gp_merged_ort,
    "gp_unmerged_ort": infer_gp_unmerged_ort,
    "gp_merged_pte_xnnpack": _pte("xnnpack"),
}
