"""A step traced on the meta device keeps the attention kernel the CPU would run.

A model compiled on meta (``init_empty_weights``) has its step planned on meta and traced again
for real tensors once its weights are loaded, on the CPU by default. There, ``fused_attention``
keeps ``_scaled_dot_product_flash_attention_for_cpu`` (its backward saves the output and the
row log-sum-exp); on meta, ``scaled_dot_product_attention`` always takes its math form, whose
backward saves the scaled queries and keys and the ``heads x tokens x tokens`` probabilities of
every layer. The meta plan then counted memory the CPU step never holds (a 7B Llama at 1x256:
8 MiB of probabilities per layer).

:class:`CpuAttentionOnMeta` is a ``TorchFunctionMode`` for the meta trace: at each
``aten.scaled_dot_product_attention`` call on float32 meta tensors it asks the CPU's own kernel
choice (``torch._fused_sdp_choice`` on tiny CPU tensors of the same heads, head size, dtype and
mask rank) and, when the CPU would take the flash kernel, calls it on the meta tensors instead,
so the plan has the CPU step's attention and backward.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _bind(args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = dict(_DEFAULTS)
    bound.update(zip(_NAMES, args))
    bound.update(kwargs)
    return bound


def _cpu_picks_flash(a: dict[str, Any]) -> bool:
    """Whether the CPU's SDPA dispatch would run these inputs with its flash kernel."""
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if any(t.dim() != 4 or t.dtype != torch.float32 or t.device.type != "meta" for t in (q, k, v)):
        return False
    if a["enable_gqa"] or not q.shape[1] == k.shape[1] == v.shape[1]:
        return False  # the CPU flash op has no grouped-query form
    with _disable_current_modes():  # real stand-ins, outside the trace
        def standin(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros((t.shape[0], t.shape[1], 1, t.shape[3]), dtype=t.dtype)

        m: Optional[torch.Tensor] = None
        if mask is not None:
            m = torch.zeros((*[min(int(s), 1) if i >= mask.dim() - 2 else int(s) for i, s in enumerate(mask.shape)],),
                            dtype=mask.dtype)
        choice = torch._fused_sdp_choice(standin(q), standin(k), standin(v), m, float(a["dropout_p"]),
                                         bool(a["is_causal"]), scale=a["scale"])
    return int(choice) == int(torch.nn.attention.SDPBackend.FLASH_ATTENTION.value)


class CpuAttentionOnMeta(TorchFunctionMode):
    """Trace ``aten.scaled_dot_product_attention`` on meta as the CPU's flash kernel where the
    CPU would pick it (see the module docstring)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA:
            a = _bind(args, kwargs)
            if _cpu_picks_flash(a):
                return aten._scaled_dot_product_flash_attention_for_cpu.default(
                    a["query"], a["key"], a["value"], float(a["dropout_p"]), bool(a["is_causal"]),
                    attn_mask=a["attn_mask"], scale=a["scale"])[0]
        return func(*args, **kwargs)


__all__ = ["CpuAttentionOnMeta"]
