"""graphpeft's pass library (importable as ``graphpeft.passes``).

Importing this package registers every built-in method and pass with the core registry.
Each module holds one pass; ``insert_lora`` is the example an extension developer copies.
"""

from __future__ import annotations

from .freeze import Freeze
from .insert_lora import InsertLoRA, LoRA, LoRAMethod
from .merge_adapters import MergeAdapters
from .remove_dead_code import RemoveDeadCode

__all__ = ["Freeze", "InsertLoRA", "LoRA", "LoRAMethod", "MergeAdapters", "RemoveDeadCode"]
