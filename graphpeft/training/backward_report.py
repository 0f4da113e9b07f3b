"""What the pruned backward of a training step computes, layer by layer (data; filled by the
``report_backward`` pass, returned by ``TrainingStep.backward_report()``).

Autograd differentiates only toward trainable tensors, so the backward of a sparse-update step
stops at the lowest trainable tensor and computes, at each layer above it, only what is needed:

* ``input grad`` — the gradient flows through the layer to something trainable below it
  (``dx = dy · W``), without computing the layer's weight gradient when the weight is frozen;
* ``weight grad`` — the full weight gradient (``dW = dyᵀ x``) of a trainable weight;
* ``weight-slice grad`` — the gradient of the trainable rows only (a channel-fraction update);
* ``bias grad`` / ``norm weight grad`` / ``adapter grads``;
* nothing — the backward never reaches the layer (it lies below every trainable tensor).

    print(step.backward_report())
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class LayerBackward:
    """What the backward computes at one layer (or norm module).

    Attributes:
        path: the module path.
        kind: ``linear`` / ``conv`` / ``embedding`` / ``norm``.
        reached: whether any backward op computes a gradient at this layer.
        computes: what it computes there, e.g. ``["input grad", "weight-slice grad (8 of 32 rows)"]``.
        matmuls: backward matrix products (``mm``, ``addmm``, ``bmm``, ``convolution_backward``, the fused
            attention backward)
            computing this layer's input gradient or the gradients of its tensors.
        trainable: the layer's tensors that the step updates.
    """

    path: str
    kind: str
    reached: bool
    computes: list[str]
    matmuls: int
    trainable: list[str] = dataclasses.field(default_factory=list)

    @property
    def summary(self) -> str:
        return ", ".join(self.computes) if self.computes else "nothing"


@dataclasses.dataclass
class BackwardReport:
    """The pruned backward of a training graph, per layer and in total.

    Attributes:
        layers: one :class:`LayerBackward` per layer and norm module, in graph order.
        backward_ops: number of ops of the ``backward`` phase.
        backward_matmuls: matrix products of the backward (``mm``, ``addmm``, ``bmm``,
            ``convolution_backward``), attention included.
        ops_by_target: backward op counts by ATen op name.
    """

    layers: list[LayerBackward]
    backward_ops: int
    backward_matmuls: int
    ops_by_target: dict[str, int]

    def layer(self, path: str) -> LayerBackward:
        """The entry of one layer by module path (``KeyError`` if there is none)."""
        for entry in self.layers:
            if entry.path == path:
                return entry
        raise KeyError(f"no layer {path!r} in the report; layers: {[l.path for l in self.layers][:8]} ...")

    def reached(self) -> list[str]:
        """Paths of the layers the backward reaches."""
        return [l.path for l in self.layers if l.reached]

    def first_reached(self) -> Optional[str]:
        """The lowest layer (in graph order) the backward reaches: where it stops."""
        reached = self.reached()
        return reached[0] if reached else None

    def __str__(self) -> str:
        width = max((len(l.path) for l in self.layers), default=10)
        lines = [f"pruned backward: {self.backward_ops} ops, {self.backward_matmuls} matmuls; "
                 f"reaches {len(self.reached())} of {len(self.layers)} layers (stops at {self.first_reached()})",
                 f"  {'layer':{width}s} {'kind':9s} {'matmuls':>7s}  computes"]
        for l in self.layers:
            lines.append(f"  {l.path:{width}s} {l.kind:9s} {l.matmuls:7d}  {l.summary}")
        return "\n".join(lines)


__all__ = ["BackwardReport", "LayerBackward"]
