"""onednn_matmul (passes/lower): the inductor executor's copy of a step graph runs float32 CPU
GEMMs through oneDNN (``graphpeft::onednn_mm``). Structure, match count, declines with reasons,
the verifier on the lowered graph, numerics against the stored graph, the op on strided views."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.fx as fx

import graphpeft as gp
from graphpeft.graph import META_KEY
from graphpeft.infra import PassContext, copy_graph
from graphpeft.registry import PASSES
from graphpeft.training import onednn_kernels
from graphpeft.training.options import INDUCTOR_LOWERING
from graphpeft.training.runner import lower_for_torch
from graphpeft.training.signature import verify_training

from models import tiny_llama, token_batch

pytestmark = pytest.mark.skipif(not onednn_kernels.available(), reason="this PyTorch build has no oneDNN")

IDS = token_batch()
aten = torch.ops.aten
ONEDNN_MM = torch.ops.graphpeft.onednn_mm.default


@pytest.fixture
def any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model's products are below the pass's size floor: lower them all the same."""
    monkeypatch.setattr(sys.modules[PASSES["onednn_matmul"].__module__], "MIN_MULTIPLY_ADDS", 0)
    monkeypatch.setenv(onednn_kernels.ENV, "1")  # whatever this CPU's measurement says


def _step(**options: object) -> gp.TrainingStep:
    cm = gp.compile(tiny_llama(layers=2), gp.Plan([gp.LoRA(targets=["q_proj", "v_proj", "down_proj"], r=4,
                                                            init="random")]), (IDS,), {"use_cache": False})
    return cm.compile_training("causal_lm", gp.optim.SGD(lr=0.5), example_batch=(IDS,), **options)


def _targets(graph: fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function"]


def test_structure_match_count_declines_and_verifier(any_size: None) -> None:
    step = _step()
    before = _targets(step.graph_module.graph)
    p = PASSES["onednn_matmul"]()
    gm = p(copy_graph(step.graph_module), PassContext()).gm
    after = _targets(gm.graph)
    full_addmm = before.count(aten.addmm.default)  # the merged LoRA branch: base + (x A) Bᵀ
    assert p.match_count() == before.count(aten.mm.default) > 0
    assert after.count(ONEDNN_MM) == p.match_count() and aten.mm.default not in after
    assert after.count(aten.addmm.default) == full_addmm
    declined = [m for m in p.results if not m.ok]
    assert len(declined) == full_addmm and all("whole matrix" in m.reason for m in declined)
    assert all(n.meta[META_KEY]["pass_name"] == "onednn_matmul" for n in gm.graph.nodes if n.target == ONEDNN_MM)
    assert ONEDNN_MM not in _targets(step.graph_module.graph)  # the stored graph is untouched
    verify_training(gm)


def test_lowered_step_matches_the_stored_graph(any_size: None) -> None:
    """The stored graph with oneDNN GEMMs (run by fx, no compile) against it run as is, three SGD steps."""
    ours = _step(executor=lambda gm: fx.GraphModule(gm, lower_for_torch(gm, INDUCTOR_LOWERING)))
    ref = _step(executor="fx")
    for _ in range(3):
        torch.testing.assert_close(ours(IDS), ref(IDS), rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(ours.cm.trainable_parameters().items(), ref.cm.trainable_parameters().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_op_on_views_and_bias() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(6, 40, generator=g), torch.randn(40, 24, generator=g), torch.randn(24, generator=g)
    for x, y in [(a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t()),
                 (a, torch.randn(40, 48, generator=g)[:, ::2]), (torch.randn(6, 80, generator=g)[:, 20:60], b),
                 (torch.randn(300, 7, generator=g).t(), torch.randn(300, 48, generator=g)[:, :5]),  # (bᵀ aᵀ)ᵀ
                 (torch.randn(300, 7, generator=g).t(), torch.randn(5, 300, generator=g).t())]:
        torch.testing.assert_close(ONEDNN_MM(x, y), x @ y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ONEDNN_MM(a, b, bias), torch.addmm(bias, a, b), rtol=1e-5, atol=1e-5)


def test_declines_other_dtypes_and_scaled_addmm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(onednn_kernels.ENV, "1")  # the reasons below, whatever this CPU measured
    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> tuple:
            return torch.mm(x.double(), w.double()), torch.addmm(c, x, w, beta=0.5)

    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(M())(torch.randn(128, 64), torch.randn(64, 64), torch.randn(64))
    p = PASSES["onednn_matmul"]()
    p(gm, PassContext())
    reasons = sorted(m.reason for m in p.results if not m.ok)
    assert p.match_count() == 0 and reasons == ["addmm with alpha / beta", "not a product of 2-D float32 CPU tensors"]
    small = make_fx(lambda x, w: torch.mm(x, w))(torch.randn(64, 64), torch.randn(64, 64))
    p(small, PassContext())
    assert p.match_count() == 0 and "too small" in p.results[0].reason


def test_flop_counter_counts_the_op() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        ONEDNN_MM(torch.randn(6, 40), torch.randn(40, 24), torch.randn(24))
    assert counter.get_total_flops() == 2 * 6 * 40 * 24


def test_declined_where_onednn_is_not_faster(any_size: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """GRAPHPEFT_ONEDNN=0 (or a CPU where oneDNN measured slower): every product stays, with the reason."""
    monkeypatch.setenv(onednn_kernels.ENV, "0")
    assert not onednn_kernels.preferred()
    gm = _step().graph_module
    p = PASSES["onednn_matmul"]()
    out = p(copy_graph(gm), PassContext()).gm
    assert p.match_count() == 0 and not any(n.target == ONEDNN_MM for n in out.graph.nodes)
    assert p.results and all("not faster than torch.mm" in m.reason for m in p.results if not m.ok)
    monkeypatch.delenv(onednn_kernels.ENV)
    assert onednn_kernels.preferred() == onednn_kernels._measured_faster(torch.get_num_threads())  # measured, cached
