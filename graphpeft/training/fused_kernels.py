"""Multi-tensor optimizer kernels as functional graph ops, for the torch executor.

A step's fused update (``TrainingOptions.fuse_optimizer``) is traced as arithmetic on the
concatenated trainable tensors: exportable everywhere, but in the torch executor each chunk
costs ~10 nodes per tensor (flatten, concatenate, split, view back), ~600 calls for the
benchmark Llama's 56 LoRA tensors. ``graphpeft::adamw_update`` does one chunk's AdamW update
in one call of PyTorch's own fused CPU/CUDA kernel (``torch._fused_adamw_``, what
``torch.optim.AdamW(fused=True)`` runs), functionally: the inputs are copied, the copies updated
in place and returned. The ``fused_optimizer_kernel`` lowering pass puts it into the torch
executor's private copy of the graph; the stored graph (exports, memory plans) never holds it.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


@torch.library.custom_op("graphpeft::adamw_update", mutates_args=())
def adamw_update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 step: Tensor, lr: Tensor, finite: Tensor, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> list[Tensor]:
    """One AdamW step (``torch.optim.AdamW``'s arithmetic) of every tensor of ``params``:
    returns the new params, then the new ``exp_avgs``, then the new ``exp_avg_sqs``.

    ``step`` is the step count before this update (float32 scalar); ``finite`` the step's
    finite flag: when false, every result equals its input (the update is dropped, as the
    traced ``where`` does). Nothing passed in is modified.
    """
    def fresh(ts: list[Tensor]) -> list[Tensor]:
        return [t.clone(memory_format=torch.contiguous_format) for t in ts]

    new_p, new_m, new_v = fresh(params), fresh(exp_avgs), fresh(exp_avg_sqs)
    if new_p:
        counts = [step + 1] * len(new_p)
        # the kernel reads raw memory in row-major order: gradients must be contiguous
        torch._fused_adamw_(new_p, [g.contiguous() for g in grads], new_m, new_v, [], counts, lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                            maximize=False, found_inf=torch.logical_not(finite).to(torch.float32))
    return new_p + new_m + new_v


@adamw_update.register_fake
def _(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
      step: Tensor, lr: Tensor, finite: Tensor, beta1: float, beta2: float, eps: float,
      weight_decay: float) -> list[Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (*params, *exp_avgs, *exp_avg_sqs)]


__all__ = ["adamw_update"]
