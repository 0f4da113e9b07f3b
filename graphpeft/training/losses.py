"""Loss functions for the training-step compiler: named losses or a user callable.

A training step is called with one batch: the model's inputs (as the model was compiled, flat)
followed by the targets. A :class:`Loss` turns the model's outputs and the targets into a
scalar, and says how much each micro-batch weighs when gradients are accumulated, so that
accumulating ``k`` micro-batches gives exactly the big batch's mean.

Named losses:

* ``"cross_entropy"`` — mean cross-entropy of the logits (``(..., C)``) against integer
  labels (``(...)``), ``ignore_index=-100``; the first target is the labels.
* ``"causal_lm"`` — next-token cross-entropy: logits ``(B, T, V)`` at position ``t`` against
  labels at ``t + 1`` (ignore ``-100``). Labels are the first target, or the first model input
  (``input_ids``) when the batch has no targets.
* ``"mse"`` — mean squared error of the output against the first target.

Or any callable ``loss(outputs, *targets) -> scalar tensor`` (a mean over the batch).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import PlanError

IGNORE_INDEX = -100

Tensor = torch.Tensor


def primary_output(outputs: Any) -> Tensor:
    """The tensor a loss reads from a model's outputs: the tensor itself, ``.logits``, the
    first field of a model-output / dict, or the first element of a tuple."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        if "logits" in outputs:
            return outputs["logits"]
        for v in outputs.values():
            if isinstance(v, Tensor):
                return v
    if isinstance(outputs, (tuple, list)) and outputs:
        return primary_output(outputs[0])
    raise PlanError(f"cannot find a tensor in the model's outputs ({type(outputs).__name__}); "
                    "pass a loss callable that picks the right output")


class Loss:
    """A loss of the training step.

    ``__call__(outputs, model_inputs, targets)`` returns a scalar (a mean over the batch);
    ``weight(model_inputs, targets)`` returns how many elements that mean is taken over (a float,
    or a tensor when it depends on the data, e.g. ignored labels); it weighs micro-batches under
    gradient accumulation.
    """

    name: str = "loss"

    def __call__(self, outputs: Any, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def weight(self, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Union[Tensor, float]:
        first = next((t for t in model_inputs if isinstance(t, Tensor) and t.dim() > 0), None)
        return float(first.shape[0]) if first is not None else 1.0

    def example_targets(self, outputs: Any, model_inputs: Sequence[Tensor]) -> Optional[list[Tensor]]:
        """Targets shaped for ``outputs`` (values irrelevant), to compile a step before the first
        batch arrives; None when the loss cannot tell (a user callable)."""
        return None

    def __repr__(self) -> str:
        return f"<loss {self.name}>"


def _need_target(name: str, targets: Sequence[Tensor]) -> Tensor:
    if not targets:
        raise PlanError(f"loss {name!r} needs a target: call step(*model_inputs, target)")
    return targets[0]


class _LeanCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``(N, C)`` float logits with a hand-written backward that holds two
    ``(N, C)`` tensors at most, where autograd's ``nll_loss``/``log_softmax`` backward holds three
    (a zero-filled one-hot gradient, the scatter into it, and the saved ``log_softmax``): the
    logits-sized tensors of a language model's step are its largest. The values are the same
    formulas: ``loss = -mean(log_softmax[label])``, ``grad = (softmax - onehot) / count``. No
    ``nll_loss`` op reaches the graph, so its ONNX trap (DESIGN.md) cannot apply."""

    @staticmethod
    def forward(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, ...]:
        lsm = torch.log_softmax(logits, dim=-1)
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
        count = valid.sum().to(logits.dtype)
        picked = lsm.gather(1, safe).squeeze(1)
        return -(picked * valid).sum() / count, lsm, safe, valid, count

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:  # functorch (make_fx) needs it apart
        ctx.save_for_backward(*output[1:])
        ctx.mark_non_differentiable(*output[1:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_unused: Any) -> tuple[Optional[Tensor], None, None]:
        lsm, safe, valid, count = ctx.saved_tensors
        scale = (valid * (grad / count)).unsqueeze(1)  # (N, 1): 0 on ignored rows
        probs = torch.exp(lsm) * scale  # lsm dies here: two (N, C) tensors live at once
        return probs.scatter_add(1, safe, -scale), None, None


def lean_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``F.cross_entropy(logits, labels, ignore_index=...)`` (mean) for ``(N, C)`` logits, with
    the lean backward of :class:`_LeanCrossEntropy`; falls back to ``F.cross_entropy`` for
    anything else."""
    if logits.dim() != 2 or labels.dim() != 1 or not logits.dtype.is_floating_point:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    return _LeanCrossEntropy.apply(logits, labels, ignore_index)[0]


class CrossEntropy(Loss):
    """Mean cross-entropy over every non-ignored label."""

    name = "cross_entropy"

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def __call__(self, outputs: Any, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        logits = primary_output(outputs)
        labels = _need_target(self.name, targets)
        return lean_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                  self.ignore_index)

    def weight(self, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        return (_need_target(self.name, targets) != self.ignore_index).sum().float()

    def example_targets(self, outputs: Any, model_inputs: Sequence[Tensor]) -> Optional[list[Tensor]]:
        return [torch.zeros(primary_output(outputs).shape[:-1], dtype=torch.long)]


class CausalLM(Loss):
    """Shifted (next-token) cross-entropy; labels default to the first model input."""

    name = "causal_lm"

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        self.ignore_index = ignore_index

    def _labels(self, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        labels = targets[0] if targets else model_inputs[0]
        if labels.dim() < 2:
            raise PlanError("causal_lm: labels must be (batch, sequence) token ids")
        return labels[:, 1:]

    def _padded_labels(self, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        """Next-token labels at every position, the last one ignored: the same mean as slicing
        ``logits[:, :-1]``, without copying the logits (nor zero-filling and scattering their
        gradient back in the backward: the largest tensors of a language model's step)."""
        labels = self._labels(model_inputs, targets)
        pad = torch.full_like(labels[:, :1], self.ignore_index)
        return torch.cat([labels, pad], dim=1)

    def __call__(self, outputs: Any, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        logits = primary_output(outputs)
        labels = self._padded_labels(model_inputs, targets)
        if tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise PlanError(f"causal_lm: labels of shape {tuple(labels.shape)} do not match logits of shape "
                            f"{tuple(logits.shape)}; give (batch, sequence) labels for (batch, sequence, vocab) logits")
        return lean_cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                  self.ignore_index)

    def weight(self, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        return (self._labels(model_inputs, targets) != self.ignore_index).sum().float()

    def example_targets(self, outputs: Any, model_inputs: Sequence[Tensor]) -> Optional[list[Tensor]]:
        return []  # labels default to the input ids


class MSE(Loss):
    """Mean squared error of the primary output against the first target."""

    name = "mse"

    def __call__(self, outputs: Any, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        return F.mse_loss(primary_output(outputs).float(), _need_target(self.name, targets).float())

    def weight(self, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Union[Tensor, float]:
        return float(_need_target(self.name, targets).numel())

    def example_targets(self, outputs: Any, model_inputs: Sequence[Tensor]) -> Optional[list[Tensor]]:
        return [torch.zeros_like(primary_output(outputs), dtype=torch.float32)]


class CallableLoss(Loss):
    """Wraps a user function ``fn(outputs, *targets) -> scalar`` (a mean over the batch)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, outputs: Any, model_inputs: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
        out = self.fn(outputs, *targets)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise PlanError(f"the loss function {self.name} must return a scalar tensor, got "
                            f"{type(out).__name__}{tuple(out.shape) if isinstance(out, Tensor) else ''}")
        return out.reshape(())


NAMED_LOSSES: dict[str, type[Loss]] = {"cross_entropy": CrossEntropy, "causal_lm": CausalLM, "mse": MSE}

LossSpec = Union[str, Loss, Callable[..., Tensor]]


def make_loss(spec: LossSpec) -> Loss:
    """A :class:`Loss` from a name (``"cross_entropy"``, ``"causal_lm"``, ``"mse"``), a
    :class:`Loss` or a callable ``(outputs, *targets) -> scalar``."""
    if isinstance(spec, Loss):
        return spec
    if isinstance(spec, str):
        if spec not in NAMED_LOSSES:
            raise PlanError(f"unknown loss {spec!r}; use one of {sorted(NAMED_LOSSES)} or a callable "
                            "(outputs, *targets) -> scalar")
        return NAMED_LOSSES[spec]()
    if callable(spec):
        return CallableLoss(spec)
    raise PlanError(f"loss must be a name or a callable, got {type(spec).__name__}")


__all__ = ["CallableLoss", "CausalLM", "CrossEntropy", "IGNORE_INDEX", "Loss", "MSE", "NAMED_LOSSES",
           "lean_cross_entropy", "make_loss", "primary_output"]
