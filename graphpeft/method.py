"""The adapter-method protocol: what the core needs to know about a method (LoRA, ...).

A method module in the pass library defines a plan :class:`~graphpeft.plan.Rule`, an insertion
pass, and an :class:`AdapterMethod` that the core uses to merge and to name tensors, then
registers all three (see ``graphpeft/passes/insert_lora.py``, the example to copy).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

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

    def describe(self, record: dict[str, Any]) -> str:
        return f"{self.name}"

    def config_for(self, record: dict[str, Any]) -> Optional[dict[str, Any]]:
        return record.get("config")
