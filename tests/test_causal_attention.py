"""use_causal_attention (passes/cleanup/causal_attention.py): a decoder's constant causal mask
becomes the fused attention's is_causal flag, forward and backward; structure, match count,
bit-identical steps, declines with reasons, the ONNX export still matches torch."""

from __future__ import annotations

import torch
import torch.fx as fx

import graphpeft as gp
from graphpeft.passes.cleanup.causal_attention import BACKWARD, FORWARD, constant_value, is_causal_pattern
from graphpeft.training.options import DEFAULT_TRAINING_PASSES

from method_helpers import check_step_in_onnxruntime
from models import tiny_llama, token_batch

IDS = token_batch()


def _model() -> gp.CompiledModel:
    return gp.compile(tiny_llama(), gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=4, init="random")]),
                      (IDS,), {"use_cache": False})


def _attention(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target in (FORWARD, BACKWARD)]


def test_causal_mask_becomes_the_flag_bit_identically(tmp_path) -> None:
    a, b = _model(), _model()
    b.load_adapter_state_dict(a.adapter_state_dict())
    sa = a.compile_training("causal_lm", gp.optim.SGD(lr=0.1))
    without = [p for p in DEFAULT_TRAINING_PASSES if p != "use_causal_attention"]
    sb = b.compile_training("causal_lm", gp.optim.SGD(lr=0.1), passes=without)
    hits = [m for m in sa.ctx.report if getattr(m, "rule", "") == "causal_mask_to_flag"]
    layers = sum(1 for n in _attention(sa.graph_module) if n.target == FORWARD)
    assert layers >= 2 and len(hits) == layers and all(m.ok for m in hits)
    for node in _attention(sa.graph_module):  # forward and backward: no mask, is_causal set
        assert "attn_mask" not in node.kwargs
        assert node.args[4 if node.target == FORWARD else 7] is True
        assert node.meta["graphpeft"]["pass_name"] == "use_causal_attention"
    assert all(isinstance(n.kwargs.get("attn_mask"), fx.Node) for n in _attention(sb.graph_module))
    assert len(sa.graph_module.graph.nodes) < len(sb.graph_module.graph.nodes)  # the mask's ops died
    for _ in range(2):
        assert torch.equal(sa(IDS), sb(IDS))
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    check_step_in_onnxruntime(a, sa, IDS, tmp_path)  # decompose_attention writes the causal form


def test_masks_that_are_not_constant_causal_decline() -> None:
    g = fx.Graph()
    x = g.placeholder("padding")
    m = g.call_function(torch.ops.aten.mul.Tensor, (x, 1.0))
    g.output(m)
    value, why = constant_value(m)
    assert value is None and "graph input" in why
    keep = torch.ones(4, 4, dtype=torch.bool).tril()
    assert is_causal_pattern(keep.expand(2, 1, 4, 4), 4)
    assert is_causal_pattern(torch.zeros(4, 4).masked_fill(~keep, float("-inf")), 4)
    assert not is_causal_pattern(torch.ones(4, 4, dtype=torch.bool), 4)  # no masking at all
    assert not is_causal_pattern(torch.zeros(4, 4).masked_fill(~keep, -1e9), 4)  # finite: not exact
    assert not is_causal_pattern(keep, 3)


def test_a_meta_plan_gets_the_flag_too() -> None:
    """A step traced on meta (no weights) evaluates the mask's constants on the CPU: its graph
    has the CPU step's attention."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=128)).eval()
    cm = gp.compile(model, [gp.LoRA(targets=["q_proj"], r=4)], example_inputs=(ids,), example_kwargs={"use_cache": False})
    step = cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(ids, ids))
    nodes = _attention(step.graph_module)
    assert nodes and all("attn_mask" not in n.kwargs for n in nodes)
