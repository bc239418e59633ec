"""Grid alignment: distance of weights to the format's grid, on-grid, overflow and underflow (SPEC §3.3)."""

from __future__ import annotations

import torch

from altgrad_lightning.formats import FloatFormat, FormatLike, get_format
from altgrad_lightning.functional._reduce import Sums, count, masked_max, masked_sum, ratio
from altgrad_lightning.quantize import ScaleLike, check_float_tensor, check_scale, compute_dtype, quantize_scaled

__all__ = ["grid_alignment_error", "grid_alignment_statistics"]

_STD_SHIFT = 576
"""``sum_err_sq_scaled`` sums ``(err * 2**-576)**2``: finite for 2**63 errors up to float64's max."""


def _grid_error(
    w: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w, q, err)``; ``q`` is the saturating nearest rounding (used for its zeros), ``err = |w - q|``.

    Unscaled, all three are in the working precision. With a scale that precision is float64 (``w / scale`` and
    ``scale * q`` may leave float32's range although ``w`` is a float32 value); ``scale * q`` is then rounded to
    the unscaled working precision, as quantize returns it, and ``err`` taken there, except where that precision
    cannot hold ``scale * q``: there the float64 value and difference stand in (a finite distance from ``w``).
    """
    base = compute_dtype(w.dtype, fmt)
    wc = w.to(compute_dtype(w.dtype, fmt, scaled=scale is not None))
    q = quantize_scaled(wc, fmt, scale)
    if scale is not None and base != q.dtype:
        # The difference is formed in the narrow dtype rather than by a narrow-and-widen round trip of q, which
        # a compiler may legally drop (torch 2.11's inductor does).
        q_base = q.to(base)
        beyond = torch.isinf(q_base) & torch.isfinite(q)
        err = torch.where(beyond, (wc - q).abs(), (w.to(base) - q_base).abs().to(q.dtype))
        q = torch.where(beyond, q, q_base.to(q.dtype))
    else:
        err = (wc - q).abs()
    err = torch.where(torch.isfinite(wc), err, float("nan"))
    return wc, q, err


def grid_alignment_error(w: torch.Tensor, fmt: FormatLike, *, scale: ScaleLike = None) -> torch.Tensor:
    """Distance of each weight to ``fmt``'s grid: ``|w - quantize(w, fmt, scale=scale, saturate=True)|``.

    Saturating rounding (what FP8 training recipes use), so a weight beyond ``max`` has the finite error of its
    clamp; :func:`grid_alignment_statistics` reports those weights as ``overflow_frac``. NaN and ±inf weights give
    NaN. Returns float32 (float64 for float64 weights or formats wider than float32). With a scale, ``w / scale`` and
    ``scale * q`` are computed in float64 and ``scale * q`` is rounded to that dtype as quantize returns it (a
    weight equal to it is on the grid), except where it lies past that dtype's range: ``w = 3.3e38`` on
    float8_e8m0fnu with scale 8 rounds to ``8 * 2**125 = 2**128``, whose distance from ``w`` is then taken in
    float64 (finite: the statistics use it; the returned float32 error is that distance rounded once).

    float8_e8m0fnu rounds to the nearer power of two for every weight (ties up), also for float32 denormal weights
    in (2**-127, 2**-126): torch's and ml_dtypes' float8_e8m0fnu casts round those up to 2**-126 even below the
    midpoint, so there this error is that of round-to-nearest, not of a cast through those libraries.

    Example:
        >>> grid_alignment_error(torch.tensor([1.0, 1.0625, 1.1875, 500.0]), "float8_e4m3fn")
        tensor([ 0.0000,  0.0625,  0.0625, 52.0000])
    """
    check_float_tensor(w, "w")
    fmt = get_format(fmt, arg="fmt")
    return _grid_error(w, fmt, check_scale(scale, w))[2].to(compute_dtype(w.dtype, fmt))


def _grid_alignment_update(w: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None = None) -> Sums:
    """Mergeable sums for :func:`grid_alignment_statistics`."""
    wc, q, err = _grid_error(w, fmt, scale)
    finite = torch.isfinite(wc)
    # Only unsigned formats (e8m0) leave finite weights without a grid value: zero and negative weights.
    valid = finite & ~torch.isnan(err)
    magnitude = wc.abs() if scale is None else wc.abs() / scale.to(wc.dtype)
    if compute_dtype(w.dtype, fmt) == torch.float64 or (scale is not None and scale.dtype == torch.float64):
        sum_err_sq_scaled = masked_sum((err.to(torch.float64) * 2.0**-_STD_SHIFT) ** 2, valid)
    else:  # float32 weights, grid and scale: errors below 2**257, whose squares never overflow float64
        sum_err_sq_scaled = torch.zeros((), dtype=torch.float64, device=w.device)
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
        "sum_err_sq_scaled": sum_err_sq_scaled,
        "err_max": masked_max(err, valid),
    }


def _grid_alignment_compute(sums: Sums) -> dict[str, torch.Tensor]:
    """Statistics from (merged) :func:`_grid_alignment_update` sums."""
    mean = ratio(sums["sum_err"], sums["n_valid"])
    var = (ratio(sums["sum_err_sq"], sums["n_valid"]) - mean**2).clamp_min(0.0)
    # Past ~2**512 an error's square overflows float64 (float64 weights beyond ~1e154): then the same population
    # variance from the squares of err * 2**-576, whose sum stays finite for any float64 errors. The small errors it
    # loses to underflow weigh less than 2**-800 of a sum that has overflowed 2**1024.
    scaled_mean = mean * 2.0**-_STD_SHIFT
    var_scaled = (ratio(sums["sum_err_sq_scaled"], sums["n_valid"]) - scaled_mean**2).clamp_min(0.0)
    std = torch.where(torch.isfinite(sums["sum_err_sq"]), var.sqrt(), var_scaled.sqrt() * 2.0**_STD_SHIFT)
    return {
        "grid_error_mean": mean,
        "grid_error_max": sums["err_max"],
        "grid_error_std": std,
        "on_grid_frac": ratio(sums["n_on_grid"], sums["n_valid"]),
        "overflow_frac": ratio(sums["n_overflow"], sums["n_valid"]),
        "underflow_frac": ratio(sums["n_underflow"], sums["n_valid"]),
        "grid_nonfinite_frac": ratio(sums["n_nonfinite"], sums["n_total"]),
        "unrepresentable_frac": ratio(sums["n_unrepresentable"], sums["n_total"]),
    }


def grid_alignment_statistics(w: torch.Tensor, fmt: FormatLike, *, scale: ScaleLike = None) -> dict[str, torch.Tensor]:
    r"""How far the weights sit from ``fmt``'s grid.

    With ``err = grid_alignment_error(w, fmt, scale=scale)`` over the finite weights:

    - ``grid_error_mean``, ``grid_error_max``, ``grid_error_std`` (population std, 0 for one element; finite for
      any finite errors, also float64 errors whose squares overflow float64, e.g. weights beyond 1e154).
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
