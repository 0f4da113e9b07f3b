"""The adapter-method protocol: what the core needs to know about a method (LoRA, ...).

A method module in the pass library defines a plan :class:`~graphpeft.plan.Rule`, an insertion
pass, and an :class:`AdapterMethod` that the core uses to merge and to name tensors, then
registers all three (see ``graphpeft/passes/insert_lora.py``, the example to copy).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.fx as fx

from .graph import get_tensor
from .infra import PassBase
from .plan import Rule


class AdapterMethod:
    """Describes one adapter method to the core."""

    name: str = ""
    rule: type[Rule] = Rule
    #: whether the adapter can be folded into the base weight
    mergeable: bool = True
    #: whether the merge is ``W + ΔW`` (LoRA, VeRA, SHiRA): then a fused adapter is removed again
    #: by subtracting ΔW (:meth:`add_delta_`); otherwise (IA3, DoRA) by restoring a saved copy
    additive: bool = True

    # -- PEFT interop (graphpeft.peft_interop): declarative, so the core needs no method code --
    #: PEFT's ``peft_type`` of this method's adapters (None: PEFT has no counterpart)
    peft_type: ClassVar[Optional[str]] = None
    #: our rule option -> PEFT config key, for options PEFT has under another name or the same
    #: (``targets``/``exclude``/``layers`` are mapped by the core)
    peft_options: ClassVar[dict[str, str]] = {}
    #: PEFT config entries fixed for this method (DoRA: ``{"use_dora": True}``); a PEFT config
    #: belongs to this method only if it has these values (missing keys count as ``False``)
    peft_fixed: ClassVar[dict[str, Any]] = {}
    #: whether a PEFT folder of ``peft_type`` is imported as this method (LoRA-FA exports as a
    #: PEFT LoRA but a PEFT LoRA imports as LoRA unless asked for)
    peft_import: ClassVar[bool] = True
    #: PEFT config keys of per-layer overrides: PEFT key -> our rule option (LoRA's rank_pattern)
    peft_patterns: ClassVar[dict[str, str]] = {}
    #: record tensor keys PEFT's file does not hold (rebuilt from its config on import, e.g.
    #: trainable tokens' indices)
    peft_unsaved: ClassVar[tuple[str, ...]] = ()

    def make_pass(self, rules: Sequence[Rule]) -> PassBase:
        """The pass that inserts this method's adapters for ``rules``."""
        raise NotImplementedError

    def delta_weight(self, gm: fx.GraphModule, record: dict[str, Any]) -> torch.Tensor:
        """ΔW of one adapter, in the base weight's own layout (so ``W + ΔW`` is the merge)."""
        raise NotImplementedError

    def merged_tensors(self, gm: fx.GraphModule, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        """New values of the base tensors this adapter folds into: tensor name -> tensor.

        The default is ``{weight: W + ΔW}`` from :meth:`delta_weight`, which covers additive
        methods (LoRA, VeRA ...). A method whose merge is not additive, or that also changes
        other base tensors, overrides this instead: IA3 scales the weight and the bias, DoRA
        rescales the rows of ``W + ΔW``. Values are new tensors (the source model keeps its
        own) in each tensor's layout and dtype.
        """
        name = record["weight"]
        w = get_tensor(gm, name).detach()
        return {name: w + self.delta_weight(gm, record).to(w.dtype)}

    def add_delta_(self, gm: fx.GraphModule, record: dict[str, Any], alpha: float = 1.0) -> None:
        """``W += alpha·ΔW`` in place: fuse (1) or unfuse (-1) an additive adapter
        (``CompiledModel.fuse_adapter``). Methods override it with a cheaper update (LoRA: one
        ``addmm_``; SHiRA: a scatter of its sparse values)."""
        w = get_tensor(gm, record["weight"])
        w.add_(self.delta_weight(gm, record).to(w.dtype), alpha=alpha)

    def after_update(self, record: dict[str, Any], key: str, param: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """A trainable tensor of this adapter just after the optimizer updated it; returns its
        final value for the step. ``key`` is the tensor's key in ``record["tensors"]`` and ``lr``
        the step's learning rate (a 0-dim tensor: a graph input, so a schedule can change it).

        The training-step compiler (``cm.compile_training``) calls this for every trainable
        adapter tensor inside the traced step, so what it computes is part of the step graph and
        of its ONNX export. It must be functional (no in-place ops on ``param``). The default
        returns ``param``: plain methods have no post-update step. SoRA overrides it with the
        proximal L1 step on its gate."""
        return param

    def peft_export_config(self, config: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Adjust the PEFT config the core derived for this method's adapter (``records``: every
        layer of it) before it is written; the default keeps it. IA3 names its feed-forward
        layers here, because PEFT wants them within ``target_modules``."""
        return config

    def peft_key(self, tensor_name: str) -> str:
        """PEFT's key in ``adapter_model.safetensors`` for one of our (unscoped) tensor names.
        Our names already are PEFT's module-relative names; PEFT prefixes them with the wrapper
        path. A method with model-level tensors (VeRA's shared projections) overrides this."""
        return "base_model.model." + tensor_name

    def combined_rule_body(self, bodies: Sequence[Sequence[dict[str, Any]]], combination_type: str,
                           **options: Any) -> dict[str, Any]:
        """The rule options (data form; the core sets ``targets``) of an adapter combining
        adapters whose layers had rule options ``bodies`` (one list per source adapter), for
        ``CompiledModel.add_weighted_adapter``. Raise ``ValueError`` for combinations that do
        not apply (LoRA's ``linear`` needs one rank)."""
        raise NotImplementedError(f"{self.name} adapters cannot be combined (add_weighted_adapter)")

    def combine(self, parts: Sequence[dict[str, torch.Tensor]], records: Sequence[dict[str, Any]],
                weights: Sequence[float], combination_type: str,
                new: Optional[dict[str, torch.Tensor]] = None, **options: Any) -> dict[str, torch.Tensor]:
        """One layer of a combined adapter: record tensor key (``"A"``) -> value, from the
        tensors of each source adapter on that layer (``parts``, keyed the same way), their
        records and weights; ``new`` holds the combined adapter's tensors there (their shapes)."""
        raise NotImplementedError(f"{self.name} adapters cannot be combined (add_weighted_adapter)")

    def describe(self, record: dict[str, Any]) -> str:
        return f"{self.name}"

    def config_for(self, record: dict[str, Any]) -> Optional[dict[str, Any]]:
        return record.get("config")
