"""Grid alignment: distance of weights to the format's grid, on-grid, overflow and underflow (SPEC §3.3)."""

from __future__ import annotations

import torch

from altgrad_lightning.formats import FloatFormat, FormatLike, get_format
from altgrad_lightning.functional._reduce import Sums, count, masked_max, masked_sum, ratio
from altgrad_lightning.quantize import ScaleLike, check_float_tensor, check_scale, compute_dtype, quantize

__all__ = ["grid_alignment_error", "grid_alignment_statistics"]


def _grid_error(
    w: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w, q, err)`` in the working precision; ``q`` is the saturating nearest rounding."""
    wc = w.to(compute_dtype(w.dtype, fmt))
    q = quantize(wc, fmt, scale=scale, saturate=True)
    err = torch.where(torch.isfinite(wc), (wc - q).abs(), float("nan"))
    return wc, q, err


def grid_alignment_error(w: torch.Tensor, fmt: FormatLike, *, scale: ScaleLike = None) -> torch.Tensor:
    """Distance of each weight to ``fmt``'s grid: ``|w - quantize(w, fmt, scale=scale, saturate=True)|``.

    Saturating rounding (what FP8 training recipes use), so a weight beyond ``max`` has the finite error of its
    clamp; :func:`grid_alignment_statistics` reports those weights as ``overflow_frac``. NaN and ±inf weights give
    NaN. Returns float32 (float64 for float64 weights or formats wider than float32).

    Example:
        >>> grid_alignment_error(torch.tensor([1.0, 1.0625, 1.1875, 500.0]), "float8_e4m3fn")
        tensor([ 0.0000,  0.0625,  0.0625, 52.0000])
    """
    check_float_tensor(w, "w")
    fmt = get_format(fmt, arg="fmt")
    return _grid_error(w, fmt, check_scale(scale, w))[2]


def _grid_alignment_update(w: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None = None) -> Sums:
    """Mergeable sums for :func:`grid_alignment_statistics`."""
    wc, q, err = _grid_error(w, fmt, scale)
    finite = torch.isfinite(wc)
    # Only unsigned formats (e8m0) leave finite weights without a grid value: zero and negative weights.
    valid = finite & ~torch.isnan(err)
    magnitude = wc.abs() if scale is None else wc.abs() / scale.to(wc.dtype)
    return {
        "n_total": torch.tensor(w.numel(), dtype=torch.int64, device=w.device),
        "n_valid": count(valid),
        "n_nonfinite": count(~finite),
        "n_unrepresentable": count(finite & ~valid),
        "n_on_grid": count(valid & (err == 0)),
        "n_overflow": count(valid & (magnitude > fmt.max)),
        "n_underflow": count(valid & (q == 0) & (wc != 0)),
        "sum_err": masked_sum(err, valid),
        "sum_err_sq": masked_sum(err.to(torch.float64) ** 2, valid),
        "err_max": masked_max(err, valid),
    }


def _grid_alignment_compute(sums: Sums) -> dict[str, torch.Tensor]:
    """Statistics from (merged) :func:`_grid_alignment_update` sums."""
    mean = ratio(sums["sum_err"], sums["n_valid"])
    var = (ratio(sums["sum_err_sq"], sums["n_valid"]) - mean**2).clamp_min(0.0)
    return {
        "grid_error_mean": mean,
        "grid_error_max": sums["err_max"],
        "grid_error_std": var.sqrt(),
        "on_grid_frac": ratio(sums["n_on_grid"], sums["n_valid"]),
        "overflow_frac": ratio(sums["n_overflow"], sums["n_valid"]),
        "underflow_frac": ratio(sums["n_underflow"], sums["n_valid"]),
        "grid_nonfinite_frac": ratio(sums["n_nonfinite"], sums["n_total"]),
        "unrepresentable_frac": ratio(sums["n_unrepresentable"], sums["n_total"]),
    }


def grid_alignment_statistics(w: torch.Tensor, fmt: FormatLike, *, scale: ScaleLike = None) -> dict[str, torch.Tensor]:
    r"""How far the weights sit from ``fmt``'s grid.

    With ``err = grid_alignment_error(w, fmt, scale=scale)`` over the finite weights:

    - ``grid_error_mean``, ``grid_error_max``, ``grid_error_std`` (population std, 0 for one element).
    - ``on_grid_frac``: ``err == 0`` exactly (no absolute threshold).
    - ``overflow_frac``: ``|w| > max`` (times ``scale``), before saturation.
    - ``underflow_frac``: ``w != 0`` but the rounding gives 0.
    - ``grid_nonfinite_frac``: NaN/±inf weights, excluded from everything above, as a fraction of all elements.
    - ``unrepresentable_frac``: finite weights the format has no value near at all (zero and negative weights for
      the unsigned ``e8m0``), excluded likewise.

    Example:
        >>> stats = grid_alignment_statistics(torch.tensor([1.0, 1.0625, 500.0, 2.0**-11]), "float8_e4m3fn")
        >>> {k: round(v.item(), 4) for k, v in stats.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'grid_error_mean': 13.0157, 'grid_error_max': 52.0, 'grid_error_std': 22.5076, 'on_grid_frac': 0.25,
         'overflow_frac': 0.25, 'underflow_frac': 0.25, 'grid_nonfinite_frac': 0.0, 'unrepresentable_frac': 0.0}
    """
    check_float_tensor(w, "w")
    fmt = get_format(fmt, arg="fmt")
    return _grid_alignment_compute(_grid_alignment_update(w, fmt, check_scale(scale, w)))
