"""Lowering passes: rewrite a graph into a cheaper equivalent before a runtime gets it.

Forward lowering runs on a private copy of the adapted graph just before the training step is
traced (``TrainingOptions.lowering``), so autograd differentiates the cheaper forward and the
backward is cheaper too; the compiled model's own graph is never touched:

- ``fold_linear_scale`` — ``linear(h, W) * c`` → ``linear(h, W * c)`` when ``W`` is smaller than
  the product (LoRA's scaling goes onto ``B``: no elementwise pass over a (tokens × out) tensor,
  in the forward nor on its gradient);
- ``fuse_shared_input_linears`` — trainable projections that read one input (the LoRA ``A``
  factors of q/k/v, of gate/up) become one GEMM on the concatenated weights, split after.
"""
