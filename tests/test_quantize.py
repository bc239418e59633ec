"""quantize and code_index against independent references (SPEC §2, §5).

References: ml_dtypes casts (every preset it has), torch's native casts (every float8 dtype torch has, bfloat16,
float16), gfloat's ``round_ndarray`` (user-defined formats, toward zero), numpy, and spec facts. Results are compared
bitwise up to the NaN payload: the value, the sign of zero and NaN-ness must all agree.

Sweeps are exhaustive: every finite value of the format and points at 0.1/0.3/0.5/0.6/0.9 of every gap between
consecutive values (0.5 is the tie), both signs, within range; overflow is tested separately.
"""

from __future__ import annotations

import bisect
import functools
import math
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
from gfloat import FormatInfo, RoundMode, round_ndarray
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    GAP_FRACTIONS,
    ML_DTYPES,
    TORCH_DTYPES,
    as_float32_exact,
    assert_same,
    code_values,
    finfo,
    gap_points,
    gfloat_code_values,
    gfloat_format_info,
    gfloat_grid,
    mismatches,
    ml_cast,
    ml_grid,
    neighbours,
    spacing_formula,
    sweep,
    torch_cast,
)

from altgrad_lightning import PRESETS, Flavour, FloatFormat, code_index, get_format, quantize

ML_NAMES = sorted(ML_DTYPES)
TORCH_NAMES = sorted(TORCH_DTYPES)
E8M0 = "float8_e8m0fnu"
E8M0_MIN = 2.0**-127
FINITE_PRESETS = ["float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn"]
ROUNDINGS = ["nearest", "stochastic", "toward_zero"]

# --- helpers ----------------------------------------------------------------------------------------------------


def q(x: np.ndarray, fmt, **kwargs) -> np.ndarray:
    """quantize on a numpy float32/float64 array, returned as a numpy array of the same dtype."""
    return quantize(torch.from_numpy(np.array(x, copy=True)), fmt, **kwargs).numpy()


@functools.cache
def grid_of(name: str) -> np.ndarray:
    """Ascending distinct finite values: from ml_dtypes / numpy, or the spec fact k/128 (|k| <= 127) for E0M7."""
    grid = np.arange(-127, 128) / 128.0 if name == "e0m7" else ml_grid(name)
    grid.setflags(write=False)
    return grid


@functools.cache
def preset_sweep(name: str) -> np.ndarray:
    """The exhaustive in-range float32 sweep of a preset (grid values, gap points, both signs, +0 and -0)."""
    grid = grid_of(name)
    nonneg = grid[grid >= 0]
    x = as_float32_exact(sweep(grid), ties=gap_points(nonneg, (0.5,)))
    x.setflags(write=False)
    return x


def e8m0_low_gap(x: np.ndarray) -> np.ndarray:
    """Inputs in the open interval (2**-127, 2**-126): the documented e8m0 difference from ml_dtypes and torch."""
    return (x > E8M0_MIN) & (x < 2.0**-126)


def top_step(fmt: FloatFormat, grid: np.ndarray) -> float:
    """Distance from max to the value the next code would have with an unbounded exponent range."""
    return grid[-1] if fmt.mantissa_bits == 0 and fmt.exponent_bits > 0 else grid[-1] - grid[-2]


def overflow_points_from(mx: float, step: float, *, signed: bool = True) -> np.ndarray:
    """float32 points above ``mx``: 0.1/0.5/0.9 of the way to the next step (0.5 is the tie), the step itself, far
    beyond, the float32 maximum and inf; mirrored to negatives when ``signed``."""
    candidates = np.array(
        [mx + f * step for f in (0.1, 0.5, 0.9)] + [mx + step, 4 * (mx + step), 3.4028234663852886e38]
    )
    with np.errstate(over="ignore"):
        x = candidates.astype(np.float32)
    assert x[1] == candidates[1], "overflow tie not exact in float32"
    x = np.unique(x[np.isfinite(x) & (x.astype(np.float64) > mx)])
    x = np.concatenate([x, [np.inf]]).astype(np.float32)
    return np.concatenate([x, -x]) if signed else x


def preset_overflow_points(name: str) -> np.ndarray:
    """Overflow points of a preset, from its ml_dtypes finfo (max, minexp, nmant)."""
    fi = finfo(ML_DTYPES[name])
    mx = float(fi.max)
    return overflow_points_from(mx, spacing_formula(mx, int(fi.minexp), int(fi.nmant)))


def mode_of(rounding: str) -> RoundMode:
    return {"nearest": RoundMode.TiesToEven, "toward_zero": RoundMode.TowardZero}[rounding]


def gfloat_round(fi: FormatInfo, x: np.ndarray, rounding: str, sat: bool) -> np.ndarray:
    """gfloat's round_ndarray in float64; where gfloat refuses (overflow of a format with neither inf nor NaN and
    sat=False) the expectation is NaN, the documented choice of quantize (SPEC §2: "NaN otherwise")."""
    x = np.asarray(x, dtype=np.float64)
    try:
        return np.asarray(round_ndarray(fi, x, mode_of(rounding), sat), dtype=np.float64)
    except ValueError:
        pass
    beyond = np.abs(x) > fi.max  # only these can be refused; round them one by one
    out = np.empty_like(x)
    out[~beyond] = round_ndarray(fi, x[~beyond], mode_of(rounding), sat)
    for i in np.flatnonzero(beyond):
        try:
            out[i] = round_ndarray(fi, x[i : i + 1], mode_of(rounding), sat)[0]
        except ValueError:
            out[i] = np.nan
    return out


# --- 1. nearest, exhaustive, against ml_dtypes and torch ----------------------------------------------------------


@pytest.mark.parametrize("saturate", [None, True, False])
@pytest.mark.parametrize("name", ML_NAMES)
def test_nearest_matches_ml_dtypes_exhaustive(name: str, saturate) -> None:
    """Round-to-nearest-even is bit-exact with the ml_dtypes (numpy for float16) cast on every in-range sweep point.

    For e8m0 only the five sweep points in (2**-127, 2**-126) are left out: there ml_dtypes rounds up even when
    2**-127 is nearer (tested as a difference in ``test_e8m0_low_gap_rounds_to_nearest``).
    """
    x = preset_sweep(name)
    keep = np.ones(x.shape, dtype=bool)
    if name == E8M0:
        keep = ~e8m0_low_gap(x)
        assert int((~keep).sum()) == len(GAP_FRACTIONS)
    assert_same(q(x[keep], name, saturate=saturate), ml_cast(x[keep], name), x[keep], f"{name} vs ml_dtypes")


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_nearest_matches_torch_cast_exhaustive(name: str) -> None:
    """Bit-exact with torch's native cast (``x.to(dtype).float()``) on every in-range sweep point.

    For float8_e8m0fnu the documented differences are left out and counted: the five points in (2**-127, 2**-126),
    and every input <= 0 (torch casts zero to 2**-127 and a negative value as its absolute value; we give NaN).
    """
    x = preset_sweep(name)
    keep = np.ones(x.shape, dtype=bool)
    if name == E8M0:
        non_positive = (x <= 0) | np.signbit(x)
        keep = ~(e8m0_low_gap(x) | non_positive)
        positive = int((x > 0).sum())
        assert int(non_positive.sum()) == positive + 2  # mirrored negatives, +0 and -0
        assert int((~keep).sum()) == len(GAP_FRACTIONS) + positive + 2
    assert_same(q(x[keep], name), torch_cast(x[keep], name), x[keep], f"{name} vs torch")


@pytest.mark.parametrize("in_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ML_NAMES)
def test_nearest_other_input_dtypes(name: str, in_dtype: torch.dtype) -> None:
    """float64/float16/bfloat16 inputs give the same values as float32 ones (ml_dtypes reference) in their own dtype.

    Only sweep points exactly representable in the input dtype, whose reference result is representable too, are fed.
    """
    x = preset_sweep(name)
    ref = ml_cast(x, name)
    xt = torch.from_numpy(x.copy()).to(in_dtype)
    ref_t = torch.from_numpy(ref).to(in_dtype)
    representable = ~mismatches(xt.float().numpy(), x) & ~mismatches(ref_t.float().numpy(), ref)
    if name == E8M0:
        representable &= ~e8m0_low_gap(x)
    if in_dtype == torch.float64:
        assert int(representable.sum()) == x.size - (len(GAP_FRACTIONS) if name == E8M0 else 0)
    assert representable.sum() >= 20
    keep = torch.from_numpy(representable)
    out = quantize(xt[keep], name)
    assert out.dtype == in_dtype
    assert_same(out.double().numpy(), ref[representable], x[representable], f"{name} from {in_dtype}")


@pytest.mark.parametrize("name", [n for n in ML_NAMES if n != E8M0])
def test_float64_near_ties_match_gfloat(name: str) -> None:
    """float64 inputs a hair (2**-30 of a gap) either side of every tie round to the nearer neighbour, as gfloat does.

    These inputs are not float32 values; ml_dtypes cannot serve here because it converts float64 through float32
    (double rounding: 1.0625 + 2**-40 becomes 1.0 in float8_e4m3fn), so gfloat's exact rounding is the reference.
    """
    grid = grid_of(name)
    nonneg = grid[grid >= 0]
    ties = gap_points(nonneg, (0.5,))
    eps = np.diff(nonneg) * 2.0**-30
    x = np.concatenate([ties - eps, ties + eps, ties])
    x = np.concatenate([x, -x])
    ref = gfloat_round(gfloat_format_info(PRESETS[name]), x, "nearest", sat=True)
    assert_same(q(x, name), ref, x, f"{name} float64 near ties")


# --- 2. the documented e8m0 differences -----------------------------------------------------------------------


def test_e8m0_low_gap_rounds_to_nearest() -> None:
    """In (2**-127, 2**-126) ml_dtypes and torch round up to 2**-126 even when 2**-127 is nearer; we round to nearest.

    Both references are asserted to behave as described, so the difference cannot silently disappear or grow.
    """
    below_tie = np.array([1.1, 1.25, 1.4, 1.49], dtype=np.float64) * E8M0_MIN
    x = below_tie.astype(np.float32)
    assert np.all(np.abs(x.astype(np.float64) - E8M0_MIN) < np.abs(x.astype(np.float64) - 2.0**-126))
    assert np.all(ml_cast(x, E8M0) == np.float32(2.0**-126))
    assert np.all(torch_cast(x, E8M0) == np.float32(2.0**-126))
    assert np.all(q(x, E8M0) == np.float32(E8M0_MIN))
    # At and above the tie all three agree: ties round up (e8m0 has no mantissa to be even).
    at_or_above = (np.array([1.5, 1.6, 1.9]) * E8M0_MIN).astype(np.float32)
    for ref in (ml_cast(at_or_above, E8M0), torch_cast(at_or_above, E8M0)):
        assert np.all(ref == np.float32(2.0**-126))
    assert np.all(q(at_or_above, E8M0) == np.float32(2.0**-126))


def test_e8m0_zero_and_negative_inputs() -> None:
    """Zero and negative inputs give NaN (e8m0 has neither zero nor a sign), as ml_dtypes does; torch differs.

    torch casts ±0 to 2**-127 and a negative value as its absolute value: asserted here as the documented difference.
    """
    x = np.array([0.0, -0.0, -1.0, -3.0, -E8M0_MIN, -(2.0**100), -np.inf], dtype=np.float32)
    assert np.all(np.isnan(q(x, E8M0)))
    assert np.all(np.isnan(ml_cast(x, E8M0)))
    t = torch_cast(x, E8M0)
    assert np.all(t[:2] == np.float32(E8M0_MIN))
    assert_same(t[2:], torch_cast(np.abs(x[2:]), E8M0), x[2:], "torch e8m0 of negatives is the cast of |x|")
    for rounding in ROUNDINGS:
        for saturate in (True, False):
            assert np.all(np.isnan(q(x, E8M0, rounding=rounding, saturate=saturate)))


def test_e8m0_below_smallest_rounds_up_to_it() -> None:
    """Positive inputs below 2**-127 (including its half, the tie with the absent zero) give 2**-127, as both
    references do: the format has no zero to round to."""
    x = np.array([2.0**-149, 2.0**-130, 0.25 * E8M0_MIN, 0.5 * E8M0_MIN, 0.9 * E8M0_MIN], dtype=np.float32)
    assert np.all(ml_cast(x, E8M0) == np.float32(E8M0_MIN))
    assert np.all(torch_cast(x, E8M0) == np.float32(E8M0_MIN))
    assert np.all(q(x, E8M0) == np.float32(E8M0_MIN))


# --- 3. overflow ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ML_NAMES + ["e0m7"])
def test_overflow_saturate_true_clamps_to_max(name: str) -> None:
    """saturate=True maps everything beyond ±max (ties and ±inf included) to ±max, for every preset (SPEC §2)."""
    if name == "e0m7":
        x = overflow_points_from(127 / 128, 1 / 128)
        mx = 127 / 128
    else:
        x = preset_overflow_points(name)
        mx = float(finfo(ML_DTYPES[name]).max)
    expected = np.where(x > 0, mx, -mx).astype(np.float32)
    if name == E8M0:
        expected[x < 0] = np.nan  # unsigned: negative inputs stay NaN
    for rounding in ROUNDINGS:
        assert_same(q(x, name, saturate=True, rounding=rounding), expected, x, f"{name} saturate=True {rounding}")


@pytest.mark.parametrize("name", [n for n in ML_NAMES if n not in FINITE_PRESETS])
def test_overflow_unsaturated_matches_ml_dtypes(name: str) -> None:
    """saturate=False is ml_dtypes' overflow: inf for IEEE-like formats, NaN for fn/fnuz/e8m0 (e4m3fn: NaN above
    464, the tie rounding down to 448)."""
    x = preset_overflow_points(name)
    assert_same(q(x, name, saturate=False), ml_cast(x, name), x, f"{name} saturate=False vs ml_dtypes")


@pytest.mark.parametrize("name", ML_NAMES)
def test_overflow_default_matches_torch_else_ml_dtypes(name: str) -> None:
    """The default (saturate=None) is torch's cast where torch has the dtype (float8_e4m3fn saturates to 448, e5m2
    gives inf, fnuz NaN), and ml_dtypes otherwise (FP6/FP4 saturate, e4m3/e3m4 give inf, e4m3b11fnuz NaN)."""
    x = preset_overflow_points(name)
    ref = torch_cast(x, name) if name in TORCH_DTYPES else ml_cast(x, name)
    if name == "float8_e4m3fn":  # torch < 2.12 gives NaN here: the exact saturating reference, on every torch
        ref = saturated_e4m3fn(x)
    if name == E8M0:  # torch casts a negative e8m0 input as |x| (documented difference): ours and ml_dtypes give NaN
        assert np.all(np.isnan(q(x[x < 0], name))) and np.all(np.isnan(ml_cast(x[x < 0], name)))
        ref, x = ref[x > 0], x[x > 0]
    assert_same(q(x, name), ref, x, f"{name} default overflow")


@pytest.mark.parametrize("name", FINITE_PRESETS + ["e0m7"])
def test_overflow_unsaturated_finite_formats_give_nan(name: str) -> None:
    """Formats with neither inf nor NaN codes give NaN on overflow with saturate=False (documented choice: ml_dtypes
    saturates them and gfloat refuses); values that round to nearest down to max stay max."""
    mx = 127 / 128 if name == "e0m7" else float(finfo(ML_DTYPES[name]).max)
    step = (
        1 / 128
        if name == "e0m7"
        else spacing_formula(mx, int(finfo(ML_DTYPES[name]).minexp), int(finfo(ML_DTYPES[name]).nmant))
    )
    x = overflow_points_from(mx, step)
    rounds_to_max = np.abs(x.astype(np.float64)) < mx + 0.5 * step  # nearer max than the absent next value
    out = q(x, name, saturate=False)
    assert np.all(np.isnan(out[~rounds_to_max]))
    assert np.all(out[rounds_to_max] == np.sign(x[rounds_to_max]) * np.float32(mx))


@pytest.mark.parametrize(
    ("name", "x", "unsaturated", "saturated"),
    [
        ("float8_e4m3fn", 456.0, 448.0, 448.0),
        ("float8_e4m3fn", 464.0, 448.0, 448.0),  # tie between 448 (mantissa 110, even) and 480: even wins
        ("float8_e4m3fn", float(np.nextafter(np.float32(464), np.float32(np.inf))), np.nan, 448.0),
        ("float8_e4m3fn", 480.0, np.nan, 448.0),
        ("float8_e4m3fn", np.inf, np.nan, 448.0),
        ("float8_e5m2", float(np.nextafter(np.float32(61440), np.float32(0))), 57344.0, 57344.0),
        ("float8_e5m2", 61440.0, np.inf, 57344.0),  # tie between 57344 (mantissa 11, odd) and 65536: overflows
        ("float8_e5m2", np.inf, np.inf, 57344.0),
        ("float8_e4m3fnuz", 248.0, np.nan, 240.0),  # tie above max 240 (mantissa 111, odd): overflows to NaN
        ("float8_e5m2fnuz", 61440.0, np.nan, 57344.0),
        ("float16", 65519.0, 65504.0, 65504.0),
        ("float16", 65520.0, np.inf, 65504.0),
        ("bfloat16", 3.3961775e38, np.inf, 3.3895314e38),
    ],
)
def test_overflow_boundary_ties(name: str, x: float, unsaturated: float, saturated: float) -> None:
    """Ties and near-ties at the overflow boundary (spec facts), both signs, confirmed against ml_dtypes."""
    xs = np.array([x, -x], dtype=np.float32)
    assert_same(ml_cast(xs, name), np.array([unsaturated, -unsaturated], np.float32), xs, "reference")
    assert_same(q(xs, name, saturate=False), np.array([unsaturated, -unsaturated], np.float32), xs, "saturate=False")
    assert_same(q(xs, name, saturate=True), np.array([saturated, -saturated], np.float32), xs, "saturate=True")


def torch_saturates_e4m3fn() -> bool:
    """Whether the installed torch's float8_e4m3fn cast saturates (torch >= 2.12) or gives NaN (torch < 2.12)."""
    return bool(torch.tensor([500.0]).to(torch.float8_e4m3fn).float().item() == 448.0)


def saturated_e4m3fn(x: np.ndarray) -> np.ndarray:
    """The saturating float8_e4m3fn rounding without torch: ml_dtypes' cast of x clamped to ±448 (NaN stays NaN)."""
    with np.errstate(invalid="ignore"):
        return np.clip(x, -448, 448).astype(ML_DTYPES["float8_e4m3fn"]).astype(x.dtype)


def test_e4m3fn_default_saturates_on_every_torch() -> None:
    """Our default saturates float8_e4m3fn overflow (inf -> 448, 500 -> 448) whatever torch's native cast does: the
    reference is ml_dtypes' cast of the clamped input (no torch). quantize uses torch's cast only where it was
    checked equal to the reference arithmetic (clamping first where torch < 2.12 gives NaN on overflow), so torch
    < 2.12 and >= 2.12 (saturating) agree. ml_dtypes' own overflow is NaN, our saturate=False."""
    x = np.array([500.0, np.inf, -500.0, -np.inf, 1e30, 464.0, 465.0, -449.0], dtype=np.float32)
    expected = np.array([448, 448, -448, -448, 448, 448, 448, -448], dtype=np.float32)
    assert_same(saturated_e4m3fn(x), expected, x, "reference")
    default = quantize(torch.from_numpy(x.copy()), "float8_e4m3fn")
    unsaturated = quantize(torch.from_numpy(x.copy()), "float8_e4m3fn", saturate=False)
    saturated = quantize(torch.from_numpy(x.copy()), "e4m3", saturate=True)
    assert_same(default.numpy(), expected, x, "default")
    assert_same(saturated.numpy(), expected, x, "saturate=True")
    assert_same(unsaturated.numpy(), ml_cast(x, "float8_e4m3fn"), x, "saturate=False is ml_dtypes")
    assert np.isnan(unsaturated.numpy()[[0, 1, 2, 3, 4, 6]]).all() and unsaturated[[5, 7]].tolist() == [448, -448]
    assert get_format("float8_e4m3fn").saturate_default is True
    # What torch's native cast does differs by version; ours does not follow it.
    native = torch_cast(x, "float8_e4m3fn")
    if torch_saturates_e4m3fn():
        assert_same(native, expected, x, "torch >= 2.12")
    else:
        assert np.isnan(native[[0, 1, 2, 3, 4, 6]]).all()


@pytest.mark.parametrize("name", ML_NAMES)
def test_infinite_inputs(name: str) -> None:
    """±inf: ±max when saturating; unsaturated, ±inf where the format has infinities, else NaN (e8m0: always NaN)."""
    fmt = PRESETS[name]
    x = np.array([np.inf, -np.inf], dtype=np.float32)
    mx = np.float32(finfo(ML_DTYPES[name]).max)
    sat = np.array([mx, -mx], np.float32) if fmt.signed else np.array([mx, np.nan], np.float32)
    unsat = x if bool(np.isinf(ml_cast(x, name)).any()) else np.array([np.nan, np.nan], np.float32)
    assert_same(q(x, name, saturate=True), sat, x, "saturate=True")
    assert_same(q(x, name, saturate=False), unsat, x, "saturate=False")
    if name not in FINITE_PRESETS:
        assert_same(q(x, name, saturate=False), ml_cast(x, name), x, "saturate=False vs ml_dtypes")


# --- 4. user-defined formats against gfloat --------------------------------------------------------------------

SEED_FORMATS = {
    "e0m7": get_format("e0m7"),
    "e1m6": get_format("e1m6"),
    "e2m5": get_format("e2m5"),
    "e3m4": get_format("e3m4"),
    "e4m3-finite": FloatFormat(4, 3, 7, "finite"),  # the seed's E4M3, max 480
    "e5m2-finite": FloatFormat(5, 2, 15, "finite"),
    "e6m1": get_format("e6m1"),
    "e7m0": get_format("e7m0"),
}
CUSTOM_FORMATS = {
    "e4m3b5fn": FloatFormat(4, 3, 5, "fn"),
    "e5m2b13-ieee": FloatFormat(5, 2, 13, "ieee"),
    "e3m4b4fnuz": FloatFormat(3, 4, 4, "fnuz"),
    "e3m2-ieee6": FloatFormat(3, 2, 3, "ieee"),
    "e5m4-ieee10": FloatFormat(5, 4, 15, "ieee"),
    "e6m5b40fn": FloatFormat(6, 5, 40, "fn"),
    "e2m2b0": FloatFormat(2, 2, 0, "finite"),
    "e3m3b6": FloatFormat(3, 3, 6, "finite"),
    "e0m4b3": FloatFormat(0, 4, 3, "finite"),
    "e4m0fn": FloatFormat(4, 0, 7, "fn"),
    "e3m0b2fnuz": FloatFormat(3, 0, 2, "fnuz"),
    "e5m0-ieee": FloatFormat(5, 0, 15, "ieee"),
}
USER_FORMATS = {**SEED_FORMATS, **CUSTOM_FORMATS}
M0_FORMATS = [k for k, f in USER_FORMATS.items() if f.mantissa_bits == 0]


@functools.cache
def user_points(key: str) -> np.ndarray:
    """In-range sweep (gfloat's grid) plus overflow points of a user-defined format, as float32."""
    fmt = USER_FORMATS[key]
    grid = gfloat_grid(gfloat_format_info(fmt))
    nonneg = grid[grid >= 0]
    x = as_float32_exact(sweep(grid), ties=gap_points(nonneg, (0.5,)))
    x = np.concatenate([x, overflow_points_from(grid[-1], top_step(fmt, grid))])
    x.setflags(write=False)
    return x


def check_against_gfloat(fmt: FloatFormat, x: np.ndarray, rounding: str, sat: bool, in_dtype: np.dtype) -> None:
    xin = x.astype(in_dtype)
    ref = gfloat_round(gfloat_format_info(fmt), xin.astype(np.float64), rounding, sat)
    out = q(xin, fmt, rounding=rounding, saturate=sat)
    assert out.dtype == in_dtype
    assert_same(out, ref, xin, f"{fmt} {rounding} sat={sat} {in_dtype}")


@pytest.mark.parametrize("in_dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("sat", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
@pytest.mark.parametrize("key", sorted(USER_FORMATS))
def test_user_formats_match_gfloat(key: str, rounding: str, sat: bool, in_dtype) -> None:
    """Every user-defined format (the seed's E0M7 ... E7M0 splits, odd biases, fnuz, small IEEE, fixed point) rounds
    like gfloat.round_ndarray (TiesToEven / TowardZero) on its exhaustive sweep and overflow points, saturating or not.

    With M = 0 a nearest tie goes to the power of two whose exponent field is even (the code's last bit), see
    ``test_m0_formats_nearest_ties_to_even_code``.
    """
    check_against_gfloat(USER_FORMATS[key], user_points(key), rounding, sat, in_dtype)


@pytest.mark.parametrize("key", M0_FORMATS)
def test_m0_formats_nearest_ties_to_even_code(key: str) -> None:
    """For M = 0 the code's last bit is the exponent's, so a tie 1.5 * 2**e goes to whichever of 2**e, 2**(e+1)
    has an even exponent field (IEEE 754 ties-to-even read on the encoding; P3109 and gfloat)."""
    fmt = USER_FORMATS[key]
    grid = gfloat_grid(gfloat_format_info(fmt))
    ties = gap_points(grid[grid >= 0], (0.5,)).astype(np.float32)
    x = np.concatenate([ties, -ties])
    check_against_gfloat(fmt, x, "nearest", True, np.float32)


def test_m0_tie_example_e7m0() -> None:
    """Spec facts for e7m0 (bias 63): 2**-62 has exponent field 1 (odd), 2**-61 field 2 (even), 2**-60 field 3, so
    under ties-to-even both 1.5 * 2**-62 and 1.5 * 2**-61 go to 2**-61; gfloat agrees (a plain torch.round of the
    significand would send every M = 0 tie up)."""
    fi = gfloat_format_info(get_format("e7m0"))
    x = np.array([1.5 * 2.0**-62, 1.5 * 2.0**-61, -1.5 * 2.0**-61], dtype=np.float32)
    expected = np.array([2.0**-61, 2.0**-61, -(2.0**-61)], dtype=np.float32)
    assert_same(round_ndarray(fi, x.astype(np.float64), RoundMode.TiesToEven, True), expected, x, "gfloat")
    assert_same(q(x, "e7m0"), expected, x, "ours")


UNSIGNED_FORMATS = {
    "u-e4m4b7": FloatFormat(4, 4, 7, "finite", signed=False),
    "u-e3m3b3fn": FloatFormat(3, 3, 3, "fn", signed=False),
}


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
@pytest.mark.parametrize("key", sorted(UNSIGNED_FORMATS))
def test_unsigned_formats_match_gfloat_on_positive_inputs(key: str, rounding: str) -> None:
    """Unsigned user formats round positive inputs like gfloat (negative inputs are undefined in gfloat)."""
    fmt = UNSIGNED_FORMATS[key]
    grid = gfloat_grid(gfloat_format_info(fmt))
    x = as_float32_exact(sweep(grid, signed=False), ties=gap_points(grid, (0.5,)))
    x = np.concatenate([x[x > 0], overflow_points_from(grid[-1], top_step(fmt, grid), signed=False)])
    for sat in (True, False):
        check_against_gfloat(fmt, x, rounding, sat, np.float32)


@pytest.mark.parametrize("key", sorted(UNSIGNED_FORMATS))
def test_unsigned_formats_keep_zero(key: str) -> None:
    """An unsigned format with a zero code (only e8m0 lacks one) maps 0 and inputs below half its smallest value
    to 0."""
    fmt = UNSIGNED_FORMATS[key]
    x = np.array([0.0, 0.25 * fmt.smallest_subnormal], dtype=np.float32)
    ref = gfloat_round(gfloat_format_info(fmt), x.astype(np.float64), "nearest", True)
    assert np.all(ref == 0)
    assert_same(q(x, fmt), ref, x, str(fmt))


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("key", [*sorted(UNSIGNED_FORMATS), "u-e5m2b15ieee", E8M0])
def test_unsigned_formats_negative_inputs_are_nan(key: str, rounding: str) -> None:
    """Every negative input to an unsigned format gives NaN (documented in quantize and FloatFormat): tiny ones that
    would round to 0, in-range ones, ones beyond max and -inf, whatever the rounding and saturate setting. gfloat's
    decoding of every code has no negative value, so there is nothing to round to. -0 is not negative: +0 where the
    format has a zero (NaN for e8m0, which has none)."""
    fmt = get_format(key) if key == E8M0 else UNSIGNED_FORMATS.get(key, FloatFormat(5, 2, 15, "ieee", signed=False))
    values = gfloat_code_values(gfloat_format_info(fmt))
    assert not (values < 0).any()
    x = np.array([-0.25 * fmt.smallest_subnormal, -fmt.smallest_subnormal, -1.0, -fmt.max, -4 * fmt.max, -np.inf])
    x = x.astype(np.float32)
    for saturate in (None, True, False):
        assert np.isnan(q(x, fmt, rounding=rounding, saturate=saturate)).all(), (key, saturate)
    zero = q(np.array([-0.0, 0.0], dtype=np.float32), fmt, rounding=rounding)
    if fmt.has_zero:
        assert zero.tolist() == [0.0, 0.0] and not np.signbit(zero).any()
    else:
        assert np.isnan(zero).all()


# --- 5. toward zero on the presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sat", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("name", ML_NAMES + ["e0m7"])
def test_toward_zero_matches_gfloat(name: str, sat: bool) -> None:
    """rounding="toward_zero" equals gfloat's TowardZero on every preset's sweep and overflow points.

    Finite inputs beyond max truncate to ±max whatever ``saturate`` says; ±inf follows ``saturate``. For e8m0 only
    inputs >= 2**-127 are compared (below it there is no value toward zero; zero and negatives are NaN).
    """
    x = preset_sweep(name)
    x = np.concatenate(
        [x, preset_overflow_points(name) if name != "e0m7" else overflow_points_from(127 / 128, 1 / 128)]
    )
    if name == E8M0:
        x = x[x >= E8M0_MIN]
    check_against_gfloat(get_format(name), x, "toward_zero", sat, np.float32)


@pytest.mark.parametrize("name", ML_NAMES + ["e0m7"])
def test_toward_zero_never_increases_magnitude(name: str) -> None:
    """|q(x)| <= |x| for every in-range sweep point, where q(x) is the grid neighbour nearer zero, and for every
    finite input beyond ±max, where it is ±max whatever ``saturate`` says.

    The one exception is e8m0 below 2**-127 (no zero to truncate to; it gives 2**-127), checked separately.
    """
    grid = grid_of(name)
    x = preset_sweep(name)
    if name == E8M0:
        x = x[x >= E8M0_MIN]
    out = q(x, name, rounding="toward_zero").astype(np.float64)
    xd = x.astype(np.float64)
    assert np.all(np.abs(out) <= np.abs(xd))
    lo, hi = neighbours(grid, xd)
    assert np.array_equal(out, np.where(xd >= 0, lo, hi))
    over = overflow_points_from(grid[-1], top_step(get_format(name), grid), signed=get_format(name).signed)
    over = over[np.isfinite(over)]
    for saturate in (None, True, False):
        out = q(over, name, rounding="toward_zero", saturate=saturate).astype(np.float64)
        assert np.array_equal(out, np.sign(over) * grid[-1]), (saturate, over, out)
    if name == E8M0:
        tiny = np.array([0.3 * E8M0_MIN], np.float32)
        assert q(tiny, E8M0, rounding="toward_zero")[0] == np.float32(E8M0_MIN)


# --- 6. stochastic rounding ----------------------------------------------------------------------------------------

STOCHASTIC_CASES = [
    ("float8_e4m3fn", 1.3),
    ("float8_e4m3fn", -2.3 * 2.0**-9),  # subnormal
    ("float8_e4m3fn", 1.0 + 0.01 * 0.125),  # p = 1 %
    ("float8_e5m2", 50000.0),
    ("float8_e4m3fnuz", -0.7),
    ("bfloat16", 1.0 + 2.0**-9 + 2.0**-12),
    ("float16", 3.0e-6),  # subnormal
    ("float4_e2m1fn", 2.6),
    ("float6_e3m2fn", -0.3),
    ("e0m7", 0.3),
    (E8M0, 0.7),
]


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("name", "value"), STOCHASTIC_CASES)
def test_stochastic_is_unbiased(name: str, value: float, in_dtype: torch.dtype) -> None:
    """200k draws of an off-grid x: every draw is one of its two grid neighbours (from the reference grid), and the
    mean is x within 3 sigma of the Bernoulli(p = (x - lo) / (hi - lo)) sample mean."""
    n = 200_000
    x = float(np.float32(value))
    grid = grid_of(name)
    lo, hi = (float(v[0]) for v in neighbours(grid, np.array([x])))
    assert lo < x < hi
    p = (x - lo) / (hi - lo)
    gen = torch.Generator().manual_seed(12345)
    out = quantize(torch.full((n,), x, dtype=in_dtype), name, rounding="stochastic", generator=gen)
    assert out.dtype == in_dtype
    values = out.double().numpy()
    assert set(np.unique(values)) <= {lo, hi}
    sigma = (hi - lo) * math.sqrt(p * (1 - p) / n)
    assert abs(values.mean() - x) <= 3 * sigma, f"mean {values.mean()!r} vs x {x!r}, sigma {sigma!r}"
    assert abs((values == hi).mean() - p) <= 3 * math.sqrt(p * (1 - p) / n)


def test_stochastic_is_reproducible_with_generator() -> None:
    """Same seed -> identical result; a different seed -> a different one; the global RNG is used without generator."""
    x = torch.from_numpy(preset_sweep("float8_e4m3fn").copy())
    x = x.repeat(8)

    def draw(seed: int) -> torch.Tensor:
        return quantize(x, "e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    d = quantize(x, "e4m3", rounding="stochastic")
    torch.manual_seed(3)
    e = quantize(x, "e4m3", rounding="stochastic")
    assert torch.equal(d, e)


@pytest.mark.parametrize("name", ML_NAMES + ["e0m7"])
def test_stochastic_stays_between_neighbours(name: str) -> None:
    """Every in-range sweep point (drawn 4 times) lands on one of its two grid neighbours, keeping its sign (fnuz:
    zero is +0), and, over the sweep, both neighbours occur."""
    grid = grid_of(name)
    fmt = get_format(name)
    x = preset_sweep(name)
    if name == E8M0:
        x = x[x >= E8M0_MIN]
    x = np.tile(x, 4)
    out = q(x, name, rounding="stochastic", generator=torch.Generator().manual_seed(0)).astype(np.float64)
    xd = x.astype(np.float64)
    lo, hi = neighbours(grid, xd)
    assert np.all((out == lo) | (out == hi))
    off_grid = lo != hi
    assert np.any(out[off_grid] == lo[off_grid]) and np.any(out[off_grid] == hi[off_grid])
    if fmt.has_negative_zero:
        assert np.array_equal(np.signbit(out), np.signbit(xd))
    else:
        assert not np.any(np.signbit(out[out == 0]))


@pytest.mark.parametrize("name", ML_NAMES)
def test_stochastic_leaves_grid_points_unchanged(name: str) -> None:
    """Every finite code value of the format (from ml_dtypes, -0 included where it exists) is returned bit for bit."""
    codes = code_values(ML_DTYPES[name])
    x = np.tile(codes[np.isfinite(codes)].astype(np.float32), 8)
    out = q(x, name, rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert_same(out, x, x, f"{name} stochastic on grid")


# --- 7. property tests ----------------------------------------------------------------------------------------------

HYP_NAMES = ["float8_e4m3fn", "float8_e5m2", "bfloat16", "float4_e2m1fn", "e0m7"]
HYP_SETTINGS = settings(max_examples=300, deadline=None, database=None)


def in_range(name: str) -> st.SearchStrategy[np.ndarray]:
    """Lists of 1-8 float32 values with |x| <= max, as a float32 array (one quantize call checks them all)."""
    mx = float(get_format(name).max) if name == "e0m7" else float(finfo(ML_DTYPES[name]).max)
    one = st.floats(min_value=-mx, max_value=mx, width=32, allow_nan=False, allow_infinity=False)
    return st.lists(one, min_size=1, max_size=8).map(lambda v: np.array(v, dtype=np.float32))


def spacing_at(name: str, x: float) -> float:
    """Independent grid spacing: 1/128 for E0M7 (spec fact), else 2**(max(floor(log2|x|), minexp) - nmant), finfo's."""
    if name == "e0m7":
        return 1 / 128
    fi = finfo(ML_DTYPES[name])
    return spacing_formula(x, int(fi.minexp), int(fi.nmant))


@pytest.mark.parametrize("name", HYP_NAMES + ["float8_e4m3fnuz"])
@HYP_SETTINGS
@given(data=st.data())
def test_properties(name: str, data) -> None:
    """On random in-range float32 values (one list per example, checked in one call):

    - idempotence: q(q(x)) == q(x) bitwise;
    - monotonicity: x <= y implies q(x) <= q(y) (q of the sorted list is non-decreasing; adjacent pairs imply all);
    - odd symmetry: q(-x) == -q(x), bitwise where the format has -0; fnuz returns +0 for both signs;
    - accuracy: |q(x) - x| <= S(x)/2 with S computed independently, and q(x) is one of x's two grid neighbours;
    - toward zero gives the neighbour nearer zero.

    (Stochastic rounding's neighbours are checked exhaustively in ``test_stochastic_stays_between_neighbours``.)
    """
    x = np.sort(data.draw(in_range(name)))
    xd = x.astype(np.float64)
    nearest, negated = np.split(q(np.concatenate([x, -x]), name), 2)
    assert_same(q(nearest, name), nearest, x, "idempotence")
    assert np.all(nearest[1:] >= nearest[:-1]), f"monotonicity: {x} -> {nearest}"
    if get_format(name).has_negative_zero:
        assert_same(negated, -nearest, x, "odd symmetry")
    else:
        assert_same(negated, -nearest + np.float32(0.0), x, "odd symmetry (no -0)")
        assert not np.signbit(negated[negated == 0]).any() and not np.signbit(nearest[nearest == 0]).any()
    half = np.array([spacing_at(name, float(v)) / 2 for v in xd])
    error = np.abs(nearest.astype(np.float64) - xd)
    assert np.all(error <= half), f"error above half a spacing: {x} -> {nearest}"
    lo, hi = neighbours(grid_of(name), xd)
    assert np.all((nearest == lo) | (nearest == hi))
    assert np.array_equal(q(x, name, rounding="toward_zero").astype(np.float64), np.where(xd >= 0, lo, hi))


# --- 8. scale ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2.0**-10, 2.0**-3, 1.0, 2.0**5, 2.0**20])
@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn", "float8_e4m3fnuz"])
def test_scale_power_of_two(name: str, scale: float) -> None:
    """quantize(x, f, scale=s) == s * cast(x / s) bit for bit, for a float scale and a 0-d tensor scale."""
    x = (preset_sweep(name).astype(np.float64) * scale).astype(np.float32)
    expected = (np.float32(scale) * ml_cast(x / np.float32(scale), name)).astype(np.float32)
    assert_same(q(x, name, scale=scale), expected, x, f"{name} scale={scale}")
    assert_same(q(x, name, scale=torch.tensor(scale)), expected, x, f"{name} tensor scale={scale}")


def exact_scaled_e4m3fn(x: np.ndarray, scale: float) -> np.ndarray:
    """float32(s * q) with q the nearest-even (saturating) float8_e4m3fn value of the *exact* quotient x / s.

    Rationals throughout (``fractions.Fraction``), the grid and the codes' parity from ml_dtypes. ``s`` is a float32
    value, so ``s * q`` (at most 28 bits) is a float64 value and ``np.float32`` rounds it once.
    """
    grid = grid_of("float8_e4m3fn")
    codes = grid.astype(ML_DTYPES["float8_e4m3fn"]).view(np.uint8).astype(np.int64)
    exact = [Fraction(g) for g in grid]
    s = Fraction(scale)
    out = []
    for xi in x.astype(np.float64):
        t = Fraction(xi) / s
        hi = min(max(bisect.bisect_left(exact, t), 1), len(exact) - 1)
        lo = hi - 1
        d_lo, d_hi = abs(t - exact[lo]), abs(exact[hi] - t)
        pick = hi if d_hi < d_lo or (d_hi == d_lo and codes[hi] % 2 == 0) else lo
        pick = len(exact) - 1 if t >= exact[-1] else 0 if t <= exact[0] else pick  # saturating
        value = float(np.float32(float(s * exact[pick])))
        out.append(math.copysign(value, xi) if value == 0 else value)
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("scale", [3.0, 0.7, 1.1, 1e-3])
def test_scale_non_power_of_two_is_exact(scale: float) -> None:
    """With any positive s the result is s * q(x / s) for the *exact* quotient, rounded once to float32, with s
    held as a float32 value like the input (float and 0-d tensor scales alike). The float32 formula this replaces
    rounded x / s to float32 first and so misrounded quotients within 2**-24 of a tie."""
    s32 = float(np.float32(scale))
    x = (preset_sweep("float8_e4m3fn") * np.float32(scale)).astype(np.float32)
    expected = exact_scaled_e4m3fn(x, s32)
    assert_same(q(x, "e4m3", scale=scale), expected, x, f"scale={scale}")
    assert_same(q(x, "e4m3", scale=torch.tensor(scale)), expected, x, f"tensor scale={scale}")


def test_scale_near_ties_are_rounded_exactly() -> None:
    """Inputs a float32 step either side of s * tie: the float32 quotient of the old formula lands on the tie and
    rounds to even; the exact quotient does not. Checked against exact rationals."""
    s = np.float32(0.7)
    grid = grid_of("float8_e4m3fn")
    ties = ((grid[1:] + grid[:-1]) / 2)[grid[1:] > 0]
    centre = (ties * np.float64(s)).astype(np.float32)
    x = np.concatenate([centre, np.nextafter(centre, np.float32(np.inf)), np.nextafter(centre, np.float32(0))])
    float32_formula = (s * ml_cast((x / s).astype(np.float32), "float8_e4m3fn")).astype(np.float32)
    expected = exact_scaled_e4m3fn(x, float(s))
    assert mismatches(float32_formula, expected).any()  # the data hits the old double rounding
    assert_same(q(x, "e4m3", scale=float(s)), expected, x, "near ties")


def test_scale_quotient_beyond_float32() -> None:
    """x / s past float32's range for a float32 x is formed in float64: it saturates (or gives NaN) like any value
    past max, and s * q comes back in range. e8m0: 2**127 / 2**-4 = 2**131 saturates to 2**127, times 2**-4."""
    x = np.array([3.0e38, -(2.0**127), 2.0**-149, 1.0], dtype=np.float32)
    s = 2.0**-20
    assert_same(q(x, "e4m3", scale=s), np.float32([448 * s, -448 * s, 0.0, 448 * s]), x, "saturating")
    assert_same(q(x, "e4m3", scale=s, saturate=False), np.float32([np.nan, np.nan, 0.0, np.nan]), x, "unsaturated")
    x = np.array([2.0**127, 3.3e38], dtype=np.float32)
    assert_same(q(x, "float8_e8m0fnu", scale=2.0**-4, saturate=True), np.float32([2.0**123] * 2), x, "e8m0")
    assert_same(q(x, "float8_e8m0fnu", scale=8.0), np.float32([2.0**127, np.inf]), x, "e8m0 8 * 2**125 = 2**128")


@pytest.mark.parametrize("scale", [1e-50, 1e39])
def test_python_scale_outside_float32_is_refused_for_float32_inputs(scale: float) -> None:
    """A Python scale is held in the input's precision: one that float32 rounds to 0 or inf is refused (naming
    `scale`) for float32 inputs and accepted for float64 ones."""
    with pytest.raises(ValueError, match="`scale`"):
        quantize(torch.ones(2), "e4m3", scale=scale)
    out = quantize(torch.ones(2, dtype=torch.float64), "e4m3", scale=scale)
    assert torch.isfinite(out).all()


def test_scale_float64_input() -> None:
    """float64 input with a float scale computes x / s and s * q in float64 (gfloat reference: ml_dtypes would round
    x / s through float32 first)."""
    s = 0.3
    x = preset_sweep("float8_e5m2").astype(np.float64) * 0.29
    ref = s * gfloat_round(gfloat_format_info(PRESETS["float8_e5m2"]), x / s, "nearest", False)
    assert_same(q(x, "e5m2", scale=s), ref, x, "float64 scale")
    assert_same(q(x, "e5m2", scale=torch.tensor(s, dtype=torch.float64)), ref, x, "float64 tensor scale")


def test_scale_tensor_broadcasts_per_row_and_column() -> None:
    """A (n, 1) scale scales each row, a (1, m) scale each column, exactly as the row/column-wise reference."""
    rng = np.random.default_rng(0)
    rows = np.array([[2.0**-8], [1.0], [2.0**4], [2.0**10]], dtype=np.float32)
    x = (rng.uniform(-440, 440, (4, 64)) * rows).astype(np.float32)  # within range after division by the scale
    expected = np.stack([r * ml_cast(xi / r, "float8_e4m3fn") for xi, r in zip(x, rows[:, 0], strict=True)])
    assert_same(q(x, "e4m3", scale=torch.from_numpy(rows)), expected, x, "per-row scale")
    cols = (2.0 ** rng.integers(-6, 6, size=(1, 64))).astype(np.float32)
    x = (rng.uniform(-440, 440, (4, 64)) * cols).astype(np.float32)
    expected = np.stack([c * ml_cast(xi / c, "float8_e4m3fn") for xi, c in zip(x.T, cols[0], strict=True)]).T
    assert_same(q(x, "e4m3", scale=torch.from_numpy(cols)), expected, x, "per-column scale")


@pytest.mark.parametrize(
    ("scale", "error"),
    [
        (0.0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (0, ValueError),
        (torch.tensor([1.0, 0.0]), ValueError),
        (torch.tensor([[1.0], [-2.0]]), ValueError),
        (torch.tensor([1.0, float("inf")]), ValueError),
        (torch.ones(3), ValueError),  # does not broadcast to (2, 2)
        (torch.tensor([1, 2]), TypeError),
        ("2", TypeError),
        (True, TypeError),
        ([1.0, 2.0], TypeError),
    ],
)
def test_bad_scale(scale, error: type) -> None:
    """Zero, negative, NaN or inf scales (a tensor's NaN entries are e8m0's NaN, accepted: see
    test_nan_tensor_scale_entries_give_nan), a non-broadcasting shape, an integer tensor and non-numbers are refused,
    naming `scale`, by both quantize and code_index."""
    x = torch.ones(2, 2)
    with pytest.raises(error, match="`scale`"):
        quantize(x, "e4m3", scale=scale)
    with pytest.raises(error, match="`scale`"):
        code_index(x, "e4m3", scale=scale)


def test_nan_tensor_scale_entries_give_nan() -> None:
    """A NaN entry of a tensor scale (float8_e8m0fnu's NaN, what mx_scale gives a block holding NaN or inf) makes
    exactly the elements it scales NaN, on CPU as on accelerators."""
    x = torch.tensor([[1.0, 3.0], [-0.5, 2.0]])
    scale = torch.tensor([[1.0], [float("nan")]])
    got = quantize(x, "e4m3", scale=scale)
    assert got[0].tolist() == [1.0, 3.0]
    assert torch.isnan(got[1]).all()
    assert torch.isnan(code_index(x, "e4m3", scale=scale)[1]).all()


# --- 9. bad arguments ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(x=[1.0, 2.0]), TypeError, "`x`"),
        (dict(x=np.ones(3, dtype=np.float32)), TypeError, "`x`"),
        (dict(x=1.5), TypeError, "`x`"),
        (dict(x=torch.tensor([1, 2])), TypeError, "`x`"),
        (dict(x=torch.tensor([True])), TypeError, "`x`"),
        (dict(x=torch.ones(2, dtype=torch.complex64)), TypeError, "`x`"),
        (dict(x=torch.ones(2).to(torch.float8_e4m3fn)), TypeError, "`x`"),
        (dict(rounding="up"), ValueError, "`rounding`"),
        (dict(rounding="NEAREST"), ValueError, "`rounding`"),
        (dict(rounding=None), ValueError, "`rounding`"),
        (dict(saturate="yes"), TypeError, "`saturate`"),
        (dict(saturate=1), TypeError, "`saturate`"),
        (dict(saturate=np.bool_(True)), TypeError, "`saturate`"),
        (dict(rounding="stochastic", generator=42), TypeError, "`generator`"),
        (dict(rounding="stochastic", generator=np.random.default_rng(0)), TypeError, "`generator`"),
        (
            dict(x=torch.ones(3, device="meta"), rounding="stochastic", generator=torch.Generator()),
            ValueError,
            "`generator`",
        ),
        (dict(fmt="e4m4"), ValueError, "`fmt`"),
        (dict(fmt=3), TypeError, "`fmt`"),
        (dict(fmt=torch.int8), ValueError, "`fmt`"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    """Each bad argument raises the documented exception with a message naming it."""
    call = dict(x=torch.ones(3), fmt="e4m3") | kwargs
    with pytest.raises(error, match=match):
        quantize(call.pop("x"), call.pop("fmt"), **call)


@pytest.mark.parametrize("x", [[1.0], torch.tensor([1, 2]), np.ones(2)])
def test_code_index_bad_x(x) -> None:
    """code_index refuses non-float-tensor input, naming `x`."""
    with pytest.raises(TypeError, match="`x`"):
        code_index(x, "e4m3")


# --- 10. NaN and signed zero -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_nan_in_nan_out_every_preset(name: str) -> None:
    """NaN (either sign) gives NaN for every preset, every rounding and saturate setting: also for the finite
    FP6/FP4/E0M7 formats, which have no NaN code (documented choice: a quantizer must not hide a NaN)."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.tensor([float("nan"), -float("nan")], dtype=dtype)
        for rounding in ROUNDINGS:
            for saturate in (None, True, False):
                out = quantize(x, name, rounding=rounding, saturate=saturate)
                assert out.dtype == dtype and bool(torch.isnan(out).all()), (name, dtype, rounding, saturate)


@pytest.mark.parametrize("name", FINITE_PRESETS)
def test_nan_on_finite_formats_differs_from_ml_dtypes(name: str) -> None:
    """The documented difference: ml_dtypes turns NaN into a number (a zero) for FP6/FP4; we keep NaN."""
    x = np.array([np.nan], dtype=np.float32)
    assert not np.isnan(ml_cast(x, name)).any()
    assert np.isnan(q(x, name)).all()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_signed_zero(name: str) -> None:
    """+0 -> +0 and -0 -> -0 for every rounding; fnuz formats (no -0 code) give +0; e8m0 (no zero) gives NaN.
    Where ml_dtypes has the format, its cast agrees bit for bit."""
    fmt = PRESETS[name]
    x = np.array([0.0, -0.0], dtype=np.float32)
    if not fmt.has_zero:
        expected = np.array([np.nan, np.nan], np.float32)
    elif fmt.flavour is Flavour.FNUZ:
        expected = np.array([0.0, 0.0], np.float32)
    else:
        expected = x
    if name in ML_DTYPES:
        assert_same(ml_cast(x, name), expected, x, "reference")
    for rounding in ROUNDINGS:
        assert_same(q(x, name, rounding=rounding), expected, x, f"{name} {rounding}")


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "bfloat16", "float4_e2m1fn", "float8_e4m3fnuz"])
def test_underflow_keeps_sign(name: str) -> None:
    """Tiny negative values that round to zero give -0 (fnuz: +0), as ml_dtypes does, for every rounding mode."""
    tiny = float(finfo(ML_DTYPES[name]).smallest_subnormal)
    x = np.array([-0.25 * tiny, 0.25 * tiny], dtype=np.float32)
    expected = ml_cast(x, name)
    assert expected[0] == 0
    for rounding in ("nearest", "toward_zero"):
        assert_same(q(x, name, rounding=rounding), expected, x, f"{name} {rounding}")


# --- 11. the seed's defects (SPEC §5) --------------------------------------------------------------------------------


def test_seed_defect_e4m3_max_480() -> None:
    """Seed defect "E4M3 with max 480": e4m3 is OCP (max 448, 480's code is NaN), 480 saturates to 448 by default
    (like torch) and is NaN unsaturated (like ml_dtypes)."""
    assert get_format("e4m3").max == 448.0
    x = np.array([480.0, -480.0], dtype=np.float32)
    assert_same(q(x, "e4m3"), np.array([448.0, -448.0], np.float32), x, "default")
    assert_same(q(x, "e4m3"), saturated_e4m3fn(x), x, "saturating ml_dtypes reference")
    if torch_saturates_e4m3fn():  # torch < 2.12 gives NaN: see test_e4m3fn_default_saturates_on_every_torch
        assert_same(q(x, "e4m3"), torch_cast(x, "float8_e4m3fn"), x, "torch")
    assert np.all(np.isnan(q(x, "e4m3", saturate=False)))
    assert np.all(np.isnan(ml_cast(x, "float8_e4m3fn")))


def test_seed_defect_subnormal_carry_e4m3fn() -> None:
    """Seed defect "a subnormal that should round up into the smallest normal was clamped": for float8_e4m3fn the
    largest subnormal is 0.875 * 2**-6 = 7 * 2**-9; inputs at or above the tie 7.5 * 2**-9 (7 is odd, so the tie goes
    up) give 2**-6, checked against ml_dtypes; just below the tie gives 7 * 2**-9."""
    up = np.array([7.5, 7.51, 7.75, 7.99], dtype=np.float64) * 2.0**-9  # 7.75 * 2**-9 == 2**-6 - 2**-11
    x = np.concatenate([up, -up]).astype(np.float32)
    expected = np.where(x > 0, 2.0**-6, -(2.0**-6)).astype(np.float32)
    assert_same(ml_cast(x, "float8_e4m3fn"), expected, x, "ml_dtypes")
    assert_same(q(x, "e4m3"), expected, x, "ours")
    below = np.array([7.49 * 2.0**-9], dtype=np.float32)
    assert q(below, "e4m3")[0] == np.float32(7 * 2.0**-9) == ml_cast(below, "float8_e4m3fn")[0]


def test_seed_defect_subnormal_carry_bfloat16() -> None:
    """The same carry for bfloat16 from float32 denormals: the largest subnormal is 127 * 2**-133; inputs at or above
    127.5 * 2**-133 give 2**-126, as torch's float32 -> bfloat16 cast does."""
    k = np.array([127.5, 127.75, 127.999], dtype=np.float64)
    x = np.concatenate([k, -k]) * 2.0**-133
    x = x.astype(np.float32)
    expected = np.where(x > 0, 2.0**-126, -(2.0**-126)).astype(np.float32)
    assert_same(torch_cast(x, "bfloat16"), expected, x, "torch")
    assert_same(q(x, "bf16"), expected, x, "ours")
    below = np.array([127.25 * 2.0**-133], dtype=np.float32)
    assert q(below, "bf16")[0] == np.float32(127 * 2.0**-133) == torch_cast(below, "bfloat16")[0]


@pytest.mark.parametrize("name", [n for n in ML_NAMES if n != E8M0])
def test_subnormal_carry_into_smallest_normal_every_preset(name: str) -> None:
    """For every preset: just above the tie between the largest subnormal and the smallest normal gives the smallest
    normal (ml_dtypes reference and the finfo value)."""
    fi = finfo(ML_DTYPES[name])
    normal = float(fi.smallest_normal)
    largest_sub = normal - float(fi.smallest_subnormal)
    x = np.array([largest_sub + 0.51 * (normal - largest_sub)], dtype=np.float32)
    assert q(x, name)[0] == np.float32(normal) == ml_cast(x, name)[0]


# --- 12. code_index ---------------------------------------------------------------------------------------------------

CODE_INDEX_NAMES = [n for n in ML_NAMES if finfo(ML_DTYPES[n]).bits <= 8] + ["e0m7", "bfloat16", "float16"]


@pytest.mark.parametrize("name", CODE_INDEX_NAMES)
def test_code_index_counts_grid_steps(name: str) -> None:
    """Over all finite values in ascending order, code_index rises by exactly 1 per value, is 0 at +0 and -0, and for
    random pairs |code_index(a) - code_index(b)| is the number of grid values in (min(a, b), max(a, b)]."""
    grid = grid_of(name)
    idx = code_index(torch.from_numpy(grid.astype(np.float32)), name).numpy()
    assert idx.dtype == np.float64
    assert np.all(np.diff(idx) == 1)
    if (grid == 0).any():
        assert np.array_equal(idx, np.arange(grid.size) - np.flatnonzero(grid == 0)[0])
        assert np.all(code_index(torch.tensor([0.0, -0.0]), name).numpy() == 0)
    rng = np.random.default_rng(42)
    a, b = rng.choice(grid, 2000), rng.choice(grid, 2000)
    ia = code_index(torch.from_numpy(a.astype(np.float32)), name).numpy()
    ib = code_index(torch.from_numpy(b.astype(np.float32)), name).numpy()
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    between = np.searchsorted(grid, hi, side="right") - np.searchsorted(grid, lo, side="right")
    assert np.array_equal(np.abs(ia - ib), between)


@pytest.mark.parametrize("name", [n for n in CODE_INDEX_NAMES if n not in (E8M0, "e0m7")])
def test_code_index_of_off_grid_values(name: str) -> None:
    """An off-grid in-range value has the index of its ml_dtypes rounding's position in the sorted grid; beyond max
    it saturates to max's index; NaN stays NaN."""
    grid = grid_of(name)
    x = preset_sweep(name)
    ref = ml_cast(x, name).astype(np.float64)
    expected = np.searchsorted(grid, ref) - np.flatnonzero(grid == 0)[0]
    assert np.array_equal(code_index(torch.from_numpy(x.copy()), name).numpy(), expected)
    over = preset_overflow_points(name)
    top = grid.size - 1 - np.flatnonzero(grid == 0)[0]
    assert np.array_equal(code_index(torch.from_numpy(over), name).numpy(), np.where(over > 0, top, -top))
    assert np.isnan(code_index(torch.tensor([float("nan")]), name).numpy()).all()


@pytest.mark.parametrize("key", sorted(USER_FORMATS))
def test_code_index_user_formats(key: str) -> None:
    """For the seed family and the custom formats, code_index numbers gfloat's grid 0, ±1, ±2, ... from zero."""
    grid = gfloat_grid(gfloat_format_info(USER_FORMATS[key]))
    idx = code_index(torch.from_numpy(grid.astype(np.float32)), USER_FORMATS[key]).numpy()
    assert np.array_equal(idx, np.arange(grid.size) - np.flatnonzero(grid == 0)[0])


def test_code_index_with_scale() -> None:
    """With scale, the index is that of x / scale on the unscaled grid."""
    grid = grid_of("float8_e4m3fn")
    x = (grid * 2.0**-12).astype(np.float32)
    idx = code_index(torch.from_numpy(x), "e4m3", scale=2.0**-12).numpy()
    assert np.array_equal(idx, np.arange(grid.size) - np.flatnonzero(grid == 0)[0])


# --- 13. torch.compile ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quantize_under_torch_compile() -> None:
    """torch.compile(lambda x: quantize(x, "e4m3")) gives the eager result bit for bit on CPU (sweep, overflow, NaN)."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++")):
        pytest.skip("torch.compile's CPU backend needs a C/C++ compiler and none is on PATH")
    x = np.concatenate([preset_sweep("float8_e4m3fn"), preset_overflow_points("float8_e4m3fn"), [np.nan]]).astype(
        np.float32
    )
    xt = torch.from_numpy(x.copy())
    compiled = torch.compile(lambda t: quantize(t, "e4m3"))
    assert_same(compiled(xt).numpy(), quantize(xt, "e4m3").numpy(), x, "compiled vs eager")
    assert_same(compiled(xt).numpy(), saturated_e4m3fn(x), x, "compiled vs saturating ml_dtypes reference")
    if torch_saturates_e4m3fn():  # torch < 2.12 casts overflow to NaN
        assert_same(compiled(xt).numpy(), torch_cast(x, "float8_e4m3fn"), x, "compiled vs torch cast")


# --- the fast path of quantize (nearest, no scale) -------------------------------------------------------------------


@pytest.mark.parametrize("sat", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"])
def test_reference_arithmetic_matches_ml_dtypes_where_quantize_casts(name: str, sat: bool) -> None:
    """On CPU, quantize(x, fmt) for formats that are torch dtypes goes through torch's cast (after a check against
    the reference arithmetic, see ``quantize._fast_nearest``); the reference arithmetic itself, which the diagnostics
    use, is held to ml_dtypes here on the same sweep."""
    from altgrad_lightning.quantize import Rounding, quantize_scaled

    x = preset_sweep(name).astype(np.float32)
    fmt = get_format(name)
    ref = quantize_scaled(torch.from_numpy(x), fmt, None, Rounding.NEAREST, sat).to(torch.float32).numpy()
    expected = ml_cast(x, name)
    if sat:
        expected = np.where(np.isnan(x), x, np.clip(expected, -fmt.max, fmt.max))
        expected = np.where(np.isinf(x), np.sign(x) * fmt.max, expected)
        expected = np.where(np.abs(x) > fmt.max, np.sign(x) * fmt.max, expected)
    keep = np.isnan(x) | (np.abs(x) <= fmt.max) | sat  # unsaturated overflow: ml_dtypes' own rule, tested above
    assert_same(ref[keep], expected[keep], x[keep], f"{name} reference arithmetic vs ml_dtypes")
    assert_same(q(x, name, saturate=sat)[keep], ref[keep], x[keep], f"{name} quantize vs reference arithmetic")


def test_a_cast_that_disagrees_with_the_reference_is_not_used(monkeypatch) -> None:
    """The cast is checked against the reference arithmetic before use: a cast that rounds wrongly (here: toward
    zero instead of to nearest) is refused and quantize keeps the exact result."""
    import importlib

    qmod = importlib.import_module("altgrad_lightning.quantize")  # the module (the package exports the function)
    monkeypatch.setattr(qmod, "_native_modes", {})
    monkeypatch.setattr(qmod, "_native_cast", lambda x, fmt, mode: qmod.quantize_scaled(x, fmt, None, "toward_zero"))
    x = torch.tensor([1.1, -3.4, 410.0])
    out = quantize(x, "float8_e4m3fn")
    assert out.tolist() == [1.125, -3.5, 416.0]  # toward zero: 1.0, -3.25, 384
    assert qmod._native_modes[("cpu", torch.float32, "float8_e4m3fn", True)] is None
