"""Task arithmetic over adapter tensors: the combinations ``add_weighted_adapter`` offers.

The formulas are PEFT's (``peft.utils.merge_utils``), which follow the papers: task arithmetic
(a weighted sum), magnitude pruning, TIES (Yadav et al., 2023: keep the top-``density`` entries
by magnitude, elect a sign per entry, average the entries that agree with it) and DARE (Yu et
al., 2024: drop entries at random with probability ``1 - density`` and rescale the rest by
``1 / density``). Each takes the tensors of one layer from several adapters (same shape) and
their weights, and returns one tensor.

DARE draws its masks from ``generator`` or, by default, from torch's global generator in the
same order as PEFT (one Bernoulli draw per tensor, in the order given), so
``torch.manual_seed(s)`` before either gives the same masks.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

__all__ = ["COMBINATIONS", "combine", "dare_linear", "dare_ties", "magnitude_prune", "task_arithmetic", "ties"]

SignMethod = Literal["total", "frequency"]
#: combination types of :func:`combine` (the non-SVD names of PEFT's ``add_weighted_adapter``)
COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # weights (n,) broadcast over the stacked tensors (n, ...)
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - 1)).to(tensors)


def _check_density(density: Optional[float]) -> float:
    if density is None or not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be a number in [0, 1] for this combination, got {density!r}")
    return float(density)


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries largest in magnitude, zero the rest."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_mask(tensor: torch.Tensor, density: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability ``density``, divide by it."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _majority_sign_mask(tensors: torch.Tensor, method: SignMethod) -> torch.Tensor:
    sign = tensors.sign()
    if method == "total":
        magnitude = tensors.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return sign == torch.where(magnitude >= 0, 1, -1)


def _disjoint_merge(weighted: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (weighted * keep).sum(dim=0) / torch.clamp(keep.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``Σ w_i · t_i``."""
    return _weighted(torch.stack(list(tensors)), weights).sum(dim=0)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Task arithmetic over magnitude-pruned tensors."""
    d = _check_density(density)
    return task_arithmetic([magnitude_mask(t, d) for t in tensors], weights)


def ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: SignMethod = "total") -> torch.Tensor:
    """TIES: trim (magnitude), elect sign, disjoint mean."""
    d = _check_density(density)
    stacked = torch.stack([magnitude_mask(t, d) for t in tensors])
    keep = _majority_sign_mask(stacked, majority_sign_method)
    return _disjoint_merge(_weighted(stacked, weights), keep)


def dare_linear(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DARE then task arithmetic."""
    d = _check_density(density)
    return task_arithmetic([random_mask(t, d, generator) for t in tensors], weights)


def dare_ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: SignMethod = "total", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DARE, then TIES' sign election and disjoint mean."""
    d = _check_density(density)
    stacked = torch.stack([random_mask(t, d, generator) for t in tensors])
    keep = _majority_sign_mask(stacked, majority_sign_method)
    return _disjoint_merge(_weighted(stacked, weights), keep)


def combine(combination_type: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, *,
            density: Optional[float] = None, majority_sign_method: SignMethod = "total",
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dispatch on ``combination_type`` (one of :data:`COMBINATIONS`)."""
    if combination_type == "linear":
        return task_arithmetic(tensors, weights)
    if combination_type == "ties":
        return ties(tensors, weights, density, majority_sign_method)  # type: ignore[arg-type]
    if combination_type == "dare_linear":
        return dare_linear(tensors, weights, density, generator)  # type: ignore[arg-type]
    if combination_type == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method, generator)  # type: ignore[arg-type]
    if combination_type == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)  # type: ignore[arg-type]
    raise ValueError(f"unknown combination_type {combination_type!r}; use one of {list(COMBINATIONS)}")
