"""Stiffness field S_F(w) and gradient-versus-stiffness statistics (``../shared/SPEC.md`` §3.1–3.2)."""

from __future__ import annotations

import torch

from altgrad_lightning._bits import floor_log2, pow2
from altgrad_lightning.formats import FloatFormat, FormatLike, get_format
from altgrad_lightning.functional._reduce import Sums, count, masked_sum, ratio
from altgrad_lightning.quantize import ScaleLike, check_float_tensor, check_pair, check_scale, compute_dtype

__all__ = ["compute_stiffness_field", "gradient_stiffness_correlation"]


def _stiffness(w: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None) -> torch.Tensor:
    """S in the working precision: float64 whenever a scale is given (``w / scale`` and ``scale * S`` can leave
    float32's range), so the statistics never see a spacing rounded to 0 or inf."""
    a = w.to(compute_dtype(w.dtype, fmt, scaled=scale is not None)).abs()
    if scale is not None:
        a = a / scale.to(a.dtype)
    e = floor_log2(a).clamp(fmt.emin, max(fmt.emin, fmt.emax))  # fixed point: emax < emin, one binade
    s = pow2(e - fmt.mantissa_bits, a.dtype)
    if scale is not None:
        s = s * scale.to(a.dtype)
    undefined = (a == 0) | ~torch.isfinite(a)
    return torch.where(undefined, torch.full_like(s, float("nan")), s)


def compute_stiffness_field(w: torch.Tensor, fmt: FormatLike, *, scale: ScaleLike = None) -> torch.Tensor:
    r"""Grid spacing of ``fmt`` at each weight: the smallest change the stored weight can make.

    .. math::
        S_F(w) = 2^{\,\mathrm{clamp}(\lfloor \log_2 |w| \rfloor,\ e_{min},\ e_{max}) - M}

    with ``emin`` the exponent of the smallest normal, so every subnormal has the spacing ``2**(emin - M)``. For
    fixed point (E = 0) this is the constant ``2**-M`` scaled by the format's bias (1/128 for E0M7). With ``scale``,
    ``S = scale * S_F(w / scale)``. Zero weights have no defined stiffness and give NaN, as do NaN and ±inf weights;
    the statistics count them apart. Weights beyond ``max`` get the spacing of the top binade.

    Returns float32 (float64 for float64 weights or formats wider than float32): exact powers of two. With a scale
    the arithmetic is float64 (``w / scale`` may exceed float32's range, e.g. ``2**127 / 2**-4``) and the result is
    rounded once to that dtype: exact for a float32 scale unless ``scale * S_F`` itself leaves float32's range
    (then 0 or inf; :func:`gradient_stiffness_correlation` uses the float64 value).

    Example:
        >>> compute_stiffness_field(torch.tensor([1.0, 3.0, 2.0**-8, 0.0]), "float8_e4m3fn")
        tensor([0.1250, 0.2500, 0.0020,    nan])
        >>> compute_stiffness_field(torch.tensor([1.0, 0.5]), "bfloat16")  # M = 7: not the fixed-point 1/128
        tensor([0.0078, 0.0039])
        >>> compute_stiffness_field(torch.tensor([0.5, 0.01]), "e0m7")
        tensor([0.0078, 0.0078])
        >>> compute_stiffness_field(torch.tensor([2.0**127]), "float8_e8m0fnu", scale=2.0**-4) == 2.0**123
        tensor([True])
    """
    check_float_tensor(w, "w")
    fmt = get_format(fmt, arg="fmt")
    return _stiffness(w, fmt, check_scale(scale, w)).to(compute_dtype(w.dtype, fmt))


def _gradient_stiffness_update(
    w: torch.Tensor, g: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None = None
) -> Sums:
    """Mergeable sums for :func:`gradient_stiffness_correlation` (float64 moments, int64 counts)."""
    s = _stiffness(w, fmt, scale).to(torch.float64)
    x = g.to(torch.float64).abs()
    nonfinite = ~torch.isfinite(w) | ~torch.isfinite(g)
    zero = (w == 0) & ~nonfinite
    valid = ~nonfinite & ~zero
    xs, ys = torch.where(valid, x, 0.0), torch.where(valid, s, 0.0)
    return {
        "n_total": torch.tensor(w.numel(), dtype=torch.int64, device=w.device),
        "n_valid": count(valid),
        "n_zero_weight": count(zero),
        "n_nonfinite": count(nonfinite),
        "n_below": count(valid & (x < s)),
        "sum_ratio": masked_sum(x / s, valid),
        "sum_x": xs.sum(),
        "sum_y": ys.sum(),
        "sum_xx": (xs * xs).sum(),
        "sum_yy": (ys * ys).sum(),
        "sum_xy": (xs * ys).sum(),
    }


def _gradient_stiffness_compute(sums: Sums) -> dict[str, torch.Tensor]:
    """Statistics from (merged) :func:`_gradient_stiffness_update` sums."""
    n = sums["n_valid"].to(torch.float64)
    cov = n * sums["sum_xy"] - sums["sum_x"] * sums["sum_y"]
    var_x = n * sums["sum_xx"] - sums["sum_x"] ** 2
    var_y = n * sums["sum_yy"] - sums["sum_y"] ** 2
    den = var_x * var_y
    defined = (n >= 2) & (var_x > 0) & (var_y > 0)
    corr = torch.where(defined, cov / torch.where(defined, den, 1.0).sqrt(), 0.0).clamp(-1.0, 1.0)
    return {
        "grad_below_stiffness_frac": ratio(sums["n_below"], sums["n_valid"]),
        "grad_stiff_ratio_mean": ratio(sums["sum_ratio"], sums["n_valid"]),
        "grad_stiff_correlation": corr,
        "zero_weight_frac": ratio(sums["n_zero_weight"], sums["n_total"]),
        "grad_nonfinite_frac": ratio(sums["n_nonfinite"], sums["n_total"]),
    }


def gradient_stiffness_correlation(
    w: torch.Tensor, g: torch.Tensor, fmt: FormatLike, *, scale: ScaleLike = None
) -> dict[str, torch.Tensor]:
    r"""How gradients compare with the grid spacing of the weights they update (bit-stall risk).

    Over the valid elements (``w != 0``, ``w`` and ``g`` finite), with :math:`S = S_F(w)`:

    - ``grad_below_stiffness_frac`` = mean(|g| < S), strict, on the raw gradient.
    - ``grad_stiff_ratio_mean`` = mean(|g| / S).
    - ``grad_stiff_correlation`` = Pearson(|g|, S); 0.0 when undefined (fewer than two valid elements or a
      constant side).
    - ``zero_weight_frac`` and ``grad_nonfinite_frac`` (NaN/±inf in ``w`` or ``g``): the excluded elements, as
      fractions of all elements.

    Fractions of an empty set are 0.0. Sums are float64, so results merge exactly across steps and ranks.

    Example:
        >>> w = torch.tensor([1.0, 1.0, 4.0, 0.0])
        >>> g = torch.tensor([0.0625, 0.25, 0.25, 1.0])
        >>> {k: round(v.item(), 4) for k, v in gradient_stiffness_correlation(w, g, "e4m3").items()}
        {'grad_below_stiffness_frac': 0.6667, 'grad_stiff_ratio_mean': 1.0, 'grad_stiff_correlation': 0.5,
         'zero_weight_frac': 0.25, 'grad_nonfinite_frac': 0.0}
    """
    check_pair(w, g, ("w", "g"))
    fmt = get_format(fmt, arg="fmt")
    return _gradient_stiffness_compute(_gradient_stiffness_update(w, g, fmt, check_scale(scale, w)))
