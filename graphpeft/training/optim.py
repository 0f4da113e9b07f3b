"""Functional optimizers with explicit state, for the training-step compiler.

An optimizer here is a pure function ``(params, grads, state, lr) -> (params', state')`` over
named tensors, so that ``make_fx`` can trace it into the training-step graph and the state can
be a graph input and output (what an ONNX training step needs). The arithmetic follows
``torch.optim``'s single-tensor implementations step for step, so a compiled step matches an
eager ``torch.optim`` loop to float rounding.

State is one flat ``dict[str, Tensor]``: ``"step"`` (a float32 scalar counting updates, as
``torch.optim`` keeps it) and one entry per parameter and slot, keyed ``"<param>:<slot>"``
(``"model.layers.0.self_attn.q_proj.lora_A.weight:exp_avg"``).

    opt = gp.optim.AdamW(lr=1e-3, weight_decay=0.01)
    step = cm.compile_training("causal_lm", opt)
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Iterable, Mapping

import torch

from ..errors import PlanError

Tensor = torch.Tensor

STEP_KEY = "step"


def state_key(param: str, slot: str) -> str:
    """The state-dict key of one optimizer slot of one parameter."""
    return f"{param}:{slot}"


@dataclasses.dataclass
class Optimizer(abc.ABC):
    """Base class of functional optimizers.

    Subclasses are dataclasses of hyper-parameters that name their per-parameter ``slots`` and
    implement :meth:`update_one`; :meth:`prepare` computes values shared by all parameters of
    one step (the new step count, bias corrections) once.
    """

    name: ClassVar[str] = ""
    #: names of the per-parameter state tensors, in order
    slots: ClassVar[tuple[str, ...]] = ()

    lr: float = 1e-3

    # -- state -------------------------------------------------------------------------------

    def state_names(self, params: Iterable[str]) -> list[str]:
        """Ordered state keys for ``params``: ``"step"`` then every slot of every parameter."""
        return [STEP_KEY] + [state_key(p, s) for p in params for s in self.param_slots()]

    def param_slots(self) -> tuple[str, ...]:
        """The slots this configuration actually keeps (e.g. none for SGD without momentum)."""
        return self.slots

    def init_state(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Fresh state for ``params``: step 0 and zero slots shaped like each parameter."""
        state = {STEP_KEY: torch.zeros((), dtype=torch.float32)}
        for name, p in params.items():
            for slot in self.param_slots():
                state[state_key(name, slot)] = torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
        return state

    # -- the update --------------------------------------------------------------------------

    def prepare(self, state: Mapping[str, Tensor], lr: Tensor) -> dict[str, Any]:
        """Values shared by every parameter's update in one step. Default: the new step count."""
        return {"step": state[STEP_KEY] + 1}

    @abc.abstractmethod
    def update_one(self, param: Tensor, grad: Tensor, slots: dict[str, Tensor], shared: dict[str, Any],
                   lr: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One parameter's update: ``(new param, new slots)``; must not mutate its inputs."""

    def update(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: Mapping[str, Tensor],
               lr: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Apply one step to every parameter; returns ``(new params, new state)``."""
        shared = self.prepare(state, lr)
        new_params: dict[str, Tensor] = {}
        new_state: dict[str, Tensor] = {STEP_KEY: shared["step"]}
        for name, p in params.items():
            slots = {s: state[state_key(name, s)] for s in self.param_slots()}
            new_p, new_slots = self.update_one(p, grads[name], slots, shared, lr)
            new_params[name] = new_p
            for s in self.param_slots():
                new_state[state_key(name, s)] = new_slots[s]
        return new_params, new_state

    # -- interop -----------------------------------------------------------------------------

    @abc.abstractmethod
    def torch_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """The equivalent ``torch.optim`` optimizer (single-tensor implementation): the oracle."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (stored in exported training graphs)."""
        return {"name": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Optimizer":
        data = dict(data)
        name = data.pop("name", None)
        classes = {c.name: c for c in (SGD, AdamW)}
        if name not in classes:
            raise PlanError(f"unknown optimizer {name!r}; known: {sorted(classes)}")
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return classes[name](**data)


@dataclasses.dataclass
class SGD(Optimizer):
    """Stochastic gradient descent as ``torch.optim.SGD``: momentum, dampening, Nesterov and
    (coupled, L2) weight decay.

    Per parameter: ``d = g + wd * p``; ``buf = d`` on the first step, else
    ``momentum * buf + (1 - dampening) * d``; ``d = d + momentum * buf`` (Nesterov) or ``buf``;
    ``p = p - lr * d``.
    """

    name: ClassVar[str] = "sgd"
    slots: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if self.lr < 0 or self.momentum < 0 or self.weight_decay < 0:
            raise PlanError(f"sgd: lr, momentum and weight_decay must be >= 0, got {self}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise PlanError("sgd: Nesterov momentum requires momentum > 0 and dampening = 0")

    def param_slots(self) -> tuple[str, ...]:
        return self.slots if self.momentum != 0 else ()

    def update_one(self, param: Tensor, grad: Tensor, slots: dict[str, Tensor], shared: dict[str, Any],
                   lr: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        d_p = grad
        if self.weight_decay != 0:
            d_p = d_p.add(param, alpha=self.weight_decay)
        new_slots: dict[str, Tensor] = {}
        if self.momentum != 0:
            buf = slots["momentum_buffer"]
            moved = buf * self.momentum + d_p * (1 - self.dampening) if self.dampening else buf * self.momentum + d_p
            if self.dampening:
                # torch.optim starts the buffer at d_p itself; with dampening that differs from 0-init
                moved = torch.where(shared["step"] == 1, d_p, moved)
            buf = moved
            new_slots["momentum_buffer"] = buf
            d_p = d_p.add(buf, alpha=self.momentum) if self.nesterov else buf
        return param - lr * d_p, new_slots

    def torch_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(list(params), lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                               weight_decay=self.weight_decay, nesterov=self.nesterov, foreach=False)


@dataclasses.dataclass
class AdamW(Optimizer):
    """Adam with decoupled weight decay and bias correction, as ``torch.optim.AdamW``.

    Per parameter: ``p *= 1 - lr * wd``; ``m = lerp(m, g, 1 - b1)``;
    ``v = b2 * v + (1 - b2) * g * g``; ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``
    (``amsgrad`` keeps the running maximum of ``v``).
    """

    name: ClassVar[str] = "adamw"
    slots: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    amsgrad: bool = False

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise PlanError(f"adamw: betas must lie in [0, 1), got {self.betas}")
        if self.lr < 0 or self.eps < 0 or self.weight_decay < 0:
            raise PlanError(f"adamw: lr, eps and weight_decay must be >= 0, got {self}")

    def param_slots(self) -> tuple[str, ...]:
        return self.slots + (("max_exp_avg_sq",) if self.amsgrad else ())

    def prepare(self, state: Mapping[str, Tensor], lr: Tensor) -> dict[str, Any]:
        step = state[STEP_KEY] + 1
        b1, b2 = self.betas
        bias_correction1 = 1 - torch.pow(b1, step)
        bias_correction2 = 1 - torch.pow(b2, step)
        return {
            "step": step,
            "step_size": lr / bias_correction1,
            "bias_correction2_sqrt": torch.sqrt(bias_correction2),
            "decay": 1 - lr * self.weight_decay,
        }

    def update_one(self, param: Tensor, grad: Tensor, slots: dict[str, Tensor], shared: dict[str, Any],
                   lr: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b1, b2 = self.betas
        if self.weight_decay != 0:
            param = param * shared["decay"]
        exp_avg = torch.lerp(slots["exp_avg"], grad, 1 - b1)
        exp_avg_sq = slots["exp_avg_sq"] * b2 + grad * grad * (1 - b2)
        new_slots = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        second = exp_avg_sq
        if self.amsgrad:
            second = torch.maximum(slots["max_exp_avg_sq"], exp_avg_sq)
            new_slots["max_exp_avg_sq"] = second
        denom = torch.sqrt(second) / shared["bias_correction2_sqrt"] + self.eps
        return param - shared["step_size"] * (exp_avg / denom), new_slots

    def torch_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(params), lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay, amsgrad=self.amsgrad, foreach=False)


def make_optimizer(spec: Any, **kwargs: Any) -> Optimizer:
    """An :class:`Optimizer` from an instance, a name (``"sgd"``, ``"adamw"``) or its dict form."""
    if isinstance(spec, Optimizer):
        return spec
    if isinstance(spec, str):
        return Optimizer.from_dict({"name": spec.lower(), **kwargs})
    if isinstance(spec, Mapping):
        return Optimizer.from_dict(spec)
    raise PlanError(f"optimizer must be gp.optim.SGD(...), gp.optim.AdamW(...), 'sgd' or 'adamw'; got {spec!r}")


__all__ = ["AdamW", "Optimizer", "SGD", "STEP_KEY", "make_optimizer", "state_key"]

