"""The core's registry. The pass library and the backends register into it; so do plugins.

Core code looks things up here and never imports ``graphpeft.passes`` or
``graphpeft.backends``. A user's own method registers exactly the way a built-in one does:
with the decorators below, or through the ``graphpeft.plugins`` entry-point group.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any, Callable, Optional, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

RULES: dict[str, type] = {}  # plan key -> rule class (e.g. "lora" -> LoRA)
PASSES: dict[str, type] = {}  # pass name -> pass class
METHODS: dict[str, Any] = {}  # adapter method name -> AdapterMethod (insert pass, merge, io)
BACKENDS: dict[str, Any] = {}  # backend name -> backend object
PIPELINES: dict[str, Callable[..., Any]] = {}  # pipeline name -> factory
#: names of passes ``CompiledModel.merge`` runs after ``merge_adapters``: they fold other
#: reparameterisations back into base weights (e.g. a row-sliced weight of a sparse update)
MERGE_STEPS: list[str] = []
#: names of passes ``CompiledModel.merge`` runs before ``merge_adapters``: they give weights
#: stored in another form their float form back (e.g. a quantized base weight)
MERGE_PREPARE_STEPS: list[str] = []
#: stored forms of base weights (a quantized weight): name -> an object with
#: ``records(gm) -> {float weight name: {"shape", "dtype" (torch), "tensors": [stored tensor
#: names], "outputs": [names of the nodes that decode it]}}``, ``encode(gm, weight name, float
#: tensor) -> {stored tensor name: tensor}`` and ``describe(gm, weight name) -> str``;
#: ``CompiledModel.load_base_weights`` converts a checkpoint's float weight with it as it loads
WEIGHT_FORMATS: dict[str, Any] = {}

_plugins_loaded = False


def register_rule(cls: type[T]) -> type[T]:
    """Class decorator: make a plan rule available under its ``key`` (data form)."""
    key = getattr(cls, "key", None)
    if not key:
        raise TypeError(f"{cls.__name__} needs a class attribute 'key' (its name in plan data)")
    RULES[key] = cls
    return cls


def register_pass(cls: type[T]) -> type[T]:
    """Class decorator: make a pass available by its ``name``."""
    PASSES[getattr(cls, "name")] = cls
    return cls


def register_merge_step(name: str, *, before: bool = False) -> None:
    """Make ``CompiledModel.merge`` run the registered pass ``name`` after merging adapters
    (``before=True``: before it)."""
    steps = MERGE_PREPARE_STEPS if before else MERGE_STEPS
    if name not in steps:
        steps.append(name)


def register_weight_format(name: str, fmt: Any) -> None:
    """Register a stored form of base weights (see :data:`WEIGHT_FORMATS`)."""
    WEIGHT_FORMATS[name] = fmt


def register_method(name: str, method: Any) -> None:
    METHODS[name] = method


def register_backend(name: str, backend: Any) -> None:
    BACKENDS[name] = backend


def register_pipeline(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        PIPELINES[name] = fn
        return fn

    return deco


def load_plugins() -> None:
    """Import modules named in the ``graphpeft.plugins`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in metadata.entry_points(group="graphpeft.plugins"):
        try:
            ep.load()
        except Exception:  # noqa: BLE001 - a broken plugin must not break graphpeft
            log.exception("could not load graphpeft plugin %s", ep.name)


def get_backend(name: str) -> Any:
    load_plugins()
    if name not in BACKENDS:
        raise KeyError(f"no backend named {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]


def get_method(name: str) -> Optional[Any]:
    load_plugins()
    return METHODS.get(name)
