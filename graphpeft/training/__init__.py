"""The training side of the core: the step compiler and what it is made of.

- :mod:`.step` — ``compile_training``: forward, pruned backward and optimizer update as one fx
  graph, its signature, options, checkpoints and ``TrainingStep``;
- :mod:`.optim` — functional optimizers (``gp.optim.SGD``, ``gp.optim.AdamW``);
- :mod:`.losses` — named losses (``"causal_lm"``, ``"cross_entropy"``, ``"mse"``);
- :mod:`.budget` — ``choose_update_scheme`` (sparse-update schemes under a memory budget);
- :mod:`.backward_report` — what the backward computes per layer.
"""

from __future__ import annotations

from . import losses, optim
from .step import (MEMORY_CATEGORIES, ORDER_KEY, PHASES, TRAINING_META, UPDATE_PHASES, MemoryReport,
                   TrainerCheckpoints, TrainingOptions, TrainingSignature, TrainingStep, apply_after_update, compile_training,
                   load_training_state, phase_of, save_training_state, signature_of, trace_training_step,
                   verify_training)

__all__ = ["MEMORY_CATEGORIES", "ORDER_KEY", "PHASES", "TRAINING_META", "UPDATE_PHASES", "MemoryReport",
           "TrainerCheckpoints", "TrainingOptions", "TrainingSignature", "TrainingStep", "apply_after_update", "compile_training",
           "load_training_state", "losses", "optim", "phase_of", "save_training_state", "signature_of",
           "trace_training_step", "verify_training"]
