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

__version__ = "0.1.0"

# The public API wires the library and the backends into the core (core never imports them).
from . import passes  # noqa: E402  (graphpeft.passes, mapped from the top-level passes/ folder)
from . import backends  # noqa: E402
from .passes import LoRA  # noqa: E402

__all__ = [
    "AdapterFileError", "AdapterMethod", "CompiledModel", "ExportError", "GraphPeftError",
    "IRDumpHook", "Layer", "LoRA", "MatchResult", "PassBase", "PassContext", "PassError", "PassHook",
    "PassManager", "PassResult", "Pipeline", "Plan", "PlanError", "Provenance", "RewritePass",
    "RewriteRule", "Role", "Rule", "TimingHook", "TraceError", "VerificationError", "backends",
    "build_pipeline", "compile", "find_layers", "load_adapter", "passes", "register_backend",
    "register_method", "register_pass", "register_rule", "save_adapter", "trace", "verify",
]
