"""The training side of the core: the step compiler and what it is made of.

- :mod:`.step` — ``compile_training`` and ``TrainingStep``: compiles, runs, exports and reports a step;
- :mod:`.trace_step` — traces forward, pruned backward and optimizer update into one fx graph;
- :mod:`.signature` — the graph's phases, stable input/output names and verifier;
- :mod:`.options` — ``TrainingOptions`` and the default pass lists;
- :mod:`.memory_report` — ``MemoryReport`` (the memory plan, measured beside it);
- :mod:`.checkpoints` — training-state files shared by torch, onnxruntime and ExecuTorch;
- :mod:`.optim` — functional optimizers (``gp.optim.SGD``, ``gp.optim.AdamW``);
- :mod:`.losses` — named losses (``"causal_lm"``, ``"cross_entropy"``, ``"mse"``);
- :mod:`.budget` — ``choose_update_scheme`` (sparse-update schemes under a memory budget);
- :mod:`.backward_report` — what the backward computes per layer.
"""

from __future__ import annotations

from . import losses, optim
from .checkpoints import TrainerCheckpoints, load_training_state, save_training_state
from .memory_report import MEMORY_CATEGORIES, MemoryReport
from .options import TrainingOptions
from .signature import (ORDER_KEY, PHASES, TRAINING_META, UPDATE_PHASES, TrainingSignature, phase_of, signature_of,
                        verify_training)
from .step import TrainingStep, compile_training
from .trace_step import apply_after_update, trace_training_step

__all__ = ["MEMORY_CATEGORIES", "ORDER_KEY", "PHASES", "TRAINING_META", "UPDATE_PHASES", "MemoryReport",
           "TrainerCheckpoints", "TrainingOptions", "TrainingSignature", "TrainingStep", "apply_after_update", "compile_training",
           "load_training_state", "losses", "optim", "phase_of", "save_training_state", "signature_of",
           "trace_training_step", "verify_training"]
