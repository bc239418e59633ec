"""OCP Microscaling (MX v1.0) block scales and MX quantize-dequantize against independent references.

The references are written here from the OCP MX v1.0 specification (§5.3 "Conversion": shared exponent
``X = 2**(floor(log2(amax)) - emax_elem)``, elements ``V / X`` rounded to nearest-even in the element format and
clamped at ±max; §5.2 / §5.4: the scale is an e8m0 value, 2**-127 .. 2**127, 0xFF is NaN):

- ``floor(log2(amax))`` from ``np.frexp`` (exact for every float64, subnormals included; ``np.log2`` is not: it rounds
  ``log2(nextafter(2**k, 0))`` up to ``k`` for float64 inputs),
- element rounding from ml_dtypes casts (``float8_e4m3fn``, ``float8_e5m2``, ``float6_e2m3fn``, ``float6_e3m2fn``,
  ``float4_e2m1fn``), saturated by clamping to ``finfo.max`` first,
- gfloat's ``quantize_block`` with ``compute_scale_amax`` where its definition agrees with the OCP rule,
- hypothesis for the grid and binade properties on random blocks.

Results are compared bitwise up to the NaN payload (value, sign of zero and NaN-ness).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from altgrad_lightning import quantize
from altgrad_lightning.scaling import mx_scale

#: MX element format -> emax_elem, the exponent of its largest normal (OCP MX v1.0, Table 1 / §5.3).
MX_EMAX: dict[str, int] = {
    "float8_e4m3fn": 8,
    "float8_e5m2": 15,
    "float6_e2m3fn": 2,
    "float6_e3m2fn": 4,
    "float4_e2m1fn": 2,
}
MX_NAMES = sorted(MX_EMAX)
ELEMENT_DTYPES: dict[str, np.dtype] = {name: np.dtype(getattr(ml_dtypes, name)) for name in MX_NAMES}
BLOCK_SIZES = [32, 16, 7, 1]
SCALE_EMIN, SCALE_EMAX = -127, 127  # e8m0: 2**-127 .. 2**127 (0xFF is NaN)


# --- independent references --------------------------------------------------------------------------------------


def to_float64(t: torch.Tensor) -> np.ndarray:
    """Exact float64 numpy copy of a float tensor; bfloat16 bits are decoded by ml_dtypes, not by torch."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).astype(np.float64)
    return t.numpy().astype(np.float64)


def floor_log2(a: float) -> int:
    """``floor(log2(a))`` for positive finite ``a``, exactly: ``a = m * 2**e`` with ``0.5 <= m < 1``."""
    _, e = np.frexp(np.float64(a))
    return int(e) - 1


def block_slices(n: int, block_size: int) -> list[slice]:
    """Consecutive blocks of ``block_size`` along a row of ``n`` (the last one may be partial)."""
    return [slice(start, min(start + block_size, n)) for start in range(0, n, block_size)]


def block_scale(values: np.ndarray, emax_elem: int) -> float:
    """The OCP MX shared scale of one block of float64 values."""
    if not np.isfinite(values).all():
        return np.nan  # a block holding NaN or ±inf: the scale's NaN code
    amax = float(np.abs(values).max())
    exponent = SCALE_EMIN if amax == 0 else max(floor_log2(amax) - emax_elem, SCALE_EMIN)
    if exponent > SCALE_EMAX:
        return np.nan  # the shared exponent does not fit e8m0
    return float(np.ldexp(1.0, exponent))


def rows_of(x: np.ndarray) -> np.ndarray:
    """``x`` as (rows, last dimension); a 0-d array is one row of one element."""
    return x.reshape(1, 1) if x.ndim == 0 else x.reshape(-1, x.shape[-1])


def ref_mx_scale(x: np.ndarray, emax_elem: int, block_size: int) -> np.ndarray:
    """Per-element OCP MX scale of float64 ``x`` (blocks along the last dimension), float64, ``x``'s shape."""
    rows = rows_of(x)
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        for sl in block_slices(rows.shape[1], block_size):
            out[r, sl] = block_scale(rows[r, sl], emax_elem)
    return out.reshape(x.shape)


def ref_mx_quantize(x: np.ndarray, name: str, block_size: int) -> np.ndarray:
    """OCP MX quantize-dequantize of float32-valued float64 ``x`` with ml_dtypes element rounding, float64.

    ``V / X`` is exact (X is a power of two). It is a float32 value when ``|V / X| >= 2**-126``; smaller quotients
    lie far below half the smallest subnormal of every element format (2**-17 for E5M2), so rounding them first to
    float32 cannot change the element (signed zero). The cast therefore goes through float32 without double
    rounding. Saturation: values beyond ±max are clamped to ±max before the cast (anything past max would round to
    max or beyond and saturate to it), so ml_dtypes' overflow behaviour (NaN for float8_e4m3fn, inf for E5M2) never
    matters.
    """
    scale = ref_mx_scale(x, MX_EMAX[name], block_size)
    element_max = float(ml_dtypes.finfo(ELEMENT_DTYPES[name]).max)
    with np.errstate(invalid="ignore"):
        v = x / scale
        v32 = v.astype(np.float32)
        finite = np.isfinite(v)
        assert np.all((v32[finite] == v[finite]) | (np.abs(v[finite]) < 2.0**-126))
        clamped = np.clip(v32, np.float32(-element_max), np.float32(element_max))
        elements = clamped.astype(ELEMENT_DTYPES[name]).astype(np.float64)
        return np.asarray(np.where(np.isnan(scale), np.nan, elements * scale))


def assert_same(actual: np.ndarray, expected: np.ndarray, inputs: np.ndarray, what: str = "") -> None:
    """Bitwise equality up to the NaN payload (NaN == NaN, -0 != +0), reporting the first differences.

    (Kept here rather than imported from ``reference.py``, which imports gfloat: this module must run without it.)
    """
    a = np.asarray(actual, dtype=np.float64).reshape(-1)
    e = np.asarray(expected, dtype=np.float64).reshape(-1)
    x = np.asarray(inputs, dtype=np.float64).reshape(-1)
    assert np.shape(actual) == np.shape(expected) == np.shape(inputs)
    bad = ~((np.isnan(a) & np.isnan(e)) | ((a == e) & (np.signbit(a) == np.signbit(e))))
    if bad.any():
        rows = "\n".join(
            f"  x={float(x[i])!r:<26} got {float(a[i])!r:<26} expected {float(e[i])!r}"
            for i in np.flatnonzero(bad)[:10]
        )
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} differ, first:\n{rows}")


# --- inputs ------------------------------------------------------------------------------------------------------


def wide_float32(rng: np.random.Generator, shape: tuple[int, ...], lo: int = -149, hi: int = 127) -> np.ndarray:
    """float32 values with random signs, mantissas and exponents in [lo, hi] (underflow to subnormals/zero is kept)."""
    mant = rng.uniform(1.0, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return np.ldexp(mant, rng.integers(lo, hi + 1, size=shape)).astype(np.float32)


def one_block_per_row(amaxes: np.ndarray, block_size: int, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """Rows of one block each: the block's largest magnitude is exactly ``amaxes[i]`` (random sign and position),
    the other elements are strictly smaller in magnitude."""
    amaxes = np.asarray(amaxes, dtype=dtype)
    n = len(amaxes)
    rows = (amaxes[:, None] * rng.uniform(0.0, 0.5, size=(n, block_size)).astype(dtype)).astype(dtype)
    rows[np.arange(n), rng.integers(0, block_size, size=n)] = amaxes
    return rows * rng.choice(np.array([-1, 1], dtype=dtype), size=(n, block_size))


def powers_of_two_float32() -> np.ndarray:
    """Every float32 power of two 2**k (subnormals included) and the float32 value just below it."""
    p = np.ldexp(1.0, np.arange(-149, 128)).astype(np.float32)
    return np.concatenate([p, np.nextafter(p, np.float32(0))])


def case_input(case: str, block_size: int, seed: int = 0) -> torch.Tensor:
    """The named test input (a torch tensor, of float32 unless the case says otherwise)."""
    rng = np.random.default_rng([seed, block_size, len(case)])
    bs = block_size
    if case == "normal_1d":
        x = rng.standard_normal(100).astype(np.float32)
    elif case == "normal_2d":
        x = (rng.standard_normal((3, 50)) * 10.0 ** rng.uniform(-20, 20, size=(3, 1))).astype(np.float32)
    elif case == "normal_3d":
        x = rng.standard_normal((2, 3, 45)).astype(np.float32)
    elif case == "wide_2d":
        x = wide_float32(rng, (4, 77))
    elif case == "zero_blocks":
        x = wide_float32(rng, (4, 4 * bs + 3), -20, 20)
        x[0] = 0.0
        x[1, bs : 2 * bs] = 0.0
        x[1, 4 * bs :] = -0.0  # the partial last block (for bs > 3) or a few whole ones
        x[2] = -0.0
        x[3, ::2] = 0.0
    elif case == "outlier":
        x = (rng.standard_normal((3, 3 * bs + 1)) * 1e-30).astype(np.float32)
        x[0, bs // 2] = 3.0e37
        x[1, 2 * bs] = -1.5e30
        x[2, -1] = 65504.0
    elif case == "subnormal":
        tiny = (rng.integers(1, 2**23, size=(3, 3 * bs + 2)) * 2.0**-149).astype(np.float32)
        tiny[1] = np.float32(2.0**-149)
        tiny[2, :bs] = np.float32(2.0**-126) - np.float32(2.0**-149)  # the largest subnormal
        x = tiny * rng.choice(np.array([-1, 1], dtype=np.float32), size=tiny.shape)
    elif case == "powers_of_two":
        x = one_block_per_row(powers_of_two_float32(), bs, rng)
    elif case == "nan_inf":
        x = wide_float32(rng, (5, 3 * bs + 2), -10, 10)
        x[0, bs + bs // 2] = np.nan
        x[1, 0] = np.inf
        x[2, -1] = -np.inf
        x[3, 2 * bs] = np.nan
        x[3, 2 * bs + (bs - 1)] = -np.inf
        x[4, bs] = 1e38  # a finite block with a huge amax next to the special ones
    elif case == "float64_huge":
        k = np.arange(120, 150)
        p = np.ldexp(1.0, k)
        amaxes = np.concatenate([p, np.nextafter(p, 0.0), [1e300, 1.7e308, 1e-300, 5e-324, 2.0**-1022, 1e-40]])
        return torch.from_numpy(one_block_per_row(amaxes, bs, rng, dtype=np.float64))
    elif case == "float16":
        x16 = (rng.standard_normal((3, 40)) * 2.0 ** rng.integers(-26, 14, size=(3, 40))).astype(np.float16)
        x16[0, :3] = [2.0**-24, -(2.0**-24), 65504.0]
        x16[1, 5] = np.inf
        x16[2, :8] = np.float16(2.0**-24)
        return torch.from_numpy(x16)
    elif case == "bfloat16":
        xb = wide_float32(rng, (3, 40), -133, 127).astype(ml_dtypes.bfloat16)
        xb[0, :3] = [2.0**-133, -(2.0**-133), float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)]
        xb[1, 7] = -np.inf
        xb[2, :8] = ml_dtypes.bfloat16(2.0**-133)
        return torch.from_numpy(xb.view(np.int16)).view(torch.bfloat16)
    else:
        raise AssertionError(case)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


FINITE_FLOAT32_CASES = [
    "normal_1d",
    "normal_2d",
    "normal_3d",
    "wide_2d",
    "zero_blocks",
    "outlier",
    "subnormal",
    "powers_of_two",
]
SCALE_CASES = [*FINITE_FLOAT32_CASES, "nan_inf", "float64_huge", "float16", "bfloat16"]
SCALARS = [3.0, -5.0, 0.0, -0.0, 2.0**-149, 3.0e38, float("nan"), float("inf"), float("-inf")]


def check_mx_scale(x: torch.Tensor, name: str, block_size: int) -> np.ndarray:
    """mx_scale(x) is float32 of x's shape and bitwise equal to the reference; returns the reference."""
    got = mx_scale(x, name, block_size=block_size)
    assert got.dtype == torch.float32
    assert got.shape == x.shape
    assert got.device == x.device
    values = to_float64(x)
    expected = ref_mx_scale(values, MX_EMAX[name], block_size)
    assert_same(got.double().numpy(), expected, values, f"mx_scale {name} block_size={block_size}")
    return expected


# --- 1. mx_scale against the numpy reference -----------------------------------------------------------------------


def test_emax_table_matches_ml_dtypes() -> None:
    """The emax_elem table of the spec is the exponent of each element format's largest normal in ml_dtypes."""
    for name, emax in MX_EMAX.items():
        fi = ml_dtypes.finfo(ELEMENT_DTYPES[name])
        assert int(fi.maxexp) - 1 == emax
        assert 2.0**emax <= float(fi.max) < 2.0 ** (emax + 1)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", MX_NAMES)
@pytest.mark.parametrize("case", SCALE_CASES)
def test_mx_scale_matches_reference(case: str, name: str, block_size: int) -> None:
    """Bit-exact with the OCP rule on every case: partial last blocks, zero blocks (2**-127), one outlier, subnormal
    amax, amax exactly 2**k and just below, NaN/±inf blocks (NaN, neighbours unaffected), float64 exponents past 127
    (NaN), float16 and bfloat16 inputs."""
    x = case_input(case, block_size)
    expected = check_mx_scale(x, name, block_size)
    if case == "nan_inf":
        assert np.isnan(expected).any() and np.isfinite(expected).any()
    if case == "float64_huge":
        assert np.isnan(expected).any()  # exponents past 127 do occur
    if case in ("zero_blocks", "subnormal"):
        assert (expected == 2.0**-127).any()


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_scale_powers_of_two_binades(name: str) -> None:
    """amax = 2**k gives 2**(k - emax) and amax just below 2**k gives 2**(k - 1 - emax), clamped at 2**-127."""
    emax = MX_EMAX[name]
    p = powers_of_two_float32()
    got = mx_scale(torch.from_numpy(p), name, block_size=1).double().numpy()
    k = np.arange(-149, 128)
    expected_exp = np.concatenate([k, k - 1]) - emax
    expected = np.ldexp(1.0, np.maximum(expected_exp, -127))
    expected[len(k)] = 2.0**-127  # nextafter(2**-149, 0) is 0
    assert_same(got, expected, p.astype(np.float64), name)


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_scale_float64_exponent_limit(name: str) -> None:
    """float64 blocks: shared exponent 127 is the last finite scale, 128 is NaN; nextafter just below stays 127."""
    emax = MX_EMAX[name]
    top = 2.0 ** (127 + emax)
    x = torch.tensor([top, np.nextafter(2.0 * top, 0.0), 2.0 * top, 1e300, -1e300, 5e-324], dtype=torch.float64)
    got = mx_scale(x, name, block_size=1).double().numpy()
    expected = np.array([2.0**127, 2.0**127, np.nan, np.nan, np.nan, 2.0**-127])
    assert_same(got, expected, x.numpy(), name)


@pytest.mark.parametrize("name", MX_NAMES)
@pytest.mark.parametrize("value", SCALARS)
def test_mx_scale_zero_dim(name: str, value: float) -> None:
    """A 0-d tensor is one block of one element."""
    for block_size in BLOCK_SIZES:
        x = torch.tensor(value, dtype=torch.float32)
        check_mx_scale(x, name, block_size)
        assert mx_scale(x, name, block_size=block_size).ndim == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
def test_mx_scale_empty(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    for name in MX_NAMES:
        for block_size in BLOCK_SIZES:
            got = mx_scale(torch.zeros(shape, dtype=dtype), name, block_size=block_size)
            assert got.shape == shape
            assert got.dtype == torch.float32


def test_mx_scale_noncontiguous_input() -> None:
    """Blocks follow the logical last dimension, not memory order (a transposed view)."""
    x = case_input("wide_2d", 7).T
    assert not x.is_contiguous()
    for name in MX_NAMES:
        for block_size in BLOCK_SIZES:
            check_mx_scale(x, name, block_size)


# --- 2. MX quantize-dequantize against ml_dtypes ------------------------------------------------------------------


def mx_quantize(x: torch.Tensor, name: str, block_size: int) -> torch.Tensor:
    return quantize(x, name, scale=mx_scale(x, name, block_size=block_size), saturate=True)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", MX_NAMES)
@pytest.mark.parametrize("case", FINITE_FLOAT32_CASES)
def test_mx_quantize_matches_ml_dtypes(case: str, name: str, block_size: int) -> None:
    """quantize(x, fmt, scale=mx_scale(x, fmt), saturate=True) is bit-exact with V/X cast by ml_dtypes (saturated)
    times X, for float32 inputs (signed zeros included)."""
    x = case_input(case, block_size)
    got = mx_quantize(x, name, block_size)
    assert got.dtype == torch.float32
    values = to_float64(x)
    assert_same(got.double().numpy(), ref_mx_quantize(values, name, block_size), values, f"MX {name} {case}")


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_quantize_saturates_binade_top(name: str) -> None:
    """A block amax just below 2**(k+1) has V/X just below 2**(emax+1), past max: it saturates to ±max * X."""
    emax = MX_EMAX[name]
    element_max = float(ml_dtypes.finfo(ELEMENT_DTYPES[name]).max)
    amax = np.nextafter(np.float32(2.0**5), np.float32(0))
    x = torch.tensor([[amax, -amax, 1.0, 0.0]], dtype=torch.float32)
    got = mx_quantize(x, name, 4).double().numpy()[0]
    scale = 2.0 ** (4 - emax)
    assert got[0] == element_max * scale and got[1] == -element_max * scale


@pytest.mark.parametrize("name", MX_NAMES)
@pytest.mark.parametrize("value", [v for v in SCALARS if np.isfinite(v)])
def test_mx_quantize_zero_dim(name: str, value: float) -> None:
    x = torch.tensor(value, dtype=torch.float32)
    got = mx_quantize(x, name, 32)
    assert got.ndim == 0
    values = to_float64(x)
    assert_same(got.double().numpy(), ref_mx_quantize(values, name, 32), values, name)


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_quantize_nan_blocks(name: str) -> None:
    """A block holding NaN or ±inf has scale NaN, so every element of that block is NaN; other blocks unaffected."""
    for block_size in BLOCK_SIZES:
        x = case_input("nan_inf", block_size)
        got = mx_quantize(x, name, block_size)
        values = to_float64(x)
        expected = ref_mx_quantize(values, name, block_size)
        assert np.isnan(expected).any() and np.isfinite(expected).any()
        assert_same(got.double().numpy(), expected, values, f"MX {name} NaN blocks")


# --- 3. gfloat's block quantizer ----------------------------------------------------------------------------------

GFLOAT_BLOCK_FORMATS = {
    "float8_e4m3fn": "format_info_mxfp8_e4m3",
    "float8_e5m2": "format_info_mxfp8_e5m2",
    "float6_e2m3fn": "format_info_mxfp6_e2m3",
    "float6_e3m2fn": "format_info_mxfp6_e3m2",
    "float4_e2m1fn": "format_info_mxfp4_e2m1",
}


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_matches_gfloat_quantize_block(name: str) -> None:
    """Scales and elements agree with gfloat's ``quantize_block(fi, vals, compute_scale_amax)``.

    gfloat's ``compute_scale_amax`` (gfloat 0.6) is ``2**clip(floor(np.log2(amax)) - emax, -127, 127)``, 2**-127
    for an all-zero block. It differs from the OCP rule (and is not used here) for:

    - float64 amax just below a power of two: ``np.log2(nextafter(8.0, 0))`` rounds to 3.0, so gfloat's scale is
      twice the OCP one (``floor(log2)`` is 2). For float32 inputs the gap ``log2(1 - 2**-24) ~ -8.6e-8`` is far
      above float64's resolution at |log2| <= 149, so float32 blocks (the only ones fed here) agree;
    - exponents past 127 (float64 only): gfloat clips to 2**127, OCP / mx_scale give NaN;
    - blocks holding NaN or ±inf: gfloat clips inf to 2**127 and has no NaN rule; OCP gives NaN.

    The inputs are therefore finite float32 blocks, with no special values.
    """
    gfloat = pytest.importorskip("gfloat")
    from gfloat import formats as gformats

    fi = getattr(gformats, GFLOAT_BLOCK_FORMATS[name])
    assert fi.etype.emax == MX_EMAX[name]
    assert fi.k == 32
    rng = np.random.default_rng(7)
    x = np.concatenate(
        [
            wide_float32(rng, (2, 70)),
            wide_float32(rng, (4, 70), -10, 10),
            (rng.standard_normal((2, 70)) * 1e-39).astype(np.float32),
            one_block_per_row(powers_of_two_float32()[::9], 70, rng),
        ]
    )
    x[0, :32] = 0.0  # an all-zero block: 2**-127 in both
    got = mx_quantize(torch.from_numpy(x), name, fi.k).double().numpy()
    scale = mx_scale(torch.from_numpy(x), name, block_size=fi.k).double().numpy()
    expected = np.empty_like(got)
    expected_scale = np.empty_like(got)
    for r in range(x.shape[0]):
        for sl in block_slices(x.shape[1], fi.k):
            vals = x[r, sl].astype(np.float64)
            expected[r, sl] = gfloat.quantize_block(fi, vals, gfloat.compute_scale_amax)
            expected_scale[r, sl] = gfloat.compute_scale_amax(fi.etype.emax, vals)
    inputs = x.astype(np.float64)
    assert_same(scale, expected_scale, inputs, f"mx_scale {name} vs gfloat")
    assert_same(got, expected, inputs, f"MX {name} vs gfloat")


# --- 4. properties -------------------------------------------------------------------------------------------------

SPECIAL_FLOAT32 = [0.0, -0.0, 2.0**-149, -(2.0**-149), 2.0**-126, 2.0**-127, 1.0, 3.4028234663852886e38, -1e38, 448.0]
FLOAT32_ELEMENTS = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.floats(min_value=-(2.0**-120), max_value=2.0**-120, width=32),
    st.sampled_from(SPECIAL_FLOAT32),
)


@settings(max_examples=200, deadline=None)
@given(
    x=hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=70), elements=FLOAT32_ELEMENTS
    ),
    block_size=st.integers(1, 40),
    name=st.sampled_from(MX_NAMES),
)
def test_mx_properties(x: np.ndarray, block_size: int, name: str) -> None:
    """Every element of an MX block, divided by its scale X, is on the element grid within ±max; X is constant over
    the block and a power of two in [2**-127, 2**127]; the block's amax / X lies in [2**emax, 2**(emax + 1)) unless
    the shared exponent is -127 (then amax < 2**(emax - 126): the exponent may have been clamped)."""
    emax = MX_EMAX[name]
    dtype = ELEMENT_DTYPES[name]
    element_max = float(ml_dtypes.finfo(dtype).max)
    xt = torch.from_numpy(x)
    scale_t = mx_scale(xt, name, block_size=block_size)
    q = quantize(xt, name, scale=scale_t, saturate=True).double().numpy()
    scale = scale_t.double().numpy()
    values = x.astype(np.float64)

    mant, _ = np.frexp(scale)
    assert np.all(mant == 0.5) and np.all(scale >= 2.0**-127) and np.all(scale <= 2.0**127)
    r = q / scale  # exact: q is X times a grid value
    assert np.all(np.abs(r) <= element_max)
    assert np.array_equal(r.astype(np.float32).astype(dtype).astype(np.float64), r)
    assert np.all((q == 0) | (np.sign(q) == np.sign(values)))
    for row in range(x.shape[0]):
        for sl in block_slices(x.shape[1], block_size):
            block_scale_value = scale[row, sl]
            assert np.all(block_scale_value == block_scale_value[0])
            x_scale = block_scale_value[0]
            amax = float(np.abs(values[row, sl]).max())
            ratio = amax / x_scale
            assert ratio < 2.0 ** (emax + 1)
            if x_scale != 2.0**-127:
                assert ratio >= 2.0**emax
            else:
                assert amax < 2.0 ** (emax - 126)  # floor(log2(amax)) - emax <= -127


# --- 5. bad arguments -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [0, -1, 2.5, True, False, "32", None])
def test_bad_block_size(block_size) -> None:
    with pytest.raises(ValueError, match="block_size"):
        mx_scale(torch.ones(4), "float8_e4m3fn", block_size=block_size)


@pytest.mark.parametrize(
    "x",
    [[1.0, 2.0], np.ones(3, dtype=np.float32), 1.0, torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.bool)],
    ids=["list", "ndarray", "float", "int32", "bool"],
)
def test_bad_x(x) -> None:
    with pytest.raises(TypeError, match="`x`"):
        mx_scale(x, "float8_e4m3fn")


@pytest.mark.parametrize("fmt", ["nope", "float8_e9m9", None, 3])
def test_bad_fmt(fmt) -> None:
    with pytest.raises((ValueError, TypeError), match="`fmt`"):
        mx_scale(torch.ones(4), fmt)


# --- 6. the monitor with scaling="mx" in a real Trainer ----------------------------------------------------------


def mx_window_expected(steps, name: str, block_size: int, masks=None) -> dict[str, float]:
    """The stiffness, grid and flip fractions of a window of probe steps (whole tensors), recomputed in numpy with
    the reference block scales of the weights before each step (the flips use them on both sides); with ``masks``
    (parameter name -> boolean array of its shape) over the marked elements only, scaled as in the whole tensor."""
    from callback_helpers import round_to, stiffness_ref

    w_all, g_all, before_all, after_all, scale_all = [], [], [], [], []
    for step in steps:
        for pname, w, g, before, after in zip(
            step["names"], step["w"], step["g"], step["dtype"], step["w_after"], strict=True
        ):
            keep = np.ones(w.size, bool) if masks is None else masks[pname].ravel()
            w_all.append(w.ravel()[keep])
            g_all.append(g.ravel()[keep])
            before_all.append(before.astype(np.float64).ravel()[keep])
            after_all.append(after.astype(np.float64).ravel()[keep])
            scale_all.append(ref_mx_scale(w, MX_EMAX[name], block_size).ravel()[keep])
    w, g, b, a, x = (np.concatenate(v) for v in (w_all, g_all, before_all, after_all, scale_all))
    valid = w != 0
    s = x * stiffness_ref(w / x, name)
    q = x * round_to(w / x, name)
    qb, qa = round_to(b / x, name), round_to(a / x, name)
    updated = a != b
    expected = {
        "grad_below_stiffness_frac": np.mean(np.abs(g[valid]) < s[valid]),
        "on_grid_frac": np.mean(q == w),
        "overflow_frac": np.mean(np.abs(w / x) > float(ml_dtypes.finfo(ELEMENT_DTYPES[name]).max)),
        "underflow_frac": np.mean((q == 0) & (w != 0)),
        "flip_frac": np.mean(qa != qb),
        "update_stall_frac": np.mean(qa[updated] == qb[updated]),
        "updated_frac": np.mean(updated),
    }
    return {stat: float(value) for stat, value in expected.items()}


def mx_block_counts(steps, name: str, block_size: int, masks=None) -> dict[str, np.ndarray]:
    """Per parameter, the (rows, blocks, 2) [n_updated, n_stall] of MX blocks summed over the probe's steps; with
    ``masks`` (parameter name -> boolean array of its shape) only the elements it marks count."""
    from callback_helpers import round_to

    expected: dict[str, np.ndarray] = {}
    for step in steps:
        for pname, w, before, after in zip(step["names"], step["w"], step["dtype"], step["w_after"], strict=True):
            x = ref_mx_scale(w, MX_EMAX[name], block_size)
            b, a = before.astype(np.float64), after.astype(np.float64)
            updated = (a != b) & (True if masks is None else masks[pname])
            stalled = updated & (round_to(a / x, name) == round_to(b / x, name))
            rows = rows_of(updated.astype(np.float64)), rows_of(stalled.astype(np.float64))
            counts = np.stack(
                [[[r[i, sl].sum() for sl in block_slices(r.shape[1], block_size)] for i in range(r.shape[0])]
                 for r in rows], -1)  # fmt: skip
            expected[pname] = expected.get(pname, 0) + counts
    return expected


@pytest.mark.parametrize("block_size", [4, 32])
def test_monitor_mx_scaling_logs_the_block_scaled_recomputation(tmp_path, block_size: int) -> None:
    """QuantizationMonitor(scaling="mx") in a real Trainer: every step's stiffness, grid and flip fractions equal a
    numpy recomputation on the probe's tensors with the reference block scales of the weights before the step (the
    flips use those scales on both sides). Block size 4 splits the 6- and 12-wide rows into full and partial
    blocks; 32 makes each row one partial block."""
    from callback_helpers import TinyRegressor, csv_rows, fit

    from altgrad_lightning import QuantizationMonitor

    names = ("float8_e4m3fn", "float4_e2m1fn")
    monitor = QuantizationMonitor(formats=list(names), scaling="mx", block_size=block_size)
    _, probe, _ = fit(tmp_path, monitor, model=TinyRegressor(lr=3e-3), max_steps=6)
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 6
    for row, step in zip(rows, probe.steps, strict=True):
        for name in names:
            for stat, value in mx_window_expected([step], name, block_size).items():
                assert row[f"altgrad/{name}/{stat}"] == pytest.approx(value, abs=1e-12), (name, stat)
        # MXFP4's coarse grid swallows more updates than MXFP8's, at the same scaling.
        assert row["altgrad/float4_e2m1fn/update_stall_frac"] >= row["altgrad/float8_e4m3fn/update_stall_frac"]


def test_monitor_mx_block_size_is_validated() -> None:
    from altgrad_lightning import QuantizationMonitor

    for bad in (0, -2, 3.0, True):
        with pytest.raises(ValueError, match="`block_size`"):
            QuantizationMonitor(scaling="mx", block_size=bad)


def test_monitor_mx_block_stalls_file_and_report_heatmap(tmp_path) -> None:
    """scaling="mx" with per_parameter: mx_block_stalls.pt holds, per format, parameter and MX block, the updated and
    stalled weights summed over the fit, equal to a numpy recomputation from the probe with the reference block
    scales of the weights before each step; the report draws mx_block_heatmap.png from it."""
    from callback_helpers import TinyRegressor, fit

    from altgrad_lightning import QuantizationMonitor
    from altgrad_lightning.report import write_report

    names, block_size = ("float8_e4m3fn", "float4_e2m1fn"), 4
    monitor = QuantizationMonitor(formats=list(names), scaling="mx", block_size=block_size, per_parameter=True)
    trainer, probe, _ = fit(tmp_path, monitor, model=TinyRegressor(lr=3e-3), max_steps=5)
    data = torch.load(tmp_path / "csv" / "version_0" / "mx_block_stalls.pt", weights_only=True)
    assert data["block_size"] == block_size
    for name in names:
        expected = mx_block_counts(probe.steps, name, block_size)
        got = data["stalls"][name]
        assert sorted(got) == sorted(expected)
        for pname, counts in expected.items():
            np.testing.assert_array_equal(got[pname].numpy(), counts, err_msg=f"{name} {pname}")
        assert sum(float(t[..., 1].sum()) for t in got.values()) > 0  # some blocks stall
    written = write_report(tmp_path / "csv" / "version_0")
    assert tmp_path / "csv" / "version_0" / "mx_block_heatmap.png" in written
    assert "mx_block_heatmap.png" in (tmp_path / "csv" / "version_0" / "summary.md").read_text()


def test_monitor_mx_block_stalls_survive_a_resume(tmp_path) -> None:
    """The fit-long block counts are part of the monitor's checkpoint state: a run resumed from the end of epoch 0
    saves the same mx_block_stalls.pt as the run that never stopped (whose counts the test above checks)."""
    from callback_helpers import TinyRegressor, fit
    from lightning.pytorch.callbacks import ModelCheckpoint

    from altgrad_lightning import QuantizationMonitor

    def run(root, ckpt_path=None):
        torch.manual_seed(0 if ckpt_path is None else 1)  # the resumed run must not depend on a fresh model
        monitor = QuantizationMonitor(formats=["float8_e4m3fn"], scaling="mx", block_size=4, per_parameter=True)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
        fit(root, monitor, model=TinyRegressor(lr=3e-3), max_steps=-1, max_epochs=2, limit_train_batches=3,
            callbacks=[checkpoints], enable_checkpointing=True, fit_kwargs={"ckpt_path": ckpt_path})  # fmt: skip
        return torch.load(root / "csv" / "version_0" / "mx_block_stalls.pt", weights_only=True)["stalls"]

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert sorted(resumed["float8_e4m3fn"]) == sorted(straight["float8_e4m3fn"]) == [
        "net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"
    ]  # fmt: skip
    for name, counts in straight["float8_e4m3fn"].items():
        assert counts[..., 0].sum() > 0
        torch.testing.assert_close(resumed["float8_e4m3fn"][name], counts, rtol=0, atol=0, msg=name)


def test_monitor_mx_refuses_fsdp1_flat_shards() -> None:
    """FSDP1 (flattened 1-D shards of one or several parameters) hides the shapes MX blocks are formed in: one
    ValueError naming the parameter and what to use instead. (FSDP1 needs a GPU under Lightning: the flattened
    parameter is imitated by FSDP1's own marker attribute.)"""
    from altgrad_lightning.callbacks.quantization_monitor import _mx_shard_layout

    flat = torch.nn.Parameter(torch.zeros(10))
    flat._fsdp_flattened = True  # what FSDP1 sets on FlatParameter and on its use_orig_params views
    with pytest.raises(ValueError, match=r"FSDP1.*'net\.0\.weight'.*FSDP2"):
        _mx_shard_layout("net.0.weight", flat)
    layout = _mx_shard_layout("w", torch.zeros(3, 5, 7))  # a replica: the whole tensor
    assert (layout.rows, layout.cols, layout.row_offset, layout.col_offset, layout.splits_blocks) == (
        15,
        7,
        0,
        0,
        False,
    )
