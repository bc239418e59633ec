"""A hypothesis campaign on the functional core with adversarial floats (issue 6, fault table).

Inputs are float32 (or float16/bfloat16) *bit patterns*, so NaN payloads (quiet and signalling, both signs) reach
the code unchanged, mixed with every tie and boundary of several presets: grid values, midpoints between
neighbours and the float32 values next to them, ±max and the overflow threshold, the smallest subnormal and half
of it, -0.0, float32's largest finite and smallest subnormal. Each property checks that no exception escapes
(the documented ones are for bad arguments only, see ``test_bad_arguments.py``) and that results agree with an
independent reference: ml_dtypes / numpy casts for quantize, code enumeration for grid positions, frexp for
stiffness, ``np.nextafter`` step counting for ULP distances. The whole module runs in a few seconds.
"""

from __future__ import annotations

import functools
import struct

import ml_dtypes
import numpy as np
import torch
from functional_reference import ML_NAMES, cast_saturating, code_table, exponent_range, grid_position
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from altgrad_lightning import code_index, quantize
from altgrad_lightning.functional import (
    compute_grid_steps,
    compute_stiffness_field,
    compute_ulp_distance,
    flip_statistics,
    gradient_stiffness_correlation,
    grid_alignment_error,
    grid_alignment_statistics,
    ulp_statistics,
)

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Presets fuzzed against ml_dtypes (float16 through numpy): every flavour, 4 to 16 bits.
NAMES = (*ML_NAMES, "float16")
NP_DTYPE = {name: np.dtype(getattr(ml_dtypes, name)) for name in ML_NAMES} | {"float16": np.dtype(np.float16)}


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


NAN_PAYLOADS = (0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFFFFFF, 0x7FC00001, 0xFFC00000, 0xFF800001, 0xFFFFFFFF)
F32_SPECIALS = tuple(
    _bits(v)
    for v in (0.0, -0.0, 2.0**-149, -(2.0**-149), 2.0**-126, 2.0**-126 - 2.0**-149, float(np.finfo(np.float32).max))
) + (_bits(-float(np.finfo(np.float32).max)), _bits(float("inf")), _bits(-float("inf")))


def _near(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` and their float32 neighbours on both sides."""
    v = values.astype(np.float32)
    return np.concatenate([v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))])


@functools.cache
def boundaries(name: str) -> tuple[int, ...]:
    """float32 bit patterns of the format's grid values, ties, overflow threshold and underflow tie (both signs)."""
    grid, _ = code_table(name)
    pos = grid[grid > 0]
    mids = (pos[:-1] + pos[1:]) / 2  # mids[i] is the tie between pos[i] and pos[i + 1]
    if pos.size > 300:  # 16-bit formats: the ends of the range and the binades around 1
        one = int(np.searchsorted(pos, 1.0))
        keep = np.r_[0:40, one - 20 : one + 20, pos.size - 41 : pos.size - 1]
        pos, mids = np.concatenate([pos[keep], pos[-1:]]), mids[keep]
    top_gap = pos[-1] - pos[-2]
    extra = np.array([pos[0] / 2, pos[-1] + top_gap / 2, pos[-1] + top_gap])  # underflow tie, overflow threshold
    points = np.concatenate([pos, mids, extra])
    exact = points.astype(np.float32).astype(np.float64) == points  # every tie of these presets is a float32
    near = _near(points[exact])
    return tuple(int(b) for b in np.concatenate([near, -near]).view(np.uint32))


def f32_bits(name: str | None = None) -> st.SearchStrategy[int]:
    random = st.integers(0, 2**32 - 1)
    nan = st.integers(1, 2**23 - 1).flatmap(lambda m: st.sampled_from([0x7F800000 | m, 0xFF800000 | m]))
    special = st.sampled_from(F32_SPECIALS + NAN_PAYLOADS)
    parts = [random, nan, special]
    if name is not None:
        parts.append(st.sampled_from(boundaries(name)))
    return st.one_of(*parts)


def as_f32(bits: list[int]) -> np.ndarray:
    return np.array(bits, dtype=np.uint32).view(np.float32)


def tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.copy())


def assert_same(ours: np.ndarray, ref: np.ndarray, x: np.ndarray, what: str) -> None:
    """Equal values, NaN where NaN, and the same sign bit (so -0 is checked)."""
    nan = np.isnan(ref)
    bad = (np.isnan(ours) != nan) | (~nan & ((ours != ref) | (np.signbit(ours) != np.signbit(ref))))
    assert not bad.any(), (what, x[bad][:5], ours[bad][:5], ref[bad][:5])


ARRAYS = {name: st.lists(f32_bits(name), min_size=1, max_size=48) for name in NAMES}
ANY_F32 = st.lists(f32_bits(), min_size=1, max_size=48)


# --- quantize ------------------------------------------------------------------------------------------------------


def ml_reference(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(ml_dtypes cast of float32 ``x``, which elements the cast is an oracle for).

    ml_dtypes casts float32 directly (one rounding). Where this project documents a different choice the element
    is left to the dedicated tests: NaN into a format without NaN (ml_dtypes gives -0, quantize NaN), and the
    float32 denormals in (2**-127, 2**-126) on float8_e8m0fnu (ml_dtypes rounds all of them up; quantize rounds to
    the nearer power of two).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(NP_DTYPE[name]).astype(np.float32)
    ok = np.ones(x.shape, bool)
    if name.startswith(("float6", "float4")):
        ok &= ~np.isnan(x)
    if name == "float8_e8m0fnu":
        ok &= ~((np.abs(x) > 2.0**-127) & (np.abs(x) < 2.0**-126))
    return ref, ok


@FUZZ
@given(st.data())
def test_quantize_agrees_with_ml_dtypes_casts(data):
    """Nearest rounding equals the ml_dtypes cast bit for bit (sign of zero, NaN, overflow) for every preset, with
    the overflow flag that matches ml_dtypes (``saturate=False``, except the finite FP6/FP4 which saturate)."""
    for name in NAMES:
        x = as_f32(data.draw(ARRAYS[name], label=name))
        saturate = name.startswith(("float6", "float4"))
        ours = quantize(tensor(x), name, saturate=saturate).numpy()
        ref, ok = ml_reference(x, name)
        assert_same(ours[ok], ref[ok], x[ok], name)
        if name.startswith(("float6", "float4")):
            assert np.isnan(ours[np.isnan(x)]).all(), name  # NaN in, NaN out (documented)


def _toward_zero_ref(x: np.ndarray, name: str) -> np.ndarray:
    grid, _ = code_table(name)
    a = np.abs(x.astype(np.float64))
    i = np.clip(np.searchsorted(grid, a, side="right") - 1, 0, len(grid) - 1)
    return np.copysign(grid[i], x)


@FUZZ
@given(st.data())
def test_toward_zero_and_stochastic_pick_a_neighbour(data):
    """Finite inputs inside the range: toward_zero gives the largest grid magnitude <= |x| (code enumeration);
    stochastic gives it or the next grid value away from zero, never anything else; NaN stays NaN."""
    for name in ("float8_e4m3fn", "float8_e5m2", "float6_e3m2fn", "bfloat16"):
        x = as_f32(data.draw(ARRAYS[name], label=name))
        grid, _ = code_table(name)
        inside = np.isfinite(x) & (np.abs(x.astype(np.float64)) <= grid[-1])
        tz = quantize(tensor(x), name, rounding="toward_zero").numpy().astype(np.float64)
        down = _toward_zero_ref(x[inside], name)
        assert np.array_equal(tz[inside], down), name
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
        sr = quantize(tensor(x), name, rounding="stochastic", generator=g).numpy().astype(np.float64)
        i = np.searchsorted(grid, np.abs(down), side="left")
        up = np.copysign(grid[np.minimum(i + 1, len(grid) - 1)], x[inside])
        on = down == x[inside]
        assert np.all((sr[inside] == down) | (~on & (sr[inside] == up))), name
        assert np.isnan(tz[np.isnan(x)]).all() and np.isnan(sr[np.isnan(x)]).all()


@FUZZ
@given(ANY_F32, st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_quantize_with_any_scale_raises_only_documented_errors(bits, scale):
    """Any Python float as scale: a ValueError for zero, negative, NaN, inf or one float32 cannot hold, otherwise a
    result; a power-of-two scale gives exactly ``scale * q(x / scale)`` where ``x / scale`` is exact in float32."""
    x = as_f32(bits)
    try:
        ours = quantize(tensor(x), "float8_e4m3fn", scale=scale).numpy()
    except ValueError as err:
        assert "`scale`" in str(err)
        assert not (0 < scale < np.inf) or np.float32(scale) in (0, np.inf)
        return
    assert 0 < scale < np.inf
    mantissa, _ = np.frexp(scale)
    if mantissa == 0.5:
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            xs = x.astype(np.float64) / scale
        exact = np.isfinite(xs) & (xs.astype(np.float32).astype(np.float64) == xs) & np.isfinite(x)
        ref = cast_saturating(xs[exact], "float8_e4m3fn") * scale
        in_range = np.abs(ref) <= float(np.finfo(np.float32).max)
        assert_same(
            ours[exact][in_range].astype(np.float64),
            ref[in_range].astype(np.float32).astype(np.float64),
            x[exact][in_range],
            "scaled",
        )


# --- stiffness, grid, code index, flips -------------------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_stiffness_equals_frexp_reference(data):
    """S = 2**(clamp(floor(log2|w|), emin, emax) - M) from numpy's frexp; NaN for zero, NaN and ±inf."""
    for name in ("float8_e4m3fn", "float8_e5m2fnuz", "float6_e2m3fn", "bfloat16", "float16"):
        x = as_f32(data.draw(ARRAYS[name], label=name))
        ours = compute_stiffness_field(tensor(x), name).numpy().astype(np.float64)
        emin, emax, nmant = exponent_range(name)
        valid = np.isfinite(x) & (x != 0)
        e = np.clip(np.frexp(np.abs(x[valid].astype(np.float64)))[1] - 1, emin, emax)
        assert np.array_equal(ours[valid], np.ldexp(1.0, e - nmant)), name
        assert np.isnan(ours[~valid]).all(), name


@FUZZ
@given(st.data())
def test_grid_error_code_index_and_statistics(data):
    """grid error = |x - saturating cast|; code index = grid position from code enumeration; the statistics are
    finite, fractions in [0, 1], non-finite weights counted apart."""
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float4_e2m1fn", "float16"):
        x = as_f32(data.draw(ARRAYS[name], label=name))
        t = tensor(x)
        finite = np.isfinite(x)
        q = cast_saturating(x[finite].astype(np.float64), name)
        err = grid_alignment_error(t, name).numpy().astype(np.float64)
        # |x - q| rounded once to float32, as the float32 subtraction does
        assert np.array_equal(err[finite], np.abs(x[finite] - q).astype(np.float32).astype(np.float64)), name
        assert np.isnan(err[~finite]).all()
        idx = code_index(t, name).numpy()
        zero = grid_position(np.zeros(1), name)
        assert np.array_equal(idx[finite], grid_position(q + 0.0, name) - zero), name
        stats = {k: v.item() for k, v in grid_alignment_statistics(t, name).items()}
        assert all(np.isfinite(v) for v in stats.values()), stats
        assert stats["grid_nonfinite_frac"] == np.mean(~finite)
        for k in ("on_grid_frac", "overflow_frac", "underflow_frac"):
            assert 0.0 <= stats[k] <= 1.0


@FUZZ
@given(st.data())
def test_grid_steps_and_flip_statistics(data):
    """Grid steps = |position(q(after)) - position(q(before))| on the enumerated grid; flip statistics finite."""
    for name in ("float8_e4m3fn", "float8_e5m2", "float6_e3m2fn"):
        n = data.draw(st.integers(1, 32), label="n")
        before = as_f32(data.draw(st.lists(f32_bits(name), min_size=n, max_size=n), label="before"))
        after = as_f32(data.draw(st.lists(f32_bits(name), min_size=n, max_size=n), label="after"))
        steps = compute_grid_steps(tensor(before), tensor(after), name).numpy()
        ok = ~np.isnan(before) & ~np.isnan(after)
        qb = cast_saturating(before[ok].astype(np.float64), name) + 0.0
        qa = cast_saturating(after[ok].astype(np.float64), name) + 0.0
        assert np.array_equal(steps[ok], np.abs(grid_position(qa, name) - grid_position(qb, name))), name
        assert np.isnan(steps[~ok]).all()
        stats = {k: v.item() for k, v in flip_statistics(tensor(before), tensor(after), name).items()}
        assert all(np.isfinite(v) and 0.0 <= v for v in stats.values()), stats
        pair = np.isfinite(before) & np.isfinite(after)
        assert stats["flip_nonfinite_frac"] == np.mean(~pair)


@FUZZ
@given(ANY_F32, st.data())
def test_gradient_stiffness_never_nan(bits, data):
    """Adversarial weights and gradients: every statistic finite, fractions in [0, 1], the correlation in [-1, 1],
    ``grad_below_stiffness_frac`` equal to the frexp reference over the valid elements."""
    w = as_f32(bits)
    g = as_f32(data.draw(st.lists(f32_bits(), min_size=w.size, max_size=w.size), label="g"))
    stats = {k: v.item() for k, v in gradient_stiffness_correlation(tensor(w), tensor(g), "e4m3").items()}
    assert all(np.isfinite(v) for v in stats.values()), stats
    assert -1.0 <= stats["grad_stiff_correlation"] <= 1.0
    nonfinite = ~np.isfinite(w) | ~np.isfinite(g)
    valid = ~nonfinite & (w != 0)
    e = np.clip(np.frexp(np.abs(w[valid].astype(np.float64)))[1] - 1, -6, 8)
    below = np.abs(g[valid].astype(np.float64)) < np.ldexp(1.0, e - 3)
    assert stats["grad_below_stiffness_frac"] == (below.mean() if valid.any() else 0.0)
    assert stats["grad_nonfinite_frac"] == nonfinite.mean()
    assert stats["zero_weight_frac"] == ((w == 0) & ~nonfinite).mean()


# --- ULP distance ---------------------------------------------------------------------------------------------------

ULP_DTYPES = {
    torch.float32: (np.float32, np.uint32, 32),
    torch.float16: (np.float16, np.uint16, 16),
    torch.bfloat16: (ml_dtypes.bfloat16, np.uint16, 16),
}


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


@FUZZ
@given(st.sampled_from(list(ULP_DTYPES)), st.data())
def test_ulp_distance_equals_nextafter_steps(dtype, data):
    """From an adversarial start (random bits, ±0, the largest finite, the smallest subnormal), walk k
    ``np.nextafter`` steps toward a random target: the distance is k (across zero and binades, into ±inf at the
    end of the range); NaN on either side gives -1; the statistics stay finite."""
    np_type, utype, width = ULP_DTYPES[dtype]
    n = data.draw(st.integers(1, 16), label="n")
    start_bits = st.one_of(
        st.integers(0, 2**width - 1), st.sampled_from([0, 1, 2 ** (width - 1), 2 ** (width - 1) + 1])
    )
    a = np.array(data.draw(st.lists(start_bits, min_size=n, max_size=n), label="a"), dtype=utype).view(np_type)
    toward = np.array(data.draw(st.lists(st.sampled_from([1.0, -1.0, 0.0]), min_size=n, max_size=n)), np.float64)
    toward = (toward * np.inf).astype(np_type)
    toward[np.isnan(toward)] = 0  # 0 * inf
    k = np.array(data.draw(st.lists(st.integers(0, 40), min_size=n, max_size=n), label="k"))
    b = a.copy()
    steps = np.zeros(n, np.int64)
    for i in range(n):
        for _ in range(k[i]):
            nxt = np.nextafter(b[i : i + 1], toward[i : i + 1])
            if nxt[0] == b[i] or np.isnan(b[i]):  # reached the target, or a NaN start
                break
            b[i : i + 1] = nxt
            steps[i] += 1
    d = compute_ulp_distance(_to_torch(a, dtype), _to_torch(b, dtype)).numpy()
    nan = np.isnan(a.astype(np.float64))
    assert np.array_equal(d[~nan], steps[~nan]), (a, b, d, steps)
    assert (d[nan] == -1).all()
    back = compute_ulp_distance(_to_torch(b, dtype), _to_torch(a, dtype)).numpy()
    assert np.array_equal(d, back)  # symmetric
    stats = ulp_statistics(_to_torch(a, dtype), _to_torch(b, dtype))
    assert all(torch.isfinite(v).all() for v in stats.values())
