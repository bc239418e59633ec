"""Movement on the target grid: flips, stalls and grid steps in format F (SPEC §3.5)."""

from __future__ import annotations

import torch

from altgrad_lightning.formats import FloatFormat, FormatLike, get_format
from altgrad_lightning.functional._reduce import Sums, count, masked_sum, ratio
from altgrad_lightning.quantize import ScaleLike, check_pair, check_scale, grid_index, quantize_to_grid

__all__ = ["compute_grid_steps", "flip_statistics"]


def _grid_steps(
    before: torch.Tensor, after: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None
) -> torch.Tensor:
    return (
        grid_index(quantize_to_grid(after, fmt, scale), fmt) - grid_index(quantize_to_grid(before, fmt, scale), fmt)
    ).abs()


def compute_grid_steps(
    before: torch.Tensor, after: torch.Tensor, fmt: FormatLike, *, scale: ScaleLike = None
) -> torch.Tensor:
    """Grid steps of ``fmt`` between the roundings of ``before`` and ``after``: ``|idx(q(after)) - idx(q(before))|``.

    ``q`` is nearest, saturating rounding onto ``fmt``'s grid (with ``scale``, the grid ``scale * grid``) and
    ``idx`` is :func:`~altgrad_lightning.code_index`. 0 means the update did not change the stored value in
    ``fmt`` (a stall if ``before != after``). float64; NaN where either side is NaN.

    Example:
        >>> before = torch.tensor([1.0, 1.0, 1.0, 1.0])
        >>> compute_grid_steps(before, before + torch.tensor([0.01, 0.07, 0.5, -0.07]), "float8_e4m3fn")
        tensor([0., 1., 4., 1.], dtype=torch.float64)
    """
    check_pair(before, after, ("before", "after"))
    fmt = get_format(fmt, arg="fmt")
    return _grid_steps(before, after, fmt, check_scale(scale, before))


def _flip_update(
    before: torch.Tensor, after: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None = None
) -> Sums:
    """Mergeable sums for :func:`flip_statistics`."""
    steps = _grid_steps(before, after, fmt, scale)
    valid = torch.isfinite(before) & torch.isfinite(after) & ~torch.isnan(steps)
    updated = valid & (after != before)
    return {
        "n_total": torch.tensor(before.numel(), dtype=torch.int64, device=before.device),
        "n_valid": count(valid),
        "n_updated": count(updated),
        "n_flip": count(valid & (steps != 0)),
        "n_stall": count(updated & (steps == 0)),
        "sum_steps": masked_sum(steps, valid),
    }


def _flip_compute(sums: Sums) -> dict[str, torch.Tensor]:
    """Statistics from (merged) :func:`_flip_update` sums."""
    return {
        "flip_frac": ratio(sums["n_flip"], sums["n_valid"]),
        "update_stall_frac": ratio(sums["n_stall"], sums["n_updated"]),
        "updated_frac": ratio(sums["n_updated"], sums["n_valid"]),
        "grid_steps_mean": ratio(sums["sum_steps"], sums["n_valid"]),
        "flip_nonfinite_frac": ratio(sums["n_total"] - sums["n_valid"], sums["n_total"]),
    }


def flip_statistics(
    before: torch.Tensor, after: torch.Tensor, fmt: FormatLike, *, scale: ScaleLike = None
) -> dict[str, torch.Tensor]:
    """Which updates ``fmt`` would have kept, and which it would have rounded away.

    With ``q`` the nearest (saturating) rounding onto ``fmt`` and Δ = after - before, over the pairs where both
    sides are finite (and ``fmt`` has a value for them):

    - ``flip_frac`` = mean(q(after) != q(before)): the stored value in ``fmt`` changed.
    - ``update_stall_frac``: among elements with Δ != 0, the fraction with q(after) == q(before): an update the
      format swallowed. 0.0 when nothing was updated (see ``updated_frac``).
    - ``updated_frac`` = mean(Δ != 0): the denominator of the stall fraction, as a fraction of valid pairs.
    - ``grid_steps_mean`` = mean |idx(q(after)) - idx(q(before))|: movement in ULPs of ``fmt``.
    - ``flip_nonfinite_frac``: excluded pairs (NaN/±inf either side), as a fraction of all pairs.

    Example:
        >>> before = torch.tensor([1.0, 1.0, 1.0, 1.0])
        >>> after = before + torch.tensor([0.0, 0.01, 0.07, 0.5])
        >>> {k: v.item() for k, v in flip_statistics(before, after, "float8_e4m3fn").items()}
        {'flip_frac': 0.5, 'update_stall_frac': 0.3333333333333333, 'updated_frac': 0.75, 'grid_steps_mean': 1.25,
         'flip_nonfinite_frac': 0.0}
    """
    check_pair(before, after, ("before", "after"))
    fmt = get_format(fmt, arg="fmt")
    return _flip_compute(_flip_update(before, after, fmt, check_scale(scale, before)))
