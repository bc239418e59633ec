"""Independent references for the format and quantize tests.

Nothing here imports the code under test's arithmetic: grids come from ml_dtypes / numpy code enumeration or from
gfloat's decoder, rounding from ml_dtypes casts, torch's native casts and gfloat's ``round_ndarray``. The one bridge
is :func:`gfloat_format_info`, which translates a :class:`FloatFormat`'s *fields* (not its derived properties) into
gfloat's description of a format; ``test_formats.py`` checks that bridge against gfloat's own named formats and
against ml_dtypes' code sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gfloat
import ml_dtypes
import numpy as np
import torch
from gfloat import Domain, FormatInfo

from altgrad_lightning import Flavour, FloatFormat

#: Preset name -> the numpy dtype that is its reference (ml_dtypes, or numpy for float16).
ML_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(getattr(ml_dtypes, name))
    for name in (
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3",
        "float8_e3m4",
        "float8_e4m3b11fnuz",
        "float8_e8m0fnu",
        "float6_e2m3fn",
        "float6_e3m2fn",
        "float4_e2m1fn",
        "bfloat16",
    )
}
ML_DTYPES["float16"] = np.dtype(np.float16)

#: Preset name -> torch's native dtype, for every preset torch can cast to element-wise.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
    "float8_e8m0fnu": torch.float8_e8m0fnu,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Where in each gap between consecutive grid values the sweeps put points (0.5 is the tie).
GAP_FRACTIONS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.6, 0.9)


def finfo(dtype: np.dtype):
    """``ml_dtypes.finfo`` for ml_dtypes types, ``numpy.finfo`` for numpy's own."""
    return np.finfo(dtype) if dtype == np.float16 else ml_dtypes.finfo(dtype)


def code_values(dtype: np.dtype) -> np.ndarray:
    """The value (float64) of every code of an 8/16-bit (or narrower) dtype, NaN and inf codes included."""
    bits = int(finfo(dtype).bits)
    codes = np.arange(2**bits, dtype=np.uint8 if dtype.itemsize == 1 else np.uint16)
    with np.errstate(invalid="ignore"):
        return codes.view(dtype).astype(np.float64)


def finite_grid(values: np.ndarray) -> np.ndarray:
    """Sorted distinct finite values (one zero) of a code-value array."""
    return np.unique(values[np.isfinite(values)]) + 0.0  # + 0.0 turns a surviving -0 into +0


def ml_grid(name: str) -> np.ndarray:
    """Sorted distinct finite values of the ml_dtypes / numpy dtype behind preset ``name``."""
    return finite_grid(code_values(ML_DTYPES[name]))


def gap_points(grid: np.ndarray, fractions: Sequence[float] = GAP_FRACTIONS) -> np.ndarray:
    """Points at ``fractions`` of each gap between consecutive values of ascending ``grid``, in float64."""
    lo, hi = grid[:-1], grid[1:]
    return np.concatenate([lo + f * (hi - lo) for f in fractions])


def sweep(grid: np.ndarray, *, signed: bool = True, fractions: Sequence[float] = GAP_FRACTIONS) -> np.ndarray:
    """Every non-negative grid value and the gap points between them, mirrored to negatives, plus ``+0`` / ``-0``.

    The result is float64; every tie (fraction 0.5) of every preset is exactly representable in float32 as well,
    which :func:`as_float32_exact` checks.
    """
    pos = grid[grid > 0]
    if grid.min() <= 0:
        pos = np.concatenate([[0.0], pos])
    points = np.concatenate([pos, gap_points(pos, fractions)])
    points = points[points > 0]
    parts = [points, [0.0, -0.0]] + ([-points] if signed else [])
    return np.concatenate(parts)


def as_float32_exact(x: np.ndarray, ties: np.ndarray | None = None) -> np.ndarray:
    """``x`` as float32, asserting that the ties (or, when ``ties`` is None, all points) survived exactly."""
    x32 = x.astype(np.float32)
    check = x if ties is None else ties
    assert np.array_equal(check.astype(np.float32).astype(np.float64), check), "sweep tie not exact in float32"
    return x32


def ml_cast(x: np.ndarray, name: str) -> np.ndarray:
    """Round ``x`` through the ml_dtypes / numpy dtype of ``name`` and back to ``x``'s dtype."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(ML_DTYPES[name]).astype(x.dtype)


def torch_cast(x: np.ndarray, name: str) -> np.ndarray:
    """Round float32 ``x`` through torch's native dtype for ``name`` and back to float32."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(TORCH_DTYPES[name]).float().numpy()


# --- gfloat bridge -------------------------------------------------------------------------------------------


def gfloat_format_info(fmt: FloatFormat) -> FormatInfo:
    """gfloat's description of ``fmt``, built from its fields (E, M, bias, flavour, signed) only.

    gfloat conventions (``gfloat/types.py``): ``k`` total bits, ``precision`` = M + 1, ``domain`` Extended when
    the largest code of each sign is an infinity, ``has_nz`` when the -0 code is a zero (else it is a NaN),
    ``num_high_nans`` NaN codes at the top of each sign, ``has_subnormals`` (False only for e8m0, whose code 0 is
    the normal 2**-127).
    """
    m = fmt.mantissa_bits
    high_nans = {
        Flavour.IEEE: 2**m - 1,
        Flavour.FN: 1,
        Flavour.FNUZ: 0,
        Flavour.FINITE: 0,
        Flavour.E8M0: 1,
    }[fmt.flavour]
    return FormatInfo(
        fmt.name,
        k=int(fmt.signed) + fmt.exponent_bits + m,
        precision=m + 1,
        bias=fmt.bias,
        is_signed=fmt.signed,
        domain=Domain.Extended if fmt.flavour is Flavour.IEEE else Domain.Finite,
        has_nz=fmt.signed and fmt.flavour not in (Flavour.FNUZ, Flavour.E8M0),
        num_high_nans=high_nans,
        has_subnormals=fmt.flavour is not Flavour.E8M0,
        is_twos_complement=False,
    )


def gfloat_code_values(fi: FormatInfo) -> np.ndarray:
    """The value of every code of a gfloat format (float64)."""
    return np.asarray(gfloat.decode_ndarray(fi, np.arange(2**fi.k)), dtype=np.float64)


def gfloat_grid(fi: FormatInfo) -> np.ndarray:
    """Sorted distinct finite values of a gfloat format."""
    return finite_grid(gfloat_code_values(fi))


# --- comparisons and independent formulas ----------------------------------------------------------------------


def mismatches(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Mask of elements that differ as floats *bitwise up to the NaN payload*: value, sign of zero, NaN-ness."""
    with np.errstate(invalid="ignore"):  # signalling-NaN payloads (e.g. torch's e8m0 NaN) warn when widened
        a = np.asarray(actual, dtype=np.float64)
        e = np.asarray(expected, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(e)
    same = (a == e) & (np.signbit(a) == np.signbit(e))
    return ~(both_nan | same)


def assert_same(actual: np.ndarray, expected: np.ndarray, inputs: np.ndarray, what: str = "") -> None:
    """Assert ``actual`` and ``expected`` agree bitwise (NaN == NaN, -0 != +0); report the first differences."""
    actual, expected, inputs = np.asarray(actual), np.asarray(expected), np.asarray(inputs)
    assert actual.shape == expected.shape == inputs.shape
    actual, expected, inputs = actual.reshape(-1), expected.reshape(-1), inputs.reshape(-1)
    bad = mismatches(actual, expected)
    if bad.any():
        idx = np.flatnonzero(bad)[:10]
        rows = "\n".join(
            f"  x={float(inputs[i])!r:<26} got {float(actual[i])!r:<26} expected {float(expected[i])!r}" for i in idx
        )
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ, first:\n{rows}")


def neighbours(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ascending ``grid`` and ``x`` inside [grid[0], grid[-1]]: the largest value <= x and the smallest >= x."""
    lo = grid[np.searchsorted(grid, x, side="right") - 1]
    hi = grid[np.searchsorted(grid, x, side="left")]
    return lo, hi


def spacing_formula(x: float, emin: int, mantissa_bits: int) -> float:
    """Grid spacing at ``x``: ``2**(max(floor(log2|x|), emin) - M)``, with floor(log2) from ``math.frexp``."""
    e = math.frexp(abs(x))[1] - 1 if x != 0 else emin
    return math.ldexp(1.0, max(e, emin) - mantissa_bits)
