"""Checks shared by the adapter-method tests (tests/test_methods_*.py).

Every method is tested the same way: structure (ops created per layer, provenance), match
count, numerical parity with peft (or a plain PyTorch reference), exact merge, ONNX export run
in onnxruntime, and a few training steps in which the loss falls. Models are tiny (hidden 32,
2 layers, batch 2 x 8 tokens) so the whole set stays fast on 2 cores.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Optional

import torch

import graphpeft as gp
from graphpeft.graph import META_KEY, iter_created, op_count

from models import tiny_bert, tiny_gpt2, tiny_llama, token_batch

IDS = token_batch()
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], dict[str, Any]]] = {
    "llama": (tiny_llama, {"use_cache": False}),
    "gpt2": (tiny_gpt2, {"use_cache": False}),
    "bert": (tiny_bert, {}),
}


def main_output(out: Any) -> torch.Tensor:
    """The tensor to compare: logits (decoders) or the last hidden state (BERT)."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0] if isinstance(out, (tuple, list)) else out


def compile_model(arch: str, rules: list, seed: int = 0) -> gp.CompiledModel:
    make, kwargs = MODELS[arch]
    return gp.compile(make(), gp.Plan(rules), (IDS,), dict(kwargs), seed=seed)


def run(model: torch.nn.Module, arch: str, ids: torch.Tensor = IDS) -> torch.Tensor:
    return main_output(model(ids, **MODELS[arch][1]))


def randomize(cm: gp.CompiledModel, scale: float = 0.3, seed: int = 7) -> None:
    """Move every trainable tensor off its init so adapters change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.trainable_parameters().values():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def created_ops(cm: gp.CompiledModel, adapter: str) -> list[str]:
    """Names of the aten ops a pass created for one adapter, in graph order."""
    return [n.target._opname if hasattr(n.target, "_opname") else str(n.target)
            for n in iter_created(cm.graph_module, adapter) if n.op == "call_function"]


def check_provenance(cm: gp.CompiledModel, pass_name: str, rule_name: str) -> None:
    """Every created node names the pass, the rule and the layer it adapts (its adapter id)."""
    per_adapter = collections.Counter()
    for node in cm.graph_module.graph.nodes:
        prov = node.meta.get(META_KEY)
        if not prov:
            continue
        assert prov["pass_name"] == pass_name, (node.name, prov)
        assert prov["rule"] == rule_name, (node.name, prov)
        assert prov["origin"] == prov["adapter"] and prov["origin"] in cm.adapters(), (node.name, prov)
        assert "nn_module_stack" in node.meta, node.name
        per_adapter[prov["adapter"]] += 1
    assert set(per_adapter) == set(cm.adapters())


def peft_model(arch: str, config: Any, cm: gp.CompiledModel, extra: Optional[dict] = None) -> torch.nn.Module:
    """A peft model of the same base weights holding cm's adapter tensors (plus ``extra``:
    tensors under full peft keys, e.g. VeRA's shared projections)."""
    from peft import get_peft_model, set_peft_model_state_dict

    make, _ = MODELS[arch]
    pm = get_peft_model(make(), config)
    state = {"base_model.model." + k: v for k, v in cm.adapter_state_dict().items()}
    state.update(extra or {})
    result = set_peft_model_state_dict(pm, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return pm.eval()


def check_merge(cm: gp.CompiledModel, arch: str, atol: float = 1e-5) -> gp.CompiledModel:
    """Merging folds every adapter: base op count, same outputs, no adapter tensor left."""
    merged = cm.merge()
    assert op_count(merged.graph_module) == cm.base_op_count
    assert not merged.adapters() and not merged.trainable_parameters()
    assert not any(r in (gp.Role.ADAPTER, gp.Role.ADAPTER_CONST) for r in merged.roles().values())
    with torch.no_grad():
        diff = (run(merged, arch) - run(cm, arch)).abs().max().item()
    assert diff < atol, diff
    return merged


def check_onnx(cm: gp.CompiledModel, path: str, merged: bool, atol: float = 1e-4) -> float:
    """Export, run in onnxruntime, compare every output with torch; returns the max diff."""
    from graphpeft.backends.onnx import OnnxRunner, max_abs_diff

    model = cm.merge() if merged else cm
    # model is already what to export; the graph is translated directly (no re-trace)
    model.export_onnx(path, merged=False)
    model.eval()
    with torch.no_grad():
        expected = list(model.graph_module(*cm.example_inputs))
    got = OnnxRunner(path).run(cm.example_inputs)
    diff = max_abs_diff(got, expected)
    assert diff < atol, diff
    return diff


def lm_loss(cm: gp.CompiledModel, arch: str) -> torch.Tensor:
    """Next-token cross-entropy on the test batch (what ``"causal_lm"`` computes)."""
    out = run(cm, arch)
    return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), IDS[:, 1:].reshape(-1))


def train_compiled(cm: gp.CompiledModel, lr: float, steps: int = 12, **options: Any) -> tuple[list[float], Any]:
    """Train ``cm`` in place through the compiled training step (forward, pruned backward and
    AdamW as one graph); returns the loss per step and the step (its signature names what
    trained)."""
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=lr), **options)
    losses = [float(step(IDS)) for _ in range(steps)]
    return losses, step


def assert_loss_falls(losses: list[float], by: float = 0.1) -> None:
    """The loss fell steadily: the last is ``by`` below the first and below every early one."""
    assert losses[-1] < losses[0] - by, losses
    assert losses[-1] < min(losses[:3]), losses
