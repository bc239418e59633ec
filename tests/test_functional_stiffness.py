"""compute_stiffness_field and gradient_stiffness_correlation against numpy references (SPEC §3.1-3.2)."""

from __future__ import annotations

import functools
import math
import zlib

import ml_dtypes
import numpy as np
import pytest
import torch
from functional_reference import (
    BOUNDARY_FLOATS,
    ML_NAMES,
    TORCH_TO_NP,
    assert_scalar,
    exponent_range,
    fmt_max,
    frac,
    from_numpy,
    spanning_values,
    to_numpy,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from altgrad_lightning import get_format
from altgrad_lightning.functional import compute_stiffness_field, gradient_stiffness_correlation
from altgrad_lightning.functional._reduce import merge
from altgrad_lightning.functional.stiffness import _gradient_stiffness_compute, _gradient_stiffness_update

# Every preset with a numpy/ml_dtypes finfo to take the exponent range from.
FINFO_NAMES = (*ML_NAMES, "float16", "float32", "float64")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
GRAD_KEYS = (
    "grad_below_stiffness_frac",
    "grad_stiff_ratio_mean",
    "grad_stiff_correlation",
    "zero_weight_frac",
    "grad_nonfinite_frac",
)
# A non-power-of-two scale that float32 holds exactly, so the scale the code receives is the scale we use.
SCALE_NP2 = float(np.float32(0.1))
SCALES = (None, 2.0**-4, SCALE_NP2, 3.0)


def ref_stiffness(w: np.ndarray, name: str, scale: float | None = None) -> np.ndarray:
    """S = scale * 2**(clamp(e, emin, max(emin, emax)) - M), e = frexp exponent - 1 of |w| / scale; NaN for 0/NaN/inf.

    E0M7 is the constant 2**-7 (times scale), from the specification, not from a finfo.
    """
    s = 1.0 if scale is None else scale
    a = np.abs(w) / s
    undefined = (a == 0) | ~np.isfinite(a)
    if name == "e0m7":
        out = np.full(w.shape, 2.0**-7)
    else:
        emin, emax, nmant = exponent_range(name)
        e = np.frexp(np.where(undefined, 1.0, a))[1] - 1
        out = np.ldexp(1.0, np.clip(e, emin, max(emin, emax)) - nmant)
    return np.where(undefined, np.nan, out * s)


def expected_out_dtype(w_dtype: torch.dtype, name: str) -> torch.dtype:
    """The documented output dtype: float32 unless the weights are float64 or the format is wider than float32."""
    return torch.float64 if w_dtype == torch.float64 or name == "float64" else torch.float32


def specials(name: str, dtype: torch.dtype) -> np.ndarray:
    """Boundary weights of format ``name`` that ``dtype`` holds: max, smallest normal/subnormal, powers of two and
    their lower neighbours in ``dtype``, zeros, NaN and infinities."""
    emin, emax, nmant = exponent_range(name)
    np_dtype = TORCH_TO_NP[dtype]
    pows = np.array([2.0**emin, 2.0 ** (emin - nmant), 2.0 ** max(emin, emax), 1.0, 2.0, 0.5], dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):
        held = pows.astype(np_dtype)
        below = np.nextafter(held, np.zeros_like(held))
    v = np.concatenate(
        [
            [fmt_max(name), -fmt_max(name), 0.0, -0.0, np.nan, np.inf, -np.inf],
            held.astype(np.float64),
            below.astype(np.float64),
            -held.astype(np.float64),
        ]
    )
    return to_numpy(from_numpy(v, dtype))


@functools.cache
def stiffness_data(name: str, dtype: torch.dtype) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{name}{dtype}".encode()))
    return np.concatenate([spanning_values(rng, name, 600, dtype), specials(name, dtype)])


def assert_same_field(got: torch.Tensor, expected: np.ndarray) -> None:
    """Equal element-wise, NaN where the reference is NaN; the reference rounded once to the output dtype."""
    if got.dtype == torch.float32:
        expected = expected.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(to_numpy(got), expected)


# --- 3.1 stiffness field -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FINFO_NAMES)
def test_stiffness_field_matches_frexp_reference(name: str, dtype: torch.dtype) -> None:
    """S_F(w) = 2**(clamp(floor(log2|w|), emin, emax) - M) for weights spanning the format's underflow, subnormal,
    normal and overflow ranges, both signs and the binade edges, for every input dtype; 0, NaN and ±inf give NaN."""
    w = stiffness_data(name, dtype)
    got = compute_stiffness_field(from_numpy(w, dtype), name)
    assert got.dtype == expected_out_dtype(dtype, name)
    assert got.shape == (w.size,)
    assert_same_field(got, ref_stiffness(w, name))


@pytest.mark.parametrize("scale", SCALES[1:], ids=["pow2", "0.1", "3"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name", FINFO_NAMES)
def test_stiffness_field_scaled(name: str, dtype: torch.dtype, scale: float) -> None:
    """With ``scale``, S = scale * S_F(w / scale), for power-of-two and non-power-of-two scales alike."""
    rng = np.random.default_rng(7)
    with np.errstate(over="ignore"):
        w = to_numpy(
            from_numpy(np.concatenate([spanning_values(rng, name, 400, dtype), specials(name, dtype)]) * scale, dtype)
        )
    got = compute_stiffness_field(from_numpy(w, dtype), name, scale=scale)
    assert_same_field(got, ref_stiffness(w, name, scale))


def test_stiffness_scaled_quotient_beyond_float32() -> None:
    """A finite float32 weight whose quotient by a small scale exceeds float32 still has a stiffness: the top binade's
    spacing times scale (S = scale * S_F(w / scale), and w / scale = 2**131 is a finite number). The result keeps the
    documented dtype (float32), for a float and a tensor scale."""
    for scale in (2.0**-4, torch.tensor(2.0**-4)):
        got = compute_stiffness_field(torch.tensor([2.0**127, -(2.0**-149)]), "float8_e8m0fnu", scale=scale)
        assert got.dtype == torch.float32
        assert got.tolist() == [2.0**-4 * 2.0**127, 2.0**-4 * 2.0**-127]
    # scale * S_F below float32's smallest subnormal: the float32 field rounds it once (to 0 here, as documented);
    # gradient_stiffness_correlation uses the float64 value (test_gradient_stats_scaled_range_corner).
    got = compute_stiffness_field(torch.tensor([1e-44]), "float32", scale=0.375)
    assert got.item() == float(np.float32(0.375 * 2.0**-149)) == 0.0


def test_stiffness_field_tensor_scale_broadcasts() -> None:
    """A per-row scale tensor applies to its row: S[i, j] = scale[i] * S_F(w[i, j] / scale[i])."""
    rng = np.random.default_rng(3)
    w = to_numpy(from_numpy(rng.standard_normal((4, 50)) * 10, torch.float32))
    scales = np.array([[2.0**-3], [1.0], [SCALE_NP2], [24.0]])
    got = compute_stiffness_field(from_numpy(w, torch.float32), "e4m3", scale=from_numpy(scales, torch.float32))
    expected = np.stack([ref_stiffness(w[i], "float8_e4m3fn", float(scales[i, 0])) for i in range(4)])
    assert_same_field(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stiffness_bfloat16_is_not_fixed_point(dtype: torch.dtype) -> None:
    """bfloat16 has M = 7 like E0M7, but its spacing is 2**(e - 7) (the seed special-cased M = 7 to 1/128)."""
    w = np.array([1.0, 0.5, 3.0, 1000.0, -(2.0**-20), 2.0**-126, 2.0**-130])
    w = to_numpy(from_numpy(w, dtype))
    got = to_numpy(compute_stiffness_field(from_numpy(w, dtype), "bfloat16"))
    emin = int(ml_dtypes.finfo(ml_dtypes.bfloat16).minexp)
    expected = [2.0 ** (max(math.frexp(abs(x))[1] - 1, emin) - 7) if x else math.nan for x in w]
    np.testing.assert_array_equal(got, expected)
    assert got[3] == 4.0 and got[0] == 2.0**-7 and got[1] == 2.0**-8  # not the constant 1/128


@pytest.mark.parametrize("scale", (None, 2.0**-4, SCALE_NP2))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stiffness_e0m7_is_constant(dtype: torch.dtype, scale: float | None) -> None:
    """Fixed point E0M7: S = 1/128 (times scale) at every nonzero finite weight, in or out of range; NaN at 0."""
    rng = np.random.default_rng(11)
    w = to_numpy(from_numpy(np.concatenate([rng.standard_normal(300) * 4, [2.0**-12, 0.5, 0.0]]), dtype))
    got = to_numpy(compute_stiffness_field(from_numpy(w, dtype), "e0m7", scale=scale))
    s = 1.0 if scale is None else scale  # float32-exact, so s / 128 is the exact product the code forms
    expected = np.where(w == 0, np.nan, s / 128)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", FINFO_NAMES)
def test_stiffness_normal_range_is_seed_formula(name: str) -> None:
    """Inside the normal range the field is the seed's S = 2**(floor(log2|w|) - M), computed with math.log2."""
    emin, emax, nmant = exponent_range(name)
    rng = np.random.default_rng(5)
    lo, hi = max(emin, -1020), min(emax, 1020)
    w = np.ldexp(rng.uniform(1.01, 1.99, 300), rng.integers(lo, hi + 1, 300)) * rng.choice([-1.0, 1.0], 300)
    w = np.concatenate([w, np.ldexp(1.0, np.arange(lo, hi + 1))])  # every binade's bottom, exactly
    w = w[(np.abs(w) >= 2.0**emin) & (np.abs(w) <= fmt_max(name))]
    dtype = torch.float64
    got = to_numpy(compute_stiffness_field(from_numpy(w, dtype), name))
    seed = np.array([2.0 ** (math.floor(math.log2(abs(x))) - nmant) for x in w])
    np.testing.assert_array_equal(got, seed)


@pytest.mark.parametrize("name", ("e4m3", "bf16", "e0m7", "float8_e8m0fnu"))
def test_stiffness_undefined_is_nan(name: str) -> None:
    """Zero (either sign), NaN and ±inf weights have no stiffness: NaN, never 0 or a spacing."""
    w = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf")])
    assert torch.isnan(compute_stiffness_field(w, name)).all()
    assert torch.isnan(compute_stiffness_field(w, name, scale=0.5)).all()


# --- 3.2 gradient vs stiffness -------------------------------------------------------------------------------------


def ref_grad_stats(w: np.ndarray, g: np.ndarray, name: str, scale: float | None = None) -> dict[str, float]:
    """numpy version of SPEC §3.2 over valid elements (w != 0, w and g finite)."""
    nonfinite = ~np.isfinite(w) | ~np.isfinite(g)
    zero = (w == 0) & ~nonfinite
    valid = ~nonfinite & ~zero
    x, s = np.abs(g[valid]), ref_stiffness(w[valid], name, scale)
    n = int(valid.sum())
    if n >= 2 and np.std(x) > 0 and np.std(s) > 0:
        corr = float(np.corrcoef(x, s)[0, 1])
    else:
        corr = 0.0
    return {
        "grad_below_stiffness_frac": frac(x < s),
        "grad_stiff_ratio_mean": float(np.mean(x / s)) if n else 0.0,
        "grad_stiff_correlation": corr,
        "zero_weight_frac": frac(zero),
        "grad_nonfinite_frac": frac(nonfinite),
    }


def assert_grad_stats(got: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(got) == set(GRAD_KEYS)
    for key in ("grad_below_stiffness_frac", "zero_weight_frac", "grad_nonfinite_frac"):
        assert_scalar(got[key], expected[key], key=key)
    assert_scalar(got["grad_stiff_ratio_mean"], expected["grad_stiff_ratio_mean"], rtol=1e-12, key="ratio_mean")
    assert_scalar(got["grad_stiff_correlation"], expected["grad_stiff_correlation"], atol=1e-9, key="correlation")


def grad_data(
    name: str, dtype: torch.dtype, seed: int, n: int = 800, scale: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Weights spanning the format (times ``scale``); gradients log-uniform around the local spacing (so |g| < S is
    a coin flip), correlated with |w|; zeros, NaN and ±inf sprinkled into both.

    With a scale, w / scale stays within 2**±100 (the corners past float32's range are tested on their own below).
    """
    rng = np.random.default_rng(seed)
    if scale is None:
        w = spanning_values(rng, name, n, dtype)
    else:
        w = to_numpy(from_numpy(spanning_values(rng, name, n, dtype, exp_clip=(-100, 100)) * scale, dtype))
    g = np.abs(w) * 2.0 ** rng.uniform(-12, 2, n) * rng.choice([-1.0, 1.0], n)
    g = to_numpy(from_numpy(g, dtype))
    for arr, values in ((w, (0.0, -0.0, np.nan, np.inf)), (g, (0.0, np.nan, -np.inf))):
        idx = rng.choice(n, size=12 * len(values), replace=False)
        arr[idx] = np.repeat(values, 12)
    return w, g


@pytest.mark.parametrize("scale", (None, 2.0**-4, SCALE_NP2), ids=["none", "pow2", "0.1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ("float8_e4m3fn", "float8_e5m2", "bfloat16", "float16", "float6_e2m3fn", "e0m7"))
def test_gradient_stiffness_matches_numpy(name: str, dtype: torch.dtype, scale: float | None) -> None:
    """below-frac (strict <), ratio mean, Pearson (np.corrcoef; 0.0 for E0M7's constant S) and the excluded
    fractions equal numpy, with zeros, NaN and inf sprinkled into w and g (never NaN in the output)."""
    w, g = grad_data(name, dtype, seed=zlib.crc32(f"{name}{dtype}".encode()), scale=scale)
    expected = ref_grad_stats(w, g, name, scale)
    assert 0.02 < expected["grad_below_stiffness_frac"] < 0.98  # the data exercises both sides
    got = gradient_stiffness_correlation(from_numpy(w, dtype), from_numpy(g, dtype), name, scale=scale)
    assert_grad_stats(got, expected)


def test_gradient_below_stiffness_is_strict() -> None:
    """|g| == S is not below the stiffness; the next smaller float32 gradient is (and the sign of g is ignored)."""
    w = torch.tensor([1.0, 1.0, 1.0, -3.0])  # e4m3: S = 1/8, 1/8, 1/8, 1/4
    g = torch.tensor([0.125, float(np.nextafter(np.float32(0.125), np.float32(0))), -0.125, -0.25])
    got = gradient_stiffness_correlation(w, g, "e4m3")
    assert_scalar(got["grad_below_stiffness_frac"], 0.25)
    assert_scalar(got["grad_stiff_ratio_mean"], float(np.mean([1.0, float(g[1]) * 8, 1.0, 1.0])), rtol=1e-15)


@pytest.mark.parametrize(
    ("w", "g"),
    [
        ([1.0], [0.5]),  # one valid element
        ([1.0, 1.5, 1.25, 1.75], [0.1, 0.2, 0.3, 0.4]),  # one binade: S constant
        ([1.0, 4.0, 16.0, 0.25], [0.1] * 4),  # g constant, not a power of two
        ([0.0, float("nan"), 2.0, 0.0], [1.0, 1.0, 1.0, float("inf")]),  # one valid among excluded
        ([], []),  # nothing at all
    ],
    ids=["one", "constant-S", "constant-g", "one-valid", "empty"],
)
def test_gradient_correlation_undefined_is_zero(w: list[float], g: list[float]) -> None:
    """Pearson is reported as 0.0 (not NaN) with fewer than two valid elements or a constant side; every other
    statistic is finite and equal to numpy."""
    wn, gn = np.array(w, dtype=np.float64), np.array(g, dtype=np.float64)
    got = gradient_stiffness_correlation(from_numpy(wn, torch.float32), from_numpy(gn, torch.float32), "e4m3")
    gn32 = to_numpy(from_numpy(gn, torch.float32))
    expected = ref_grad_stats(wn, gn32, "float8_e4m3fn")
    assert expected["grad_stiff_correlation"] == 0.0
    assert_grad_stats(got, expected)


def test_gradient_zero_weights_counted_apart() -> None:
    """Zero weights leave the denominators and are reported as zero_weight_frac; an all-zero tensor gives 0.0
    statistics and zero_weight_frac 1.0, never NaN."""
    got = gradient_stiffness_correlation(torch.zeros(8), torch.ones(8), "e4m3")
    assert {k: v.item() for k, v in got.items()} == {k: (1.0 if k == "zero_weight_frac" else 0.0) for k in GRAD_KEYS}
    w = torch.tensor([0.0, 0.0, 1.0, 2.0])
    g = torch.tensor([1.0, 1.0, 0.0625, 1.0])  # the zero weights' large gradients must not count as "not below"
    got = gradient_stiffness_correlation(w, g, "e4m3")
    assert_scalar(got["grad_below_stiffness_frac"], 0.5)
    assert_scalar(got["zero_weight_frac"], 0.5)


def test_gradient_nonfinite_both_sides_counted_once() -> None:
    """An element with NaN weight and inf gradient is one nonfinite element; a zero weight with a NaN gradient is
    nonfinite, not a zero weight (the two excluded sets do not overlap)."""
    w = torch.tensor([float("nan"), 0.0, 1.0, 1.0])
    g = torch.tensor([float("inf"), float("nan"), 1.0, 0.0])
    got = gradient_stiffness_correlation(w, g, "e4m3")
    assert_scalar(got["grad_nonfinite_frac"], 0.5)
    assert_scalar(got["zero_weight_frac"], 0.0)
    assert_scalar(got["grad_below_stiffness_frac"], 0.5)


@pytest.mark.parametrize(
    ("w", "name", "scale"),
    [(2.0e38, "bfloat16", SCALE_NP2), (1e-44, "float32", 0.375), (2.0**127, "float8_e8m0fnu", 2.0**-4)],
    ids=["quotient-overflows", "spacing-underflows", "e8m0-top"],
)
def test_gradient_stats_scaled_range_corner(w: float, name: str, scale: float) -> None:
    """A finite nonzero float32 weight has a finite positive S = scale * S_F(w / scale), so the ratio mean stays
    finite and equals numpy's float64 formula, even where w / scale or scale * S leaves float32's range (in float32
    w / scale -> inf gave S = NaN and scale * 2**-149 -> 0 gave 0/0: ratio_mean was NaN)."""
    wn, gn = np.array([w, 1.0]), np.array([1.0, 1.0])
    got = gradient_stiffness_correlation(
        from_numpy(wn, torch.float32), from_numpy(gn, torch.float32), name, scale=scale
    )
    expected = ref_grad_stats(to_numpy(from_numpy(wn, torch.float32)), gn, name, scale)
    assert math.isfinite(expected["grad_stiff_ratio_mean"])
    assert_scalar(got["grad_stiff_ratio_mean"], expected["grad_stiff_ratio_mean"], rtol=1e-12)


# --- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", (None, SCALE_NP2))
@pytest.mark.parametrize("name", ("float8_e4m3fn", "bfloat16", "e0m7"))
def test_gradient_stiffness_sums_merge(name: str, scale: float | None) -> None:
    """_update on uneven chunks (one empty, one all-NaN), merged, then _compute, equals the public function on the
    concatenation: counts and fractions exactly, float sums to rtol 1e-12."""
    w, g = grad_data(name, torch.float32, seed=1, scale=scale)
    wt, gt = from_numpy(w, torch.float32), from_numpy(g, torch.float32)
    fmt = get_format(name)
    scale_t = None if scale is None else torch.tensor(scale, dtype=torch.float32)
    nan = torch.full((5,), float("nan"))
    chunks = [(wt[:0], gt[:0]), (wt[:1], gt[:1]), (nan, nan), (wt[1:300], gt[1:300]), (wt[300:], gt[300:])]
    sums = functools.reduce(merge, [_gradient_stiffness_update(a, b, fmt, scale_t) for a, b in chunks])
    got = _gradient_stiffness_compute(sums)
    whole = gradient_stiffness_correlation(
        torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]), name, scale=scale
    )
    assert set(got) == set(whole)
    for key in GRAD_KEYS:
        if key.endswith("_frac"):
            assert got[key].item() == whole[key].item(), key
        else:
            assert math.isclose(got[key].item(), whole[key].item(), rel_tol=1e-12, abs_tol=1e-12), key
    # and the merged result is the numpy reference on the concatenated data
    expected = ref_grad_stats(
        np.concatenate([w, np.full(5, np.nan)]), np.concatenate([g, np.full(5, np.nan)]), name, scale
    )
    assert_scalar(got["grad_nonfinite_frac"], expected["grad_nonfinite_frac"])
    assert_scalar(got["grad_below_stiffness_frac"], expected["grad_below_stiffness_frac"])


# --- properties ----------------------------------------------------------------------------------------------------

_F32 = st.one_of(st.floats(width=32), st.sampled_from(BOUNDARY_FLOATS))
_PRESETS = st.sampled_from([*ML_NAMES, "float16", "float32", "float64", "e0m7", "e3m4", "e1m6"])


@settings(max_examples=200, deadline=None)
@given(data=st.lists(st.tuples(_F32, _F32), max_size=40), name=_PRESETS, scale=st.sampled_from([None, 2.0**-8, 0.3]))
def test_property_adversarial_float32(data: list[tuple[float, float]], name: str, scale: float | None) -> None:
    """On any float32 values (NaN, ±inf, -0, subnormals, format boundaries): no exception; every fraction is finite
    in [0, 1], the correlation in [-1, 1], the ratio mean finite and >= 0; the field is NaN or a positive power of two
    (times scale)."""
    w = torch.tensor([a for a, _ in data], dtype=torch.float32)
    g = torch.tensor([b for _, b in data], dtype=torch.float32)
    s = compute_stiffness_field(w, name, scale=scale)
    assert s.shape == w.shape
    undefined = (w == 0) | ~torch.isfinite(w)
    assert torch.isnan(s[undefined]).all()
    if scale is None:  # unscaled: a positive power of two at every nonzero finite weight
        mant = np.frexp(s[~undefined].to(torch.float64).numpy())[0]
        assert (mant == 0.5).all()
    stats = gradient_stiffness_correlation(w, g, name, scale=scale)
    for key, value in stats.items():
        if key.endswith("_frac"):
            assert 0.0 <= value.item() <= 1.0, key  # finite too: NaN fails the comparison
    assert -1.0 <= stats["grad_stiff_correlation"].item() <= 1.0
    if scale is None:  # scaled: see test_gradient_stats_scaled_range_corner
        assert 0.0 <= stats["grad_stiff_ratio_mean"].item() < math.inf
