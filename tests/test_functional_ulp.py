"""compute_ulp_distance / ulp_statistics against counted np.nextafter steps and Python-int bit arithmetic
(SPEC §3.4)."""

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
    TORCH_TO_NP,
    assert_scalar,
    count_nextafter_steps,
    frac,
    log2_bucket,
    to_numpy,
    ulp_distance_bits,
    value_of_bits,
    width_of,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from altgrad_lightning.functional import compute_ulp_distance, ulp_histogram_edges, ulp_statistics
from altgrad_lightning.functional._reduce import merge
from altgrad_lightning.functional.ulp import ULP_HISTOGRAM_BINS, _ulp_compute, _ulp_update

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT64_MAX = 2**63 - 1
N_BUCKETS = 65  # 0, then [2**k, 2**(k+1)) for k = 0..63
ULP_KEYS = ("ulp_mean", "ulp_median", "ulp_max", "ulp_zero_frac", "ulp_nonfinite_frac", "ulp_histogram")


def as_tensor(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Tensor of ``dtype`` holding exactly ``values`` (already values of that dtype)."""
    t = torch.from_numpy(np.asarray(values, dtype=np.float64).copy()).to(dtype)
    assert np.array_equal(to_numpy(t), np.asarray(values, dtype=np.float64), equal_nan=True)
    return t


def small_move_pairs(dtype: torch.dtype, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Pairs up to ~3000 representable values apart, as numpy arrays of the dtype: random moves in every range
    (subnormal, normal, across binade edges, near max), moves across zero, from and to ±0, +0 vs -0, max to inf."""
    np_dtype = TORCH_TO_NP[dtype]
    fi = ml_dtypes.finfo(np_dtype)
    rng = np.random.default_rng(zlib.crc32(f"ulp{dtype}".encode()))
    one = np_dtype.type(1.0)
    tiny, sub, mx, eps = (float(fi.smallest_normal), float(fi.smallest_subnormal), float(fi.max), float(fi.eps))
    k_max = min(1500, 2 ** int(fi.nmant))  # at most a binade's worth of steps: a move never crosses zero by itself
    exps = rng.integers(int(fi.minexp) - int(fi.nmant), int(fi.maxexp), n)
    before = np.ldexp(rng.uniform(1, 2, n), exps) * rng.choice([-1.0, 1.0], n)
    with np.errstate(over="ignore"):
        before = before.astype(np_dtype)
        spacing = np.abs(np.spacing(before).astype(np.float64))
        after = (before.astype(np.float64) + rng.integers(-k_max, k_max, n) * spacing).astype(np_dtype)
    # 2**e and a few steps below it (the binade under it has half the spacing) -> a few steps above it
    edges = np.ldexp(1.0, rng.integers(int(fi.minexp), int(fi.maxexp) - 1, 40))
    below = (edges * (1 - rng.integers(1, k_max, 40) * eps / 2)).astype(np_dtype)
    above = (edges * (1 + rng.integers(1, k_max, 40) * eps)).astype(np_dtype)
    k, j = rng.integers(0, 800, 30), rng.integers(0, 800, 30)  # -k subnormals -> +j subnormals, and back
    down, up = float(np.nextafter(one, np_dtype.type(0))), float(np.nextafter(one, np_dtype.type(2)))
    pairs = [
        (0.0, -0.0),
        (-0.0, 0.0),
        (0.0, sub),
        (-0.0, sub),
        (0.0, -sub),
        (-sub, 0.0),
        (sub, -sub),
        (-sub, sub),
        (1.0, down),
        (1.0, up),
        (tiny, tiny - sub),
        (-tiny, -(tiny - sub)),
        (mx, np.inf),
        (-mx, -np.inf),
        (mx, float(np.nextafter(np_dtype.type(mx), np_dtype.type(0)))),
    ]
    b = np.concatenate([before, below, -k * sub, k * sub, [p[0] for p in pairs]]).astype(np_dtype)
    a = np.concatenate([after, above, j * sub, -j * sub, [p[1] for p in pairs]]).astype(np_dtype)
    keep = np.isfinite(b.astype(np.float64)) | np.isfinite(a.astype(np.float64))  # inf -> inf is no move
    return b[keep], a[keep]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ulp_distance_counts_nextafter_steps(dtype: torch.dtype) -> None:
    """The distance is the number of np.nextafter steps (ml_dtypes' for bfloat16) from before to after: in every
    range, across binades, across zero (-tiny to +tiny is 2 steps: -0 and +0 are one point), from zero, max to
    inf (1 step); +0 vs -0 is 0."""
    b, a = small_move_pairs(dtype)
    expected = count_nextafter_steps(b, a, limit=4000)
    assert expected.max() > 200 and (expected == 0).any() and (expected == 1).any()
    got = compute_ulp_distance(as_tensor(b, dtype), as_tensor(a, dtype))
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)


def random_bit_pairs(dtype: torch.dtype, n: int = 400, same_sign: bool = False) -> tuple[list[float], list[float]]:
    """Uniformly random non-NaN bit patterns of ``dtype``, paired: mostly huge distances, half across signs
    (``same_sign``: the second of each pair takes the first's sign)."""
    rng = np.random.default_rng(zlib.crc32(f"bits{dtype}{same_sign}".encode()))
    w = width_of(dtype)
    vals: list[float] = []
    while len(vals) < 2 * n:
        v = value_of_bits(int(rng.integers(0, 2**w, dtype=np.uint64)), dtype)
        if not math.isnan(v):
            vals.append(v)
    b, a = vals[:n], vals[n:]
    if same_sign:
        a = [math.copysign(y, x) for x, y in zip(b, a, strict=True)]
    return b, a


# float64 pairs of opposite signs are mostly more than 2**63 apart: there the code wraps instead of saturating.
LARGE_CASES = [
    pytest.param(torch.float32, False, id="float32"),
    pytest.param(torch.bfloat16, False, id="bfloat16"),
    pytest.param(torch.float16, False, id="float16"),
    pytest.param(torch.float64, True, id="float64-same-sign"),
    pytest.param(torch.float64, False, id="float64-any-sign"),
]


@pytest.mark.parametrize(("dtype", "same_sign"), LARGE_CASES)
def test_ulp_distance_large_matches_bit_arithmetic(dtype: torch.dtype, same_sign: bool) -> None:
    """For arbitrary pairs (most far apart, many of opposite sign, ±inf included) the distance is the difference of
    the sign-magnitude positions in Python ints (saturated at 2**63 - 1 only for float64), and it is symmetric."""
    b, a = random_bit_pairs(dtype, same_sign=same_sign)
    expected = [min(ulp_distance_bits(x, y, dtype), INT64_MAX) for x, y in zip(b, a, strict=True)]
    bt, at = as_tensor(np.array(b), dtype), as_tensor(np.array(a), dtype)
    got = compute_ulp_distance(bt, at)
    assert got.tolist() == expected
    assert compute_ulp_distance(at, bt).tolist() == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ulp_distance_seed_defects(dtype: torch.dtype) -> None:
    """One step down from 1.0 is 1 ULP (the seed's upward-only ratio said 0.5); a weight leaving zero moves a finite
    whole number of ULPs (the seed said inf): 0 -> 1.0 is the bit pattern of 1.0."""
    np_dtype = TORCH_TO_NP[dtype]
    down = float(np.nextafter(np_dtype.type(1.0), np_dtype.type(0.0)))
    b = as_tensor(np.array([1.0, 1.0, 0.0, -0.0, 0.0]), dtype)
    a = as_tensor(np.array([down, 1.0, 1.0, 1.0, -1.0]), dtype)
    one = ulp_distance_bits(1.0, 0.0, dtype)
    assert compute_ulp_distance(b, a).tolist() == [1, 0, one, one, one]


def test_ulp_distance_float64_saturates() -> None:
    """float64 distances are exact up to 2**63 - 1 and saturate there: 1.0 vs -1.0 is 2 * 0x3FF0000000000000
    (< 2**63, exact), 2.0 vs -2.0 is exactly 2**63 and max vs -max or inf vs -inf beyond: all 2**63 - 1."""
    b = torch.tensor([1.0, 2.0, np.finfo(np.float64).max, np.inf, -2.0], dtype=torch.float64)
    a = -b
    assert ulp_distance_bits(1.0, -1.0, torch.float64) == 2 * 0x3FF0000000000000 < INT64_MAX
    assert ulp_distance_bits(2.0, -2.0, torch.float64) == 2**63
    assert compute_ulp_distance(b, a).tolist() == [2 * 0x3FF0000000000000] + [INT64_MAX] * 4
    assert compute_ulp_distance(a, b).tolist() == [2 * 0x3FF0000000000000] + [INT64_MAX] * 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ulp_distance_nan_is_minus_one(dtype: torch.dtype) -> None:
    """NaN on either side gives -1 (a distance is never negative); shape is kept (2-D in, 2-D out)."""
    nan, inf = float("nan"), float("inf")
    b = torch.tensor([[nan, 1.0, nan], [inf, 0.0, 2.0]]).to(dtype)
    a = torch.tensor([[1.0, nan, nan], [nan, 0.0, 2.0]]).to(dtype)
    got = compute_ulp_distance(b, a)
    assert got.shape == (2, 3) and got.dtype == torch.int64
    assert got.tolist() == [[-1, -1, -1], [-1, 0, 0]]


# --- statistics ----------------------------------------------------------------------------------------------------


def ref_ulp_stats(b: list[float], a: list[float], dtype: torch.dtype) -> dict:
    """numpy/Python version of ulp_statistics over pairs where both sides are finite (exact ints throughout)."""
    valid = [math.isfinite(x) and math.isfinite(y) for x, y in zip(b, a, strict=True)]
    d = sorted(min(ulp_distance_bits(x, y, dtype), INT64_MAX) for x, y, v in zip(b, a, valid, strict=True) if v)
    hist = np.zeros(N_BUCKETS, dtype=np.int64)
    for x in d:
        hist[log2_bucket(x)] += 1
    n = len(d)
    return {
        "ulp_mean": float(sum(d)) / n if n else 0.0,
        "ulp_median": d[(n - 1) // 2] if n else 0,
        "ulp_max": max(d) if n else 0,
        "ulp_zero_frac": frac(np.array([x == 0 for x in d], dtype=bool)),
        "ulp_nonfinite_frac": frac(~np.array(valid, dtype=bool)),
        "ulp_histogram": hist,
    }


def assert_ulp_stats(got: dict[str, torch.Tensor], expected: dict) -> None:
    assert set(got) == set(ULP_KEYS)
    assert_scalar(got["ulp_mean"], expected["ulp_mean"], rtol=1e-12, key="ulp_mean")
    assert_scalar(got["ulp_max"], float(expected["ulp_max"]), key="ulp_max")
    assert_scalar(got["ulp_zero_frac"], expected["ulp_zero_frac"], key="ulp_zero_frac")
    assert_scalar(got["ulp_nonfinite_frac"], expected["ulp_nonfinite_frac"], key="ulp_nonfinite_frac")
    hist = got["ulp_histogram"]
    assert hist.dtype == torch.int64 and hist.shape == (N_BUCKETS,)
    np.testing.assert_array_equal(hist.numpy(), expected["ulp_histogram"])
    med, ref_med = got["ulp_median"].item(), expected["ulp_median"]
    if ref_med < 32:
        assert med == ref_med
    else:  # the lower edge of its 1/16-octave bucket
        assert ref_med * (1 - 1 / 16) <= med <= ref_med, (med, ref_med)


def stats_pairs(
    dtype: torch.dtype, scale_exp: float, n: int, seed: int, p_zero: float = 0.25
) -> tuple[list[float], list[float]]:
    """Random finite pairs whose distances are log-uniform up to 2**scale_exp, a fraction ``p_zero`` of them 0, plus
    NaN/inf pairs that must be excluded."""
    rng = np.random.default_rng(seed)
    fi = ml_dtypes.finfo(TORCH_TO_NP[dtype])
    b, a = [], []
    for _ in range(n):
        x = float(np.ldexp(rng.uniform(1, 2), int(rng.integers(-10, 10))) * rng.choice([-1.0, 1.0]))
        x = float(np.array(x).astype(TORCH_TO_NP[dtype]))
        steps = 0 if rng.random() < p_zero else int(2 ** rng.uniform(0, scale_exp))
        bits = ulp_distance_bits(x, 0.0, dtype) * (1 if x > 0 else -1) + steps * int(rng.choice([-1, 1]))
        limit = ulp_distance_bits(float(fi.max), 0.0, dtype)
        bits = max(-limit, min(limit, bits))
        y = value_of_bits(abs(bits), dtype)
        b.append(x)
        a.append(-y if bits < 0 else y)
    nan, inf = float("nan"), float("inf")
    b += [nan, 1.0, inf, -inf, nan]
    a += [1.0, nan, 1.0, -inf, inf]
    return b, a


@pytest.mark.parametrize("scale_exp", (4, 20), ids=["median<32", "median>32"])
@pytest.mark.parametrize("n", (201, 200))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ulp_statistics_match_reference(dtype: torch.dtype, n: int, scale_exp: int) -> None:
    """mean, max, zero fraction and the log2 histogram equal the exact Python computation; the median is the exact
    lower median below 32 ULPs and within 1/16 below it above; NaN/inf pairs are counted apart and excluded."""
    if dtype in (torch.bfloat16, torch.float16):
        scale_exp = min(scale_exp, 13)  # inside 2**±10 their binades hold 2**7 / 2**10 values
    b, a = stats_pairs(dtype, scale_exp, n, seed=zlib.crc32(f"{dtype}{n}{scale_exp}".encode()), p_zero=0.1)
    expected = ref_ulp_stats(b, a, dtype)
    assert (expected["ulp_median"] < 32) == (scale_exp == 4)
    got = ulp_statistics(as_tensor(np.array(b), dtype), as_tensor(np.array(a), dtype))
    assert_ulp_stats(got, expected)


@pytest.mark.parametrize(("dtype", "same_sign"), LARGE_CASES)
def test_ulp_statistics_huge_distances(dtype: torch.dtype, same_sign: bool) -> None:
    """Random bit patterns (distances up to 2**32 for float32, saturated 2**63 - 1 for float64, ±inf pairs
    excluded): the same statistics, exactly."""
    b, a = random_bit_pairs(dtype, n=300, same_sign=same_sign)
    got = ulp_statistics(as_tensor(np.array(b), dtype), as_tensor(np.array(a), dtype))
    assert_ulp_stats(got, ref_ulp_stats(b, a, dtype))


def float64_pow2_distances() -> list:
    """2**k - 1, 2**k, 2**k + 1 around and beyond float64's 2**53, where a float64 detour would round up a bucket."""
    return [d for k in (30, 52, 53, 54, 60, 62) for d in (2**k - 1, 2**k, 2**k + 1)]


def test_ulp_histogram_bins_hold_the_documented_integers() -> None:
    """ULP_HISTOGRAM_BINS' docstring: 65 buckets; bucket 0 holds 0, bucket k holds 2**(k-1) ... 2**k - 1 (both ends
    checked through k = 62 against int.bit_length), the saturated float64 distance 2**63 - 1 is in bucket 63,
    bucket 64 stays empty; ulp_histogram_edges() gives each bucket's smallest integer."""
    edges = ulp_histogram_edges()
    assert ULP_HISTOGRAM_BINS == len(edges) == 65
    assert edges == [0] + [2 ** (k - 1) for k in range(1, 65)]
    # Both ends of buckets 1 to 62; bucket 63 from 2**62 to the largest distance from 0 (the bits of float64's max).
    distances = [0] + [d for k in range(1, 63) for d in (2 ** (k - 1), 2**k - 1)] + [2**62, 0x7FEFFFFFFFFFFFFF]
    b = torch.zeros(len(distances), dtype=torch.float64)
    a = torch.tensor([value_of_bits(d, torch.float64) for d in distances], dtype=torch.float64)
    assert compute_ulp_distance(b, a).tolist() == distances
    hist = ulp_statistics(b, a)["ulp_histogram"].tolist()
    expected = [0] * 65
    for d in distances:
        expected[d.bit_length()] += 1
    assert hist == expected and hist[0] == 1 and all(hist[k] == 2 for k in range(1, 64)) and hist[64] == 0
    far = torch.tensor([-1e308, 1e308], dtype=torch.float64)  # 2 * bits(1e308) > 2**63: saturates at 2**63 - 1
    assert compute_ulp_distance(far[:1], far[1:]).item() == 2**63 - 1
    assert ulp_statistics(far[:1], far[1:])["ulp_histogram"].nonzero().flatten().tolist() == [63]


@pytest.mark.parametrize("distance", float64_pow2_distances())
def test_ulp_histogram_bucket_float64_exact(distance: int) -> None:
    """A float64 distance lands in bucket bit_length(d): 2**k - 1 is in [2**(k-1), 2**k), whatever its size."""
    b = torch.zeros(1, dtype=torch.float64)
    a = torch.tensor([value_of_bits(distance, torch.float64)], dtype=torch.float64)
    assert compute_ulp_distance(b, a).item() == distance
    hist = ulp_statistics(b, a)["ulp_histogram"]
    assert hist.nonzero().flatten().tolist() == [log2_bucket(distance)]


def test_ulp_statistics_documented_example_story() -> None:
    """A crossing of zero (-1e-3 -> 1e-3: ~2**31 float32 ULPs) dominates the mean while the median, the zero
    fraction and the histogram still say most weights moved 0-1 ULP (the README's point)."""
    b = torch.tensor([1.0, 1.0, 1.0, 1.0, -1e-3])
    a = torch.tensor([1.0, 1.0, float(np.nextafter(np.float32(1), np.float32(2))), 1.0, 1e-3])
    expected = ref_ulp_stats(b.tolist(), a.tolist(), torch.float32)
    assert expected["ulp_max"] > 2**30
    got = ulp_statistics(b, a)
    assert_ulp_stats(got, expected)
    assert got["ulp_mean"].item() > 2**28 and got["ulp_median"].item() == 0.0
    assert got["ulp_zero_frac"].item() == 0.6


def test_ulp_statistics_all_excluded_or_empty() -> None:
    """With no finite pair (or no pair at all) every statistic is 0 and the histogram empty, never NaN."""
    nan = float("nan")
    for b, a in ((torch.tensor([nan, 1.0]), torch.tensor([0.0, float("inf")])), (torch.zeros(0), torch.zeros(0))):
        got = ulp_statistics(b, a)
        assert got["ulp_histogram"].sum().item() == 0
        expected_nf = 1.0 if b.numel() else 0.0
        assert {k: v.item() for k, v in got.items() if k != "ulp_histogram"} == {
            "ulp_mean": 0.0,
            "ulp_median": 0.0,
            "ulp_max": 0.0,
            "ulp_zero_frac": 0.0,
            "ulp_nonfinite_frac": expected_nf,
        }


# --- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_ulp_sums_merge(dtype: torch.dtype) -> None:
    """_update on uneven chunks (one empty, one all-NaN), merged (sum, max for ulp_max), then _compute, equals the
    public function on the concatenation: histogram, median, max and fractions exactly, mean to rtol 1e-12."""
    b, a = stats_pairs(dtype, 20 if dtype != torch.bfloat16 else 12, 300, seed=5)
    bt, at = as_tensor(np.array(b), dtype), as_tensor(np.array(a), dtype)
    nan = torch.full((3,), float("nan"), dtype=dtype)
    cuts = [(0, 0), (0, 1), None, (1, 150), (150, len(b))]
    chunks = [(nan, nan) if c is None else (bt[c[0] : c[1]], at[c[0] : c[1]]) for c in cuts]
    got = _ulp_compute(functools.reduce(merge, [_ulp_update(x, y) for x, y in chunks]))
    whole = ulp_statistics(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))
    assert set(got) == set(whole) == set(ULP_KEYS)
    assert torch.equal(got["ulp_histogram"], whole["ulp_histogram"])
    for key in ("ulp_median", "ulp_max", "ulp_zero_frac", "ulp_nonfinite_frac"):
        assert got[key].item() == whole[key].item(), key
    assert math.isclose(got["ulp_mean"].item(), whole["ulp_mean"].item(), rel_tol=1e-12)
    assert_ulp_stats(got, ref_ulp_stats(b + [math.nan] * 3, a + [math.nan] * 3, dtype))


# --- properties ----------------------------------------------------------------------------------------------------

_F32 = st.one_of(st.floats(width=32), st.sampled_from(BOUNDARY_FLOATS))


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(_F32, _F32), max_size=40))
def test_property_adversarial_float32(pairs: list[tuple[float, float]]) -> None:
    """On any float32 pairs (NaN, ±inf, -0, subnormals): no exception; distances are -1 exactly at NaN and equal
    the Python-int bit distance elsewhere; fractions are finite in [0, 1]; histogram counts sum to the finite pairs."""
    b = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    a = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    d = compute_ulp_distance(b, a).tolist()
    for (x, y), dist in zip(pairs, d, strict=True):
        if math.isnan(x) or math.isnan(y):
            assert dist == -1
        else:
            assert dist == ulp_distance_bits(x, y, torch.float32)
    stats = ulp_statistics(b, a)
    for key, value in stats.items():
        if key.endswith("_frac"):
            assert 0.0 <= value.item() <= 1.0, key
        elif key != "ulp_histogram":
            assert math.isfinite(value.item()) and value.item() >= 0, key
    n_finite = sum(math.isfinite(x) and math.isfinite(y) for x, y in pairs)
    assert stats["ulp_histogram"].sum().item() == n_finite
