"""graphpeft: a compiler for parameter-efficient fine-tuning.

    import graphpeft as gp
    plan = gp.Plan([gp.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16)])
    cm = gp.compile(model, plan, example_inputs=(input_ids,), example_kwargs={"use_cache": False})
"""

from __future__ import annotations

from .adapter_io import load_adapter, save_adapter
from .api import build_pipeline, compile
from .compiled import CompiledModel
from .errors import (AdapterFileError, ExportError, GraphPeftError, PassError, PlanError, TraceError,
                     VerificationError)
from .graph import Layer, Provenance, Role, find_layers
from .infra import IRDumpHook, PassBase, PassContext, PassHook, PassManager, PassResult, Pipeline, TimingHook
from .method import AdapterMethod
from .plan import Plan, Rule
from .registry import register_backend, register_method, register_pass, register_rule
from .rewrite import MatchResult, RewritePass, RewriteRule
from .trace import trace
from .verify import verify
from .training import losses, optim  # noqa: E402  (gp.optim.SGD / gp.optim.AdamW, named losses)
from .training import TrainingStep, compile_training  # noqa: E402

__version__ = "0.1.0"

# The public API wires the library and the backends into the core (core never imports them).
from . import passes  # noqa: E402  (graphpeft.passes, mapped from the top-level passes/ folder)
from . import backends  # noqa: E402
from .passes import LoRA  # noqa: E402
from .passes import DoRA, IA3, LoRAFA, SHiRA, VeRA  # noqa: E402
from .passes import Hydra, LoLDU, LoRAXS, MoLE, NOLA, RandLoRA, SLTrain, SoRA, SVFit  # noqa: E402

__all__ = [
    "AdapterFileError", "AdapterMethod", "CompiledModel", "DoRA", "ExportError", "GraphPeftError", "IA3",
    "LoRAFA", "SHiRA", "VeRA", "Hydra", "LoLDU", "LoRAXS", "MoLE", "NOLA", "RandLoRA", "SLTrain", "SoRA", "SVFit",
    "IRDumpHook", "Layer", "LoRA", "MatchResult", "PassBase", "PassContext", "PassError", "PassHook",
    "PassManager", "PassResult", "Pipeline", "Plan", "PlanError", "Provenance", "RewritePass",
    "RewriteRule", "Role", "Rule", "TimingHook", "TraceError", "VerificationError", "backends",
    "build_pipeline", "compile", "find_layers", "load_adapter", "passes", "register_backend",
    "register_method", "register_pass", "register_rule", "save_adapter", "trace", "verify",
]
__all__ += ["TrainingStep", "compile_training", "losses", "optim"]

# sparse updates (issue 4)
from .passes import Update  # noqa: E402

__all__ += ["Update"]
from .training.backward_report import BackwardReport, LayerBackward  # noqa: E402
from .training.budget import SchemeCandidate, UpdateScheme, choose_update_scheme  # noqa: E402

__all__ += ["BackwardReport", "LayerBackward", "SchemeCandidate", "UpdateScheme", "choose_update_scheme"]

# adapter interop and named adapters (issue 6)
from .errors import AdapterError  # noqa: E402
from .peft_interop import export_peft, import_peft  # noqa: E402

__all__ += ["AdapterError", "export_peft", "import_peft"]

# compatibility and robustness (issue 14)
from .errors import GraphPeftWarning, InputError, NonFiniteError  # noqa: E402

from .passes import TrainableTokens  # noqa: E402

__all__ += ["GraphPeftWarning", "InputError", "NonFiniteError", "TrainableTokens"]

# data-parallel training steps on torch.distributed (issue 15)
from .errors import DistributedError  # noqa: E402
from .training.distributed import CommunicationReport, is_main_process  # noqa: E402

__all__ += ["CommunicationReport", "DistributedError", "is_main_process"]

# quantized base weights, QLoRA-style (issue 12)
from .passes import Quantize  # noqa: E402

__all__ += ["Quantize"]

# big models: compile on the meta device, then load the base weights (issue 15)
from .errors import WeightsError  # noqa: E402
from .weights import LoadReport  # noqa: E402

__all__ += ["LoadReport", "WeightsError"]
