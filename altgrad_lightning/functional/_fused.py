"""The fast path: every diagnostic of every format in two passes over a whole list of parameters.

The reference path (``_update`` functions of this package, one call per parameter and family) runs dozens of
elementwise kernels per parameter, each reading and writing full-size temporaries. A monitor that stays switched
on must cost next to nothing, so the callback uses two passes instead, as CUDA C kernels compiled by NVRTC on CUDA
(``_fused_cuda.cu``; Triton kernels where that does not build, and for sampled elements) and as compiled C on the
CPU (``_fused_cpu.c``: the same passes, chunk table, partial rows and arithmetic):

- ``before`` (at ``on_before_optimizer_step``): reads ``w`` and ``g`` once, writes the snapshot of ``w`` that the
  ULP and flip diagnostics need, and reduces the stiffness and grid-alignment sums of up to four formats;
- ``after`` (in the optimizer's step post hook): reads the snapshot and ``w'`` once and reduces the ULP sums, the
  fine ULP histogram and the flip sums (Triton's kernel one format per launch: more formats cost more registers
  than the extra reads of ``after`` cost bandwidth, ``_MAX_FORMATS``; the CUDA C kernels up to 4 formats per
  ``before`` launch and 8 per ``after`` launch, the C backend up to 8 formats per call).

Each kernel walks all parameters at once through a table of data pointers (no launch per parameter, no
concatenation copy), so one step touches about 20 bytes per float32 parameter for one format, the floor of
``benchmarks/NOTES.md``. Every program reduces its chunk to one row of partial sums, each thread first summing the
four elements of its 16-byte loads in registers; one ``sum`` over the rows gives the same sums as the reference
``_update`` functions (counts exactly, float64 sums up to summation order), which ``tests/test_fused.py`` checks on
adversarial inputs. A step queues its kernels and a few small operations and returns: no host synchronisation. (On
CUDA with NVRTC a step queues only kernels: ``set_table`` writes the gradient pointers when they moved, and the
kernels add each step to their chunks' rows, which ``reduce_rows`` reduces once per drain.)

What the fast path covers (anything else takes the reference path, per optimizer): contiguous, 16-byte aligned float32
weights on one CUDA device (with Triton) or on the CPU (with a C compiler), such float32 gradients, no per-tensor
scaling, and signed formats with a zero, at least one mantissa bit, ``-126 <= emin <= 104 + M`` (the kernels round
below 2**emin by adding 2**(emin - M + 23), a float32) whose values are float32 values — every preset but the
unsigned ``float8_e8m0fnu`` and the fixed-point ``e0m7``.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch

from altgrad_lightning.formats import FloatFormat
from altgrad_lightning.functional import _fused_cpu, _fused_cuda
from altgrad_lightning.functional._fused_cuda import FormatRow
from altgrad_lightning.functional._reduce import Sums
from altgrad_lightning.functional.ulp import _FINE_BINS
from altgrad_lightning.quantize import compute_dtype

try:  # Triton ships with CUDA builds of torch; CPU-only installs take the reference path.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    HAS_TRITON = False

__all__ = ["FusedPass", "c_quantize", "fused_format_supported", "fused_supported", "triton_quantize"]

CHUNK = 8192
"""Elements per Triton program: a program's chunk never crosses a parameter, so per-parameter sums are possible."""
_VEC = 4  # elements per thread and row: one 16-byte load per tensor
_NUM_WARPS = 4
_ROWS = 32 * _NUM_WARPS  # one row per thread: a tile of 512 elements per loop iteration
_STAGES = 3  # software pipelining of the tile loop (Triton's num_stages): benchmarks/diagnostic_pass.py --sweep
# Formats per launch of each kernel: fusing formats saves re-reading the tensors, but each format's accumulators and
# temporaries cost registers, and past these counts occupancy falls faster than the bytes saved (NOTES.md).
_MAX_FORMATS = {"before": 4, "after": 1}
# The C backend keeps a block's lanes in L1 whatever the formats: one call per phase up to its own limit.
_MAX_FORMATS_CPU = {"before": 8, "after": 8}
# The CUDA C kernels (_fused_cuda.cu) are compiled per launch shape: up to four formats per before launch (past
# four, its accumulators would cut the blocks per SM), up to eight per after launch (benchmarks/NOTES.md, session 11).
_MAX_FORMATS_CUDA = {"before": _fused_cuda.MAX_FORMATS_BEFORE, "after": _fused_cuda.MAX_FORMATS}
_HIST = True  # benchmarks/diagnostic_pass.py --ablate switches the histogram off to time it
_WINDOW = 256  # fine ULP-histogram buckets counted in registers per program (16 octaves)
_HIST_BINS = 1024  # the fine ULP histogram of float32 distances fits in 1 + 16 * 33 buckets

# Columns of the partial-sum rows: the format-independent ones once per launch, then each format's.
_STIFF_SHARED = ("n_valid", "n_zero_weight", "sum_x", "sum_xx")
_STIFF_PER = ("n_below", "sum_ratio", "sum_y", "sum_yy", "sum_xy")
_GRID_PER = ("n_on_grid", "n_overflow", "n_underflow", "sum_err", "sum_err_sq", "err_max")
_ULP_SHARED = ("n_zero", "sum_ulp", "ulp_max")
_FLIP_SHARED = ("n_updated", "sum_update_sq")
_FLIP_PER = ("n_flip", "n_stall", "sum_steps", "sum_sr_move", "sum_nearest_sq", "sum_sr_sq")
_MAX_COLS = ("err_max", "ulp_max")
_Column = tuple[str, int | None, str]  # (family, format index in the launch or None for all of them, sum name)


class _Launch(NamedTuple):
    """What one kernel launch of a pass needs on every step, fixed when the pass is built."""

    cols: list[_Column]  # its partial-row columns, in kernel order
    fmts: tuple[FormatRow, ...]  # _format_constants per format
    max_cols: list[int]  # the indices of its maximum columns
    stall_cols: list[tuple[int, int]]  # per format, the indices of n_updated and n_stall ("after" with flips)


def _before_columns(do_stiff: bool, do_grid: bool, nf: int) -> list[_Column]:
    """The ``before`` kernel's partial-row columns, in kernel order."""
    cols: list[_Column] = [("stiffness", None, c) for c in _STIFF_SHARED] if do_stiff else []
    cols += [("grid", None, "n_valid")] if do_grid else []
    for f in range(nf):
        cols += [("stiffness", f, c) for c in _STIFF_PER] if do_stiff else []
        cols += [("grid", f, c) for c in _GRID_PER] if do_grid else []
    return cols


def _after_columns(do_ulp: bool, do_flips: bool, nf: int) -> list[_Column]:
    """The ``after`` kernel's partial-row columns, in kernel order (``n_valid`` serves ULP and flips)."""
    cols: list[_Column] = [("after", None, "n_valid")]
    cols += [("ulp", None, c) for c in _ULP_SHARED] if do_ulp else []
    if do_flips:
        cols += [("flips", None, c) for c in _FLIP_SHARED]
        cols += [("flips", f, c) for f in range(nf) for c in _FLIP_PER]
    return cols


def _format_constants(fmt: FloatFormat) -> FormatRow:
    """``(EMIN, ECLAMP, M, 2**M, max, index of max, three powers of two for values below 2**EMIN, MAGIC)``: what
    the kernels need of a format, as constexprs. MAGIC (0 or 1): the kernels may round by adding a power of two,
    ``2**(e + 23 - M)`` for the exponent ``e`` of a value up to max, which must be a finite float32 (all formats but
    those as wide as bfloat16, whose max's binade reaches float32's)."""
    m, emin = fmt.mantissa_bits, fmt.emin
    e = max(math.frexp(fmt.max)[1] - 1, emin)
    imax = ((e - emin) << m) + int(fmt.max * 2.0 ** (m - e))
    scale = m - emin  # below 2**emin, _round_index scales by 2**scale in two float32 factors
    below = (2.0 ** min(scale, 127), 2.0 ** max(scale - 127, 0), 2.0 ** (emin - m))
    magic = int(m <= 22 and e + 23 - m <= 127)
    return emin, max(emin, fmt.emax), m, 2.0**m, float(fmt.max), imax, *below, magic


def fused_format_supported(fmt: FloatFormat) -> bool:
    """Whether the fast path's arithmetic covers ``fmt`` (see the module docstring)."""
    return (
        fmt.signed
        and fmt.has_zero
        and fmt.exponent_bits >= 1
        and fmt.mantissa_bits >= 1
        and -126 <= fmt.emin <= 104 + fmt.mantissa_bits
        and compute_dtype(torch.float32, fmt) == torch.float32
    )


def fused_supported(
    params: Sequence[torch.Tensor], formats: Sequence[FloatFormat], scaled: bool, sampled: bool = False
) -> bool:
    """Whether :class:`FusedPass` can serve these parameters (gradients are checked per step): CUDA with Triton, or
    the CPU once the C backend is built (``_fused_cpu.load``). With a sample, no parameter may have 2**31 elements
    or more (the passes hold sample indices in int32)."""
    if scaled or not params or not all(fused_format_supported(f) for f in formats):
        return False
    if sampled and any(p.numel() >= 2**31 for p in params):
        return False
    device = params[0].device
    if device.type == "cuda":
        available = HAS_TRITON
    elif device.type == "cpu":
        available = _fused_cpu.load() is not None
    else:
        return False
    return available and all(p.device == device and _fits(p) for p in params)


def _fits(t: torch.Tensor) -> bool:
    """A tensor the passes read: contiguous float32, 16-byte aligned on CUDA (for the Triton kernels' vector loads;
    the C backend reads any alignment)."""
    return t.dtype == torch.float32 and t.is_contiguous() and (not t.is_cuda or t.data_ptr() % 16 == 0)


if HAS_TRITON:

    @triton.jit
    def _floor_log2_f32(a):
        # Exponent field of non-negative float32 ``a`` minus the bias; float32 subnormals give -127, below every
        # supported emin, and inf/NaN 128.
        return (a.to(tl.int32, bitcast=True) >> 23) - 127

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
    def _scaled_count(a, EMIN: tl.constexpr, P2M: tl.constexpr):
        """The exponent ``e`` of non-negative float32 ``a`` clamped to EMIN, and the nearest-even integer ``n`` (as
        float32) with ``a ~ n * 2**(e - M)``: the grid value is ``(n / 2**M) * 2**e``."""
        e = tl.maximum(_floor_log2_f32(a), EMIN)
        r = _times_pow2(a, P2M, e)  # below 2**(M + 1)
        # Adding 2**23 rounds r < 2**23 to the nearest integer, ties to even; from 2**23 on (M = 23, a >= 2**EMIN)
        # r is an integer already.
        return e, tl.where(r < 8388608.0, (r + 8388608.0) - 8388608.0, r)

    @triton.jit
    def _round_unsaturated(a, EMIN: tl.constexpr, M: tl.constexpr, P2M: tl.constexpr):
        """Nearest-even rounding of non-negative float32 ``a`` onto the format's grid extended past its max (float32;
        inf where the rounding lies past float32's max; NaN stays NaN, inf stays inf).

        Every step is exact in float32: scalings by powers of two that neither overflow nor lose bits
        (``n * 2**-M`` lies in [0, 2) with M fraction bits, and the final ``* 2**e`` gives the grid value, or inf
        exactly when it lies past float32's max).
        """
        e, n = _scaled_count(a, EMIN, P2M)
        return (n / P2M) * _pow2_f32(e)  # division by a constant power of two: a multiplication

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
    def _pow2_f64(e):
        """``2**e`` as float64 for -1022 <= e <= 1023 (int32 ``e``): the exponent field built in the high word."""
        return (((e + 1023) << 20).to(tl.int64) << 32).to(tl.float64, bitcast=True)

    @triton.jit
    def _col(v, col, f: tl.constexpr):
        """Row vector ``v`` placed in column ``f`` of a ``[ROWS, NFP]`` accumulator (the column axis lives in each
        thread's registers, so the select folds away and this is one add per row)."""
        return tl.where(col == f, v[:, None], 0)

    @triton.jit
    def _round_index(a, FMTS: tl.constexpr, F: tl.constexpr):
        """Nearest-even, saturating grid value of non-negative float32 ``a`` in format ``FMTS[F]`` and its
        order-preserving grid index ``((e - EMIN) << M) + n`` for the value ``n * 2**(e - M)`` (``e`` the exponent
        of ``a`` clamped to EMIN; a carry into the next binade lands on the same index). Only finite ``a``
        matter; exact for formats below 31 bits.

        With MAGIC (see ``_format_constants``), ``a`` is first saturated and ``a + 2**(e + 23 - M)`` rounds it:
        float32's spacing in that sum's binade is the format's at ``a`` (the CUDA C kernel's round_index). Otherwise,
        with M < 23 it is integer surgery on the float32 bits, no conversions: above 2**EMIN the significand is
        moved to [2**M, 2**(M + 1)) by setting its exponent field, below it ``a`` is scaled by 2**(M - EMIN)
        (exactly, two factors); adding 2**23 then rounds to the nearest integer (ties to even) and leaves
        ``n`` in the low bits, and the grid value is ``a``'s exponent field with ``n``'s bits as mantissa (a carry
        increments the exponent), or ``n * 2**(EMIN - M)`` below 2**EMIN.
        """
        EMIN: tl.constexpr = FMTS[F][0]
        M: tl.constexpr = FMTS[F][2]
        P2M: tl.constexpr = FMTS[F][3]
        FMAX: tl.constexpr = FMTS[F][4]
        IMAX: tl.constexpr = FMTS[F][5]
        if FMTS[F][9]:  # MAGIC: saturation first, then rounding by adding a power of two (_fused_cuda.cu)
            a_sat = tl.minimum(a, FMAX)  # max is a grid value and rounding is monotone
            k = tl.maximum(a_sat.to(tl.int32, bitcast=True) >> 23, EMIN + 127)  # the exponent field of max(e, EMIN)
            c_bits = (k + (23 - M)) << 23
            c = c_bits.to(tl.float32, bitcast=True)  # 2**(e + 23 - M): a + c rounds a onto the grid
            t_c = a_sat + c
            q_out = t_c - c
            idx_out = t_c.to(tl.int32, bitcast=True) - c_bits + ((k - (EMIN + 127)) << M)
        else:
            bits = a.to(tl.int32, bitcast=True)
            if M < 23:
                normal = bits >= ((EMIN + 127) << 23)  # a >= 2**EMIN: non-negative floats order as their bits
                r_normal = ((bits & 0x7FFFFF) | ((M + 127) << 23)).to(tl.float32, bitcast=True)
                r = tl.where(normal, r_normal, (a * FMTS[F][6]) * FMTS[F][7])
                t = r + 8388608.0  # 2**23 + n
                n = t.to(tl.int32, bitcast=True) - 0x4B000000
                q_normal = ((bits & 0x7F800000) - 0x800000 + (n << (23 - M))).to(tl.float32, bitcast=True)
                q = tl.where(normal, q_normal, (t - 8388608.0) * FMTS[F][8])
                idx = tl.where(normal, ((bits >> 23) - (EMIN + 127)) << M, 0) + n
            else:  # float32's own significand width: nothing to round above 2**EMIN, below it as for M < 23
                e, n = _scaled_count(a, EMIN, P2M)
                q = (n / P2M) * _pow2_f32(e)
                idx = ((e - EMIN) << M) + n.to(tl.int32)
            over = idx > IMAX  # q > FMAX
            q_out = tl.where(over, FMAX, q)
            idx_out = tl.where(over, IMAX, idx)
        return q_out, idx_out

    @triton.jit
    def _ordered(bits):
        """float32 bits to an order-preserving int32 (sign-magnitude to two's complement; -0 and +0 both 0)."""
        return tl.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    @triton.jit
    def _ulp_distance(b, w, valid):
        """float32 ULP distance between ``b`` and ``w`` (uint32: it stays below 2**32; 0 where not valid)."""
        kb = _ordered(b.to(tl.int32, bitcast=True))
        kw = _ordered(w.to(tl.int32, bitcast=True))
        ub = kb.to(tl.uint32, bitcast=True)
        uw = kw.to(tl.uint32, bitcast=True)
        return tl.where(valid, tl.where(kw >= kb, uw - ub, ub - uw), 0)  # modular differences, exact here

    @triton.jit
    def _fine_bucket(d):
        """Fine ULP-histogram bucket of uint32 distances ``d >= 1``: ``1 + 16 k + s`` with ``k = floor(log2 d)``
        and ``s`` the four bits below the leading one (exact integers below 32)."""
        f = d.to(tl.float32)  # may round up to the next power of two: corrected below
        k = _floor_log2_f32(f)
        k = k - ((d >> k.to(tl.uint32)) == 0).to(tl.int32)
        top = tl.where(k >= 4, d >> tl.maximum(k - 4, 0).to(tl.uint32), d << tl.maximum(4 - k, 0).to(tl.uint32))
        return 16 * k + top.to(tl.int32) - 15

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
    def _accumulator_zeros(ROWS: tl.constexpr, NFP: tl.constexpr):
        """The column index of ``[ROWS, NFP]`` per-format accumulators, and int32/float64 zeros for the shared
        (``[ROWS]``) and per-format (``[ROWS, NFP]``) accumulators."""
        zi2 = tl.zeros((ROWS, NFP), tl.int32)
        zf2 = tl.zeros((ROWS, NFP), tl.float64)
        return tl.arange(0, NFP)[None, :], tl.zeros((ROWS,), tl.int32), tl.zeros((ROWS,), tl.float64), zi2, zf2

    @triton.jit
    def _tile(start, i, n, soff, idx_ptr, ROWS: tl.constexpr, VEC: tl.constexpr, SAMPLED: tl.constexpr):
        """One iteration's ``[ROWS, VEC]`` tile: its first element, the element offsets in the tile, the row mask
        for loads and stores, the element mask, and the elements' offsets in the parameter from the tile's first
        (the sample's indices with a sample, stored beside the snapshot in the same layout).

        Loads are masked by rows of VEC elements, whole 16-byte groups, so that they vectorise: the group that holds
        a parameter's last element may reach up to three elements past it, inside the same aligned 16 bytes (so
        inside the allocation's page); those lanes are masked out of every sum by the element mask.
        """
        base = tl.multiple_of(start + i, ROWS * VEC)
        first = tl.arange(0, ROWS)[:, None] * VEC
        loc = first + tl.arange(0, VEC)[None, :]
        left = n - base
        row_in = first < left
        if SAMPLED:
            src = tl.load(idx_ptr + soff + base + loc, mask=row_in, other=0).to(tl.int64) - base
        else:
            src = loc
        return base, loc, row_in, loc < left, src

    @triton.jit
    def _stiffness_terms(x, valid, e_raw, FMTS: tl.constexpr, F: tl.constexpr):
        """One format's stiffness terms of a tile, summed over each row: ``[n_below, sum_ratio, sum_y, sum_yy,
        sum_xy]`` (``x``: float64 |g|, 0 where not valid; ``e_raw``: exponent field of |w| minus the bias)."""
        EMIN: tl.constexpr = FMTS[F][0]
        ECLAMP: tl.constexpr = FMTS[F][1]
        M: tl.constexpr = FMTS[F][2]
        e = tl.minimum(tl.maximum(e_raw, EMIN), ECLAMP)
        y = tl.where(valid, _pow2_f64(e - M), 0.0)  # the stiffness S, 0 where not valid
        ratio = x * _pow2_f64(M - e)  # |g| / S exactly
        below = tl.sum((valid & (ratio < 1.0)).to(tl.int32), axis=1)
        return below, tl.sum(ratio, axis=1), tl.sum(y, axis=1), tl.sum(y * y, axis=1), tl.sum(x * y, axis=1)

    @triton.jit
    def _grid_terms(a, w_fin, FMTS: tl.constexpr, F: tl.constexpr):
        """One format's grid-alignment terms of a tile (``a`` = |w|), summed over each row: ``[n_on_grid,
        n_overflow, n_underflow, sum_err, sum_err_sq]`` and the row maximum of the error."""
        FMAX: tl.constexpr = FMTS[F][4]
        q, _ = _round_index(a, FMTS, F)
        err = tl.where(w_fin, tl.abs(a - q), 0.0)  # |w - copysign(q, w)| in float32, as the reference forms it
        err64 = err.to(tl.float64)
        on = tl.sum((w_fin & (err == 0.0)).to(tl.int32), axis=1)
        over = tl.sum((w_fin & (a > FMAX)).to(tl.int32), axis=1)
        under = tl.sum((w_fin & (q == 0.0) & (a != 0.0)).to(tl.int32), axis=1)
        return on, over, under, tl.sum(err64, axis=1), tl.sum(err64 * err64, axis=1), tl.max(err, axis=1)

    @triton.jit
    def _flip_terms(b, w, ab, aw, valid, updated, delta, FMTS: tl.constexpr, F: tl.constexpr):
        """One format's flip terms of a tile, summed over each row: ``[n_flip, n_stall, sum_steps (int64),
        sum_sr_move, sum_nearest_sq, sum_sr_sq]`` (``delta``: float64 w - b where updated, else 0)."""
        EMIN: tl.constexpr = FMTS[F][0]
        M: tl.constexpr = FMTS[F][2]
        FMAX: tl.constexpr = FMTS[F][4]
        IMAX: tl.constexpr = FMTS[F][5]
        qb, ib = _round_index(ab, FMTS, F)
        qw, iw = _round_index(aw, FMTS, F)
        if IMAX < 2**26:  # signed index differences, and VEC of them, fit int32
            steps = tl.where(valid, tl.abs(tl.where(w < 0, -iw, iw) - tl.where(b < 0, -ib, ib)), 0)
            sum_steps = tl.sum(steps, axis=1).to(tl.int64)
        else:
            iw64 = iw.to(tl.int64)
            ib64 = ib.to(tl.int64)
            steps = tl.where(valid, tl.abs(tl.where(w < 0, -iw64, iw64) - tl.where(b < 0, -ib64, ib64)), 0)
            sum_steps = tl.sum(steps, axis=1)
        flip = tl.sum((steps != 0).to(tl.int32), axis=1)
        stall = tl.sum((updated & (steps == 0)).to(tl.int32), axis=1)
        # Stochastic-rounding what-if (flips._survival): stored value vb = q(b), update delta = w - b; every term
        # below is 0 where the element was not updated (delta 0, q(w') = q(b)) or is not valid.
        vb = tl.where(valid, tl.where(b < 0, -qb, qb), 0.0).to(tl.float64)
        vw = tl.where(valid, tl.where(w < 0, -qw, qw), 0.0).to(tl.float64)
        qbits = qb.to(tl.int32, bitcast=True)
        eb = tl.maximum(_floor_log2_f32(qb), EMIN)
        toward = (qb != 0.0) & ((delta < 0) != (b < 0))
        half = toward & (eb > EMIN) & ((qbits & 0x7FFFFF) == 0)  # a power of two, moving toward zero
        inv_gap = _pow2_f64(tl.where(half, M + 1 - eb, M - eb))
        p_move = tl.where((qb >= FMAX) & ~toward, 0.0, tl.minimum(tl.abs(delta) * inv_gap, 1.0))
        moved_to = vb + delta
        e_sr = tl.where(tl.abs(moved_to) > FMAX, tl.minimum(tl.maximum(moved_to, -FMAX), FMAX) - vb, delta)
        m_near = vw - vb
        sr_move = tl.sum(p_move, axis=1)
        return flip, stall, sum_steps, sr_move, tl.sum(m_near * m_near, axis=1), tl.sum(e_sr * e_sr, axis=1)

    @triton.jit
    def _before_kernel(
        w_tab, g_tab, snap_off, chunk_t, chunk_start, numel, snap_ptr, part_ptr, gscale_ptr, idx_ptr,
        N_COLS: tl.constexpr, WRITE_SNAP: tl.constexpr, HAS_GSCALE: tl.constexpr, SAMPLED: tl.constexpr,
        DO_STIFF: tl.constexpr, DO_GRID: tl.constexpr, FMTS: tl.constexpr, NF: tl.constexpr, NFP: tl.constexpr,
        CHUNK_: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """Stiffness and grid sums of up to NFP formats in one read of ``w`` and ``g`` (and the snapshot write).

        Per element, each sum's terms are first added over the VEC elements a thread holds (no shuffles), then
        into one accumulator per thread and row: format-independent sums in ``[ROWS]`` vectors, each format's in
        column ``f`` of a ``[ROWS, NFP]`` accumulator. Counts in int32, sums in float64 like the reference.
        """
        pid = tl.program_id(0)
        t, start, n, w_ptr, soff = _program_chunk(pid, chunk_t, chunk_start, numel, w_tab, snap_off, CHUNK_)
        g_ptr = tl.multiple_of(tl.load(g_tab + t).to(tl.pointer_type(tl.float32)), 16)
        if HAS_GSCALE:
            gscale = tl.load(gscale_ptr)
        col, zi, zf, zi2, zf2 = _accumulator_zeros(ROWS, NFP)
        s_valid = zi
        s_zero = zi
        s_x = zf
        s_xx = zf
        r_valid = zi
        s_below = zi2
        s_ratio = zf2
        s_y = zf2
        s_yy = zf2
        s_xy = zf2
        r_on = zi2
        r_over = zi2
        r_under = zi2
        r_err = zf2
        r_err2 = zf2
        r_max = tl.zeros((ROWS, NFP), tl.float32)
        for i in tl.range(0, CHUNK_, ROWS * VEC, num_stages=STAGES):
            base, loc, row_in, inb, src = _tile(start, i, n, soff, idx_ptr, ROWS, VEC, SAMPLED)
            w = tl.load(w_ptr + base + src, mask=row_in, other=0.0)
            if WRITE_SNAP:
                tl.store(snap_ptr + soff + base + loc, w, mask=row_in)
            a = tl.abs(w)
            e_raw = _floor_log2_f32(a)
            w_fin = (a < float("inf")) & inb  # false for NaN and ±inf
            if DO_STIFF:
                g = tl.load(g_ptr + base + src, mask=row_in, other=0.0)
                if HAS_GSCALE:
                    g = g / gscale
                xa = tl.abs(g)
                ok = w_fin & (xa < float("inf"))
                valid = ok & (a != 0.0)
                x = tl.where(valid, xa, 0.0).to(tl.float64)
                s_valid += tl.sum(valid.to(tl.int32), axis=1)
                s_zero += tl.sum((ok & (a == 0.0)).to(tl.int32), axis=1)
                s_x += tl.sum(x, axis=1)
                s_xx += tl.sum(x * x, axis=1)
            if DO_GRID:
                r_valid += tl.sum(w_fin.to(tl.int32), axis=1)
            for f in tl.static_range(NF):
                if DO_STIFF:
                    below, ratio, y, yy, xy = _stiffness_terms(x, valid, e_raw, FMTS, f)
                    s_below += _col(below, col, f)
                    s_ratio += _col(ratio, col, f)
                    s_y += _col(y, col, f)
                    s_yy += _col(yy, col, f)
                    s_xy += _col(xy, col, f)
                if DO_GRID:
                    on, over, under, err, err2, err_max = _grid_terms(a, w_fin, FMTS, f)
                    r_on += _col(on, col, f)
                    r_over += _col(over, col, f)
                    r_under += _col(under, col, f)
                    r_err += _col(err, col, f)
                    r_err2 += _col(err2, col, f)
                    r_max = tl.maximum(r_max, _col(err_max, col, f))
        row = part_ptr + pid * N_COLS
        c = 0
        if DO_STIFF:
            tl.store(row + 0, tl.sum(s_valid).to(tl.float64))
            tl.store(row + 1, tl.sum(s_zero).to(tl.float64))
            tl.store(row + 2, tl.sum(s_x))
            tl.store(row + 3, tl.sum(s_xx))
            c += 4
        if DO_GRID:
            tl.store(row + c, tl.sum(r_valid).to(tl.float64))
            c += 1
        width = 5 * DO_STIFF + 6 * DO_GRID
        fcol = row + c + tl.arange(0, NFP) * width
        fmask = tl.arange(0, NFP) < NF
        if DO_STIFF:
            tl.store(fcol + 0, tl.sum(s_below, axis=0).to(tl.float64), mask=fmask)
            tl.store(fcol + 1, tl.sum(s_ratio, axis=0), mask=fmask)
            tl.store(fcol + 2, tl.sum(s_y, axis=0), mask=fmask)
            tl.store(fcol + 3, tl.sum(s_yy, axis=0), mask=fmask)
            tl.store(fcol + 4, tl.sum(s_xy, axis=0), mask=fmask)
            fcol += 5
        if DO_GRID:
            tl.store(fcol + 0, tl.sum(r_on, axis=0).to(tl.float64), mask=fmask)
            tl.store(fcol + 1, tl.sum(r_over, axis=0).to(tl.float64), mask=fmask)
            tl.store(fcol + 2, tl.sum(r_under, axis=0).to(tl.float64), mask=fmask)
            tl.store(fcol + 3, tl.sum(r_err, axis=0), mask=fmask)
            tl.store(fcol + 4, tl.sum(r_err2, axis=0), mask=fmask)
            tl.store(fcol + 5, tl.max(r_max, axis=0).to(tl.float64), mask=fmask)

    @triton.jit
    def _after_kernel(
        w_tab, snap_off, chunk_t, chunk_start, numel, snap_ptr, part_ptr, hist_ptr, idx_ptr,
        N_COLS: tl.constexpr, DO_ULP: tl.constexpr, DO_FLIPS: tl.constexpr, SAMPLED: tl.constexpr,
        FMTS: tl.constexpr, NF: tl.constexpr, NFP: tl.constexpr,
        CHUNK_: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr, HIST_BINS: tl.constexpr, HIST: tl.constexpr,
        WINDOW: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """ULP sums and the fine ULP histogram (storage dtype: once), and the flip sums of up to NFP formats, in
        one read of the snapshot and ``w'``; accumulators as in ``_before_kernel``."""
        pid = tl.program_id(0)
        t, start, n, w_ptr, soff = _program_chunk(pid, chunk_t, chunk_start, numel, w_tab, snap_off, CHUNK_)
        col, zi, zf, zi2, zf2 = _accumulator_zeros(ROWS, NFP)
        u_valid = zi
        u_zero = zi
        u_sum = tl.zeros((ROWS,), tl.int64)
        u_max = tl.zeros((ROWS,), tl.uint32)
        f_upd = zi
        f_dd = zf
        f_flip = zi2
        f_stall = zi2
        f_steps = tl.zeros((ROWS, NFP), tl.int64)
        f_move = zf2
        f_near = zf2
        f_sr = zf2
        hist = tl.zeros((WINDOW,), tl.int32)
        lo = 1
        if DO_ULP and HIST:
            # A histogram costs in proportion to its bins, so each program counts a window of WINDOW fine buckets
            # (WINDOW / 16 octaves) in registers, centred on the busiest octave of its first tile; distances of
            # one parameter's chunk rarely spread further.
            base, loc, row_in, inb, src = _tile(start, 0, n, soff, idx_ptr, ROWS, VEC, SAMPLED)
            b = tl.load(snap_ptr + soff + base + loc, mask=row_in, other=0.0)
            w = tl.load(w_ptr + base + src, mask=row_in, other=0.0)
            d = _ulp_distance(b, w, inb & (tl.abs(b) < float("inf")) & (tl.abs(w) < float("inf")))
            moved = d != 0
            octave = (_fine_bucket(tl.maximum(d, 1)) - 1) >> 4
            octaves = tl.histogram(tl.reshape(octave, (ROWS * VEC,)), 64, mask=tl.reshape(moved, (ROWS * VEC,)))
            lo = tl.maximum(1 + 16 * (tl.argmax(octaves, 0) - WINDOW // 32), 1)
        for i in tl.range(0, CHUNK_, ROWS * VEC, num_stages=STAGES):
            base, loc, row_in, inb, src = _tile(start, i, n, soff, idx_ptr, ROWS, VEC, SAMPLED)
            b = tl.load(snap_ptr + soff + base + loc, mask=row_in, other=0.0)
            w = tl.load(w_ptr + base + src, mask=row_in, other=0.0)
            ab = tl.abs(b)
            aw = tl.abs(w)
            valid = inb & (ab < float("inf")) & (aw < float("inf"))
            u_valid += tl.sum(valid.to(tl.int32), axis=1)
            if DO_ULP:
                d = _ulp_distance(b, w, valid)
                moved = d != 0
                u_zero += tl.sum((valid & ~moved).to(tl.int32), axis=1)
                u_sum += tl.sum(d.to(tl.int64), axis=1)
                u_max = tl.maximum(u_max, tl.max(d, axis=1))
                if HIST:
                    bucket = _fine_bucket(tl.maximum(d, 1))
                    inwin = moved & (bucket >= lo) & (bucket < lo + WINDOW)
                    hist += tl.histogram(
                        tl.reshape(bucket - lo, (ROWS * VEC,)), WINDOW, mask=tl.reshape(inwin, (ROWS * VEC,))
                    )
                    # The few moved elements outside the program's window: one atomic each, straight to memory.
                    tl.atomic_add(hist_ptr + bucket, tl.full(bucket.shape, 1, tl.int64), mask=moved & ~inwin)
            if DO_FLIPS:
                updated = valid & (w != b)
                f_upd += tl.sum(updated.to(tl.int32), axis=1)
                delta = tl.where(updated, w.to(tl.float64) - b.to(tl.float64), 0.0)  # exact
                f_dd += tl.sum(delta * delta, axis=1)
                for f in tl.static_range(NF):
                    flip, stall, steps, move, near, sr = _flip_terms(b, w, ab, aw, valid, updated, delta, FMTS, f)
                    f_flip += _col(flip, col, f)
                    f_stall += _col(stall, col, f)
                    f_steps += _col(steps, col, f)
                    f_move += _col(move, col, f)
                    f_near += _col(near, col, f)
                    f_sr += _col(sr, col, f)
        row = part_ptr + pid * N_COLS
        tl.store(row + 0, tl.sum(u_valid).to(tl.float64))
        c = 1
        if DO_ULP:
            tl.store(row + 1, tl.sum(u_zero).to(tl.float64))
            tl.store(row + 2, tl.sum(u_sum).to(tl.float64))
            tl.store(row + 3, tl.max(u_max).to(tl.float64))
            c += 3
            if HIST:
                bins = lo + tl.arange(0, WINDOW)
                tl.atomic_add(hist_ptr + bins, hist.to(tl.int64), mask=(hist != 0) & (bins < HIST_BINS))
        if DO_FLIPS:
            tl.store(row + c, tl.sum(f_upd).to(tl.float64))
            tl.store(row + c + 1, tl.sum(f_dd))
            fcol = row + c + 2 + tl.arange(0, NFP) * 6
            fmask = tl.arange(0, NFP) < NF
            tl.store(fcol + 0, tl.sum(f_flip, axis=0).to(tl.float64), mask=fmask)
            tl.store(fcol + 1, tl.sum(f_stall, axis=0).to(tl.float64), mask=fmask)
            tl.store(fcol + 2, tl.sum(f_steps, axis=0).to(tl.float64), mask=fmask)
            tl.store(fcol + 3, tl.sum(f_move, axis=0), mask=fmask)
            tl.store(fcol + 4, tl.sum(f_near, axis=0), mask=fmask)
            tl.store(fcol + 5, tl.sum(f_sr, axis=0), mask=fmask)


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


def c_quantize(x: torch.Tensor, fmt: FloatFormat, saturate: bool) -> torch.Tensor:
    """``quantize(x, fmt, saturate=saturate)`` (nearest, no scale) through the C backend (``altgrad_quantize``, the
    same arithmetic as ``_quantize_kernel``), for a contiguous float32/float16/bfloat16 CPU tensor and a format
    :func:`fused_format_supported` accepts, once ``_fused_cpu.load()`` has built the library. float16/bfloat16
    inputs are widened to float32 (exactly) and the float32 grid values rounded back once, as the reference's
    final ``.to(x.dtype)``."""
    lib = _fused_cpu.load()
    assert lib is not None and x.device.type == "cpu" and x.is_contiguous()
    src = x.float()
    y = torch.empty_like(src)
    if x.numel():
        overflow_value = fmt.max if saturate else (float("inf") if fmt.has_inf else float("nan"))
        consts = torch.tensor(_format_constants(fmt), dtype=torch.float64)
        lib.altgrad_quantize(
            src.data_ptr(), y.data_ptr(), x.numel(), overflow_value, consts.data_ptr(), fmt.has_negative_zero,
            torch.get_num_threads(),
        )  # fmt: skip
    return y.to(x.dtype)


class FusedPass:
    """Fused diagnostic pass over one fixed list of float32 parameters on one CUDA device or the CPU (see the
    module docstring).

    ``before(grads, grad_scale)`` (stiffness, grid, and the snapshot) and ``after(taken)`` (ULP and flips) add a
    step to running sums on the device, with a few small operations per kernel and no host synchronisation;
    ``drain()`` returns ``{family: {format name: sums}}`` for the steps since the last drain (exactly the keys and
    dtypes of the reference ``_update`` functions, so the Metrics accumulate either) and starts over. With
    ``per_parameter_stalls`` it also returns, per format, a float64 ``(len(params), 2)`` tensor of each parameter's
    ``[n_updated, n_stall]`` (a segment sum of the programs' rows: chunks never cross parameters). With ``samples``
    (one int32 tensor of element indices per parameter), every diagnostic covers those
    elements only: the kernels gather them, and the snapshot holds just them.

    ``backend`` is ``"cuda"`` (the default on CUDA where NVRTC compiles ``_fused_cuda.cu``, and no sample: CUDA C
    kernels launched through the driver, ~10 µs of host time each where Triton's launcher takes ~40 µs, and an
    ``after`` kernel whose shared-memory histogram Triton cannot express), ``"triton"`` (both Triton kernels: the
    default on CUDA otherwise; on CPU tensors only under Triton's interpreter, for tests) or ``"c"`` (the default on
    the CPU: ``_fused_cpu.c``, the same passes and partial rows in compiled C).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        formats: Sequence[FloatFormat],
        diagnostics: Sequence[str],
        per_parameter_stalls: bool = False,
        samples: Sequence[torch.Tensor] | None = None,
        backend: str | None = None,
    ) -> None:
        self.params = list(params)
        self.per_parameter_stalls = per_parameter_stalls
        self.formats = list(formats)
        self.diagnostics = set(diagnostics)
        device = self.params[0].device
        self.backend = backend or ("c" if device.type == "cpu" else "triton")
        if backend is None and device.type == "cuda" and samples is None and HAS_TRITON:
            self.backend = "cuda"  # where its kernels compile (checked below, Triton's kernels otherwise)
        self._lib = _fused_cpu.load() if self.backend == "c" else None
        if self.backend == "c":
            if self._lib is None or device.type != "cpu":
                raise ValueError(
                    f"Expected CPU tensors and a built C backend for backend='c', but got device {device} "
                    f"({_fused_cpu.unavailable_reason() or 'the library is built'})"
                )
        elif self.backend == "cuda":
            if not HAS_TRITON or device.type != "cuda" or samples is not None:
                raise ValueError(
                    "Expected CUDA tensors, Triton installed and no sample for backend='cuda', but got device "
                    f"{device}{' and a sample' if samples is not None else ''}"
                )
        elif self.backend != "triton" or not HAS_TRITON:
            raise ValueError(f"Expected backend 'c', 'cuda' or 'triton' (with Triton installed), but got {backend!r}")
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
        self._param_numels = [p.numel() for p in self.params]
        self.snapshot = torch.empty(sum(padded), dtype=torch.float32, device=device)
        # With a sample: the sampled element indices (int32), laid out like the snapshot.
        self.sampled = samples is not None
        self.indices = torch.zeros(sum(padded) if samples is not None else 1, dtype=torch.int32, device=device)
        for (offset, n), idx in zip(self._snap_slices, samples or [], strict=False):
            self.indices[offset : offset + n] = idx
        self._keep_snapshot = bool(self.diagnostics & {"ulp", "flips"})
        self._groups, self._launches = self._plan()
        # The CUDA C build of each (phase, launch), and the packed launches of the kernels per (phase, launch), of
        # reduce_rows per (phase, launch) and of set_table per table and slice of it, made on first use.
        self._cuda_kernels: dict[tuple[str, int], _fused_cuda.Compiled] = {}
        self._kernel_calls: dict[tuple[str, int], _fused_cuda.Call] = {}
        self._reduce_calls: dict[tuple[str, int], _fused_cuda.Call] = {}
        self._table_calls: dict[str, list[tuple[_fused_cuda.Call, ctypes.Array[ctypes.c_longlong], int]]] = {}
        if self.backend == "cuda" and not self._cuda_compiles():
            if backend is not None:
                why = _fused_cuda.unavailable_reason() or "it did not"
                raise ValueError(f"Expected the CUDA C kernels to build for backend='cuda', but {why}")
            self.backend = "triton"
            self._groups, self._launches = self._plan()
        # Running sums since the last drain(): (phase, group) -> (float64 column sums, maxima or None).
        self._acc: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        # Every launch's rows, one per chunk, reused from step to step. The C and Triton kernels write each step's
        # rows, which _add adds to _acc before the next step's kernels (the call's return on the CPU, stream order on
        # CUDA); the CUDA C kernels add each step to them (running rows, zero at first), reduced by drain() into
        # _acc_dev (what reduce_rows writes) for the launches in _ran.
        self._parts: dict[tuple[str, int], torch.Tensor] = {}
        self._acc_dev: dict[tuple[str, int], torch.Tensor] = {}
        self._ran: set[tuple[str, int]] = set()
        self._stalls: dict[str, torch.Tensor] = {}  # format -> (len(params), 2) [n_updated, n_stall]
        self._hist = torch.zeros(_HIST_BINS, dtype=torch.int64, device=device)  # the kernel adds to it
        # The CUDA C kernel's chunk counter and warps-done counter (it sets them back to 0 when it ends).
        self._work = torch.zeros(2, dtype=torch.int32, device=device) if self.backend == "cuda" else None
        self._before_steps = 0
        self._after_steps = 0  # steps taken for sure; AMP-masked ones in _after_taken (on the device)
        self._after_taken: torch.Tensor | None = None
        self._g_ptrs: list[int] = []
        self._g_tab = torch.zeros(len(self.params), dtype=torch.int64, device=device)
        self._c_formats: dict[tuple[tuple[float, ...], ...], torch.Tensor] = {}  # the C backend's format tables

    def _plan(self) -> tuple[dict[str, list[list[FloatFormat]]], dict[str, list[_Launch]]]:
        """The formats of each phase in launches of at most the backend's limit (each launch reads its tensors
        once; ULP goes with the first ``after`` launch), and each launch's partial-row columns, formats' constants
        and the indices of its max and stall columns: fixed for the pass, derived once here, not on every step."""
        k_of = {"c": _MAX_FORMATS_CPU, "cuda": _MAX_FORMATS_CUDA}.get(self.backend, _MAX_FORMATS)
        groups = {phase: [self.formats[i : i + k] for i in range(0, len(self.formats), k)] for phase, k in k_of.items()}
        do_stiff, do_grid = "stiffness" in self.diagnostics, "grid" in self.diagnostics
        do_ulp, do_flips = "ulp" in self.diagnostics, "flips" in self.diagnostics
        launches = {
            phase: [
                _Launch(
                    cols,
                    tuple(_format_constants(f) for f in group),
                    [j for j, c in enumerate(cols) if c[2] in _MAX_COLS],
                    [
                        (cols.index(("flips", None, "n_updated")), cols.index(("flips", f, "n_stall")))
                        for f in range(len(group))
                        if ("flips", f, "n_stall") in cols
                    ],
                )
                for gi, group in enumerate(groups[phase])
                for cols in [
                    _before_columns(do_stiff, do_grid, len(group))
                    if phase == "before"
                    else _after_columns(do_ulp and gi == 0, do_flips, len(group))
                ]
            ]
            for phase in groups
        }
        return groups, launches

    def _cuda_compiles(self) -> bool:
        """Compile (once per process and launch shape) the CUDA C kernels of each launch, kept for the steps in
        ``_cuda_kernels``; False where NVRTC cannot. Where both phases group the formats alike (up to four formats),
        one build per launch serves its before and after kernels; else each phase's builds hold only its families."""
        do_stiff, do_grid = "stiffness" in self.diagnostics, "grid" in self.diagnostics
        do_ulp, do_flips = "ulp" in self.diagnostics, "flips" in self.diagnostics
        alike = self._groups["before"] == self._groups["after"]
        self._cuda_kernels = {}
        for phase, launches in self._launches.items():
            before, after = alike or phase == "before", alike or phase == "after"
            for gi, launch in enumerate(launches):  # the snapshot and ULP go with the first launch
                first = gi == 0
                families = _fused_cuda.Families(
                    stiff=before and do_stiff, grid=before and do_grid, snap=before and first and self._keep_snapshot,
                    ulp=after and first and do_ulp, hist=after and first and do_ulp and _HIST, flips=after and do_flips,
                )  # fmt: skip
                compiled = _fused_cuda.kernel(self.snapshot.device, launch.fmts, families, chunk=CHUNK)
                if compiled is None:
                    return False
                self._cuda_kernels[phase, gi] = compiled
        return bool(self._cuda_kernels)

    def step_grads(self) -> tuple[list[torch.Tensor], list[int]] | None:
        """This step's gradients (the parameters' ``.grad``) and their data pointers where all of them fit the fast
        path (float32, contiguous, 16-byte aligned on CUDA, as ``_fits`` asks of the weights; shape and device are
        torch's rule for ``.grad``), else ``None``. One pass over the gradients, which are new tensors at new places on
        most steps (Lightning sets them to None after each step): right after the backward pass each Python touch of
        a tensor costs the host a cache miss (benchmarks/NOTES.md, session 9)."""
        grads = cast(list[torch.Tensor], [p.grad for p in self.params])  # None caught below
        f32 = torch.float32
        try:
            ptrs = [g.data_ptr() if g.dtype is f32 and g.is_contiguous() else -1 for g in grads]
        except AttributeError:  # a parameter without gradient at this step
            return None
        align = 15 if self.snapshot.is_cuda else 0
        if min(ptrs, default=0) < 0 or any(ptr & align for ptr in ptrs):
            return None
        return grads, ptrs

    def sample_of(self, i: int) -> torch.Tensor:
        """The sampled element indices of parameter ``i`` (a view of the pass's own buffer)."""
        offset, n = self._snap_slices[i]
        return self.indices[offset : offset + n]

    def snapshot_of(self, i: int) -> torch.Tensor:
        """The snapshot of parameter ``i`` taken by the last :meth:`before` (a flat view)."""
        offset, n = self._snap_slices[i]
        return self.snapshot[offset : offset + n]

    def before(
        self, grads: Sequence[torch.Tensor], grad_scale: torch.Tensor | None, g_ptrs: list[int] | None = None
    ) -> None:
        """Stiffness and grid sums of this step (and the snapshot), added to the pass's running sums; ``g_ptrs``: the
        gradients' data pointers where the caller has them (:meth:`step_grads`)."""
        device = self.snapshot.device
        ptrs = [g.data_ptr() for g in grads] if g_ptrs is None else g_ptrs
        if ptrs != self._g_ptrs:  # upload only changes (a loop over the same gradients keeps their storage)
            self._write_table("g", ptrs)
            self._g_ptrs = ptrs
        do_stiff, do_grid = "stiffness" in self.diagnostics, "grid" in self.diagnostics
        gscale = grad_scale.to(device=device, dtype=torch.float32) if grad_scale is not None else self.snapshot
        for gi, launch in enumerate(self._launches["before"]):
            write_snap = gi == 0 and self._keep_snapshot
            cols = launch.cols
            if not cols and not write_snap:
                break
            part = self._part(("before", gi), len(cols))
            if self.backend == "c":
                flags = (0, grad_scale is not None, write_snap, self.sampled, do_stiff, do_grid, 0, 0, 0)
                self._run_c(flags, launch, part, self._hist, gscale)
            elif self.backend == "cuda":
                self._run_cuda("before", gi, part, gscale if grad_scale is not None else None)
                continue  # the kernel adds to its running rows
            else:
                _before_kernel[(self.n_chunks,)](
                    self._w_tab, self._g_tab, self._snap_off, self._chunk_t, self._chunk_start, self._numel,
                    self.snapshot, part, gscale, self.indices,
                    N_COLS=max(len(cols), 1), WRITE_SNAP=write_snap, SAMPLED=self.sampled,
                    HAS_GSCALE=grad_scale is not None, DO_STIFF=do_stiff, DO_GRID=do_grid,
                    FMTS=launch.fmts, NF=len(launch.fmts), NFP=_pow2_at_least(len(launch.fmts)),
                    CHUNK_=CHUNK, ROWS=_ROWS, VEC=_VEC, STAGES=_STAGES, num_warps=_NUM_WARPS,
                )  # fmt: skip
            if cols:
                self._add(("before", gi), launch, part, None)
        self._before_steps += 1

    def after(self, taken: torch.Tensor | None = None) -> bool:
        """ULP and flip sums of this step (weights now against the snapshot), added to the running sums; ``taken``
        (a 0-d tensor, true for a step the optimizer took: a bool on the pass's device costs no host synchronisation)
        masks a step the optimizer did not take (AMP). False, with nothing added, where the optimizer's step left a
        parameter in storage the pass cannot read (see :meth:`follow_storage`)."""
        if not self.follow_storage():
            return False
        device = self.snapshot.device
        if taken is not None:  # the CUDA C kernels read it as a bool on the device, by pointer
            taken = taken.to(device=device, dtype=torch.bool)
        do_ulp, do_flips = "ulp" in self.diagnostics, "flips" in self.diagnostics
        for gi, (group, launch) in enumerate(zip(self._groups["after"], self._launches["after"], strict=True)):
            ulp_here = do_ulp and gi == 0
            if not (ulp_here or do_flips):
                break
            cols = launch.cols
            part = self._part(("after", gi), len(cols))
            # The CUDA C kernel adds its histogram unless `taken` is false; the others add theirs to a zeroed copy.
            hist = self._hist if taken is None or self.backend == "cuda" else torch.zeros_like(self._hist)
            if self.backend == "c":
                self._run_c((1, 0, 0, self.sampled, 0, 0, ulp_here, do_flips, _HIST), launch, part, hist, None)
            elif self.backend == "cuda":
                self._run_cuda("after", gi, part, taken)
                continue  # the kernel adds to its running rows, and nothing where taken is false
            else:
                _after_kernel[(self.n_chunks,)](
                    self._w_tab, self._snap_off, self._chunk_t, self._chunk_start, self._numel, self.snapshot,
                    part, hist, self.indices,
                    N_COLS=len(cols), DO_ULP=ulp_here, DO_FLIPS=do_flips, SAMPLED=self.sampled,
                    FMTS=launch.fmts, NF=len(group), NFP=_pow2_at_least(len(group)),
                    CHUNK_=CHUNK, ROWS=_ROWS, VEC=_VEC, HIST_BINS=_HIST_BINS, HIST=_HIST, WINDOW=_WINDOW,
                    STAGES=_STAGES, num_warps=_NUM_WARPS,
                )  # fmt: skip
            if ulp_here and taken is not None and hist is not self._hist:
                self._hist += torch.where(taken, hist, 0)
            self._add(("after", gi), launch, part, taken)
            self._add_stalls(gi, part, taken)
        if taken is None:
            self._after_steps += 1
        else:
            t = taken.to(torch.float64)
            self._after_taken = t if self._after_taken is None else self._after_taken + t
        return True

    def follow_storage(self) -> bool:
        """Point the weight table at the parameters' storage as it is now. An optimizer may rebind a parameter to new
        storage inside ``step()`` (``p.data = p.data - lr * p.grad``), freeing the one the table held: the kernels
        would read freed memory (on the CPU a crash once it is unmapped; else stale weights, as if nothing had
        moved). One pointer comparison where nothing moved; False where a parameter no longer fits this pass
        (another dtype, layout, size or device): lay the pass out again then, or leave the fast path."""
        ptrs = [p.data_ptr() for p in self.params]
        if ptrs == self._w_ptrs:
            return True
        device = self.snapshot.device
        numels = self._param_numels
        if any(p.device != device or p.numel() != n or not _fits(p) for p, n in zip(self.params, numels, strict=True)):
            return False
        self._write_table("w", ptrs)
        self._w_ptrs = ptrs
        return True

    def _run_c(
        self, flags: tuple[int | bool, ...], launch: _Launch, part: torch.Tensor, hist: torch.Tensor,
        gscale: torch.Tensor | None,
    ) -> None:  # fmt: skip
        """One phase through the C backend, on this process's torch thread count: ``flags`` as in
        ``altgrad_fused_pass`` (after, has_gscale, write_snap, sampled, stiffness, grid, ULP, flips, histogram)."""
        assert self._lib is not None
        fmts = self._c_formats.get(launch.fmts)
        if fmts is None:
            fmts = self._c_formats[launch.fmts] = torch.tensor(launch.fmts, dtype=torch.float64)
        flag_t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
        scale = float(gscale) if flags[1] and gscale is not None else 1.0
        rc = self._lib.altgrad_fused_pass(
            self._w_tab.data_ptr(), self._g_tab.data_ptr(), self._snap_off.data_ptr(), self._chunk_t.data_ptr(),
            self._chunk_start.data_ptr(), self._numel.data_ptr(), self.snapshot.data_ptr(), part.data_ptr(),
            hist.data_ptr(), self.indices.data_ptr(), scale, flag_t.data_ptr(), fmts.data_ptr(), len(launch.fmts),
            part.shape[1], CHUNK, self.n_chunks, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:  # pragma: no cover - the arguments are checked above
            raise RuntimeError(f"altgrad_fused_pass refused its arguments (rc {rc})")

    def _part(self, key: tuple[str, int], ncols: int) -> torch.Tensor:
        """The rows of launch ``key`` (one per chunk), allocated on first use (zero: the CUDA C kernels add to them),
        and marked as run since the last drain."""
        part = self._parts.get(key)
        if part is None:
            shape = (self.n_chunks, max(ncols, 1))
            part = self._parts[key] = torch.zeros(shape, dtype=torch.float64, device=self.snapshot.device)
        self._ran.add(key)
        return part

    def _run_cuda(self, phase: str, gi: int, part: torch.Tensor, last: torch.Tensor | None) -> None:
        """Launch ``gi`` of ``phase`` through its CUDA C kernel (compiled when the backend was chosen); ``last``:
        the before kernel's gradient scale, the after kernel's ``taken`` (``None``: none, true)."""
        call = self._kernel_calls.get((phase, gi))
        if call is None:
            compiled = self._cuda_kernels[phase, gi]
            assert self._work is not None
            sizes = (ctypes.c_longlong(self.n_chunks), ctypes.c_int(part.shape[1]))
            tables = (self._snap_off, self._chunk_t, self._chunk_start, self._numel, self.snapshot, part)
            if phase == "before":
                fn, grid, args = compiled.before, compiled.before_grid, (self._w_tab, self._g_tab, *tables)
            else:
                fn, grid, args = compiled.after, compiled.after_grid, (self._w_tab, *tables, self._hist)
            blocks = min(grid, -(-self.n_chunks // (_fused_cuda.THREADS // 32)))  # a warp per chunk
            call = _fused_cuda.Call(fn, blocks, (*args, self._work, *sizes), part.device)
            self._kernel_calls[phase, gi] = call
        call(last)

    def _add_stalls(self, gi: int, part: torch.Tensor, taken: torch.Tensor | None) -> None:
        """With ``per_parameter_stalls``, add the ``n_updated`` and ``n_stall`` columns of ``after`` launch ``gi``'s
        rows ``part`` to each parameter's counts (rows where ``taken`` is false add 0)."""
        if not (self.per_parameter_stalls and "flips" in self.diagnostics):
            return
        launch = self._launches["after"][gi]
        for fmt, (updated, stalled) in zip(self._groups["after"][gi], launch.stall_cols, strict=True):
            # Single-column views (a list index would upload an index tensor: a host synchronisation).
            rows = torch.stack((part[:, updated], part[:, stalled]), 1)
            rows = rows if taken is None else torch.where(taken, rows, 0.0)
            if fmt.name not in self._stalls:
                self._stalls[fmt.name] = torch.zeros((len(self.params), 2), dtype=torch.float64, device=part.device)
            self._stalls[fmt.name].index_add_(0, self._chunk_t, rows)

    def _reduce_running(self) -> None:
        """The CUDA C kernels' running rows of the launches run since the last drain: reduced into ``_acc`` (one
        reduce_rows launch each) and the per-parameter stall counts, then set back to 0 (in stream order, after
        those reads)."""
        for phase, gi in sorted(self._ran):
            launch, part = self._launches[phase][gi], self._parts[phase, gi]
            if launch.cols:
                call = self._reduce_calls.get((phase, gi))
                if call is None:
                    assert part.shape[1] <= 64  # max_mask's bits
                    acc = self._acc_dev[phase, gi] = torch.empty(part.shape[1], dtype=torch.float64, device=part.device)
                    max_mask = ctypes.c_ulonglong(sum(1 << j for j in launch.max_cols))
                    args = (part, ctypes.c_longlong(self.n_chunks), ctypes.c_int(part.shape[1]), max_mask, acc)
                    fn = self._cuda_kernels[phase, gi].reduce
                    call = _fused_cuda.Call(fn, part.shape[1], args, part.device, last=False)
                    self._reduce_calls[phase, gi] = call
                call()
                self._acc[phase, gi] = (self._acc_dev[phase, gi], None)  # maxima in their columns
            if phase == "after":
                self._add_stalls(gi, part, None)
            part.zero_()

    def _write_table(self, which: str, ptrs: list[int]) -> None:
        """Write data pointers into a table the kernels read (``which``: ``"g"``, ``_g_tab``, or ``"w"``, ``_w_tab``) in
        place and in stream order, with no host synchronisation on the training step: with the CUDA C kernels through
        set_table launches carrying :data:`_fused_cuda.TABLE_LEN` of them each in their arguments (no host buffer to
        keep alive), else by a copy from a host tensor, pinned on CUDA so that the copy is asynchronous."""
        tab = self._g_tab if which == "g" else self._w_tab
        if self.backend != "cuda":
            tab.copy_(torch.tensor(ptrs, dtype=torch.int64, pin_memory=tab.is_cuda), non_blocking=True)
            return
        calls = self._table_calls.get(which)
        if calls is None:
            calls = self._table_calls[which] = []
            fn, n, size = self._cuda_kernels["before", 0].set_table, len(self.params), _fused_cuda.TABLE_LEN
            for j in range(0, n, size):
                buf = (ctypes.c_longlong * size)()
                args = (ctypes.c_void_p(tab.data_ptr() + 8 * j), ctypes.c_int(min(size, n - j)), buf)
                calls.append((_fused_cuda.Call(fn, 1, args, tab.device, last=False), buf, j))
        for call, buf, j in calls:
            piece: list[Any] = ptrs[j : j + len(buf)]
            buf[: len(piece)] = piece
            call()

    def _add(self, key: tuple[str, int], launch: _Launch, part: torch.Tensor, taken: torch.Tensor | None) -> None:
        """Add a step's rows (the C and Triton backends) to the running column sums, and their maxima to the
        running maxima of the max columns: a handful of small operations per kernel, whatever the number of
        columns."""
        total = part.sum(0)
        # Column views, not a list index: that would upload an index tensor, a host synchronisation per step.
        top = torch.stack([part[:, j] for j in launch.max_cols], 1).amax(0) if launch.max_cols else None
        if taken is not None:  # an untaken step adds 0: neutral for sums and for the non-negative maxima
            total = torch.where(taken, total, 0.0)
            top = None if top is None else torch.where(taken, top, 0.0)
        if key not in self._acc:
            self._acc[key] = (total, top)
            return
        running, running_top = self._acc[key]
        running.add_(total)
        if top is not None and running_top is not None:
            torch.maximum(running_top, top, out=running_top)

    def drain(self) -> tuple[dict[str, dict[str, Sums]], dict[str, torch.Tensor]]:
        """The sums of the steps since the last drain, ``{family: {format name: sums}}`` (keys and dtypes of the
        reference ``_update`` functions; ``"ulp"`` under format name ``""``), and with ``per_parameter_stalls`` per
        format the float64 ``(len(params), 2)`` ``[n_updated, n_stall]`` of each parameter; then starts over."""
        device = self.snapshot.device
        out: dict[str, dict[str, Sums]] = {"stiffness": {}, "grid": {}, "ulp": {}, "flips": {}}
        n_total = {
            "before": torch.tensor(float(self.n_total * self._before_steps), dtype=torch.float64, device=device),
            "after": torch.tensor(float(self.n_total * self._after_steps), dtype=torch.float64, device=device),
        }
        if self._after_taken is not None:
            n_total["after"] = n_total["after"] + self.n_total * self._after_taken
        if self.backend == "cuda":
            self._reduce_running()
        for (phase, gi), (acc, top) in self._acc.items():
            cols = self._launches[phase][gi].cols
            acc = acc.clone()  # the CUDA backend's reduce_rows writes _acc_dev again at the next drain
            if top is not None:
                for k, j in enumerate(self._launches[phase][gi].max_cols):
                    acc[j] = top[k]
            names = [f.name for f in self._groups[phase][gi]]
            present = {c[0] for c in cols}
            for j, (family, f, name) in enumerate(cols):
                # "after" columns (n_valid) serve ULP and flips alike; ULP sums go under the format name "".
                for fam in [x for x in ("ulp", "flips") if x in present] if family == "after" else [family]:
                    for key in [""] if fam == "ulp" else (names if f is None else [names[f]]):
                        sums = out[fam].setdefault(key, {"n_total": n_total[phase].to(torch.int64)})
                        sums[name] = acc[j].to(torch.int64) if name.startswith("n_") else acc[j]
        for st in out["stiffness"].values():
            st["n_nonfinite"] = st["n_total"] - st["n_valid"] - st["n_zero_weight"]
        for grid in out["grid"].values():
            grid["n_nonfinite"] = grid["n_total"] - grid["n_valid"]
            grid["n_unrepresentable"] = torch.zeros_like(grid["n_total"])  # signed formats only
            # float32 errors stay below 2**129: their squares never overflow, the reference keeps this at 0
            grid["sum_err_sq_scaled"] = torch.zeros_like(grid["sum_err"])
        if "" in out["ulp"]:
            ulp = out["ulp"][""]
            ulp["hist"] = _fine_hist(self._hist)
            ulp["hist"][0] = ulp["n_zero"]  # bucket 0 is no count: the kernels count moved elements only
        stalls = self._stalls
        self._acc, self._stalls = {}, {}
        self._ran.clear()
        self._hist.zero_()  # in place: the packed CUDA launches hold its pointer
        self._before_steps = self._after_steps = 0
        self._after_taken = None
        return out, stalls


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _fine_hist(hist: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(_FINE_BINS, dtype=torch.int64, device=hist.device)
    out[:_HIST_BINS] = hist
    return out
