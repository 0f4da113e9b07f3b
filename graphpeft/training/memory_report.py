"""The memory plan of a training step (:class:`MemoryReport`, filled by the ``plan_memory`` and
``measure_memory`` passes) and the passes a ``memory_budget`` adds.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

from ..errors import GraphPeftError

# --- memory report (filled by the plan_memory pass) -------------------------------------------

MEMORY_CATEGORIES = ("weights", "activations", "gradients", "optimizer_state")


@dataclasses.dataclass
class MemoryReport:
    """Static memory plan of a training graph: liveness in graph order -> peak bytes.

    ``at_peak`` splits the peak by category (weights: frozen and trainable tensors, old and
    updated; activations: batch and forward values; gradients: backward values; optimizer
    state: state in and out plus update temporaries). ``category_peaks`` is each category's own
    maximum over the step, ``totals`` the bytes of the graph's inputs by category, and
    ``trace_order_peak_bytes`` the peak of the same graph in the order it was traced (before
    ``reorder_updates``).
    """

    peak_bytes: int
    peak_node: str
    at_peak: dict[str, int]
    category_peaks: dict[str, int]
    totals: dict[str, int]
    trace_order_peak_bytes: Optional[int]
    num_nodes: int
    #: live bytes after each node, in graph order (for plots)
    timeline: list[int] = dataclasses.field(default_factory=list, repr=False)
    #: live bytes per category after each node (``timeline`` split by :data:`MEMORY_CATEGORIES`)
    timeline_by_category: dict[str, list[int]] = dataclasses.field(default_factory=dict, repr=False)
    #: the node names of the timeline's positions
    node_names: list[str] = dataclasses.field(default_factory=list, repr=False)
    #: measured by the ``measure_memory`` pass (``memory_report(measure=True)``): the peak of live
    #: tensor-storage bytes while the torch executor runs the graph once, where, and per node
    measured_peak_bytes: Optional[int] = None
    measured_peak_node: str = ""
    measured_timeline: list[int] = dataclasses.field(default_factory=list, repr=False)
    #: the planned peak before the ``schedule_memory`` pass reordered the graph (None: it did not run)
    unscheduled_peak_bytes: Optional[int] = None
    #: ``memory_budget`` of the step (None: no budget) and what ``rematerialize`` did to meet it:
    #: the planned peak before, and the forward values now recomputed in the backward
    memory_budget: Optional[int] = None
    peak_before_remat_bytes: Optional[int] = None
    recomputed: list[str] = dataclasses.field(default_factory=list)
    #: the matrix multiplies among ``recomputed`` (only when cheaper recomputation could not meet the
    #: budget) and the FLOPs their second run costs per step
    recomputed_gemms: list[str] = dataclasses.field(default_factory=list)
    recomputed_gemm_flops: int = 0

    @property
    def plan_vs_measured(self) -> Optional[float]:
        """Planned peak / measured peak (None until measured)."""
        if not self.measured_peak_bytes:
            return None
        return self.peak_bytes / self.measured_peak_bytes

    def plot(self, path: Union[str, os.PathLike], title: Optional[str] = None) -> None:
        """Draw the memory timeline to an image file (``step.memory_report().plot("timeline.png")``):
        live bytes by category over the schedule (stacked), the peak, the measured live bytes if
        measured, and the budget if any. Needs matplotlib (``pip install graphpeft[bench]``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise GraphPeftError("MemoryReport.plot needs matplotlib: pip install matplotlib "
                                 "(or graphpeft[bench])") from e
        mib = 1 / (1 << 20)
        fig, ax = plt.subplots(figsize=(10, 4.5))
        xs = list(range(len(self.timeline)))
        cats = [c for c in MEMORY_CATEGORIES if self.timeline_by_category.get(c)]
        if cats:
            ax.stackplot(xs, *[[v * mib for v in self.timeline_by_category[c]] for c in cats],
                         labels=[c.replace("_", " ") for c in cats], alpha=0.8)
        else:
            ax.plot(xs, [v * mib for v in self.timeline], label="planned")
        if self.measured_timeline:
            ax.plot(list(range(len(self.measured_timeline))), [v * mib for v in self.measured_timeline],
                    color="black", linewidth=0.8, linestyle="--", label="measured (torch)")
        peak_x = self.node_names.index(self.peak_node) if self.peak_node in self.node_names else None
        ax.axhline(self.peak_bytes * mib, color="red", linewidth=0.8)
        ax.annotate(f"peak {self.peak_bytes * mib:.1f} MiB", (peak_x or 0, self.peak_bytes * mib),
                    textcoords="offset points", xytext=(4, 4), color="red", fontsize=8)
        if self.memory_budget is not None:
            ax.axhline(self.memory_budget * mib, color="purple", linestyle=":", label="budget")
        ax.set_xlabel("op (schedule order)")
        ax.set_ylabel("live MiB")
        ax.set_title(title or f"training-step memory ({self.num_nodes} nodes)")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=120)
        plt.close(fig)

    def __str__(self) -> str:
        mib = 1 / (1 << 20)
        lines = [f"training-step memory plan ({self.num_nodes} nodes)",
                 f"  peak {self.peak_bytes * mib:10.3f} MiB at {self.peak_node}"]
        if self.trace_order_peak_bytes is not None:
            lines.append(f"  peak in trace order (no reordering) {self.trace_order_peak_bytes * mib:10.3f} MiB")
        if self.unscheduled_peak_bytes is not None:
            lines.append(f"  peak before schedule_memory {self.unscheduled_peak_bytes * mib:10.3f} MiB")
        if self.memory_budget is not None:
            lines.append(f"  budget {self.memory_budget * mib:10.3f} MiB; peak before rematerialization "
                         f"{(self.peak_before_remat_bytes or self.peak_bytes) * mib:10.3f} MiB; "
                         f"{len(self.recomputed)} forward values recomputed in the backward")
            if self.recomputed_gemms:
                lines.append(f"  of them {len(self.recomputed_gemms)} matrix multiplies "
                             f"({self.recomputed_gemm_flops / 1e9:.2f} GFLOP a step): {', '.join(self.recomputed_gemms)}")
        if self.measured_peak_bytes is not None:
            lines.append(f"  measured peak (torch executor, live tensor storage) {self.measured_peak_bytes * mib:10.3f} MiB"
                         f" at {self.measured_peak_node}; plan / measured = {self.plan_vs_measured:.3f}")
        lines.append(f"  {'category':16s} {'at peak MiB':>12s} {'own peak MiB':>13s} {'inputs MiB':>11s}")
        for c in MEMORY_CATEGORIES:
            lines.append(f"  {c:16s} {self.at_peak.get(c, 0) * mib:12.3f} {self.category_peaks.get(c, 0) * mib:13.3f} "
                         f"{self.totals.get(c, 0) * mib:11.3f}")
        return "\n".join(lines)


#: what ``memory_budget`` adds to the training passes, before ``plan_memory``
MEMORY_BUDGET_PASSES: tuple[str, ...] = ("rematerialize", "schedule_memory")


def with_memory_budget_passes(names: Sequence[str]) -> list[str]:
    """``names`` with :data:`MEMORY_BUDGET_PASSES` added before ``plan_memory`` (or at the end)."""
    names = list(names)
    for extra in MEMORY_BUDGET_PASSES:
        if extra not in names:
            at = names.index("plan_memory") if "plan_memory" in names else len(names)
            names.insert(at, extra)
    return names
