"""Lowering passes: rewrite a graph into a cheaper equivalent before a runtime gets it.

Forward lowering runs on a private copy of the adapted graph just before the training step is
traced (``TrainingOptions.lowering``), so autograd differentiates the cheaper forward and the
backward is cheaper too; the compiled model's own graph is never touched:

- ``fold_linear_scale`` — ``linear(h, W) * c`` → ``linear(h, W * c)`` when ``W`` is smaller than
  the product (LoRA's scaling goes onto ``B``: no elementwise pass over a (tokens × out) tensor,
  in the forward nor on its gradient);
- ``merge_low_rank_branch`` — a frozen linear and its LoRA branch computed through the merged
  weight ``W + B A`` with a low-rank backward, where the tokens make that cheaper (the thin
  products ``h Bᵀ`` and ``(g B) A`` and two activation-sized adds disappear);
- ``fuse_shared_input_linears`` — trainable projections that read one input (the LoRA ``A``
  factors of q/k/v, of gate/up) become one GEMM on the concatenated weights, split after.

Torch-executor lowering runs on the default runner's private copy of a traced step
(``graphpeft.training.runner.TORCH_EXECUTOR_LOWERING``); exports never see it:

- ``silu_kernels`` — silu's math form (forward and backward) → ATen's ``silu`` /
  ``silu_backward`` kernels;
- ``onednn_matmul`` — float32 CPU ``mm`` / ``addmm`` (1-D bias) → ``graphpeft::onednn_mm``
  (oneDNN instead of MKL, which keeps to AVX2 on AMD CPUs);
- ``fused_optimizer_kernel`` — each fused AdamW chunk → one call of torch's fused kernel.

Inductor-executor lowering runs on that executor's private copy before ``torch.compile``
(``graphpeft.training.options.INDUCTOR_LOWERING``): ``onednn_matmul``.
"""
