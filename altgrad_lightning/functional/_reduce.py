"""Sums-to-statistics helpers shared by the diagnostics' ``_compute`` halves."""

from __future__ import annotations

import torch

Sums = dict[str, torch.Tensor]
"""Mergeable state of one diagnostic: 0-d tensors, each merged across steps and ranks by summation (``*_max``
entries by maximum)."""


def count(mask: torch.Tensor) -> torch.Tensor:
    """Number of true elements as a 0-d int64 tensor (no host synchronisation)."""
    return mask.sum(dtype=torch.int64)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float64 sum of ``x`` where ``mask`` holds (NaN/inf outside the mask never leak in)."""
    return torch.where(mask, x.to(torch.float64), 0.0).sum()


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float64 max of ``x`` where ``mask`` holds; 0 when the mask is empty."""
    return (
        torch.where(mask, x.to(torch.float64), 0.0).amax()
        if x.numel()
        else torch.zeros((), dtype=torch.float64, device=x.device)
    )


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` in float64, 0.0 where the denominator is 0 (a fraction of nothing is logged as 0)."""
    den = denominator.to(torch.float64)
    return torch.where(den > 0, numerator.to(torch.float64) / torch.where(den > 0, den, 1.0), 0.0)


def merge(into: Sums, new: Sums) -> Sums:
    """Merge two states as the Metrics do across steps and ranks (sum, or max for ``*_max`` keys)."""
    return {k: torch.maximum(into[k], new[k]) if k.endswith("_max") else into[k] + new[k] for k in into}
