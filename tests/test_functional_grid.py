"""grid_alignment_error / grid_alignment_statistics against ml_dtypes casts and numpy (SPEC §3.3)."""

from __future__ import annotations

import functools
import math
import shutil
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch
from functional_reference import (
    BOUNDARY_FLOATS,
    ENUMERABLE,
    ML_NAMES,
    assert_scalar,
    cast_saturating,
    code_table,
    fmt_max,
    frac,
    from_numpy,
    nearest_code,
    round_ref,
    spanning_values,
    to_numpy,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from altgrad_lightning import get_format, quantize
from altgrad_lightning.functional import (
    compute_grid_steps,
    compute_stiffness_field,
    flip_statistics,
    gradient_stiffness_correlation,
    grid_alignment_error,
    grid_alignment_statistics,
)
from altgrad_lightning.functional._reduce import merge
from altgrad_lightning.functional.grid import _grid_alignment_compute, _grid_alignment_update

NAMES = (*ENUMERABLE, "e0m7")
GRID_KEYS = (
    "grid_error_mean",
    "grid_error_max",
    "grid_error_std",
    "on_grid_frac",
    "overflow_frac",
    "underflow_frac",
    "grid_nonfinite_frac",
    "unrepresentable_frac",
)
EXACT_KEYS = tuple(k for k in GRID_KEYS if k.endswith("_frac")) + ("grid_error_max",)
SCALE_NP2 = float(np.float32(0.1))  # float32-exact: the scale the code holds is the scale the reference uses


def ref_grid(w: np.ndarray, name: str, w_dtype: torch.dtype, scale: float | None = None):
    """``(q, err, w / scale)``, q = scale * round(w / scale), the saturating nearest-even rounding.

    Unscaled: in the working precision (float32, float64 for float64 weights), rounding by an ml_dtypes/numpy cast
    of float32 weights or the exact nearest-code search for float64 ones (ml_dtypes would round those twice).
    Scaled (the documented float64 arithmetic): the float64 quotient rounded by the exact nearest-code search,
    ``scale * r`` in float64 (exact for float32 scales), then rounded to the working precision and err = |w - q|
    taken there, except past float32's max, where the float64 value and difference stand.
    """
    wp = np.float64 if w_dtype == torch.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        if scale is None:
            quotient = w.astype(wp).astype(np.float64)
            q = round_ref(quotient, name, exact_float32=wp is np.float32).astype(wp)
            err = np.abs(w.astype(wp) - q)
            return q.astype(np.float64), err.astype(np.float64), quotient
        quotient = w / scale
        q64 = scale * nearest_code(quotient, name)
        narrow = q64.astype(wp)
        beyond = np.isinf(narrow) & np.isfinite(q64)
        q = np.where(beyond, q64, narrow.astype(np.float64))
        err = np.where(beyond, np.abs(w - q64), np.abs(w.astype(wp) - narrow).astype(np.float64))
        return q, err, quotient


def ref_grid_stats(w: np.ndarray, name: str, w_dtype: torch.dtype, scale: float | None = None) -> dict[str, float]:
    """SPEC §3.3 in numpy: population std, exact on-grid test, overflow before saturation, underflow to 0."""
    q, err, quotient = ref_grid(w, name, w_dtype, scale)
    finite = np.isfinite(w)
    valid = finite & ~np.isnan(q)
    e = err[valid]
    return {
        "grid_error_mean": float(np.mean(e)) if e.size else 0.0,
        "grid_error_max": float(np.max(e)) if e.size else 0.0,
        "grid_error_std": float(np.std(e, ddof=0)) if e.size else 0.0,
        "on_grid_frac": frac(e == 0),
        "overflow_frac": frac(np.abs(quotient[valid]) > fmt_max(name)),
        "underflow_frac": frac((q[valid] == 0) & (w[valid] != 0)),
        "grid_nonfinite_frac": frac(~finite),
        "unrepresentable_frac": frac(finite & np.isnan(q)),
    }


def assert_grid_stats(got: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(got) == set(GRID_KEYS)
    for key in EXACT_KEYS:
        assert_scalar(got[key], expected[key], key=key)
    assert_scalar(got["grid_error_mean"], expected["grid_error_mean"], rtol=1e-12, key="grid_error_mean")
    # One-pass variance (sums of err and err**2) loses ~sqrt(eps) * mean to cancellation when the spread is small.
    atol = 1e-7 * expected["grid_error_mean"]
    assert_scalar(got["grid_error_std"], expected["grid_error_std"], rtol=1e-9, atol=atol, key="grid_error_std")


def boundary_values(name: str) -> np.ndarray:
    """Every grid value of a small format (all of a <= 8-bit one, a sample of a 16-bit one), the midpoints
    between neighbours (ties), their float32 neighbours (just off the tie), and values past ±max."""
    grid, _ = code_table(name)
    if grid.size > 600:
        grid = np.unique(np.concatenate([grid[:100], grid[-100:], grid[:: grid.size // 300]]))
    mids = (grid[1:] + grid[:-1]) / 2
    m32 = mids.astype(np.float32)
    near = np.concatenate([np.nextafter(m32, np.float32(np.inf)), np.nextafter(m32, np.float32(-np.inf))])
    mx = fmt_max(name)
    past = np.array([mx * 1.01, -mx * 1.01, mx * 3, np.float32(mx) * np.float32(1 + 2**-20)])
    return np.concatenate([grid, mids, near.astype(np.float64), past]).astype(np.float32).astype(np.float64)


@functools.cache
def grid_data(name: str, dtype: torch.dtype) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"grid{name}{dtype}".encode()))
    v = np.concatenate(
        [
            spanning_values(rng, name, 500, dtype),
            to_numpy(from_numpy(boundary_values(name), dtype)),
            [0.0, -0.0, np.nan, np.inf, -np.inf, np.nan],
        ]
    )
    v = to_numpy(from_numpy(v, dtype))
    if name == "float8_e8m0fnu":  # cast_saturating has the libraries' quirk: test_grid_e8m0_float32_subnormals_...
        v = v[~((np.abs(v) > 2.0**-127) & (np.abs(v) < 2.0**-126))]
    return v


def test_reference_rounding_agrees_with_ml_dtypes() -> None:
    """Sanity of the float64 reference: the nearest-code search equals the ml_dtypes cast on float32 values (ties,
    near-ties, saturation), and equals torch's float8_e4m3fn cast (which saturates)."""
    for name in ENUMERABLE:
        x = grid_data(name, torch.float32)
        x = x[~np.isnan(x)]  # formats without NaN: ml_dtypes' cast of NaN is arbitrary, and never used
        np.testing.assert_array_equal(nearest_code(x, name), cast_saturating(x, name), err_msg=name)
    x = grid_data("float8_e4m3fn", torch.float32)
    torch_cast = torch.from_numpy(x).to(torch.float32).to(torch.float8_e4m3fn).to(torch.float64).numpy()
    if torch.tensor([500.0]).to(torch.float8_e4m3fn).float().item() != 448.0:  # torch < 2.12: NaN past 464
        overflow = np.abs(x) >= 464
        assert np.isnan(torch_cast[overflow]).all()
        x, torch_cast = x[~overflow], torch_cast[~overflow]
    np.testing.assert_array_equal(nearest_code(x, "float8_e4m3fn"), torch_cast)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_grid_error_matches_reference(name: str, dtype: torch.dtype) -> None:
    """err = |w - q(w)| element-wise with q the saturating nearest-even rounding, for weights spanning underflow,
    subnormal, normal and overflow ranges, every grid value, every tie and the float32 values either side of it;
    NaN weights (and, for the unsigned e8m0, zero and negative weights) give NaN."""
    w = grid_data(name, dtype)
    got = grid_alignment_error(from_numpy(w, dtype), name)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _, err, _ = ref_grid(w, name, dtype)
    finite = np.isfinite(w)
    np.testing.assert_array_equal(to_numpy(got)[finite], err[finite])
    assert np.isnan(to_numpy(got)[np.isnan(w)]).all()


def test_grid_e8m0_float32_subnormals_round_to_nearest() -> None:
    """Float32 denormal weights in (2**-127, 2**-126) round onto float8_e8m0fnu to the *nearer* power of two (ties
    up), our documented choice (quantize and grid_alignment_error docstrings): 2**-127 below 1.5 * 2**-127, 2**-126
    from the tie up. torch's and ml_dtypes' casts both give 2**-126 for all of them (checked here, so the test
    notices if the libraries change); the reference is exact: |w - p| for the nearer power p in exact rationals."""
    w = np.array([1.25, 1.49999976, 1.5, 1.75], dtype=np.float64) * 2.0**-127
    w = to_numpy(from_numpy(w, torch.float32))
    lo, hi = Fraction(2) ** -127, Fraction(2) ** -126
    nearer = [hi if Fraction(x) - lo >= hi - Fraction(x) else lo for x in w]  # ties (1.5 * 2**-127) go up
    expected = np.array([float(abs(Fraction(x) - p)) for x, p in zip(w, nearer, strict=True)])
    assert [float(p) for p in nearer] == [2.0**-127, 2.0**-127, 2.0**-126, 2.0**-126]
    got = grid_alignment_error(from_numpy(w, torch.float32), "float8_e8m0fnu")
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(to_numpy(got), expected)  # every difference is a float32 value: exact
    np.testing.assert_array_equal(nearest_code(w, "float8_e8m0fnu"), [float(p) for p in nearer])
    # The library difference, documented in the docstrings and the README's known differences.
    torch_cast = torch.from_numpy(w).to(torch.float32).to(torch.float8_e8m0fnu).to(torch.float64).numpy()
    np.testing.assert_array_equal(torch_cast, np.full(4, 2.0**-126))
    np.testing.assert_array_equal(cast_saturating(w, "float8_e8m0fnu"), np.full(4, 2.0**-126))


def test_grid_scaled_value_beyond_float32() -> None:
    """A float32 weight whose nearest scaled grid value lies past float32's max still has a finite error:
    3.3e38 / 8 rounds to 2**125 on e8m0, so q = 2**128 and err = 2**128 - 3.3e38 (exact rationals), std 0."""
    w = float(np.float32(3.3e38))
    exact = float(Fraction(2) ** 128 - Fraction(w))
    got = grid_alignment_statistics(torch.tensor([w]), "float8_e8m0fnu", scale=8.0)
    assert_scalar(got["grid_error_mean"], exact)
    assert_scalar(got["grid_error_max"], exact)
    assert_scalar(got["grid_error_std"], 0.0)
    assert_scalar(got["overflow_frac"], 0.0)  # 3.3e38 / 8 < 2**127 = max: not beyond the scaled range
    err = grid_alignment_error(torch.tensor([w, -1.0]), "float8_e8m0fnu", scale=8.0)
    assert err.dtype == torch.float32 and err[0].item() == float(np.float32(exact)) and torch.isnan(err[1])
    # Through a tensor scale, and with the quotient past float32's max: 2**127 / 2**-4 saturates to 2**127.
    got = grid_alignment_statistics(torch.tensor([w]), "float8_e8m0fnu", scale=torch.tensor(8.0))
    assert_scalar(got["grid_error_mean"], exact)
    got = grid_alignment_statistics(torch.tensor([2.0**127]), "float8_e8m0fnu", scale=2.0**-4)
    assert_scalar(got["grid_error_mean"], 2.0**127 - 2.0**123)
    assert_scalar(got["overflow_frac"], 1.0)


@pytest.mark.parametrize("scale", (0.375, SCALE_NP2, 3.0), ids=["0.375", "0.1", "3"])
def test_grid_scaled_error_is_exact(scale: float) -> None:
    """With a non-power-of-two scale, err = |w - s * round(w / s)| with q rounded to float32 as quantize returns it:
    checked in exact rationals (Fraction) for weights on, between and beyond the scaled grid."""
    rng = np.random.default_rng(11)
    grid, even = code_table("float8_e4m3fn")
    w = np.concatenate([grid * scale, rng.uniform(-500, 500, 300) * scale, [1e30, -1e-30, 0.0]])
    w = to_numpy(from_numpy(w, torch.float32))
    got = to_numpy(grid_alignment_error(from_numpy(w, torch.float32), "float8_e4m3fn", scale=torch.tensor(scale)))
    s = Fraction(scale)
    gf = [Fraction(g) for g in grid]
    expected = []
    for x in w:
        t = Fraction(x) / s
        i = min(range(len(gf)), key=lambda k: (abs(t - gf[k]), not even[k]))  # nearest; ties to the even code
        best = gf[i]
        q = float(np.float32(float(s * best)))  # s * best is a float64 value (48 bits): one rounding to float32
        expected.append(float(np.float32(float(abs(Fraction(x) - Fraction(q))))))
    np.testing.assert_array_equal(got, np.array(expected))


def test_grid_error_infinite_weight_is_nan() -> None:
    """grid_alignment_error's docstring: "NaN and ±inf weights give NaN"."""
    got = grid_alignment_error(torch.tensor([float("inf"), -float("inf")]), "e4m3")
    assert torch.isnan(got).all()


@pytest.mark.parametrize("scale", (None, 2.0**-6, 8.0, SCALE_NP2, 3.0), ids=["none", "2^-6", "8", "0.1", "3"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_grid_statistics_match_numpy(name: str, dtype: torch.dtype, scale: float | None) -> None:
    """mean/max/population std of the error, on_grid (err == 0), overflow (|w| / scale > max, before saturation),
    underflow (w != 0 rounding to 0), nonfinite and unrepresentable fractions equal numpy on the same data."""
    w = grid_data(name, dtype)
    if scale is not None:
        with np.errstate(over="ignore"):
            w = to_numpy(from_numpy(w * scale, dtype))
    expected = ref_grid_stats(w, name, dtype, scale)
    got = grid_alignment_statistics(from_numpy(w, dtype), name, scale=scale)
    assert_grid_stats(got, expected)


def test_grid_statistics_exercise_every_branch() -> None:
    """The shared data set hits on-grid, off-grid, overflow and underflow weights (so the tests above can fail)."""
    expected = ref_grid_stats(grid_data("float8_e4m3fn", torch.float32), "float8_e4m3fn", torch.float32)
    for key in ("on_grid_frac", "overflow_frac", "underflow_frac", "grid_nonfinite_frac"):
        assert 0.0 < expected[key] < 0.6, key


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_grid_std_is_population_std(dtype: torch.dtype) -> None:
    """Population std (ddof=0): 0.0 for one element (the seed's unbiased std gave NaN), np.std for two."""
    one = grid_alignment_statistics(torch.tensor([1.0625], dtype=dtype), "e4m3")
    assert_scalar(one["grid_error_std"], 0.0)
    assert_scalar(one["grid_error_mean"], 0.0625)
    two = grid_alignment_statistics(torch.tensor([1.0, 1.0625], dtype=dtype), "e4m3")
    assert_scalar(two["grid_error_std"], float(np.std([0.0, 0.0625], ddof=0)))  # 0.03125, not 0.0442
    odd = grid_alignment_statistics(torch.tensor([1.0, 1.0625, 1.25, 1.3125, 3.5625], dtype=dtype), "e4m3")
    assert_scalar(odd["grid_error_std"], float(np.std([0, 0.0625, 0, 0.0625, 0.0625])), rtol=1e-12)


def _exact_population_std(errors: list[Fraction]) -> float:
    """Population std of exact rationals, without float overflow: sqrt(var / 2**1200) * 2**600."""
    n = len(errors)
    mean = sum(errors, Fraction(0)) / n
    var = sum(((e - mean) ** 2 for e in errors), Fraction(0)) / n
    return math.sqrt(float(var / Fraction(2) ** 1200)) * 2.0**600


@pytest.mark.parametrize(
    "values",
    [
        [1e200, -3e250, 5e160, 1.0625, 2.0**-20],  # saturated errors whose squares overflow float64
        [1.7e308, 1.7e308, -1.7e308],  # every error near float64's max: the sum of errors stays finite
        [1e155, 1.001e155, 0.999e155],  # a small spread on a huge mean (one-pass variance: rtol ~ eps / spread**2)
        [2.0**600, 0.1],
    ],
    ids=["mixed", "near-max", "small-spread", "one-huge"],
)
def test_grid_std_float64_beyond_1e154_is_finite_and_exact(values: list[float]) -> None:
    """float64 weights beyond 1e154 have errors whose squares overflow float64: grid_error_std stays finite and
    equals the exact (Fraction) population std of the exact errors |w - q| (q from the exact nearest-code search)."""
    w = np.array(values, dtype=np.float64)
    q = nearest_code(w, "float8_e4m3fn")
    errors = [abs(Fraction(x) - Fraction(qx)) for x, qx in zip(w, q, strict=True)]
    got = grid_alignment_statistics(torch.tensor(w), "float8_e4m3fn")
    expected_std = _exact_population_std(errors)
    assert math.isfinite(got["grid_error_std"].item())
    assert_scalar(got["grid_error_std"], expected_std, rtol=1e-6, key="grid_error_std")
    if values[0] != 1.7e308:
        assert_scalar(got["grid_error_mean"], float(sum(errors, Fraction(0)) / len(errors)), rtol=1e-12)


def test_grid_std_float64_huge_errors_merge() -> None:
    """The overflow-safe variance merges like the other sums: one update of huge and small float64 errors split over
    chunks equals the whole, and a chunk of float32 data merged with a float64 one still has a finite std."""
    fmt = get_format("float8_e4m3fn")
    w = torch.tensor([1e200, -3e250, 1.0625, 5e160, 0.3], dtype=torch.float64)
    whole = grid_alignment_statistics(w, fmt)
    got = _grid_alignment_compute(merge(_grid_alignment_update(w[:2], fmt), _grid_alignment_update(w[2:], fmt)))
    assert math.isclose(got["grid_error_std"].item(), whole["grid_error_std"].item(), rel_tol=1e-12)
    mixed = merge(_grid_alignment_update(w, fmt), _grid_alignment_update(torch.tensor([1.0625, 3.0]), fmt))
    all_w = np.array([*w.tolist(), 1.0625, 3.0])
    q = nearest_code(all_w, "float8_e4m3fn")
    expected = _exact_population_std([abs(Fraction(x) - Fraction(qx)) for x, qx in zip(all_w, q, strict=True)])
    assert_scalar(_grid_alignment_compute(mixed)["grid_error_std"], expected, rtol=1e-9)


@pytest.mark.parametrize(
    ("values", "dtype", "on_grid", "underflow"),
    [
        ([1e-12], torch.float32, 0.0, 1.0),  # rounds to 0, 1e-12 away: not on the grid (seed: |err| < 1e-10 was)
        ([0.5 + 1e-12], torch.float64, 0.0, 0.0),  # 1e-12 off a grid value
        ([0.5, 448.0, -(2.0**-9), 0.0], torch.float32, 1.0, 0.0),  # exactly on the grid (0 included)
        ([2.0**-10], torch.float32, 0.0, 1.0),  # the tie below the smallest subnormal rounds to 0 (even)
        ([2.0**-10 * 1.0000001], torch.float32, 0.0, 0.0),  # just above the tie: smallest subnormal
    ],
)
def test_grid_on_grid_is_exact(values: list[float], dtype: torch.dtype, on_grid: float, underflow: float) -> None:
    """on_grid_frac counts err == 0 exactly: a weight 1e-12 from the grid is off it; underflow counts w != 0 that
    rounds to 0."""
    got = grid_alignment_statistics(torch.tensor(values, dtype=dtype), "float8_e4m3fn")
    assert_scalar(got["on_grid_frac"], on_grid)
    assert_scalar(got["underflow_frac"], underflow)


def test_grid_overflow_is_before_saturation() -> None:
    """overflow counts |w| > max before the saturating rounding: 448 is not overflow, 449 (which rounds back to 448)
    and 1e30 are; their errors are those of the clamp (1 and 1e30 - 448 in float32)."""
    w = torch.tensor([448.0, -448.0, 449.0, -1e30])
    got = grid_alignment_statistics(w, "float8_e4m3fn")
    assert_scalar(got["overflow_frac"], 0.5)
    assert_scalar(got["grid_error_max"], float(np.float32(1e30) - np.float32(448)))
    scaled = grid_alignment_statistics(w, "float8_e4m3fn", scale=4.0)  # max becomes 1792
    assert_scalar(scaled["overflow_frac"], 0.25)


def test_grid_nonfinite_and_unrepresentable_are_excluded() -> None:
    """NaN/inf weights leave every denominator but the nonfinite fraction's; for the unsigned e8m0, zero and
    negative weights are unrepresentable, counted apart, never NaN in the output."""
    w = torch.tensor([float("nan"), float("inf"), 1.0, 1.0625])
    got = grid_alignment_statistics(w, "e4m3")
    assert_grid_stats(got, ref_grid_stats(to_numpy(w), "float8_e4m3fn", torch.float32))
    assert_scalar(got["grid_nonfinite_frac"], 0.5)
    assert_scalar(got["on_grid_frac"], 0.5)
    w = torch.tensor([0.0, -1.0, 1.0, 3.0, float("nan")])
    got = grid_alignment_statistics(w, "float8_e8m0fnu")
    assert_grid_stats(got, ref_grid_stats(to_numpy(w), "float8_e8m0fnu", torch.float32))
    assert_scalar(got["unrepresentable_frac"], 0.4)
    assert_scalar(got["grid_error_max"], 1.0)  # 3 rounds up to 4 (e8m0 ties away from zero)
    empty = grid_alignment_statistics(torch.tensor([float("nan")] * 3), "e4m3")
    assert {k: v.item() for k, v in empty.items()} == {k: float(k == "grid_nonfinite_frac") for k in GRID_KEYS}


# --- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", (None, SCALE_NP2))
@pytest.mark.parametrize("name", ("float8_e4m3fn", "float8_e8m0fnu", "bfloat16", "e0m7"))
def test_grid_sums_merge(name: str, scale: float | None) -> None:
    """_update on uneven chunks (one empty, one all-NaN), merged (sum, max for *_max), then _compute, equals the
    public function on the concatenation: fractions and max exactly, mean and std to rtol 1e-12."""
    wt = from_numpy(grid_data(name, torch.float32), torch.float32)
    fmt = get_format(name)
    scale_t = None if scale is None else torch.tensor(scale, dtype=torch.float32)
    nan = torch.full((4,), float("nan"))
    chunks = [wt[:0], wt[:7], nan, wt[7:400], wt[400:]]
    got = _grid_alignment_compute(functools.reduce(merge, [_grid_alignment_update(c, fmt, scale_t) for c in chunks]))
    whole = grid_alignment_statistics(torch.cat(chunks), name, scale=scale)
    assert set(got) == set(whole) == set(GRID_KEYS)
    for key in GRID_KEYS:
        if key in EXACT_KEYS:
            assert got[key].item() == whole[key].item(), key
        else:
            assert math.isclose(got[key].item(), whole[key].item(), rel_tol=1e-12), key


# --- properties ----------------------------------------------------------------------------------------------------

_F32 = st.one_of(st.floats(width=32), st.sampled_from(BOUNDARY_FLOATS))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(_F32, max_size=40),
    name=st.sampled_from([*ML_NAMES, "float16", "float32", "float64", "e0m7", "e1m6", "e7m0"]),
    scale=st.sampled_from([None, 2.0**-8, 0.3, 100.0]),
)
def test_property_adversarial_float32(values: list[float], name: str, scale: float | None) -> None:
    """On any float32 values (NaN, ±inf, -0, subnormals, ties, format boundaries): no exception; every fraction is
    finite in [0, 1]; the element-wise error is >= 0 or NaN; mean, max and std
    are finite, >= 0 and ordered (std <= max, mean <= max)."""
    w = torch.tensor(values, dtype=torch.float32)
    err = grid_alignment_error(w, name, scale=scale)
    assert err.shape == w.shape
    assert not (err < 0).any()
    stats = grid_alignment_statistics(w, name, scale=scale)
    assert set(stats) == set(GRID_KEYS)
    for key, value in stats.items():
        if key.endswith("_frac"):
            assert 0.0 <= value.item() <= 1.0, key  # finite too: NaN fails the comparison
    for key, value in stats.items():
        assert math.isfinite(value.item()) and value.item() >= 0.0, key
    mx = stats["grid_error_max"].item()
    assert stats["grid_error_mean"].item() <= mx * (1 + 1e-12)
    assert stats["grid_error_std"].item() <= mx * (1 + 1e-12)


# --- torch.compile -------------------------------------------------------------------------------------------------


def _all_diagnostics(w: torch.Tensor, after: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {f"grid/{k}": v for k, v in grid_alignment_statistics(w, "e4m3", scale=scale).items()}
    out.update({f"flip/{k}": v for k, v in flip_statistics(w, after, "e4m3", scale=scale).items()})
    out.update({f"stiff/{k}": v for k, v in gradient_stiffness_correlation(w, after, "e4m3", scale=scale).items()})
    out["quantize"] = quantize(w, "e4m3", scale=scale)
    out["stiffness"] = compute_stiffness_field(w, "e4m3", scale=scale)
    out["steps"] = compute_grid_steps(w, after, "e4m3", scale=scale)
    out["error"] = grid_alignment_error(w, "e4m3", scale=scale)
    return out


@pytest.mark.slow
def test_fullgraph_trace_with_cpu_tensor_scale() -> None:
    """Every functional diagnostic traces as one graph (fullgraph=True: a graph break is an error) with a CPU tensor
    scale, and gives the eager result; the eager statistics equal the numpy reference. (Scale validation used to read
    the scale's values with bool(), a data-dependent branch that breaks the graph.) Slow: tracing takes ~8 s."""
    torch._dynamo.reset()
    w = from_numpy(grid_data("float8_e4m3fn", torch.float32)[:200] * SCALE_NP2, torch.float32)
    w = torch.nan_to_num(w, nan=1.0, posinf=2.0, neginf=-2.0)
    after = w * 1.01
    scale = torch.tensor(SCALE_NP2)
    compiled = torch.compile(_all_diagnostics, fullgraph=True, backend="eager")
    got, eager = compiled(w, after, scale), _all_diagnostics(w, after, scale)
    for key, value in eager.items():
        assert torch.equal(got[key].nan_to_num(-7.0), value.nan_to_num(-7.0)), key
    expected = ref_grid_stats(to_numpy(w), "float8_e4m3fn", torch.float32, SCALE_NP2)
    assert_grid_stats({k.removeprefix("grid/"): v for k, v in got.items() if k.startswith("grid/")}, expected)


def test_compiled_invalid_tensor_scale_gives_nan() -> None:
    """Under torch.compile a tensor scale's values are not checked (that would break the graph): a zero, negative or
    non-finite entry makes what it scales NaN, as documented; valid entries are unaffected."""
    torch._dynamo.reset()
    fn = torch.compile(
        lambda w, s: (quantize(w, "e4m3", scale=s), grid_alignment_error(w, "e4m3", scale=s)),
        fullgraph=True,
        backend="eager",
    )
    w = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    scale = torch.tensor([[0.0], [-1.0], [float("inf")], [0.5]])
    q, err = fn(w, scale)
    assert torch.isnan(q[:3]).all() and torch.isnan(err[:3]).all()
    assert q[3].tolist() == [1.0, 2.0] and err[3].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="`scale`"):  # eager, on CPU, the values are checked
        grid_alignment_error(w, "e4m3", scale=scale)


@pytest.mark.slow
def test_inductor_fullgraph_grid_statistics_with_cpu_tensor_scale() -> None:
    """torch.compile(fullgraph=True) with the default (inductor) backend builds and runs grid_alignment_statistics
    with a CPU tensor scale; the result equals the numpy reference. Slow: an inductor build takes several seconds."""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++")):
        pytest.skip("torch.compile's CPU backend needs a C/C++ compiler and none is on PATH")
    torch._dynamo.reset()
    w = grid_data("float8_e4m3fn", torch.float32) * SCALE_NP2
    w = to_numpy(from_numpy(w, torch.float32))
    compiled = torch.compile(lambda t, s: grid_alignment_statistics(t, "e4m3", scale=s), fullgraph=True)
    got = compiled(from_numpy(w, torch.float32), torch.tensor(SCALE_NP2))
    assert_grid_stats(got, ref_grid_stats(w, "float8_e4m3fn", torch.float32, SCALE_NP2))
