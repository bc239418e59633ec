"""Movement on the target grid: flips, stalls and grid steps in format F (SPEC §3.5)."""

from __future__ import annotations

import torch

from altgrad_lightning._bits import floor_log2, pow2
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


_SQUARE_LIMIT = 1e150
"""Update and movement magnitudes are clamped here before squaring, so float64 sums stay finite (only float64
weights can move further in one step)."""


def _survival(
    before: torch.Tensor,
    after: torch.Tensor,
    qb: torch.Tensor,
    qa: torch.Tensor,
    fmt: FloatFormat,
    scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per element, for the stored value ``v = q(before)`` (``qb``, on the unscaled grid) and the update
    ``d = after - before``: the probability that stochastic rounding of ``v + d`` moves the stored value, the
    expected movement under stochastic rounding, the movement under nearest rounding (``q(after) - q(before)``)
    and ``d`` itself, all float64 and in the weights' units.

    Stochastic rounding of ``v + d`` leaves ``v`` with probability ``1 - min(1, |d| / gap)``, ``gap`` being the
    distance from ``v`` to its neighbour in the direction of ``d``: the spacing ``S_F(v)``, half of it when ``v``
    is a power of two above the smallest normal and ``d`` points toward zero, the smallest spacing at zero, and no
    neighbour at all (probability 0) outward from ``±max`` (saturating storage) or below the smallest value of a
    format without zero. It is unbiased inside the range, so the expected movement is ``d`` clipped to the
    format's range: ``d`` itself where ``v + d`` lies inside it (not ``(v + d) - v``, which rounds).
    """
    f64 = torch.float64
    unit = torch.ones((), dtype=f64, device=before.device) if scale is None else scale.to(f64)
    d = after.to(f64) - before.to(f64)
    v, a = qb.to(f64), qa.to(f64)
    mag = v.abs()
    e = floor_log2(mag).clamp_min(fmt.emin)
    spacing = pow2(e - fmt.mantissa_bits, f64)
    toward_zero = (v != 0) & ((d < 0) != (v < 0))
    gap = torch.where(toward_zero & (e > fmt.emin) & (mag == pow2(e, f64)), spacing * 0.5, spacing)
    stuck = (mag >= fmt.max) & ~toward_zero
    if not fmt.has_zero:  # float8_e8m0fnu: nothing below its smallest value
        stuck = stuck | (toward_zero & (mag <= fmt.smallest_subnormal))
    step = d.abs() / unit
    p_move = torch.where(stuck, 0.0, (step / gap).clamp_max(1.0))
    lowest = -fmt.max if fmt.signed else (0.0 if fmt.has_zero else fmt.smallest_subnormal)
    moved_to = v + d / unit
    clipped = moved_to.clamp(lowest, fmt.max)
    expected = torch.where(clipped == moved_to, d, (clipped - v) * unit)  # d itself inside the range
    return p_move, expected, (a - v) * unit, d


def _flip_update(
    before: torch.Tensor, after: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None = None
) -> Sums:
    """Mergeable sums for :func:`flip_statistics`."""
    return _flip_sums_and_masks(before, after, fmt, scale)[0]


def _flip_sums_and_masks(
    before: torch.Tensor, after: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None
) -> tuple[Sums, torch.Tensor, torch.Tensor]:
    """:func:`_flip_update`'s sums and its element-wise ``updated`` and ``stalled`` masks (for per-block counts)."""
    qb, qa = quantize_to_grid(before, fmt, scale), quantize_to_grid(after, fmt, scale)
    steps = (grid_index(qa, fmt) - grid_index(qb, fmt)).abs()
    valid = torch.isfinite(before) & torch.isfinite(after) & ~torch.isnan(steps)
    updated = valid & (after != before)
    p_move, expected, nearest, d = _survival(before, after, qb, qa, fmt, scale)

    def square_sum(x: torch.Tensor) -> torch.Tensor:
        return masked_sum(x.abs().clamp_max(_SQUARE_LIMIT).square(), updated)

    stalled = updated & (steps == 0)
    sums = {
        "n_total": torch.tensor(before.numel(), dtype=torch.int64, device=before.device),
        "n_valid": count(valid),
        "n_updated": count(updated),
        "n_flip": count(valid & (steps != 0)),
        "n_stall": count(stalled),
        "sum_steps": masked_sum(steps, valid),
        "sum_sr_move": masked_sum(p_move, updated),
        "sum_update_sq": square_sum(d),
        "sum_nearest_sq": square_sum(nearest),
        "sum_sr_sq": square_sum(expected),
    }
    return sums, updated, stalled


def _flip_compute(sums: Sums) -> dict[str, torch.Tensor]:
    """Statistics from (merged) :func:`_flip_update` sums."""
    return {
        "flip_frac": ratio(sums["n_flip"], sums["n_valid"]),
        "update_stall_frac": ratio(sums["n_stall"], sums["n_updated"]),
        "updated_frac": ratio(sums["n_updated"], sums["n_valid"]),
        "grid_steps_mean": ratio(sums["sum_steps"], sums["n_valid"]),
        "flip_nonfinite_frac": ratio(sums["n_total"] - sums["n_valid"], sums["n_total"]),
        "sr_update_stall_frac": ratio(sums["n_updated"] - sums["sum_sr_move"], sums["n_updated"]),
        "update_norm_retained": ratio(sums["sum_nearest_sq"], sums["sum_update_sq"]).sqrt(),
        "sr_update_norm_retained": ratio(sums["sum_sr_sq"], sums["sum_update_sq"]).sqrt(),
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

    What stochastic rounding would buy, for weights stored in ``fmt`` (the stored value ``v = q(before)``, the
    update Δ applied to it and rounded stochastically, see ``quantize(..., rounding="stochastic")``), over the
    updated pairs:

    - ``sr_update_stall_frac``: the expected fraction that would not move, ``1 - mean(min(1, |Δ| / gap))`` with
      ``gap`` the distance from ``v`` to its neighbour in the direction of Δ (``S_F(v)``; half of it when ``v`` is
      a power of two and Δ points toward zero; no neighbour outward from ``±max``). Compare ``update_stall_frac``.
    - ``update_norm_retained`` = ‖q(after) - q(before)‖₂ / ‖Δ‖₂: how much of the update's norm nearest rounding
      keeps (0 when every update stalls; above 1 where flips overshoot small updates).
    - ``sr_update_norm_retained`` = ‖E[SR(v + Δ)] - v‖₂ / ‖Δ‖₂: the same for the expected stochastic rounding,
      which is unbiased, so 1 unless updates run into ``±max``.

    Both norms are 0.0 when nothing was updated. With ``scale`` everything is measured on ``scale * grid``.

    Example:
        >>> before = torch.ones(4)  # float8_e4m3fn spacing at 1.0: 0.125
        >>> after = before + torch.tensor([0.0, 2**-6, 3 * 2**-6, 0.5])  # 1/8, 3/8 and 4 gaps
        >>> {k: round(v.item(), 4) for k, v in flip_statistics(before, after, "float8_e4m3fn").items()}
        {'flip_frac': 0.25, 'update_stall_frac': 0.6667, 'updated_frac': 0.75, 'grid_steps_mean': 1.0,
         'flip_nonfinite_frac': 0.0, 'sr_update_stall_frac': 0.5, 'update_norm_retained': 0.9952,
         'sr_update_norm_retained': 1.0}
    """
    check_pair(before, after, ("before", "after"))
    fmt = get_format(fmt, arg="fmt")
    return _flip_compute(_flip_update(before, after, fmt, check_scale(scale, before)))
