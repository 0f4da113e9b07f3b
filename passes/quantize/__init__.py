"""Quantized base weights (weight-only, QLoRA-style): the ``quantize`` rule and its merge steps."""
