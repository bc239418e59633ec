"""flip_statistics / compute_grid_steps against ml_dtypes casts and positions in the sorted list of all code values
(SPEC §3.5), and the cross-family contract: 0-d tensors on the input's device, no host sync, argument errors."""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np
import pytest
import torch
from functional_reference import (
    BOUNDARY_FLOATS,
    ENUMERABLE,
    ML_NAMES,
    assert_scalar,
    code_table,
    frac,
    from_numpy,
    grid_position,
    nearest_code,
    round_ref,
    spanning_values,
    to_numpy,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import altgrad_lightning.functional as F
from altgrad_lightning import get_format
from altgrad_lightning import quantize as al_quantize
from altgrad_lightning.functional._reduce import merge
from altgrad_lightning.functional.flips import _flip_compute, _flip_update

NAMES = (*ENUMERABLE, "e0m7")
FLIP_KEYS = (
    "flip_frac",
    "update_stall_frac",
    "updated_frac",
    "grid_steps_mean",
    "flip_nonfinite_frac",
    "sr_update_stall_frac",
    "update_norm_retained",
    "sr_update_norm_retained",
)
SR_KEYS = FLIP_KEYS[5:]
SCALE_NP2 = float(np.float32(0.1))


def ref_quantize(w: np.ndarray, name: str, dtype: torch.dtype, scale: float | None) -> np.ndarray:
    """Saturating nearest-even rounding of w / scale onto the unscaled grid: unscaled in the working precision
    (float32, float64 for float64 weights); with a scale the quotient is float64 (the documented arithmetic) and
    rounded by the exact nearest-code search."""
    if scale is not None:
        return nearest_code(w / scale, name)
    wp = np.float64 if dtype == torch.float64 else np.float32
    return round_ref(w.astype(wp).astype(np.float64), name, exact_float32=wp is np.float32)


def ref_steps(before: np.ndarray, after: np.ndarray, name: str, dtype: torch.dtype, scale=None):
    """``(q_before, q_after, steps)``: steps = |position difference in the sorted code list| (+0/-0 one position)."""
    qb, qa = ref_quantize(before, name, dtype, scale), ref_quantize(after, name, dtype, scale)
    return qb, qa, np.abs(grid_position(qa, name) - grid_position(qb, name))


def ref_survival(v: np.ndarray, d: np.ndarray, qa: np.ndarray, name: str, scale: float | None) -> dict[str, float]:
    """The stochastic-rounding what-if from the sorted list of the format's values: stored value ``v`` (on the
    unscaled grid), update ``d``. The neighbour in the direction of ``d`` is the next value in the list (none past
    either end); stochastic rounding leaves ``v`` with probability ``1 - min(1, |d| / gap)`` and moves it by ``d``
    on average (``d`` itself), clipped to the ends of the list."""
    grid, _ = code_table(name)
    s = 1.0 if scale is None else scale
    pos = grid_position(v + 0.0, name).astype(np.int64)
    nb = np.where(d > 0, pos + 1, pos - 1)
    exists = (nb >= 0) & (nb < grid.size)
    gap = np.abs(grid[np.clip(nb, 0, grid.size - 1)] - v)
    p_move = np.where(exists, np.minimum(1.0, np.abs(d) / s / gap), 0.0)
    moved_to = v + d / s
    clipped = np.clip(moved_to, grid[0], grid[-1])
    expected = np.where(clipped == moved_to, d, (clipped - v) * s)
    d_sq = np.sum(d * d)
    return {
        "sr_update_stall_frac": float(np.sum(1.0 - p_move) / d.size) if d.size else 0.0,
        "update_norm_retained": math.sqrt(np.sum(((qa - v) * s) ** 2) / d_sq) if d_sq else 0.0,
        "sr_update_norm_retained": math.sqrt(np.sum(expected**2) / d_sq) if d_sq else 0.0,
    }


def ref_flip_stats(before, after, name, dtype, scale=None) -> dict[str, float]:
    qb, qa, steps = ref_steps(before, after, name, dtype, scale)
    valid = np.isfinite(before) & np.isfinite(after) & ~np.isnan(steps)
    updated = valid & (after != before)
    d = after[updated].astype(np.float64) - before[updated].astype(np.float64)
    # The exact nearest value (e8m0 casts of float32 denormals round up instead, see quantize's docstring).
    s = 1.0 if scale is None else scale
    vb, va = nearest_code(before[updated] / s, name), nearest_code(after[updated] / s, name)
    return {
        "flip_frac": frac(qa != qb, valid),
        "update_stall_frac": frac(qa == qb, updated),
        "updated_frac": frac(after != before, valid),
        "grid_steps_mean": float(np.mean(steps[valid])) if valid.any() else 0.0,
        "flip_nonfinite_frac": frac(~valid),
        **ref_survival(vb, d, va, name, scale),
    }


def assert_flip_stats(got: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(got) == set(FLIP_KEYS)
    for key in FLIP_KEYS:
        exact = key not in ("grid_steps_mean", *SR_KEYS)
        assert_scalar(got[key], expected[key], rtol=0.0 if exact else 1e-12, key=key)


@functools.cache
def flip_data(name: str, dtype: torch.dtype, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weights spanning the format (times scale) and updates from ~1/16 of a grid step to ~16 grid steps (so stalls
    and flips both happen), a block of zero updates, updates out of zero, and NaN/inf pairs."""
    rng = np.random.default_rng(zlib.crc32(f"flip{name}{dtype}{scale}".encode()))
    s = 1.0 if scale is None else scale
    exp_clip = (-2000, 2000) if scale is None else (-100, 100)  # keep w / scale inside float32's normal range
    before = spanning_values(rng, name, 600, dtype, exp_clip=exp_clip) * s
    mant = 3 if name in ("float8_e8m0fnu",) else {"float4_e2m1fn": 1, "bfloat16": 7, "float16": 10}.get(name, 3)
    delta = before * 2.0 ** (rng.uniform(-4, 4, before.size) - mant) * rng.choice([-1.0, 1.0], before.size)
    delta[:60] = 0.0
    before = np.concatenate([before, [0.0, 0.0, -0.0, np.nan, 1.0, np.inf, 2.0]])
    delta = np.concatenate([delta, [s * 2.0**-12, -s * 0.75, s * 0.3, 1.0, np.nan, 1.0, np.inf]])
    with np.errstate(over="ignore", invalid="ignore"):
        before = to_numpy(from_numpy(before, dtype))
        after = to_numpy(from_numpy(before + delta, dtype))
    return before, after


@pytest.mark.parametrize("scale", (None, 2.0**-5, SCALE_NP2), ids=["none", "2^-5", "0.1"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_flip_statistics_match_reference(name: str, dtype: torch.dtype, scale: float | None) -> None:
    """flip_frac, update_stall_frac (among Δ != 0), updated_frac, grid_steps_mean and the nonfinite fraction equal
    a reference built from ml_dtypes casts and positions in the sorted list of the format's code values."""
    before, after = flip_data(name, dtype, scale)
    expected = ref_flip_stats(before, after, name, dtype, scale)
    if name == "bfloat16" and dtype == torch.bfloat16:  # storage grid ~ format grid: (almost) every update flips
        assert expected["update_stall_frac"] == 0.0 if scale != SCALE_NP2 else expected["update_stall_frac"] < 0.05
    else:
        assert 0.05 < expected["update_stall_frac"] < 0.95  # both outcomes occur
    assert expected["flip_frac"] > 0.05
    got = F.flip_statistics(from_numpy(before, dtype), from_numpy(after, dtype), name, scale=scale)
    assert_flip_stats(got, expected)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_grid_steps_elementwise(name: str, dtype: torch.dtype) -> None:
    """compute_grid_steps = |position(q(after)) - position(q(before))| element-wise, float64; NaN where either side
    is NaN (or, for e8m0, has no grid value); ±inf saturates to ±max's position."""
    before, after = flip_data(name, dtype)
    got = F.compute_grid_steps(from_numpy(before, dtype), from_numpy(after, dtype), name)
    assert got.dtype == torch.float64
    _, _, steps = ref_steps(before, after, name, dtype)
    np.testing.assert_array_equal(got.numpy(), steps)


def test_grid_steps_across_zero_count_zero_once() -> None:
    """From the smallest negative subnormal to the smallest positive one is 2 steps on e4m3fn (+0 and -0 are one
    code position); a sweep of every e4m3fn value against 0 gives its rank from zero."""
    sub = 2.0**-9
    got = F.compute_grid_steps(torch.tensor([-sub, -0.0, 0.0]), torch.tensor([sub, 0.0, sub]), "float8_e4m3fn")
    assert got.tolist() == [2.0, 0.0, 1.0]
    values = to_numpy(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32))
    values = values[np.isfinite(values)]
    got = F.compute_grid_steps(torch.zeros(values.size), from_numpy(values, torch.float32), "float8_e4m3fn")
    zero = grid_position(np.zeros(1), "float8_e4m3fn")
    np.testing.assert_array_equal(got.numpy(), np.abs(grid_position(values, "float8_e4m3fn") - zero))


@pytest.mark.parametrize(
    ("name", "delta", "stalls"),
    [
        ("bfloat16", 1e-3, True),  # spacing above 1.0 is 2**-7: half of it is 0.0039
        ("bfloat16", -1e-3, True),  # spacing below 1.0 is 2**-8: half of it is 0.00195
        ("bfloat16", 5e-3, False),
        ("bfloat16", -5e-3, False),
        ("float8_e4m3fn", 5e-3, True),  # spacing above 1.0 is 0.125
        ("float8_e4m3fn", 0.05, True),
        ("float8_e4m3fn", 0.07, False),
        ("float8_e4m3fn", -0.03, True),  # spacing below 1.0 is 0.0625: half of it is 0.03125
        ("float8_e4m3fn", -0.035, False),
    ],
)
def test_small_update_is_swallowed(name: str, delta: float, stalls: bool) -> None:
    """The AdamW story: at w = 1.0 an update smaller than half the spacing on the format's grid is swallowed (stall),
    a larger one flips the stored value; Δ is nonzero in float32 either way."""
    before = torch.ones(4)
    after = before + delta
    assert bool((after != before).all())
    ref_stall = bool(round_ref(to_numpy(after), name, exact_float32=True)[0] == 1.0)
    assert ref_stall == stalls  # the reference agrees with the hand-worked story
    got = F.flip_statistics(before, after, name)
    assert_scalar(got["update_stall_frac"], float(stalls))
    assert_scalar(got["flip_frac"], float(not stalls))
    assert_scalar(got["updated_frac"], 1.0)


def test_all_zero_update_is_not_nan() -> None:
    """Nothing updated: update_stall_frac is 0.0 (a fraction of nothing), not NaN, and nothing flipped."""
    w = torch.tensor([1.0, 0.3, -2.0, 0.0])
    got = F.flip_statistics(w, w.clone(), "e4m3")
    assert {k: v.item() for k, v in got.items()} == dict.fromkeys(FLIP_KEYS, 0.0)


@pytest.mark.parametrize("name", ("bfloat16", "float8_e4m3fn", "float8_e5m2"))
def test_adamw_step_stalls_match_numpy(name: str) -> None:
    """A real torch.optim.AdamW step (not an SGD step, not already-updated weights): w is captured before the step,
    w' after it, and update_stall_frac / flip_frac equal a numpy computation from the captured pair; with lr 1e-3 most
    updates stall on the low-precision grids, some flip."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2000) * 2)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=1e-2)
    x = torch.randn(2000)
    loss = ((p * x).sum() - 1.0) ** 2
    loss.backward()
    before, grad = p.detach().clone(), p.grad.detach().clone()
    opt.step()
    after = p.detach().clone()
    b, a, g = to_numpy(before), to_numpy(after), to_numpy(grad)
    # It is AdamW's first step (decoupled decay, then -lr * g / (|g| + eps)), not an SGD step -lr * g.
    np.testing.assert_allclose(a - b, -1e-3 * 1e-2 * b - 1e-3 * g / (np.abs(g) + 1e-8), rtol=0, atol=2e-6)
    qb = round_ref(b, name, exact_float32=True)
    qa = round_ref(a, name, exact_float32=True)
    updated = a != b
    expected_stall = np.count_nonzero((qa == qb) & updated) / np.count_nonzero(updated)
    got = F.flip_statistics(before, after, name)
    assert_scalar(got["update_stall_frac"], expected_stall)
    assert_scalar(got["flip_frac"], np.count_nonzero(qa != qb) / b.size)
    assert 0.5 < expected_stall < 1.0


# --- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", (None, SCALE_NP2))
@pytest.mark.parametrize("name", ("float8_e4m3fn", "float8_e8m0fnu", "bfloat16", "e0m7"))
def test_flip_sums_merge(name: str, scale: float | None) -> None:
    """_update on uneven chunks (one empty, one all-NaN), merged, then _compute, equals the public function on the
    concatenation: counted fractions exactly, the float sums' statistics to rtol 1e-12."""
    b, a = flip_data(name, torch.float32, scale)
    bt, at = from_numpy(b, torch.float32), from_numpy(a, torch.float32)
    fmt = get_format(name)
    scale_t = None if scale is None else torch.tensor(scale, dtype=torch.float32)
    nan = torch.full((3,), float("nan"))
    cuts = [(0, 0), (0, 1), None, (1, 300), (300, b.size)]
    chunks = [(nan, nan) if c is None else (bt[c[0] : c[1]], at[c[0] : c[1]]) for c in cuts]
    got = _flip_compute(functools.reduce(merge, [_flip_update(x, y, fmt, scale_t) for x, y in chunks]))
    whole = F.flip_statistics(torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]), name, scale=scale)
    assert set(got) == set(whole) == set(FLIP_KEYS)
    for key in FLIP_KEYS:
        if key in ("grid_steps_mean", *SR_KEYS):
            assert math.isclose(got[key].item(), whole[key].item(), rel_tol=1e-12), key
        else:
            assert got[key].item() == whole[key].item(), key


# --- contract shared by every family -------------------------------------------------------------------------------

STAT_CALLS = {
    "gradient_stiffness_correlation": lambda x, y: F.gradient_stiffness_correlation(x, y, "e4m3"),
    "grid_alignment_statistics": lambda x, y: F.grid_alignment_statistics(x, "e4m3"),
    "ulp_statistics": lambda x, y: F.ulp_statistics(x, y),
    "flip_statistics": lambda x, y: F.flip_statistics(x, y, "e4m3"),
}
FIELD_CALLS = {
    "compute_stiffness_field": lambda x, y: F.compute_stiffness_field(x, "e4m3"),
    "grid_alignment_error": lambda x, y: F.grid_alignment_error(x, "e4m3"),
    "compute_ulp_distance": lambda x, y: F.compute_ulp_distance(x, y),
    "compute_grid_steps": lambda x, y: F.compute_grid_steps(x, y, "e4m3"),
}


@pytest.mark.parametrize("device", ("cpu", "meta"))
@pytest.mark.parametrize("call", list(STAT_CALLS), ids=str)
def test_statistics_are_0d_tensors_on_input_device(call: str, device: str) -> None:
    """Every statistic is a 0-d tensor on the input's device (ulp_histogram: 1-D int64, 65 buckets). On the meta
    device no value exists, so any host synchronisation (.item(), bool(), data-dependent shapes) would raise: passing
    there shows the functions never sync."""
    x = torch.randn(3, 5, device=device)
    y = torch.randn(3, 5, device=device)
    out = STAT_CALLS[call](x, y)
    assert out
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and value.device == x.device, key
        if key == "ulp_histogram":
            assert value.dtype == torch.int64 and value.shape == (65,)
        else:
            assert value.ndim == 0 and value.is_floating_point(), key


@pytest.mark.parametrize("device", ("cpu", "meta"))
@pytest.mark.parametrize("call", list(FIELD_CALLS), ids=str)
def test_fields_keep_shape_and_device(call: str, device: str) -> None:
    """Element-wise functions return the input's shape on its device (ULP distance as int64) without syncing."""
    x = torch.randn(3, 5, device=device)
    out = FIELD_CALLS[call](x, torch.randn(3, 5, device=device))
    assert out.shape == x.shape and out.device == x.device
    assert out.dtype == torch.int64 if call == "compute_ulp_distance" else out.is_floating_point()


def test_scale_tensor_on_meta_device_does_not_sync() -> None:
    """A tensor scale on a non-CPU device is accepted without reading its values (no sync)."""
    x = torch.randn(4, device="meta")
    scale = torch.ones((), device="meta")
    for out in (F.grid_alignment_statistics(x, "e4m3", scale=scale), F.flip_statistics(x, x, "e4m3", scale=scale)):
        assert all(v.device.type == "meta" for v in out.values())


_W = torch.ones(4)
_CALLS_1 = {
    "compute_stiffness_field": F.compute_stiffness_field,
    "grid_alignment_error": F.grid_alignment_error,
    "grid_alignment_statistics": F.grid_alignment_statistics,
}
_CALLS_2 = {
    "gradient_stiffness_correlation": (F.gradient_stiffness_correlation, ("w", "g")),
    "flip_statistics": (F.flip_statistics, ("before", "after")),
    "compute_grid_steps": (F.compute_grid_steps, ("before", "after")),
}


@pytest.mark.parametrize("call", list(_CALLS_2))
def test_bad_pairs(call: str) -> None:
    """Mismatched shapes (ValueError), integer tensors and non-tensors (TypeError) name the offending argument."""
    fn, (a, b) = _CALLS_2[call]
    with pytest.raises(ValueError, match=f"`{a}` and `{b}`.*same shape.*\\(4,\\).*\\(5,\\)"):
        fn(_W, torch.ones(5), "e4m3")
    with pytest.raises(TypeError, match=f"`{b}`.*torch.int64"):
        fn(_W, torch.ones(4, dtype=torch.int64), "e4m3")
    with pytest.raises(TypeError, match=f"`{a}`.*list"):
        fn([1.0, 2.0, 3.0, 4.0], _W, "e4m3")


@pytest.mark.parametrize("fn", (F.compute_ulp_distance, F.ulp_statistics), ids=lambda f: f.__name__)
def test_bad_ulp_arguments(fn) -> None:
    """ULP distances need one dtype on both sides (TypeError naming both), one shape (ValueError), float tensors."""
    with pytest.raises(TypeError, match="`before` and `after`.*same dtype.*float32.*float64"):
        fn(_W, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="`before` and `after`.*same shape"):
        fn(_W, torch.ones(2, 2))
    with pytest.raises(TypeError, match="`before`.*torch.int32"):
        fn(torch.ones(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="`after`.*ndarray"):
        fn(_W, np.ones(4, dtype=np.float32))


@pytest.mark.parametrize("call", [*_CALLS_1, *_CALLS_2])
def test_bad_format_and_scale(call: str) -> None:
    """An unknown format name is a ValueError quoting it, a non-format a TypeError; scale must be a positive finite
    number or a float tensor that broadcasts (ValueError / TypeError naming `scale`)."""
    if call in _CALLS_1:
        fn = functools.partial(_CALLS_1[call], _W)
    else:
        fn = functools.partial(_CALLS_2[call][0], _W, _W)
    with pytest.raises(ValueError, match="'float8_e4m9'"):
        fn("float8_e4m9")
    with pytest.raises(TypeError, match="3.5"):
        fn(3.5)
    for bad in (0.0, -1.0, float("inf"), float("nan"), torch.tensor([1.0, -1.0, 1.0, 1.0])):
        with pytest.raises(ValueError, match="`scale`"):
            fn("e4m3", scale=bad)
    with pytest.raises(ValueError, match="`scale`.*broadcast"):
        fn("e4m3", scale=torch.ones(3))
    for bad in ("2", torch.tensor(2), True):
        with pytest.raises(TypeError, match="`scale`"):
            fn("e4m3", scale=bad)


def test_bad_format_names_the_argument() -> None:
    """The format error names the argument the caller passed it as (`fmt`), as every other error does."""
    with pytest.raises(ValueError, match="`fmt`"):
        F.compute_stiffness_field(_W, "float8_e4m9")


# --- properties ----------------------------------------------------------------------------------------------------

_F32 = st.one_of(st.floats(width=32), st.sampled_from(BOUNDARY_FLOATS))


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(st.tuples(_F32, _F32), max_size=40),
    name=st.sampled_from([*ML_NAMES, "float16", "float32", "float64", "e0m7", "e2m5", "e7m0"]),
    scale=st.sampled_from([None, 2.0**-8, 0.3, 100.0]),
)
def test_property_adversarial_float32(pairs: list[tuple[float, float]], name: str, scale: float | None) -> None:
    """On any float32 pairs (NaN, ±inf, -0, subnormals, ties, format boundaries): no exception; every fraction is
    finite in [0, 1]; grid_steps_mean finite >= 0; grid steps are NaN or non-negative whole numbers; stalls never
    exceed updates (stall * updated <= 1 - flip)."""
    b = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    a = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    steps = F.compute_grid_steps(b, a, name, scale=scale)
    finite_steps = steps[~torch.isnan(steps)]
    assert (finite_steps >= 0).all() and torch.equal(finite_steps, finite_steps.round())
    stats = F.flip_statistics(b, a, name, scale=scale)
    for key, value in stats.items():
        v = value.item()
        assert math.isfinite(v) and v >= 0.0, key
        if key.endswith("_frac"):
            assert v <= 1.0, key
    stalled = stats["update_stall_frac"].item() * stats["updated_frac"].item()  # fraction of valid pairs
    assert stalled <= 1.0 - stats["flip_frac"].item() + 1e-12


# --- stochastic-rounding survival against a Monte-Carlo simulation -------------------------------------------------


@pytest.mark.parametrize("name", ("float8_e4m3fn", "float8_e5m2", "bfloat16", "float4_e2m1fn"))
def test_sr_survival_matches_monte_carlo(name: str) -> None:
    """Weights on the grid (powers of two among them, ±max, zero), updates from 1/100 of a gap to 3 gaps in both
    directions: over 4000 draws of ``quantize(w + Δ, rounding="stochastic")`` the fraction of updated weights that
    stay put equals ``sr_update_stall_frac`` within 5 standard errors, and the mean movement's norm over ‖Δ‖ equals
    ``sr_update_norm_retained``."""
    fmt = get_format(name)
    grid, _ = code_table(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    v = np.concatenate([rng.choice(grid, 300), [0.0, grid[-1], -grid[-1], 1.0, -1.0, 2.0, 0.5]])
    pos = np.searchsorted(grid, v)
    gap = np.maximum(np.diff(grid)[np.clip(pos, 0, grid.size - 2)], np.diff(grid)[np.clip(pos - 1, 0, grid.size - 2)])
    delta = gap * rng.choice([0.01, 0.3, 0.5, 0.9, 1.0, 2.5], v.size) * rng.choice([-1.0, 1.0], v.size)
    before = torch.tensor(v, dtype=torch.float32)
    after = torch.tensor(v + delta, dtype=torch.float32)  # the update applied in float32, as an optimizer does
    d = (after.double() - before.double()).numpy()
    stats = F.flip_statistics(before, after, name)
    draws = 4000
    x = after.double().repeat(draws, 1)  # SR of the stored float32 value, exactly (float64 holds it)
    gen = torch.Generator().manual_seed(0)
    q = al_quantize(x, fmt, rounding="stochastic", saturate=True, generator=gen).numpy()
    updated = (d != 0) & np.isfinite(d)  # bfloat16's max + 2.5 gaps leaves float32: not an update, not counted
    stayed = (q[:, updated] == v[updated]).mean()
    expected = stats["sr_update_stall_frac"].item()
    se = math.sqrt(max(expected * (1 - expected), 1e-4) / (draws * updated.sum()))
    assert abs(stayed - expected) < 5 * se + 1e-12, (stayed, expected)
    movement = q.mean(axis=0)[updated] - v[updated]
    retained = math.sqrt(np.sum(movement**2) / np.sum(d[updated] ** 2))
    assert retained == pytest.approx(stats["sr_update_norm_retained"].item(), abs=0.02)
