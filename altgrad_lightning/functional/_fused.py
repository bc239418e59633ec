"""The fast path: every diagnostic of every format in two Triton kernels over a whole list of parameters.

The reference path (``_update`` functions of this package, one call per parameter and family) runs dozens of
elementwise kernels per parameter, each reading and writing full-size temporaries. A monitor that stays switched
on must cost next to nothing, so on CUDA the callback uses two kernels per format instead:

- ``before`` (at ``on_before_optimizer_step``): reads ``w`` and ``g`` once, writes the snapshot of ``w`` that the
  ULP and flip diagnostics need (first format only), and reduces the stiffness and grid-alignment sums;
- ``after`` (in the optimizer's step post hook): reads the snapshot and ``w'`` once and reduces the ULP sums and
  the fine ULP histogram (first format only) and the flip sums.

Each kernel walks all parameters at once through a table of data pointers (no launch per parameter, no
concatenation copy), so one step touches about 20 bytes per float32 parameter for one format, the floor of
``benchmarks/NOTES.md``. Every program reduces its chunk to one row of partial sums; one ``sum`` over the rows
gives the same sums as the reference ``_update`` functions (counts exactly, float64 sums up to summation order),
which ``tests/test_fused.py`` checks on adversarial inputs.

What the fast path covers (anything else takes the reference path, per optimizer): contiguous, 16-byte aligned float32
weights on one CUDA device, such float32 gradients, no per-tensor scaling, and signed formats with a
zero, at least one mantissa bit and ``emin >= -126`` whose values are float32 values — every preset but the
unsigned ``float8_e8m0fnu`` and the fixed-point ``e0m7``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from altgrad_lightning.formats import FloatFormat
from altgrad_lightning.functional._reduce import Sums
from altgrad_lightning.functional.ulp import _FINE_BINS
from altgrad_lightning.quantize import compute_dtype

try:  # Triton ships with CUDA builds of torch; CPU-only installs take the reference path.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    HAS_TRITON = False

__all__ = ["FusedPass", "fused_format_supported", "fused_supported", "triton_quantize"]

CHUNK = 8192
"""Elements per Triton program: a program's chunk never crosses a parameter, so per-parameter sums are possible."""
_BLOCK = 256  # 2 elements per thread at 4 warps: 88-128 registers, not 255 (occupancy; see NOTES.md)
_NUM_WARPS = 4
_HIST = True  # benchmarks/diagnostic_pass.py --ablate switches the histogram off to time it
_WINDOW = 256  # fine ULP-histogram buckets counted in registers per program (16 octaves)
_HIST_BINS = 1024  # the fine ULP histogram of float32 distances fits in 1 + 16 * 33 buckets

# Columns of the partial-sum rows, in kernel order.
_STIFF_COLS = ("n_valid", "n_zero_weight", "n_below", "sum_ratio", "sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy")
_GRID_COLS = ("n_valid", "n_on_grid", "n_overflow", "n_underflow", "sum_err", "sum_err_sq", "err_max")
_ULP_COLS = ("n_valid", "n_zero", "sum_ulp", "ulp_max")
_FLIP_COLS = (
    "n_valid",
    "n_updated",
    "n_flip",
    "n_stall",
    "sum_steps",
    "sum_sr_move",
    "sum_update_sq",
    "sum_nearest_sq",
    "sum_sr_sq",
)


def fused_format_supported(fmt: FloatFormat) -> bool:
    """Whether the fast path's arithmetic covers ``fmt`` (see the module docstring)."""
    return (
        fmt.signed
        and fmt.has_zero
        and fmt.exponent_bits >= 1
        and fmt.mantissa_bits >= 1
        and fmt.emin >= -126
        and compute_dtype(torch.float32, fmt) == torch.float32
    )


def fused_supported(params: Sequence[torch.Tensor], formats: Sequence[FloatFormat], scaled: bool) -> bool:
    """Whether :class:`FusedPass` can serve these parameters (gradients are checked per step)."""
    if not HAS_TRITON or scaled or not params or not all(fused_format_supported(f) for f in formats):
        return False
    device = params[0].device
    return device.type == "cuda" and all(
        p.device == device and p.dtype == torch.float32 and p.is_contiguous() and p.data_ptr() % 16 == 0 for p in params
    )


if HAS_TRITON:

    @triton.jit
    def _floor_log2_f32(a):
        # Exponent field of float32 minus the bias; float32 subnormals give -127, below every supported emin.
        return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127

    @triton.jit
    def _pow2_f64(e):
        return ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)

    @triton.jit
    def _pow2_f32(e):
        # Normal float32 powers of two only (-126 <= e <= 127).
        return ((e + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _times_pow2(a, P2M: tl.constexpr, e):
        """``a * 2**(M - e)`` exactly, for ``-126 <= e <= 127``, ``M >= 1`` and results below 2**(M + 1): two normal
        factors in an order that cannot overflow (``2**(M - e)`` alone is no float32 value for ``e < M - 127``)."""
        big = e > 0
        return (a * tl.where(big, _pow2_f32(1 - e), P2M)) * tl.where(big, P2M * 0.5, _pow2_f32(-e))

    @triton.jit
    def _round_unsaturated(a, EMIN: tl.constexpr, M: tl.constexpr, P2M: tl.constexpr):
        """Nearest-even rounding of non-negative float32 ``a`` onto the format's grid extended past its max (float32;
        inf where the rounding lies past float32's max; NaN stays NaN, inf stays inf).

        Every step is exact in float32: scalings by powers of two that neither overflow nor lose bits
        (``n * 2**-M`` lies in [0, 2) with M fraction bits, and the final ``* 2**e`` gives the grid value, or inf
        exactly when it lies past float32's max).
        """
        e = tl.maximum(_floor_log2_f32(a), EMIN)
        r = _times_pow2(a, P2M, e)  # below 2**(M + 1); an integer already when M = 23
        if M < 23:
            n = (r + 8388608.0) - 8388608.0  # adding 2**23 rounds to the nearest integer, ties to even
        else:
            n = r
        return (n / P2M) * _pow2_f32(e)  # division by a constant power of two: a multiplication

    @triton.jit
    def _round_to_grid(a, EMIN: tl.constexpr, M: tl.constexpr, P2M: tl.constexpr, FMAX: tl.constexpr):
        """Nearest-even, saturating rounding of non-negative float32 ``a`` onto the format's grid (float32)."""
        q = _round_unsaturated(a, EMIN, M, P2M)
        return tl.where(q > FMAX, FMAX, q)

    @triton.jit
    def _quantize_kernel(
        x_ptr, y_ptr, n, overflow_value,
        EMIN: tl.constexpr, M: tl.constexpr, P2M: tl.constexpr, FMAX: tl.constexpr, NEG_ZERO: tl.constexpr,
        IN_BF16: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """``quantize(x, fmt)`` with nearest rounding and no scale, one read and one write per element: the grid
        value of ``|x|``, ``overflow_value`` (max, inf or NaN) above max, ``x``'s sign bit (cleared for formats without
        -0), NaN for NaN; in ``y``'s dtype (the one rounding of the reference's final ``.to(x.dtype)``)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        if IN_BF16:  # bfloat16 bits (int16) widened by hand: exact for denormals, which the interpreter mishandles
            x = ((tl.load(x_ptr + offs, mask=inb, other=0).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        else:
            x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        a = tl.abs(x)
        q = tl.where(a < float("inf"), _round_unsaturated(a, EMIN, M, P2M), a)  # inf stays inf, then overflows
        q = tl.where(q > FMAX, overflow_value, q)
        if NEG_ZERO:
            sign = x.to(tl.int32, bitcast=True) & -2147483648  # copysign, -0 included
            q = (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        else:
            q = tl.where(x < 0, -q, q) + 0.0  # no -0 in the format (fnuz): -0 + 0 is +0
        q = tl.where(x != x, x, q)
        tl.store(y_ptr + offs, q.to(y_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _grid_index(q, EMIN: tl.constexpr, M: tl.constexpr, P2M: tl.constexpr):
        """Order-preserving index of non-negative grid values ``q`` (int32; exact for formats below 31 bits)."""
        e = tl.maximum(_floor_log2_f32(q), EMIN)
        return ((e - EMIN) << M) + _times_pow2(q, P2M, e).to(tl.int32)

    @triton.jit
    def _ulp_bucket(b, w, valid):
        """float32 ULP distance (int64, 0 where not valid) and its fine histogram bucket (int32, 0 for 0)."""
        bb = b.to(tl.int32, bitcast=True)
        bw = w.to(tl.int32, bitcast=True)
        kb = tl.where(bb < 0, -(bb & 0x7FFFFFFF), bb).to(tl.int64)
        kw = tl.where(bw < 0, -(bw & 0x7FFFFFFF), bw).to(tl.int64)
        d = tl.where(valid, tl.abs(kw - kb), 0)
        d1 = tl.maximum(d, 1)
        k = ((d1.to(tl.float64).to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023  # exact: d < 2**33
        rest = d1 - (tl.full(d1.shape, 1, tl.int64) << k)
        sub = tl.where(k >= 4, rest >> tl.maximum(k - 4, 0), rest << tl.maximum(4 - k, 0))
        return d, tl.where(d != 0, 1 + 16 * k + tl.minimum(sub, 15), 0).to(tl.int32)

    @triton.jit
    def _program_chunk(pid, chunk_t, chunk_start, numel, w_tab, snap_off, CHUNK_: tl.constexpr):
        """This program's parameter index, chunk start, parameter size, weight pointer and snapshot offset.

        The alignment hints (checked on the host: 16-byte aligned tensors, 64-element snapshot offsets) let Triton
        issue 16-byte vector loads and stores.
        """
        t = tl.load(chunk_t + pid)
        start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK_)
        w_ptr = tl.multiple_of(tl.load(w_tab + t).to(tl.pointer_type(tl.float32)), 16)
        return t, start, tl.load(numel + t), w_ptr, tl.multiple_of(tl.load(snap_off + t), 64)

    @triton.jit
    def _source(offs, inb, idx_ptr, soff, SAMPLED: tl.constexpr):
        """Element offsets in the parameter: the chunk's own, or with a sample the indices stored beside the
        snapshot (same layout), so the snapshot holds the sampled elements contiguously."""
        if SAMPLED:
            return tl.load(idx_ptr + soff + offs, mask=inb, other=0).to(tl.int64)
        return offs

    @triton.jit
    def _before_kernel(
        w_tab, g_tab, snap_off, chunk_t, chunk_start, numel, snap_ptr, part_ptr, gscale_ptr, idx_ptr,
        N_COLS: tl.constexpr, WRITE_SNAP: tl.constexpr, HAS_GSCALE: tl.constexpr, SAMPLED: tl.constexpr,
        DO_STIFF: tl.constexpr, DO_GRID: tl.constexpr,
        EMIN: tl.constexpr, ECLAMP: tl.constexpr, M: tl.constexpr, P2M: tl.constexpr, FMAX: tl.constexpr,
        GRID_C0: tl.constexpr,
        CHUNK_: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        t, start, n, w_ptr, soff = _program_chunk(pid, chunk_t, chunk_start, numel, w_tab, snap_off, CHUNK_)
        g_ptr = tl.multiple_of(tl.load(g_tab + t).to(tl.pointer_type(tl.float32)), 16)
        if HAS_GSCALE:
            gscale = tl.load(gscale_ptr)
        # Per-lane accumulators, reduced once at the end: counts in int32 (a chunk is far below 2**31), sums in
        # float64 like the reference.
        izero = tl.zeros((BLOCK,), tl.int32)
        fzero = tl.zeros((BLOCK,), tl.float64)
        s_valid = izero
        s_zero = izero
        s_below = izero
        s_ratio = fzero
        s_x = fzero
        s_y = fzero
        s_xx = fzero
        s_yy = fzero
        s_xy = fzero
        r_valid = izero
        r_on = izero
        r_over = izero
        r_under = izero
        r_err = fzero
        r_err2 = fzero
        r_max = fzero
        for i in tl.range(0, CHUNK_, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            inb = offs < n
            src = _source(offs, inb, idx_ptr, soff, SAMPLED)
            w = tl.load(w_ptr + src, mask=inb, other=0.0)
            if WRITE_SNAP:
                tl.store(snap_ptr + soff + offs, w, mask=inb)
            a = tl.abs(w)
            w_fin = (a < float("inf")) & inb  # false for NaN and ±inf
            if DO_STIFF:
                g = tl.load(g_ptr + src, mask=inb, other=0.0)
                if HAS_GSCALE:
                    g = g / gscale
                x32 = tl.abs(g)
                ok = w_fin & (x32 < float("inf"))
                zero = ok & (a == 0.0)
                valid = ok & (a != 0.0)
                e = tl.minimum(tl.maximum(_floor_log2_f32(a), EMIN), ECLAMP)
                s = _pow2_f64(e - M)
                x = x32.to(tl.float64)
                xs = tl.where(valid, x, 0.0)
                ys = tl.where(valid, s, 0.0)
                s_valid += valid.to(tl.int32)
                s_zero += zero.to(tl.int32)
                s_below += (valid & (x < s)).to(tl.int32)
                s_ratio += xs * _pow2_f64(M - e)  # |g| / S, exact division by a power of two
                s_x += xs
                s_y += ys
                s_xx += xs * xs
                s_yy += ys * ys
                s_xy += xs * ys
            if DO_GRID:
                q = _round_to_grid(a, EMIN, M, P2M, FMAX)
                err = tl.abs(a - q)  # |w - copysign(q, w)|, exactly as the reference forms it in float32
                err64 = tl.where(w_fin, err.to(tl.float64), 0.0)
                r_valid += w_fin.to(tl.int32)
                r_on += (w_fin & (err == 0.0)).to(tl.int32)
                r_over += (w_fin & (a > FMAX)).to(tl.int32)
                r_under += (w_fin & (q == 0.0) & (a != 0.0)).to(tl.int32)
                r_err += err64
                r_err2 += err64 * err64
                r_max = tl.maximum(r_max, err64)
        row = part_ptr + pid * N_COLS
        if DO_STIFF:
            tl.store(row + 0, tl.sum(s_valid).to(tl.float64))
            tl.store(row + 1, tl.sum(s_zero).to(tl.float64))
            tl.store(row + 2, tl.sum(s_below).to(tl.float64))
            tl.store(row + 3, tl.sum(s_ratio))
            tl.store(row + 4, tl.sum(s_x))
            tl.store(row + 5, tl.sum(s_y))
            tl.store(row + 6, tl.sum(s_xx))
            tl.store(row + 7, tl.sum(s_yy))
            tl.store(row + 8, tl.sum(s_xy))
        if DO_GRID:
            row += GRID_C0
            tl.store(row + 0, tl.sum(r_valid).to(tl.float64))
            tl.store(row + 1, tl.sum(r_on).to(tl.float64))
            tl.store(row + 2, tl.sum(r_over).to(tl.float64))
            tl.store(row + 3, tl.sum(r_under).to(tl.float64))
            tl.store(row + 4, tl.sum(r_err))
            tl.store(row + 5, tl.sum(r_err2))
            tl.store(row + 6, tl.max(r_max))

    @triton.jit
    def _after_kernel(
        w_tab, snap_off, chunk_t, chunk_start, numel, snap_ptr, part_ptr, hist_ptr, idx_ptr,
        N_COLS: tl.constexpr, DO_ULP: tl.constexpr, DO_FLIPS: tl.constexpr, SAMPLED: tl.constexpr,
        EMIN: tl.constexpr, M: tl.constexpr, P2M: tl.constexpr, FMAX: tl.constexpr, FLIP_C0: tl.constexpr,
        CHUNK_: tl.constexpr, BLOCK: tl.constexpr, HIST_BINS: tl.constexpr, HIST: tl.constexpr,
        WINDOW: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        t, start, n, w_ptr, soff = _program_chunk(pid, chunk_t, chunk_start, numel, w_tab, snap_off, CHUNK_)
        izero = tl.zeros((BLOCK,), tl.int32)
        lzero = tl.zeros((BLOCK,), tl.int64)
        u_valid = izero
        u_zero = izero
        u_sum = lzero
        u_max = lzero
        f_upd = izero
        f_flip = izero
        f_stall = izero
        f_steps = lzero
        fzero = tl.zeros((BLOCK,), tl.float64)
        f_move = fzero
        f_dd = fzero
        f_near = fzero
        f_sr = fzero
        hist = tl.zeros((WINDOW,), tl.int32)
        lo = 1
        if DO_ULP and HIST:
            # A histogram costs in proportion to its bins, so each program counts a window of WINDOW fine buckets
            # (WINDOW / 16 octaves) in registers, centred on the busiest octave of its first block; distances of
            # one parameter's chunk rarely spread further.
            offs = start + tl.arange(0, BLOCK)
            inb = offs < n
            b = tl.load(snap_ptr + soff + offs, mask=inb, other=0.0)
            w = tl.load(w_ptr + _source(offs, inb, idx_ptr, soff, SAMPLED), mask=inb, other=0.0)
            valid = inb & (tl.abs(b) < float("inf")) & (tl.abs(w) < float("inf"))
            d, bucket = _ulp_bucket(b, w, valid)
            octaves = tl.histogram((bucket - 1) >> 4, 64, mask=d != 0)
            busiest = tl.argmax(octaves, 0)
            lo = tl.maximum(1 + 16 * (busiest - WINDOW // 32), 1)
        for i in tl.range(0, CHUNK_, BLOCK):
            offs = start + i + tl.arange(0, BLOCK)
            inb = offs < n
            b = tl.load(snap_ptr + soff + offs, mask=inb, other=0.0)
            w = tl.load(w_ptr + _source(offs, inb, idx_ptr, soff, SAMPLED), mask=inb, other=0.0)
            ab = tl.abs(b)
            aw = tl.abs(w)
            valid = inb & (ab < float("inf")) & (aw < float("inf"))
            u_valid += valid.to(tl.int32)
            if DO_ULP:
                d, bucket = _ulp_bucket(b, w, valid)
                moved = d != 0
                if HIST:
                    inwin = moved & (bucket >= lo) & (bucket < lo + WINDOW)
                    hist += tl.histogram(bucket - lo, WINDOW, mask=inwin)
                    # The few moved elements outside the program's window: one atomic each, straight to memory.
                    tl.atomic_add(hist_ptr + bucket, tl.full(bucket.shape, 1, tl.int64), mask=moved & ~inwin)
                u_zero += (valid & ~moved).to(tl.int32)
                u_sum += d
                u_max = tl.maximum(u_max, d)
            if DO_FLIPS:
                qb = _round_to_grid(ab, EMIN, M, P2M, FMAX)
                qw = _round_to_grid(aw, EMIN, M, P2M, FMAX)
                ib = _grid_index(qb, EMIN, M, P2M)
                iw = _grid_index(qw, EMIN, M, P2M)
                steps = tl.where(valid, tl.abs(tl.where(w < 0, -iw, iw) - tl.where(b < 0, -ib, ib)), 0)
                updated = valid & (w != b)
                f_upd += updated.to(tl.int32)
                f_flip += (steps != 0).to(tl.int32)
                f_stall += (updated & (steps == 0)).to(tl.int32)
                f_steps += steps.to(tl.int64)
                # Stochastic-rounding what-if (flips._survival): stored value vb = q(b), update delta = w - b.
                delta = w.to(tl.float64) - b.to(tl.float64)  # exact
                vb = tl.where(b < 0, -qb, qb).to(tl.float64)
                eb = tl.maximum(_floor_log2_f32(qb), EMIN)
                toward = (qb != 0.0) & ((delta < 0) != (b < 0))
                half = toward & (eb > EMIN) & (qb == _pow2_f32(eb))  # a power of two, moving toward zero
                inv_gap = tl.where(half, _pow2_f64(M + 1 - eb), _pow2_f64(M - eb))
                p_move = tl.where((qb >= FMAX) & ~toward, 0.0, tl.minimum(tl.abs(delta) * inv_gap, 1.0))
                e_sr = tl.minimum(tl.maximum(vb + delta, -FMAX), FMAX) - vb
                m_near = tl.where(w < 0, -qw, qw).to(tl.float64) - vb
                f_move += tl.where(updated, p_move, 0.0)
                f_dd += tl.where(updated, delta * delta, 0.0)
                f_near += tl.where(updated, m_near * m_near, 0.0)
                f_sr += tl.where(updated, e_sr * e_sr, 0.0)
        row = part_ptr + pid * N_COLS
        n_valid = tl.sum(u_valid).to(tl.float64)
        if DO_ULP:
            tl.store(row + 0, n_valid)
            tl.store(row + 1, tl.sum(u_zero).to(tl.float64))
            tl.store(row + 2, tl.sum(u_sum).to(tl.float64))
            tl.store(row + 3, tl.max(u_max).to(tl.float64))
            if HIST:
                bins = lo + tl.arange(0, WINDOW)
                tl.atomic_add(hist_ptr + bins, hist.to(tl.int64), mask=(hist != 0) & (bins < HIST_BINS))
        if DO_FLIPS:
            row += FLIP_C0
            tl.store(row + 0, n_valid)
            tl.store(row + 1, tl.sum(f_upd).to(tl.float64))
            tl.store(row + 2, tl.sum(f_flip).to(tl.float64))
            tl.store(row + 3, tl.sum(f_stall).to(tl.float64))
            tl.store(row + 4, tl.sum(f_steps).to(tl.float64))
            tl.store(row + 5, tl.sum(f_move))
            tl.store(row + 6, tl.sum(f_dd))
            tl.store(row + 7, tl.sum(f_near))
            tl.store(row + 8, tl.sum(f_sr))


_QUANTIZE_BLOCK = 1024


def triton_quantize(x: torch.Tensor, fmt: FloatFormat, saturate: bool) -> torch.Tensor:
    """``quantize(x, fmt, saturate=saturate)`` (nearest, no scale) in one Triton kernel, for a contiguous
    float32/float16/bfloat16 CUDA tensor and a format :func:`fused_format_supported` accepts."""
    # bfloat16 goes in as its bits and comes out as float32 rounded by torch: Triton's interpreter converts
    # bfloat16 denormals wrongly and truncates float32 to bfloat16 (float16 conversions are right everywhere).
    in_bf16 = x.dtype == torch.bfloat16
    y = torch.empty_like(x, dtype=torch.float32 if in_bf16 else x.dtype)
    n = x.numel()
    if n:
        overflow_value = fmt.max if saturate else (float("inf") if fmt.has_inf else float("nan"))
        _quantize_kernel[(triton.cdiv(n, _QUANTIZE_BLOCK),)](
            x.view(torch.int16) if in_bf16 else x, y, n, overflow_value,
            EMIN=fmt.emin, M=fmt.mantissa_bits, P2M=2.0**fmt.mantissa_bits, FMAX=float(fmt.max),
            NEG_ZERO=fmt.has_negative_zero, IN_BF16=in_bf16, BLOCK=_QUANTIZE_BLOCK,
        )  # fmt: skip
    return y.to(x.dtype)


class FusedPass:
    """Fused diagnostic pass over one fixed list of float32 CUDA parameters (see the module docstring).

    ``before(grads, grad_scale)`` (stiffness, grid, and the snapshot) and ``after(taken)`` (ULP and flips) add a
    step to running sums on the device, with a few small operations per kernel and no host synchronisation;
    ``drain()`` returns ``{family: {format name: sums}}`` for the steps since the last drain (exactly the keys and
    dtypes of the reference ``_update`` functions, so the Metrics accumulate either) and starts over. With
    ``per_parameter_stalls`` it also returns, per format, a float64 ``(len(params), 2)`` tensor of each parameter's
    ``[n_updated, n_stall]`` (a segment sum of the programs' rows: chunks never cross parameters). With ``samples``
    (one int32 tensor of element indices per parameter), every diagnostic covers those
    elements only: the kernels gather them, and the snapshot holds just them.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        formats: Sequence[FloatFormat],
        diagnostics: Sequence[str],
        per_parameter_stalls: bool = False,
        samples: Sequence[torch.Tensor] | None = None,
    ) -> None:
        self.params = list(params)
        self.per_parameter_stalls = per_parameter_stalls
        self.formats = list(formats)
        self.diagnostics = set(diagnostics)
        device = self.params[0].device
        numels = [p.numel() for p in self.params] if samples is None else [len(i) for i in samples]
        self.n_total = sum(numels)
        counts = [max(1, math.ceil(n / CHUNK)) for n in numels]
        t_idx = torch.repeat_interleave(torch.arange(len(numels)), torch.tensor(counts))
        first = torch.cumsum(torch.tensor([0, *counts[:-1]]), 0)
        starts = (torch.arange(int(sum(counts))) - first[t_idx]) * CHUNK
        padded = [-(-n // 64) * 64 for n in numels]  # 64-element (256-byte) aligned snapshot slices
        offsets = torch.cumsum(torch.tensor([0, *padded[:-1]], dtype=torch.int64), 0)
        self._snap_slices = [(int(o), n) for o, n in zip(offsets.tolist(), numels, strict=True)]
        self.n_chunks = int(sum(counts))
        self._chunk_t = t_idx.to(torch.int32).to(device)
        self._chunk_start = starts.to(torch.int64).to(device)
        self._numel = torch.tensor(numels, dtype=torch.int64).to(device)
        self._snap_off = offsets.to(device)
        self._w_tab = torch.tensor([p.data_ptr() for p in self.params], dtype=torch.int64).to(device)
        self._w_ptrs = [p.data_ptr() for p in self.params]
        self.snapshot = torch.empty(sum(padded), dtype=torch.float32, device=device)
        # With a sample: the sampled element indices (int32), laid out like the snapshot.
        self.sampled = samples is not None
        self.indices = torch.zeros(sum(padded) if samples is not None else 1, dtype=torch.int32, device=device)
        for (offset, n), idx in zip(self._snap_slices, samples or [], strict=False):
            self.indices[offset : offset + n] = idx
        self._keep_snapshot = bool(self.diagnostics & {"ulp", "flips"})
        # Running sums since the last drain(): (phase, format name) -> float64 column sums (maxima in max columns).
        self._acc: dict[tuple[str, str], torch.Tensor] = {}
        self._acc_max: dict[tuple[str, str], tuple[tuple[int, ...], torch.Tensor | None]] = {}
        self._stalls: dict[str, torch.Tensor] = {}  # format -> (len(params), 2) [n_updated, n_stall]
        self._hist = torch.zeros(_HIST_BINS, dtype=torch.int64, device=device)  # the kernel adds to it
        self._before_steps = 0
        self._after_steps = 0  # steps taken for sure; AMP-masked ones in _after_taken (on the device)
        self._after_taken: torch.Tensor | None = None
        self._g_ptrs: list[int] = []
        self._g_tab = torch.zeros(0, dtype=torch.int64, device=device)

    @staticmethod
    def grads_supported(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> bool:
        """Whether this step's gradients fit the fast path: float32, contiguous, 16-byte aligned, beside their
        parameter."""
        return all(
            g is not None
            and g.dtype == torch.float32
            and g.is_contiguous()
            and g.device == p.device
            and g.shape == p.shape
            and g.data_ptr() % 16 == 0
            for p, g in zip(params, grads, strict=True)
        )

    def sample_of(self, i: int) -> torch.Tensor:
        """The sampled element indices of parameter ``i`` (a view of the pass's own buffer)."""
        offset, n = self._snap_slices[i]
        return self.indices[offset : offset + n]

    def snapshot_of(self, i: int) -> torch.Tensor:
        """The snapshot of parameter ``i`` taken by the last :meth:`before` (a flat view)."""
        offset, n = self._snap_slices[i]
        return self.snapshot[offset : offset + n]

    def pointers_valid(self) -> bool:
        """False once a parameter's storage moved (e.g. ``model.to(...)``): rebuild the pass then."""
        return [p.data_ptr() for p in self.params] == self._w_ptrs

    def before(self, grads: Sequence[torch.Tensor], grad_scale: torch.Tensor | None) -> None:
        """Stiffness and grid sums of this step (and the snapshot), added to the pass's running sums."""
        device = self.snapshot.device
        ptrs = [g.data_ptr() for g in grads]
        if ptrs != self._g_ptrs:  # gradients usually keep their storage from step to step: upload only changes
            g_tab = torch.tensor(ptrs, dtype=torch.int64)
            # A pinned source makes the copy asynchronous: no host synchronisation on the training step.
            self._g_tab = (g_tab.pin_memory() if device.type == "cuda" else g_tab).to(device, non_blocking=True)
            self._g_ptrs = ptrs
        do_stiff, do_grid = "stiffness" in self.diagnostics, "grid" in self.diagnostics
        c0 = len(_STIFF_COLS) * do_stiff
        n_cols = c0 + len(_GRID_COLS) * do_grid
        gscale = grad_scale.to(device=device, dtype=torch.float32) if grad_scale is not None else self.snapshot
        for i, fmt in enumerate(self.formats):
            write_snap = i == 0 and self._keep_snapshot
            if n_cols == 0 and not write_snap:
                break
            part = torch.empty((self.n_chunks, max(n_cols, 1)), dtype=torch.float64, device=device)
            _before_kernel[(self.n_chunks,)](
                self._w_tab, self._g_tab, self._snap_off, self._chunk_t, self._chunk_start, self._numel,
                self.snapshot, part, gscale, self.indices,
                N_COLS=max(n_cols, 1), WRITE_SNAP=write_snap, SAMPLED=self.sampled,
                HAS_GSCALE=grad_scale is not None, DO_STIFF=do_stiff, DO_GRID=do_grid,
                EMIN=fmt.emin, ECLAMP=max(fmt.emin, fmt.emax), M=fmt.mantissa_bits, P2M=2.0**fmt.mantissa_bits,
                FMAX=float(fmt.max),
                GRID_C0=c0, CHUNK_=CHUNK, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
            )  # fmt: skip
            if n_cols:
                self._add(("before", fmt.name), part, (n_cols - 1,) if do_grid else (), None)
        self._before_steps += 1

    def after(self, taken: torch.Tensor | None = None) -> None:
        """ULP and flip sums of this step (weights now against the snapshot), added to the running sums; ``taken``
        (a 0-d bool device tensor) masks a step the optimizer did not take (AMP), without a host synchronisation."""
        device = self.snapshot.device
        do_ulp, do_flips = "ulp" in self.diagnostics, "flips" in self.diagnostics
        for i, fmt in enumerate(self.formats):
            ulp_here = do_ulp and i == 0
            c0 = len(_ULP_COLS) * ulp_here
            n_cols = c0 + len(_FLIP_COLS) * do_flips
            if n_cols == 0:
                break
            part = torch.empty((self.n_chunks, n_cols), dtype=torch.float64, device=device)
            hist = self._hist if taken is None else torch.zeros_like(self._hist)
            _after_kernel[(self.n_chunks,)](
                self._w_tab, self._snap_off, self._chunk_t, self._chunk_start, self._numel, self.snapshot,
                part, hist, self.indices,
                N_COLS=n_cols, DO_ULP=ulp_here, DO_FLIPS=do_flips, SAMPLED=self.sampled,
                EMIN=fmt.emin, M=fmt.mantissa_bits, P2M=2.0**fmt.mantissa_bits, FMAX=float(fmt.max), FLIP_C0=c0,
                CHUNK_=CHUNK, BLOCK=_BLOCK, HIST_BINS=_HIST_BINS, HIST=_HIST, WINDOW=_WINDOW,
                num_warps=_NUM_WARPS,
            )  # fmt: skip
            if ulp_here and taken is not None:
                self._hist += torch.where(taken, hist, 0)
            self._add(("after", fmt.name), part, (3,) if ulp_here else (), taken)
            if do_flips and self.per_parameter_stalls:
                rows = part[:, [c0 + _FLIP_COLS.index("n_updated"), c0 + _FLIP_COLS.index("n_stall")]]
                rows = rows if taken is None else torch.where(taken, rows, 0.0)
                if fmt.name not in self._stalls:
                    self._stalls[fmt.name] = torch.zeros((len(self.params), 2), dtype=torch.float64, device=device)
                self._stalls[fmt.name].index_add_(0, self._chunk_t, rows)
        if taken is None:
            self._after_steps += 1
        else:
            t = taken.to(torch.float64)
            self._after_taken = t if self._after_taken is None else self._after_taken + t

    def _add(
        self, key: tuple[str, str], part: torch.Tensor, max_cols: tuple[int, ...], taken: torch.Tensor | None
    ) -> None:
        """Add the programs' partial rows to the running column sums, and their maxima to the running maxima of
        ``max_cols``: a handful of small operations per kernel, whatever the number of columns."""
        total = part.sum(0)
        top = part[:, list(max_cols)].amax(0) if max_cols else None
        if taken is not None:  # an untaken step adds 0: neutral for sums and for the non-negative maxima
            total = torch.where(taken, total, 0.0)
            top = None if top is None else torch.where(taken, top, 0.0)
        if key not in self._acc:
            self._acc[key], self._acc_max[key] = total, (max_cols, top)
            return
        self._acc[key].add_(total)
        if top is not None:
            _, running = self._acc_max[key]
            assert running is not None
            torch.maximum(running, top, out=running)

    def _running(self, key: tuple[str, str]) -> torch.Tensor | None:
        """The running column sums of ``key`` with the running maxima in their columns."""
        acc = self._acc.get(key)
        if acc is None:
            return None
        cols, top = self._acc_max[key]
        if top is not None:
            acc = acc.clone()
            acc[list(cols)] = top
        return acc

    def drain(self) -> tuple[dict[str, dict[str, Sums]], dict[str, torch.Tensor]]:
        """The sums of the steps since the last drain, ``{family: {format name: sums}}`` (keys and dtypes of the
        reference ``_update`` functions; ``"ulp"`` under format name ``""``), and with ``per_parameter_stalls`` per
        format the float64 ``(len(params), 2)`` ``[n_updated, n_stall]`` of each parameter; then starts over."""
        device = self.snapshot.device
        out: dict[str, dict[str, Sums]] = {"stiffness": {}, "grid": {}, "ulp": {}, "flips": {}}
        do_stiff, do_grid = "stiffness" in self.diagnostics, "grid" in self.diagnostics
        do_ulp, do_flips = "ulp" in self.diagnostics, "flips" in self.diagnostics
        n_before = torch.tensor(float(self.n_total * self._before_steps), dtype=torch.float64, device=device)
        n_after = torch.tensor(float(self.n_total * self._after_steps), dtype=torch.float64, device=device)
        if self._after_taken is not None:
            n_after = n_after + self.n_total * self._after_taken
        for i, fmt in enumerate(self.formats):
            before = self._running(("before", fmt.name))
            if before is not None:
                c0 = len(_STIFF_COLS) * do_stiff
                if do_stiff:
                    st = self._sums(before[:c0], _STIFF_COLS, n_before)
                    st["n_nonfinite"] = st["n_total"] - st["n_valid"] - st["n_zero_weight"]
                    out["stiffness"][fmt.name] = st
                if do_grid:
                    grid = self._sums(before[c0:], _GRID_COLS, n_before)
                    grid["n_nonfinite"] = grid["n_total"] - grid["n_valid"]
                    grid["n_unrepresentable"] = torch.zeros_like(grid["n_total"])  # signed formats only
                    # float32 errors stay below 2**129: their squares never overflow, the reference keeps this at 0
                    grid["sum_err_sq_scaled"] = torch.zeros_like(grid["sum_err"])
                    out["grid"][fmt.name] = grid
            after = self._running(("after", fmt.name))
            if after is not None:
                c0 = len(_ULP_COLS) * (do_ulp and i == 0)
                if c0:
                    ulp = self._sums(after[:c0], _ULP_COLS, n_after)
                    ulp["hist"] = _fine_hist(self._hist)
                    ulp["hist"][0] = ulp["n_zero"]  # the kernel counts moved elements only
                    out["ulp"][""] = ulp
                if do_flips:
                    out["flips"][fmt.name] = self._sums(after[c0:], _FLIP_COLS, n_after)
        stalls = self._stalls
        self._acc, self._acc_max, self._stalls = {}, {}, {}
        self._hist = torch.zeros_like(self._hist)
        self._before_steps = self._after_steps = 0
        self._after_taken = None
        return out, stalls

    def _sums(self, total: torch.Tensor, cols: Sequence[str], n_total: torch.Tensor) -> Sums:
        """Running column sums as the reference ``_update`` dict: int64 counts, float64 sums."""
        out: Sums = {"n_total": n_total.to(torch.int64)}
        for j, name in enumerate(cols):
            out[name] = total[j].to(torch.int64) if name.startswith("n_") else total[j]
        return out


def _fine_hist(hist: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(_FINE_BINS, dtype=torch.int64, device=hist.device)
    out[:_HIST_BINS] = hist
    return out
