"""graphpeft's pass library (importable as ``graphpeft.passes``).

Importing this package registers every built-in method and pass with the core registry.
Each module holds one pass; ``insert_lora`` is the example an extension developer copies.
"""

from __future__ import annotations

from .freeze import Freeze
from .insert_dora import DoRA, DoRAMethod, InsertDoRA
from .insert_ia3 import IA3, IA3Method, InsertIA3
from .insert_lora import InsertLoRA, LoRA, LoRAMethod
from .insert_lora_fa import InsertLoRAFA, LoRAFA, LoRAFAMethod
from .insert_shira import InsertSHiRA, SHiRA, SHiRAMethod
from .insert_vera import InsertVeRA, VeRA, VeRAMethod
from .layer_rewrite import LayerRewrite
from .merge_adapters import MergeAdapters
from .remove_dead_code import RemoveDeadCode

__all__ = ["DoRA", "DoRAMethod", "Freeze", "IA3", "IA3Method", "InsertDoRA", "InsertIA3", "InsertLoRA",
           "InsertLoRAFA", "InsertVeRA", "LayerRewrite", "LoRA", "LoRAFA", "LoRAFAMethod", "LoRAMethod",
           "MergeAdapters", "RemoveDeadCode", "VeRA", "VeRAMethod", "InsertSHiRA", "SHiRA", "SHiRAMethod"]

# training-graph passes (issue 3)
from .check_gradient_flow import CheckGradientFlow  # noqa: E402
from .eliminate_common_subexpressions import EliminateCommonSubexpressions  # noqa: E402
from .legalize_onnx import LegalizeOnnx  # noqa: E402
from .plan_memory import PlanMemory  # noqa: E402
from .reorder_updates import ReorderUpdates  # noqa: E402

__all__ += ["CheckGradientFlow", "EliminateCommonSubexpressions", "LegalizeOnnx", "PlanMemory", "ReorderUpdates"]

# sparse updates (issue 4): update rules, gradient probe, row slicing, reassembly on merge, backward report
from .probe_gradients import ProbeGradients  # noqa: E402
from .reassemble_slices import ReassembleSlices  # noqa: E402
from .slice_rows import SliceRows  # noqa: E402
from .update_parameters import Update, UpdateMethod, UpdateParameters  # noqa: E402

__all__ += ["ProbeGradients", "ReassembleSlices", "SliceRows", "Update", "UpdateMethod", "UpdateParameters"]
from .report_backward import ReportBackward  # noqa: E402

__all__ += ["ReportBackward"]

# multi-adapter (issue 6): adapter tensors as graph inputs (one ONNX file, any adapter)
from .lift_adapter_tensors import LiftAdapterTensors  # noqa: E402

__all__ += ["LiftAdapterTensors"]

# the rest of the method library (issue 6)
from .insert_hydra import Hydra  # noqa: E402
from .insert_loldu import LoLDU  # noqa: E402
from .insert_lora_xs import LoRAXS  # noqa: E402
from .insert_mole import MoLE  # noqa: E402
from .insert_nola import NOLA  # noqa: E402
from .insert_randlora import RandLoRA  # noqa: E402
from .insert_sltrain import SLTrain  # noqa: E402
from .insert_sora import SoRA  # noqa: E402
from .insert_svfit import SVFit  # noqa: E402

__all__ += ["Hydra", "LoLDU", "LoRAXS", "MoLE", "NOLA", "RandLoRA", "SLTrain", "SoRA", "SVFit"]
