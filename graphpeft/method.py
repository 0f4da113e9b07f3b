"""The adapter-method protocol: what the core needs to know about a method (LoRA, ...).

A method module in the pass library defines a plan :class:`~graphpeft.plan.Rule`, an insertion
pass, and an :class:`AdapterMethod` that the core uses to merge and to name tensors, then
registers all three (see ``graphpeft/passes/insert_lora.py``, the example to copy).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

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

    def describe(self, record: dict[str, Any]) -> str:
        return f"{self.name}"

    def config_for(self, record: dict[str, Any]) -> Optional[dict[str, Any]]:
        return record.get("config")
