"""fused_optimizer_kernel (passes/lower): the torch executor's copy of a step graph runs each fused
AdamW chunk as one graphpeft::adamw_update (torch's fused kernel). Structure, match count,
declines with reasons, the verifier on the lowered graph, and the finite flag's semantics."""

from __future__ import annotations

import torch

import graphpeft as gp
from graphpeft.infra import PassContext, copy_graph
from graphpeft.registry import PASSES
from graphpeft.training.fused_kernels import adamw_update
from graphpeft.training.signature import phase_of, verify_training

from models import tiny_llama, token_batch

IDS = token_batch()
aten = torch.ops.aten


def _step(opt: gp.optim.Optimizer, **options: object) -> gp.TrainingStep:
    cm = gp.compile(tiny_llama(), gp.Plan([gp.LoRA(targets=["q_proj", "v_proj", "down_proj"], r=4, init="random")]),
                    (IDS,), {"use_cache": False})
    return cm.compile_training("causal_lm", opt, example_batch=(IDS,), **options)


def _lower(step: gp.TrainingStep) -> tuple:
    gm = copy_graph(step.graph_module)
    p = PASSES["fused_optimizer_kernel"]()
    return p(gm, PassContext()).gm, p


def test_structure_and_verifier() -> None:
    step = _step(gp.optim.AdamW(lr=1e-3))
    gm, p = _lower(step)
    fused = [n for n in gm.graph.nodes if n.target == torch.ops.graphpeft.adamw_update.default]
    assert p.match_count("adamw_chunk") == len(fused) == 1
    assert phase_of(fused[0]) == "optimizer"
    assert len(fused[0].args[0]) == len(step.signature.params)
    opt_ops = [n.target for n in gm.graph.nodes if n.op == "call_function" and phase_of(n) == "optimizer"]
    assert aten.split_with_sizes.default not in opt_ops and aten.where.self in opt_ops  # the step count's
    before = sum(1 for n in step.graph_module.graph.nodes if phase_of(n) == "optimizer")
    assert len(opt_ops) < before // 2
    verify_training(gm)


def test_declines_with_reasons() -> None:
    for opt, reason in ((gp.optim.AdamW(lr=1e-3, amsgrad=True), "amsgrad"), (gp.optim.SGD(lr=1e-3, momentum=0.9), "sgd")):
        gm, p = _lower(_step(opt))
        assert p.match_count() == 0
        assert any(reason in m.reason for m in p.results if not m.ok), [m.reason for m in p.results]
        assert not any(n.target == torch.ops.graphpeft.adamw_update.default for n in gm.graph.nodes)
    gm, p = _lower(_step(gp.optim.AdamW(lr=1e-3), fuse_optimizer=False))  # per-tensor updates: nothing to match
    assert p.match_count() == 0


def test_kernel_drops_the_update_on_a_false_flag() -> None:
    """adamw_update: inputs untouched; a false flag returns the inputs' values; a true one
    torch.optim.AdamW's step."""
    p, g = torch.randn(3, 4), torch.randn(3, 4)
    m, v = torch.zeros(3, 4), torch.zeros(3, 4)
    kept = [t.clone() for t in (p, m, v)]
    out = adamw_update([p], [g], [m], [v], torch.tensor(0.0), torch.tensor(0.1), torch.tensor(False),
                       0.9, 0.999, 1e-8, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(out, kept)) and all(torch.equal(a, b) for a, b in zip((p, m, v), kept))
    out = adamw_update([p], [g], [m], [v], torch.tensor(0.0), torch.tensor(0.1), torch.tensor(True),
                       0.9, 0.999, 1e-8, 0.01)
    ref = torch.nn.Parameter(p.clone())
    ref.grad = g.clone()
    opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.01, foreach=False)
    opt.step()
    torch.testing.assert_close(out[0], ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[1], opt.state[ref]["exp_avg"])
    torch.testing.assert_close(out[2], opt.state[ref]["exp_avg_sq"])


def test_nonfinite_step_is_skipped_by_the_default_runner() -> None:
    step = _step(gp.optim.AdamW(lr=1e-3))
    step(IDS)
    before = {k: v.clone() for k, v in step.cm.trainable_parameters().items()}
    state = {k: v.clone() for k, v in step.state_dict()["optimizer"].items()}
    step.lr = float("nan")
    step(IDS)
    assert step.skipped_steps == 1
    assert all(torch.equal(state[k], v) for k, v in step.state_dict()["optimizer"].items())
    assert all(torch.equal(before[k], v) for k, v in step.cm.trainable_parameters().items())
