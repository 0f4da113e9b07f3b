"""decompose_attention: the fused CPU attention (forward and backward) as math for exports."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import graphpeft as gp
from graphpeft.graph import META_KEY
from graphpeft.infra import PassContext, PassManager, Pipeline, copy_graph
from graphpeft.registry import PASSES
from graphpeft.training import phase_of
from method_helpers import check_step_in_onnxruntime
from models import tiny_llama, token_batch

aten = torch.ops.aten
FUSED = {aten._scaled_dot_product_flash_attention_for_cpu.default,
         aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


def _traced_attention(is_causal: bool, mask: Optional[torch.Tensor]) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """``(q, k, v, do) -> (out, dq, dk, dv)`` traced with the fused CPU kernels kept."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, *maybe_mask: torch.Tensor) -> Any:
        mask = maybe_mask[0] if maybe_mask else None

        def out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal) * do).sum()
        grads = torch.func.grad(out, argnums=(0, 1, 2))(q, k, v)
        return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal), *grads)

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 3, 12, 8, generator=g) for _ in range(4)]
    args = [a.transpose(1, 2).contiguous().transpose(1, 2) for a in args]  # (B, L, H, E) storage, as HF models
    if mask is not None:
        args.append(mask)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        gm = make_fx(f, tracing_mode="fake")(*args)
    for n in gm.graph.nodes:
        n.meta[META_KEY] = {"pass_name": "test", "rule": "", "origin": "", "adapter": "", "part": ""}
    return gm, args


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask"])
def test_decompose_attention_matches_the_fused_kernels(case: str) -> None:
    mask = None
    if case == "bool_mask":
        mask = torch.rand(12, 12, generator=torch.Generator().manual_seed(1)) > 0.3
        mask |= torch.eye(12, dtype=torch.bool)
    elif case == "float_mask":
        mask = torch.randn(12, 12, generator=torch.Generator().manual_seed(1))
    gm, args = _traced_attention(case == "causal", mask)
    assert sum(n.target in FUSED for n in gm.graph.nodes) == 3  # forward twice (output, grad), backward once
    expected = gm(*args)
    ctx = PassContext(verify=False)
    out = PassManager().run(copy_graph(gm), Pipeline("t", [PASSES["decompose_attention"]()]), ctx).gm
    assert ctx.options["decompose_attention"] == 3
    assert not [n for n in out.graph.nodes if n.target in FUSED]
    made = [n for n in out.graph.nodes if (n.meta.get(META_KEY) or {}).get("pass_name") == "decompose_attention"]
    assert made and all(n.meta[META_KEY]["rule"] == "attention" for n in made)
    for got, want in zip(out(*args), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decompose_attention_gives_a_fully_masked_row_zeros() -> None:
    from graphpeft.passes.legalize.decompose_attention import attention_backward, attention_forward

    q, k, v, do = (torch.randn(1, 1, 3, 4) for _ in range(4))
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    out, lse = attention_forward(q, k, v, attn_mask=mask)
    dq, dk, dv = attention_backward(do, q, k, v, out, lse, 0.0, False, attn_mask=mask)
    assert torch.isinf(lse[0, 0, 1]) and out[0, 0, 1].abs().sum() == 0 and dq[0, 0, 1].abs().sum() == 0
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_step_keeps_fused_attention_and_exports_it_as_math(tmp_path) -> None:
    ids = token_batch()
    cm = gp.compile(tiny_llama(), gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random")]), (ids,),
                    {"use_cache": False})
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1))
    math = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), fused_attention=False)
    fused = [n for n in step.graph_module.graph.nodes if n.target in FUSED]
    assert len(fused) == 2 * 2  # two layers: forward and backward each
    report = step.backward_report()  # the fused backward counts as one matrix-product op per layer
    math_bmm = [n for n in math.graph_module.graph.nodes if n.target == aten.bmm.default and phase_of(n) == "backward"]
    assert math_bmm and report.backward_matmuls == math.backward_report().backward_matmuls - len(math_bmm) + 2
    assert not [n for n in math.graph_module.graph.nodes if n.target in FUSED]
    assert len(step.graph_module.graph.nodes) < len(math.graph_module.graph.nodes)
    check_step_in_onnxruntime(cm, step, ids, tmp_path)
