"""The training graph's contract: phases, the stable input/output names and
:class:`TrainingSignature` (stored in ``gm.meta`` and exported files), and the training verifier.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx

from ..errors import VerificationError
from ..graph import META_KEY, graph_meta, roles

Tensor = torch.Tensor

#: phases of a training graph, in the order they are traced
PHASES = ("input", "forward", "loss", "backward", "accumulate", "clip", "optimizer", "check",
          "communicate")  # communicate: data-parallel collectives (passes/training/allreduce_gradients.py)
#: phases that make up the update (what ``reorder_updates`` moves next to the gradients)
UPDATE_PHASES = ("accumulate", "clip", "optimizer")

TRAINING_META = "training"
ORDER_KEY = "graphpeft_trace_order"
COMPILER_PASS_NAME = "compile_training"

# ONNX-facing names of the graph's inputs and outputs
PARAM_IN, PARAM_OUT, STATE_IN, STATE_OUT, LR_NAME, LOSS_NAME = "param/", "param_out/", "state/", "state_out/", "lr", "loss"
#: the last output of a training graph: true when the step was skipped (non-finite loss, gradient or lr)
SKIPPED_NAME = "skipped"
BATCH_IN = "batch/"

# --- signature ------------------------------------------------------------------------------


@dataclasses.dataclass
class IOSpec:
    """One input or output of the training graph."""

    kind: str  # "param" | "state" | "lr" | "batch" | "loss"
    key: str  # parameter name, state key, "lr", batch index, "loss"
    name: str  # stable external (ONNX) name
    shape: list[int]
    dtype: str

    @staticmethod
    def of(kind: str, key: str, name: str, t: Tensor) -> "IOSpec":
        return IOSpec(kind, key, name, [int(s) for s in t.shape], str(t.dtype).replace("torch.", ""))


@dataclasses.dataclass
class TrainingSignature:
    """What the training graph takes and returns, with stable names; stored in ``gm.meta``
    and in exported files."""

    inputs: list[IOSpec]
    outputs: list[IOSpec]
    params: list[str]
    param_roles: dict[str, str]
    state: list[str]
    num_model_inputs: int
    num_targets: int
    optimizer: dict[str, Any]
    loss: str
    lr: float
    accumulation_steps: int = 1
    clip_grad_norm: Optional[float] = None
    #: what a step with a non-finite loss, gradient or lr does (it is skipped in the graph either
    #: way; "raise" also raises after it): see TrainingOptions.nonfinite
    nonfinite: str = "skip"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "TrainingSignature":
        data = dict(data)
        data["inputs"] = [IOSpec(**d) for d in data["inputs"]]
        data["outputs"] = [IOSpec(**d) for d in data["outputs"]]
        return TrainingSignature(**data)


def signature_of(gm: fx.GraphModule) -> TrainingSignature:
    """The :class:`TrainingSignature` of a training graph (raises if ``gm`` is not one)."""
    sig = graph_meta(gm).get(TRAINING_META)
    if sig is None:
        raise VerificationError("this graph is not a training-step graph (no training signature in its meta)")
    return sig


def phase_of(node: fx.Node) -> str:
    """The phase of a node of a training graph (``"input"`` for placeholders and tensors)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return "input" if node.op != "output" else "output"
    prov = node.meta.get(META_KEY) or {}
    return prov.get("part") or "forward"


# --- verification --------------------------------------------------------------------------------


def verify_training(gm: fx.GraphModule) -> None:
    """The verifier for training graphs: graph lint and role invariants, plus the signature
    (inputs and outputs agree with it in number, shape and dtype), no trainable tensor stored
    in the graph, and provenance with a phase on every op."""
    from ..verify import verify

    verify(gm, check_shapes=False)
    sig = signature_of(gm)
    problems: list[str] = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    for what, nodes, specs in (("input", placeholders, sig.inputs), ("output", list(outputs), sig.outputs)):
        if len(nodes) != len(specs):
            problems.append(f"the graph has {len(nodes)} {what}s, its signature {len(specs)}")
            continue
        for node, spec in zip(nodes, specs):
            v = node.meta.get("val") if isinstance(node, fx.Node) else None
            if isinstance(v, Tensor) and ([int(s) for s in v.shape] != spec.shape
                                          or str(v.dtype).replace("torch.", "") != spec.dtype):
                problems.append(f"{what} {spec.name} is {v.dtype}{list(v.shape)}, its signature says "
                                f"{spec.dtype}{spec.shape}")
    for name, role in roles(gm).items():
        if role.trainable:
            problems.append(f"trainable tensor {name} is stored in the graph; it must be an input")
    for node in gm.graph.nodes:
        if node.op == "call_function" and not (node.meta.get(META_KEY) or {}).get("part"):
            problems.append(f"node {node.name} has no provenance/phase")
    if problems:
        raise VerificationError("; ".join(problems[:20]))
