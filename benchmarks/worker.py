"""Runs one (case, contender) in a fresh process and prints its memory as one JSON line.

    python -m benchmarks.worker --case llama --contender peft_lora_eager --steps 3
"""

from __future__ import annotations

import argparse
import json

import torch

from .cases import CASES, INFER, TRAIN
from .harness import peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--contender", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    case = CASES[a.case](a.quick)
    table = TRAIN if a.contender in TRAIN else INFER
    before = peak_rss_mb()
    step = table[a.contender](case)
    ready = peak_rss_mb()
    for _ in range(a.steps):
        step()
    result = {"rss_before_mb": before, "rss_ready_mb": ready, "peak_rss_mb": peak_rss_mb()}
    planned = getattr(step, "planned_peak_bytes", None)  # the static memory planner's estimate, if any
    if planned is not None:
        result["planned_peak_mb"] = planned / (1 << 20)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
