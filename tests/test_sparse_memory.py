"""Sparse update schemes keep no more than they need (issue 11 item 5).

On the tiny Llama (2 blocks): updating the last block keeps nothing from below it for the backward
(only the rotary tables every block reads); a row slice stores no frozen copy of its rows (the
weight is split into the frozen rest and the trainable rows); and for each scheme the static plan
equals the live tensor storage the torch executor measures. The fresh-process figures against
eager PyTorch are in ``python -m benchmarks.memory --sparse``.
"""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp
from graphpeft.graph import META_KEY, Role, get_tensor, roles
from graphpeft.training import phase_of

from conftest import ARCHS

SCHEMES = {
    "last_block": [gp.Update(targets=r"model\.layers\.1(\..*)?"), gp.Update(targets=r"model\.layers\.1(\..*)?", part="norm")],
    "norm": [gp.Update(targets=".*", part="norm")],
    "rows": [gp.Update(targets=".*", kind=["linear"], layers=[-1], fraction=0.25, select="magnitude")],
}


def _step(rules: list) -> tuple[gp.CompiledModel, gp.TrainingStep, torch.nn.Module]:
    arch = ARCHS["llama"]
    args, kwargs = arch.inputs()
    model = arch.build()
    cm = gp.compile(model, gp.Plan(rules), args, kwargs)
    return cm, cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3), example_batch=args), model


def _origin(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str((node.meta.get(META_KEY) or {}).get("origin") or (list(stack.values())[-1][0] if stack else ""))


def test_last_block_keeps_nothing_from_below_it_for_the_backward() -> None:
    _, step, _ = _step(SCHEMES["last_block"])
    kept = [n for n in step.graph_module.graph.nodes if n.op == "call_function"
            and phase_of(n) in ("forward", "loss") and any(phase_of(u) not in ("forward", "loss") for u in n.users)]
    assert kept
    below = [(n.name, _origin(n)) for n in kept if "layers.0" in _origin(n) or "embed_tokens" in _origin(n)]
    # the rotary cos/sin tables are made once (traced under the first block) and read by every block
    assert all(n.meta["val"].numel() <= 2 * 16 * 8 for n in kept if (n.name, _origin(n)) in below), below


def test_row_slices_store_no_frozen_copy() -> None:
    cm, _, model = _step(SCHEMES["rows"])
    float_bytes = sum(get_tensor(cm.graph_module, n).numel() * get_tensor(cm.graph_module, n).element_size()
                      for n, r in roles(cm.graph_module).items()
                      if r != Role.BUFFER and get_tensor(cm.graph_module, n).is_floating_point())
    assert any(r == Role.TRAINABLE_SLICE for r in roles(cm.graph_module).values())
    assert float_bytes == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_plan_equals_measured_live_storage(scheme: str) -> None:
    _, step, _ = _step(SCHEMES[scheme])
    report = step.memory_report(measure=True)
    assert report.plan_vs_measured == pytest.approx(1.0, abs=0.01)
