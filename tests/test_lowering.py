"""The optimizing passes of the training compiler: forward lowering (fold_linear_scale,
fuse_shared_input_linears) and the algebraic clean-up of step graphs (simplify_algebra).

Each rewrite: structure, match count, numerics (and a negative case with its reason)."""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
import torch.fx as fx

import graphpeft as gp
from graphpeft.graph import META_KEY, roles
from graphpeft.infra import PassContext, PassManager, Pipeline, copy_graph
from graphpeft.registry import PASSES
from graphpeft.training import verify_training
from graphpeft.verify import verify
from method_helpers import check_step_in_onnxruntime, fx_graph_of
from models import tiny_llama, token_batch

aten = torch.ops.aten
IDS = token_batch()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2


def compiled(dropout: float = 0.0, seed: int = 0) -> gp.CompiledModel:
    rule = gp.LoRA(targets=ALL, r=4, alpha=8, dropout=dropout, init="random")
    return gp.compile(tiny_llama(layers=LAYERS, seed=seed), gp.Plan([rule]), (IDS,), {"use_cache": False})


def run_pass(gm: fx.GraphModule, name: str) -> tuple[fx.GraphModule, Any]:
    p = PASSES[name]()
    result = PassManager(verifier=verify).run(gm, Pipeline(name, [p]), PassContext(verify=True))
    return result.gm, p


def calls(gm: fx.GraphModule, target: Any, made_by: str = "") -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target
            and (not made_by or (n.meta.get(META_KEY) or {}).get("pass_name") == made_by)]


def logits(gm: fx.GraphModule) -> torch.Tensor:
    with torch.no_grad():
        return gm(IDS)[0]


# --- forward lowering ---------------------------------------------------------------------------


def test_fold_linear_scale_moves_lora_scaling_onto_b() -> None:
    cm = compiled()
    before = cm.graph_module
    gm, p = run_pass(copy_graph(before), "fold_linear_scale")
    assert p.match_count() == LAYERS * len(ALL)  # one per adapted layer
    scaled_weights = [n for n in calls(gm, aten.mul.Tensor) if (n.meta.get(META_KEY) or {}).get("pass_name") == "fold_linear_scale"]
    assert len(scaled_weights) == LAYERS * len(ALL)
    assert all(str(n.args[0].target).endswith("lora_B.weight") and n.args[1] == 2.0 for n in scaled_weights)
    # the branch output is no longer scaled: every remaining mul by the scale reads no linear
    assert not [n for n in calls(gm, aten.mul.Tensor) if n.args[1] == 2.0 and n.args[0].target == aten.linear.default]
    torch.testing.assert_close(logits(gm), logits(before), rtol=1e-6, atol=1e-6)
    assert len(calls(before, aten.mul.Tensor)) == len(calls(gm, aten.mul.Tensor))  # cm's graph untouched
    assert not [n for n in calls(before, aten.mul.Tensor) if (n.meta.get(META_KEY) or {}).get("pass_name") == "fold_linear_scale"]


def test_fold_linear_scale_declines_with_reasons() -> None:
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten.linear.default(x, w)
        return torch.ops.aten.mul.Tensor(y, 3.0) + y  # the product has another user

    gm = gp.trace(_WithWeight(f, torch.randn(16, 4)), (torch.randn(2, 4),)).gm
    gm2, p = run_pass(copy_graph(gm), "fold_linear_scale")
    assert p.match_count() == 0
    assert [m.reason for m in p.results] == ["the unscaled product is used elsewhere"]


class _WithWeight(torch.nn.Module):
    def __init__(self, fn: Any, w: torch.Tensor) -> None:
        super().__init__()
        self.fn, self.w = fn, torch.nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.w)


def test_fuse_shared_input_linears_makes_one_gemm_for_qkv_and_gate_up() -> None:
    cm = compiled()
    before = cm.graph_module
    gm, p = run_pass(copy_graph(before), "fuse_shared_input_linears")
    # per block: q/k/v read the attention norm's output, gate/up the MLP norm's output
    assert p.match_count() == 2 * LAYERS
    cats = calls(gm, aten.cat.default, "fuse_shared_input_linears")
    assert len(cats) == 2 * LAYERS
    widths = sorted(len(c.args[0]) for c in cats)
    assert widths == [2] * LAYERS + [3] * LAYERS
    for c in cats:
        names = [str(a.target) for a in c.args[0]]
        assert all(n.endswith("lora_A.weight") for n in names)
        assert all(roles(gm)[n].trainable for n in names)
    splits = calls(gm, aten.split_with_sizes.default)
    assert len(splits) == 2 * LAYERS and all(s.args[1] == [4] * len(s.users) for s in splits)
    assert all(META_KEY in n.meta for n in cats + splits)
    a_linears = [n for n in calls(gm, aten.linear.default) if str(getattr(n.args[1], "target", "")).endswith("lora_A.weight")]
    assert len(a_linears) == LAYERS * len(ALL) - 5 * LAYERS  # o_proj and down_proj stay alone
    torch.testing.assert_close(logits(gm), logits(before), rtol=1e-6, atol=1e-6)


def test_fuse_shared_input_linears_leaves_adapters_with_dropout_alone() -> None:
    cm = compiled(dropout=0.1)
    gm, p = run_pass(copy_graph(cm.graph_module), "fuse_shared_input_linears")
    assert p.match_count() == 0 and not calls(gm, aten.cat.default, "fuse_shared_input_linears")  # each adapter draws its own mask


def test_lowered_step_trains_exactly_like_the_plain_one() -> None:
    torch.manual_seed(0)
    a, b = compiled(), compiled()
    plain = a.compile_training("causal_lm", gp.optim.SGD(lr=0.5, momentum=0.9), lowering=())
    lowered = b.compile_training("causal_lm", gp.optim.SGD(lr=0.5, momentum=0.9))
    mm = lambda s: len(calls(s.graph_module, aten.mm.default))  # noqa: E731
    assert mm(lowered) < mm(plain)
    assert len(lowered.graph_module.graph.nodes) < len(plain.graph_module.graph.nodes)
    for _ in range(3):
        la, lb = plain(IDS), lowered(IDS)
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6)
    assert not calls(b.graph_module, aten.cat.default, "fuse_shared_input_linears")  # cm untouched


@pytest.mark.parametrize("lowering", [None, ()], ids=["lowered", "plain"])
def test_step_of_a_model_compiled_in_eval_mode_keeps_adapter_dropout(lowering: Any) -> None:
    """The step is traced in training mode whatever mode ``cm`` is in, lowered copy included
    (the copy was once taken before switching, so eval-mode compiles lost their dropout)."""
    cm = compiled(dropout=0.5)
    cm.eval()
    options = {} if lowering is None else {"lowering": lowering}
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), **options)
    random = [n for n in step.graph_module.graph.nodes
              if n.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())]
    assert random, "adapter dropout missing from the training step"
    assert not cm.training and all(not n.args[2] for n in cm.graph_module.graph.nodes
                                   if (n.meta.get(META_KEY) or {}).get("part") == "dropout")  # mode restored


def test_unknown_lowering_pass_is_a_plan_error() -> None:
    with pytest.raises(gp.PlanError, match="unknown lowering pass"):
        compiled().compile_training("causal_lm", gp.optim.SGD(lr=0.1), lowering=["no_such_pass"])


# --- algebraic clean-up ---------------------------------------------------------------------------


def _graph(build: Any, *examples: torch.Tensor) -> fx.GraphModule:
    return fx_graph_of(build, *examples)


def _simplified(gm: fx.GraphModule) -> tuple[fx.GraphModule, Any]:
    p = PASSES["simplify_algebra"]()
    return p(gm, PassContext(verify=False)).gm, p


def test_simplify_algebra_rules_before_and_after() -> None:
    def before(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = aten.pow.Tensor_Scalar(x, 1)                       # -> x
        b = aten.mul.Tensor(a, 1)                              # -> x
        t = aten.permute.default(aten.permute.default(x, [1, 0]), [1, 0])  # -> x
        v = aten.view.default(aten.view.default(x, [2, 6]), [12])          # -> view(x, [12])
        e = aten.div.Scalar(aten.expand.default(s, [3, 4]), 4)             # -> expand(div(s, 4))
        buf = aten.empty_permuted.default([3, 4], [0, 1])
        one_minus = aten.sub_.Tensor(aten.copy_.default(buf, aten.full_like.default(buf, 1.0)), x)  # -> rsub
        return b + t, v, e, one_minus

    x, s = torch.randn(3, 4), torch.randn(3, 1)
    gm = _graph(before, x, s)
    expected = gm(x, s)
    gm, p = _simplified(gm)
    rules = sorted(m.rule for m in p.results if m.ok)
    assert rules == ["drop_identity", "drop_identity", "fold_permutes", "fold_views", "one_minus",
                     "scalar_before_expand"]
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.pow.Tensor_Scalar not in ops and aten.permute.default not in ops
    assert ops.count(aten.view.default) == 1 and aten.rsub.Scalar in ops
    assert aten.empty_permuted.default not in ops and aten.copy_.default not in ops and aten.sub_.Tensor not in ops
    div = next(n for n in gm.graph.nodes if n.target == aten.div.Scalar)
    assert tuple(div.meta["val"].shape) == (3, 1)  # the scalar op runs before the broadcast
    for a, b in zip(gm(x, s), expected):
        torch.testing.assert_close(a, b)


def test_simplify_algebra_scatter_and_power_of_two_rules() -> None:
    """rotate_half's backward (two halves scattered into zeros, added) -> one cat; a slice
    scattered over a whole dimension -> the slice; RMSNorm's ``expand(s) * (x * 2)`` -> the 2 on
    ``s``. Bit-identical; a scale that is not a power of two is declined with its reason."""
    def before(g: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = aten.full.default([3, 4], 0.0)
        a, b = aten.slice.Tensor(g, 1, 0, 2), aten.slice.Tensor(g, 1, 2, 4)
        rot = aten.add.Tensor(aten.slice_scatter.default(z, aten.neg.default(a), 1, 2, 9223372036854775807),
                              aten.slice_scatter.default(z, b, 1, 0, 2))
        whole = aten.slice_scatter.default(z, h, 0, 0, 9223372036854775807)
        norm = aten.mul.Tensor(aten.expand.default(s, [3, 4]), aten.mul.Scalar(g, 2.0))
        odd = aten.mul.Tensor(aten.expand.default(s, [3, 4]), aten.mul.Scalar(h, 3.0))
        return rot, whole, norm, odd

    g, s, h = torch.randn(3, 4), torch.randn(3, 1), torch.randn(3, 4)
    gm = _graph(before, g, s, h)
    expected = gm(g, s, h)
    gm, p = _simplified(gm)
    rules = sorted(m.rule for m in p.results if m.ok)
    assert rules == ["power_of_two_through_expand", "scatters_as_cat", "whole_slice_scatter"]
    assert any("not a power of two" in m.reason for m in p.results if not m.ok)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.slice_scatter.default not in ops and aten.full.default not in ops and ops.count(aten.cat.default) == 1
    assert [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.target == aten.mul.Tensor
            and n.args[1] == 2.0] == [(3, 1)]
    for a, b in zip(gm(g, s, h), expected):
        assert torch.equal(a, b)


def test_simplify_algebra_keeps_epsilon_and_type_changing_ops() -> None:
    def before(x: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return aten.add.Tensor(x, 1e-8), aten.mul.Tensor(i, 1.0)  # eps stays; int * 1.0 is a float

    gm, p = _simplified(_graph(before, torch.randn(3), torch.arange(3)))
    assert p.match_count() == 0
    assert [m.reason for m in p.results] == ["the op changes the dtype or shape (type promotion or broadcast)"]
    assert len([n for n in gm.graph.nodes if n.op == "call_function"]) == 2


def test_simplify_algebra_on_a_training_step() -> None:
    cm = compiled()
    passes = ["simplify_algebra", "eliminate_common_subexpressions", "remove_dead_code", "check_gradient_flow",
              "reorder_updates", "plan_memory"]
    without = compiled().compile_training("causal_lm", gp.optim.AdamW(lr=1e-3), passes=passes[1:])
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3), passes=passes)
    gm = step.graph_module
    verify_training(gm)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.empty_permuted.default not in ops and aten._assert_tensor_metadata.default not in ops
    assert ops.count(aten.rsub.Scalar) == LAYERS  # silu's backward, once per block
    assert aten.slice_scatter.default not in ops  # rotary's backward is a cat, the loss's copies gone
    assert len(gm.graph.nodes) < 0.95 * len(without.graph_module.graph.nodes)
    inputs = step.flat_inputs(IDS)
    with torch.no_grad():
        for a, b in zip(gm(*inputs), without.graph_module(*inputs)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_causal_lm_loss_copies_no_logits() -> None:
    step = compiled().compile_training("causal_lm", gp.optim.SGD(lr=0.1))
    ops = [n.target for n in step.graph_module.graph.nodes if n.op == "call_function"]
    assert aten.slice_scatter.default not in [t for t in ops] or all(
        tuple(n.meta["val"].shape)[-1] != 128 for n in step.graph_module.graph.nodes if n.target == aten.slice_scatter.default)
    logits_clones = [n for n in step.graph_module.graph.nodes
                     if n.target == aten.clone.default and n.meta["val"].shape[-1] == 128]
    assert logits_clones == []
    # the value is the mean over the shifted positions, as before
    out = compiled().graph_module(IDS)[0]
    ref = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 128), IDS[:, 1:].reshape(-1))
    loss = gp.training.losses.CausalLM()(out, [IDS], [])
    torch.testing.assert_close(loss, ref)


# --- multi-tensor optimizer update ----------------------------------------------------------------


def test_lean_cross_entropy_matches_torch_values_and_gradients() -> None:
    from graphpeft.training.losses import lean_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (12,))
    labels[[2, 5]] = -100  # ignored rows get no gradient and do not count in the mean
    ours = lean_cross_entropy(logits, labels)
    (g_ours,) = torch.autograd.grad(ours * 3.0, logits)
    ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref * 3.0, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert not g_ours[[2, 5]].any()
    assert torch.isnan(lean_cross_entropy(logits, torch.full((12,), -100))).item()  # as torch: 0 / 0


def test_language_model_step_has_no_nll_loss_and_a_lean_loss_backward() -> None:
    """The causal_lm / cross_entropy step computes its logits gradient as softmax * scale with
    one scatter (no zero-filled one-hot, no nll_loss op for the ONNX trap to hit)."""
    step = compiled().compile_training("causal_lm", gp.optim.SGD(lr=0.1))
    targets = {str(n.target) for n in step.graph_module.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "nll_loss" in t]
    assert "aten.scatter_add.default" in targets


def test_cse_leaves_pointwise_backward_recomputes_so_forward_values_die_early() -> None:
    """silu's backward recomputes sigmoid(gate); merging it into the forward's sigmoid would keep
    one (tokens x intermediate) tensor per layer alive into the backward."""
    from graphpeft.training import phase_of

    step = compiled().compile_training("causal_lm", gp.optim.SGD(lr=0.1))
    sig = [n for n in step.graph_module.graph.nodes if n.target is aten.sigmoid.default]
    forward = [n for n in sig if phase_of(n) == "forward"]
    assert len(forward) == LAYERS and len(sig) == 2 * LAYERS
    assert all(phase_of(u) == "forward" for n in forward for u in n.users)  # not saved for the backward
    ref = compiled().compile_training("causal_lm", gp.optim.SGD(lr=0.1), lowering=())
    for _ in range(2):
        torch.testing.assert_close(step(IDS), ref(IDS), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_fused_update_gives_the_same_numbers_in_far_fewer_ops(opt: str) -> None:
    def make(fuse: Any) -> Any:
        optimizer = gp.optim.SGD(lr=0.3, momentum=0.9) if opt == "sgd" else gp.optim.AdamW(lr=1e-2, weight_decay=0.1)
        cm = compiled()
        # executor="fx": the traced arithmetic itself (the default runner swaps the fused AdamW
        # update for torch's kernel, which rounds differently: tests/test_fused_optimizer_kernel.py)
        return cm, cm.compile_training("causal_lm", optimizer, fuse_optimizer=fuse, executor="fx")

    (ca, each), (cb, fused) = make(False), make("auto")
    phase = lambda s, p: sum(1 for n in s.graph_module.graph.nodes  # noqa: E731
                             if (n.meta.get(META_KEY) or {}).get("part") == p and n.op == "call_function"
                             and n.target not in (aten.view.default, operator.getitem, aten.split_with_sizes.default))
    assert phase(fused, "optimizer") < 0.4 * phase(each, "optimizer")  # the update ops once, on one tensor
    assert phase(fused, "check") < phase(each, "check") / 4
    for _ in range(3):
        torch.testing.assert_close(each(IDS), fused(IDS), rtol=0, atol=0)
    pa, pb = ca.trainable_parameters(), cb.trainable_parameters()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0)  # the very same arithmetic per element
    sa, sb = each.state_dict()["optimizer"], fused.state_dict()["optimizer"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_fused_update_is_off_for_methods_with_their_own_step_and_on_request() -> None:
    cm = gp.compile(tiny_llama(layers=1), gp.Plan([gp.SoRA(targets=["q_proj", "v_proj"], r=4)]), (IDS,),
                    {"use_cache": False})
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1))  # SoRA's proximal step is per tensor
    assert not [n for n in calls(step.graph_module, aten.split_with_sizes.default)
                if (n.meta.get(META_KEY) or {}).get("part") == "optimizer"]
    with pytest.raises(gp.PlanError, match="fuse_optimizer"):
        compiled().compile_training("causal_lm", gp.optim.SGD(lr=0.1), fuse_optimizer="yes")


# --- the output projection and the loss as one chunked op -------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_torch_in_chunks(bias: bool, monkeypatch) -> None:
    from graphpeft.training import head_loss
    from graphpeft.training.head_loss import linear_cross_entropy

    monkeypatch.setattr(head_loss, "MIN_CHUNK_ROWS", 1)
    torch.manual_seed(0)
    h = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, 9, (10,))
    labels[[1, 7]] = -100
    tensors = [h, w] + ([b] if bias else [])
    ours = linear_cross_entropy(h, w, b, labels, -100, w_grad=True, b_grad=bias, chunk_bytes=4 * 9 * 3)  # 4 chunks
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), labels, ignore_index=-100)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for g_ours, g_ref in zip(torch.autograd.grad(ours * 2, tensors), torch.autograd.grad(ref * 2, tensors)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head_trains", [False, True], ids=["frozen_head", "trained_head"])
def test_fused_head_loss_step_trains_like_the_plain_one_without_full_logits(head_trains: bool, monkeypatch) -> None:
    from graphpeft.training import head_loss

    monkeypatch.setattr(head_loss, "CHUNK_BYTES", 4 * 128 * 4)  # 4 tokens of logits per chunk: 4 chunks
    monkeypatch.setattr(head_loss, "MIN_CHUNK_ROWS", 1)
    rules = [gp.LoRA(targets=ALL, r=4, alpha=8, init="random")]
    if head_trains:
        rules.append(gp.Update(targets=["lm_head"]))
    make = lambda: gp.compile(tiny_llama(layers=LAYERS), gp.Plan(rules), (IDS,), {"use_cache": False})  # noqa: E731
    a, b = make(), make()
    plain = a.compile_training("causal_lm", gp.optim.AdamW(lr=1e-2), fuse_head_loss=False)
    fused = b.compile_training("causal_lm", gp.optim.AdamW(lr=1e-2))
    logits_shaped = lambda s: [n for n in s.graph_module.graph.nodes  # noqa: E731
                               if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
                               and n.meta["val"].dim() and n.meta["val"].shape[-1] == 128
                               and n.meta["val"].numel() == IDS.numel() * 128]
    assert logits_shaped(plain) and not logits_shaped(fused)  # the logits never exist in full
    assert fused.memory_report().peak_bytes <= plain.memory_report().peak_bytes  # (the optimizer peaks here)
    for _ in range(3):
        torch.testing.assert_close(fused(IDS), plain(IDS), rtol=1e-5, atol=1e-6)
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    assert ("lm_head.weight" in pb) == head_trains
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_chunks_hold_at_least_min_chunk_rows_tokens(monkeypatch) -> None:
    # a large vocabulary must not shrink chunks to a few tokens: each chunk's GEMMs read the whole
    # weight (Qwen2's 151936-token head made 43 chunks of 3 tokens, one onnxruntime prepack each)
    from graphpeft.training import head_loss

    h, w = torch.randn(200, 8), torch.randn(151936, 8)
    labels = torch.randint(0, 151936, (200,))
    seen: list[int] = []
    real = head_loss._LinearCrossEntropy.apply
    monkeypatch.setattr(head_loss._LinearCrossEntropy, "apply", lambda *a: seen.append(a[5]) or real(*a))
    head_loss.linear_cross_entropy(h, w, None, labels, -100, w_grad=False)
    assert seen == [67]  # 3 even chunks of >= MIN_CHUNK_ROWS (64) tokens, not 67 of 3


def test_fused_head_loss_keeps_logits_that_a_user_loss_reads() -> None:
    step = compiled().compile_training(lambda out, y: torch.nn.functional.mse_loss(out.logits, y),
                                       gp.optim.SGD(lr=0.1), example_batch=(IDS, torch.zeros(*IDS.shape, 128)))
    assert any(n.target is aten.mm.default and n.meta["val"].shape[-1] == 128 for n in step.graph_module.graph.nodes)


# --- merge_low_rank_branch: the cheapest association of LoRA's products ----------------------------

BIG = token_batch(batch=4, seq=32)  # 128 tokens: more than 2·in·out/(in+out) for every projection


def compiled_for(ids: torch.Tensor, dropout: float = 0.0) -> gp.CompiledModel:
    rule = gp.LoRA(targets=ALL, r=4, alpha=8, dropout=dropout, init="random")
    return gp.compile(tiny_llama(layers=LAYERS), gp.Plan([rule]), (ids,), {"use_cache": False})


def test_merge_low_rank_branch_computes_each_lora_linear_through_the_merged_weight() -> None:
    from graphpeft.training.low_rank_linear import merged_low_rank_linear

    cm = compiled_for(BIG)
    before = cm.graph_module
    gm, _ = run_pass(copy_graph(before), "fold_linear_scale")
    gm, p = run_pass(gm, "merge_low_rank_branch")
    assert p.match_count() == LAYERS * len(ALL)
    merged = calls(gm, merged_low_rank_linear)
    assert len(merged) == LAYERS * len(ALL) and all(META_KEY in n.meta for n in merged)
    assert not [n for n in calls(gm, aten.add.Tensor) if (n.meta.get(META_KEY) or {}).get("part") == "join"]
    # one detached input per distinct layer input (q/k/v share one, gate/up one): still fusable
    detached = calls(gm, aten.detach.default, "merge_low_rank_branch")
    assert len(detached) == 4 * LAYERS  # attention input, o_proj input, MLP input, down_proj input
    gm, fuse = run_pass(gm, "fuse_shared_input_linears")
    assert fuse.match_count() == 2 * LAYERS
    with torch.no_grad():
        torch.testing.assert_close(gm(BIG)[0], before(BIG)[0], rtol=1e-5, atol=1e-5)


def test_merge_low_rank_branch_declines_with_reasons() -> None:
    few = compiled_for(IDS)  # 16 tokens: forming a 32x32 weight twice costs more than it saves
    gm, _ = run_pass(copy_graph(few.graph_module), "fold_linear_scale")
    gm, p = run_pass(gm, "merge_low_rank_branch")
    assert p.match_count() == 0
    assert {m.reason for m in p.results} >= {"16 tokens: forming the merged 32x32 weight twice costs more than the "
                                              "thin products it saves"}
    dropped = compiled_for(BIG, dropout=0.1)  # the branch reads its own dropout mask: not the layer's input
    gm, p = run_pass(copy_graph(dropped.graph_module), "merge_low_rank_branch")
    assert p.match_count() == 0 and not p.results


def test_merged_low_rank_step_trains_like_the_plain_one_and_keeps_no_merged_weight() -> None:
    torch.manual_seed(0)
    a, b = compiled_for(BIG), compiled_for(BIG)
    opt = gp.optim.SGD(lr=0.5, momentum=0.9)
    plain = a.compile_training("causal_lm", opt, lowering=("fold_linear_scale", "fuse_shared_input_linears"))
    merged = b.compile_training("causal_lm", opt)
    gm = merged.graph_module
    recomputed = [n for n in calls(gm, aten.addmm.default) if (n.meta.get(META_KEY) or {}).get("recompute")]
    assert recomputed and all((n.meta[META_KEY]).get("part") == "backward" for n in recomputed)
    assert len(calls(gm, aten.mm.default)) < len(calls(plain.graph_module, aten.mm.default))
    # W + B A is formed again in the backward (CSE leaves it), so it is not alive across the step
    assert merged.memory_report().peak_bytes <= plain.memory_report().peak_bytes * 1.01
    for _ in range(3):
        torch.testing.assert_close(plain(BIG), merged(BIG), rtol=1e-5, atol=1e-5)
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5)


def test_merged_low_rank_step_runs_in_onnxruntime(tmp_path) -> None:
    cm = compiled_for(BIG)
    step = cm.compile_training("causal_lm", gp.optim.AdamW(lr=1e-3))
    assert [n for n in step.graph_module.graph.nodes if (n.meta.get(META_KEY) or {}).get("rule") == "merge_low_rank_branch"]
    check_step_in_onnxruntime(cm, step, BIG, tmp_path)
