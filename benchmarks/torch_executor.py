"""A/B of the torch executor's overhead cuts, in one process (robust on a loaded machine).

    python -m benchmarks.torch_executor                     # benchmark Llama, 4 x 128
    python -m benchmarks.torch_executor --case llama256 --rounds 21

Builds the LoRA step twice: as before the cuts (``executor="fx"``, no ``use_causal_attention``,
the old per-call wrapper: ``flat_inputs`` + one ``get_tensor`` per trainable tensor) and as now
(the default; its runner's fused AdamW kernel is timed on its own too: the same graph with and
without ``lower_for_torch``). Prints node counts (stored graph, the runner's code) and, for each cut, the
median time of ``--rounds`` interleaved A/B runs at one thread with ``time.process_time`` (CPU
time of this process: other work on the machine inflates it less than wall time; the minimum
ratio is printed beside the median's). Ratios, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any, Callable

import torch
import torch.fx as fx

from .cases import CASES, _gp_training_step, _targets


def _count(graph: fx.Graph) -> str:
    ops = collections.Counter(n.op for n in graph.nodes)
    return f"{len(graph.nodes)} nodes ({ops['call_function'] + ops['call_method']} calls)"


def _ab(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> tuple[float, float, float, float]:
    """(median a, median b) in ms, median ratio b/a, min ratio b/a."""
    a(), b()
    ta, tb = [], []
    for _ in range(rounds):
        for f, out in ((a, ta), (b, tb)):
            start = time.process_time()
            f()
            out.append(time.process_time() - start)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return ma * 1e3, mb * 1e3, mb / ma, min(tb) / min(ta)


def main(argv: Any = None) -> int:
    from graphpeft.graph import get_tensor
    from graphpeft.training.runner import NativeRunner, lower_for_torch, native_graph, native_runner
    from graphpeft.training.options import DEFAULT_TRAINING_PASSES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="llama", choices=sorted(CASES))
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    case = CASES[args.case]()
    batch = (*case.batch, *_targets(case))
    cm_new, new = _gp_training_step(case)
    passes = [p for p in DEFAULT_TRAINING_PASSES if p != "use_causal_attention"]
    cm_old, old = _gp_training_step(case, passes=passes, executor="fx")
    cm_old.load_adapter_state_dict(cm_new.adapter_state_dict())
    g_old, g_new = old.graph_module, new.graph_module
    old_in, new_in = old.flat_inputs(*batch), new.flat_inputs(*batch)
    sig = old.signature

    def old_step() -> None:  # the wrapper as it was: flat_inputs, then one get_tensor per tensor
        inputs = old.flat_inputs(*batch)
        out = g_old(*inputs)
        for name, t in zip(sig.params, out[1:1 + len(sig.params)]):
            get_tensor(cm_old.graph_module, name).copy_(t)
        old._state = dict(zip(sig.state, (t.detach() for t in out[1 + len(sig.params):])))

    run_old, run_new, run_fused = NativeRunner(g_old), NativeRunner(g_new), native_runner(g_new)
    lines = [f"{case.name}: step graph before {_count(g_old.graph)}, now {_count(g_new.graph)}; "
             f"the runner's code {_count(native_graph(g_new.graph))}, "
             f"with its lowering {_count(native_graph(lower_for_torch(g_new)))}"]
    with torch.no_grad():
        for name, a, b in (("fx module -> runner (same graph)", lambda: g_old(*old_in), lambda: run_old(*old_in)),
                           ("use_causal_attention (runner both)", lambda: run_old(*old_in), lambda: run_new(*new_in)),
                           ("fused AdamW kernel (runner without -> with its lowering)", lambda: run_new(*new_in),
                            lambda: run_fused(*new_in)),
                           ("whole step, before -> now", old_step, lambda: new(*batch))):
            ma, mb, ratio, low = _ab(a, b, args.rounds)
            lines.append(f"{name}: {ma:.1f} -> {mb:.1f} ms, ratio {ratio:.3f} (of minima {low:.3f})")
    print("\n".join(lines))  # noqa: T201 - a command-line report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
