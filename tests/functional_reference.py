"""Independent numpy references for the functional diagnostics' tests (``tests/test_functional_*.py``).

Nothing here imports altgrad_lightning. Grids come from enumerating every code of the ml_dtypes / numpy dtype
(or, for the fixed-point E0M7, from the specification's ``k/128``), rounding from ml_dtypes / numpy casts of
float32 values (exact: one rounding) or, for float64 values, from a nearest-code search on the enumerated grid
(ml_dtypes casts float64 through float32, which rounds twice, so it is not an oracle for float64 inputs).
"""

from __future__ import annotations

import functools
import math
import struct

import ml_dtypes
import numpy as np
import torch
from reference import ML_DTYPES

#: Presets whose grid ml_dtypes defines, by canonical preset name (the same table as the quantize tests' oracle).
ML_NAMES: tuple[str, ...] = tuple(name for name in ML_DTYPES if name != "float16")

#: Preset name -> numpy dtype of the reference (ml_dtypes, or numpy's own for the IEEE widths).
NP_DTYPES: dict[str, np.dtype] = dict(ML_DTYPES)
NP_DTYPES.update(float32=np.dtype(np.float32), float64=np.dtype(np.float64))

#: Formats small enough (<= 16 bits) to enumerate every code.
ENUMERABLE: tuple[str, ...] = (*ML_NAMES, "float16")

TORCH_TO_NP: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
}

E0M7_GRID = np.arange(-127, 128, dtype=np.float64) / 128.0
"""The fixed-point E0M7 grid from the specification: ``k / 128`` for ``|k| <= 127``."""


def finfo(name: str):
    """``ml_dtypes.finfo`` of a preset's reference dtype (it also answers for numpy's own float dtypes)."""
    return ml_dtypes.finfo(NP_DTYPES[name])


def exponent_range(name: str) -> tuple[int, int, int]:
    """``(emin, emax, nmant)``: exponent of the smallest normal, of the largest finite binade, mantissa bits."""
    fi = finfo(name)
    return int(fi.minexp), int(fi.maxexp) - 1, int(fi.nmant)


def fmt_max(name: str) -> float:
    return 127.0 / 128.0 if name == "e0m7" else float(finfo(name).max)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy of a float tensor (every float32/16/bf16 value is a float64 value)."""
    return t.detach().to(torch.float64).cpu().numpy()


def from_numpy(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Tensor of ``dtype`` holding ``values`` rounded once (float32 -> bfloat16 is torch's nearest-even cast)."""
    values = np.asarray(values, dtype=np.float64)
    if dtype == torch.float64:
        return torch.from_numpy(values.copy())
    # numpy's float64 -> float32 and float64 -> float16 casts round once; bfloat16 goes through ml_dtypes from the
    # float32 value, so callers that need an exact bfloat16 value pass one that is already a float32.
    return torch.from_numpy(values.astype(TORCH_TO_NP[dtype]).astype(np.float32)).to(dtype)


# --- grids -------------------------------------------------------------------------------------------------------


@functools.cache
def code_table(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct finite values of the format (``+0`` and ``-0`` one point) and whether each code is even.

    ``even`` is the least significant bit of the code's bit pattern being 0 (ties-to-even). The sign bit is the
    top bit, so a negative value's parity is its magnitude's.
    """
    if name == "e0m7":
        return E0M7_GRID, (np.arange(-127, 128) % 2 == 0)
    dtype = NP_DTYPES[name]
    bits = int(finfo(name).bits)
    codes = np.arange(2**bits, dtype=np.uint8 if dtype.itemsize == 1 else np.uint16)
    with np.errstate(invalid="ignore", over="ignore"):
        values = codes.view(dtype).astype(np.float64)
    finite = np.isfinite(values)
    values, codes = values[finite] + 0.0, codes[finite]  # + 0.0: -0 becomes +0
    order = np.argsort(values, kind="stable")
    values, codes = values[order], codes[order]
    keep = np.concatenate([[True], values[1:] != values[:-1]])  # -0 and +0: keep the first (either is even)
    return values[keep], (codes[keep] % 2 == 0)


def nearest_code(x: np.ndarray, name: str) -> np.ndarray:
    """Round float64 ``x`` to the nearest grid value of ``name``, saturating at ±max, ties to the even code.

    ``float8_e8m0fnu`` has no mantissa to be even: its ties round up (torch and ml_dtypes agree on that), and
    zero/negative values give NaN as ml_dtypes does. NaN stays NaN. The comparison with the midpoint of two grid
    values is exact in float64 (the midpoint of two low-precision values is a float64 value).
    """
    x = np.asarray(x, dtype=np.float64)
    grid, even = code_table(name)
    out = np.full(x.shape, np.nan)
    ok = ~np.isnan(x)
    xc = np.clip(x[ok], grid[0], grid[-1])
    hi = np.clip(np.searchsorted(grid, xc, side="left"), 1, len(grid) - 1)
    lo = hi - 1
    mid = (grid[lo] + grid[hi]) / 2
    if name == "float8_e8m0fnu":
        take_hi = xc >= mid
    else:
        take_hi = (xc > mid) | ((xc == mid) & even[hi])
    r = np.where(take_hi, grid[hi], grid[lo])
    r = np.where(xc == grid[lo], grid[lo], r)
    if name == "float8_e8m0fnu":
        r = np.where(x[ok] > 0, r, np.nan)
    else:
        r = np.copysign(r, x[ok])
    out[ok] = r
    return out


def cast_saturating(x: np.ndarray, name: str) -> np.ndarray:
    """Round float32-representable ``x`` (float64 array) onto ``name`` with an ml_dtypes / numpy cast.

    Clamped to ±max first, so the cast saturates (torch's float8_e4m3fn cast does; ml_dtypes' gives NaN past 464).
    The cast is from float32, so it rounds exactly once.
    """
    x = np.asarray(x, dtype=np.float64)
    x32 = x.astype(np.float32)
    assert np.array_equal(x32.astype(np.float64), x, equal_nan=True), "cast_saturating needs float32 values"
    m = np.float32(fmt_max(name))
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.clip(x32, -m, m).astype(NP_DTYPES[name]).astype(np.float64)
    return np.where(np.isnan(x), np.nan, q)  # formats without NaN cast it to some number: NaN in is NaN out


def round_ref(x: np.ndarray, name: str, exact_float32: bool) -> np.ndarray:
    """Saturating nearest rounding: the ml_dtypes cast for float32 values, the code search otherwise."""
    if exact_float32 and name != "e0m7":
        return cast_saturating(x, name)
    return nearest_code(x, name)


def grid_position(q: np.ndarray, name: str) -> np.ndarray:
    """Position of grid values ``q`` in the sorted list of the format's values (+0/-0 one point); NaN stays NaN."""
    grid, _ = code_table(name)
    out = np.full(q.shape, np.nan)
    ok = ~np.isnan(q)
    pos = np.searchsorted(grid, q[ok])
    assert np.array_equal(grid[pos], q[ok]), "grid_position: value not on the grid"
    out[ok] = pos
    return out


# --- data ---------------------------------------------------------------------------------------------------------


def spanning_values(
    rng: np.random.Generator, name: str, n: int, dtype: torch.dtype, exp_clip: tuple[int, int] = (-2000, 2000)
) -> np.ndarray:
    """``n`` random float64 values of both signs whose exponents run from below the format's smallest subnormal
    through its normal range to above its max, restricted to what ``dtype`` can hold, then rounded to ``dtype``.

    Mantissas stay away from 1 and 2 by 2**-12 relative, so binade membership is robust to one rounding.
    ``exp_clip`` narrows the exponent range further.
    """
    if name == "e0m7":
        emin, emax, nmant = 0, -1, 7
    else:
        emin, emax, nmant = exponent_range(name)
    dfi = ml_dtypes.finfo(TORCH_TO_NP[dtype])
    lo = max(emin - nmant - 3, int(dfi.minexp) - int(dfi.nmant))
    hi = min(max(emin, emax) + 3, int(dfi.maxexp) - 1, exp_clip[1])
    lo = max(lo, exp_clip[0])
    e = rng.integers(lo, hi + 1, size=n)
    m = rng.uniform(1.0 + 2.0**-12, 2.0 - 2.0**-12, size=n)
    v = np.ldexp(m, e) * rng.choice([-1.0, 1.0], size=n)
    return to_numpy(from_numpy(v, dtype))


# --- bits ----------------------------------------------------------------------------------------------------------

_STRUCT = {
    torch.float64: ("<d", "<Q", 64),
    torch.float32: ("<f", "<I", 32),
    torch.float16: ("<e", "<H", 16),
}


def bits_of(value: float, dtype: torch.dtype) -> int:
    """Bit pattern of ``value`` (exactly representable in ``dtype``) as a Python int, via ``struct``."""
    if dtype == torch.bfloat16:
        b32 = struct.unpack("<I", struct.pack("<f", value))[0]
        assert b32 & 0xFFFF == 0, "not a bfloat16 value"
        return b32 >> 16
    fv, fi, _ = _STRUCT[dtype]
    return struct.unpack(fi, struct.pack(fv, value))[0]


def width_of(dtype: torch.dtype) -> int:
    return 16 if dtype == torch.bfloat16 else _STRUCT[dtype][2]


def value_of_bits(bits: int, dtype: torch.dtype) -> float:
    if dtype == torch.bfloat16:
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    fv, fi, _ = _STRUCT[dtype]
    return struct.unpack(fv, struct.pack(fi, bits))[0]


def ordered(value: float, dtype: torch.dtype) -> int:
    """Position of ``value`` on the number line of ``dtype``'s values, in Python ints (+0 and -0 both 0)."""
    b = bits_of(value, dtype)
    w = width_of(dtype)
    magnitude = b & ((1 << (w - 1)) - 1)
    return -magnitude if b >> (w - 1) else magnitude


def ulp_distance_bits(a: float, b: float, dtype: torch.dtype) -> int:
    """Exact distance in representable values, unbounded Python int (no saturation)."""
    return abs(ordered(a, dtype) - ordered(b, dtype))


def count_nextafter_steps(a: np.ndarray, b: np.ndarray, limit: int = 5000) -> np.ndarray:
    """Number of ``np.nextafter`` steps from ``a`` to ``b`` (arrays of one numpy float dtype, no NaN)."""
    a = a.copy()
    steps = np.zeros(a.shape, dtype=np.int64)
    for _ in range(limit):
        moving = a != b  # +0 == -0: they are one point
        if not moving.any():
            return steps
        a[moving] = np.nextafter(a[moving], b[moving])
        steps[moving] += 1
    raise AssertionError(f"count_nextafter_steps: more than {limit} steps")


def log2_bucket(d: int) -> int:
    """Histogram bucket of a non-negative integer distance: 0 for 0, ``k + 1`` for ``2**k <= d < 2**(k + 1)``."""
    return 0 if d == 0 else d.bit_length()


# --- assertions ----------------------------------------------------------------------------------------------------


def assert_scalar(got: torch.Tensor, expected: float, *, rtol: float = 0.0, atol: float = 0.0, key: str = "") -> None:
    """``got`` is a 0-d tensor equal to ``expected`` (exactly unless a tolerance is given)."""
    assert isinstance(got, torch.Tensor) and got.ndim == 0, f"{key}: expected a 0-d tensor, got {got!r}"
    value = got.item()
    assert not math.isnan(value), f"{key}: got NaN, expected {expected!r}"
    if rtol == 0.0 and atol == 0.0:
        assert value == expected, f"{key}: got {value!r}, expected {expected!r}"
    else:
        assert math.isclose(value, expected, rel_tol=rtol, abs_tol=atol), f"{key}: got {value!r}, expected {expected!r}"


def frac(mask: np.ndarray, within: np.ndarray | None = None) -> float:
    """``mean(mask)`` over ``within`` (all when None), 0.0 for an empty set: what the diagnostics log."""
    if within is not None:
        mask = mask[within]
    return float(np.count_nonzero(mask)) / mask.size if mask.size else 0.0


#: float32 values at the edges the property tests must hit: zeros, ties and binade edges of the FP8 grids, their max
#: and overflow points, float32 subnormals and max, and the non-finite values.
BOUNDARY_FLOATS: tuple[float, ...] = (
    0.0,
    -0.0,
    448.0,
    -448.0,
    464.0,
    480.0,
    2.0**-9,
    2.0**-10,
    1.0,
    1.0 + 2**-4,
    1.0 + 2**-8,
    57344.0,
    2.0**-149,
    2.0**-126,
    float(np.finfo(np.float32).max),
    6.0,
    float("nan"),
    float("inf"),
    -float("inf"),
    3 * 2.0**-11,
    61440.0,
    2.0**-127,
    7.0,
    2.0**-6,
    -1.0,
    -(2.0**-149),
    -float(np.finfo(np.float32).max),
    1.0 + 2**-23,
    1.0 - 2**-24,
)
