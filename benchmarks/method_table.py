"""The README's method table, measured: every registered adapter method on one reference layer.

    python -m benchmarks.method_table              # nn.Linear(1024, 1024), published defaults
    python -m benchmarks.method_table --size 4096

For each method the plan rule is built with its published defaults (``targets`` only), compiled
onto a one-layer model, and the table reports its trainable parameters (and the frozen adapter
constants it adds: seeded bases, SVD factors, masks), whether it merges (and the merged-vs-unmerged
max difference after moving every trainable tensor off its init), and how long the forward of a
(4, 64, size) batch takes unmerged relative to the bare layer (median of interleaved repeats,
one thread). Writes ``benchmarks/results/method_table.json`` (atomically) and prints Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

#: options that are not the published default but make the rule apply to one square layer
#: (routed experts target MLPs by name; the reference model's layer is called "proj")
OVERRIDES: dict[str, dict[str, Any]] = {}


class OneLayer(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _median_ms(fn: Any, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure(size: int = 1024, repeats: int = 30) -> list[dict[str, Any]]:
    import graphpeft as gp
    from graphpeft.graph import get_tensor
    from graphpeft.registry import METHODS, RULES

    torch.manual_seed(0)
    base = OneLayer(size).eval()
    x = torch.randn(4, 64, size)
    rows = []
    for key, rule_cls in sorted(RULES.items()):
        method = METHODS.get(key)
        if method is None or key == "update":
            continue  # not an adapter (sparse updates train base weights: README "Sparse updates")
        options = {"targets": ["proj"], **OVERRIDES.get(key, {})}
        row: dict[str, Any] = {"method": key, "rule": f"gp.{rule_cls.__name__}"}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cm = gp.compile(base, gp.Plan([rule_cls(**options)]), (x,))
        except Exception as e:  # noqa: BLE001 - a row says why instead of the table failing
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            continue
        cm.eval()
        rule = cm.plan.rules[0]
        base_fields = {f.name for f in dataclasses.fields(gp.Rule)}
        row["defaults"] = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule) if f.name not in base_fields}
        row["trainable"] = cm.num_parameters(trainable_only=True)
        consts = [t for t, r in cm.roles().items() if r == gp.Role.ADAPTER_CONST]
        row["constants"] = sum(get_tensor(cm.graph_module, t).numel() for t in consts)
        row["mergeable"] = bool(method.mergeable)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in cm.trainable_parameters().values():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        if method.mergeable:
            merged = cm.merge().eval()
            with torch.no_grad():
                row["merge_max_diff"] = float((merged(x) - cm(x)).abs().max())
        # interleaved so both see the same machine state
        t_base, t_adapted = [], []
        for _ in range(3):
            t_base.append(_median_ms(base, x, repeats))
            t_adapted.append(_median_ms(cm, x, repeats))
        row["unmerged_forward_ratio"] = round(statistics.median(t_adapted) / statistics.median(t_base), 2)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], size: int) -> str:
    lines = [f"| method | rule | trainable params (Linear({size}, {size})) | frozen adapter constants | "
             "mergeable (max diff) | unmerged forward / base |",
             "|---|---|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | `{r['rule']}` | error: {r['error']} | | | |")
            continue
        merge = f"yes ({r['merge_max_diff']:.1e})" if r["mergeable"] else "no (routed)"
        lines.append(f"| {r['method']} | `{r['rule']}` | {r['trainable']:,} | {r['constants']:,} | {merge} | "
                     f"{r['unmerged_forward_ratio']:.2f}× |")
    return "\n".join(lines)


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.size, args.repeats)
    folder = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"size": args.size, "torch": torch.__version__, "rows": rows}, f, indent=1)
    os.replace(tmp, os.path.join(folder, "method_table.json"))
    print(markdown(rows, args.size))


if __name__ == "__main__":
    main()
