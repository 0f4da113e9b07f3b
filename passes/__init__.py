"""graphpeft's pass library (importable as ``graphpeft.passes``).

Importing this package registers every built-in method and pass with the core registry. The
subpackages are the roles; each module holds one pass:

- ``adapters/`` — adapter methods (``insert_lora`` is the example an extension developer copies);
- ``update/`` — sparse updates of the model's own weights (``gp.Update``), row slicing, gradient probe;
- ``merge/`` — folding adapters into weights, reassembling sliced weights;
- ``cleanup/`` — dead code, common subexpressions, algebraic simplification;
- ``training/`` — checks and reports over training-step graphs;
- ``memory/`` — update reordering, the memory planner;
- ``lower/`` — lowering: cheaper equivalent forms (scaling folded into weights, fused projections);
- ``legalize/`` — rewrites for what an exporter cannot translate, adapter tensors as inputs;
- ``quantize/`` — quantized base weights (``gp.Quantize``) and their merge steps.
"""

from __future__ import annotations

from .adapters.insert_dora import DoRA, DoRAMethod, InsertDoRA
from .adapters.insert_hydra import Hydra
from .adapters.insert_ia3 import IA3, IA3Method, InsertIA3
from .adapters.insert_loldu import LoLDU
from .adapters.insert_lora import InsertLoRA, LoRA, LoRAMethod
from .adapters.insert_lora_fa import InsertLoRAFA, LoRAFA, LoRAFAMethod
from .adapters.insert_lora_xs import LoRAXS
from .adapters.insert_mole import MoLE
from .adapters.insert_nola import NOLA
from .adapters.insert_randlora import RandLoRA
from .adapters.insert_shira import InsertSHiRA, SHiRA, SHiRAMethod
from .adapters.insert_sltrain import SLTrain
from .adapters.insert_sora import SoRA
from .adapters.insert_svfit import SVFit
from .adapters.insert_trainable_tokens import InsertTrainableTokens, TrainableTokens, TrainableTokensMethod
from .adapters.insert_vera import InsertVeRA, VeRA, VeRAMethod
from .adapters.layer_rewrite import LayerRewrite
from .cleanup.causal_attention import UseCausalAttention
from .cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressions
from .cleanup.remove_dead_code import RemoveDeadCode
from .cleanup.simplify_algebra import SimplifyAlgebra
from .legalize.legalize_executorch import LegalizeExecuTorch
from .legalize.legalize_onnx import LegalizeOnnx
from .legalize.lift_adapter_tensors import LiftAdapterTensors
from .legalize.low_precision_attention import LowPrecisionAttentionPass
from .legalize.retarget_device import RetargetDevice
from .legalize.slice_scatter_onnx import SliceScatterOnnx
from .legalize.upcast_low_precision import UpcastLowPrecision
from .lower.fold_linear_scale import FoldLinearScale
from .lower.fuse_shared_input_linears import FuseSharedInputLinears
from .lower.fused_optimizer_kernel import FusedOptimizerKernel
from .lower.merge_low_rank_branch import MergeLowRankPass
from .lower.onednn_matmul import OneDNNMatmul
from .lower.silu_kernels import SiluKernels
from .legalize.decompose_attention import DecomposeAttention
from .memory.plan_memory import PlanMemory
from .memory.reorder_updates import ReorderUpdates
from .merge.merge_adapters import MergeAdapters
from .merge.reassemble_slices import ReassembleSlices
from .quantize.dequantize_for_merge import DequantizeForMerge
from .quantize.quantize_weights import Quantize, QuantizeMethod, QuantizeWeights
from .quantize.rematerialize_dequantized import RematerializeDequantized
from .quantize.requantize_merged import RequantizeMerged
from .training.allreduce_gradients import AllReduceGradients
from .training.shard_frozen_weights import ShardFrozenWeights
from .training.check_gradient_flow import CheckGradientFlow
from .training.report_backward import ReportBackward
from .update.freeze import Freeze
from .update.probe_gradients import ProbeGradients
from .update.slice_rows import SliceRows
from .update.update_parameters import Update, UpdateMethod, UpdateParameters

__all__ = ["CheckGradientFlow", "DoRA", "DoRAMethod", "EliminateCommonSubexpressions", "FoldLinearScale", "Freeze", "FuseSharedInputLinears", "Hydra", "IA3",
           "IA3Method", "InsertDoRA", "InsertIA3", "InsertLoRA", "InsertLoRAFA", "InsertSHiRA", "InsertVeRA",
           "LayerRewrite", "LegalizeOnnx", "LiftAdapterTensors", "LoLDU", "LoRA", "LoRAFA", "LoRAFAMethod",
           "LoRAMethod", "LoRAXS", "MergeAdapters", "MoLE", "NOLA", "PlanMemory", "ProbeGradients", "RandLoRA",
           "ReassembleSlices", "RemoveDeadCode", "ReorderUpdates", "ReportBackward", "SHiRA", "SHiRAMethod",
           "SLTrain", "SVFit", "SimplifyAlgebra", "SliceRows", "SoRA", "Update", "UpdateMethod", "UpdateParameters", "VeRA",
           "VeRAMethod"]
__all__ += ["LegalizeExecuTorch"]
__all__ += ["DequantizeForMerge", "Quantize", "QuantizeMethod", "QuantizeWeights", "RequantizeMerged",
            "RematerializeDequantized", "UpcastLowPrecision", "LowPrecisionAttentionPass"]
__all__ += ["AllReduceGradients", "ShardFrozenWeights"]
__all__ += ["SliceScatterOnnx"]
__all__ += ["InsertTrainableTokens", "TrainableTokens", "TrainableTokensMethod"]
__all__ += ["MergeLowRankPass", "DecomposeAttention"]
__all__ += ["UseCausalAttention"]
__all__ += ["FusedOptimizerKernel", "SiluKernels"]
__all__ += ["OneDNNMatmul"]
