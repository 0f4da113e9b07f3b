"""Typed errors. Every error says what went wrong and what to do about it."""

from __future__ import annotations

from typing import Sequence


class GraphPeftError(Exception):
    """Base class of every error graphpeft raises on purpose."""


class PlanError(GraphPeftError, ValueError):
    """A plan is malformed, or does not fit the model it is applied to."""


class TraceError(GraphPeftError):
    """A model could not be turned into a graph."""


class PassError(GraphPeftError):
    """A pass failed; names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, message: str, ran_before: Sequence[str] = ()) -> None:
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        before = ", ".join(self.ran_before) if self.ran_before else "none"
        super().__init__(f"pass '{pass_name}' failed: {message} (passes run before it: {before})")


class VerificationError(GraphPeftError):
    """A graph broke an invariant (graph lint, parameter roles, shapes)."""


class AdapterFileError(GraphPeftError):
    """An adapter file is missing, corrupted, or does not fit the model."""


class AdapterError(GraphPeftError, ValueError):
    """A named-adapter operation cannot be done (unknown or taken name, methods that do not
    combine ...); see ``CompiledModel.add_adapter``."""


class ExportError(GraphPeftError):
    """A backend could not lower or run a graph."""


class InputError(GraphPeftError, TypeError):
    """A compiled model or training step was called with inputs that do not fit what it was
    compiled for (count, dtype, rank); the message names the compiled signature."""


class NonFiniteError(GraphPeftError, FloatingPointError):
    """A training step met a non-finite loss, gradient or learning rate and was compiled with
    ``nonfinite="raise"``; the tensors were left unchanged."""


class DistributedError(GraphPeftError, RuntimeError):
    """A data-parallel training step cannot run: no initialized ``torch.distributed`` process
    group, or the ranks disagree (different frozen weights)."""


class WeightsError(GraphPeftError, ValueError):
    """Base weights cannot be loaded (a checkpoint that does not fit the compiled graph: names,
    shapes, dtypes), or a model still holds meta-device tensors when it is run; see
    ``CompiledModel.load_base_weights``."""


class GraphPeftWarning(UserWarning):
    """Something graphpeft accepts but a user may not mean (e.g. a LoRA rank larger than the
    layer, which PEFT allows too)."""
