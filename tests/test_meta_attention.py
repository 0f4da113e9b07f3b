"""A step planned on the meta device keeps the attention kernel the CPU step runs
(``graphpeft/training/meta_attention.py``): the meta plan is the CPU step's plan."""

from __future__ import annotations

import pytest
import torch

import graphpeft as gp

CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=128)
IDS = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
KW = dict(example_inputs=(IDS,), example_kwargs={"use_cache": False})
FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def _step(meta: bool, kv_heads: int, **options):
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with init_empty_weights(include_buffers=False) if meta else torch.device("cpu"):
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=kv_heads, **CFG)).eval()
    cm = gp.compile(model, [gp.LoRA(targets="all-linear", r=4)], **KW)
    return cm.compile_training("causal_lm", gp.optim.SGD(lr=0.1), example_batch=(IDS, IDS), **options)


def _attention_ops(step) -> list[str]:
    return sorted({str(n.target).split(".")[1] for n in step.graph_module.graph.nodes
                   if n.op == "call_function" and "attention" in str(n.target)})


@pytest.mark.parametrize("fused", [True, False])
def test_meta_plan_has_the_cpu_attention(fused: bool) -> None:
    meta, cpu = _step(True, 4, fused_attention=fused), _step(False, 4, fused_attention=fused)
    want = [FLASH, FLASH + "_backward"] if fused else []
    assert _attention_ops(meta) == _attention_ops(cpu) == want
    # the same plan (the tensors are the same; the meta graph's op order may differ slightly)
    a, b = meta.memory_report().peak_bytes, cpu.memory_report().peak_bytes
    assert abs(a - b) <= 0.02 * b, (a, b)


def test_grouped_query_attention_stays_math_on_meta() -> None:
    """The CPU flash op has no grouped-query form; transformers repeats the KV heads before it on
    the CPU, so what the meta trace sees decides, as on the CPU."""
    meta, cpu = _step(True, 2), _step(False, 2)
    assert _attention_ops(meta) == _attention_ops(cpu)
