"""Rounding onto a format's grid, and the grid's code index (``../shared/SPEC.md`` §2)."""

from __future__ import annotations

import numbers
import struct
from enum import Enum
from typing import Any

import torch

from altgrad_lightning._bits import FLOAT_DTYPES, floor_log2, pow2
from altgrad_lightning.formats import Flavour, FloatFormat, FormatLike, get_format

__all__ = ["Rounding", "code_index", "fake_quantize", "quantize"]

ScaleLike = float | torch.Tensor | None


class Rounding(str, Enum):
    """Rounding modes of :func:`quantize`."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"
    TOWARD_ZERO = "toward_zero"


def check_float_tensor(x: object, arg: str) -> torch.Tensor:
    """Raise one clear error unless ``x`` is a float32/float64/float16/bfloat16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected argument `{arg}` to be a torch.Tensor, but got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"Expected argument `{arg}` to be a float32, float64, float16 or bfloat16 tensor, but got {x.dtype}"
        )
    return x


def check_pair(a: object, b: object, names: tuple[str, str], *, same_dtype: bool = False) -> None:
    """Raise one clear error unless ``a`` and ``b`` are float tensors of one shape on one device."""
    check_float_tensor(a, names[0])
    check_float_tensor(b, names[1])
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    if a.shape != b.shape:
        raise ValueError(
            f"Expected arguments `{names[0]}` and `{names[1]}` to have the same shape, but got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(
            f"Expected arguments `{names[0]}` and `{names[1]}` on the same device, but got {a.device} and {b.device}"
        )
    if same_dtype and a.dtype != b.dtype:
        raise TypeError(
            f"Expected arguments `{names[0]}` and `{names[1]}` to have the same dtype, but got {a.dtype} and {b.dtype}"
        )


def _broadcasts(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``to`` (pure Python on static shapes: no exception, nothing for torch.compile
    to trace)."""
    if len(shape) > len(to):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(to), strict=False))


def _to_float32(value: float) -> float:
    """``value`` rounded to float32 (inf past its range), in plain Python."""
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return float("inf")


def check_scale(scale: ScaleLike, like: torch.Tensor) -> torch.Tensor | None:
    """Validate ``scale`` and return it as a tensor on ``like``'s device (None stays None).

    A Python number must be positive and finite (checked here) and is returned as a 0-d tensor of the input's
    precision: float64 for float64 inputs, else float32 (rounded to nearest, like the input; it must not round to 0
    or inf). A scale that is a float32 value keeps the scaled rounding of float32/float16/bfloat16 inputs exact
    (see :func:`compute_dtype`); a float64 tensor scale is used as it is.

    A tensor must be floating point, on ``like``'s device and broadcastable to ``like``: only these static facts
    are checked everywhere. A NaN entry is the "no scale" of float8_e8m0fnu (an MX block holding NaN or ±inf, see
    :func:`~altgrad_lightning.scaling.mx_scale`) and is accepted: each element it scales comes out NaN (quantize,
    stiffness, grid error, grid steps) and the statistics count it as unrepresentable (grid alignment) or
    non-finite (flips), or return NaN (gradient stiffness), never a plausible wrong number. Zero, negative and
    ±inf entries are errors; they are checked (``ValueError``) only for a CPU tensor outside ``torch.compile``: on
    an accelerator reading them would be a host synchronisation, and under ``torch.compile`` a data-dependent branch
    breaks the graph. Where they are not checked they are replaced by NaN, with the consequences above.
    """
    if scale is None:
        return None
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        value = float(scale)
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"Expected argument `scale` to be a positive finite number, but got {scale!r}")
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        if dtype == torch.float32 and not 0 < _to_float32(value) < float("inf"):
            raise ValueError(
                f"Expected argument `scale` to be a positive finite number that float32 holds (the input is "
                f"{like.dtype}), but got {scale!r}"
            )
        return torch.tensor(value, dtype=dtype, device=like.device)
    if not isinstance(scale, torch.Tensor):
        raise TypeError(
            f"Expected argument `scale` to be None, a positive float or a tensor, but got {type(scale).__name__}"
        )
    if not scale.is_floating_point():
        raise TypeError(f"Expected argument `scale` to be a floating-point tensor, but got {scale.dtype}")
    if scale.device != like.device:
        raise ValueError(
            f"Expected argument `scale` on the device of the input ({like.device}), but got {scale.device}"
        )
    if not _broadcasts(tuple(scale.shape), tuple(like.shape)):
        raise ValueError(
            f"Expected argument `scale` to broadcast to the input's shape {tuple(like.shape)}, "
            f"but got shape {tuple(scale.shape)}"
        )
    if scale.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(((scale > 0) & (scale < float("inf")) | torch.isnan(scale)).all()):
            raise ValueError(
                "Expected argument `scale` to hold positive finite values (or NaN, the e8m0 code for no scale), but "
                "it holds zero, negative or infinite ones"
            )
        return scale
    return torch.where((scale > 0) & (scale < float("inf")), scale, float("nan"))


def compute_dtype(x_dtype: torch.dtype, fmt: FloatFormat, scaled: bool = False) -> torch.dtype:
    """The working precision: float32 when the input is not float64, no scale is given and every value of ``fmt``
    (and its spacing) is a float32 value; float64 otherwise.

    With a scale, ``x / scale``, ``scale * q`` and ``scale * S`` leave float32's range although ``x`` and the
    result are float32 values (``2**127 / 2**-4``); float64 holds all of them. It also makes the scaled rounding
    exact: for float32 (or narrower) ``x`` and a float32 ``scale``, the float64 quotient is never a false tie of a
    format with at most 23 mantissa bits, and ``scale * q`` is exact before the one rounding to the output dtype.
    """
    fits32 = fmt.emin - fmt.mantissa_bits >= -149 and fmt.emax <= 127 and fmt.mantissa_bits <= 23
    return torch.float32 if x_dtype != torch.float64 and fits32 and not scaled else torch.float64


def _exponent(a: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The binade exponent of ``a`` on ``fmt``'s grid: ``floor(log2 a)`` clamped below at ``emin``."""
    return floor_log2(a).clamp_min(fmt.emin)


def _round_magnitude(
    a: torch.Tensor, fmt: FloatFormat, rounding: Rounding, generator: torch.Generator | None
) -> torch.Tensor:
    """Round non-negative ``a`` onto ``fmt``'s grid, ignoring overflow. NaN stays NaN, inf stays inf."""
    e = _exponent(a, fmt)
    spacing = pow2(e - fmt.mantissa_bits, a.dtype)
    r = a / spacing  # exact: division by a power of two whose result is an integer below 2**(M+2)
    if rounding is Rounding.NEAREST:
        if fmt.flavour is Flavour.E8M0:
            n = torch.floor(r + 0.5)  # torch and ml_dtypes round e8m0 ties up (away from zero)
        elif fmt.mantissa_bits == 0:
            # With no mantissa the code's last bit is the exponent's: a tie 1.5 * 2**e goes to 2**e when the
            # biased exponent e + bias is even (torch.round would always pick the significand 2).
            n = torch.round(r)
            n = torch.where((r == 1.5) & (torch.remainder(e + fmt.bias, 2) == 0), torch.ones_like(n), n)
        else:
            n = torch.round(r)
    elif rounding is Rounding.TOWARD_ZERO:
        n = torch.trunc(r)
    else:
        lower = torch.floor(r)
        u = torch.rand(a.shape, generator=generator, dtype=a.dtype, device=a.device)
        n = lower + (u < (r - lower)).to(a.dtype)  # r - lower is exact; P(up) = distance to lower / gap
    if not fmt.has_zero:
        n = n.clamp_min(1.0)
    return n * spacing


def quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    scale: ScaleLike = None,
    rounding: str | Rounding = "nearest",
    saturate: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round ``x`` onto the grid of ``fmt`` and return it in ``x``'s dtype.

    With ``scale`` the result is ``scale * q(x / scale)`` (``scale`` a positive number or a tensor broadcastable
    to ``x``; a Python number is used exactly as passed, in float64).

    Semantics (``../shared/SPEC.md`` §2):

    - ``rounding="nearest"``: round to nearest, ties to even, carrying from the largest subnormal into the smallest
      normal and from the largest mantissa into the next binade. ``e8m0`` has no mantissa: its ties round up, as
      torch and ml_dtypes do. For every input it rounds to the *nearer* power of two, including float32 denormal
      inputs in (2**-127, 2**-126), which torch's and ml_dtypes' float8_e8m0fnu casts both round up to 2**-126 even
      below the midpoint 1.5 * 2**-127 (a deliberate, documented difference from those libraries).
    - ``rounding="stochastic"``: round up with probability (x - lower) / (upper - lower), so E[q(x)] = x inside the
      range; draws come from ``torch.rand(..., generator=generator)`` in the working precision (see below), so the
      probability is exact to 2**-24 (float32) or 2**-53 (float64) of the gap.
    - ``rounding="toward_zero"``: truncate the magnitude.
    - Overflow (a rounded magnitude above ``fmt.max``, including ±inf inputs): ``saturate=True`` gives ±max,
      ``saturate=False`` gives ±inf where the format has infinities, NaN otherwise. ``saturate=None`` (the default)
      uses ``fmt.saturate_default``: ``True`` exactly for the ``fn`` and ``finite`` flavours (float8_e4m3fn,
      float6_e2m3fn, float6_e3m2fn, float4_e2m1fn, e0m7, the ``eXmY`` family), ``False`` for ``ieee``, ``fnuz`` and
      ``e8m0``. The result is the same on every torch version: torch >= 2.12 saturates float8_e4m3fn casts like
      our default, while torch < 2.12 (and ml_dtypes above 464) gives NaN there, which is our ``saturate=False``.
      Toward zero never rounds a finite input past ``max``.
    - NaN in gives NaN out, also for formats without NaN (``finite``): a quantizer that turned NaN into a number
      would hide the fault. Signed zero is kept where the format has -0 (``fnuz`` returns +0).
    - Unsigned formats (``signed=False``, e.g. ``e8m0``): every negative value gives NaN (there is no sign bit to
      hold it; -0 is not negative and gives +0), and so does zero where the format has no zero code (``e8m0``), as
      ml_dtypes does (torch's float8_e8m0fnu cast differs there); NaN gives NaN. ``e8m0`` values below the
      smallest power 2**-127 round up to it.

    The arithmetic is exact: it runs in float32, or in float64 for float64 inputs, formats wider than float32 and
    whenever a scale is given (``x / scale`` and ``scale * q`` may leave float32's range; in float64 the scaled
    rounding of float32/float16/bfloat16 inputs by a float32 scale is exactly the rounding of the true quotient).
    float16/bfloat16 inputs are widened first. The result is rounded once to ``x``'s dtype, which is exact whenever
    the (scaled) grid value is a value of that dtype.

    Speed: nearest rounding without a scale takes a fast path with the same results (tested equal): on CUDA one
    Triton kernel (one read, one write per element) for every format but e8m0 and e0m7; elsewhere, for formats that
    are torch dtypes, torch's own cast there and back, used only after it was checked once per device, dtype and
    overflow mode against the arithmetic above on every code of the format, the ties between them and overflow.
    Anything else runs the arithmetic above as about 30 elementwise torch operations.

    Args:
        x: float32, float64, float16 or bfloat16 tensor, on any device.
        fmt: a :class:`~altgrad_lightning.FloatFormat`, a format name or a ``torch.dtype``.
        scale: optional positive scale. A Python number is validated here, a tensor's values only on CPU outside
            ``torch.compile`` (elsewhere that would synchronise or break the graph): there a zero, negative or
            infinite entry makes every element it scales NaN, as a NaN entry (e8m0's NaN) does everywhere.
        rounding: ``"nearest"``, ``"stochastic"`` or ``"toward_zero"``.
        saturate: overflow behaviour, see above.
        generator: ``torch.Generator`` on ``x``'s device for ``rounding="stochastic"``.

    Example:
        >>> x = torch.tensor([2.3, 464.0, 465.0, -2.0**-12, float("inf")])
        >>> quantize(x, "float8_e4m3fn")
        tensor([  2.2500, 448.0000, 448.0000,  -0.0000, 448.0000])
        >>> quantize(x, "float8_e4m3fn", saturate=False)
        tensor([  2.2500, 448.0000,      nan,  -0.0000,      nan])
        >>> quantize(torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8]), "bfloat16")  # ties to even
        tensor([1.0000, 1.0156])
        >>> quantize(torch.tensor([0.75]), "e4m3", scale=2.0**-10)  # 0.75 * 2**10 overflows 448
        tensor([0.4375])
    """
    check_float_tensor(x, "x")
    fmt = get_format(fmt, arg="fmt")
    try:
        mode = Rounding(rounding)
    except ValueError:
        known = ", ".join(repr(r.value) for r in Rounding)
        raise ValueError(f"Expected argument `rounding` to be one of {known}, but got {rounding!r}") from None
    if saturate is not None and not isinstance(saturate, bool):
        raise TypeError(f"Expected argument `saturate` to be None or a bool, but got {saturate!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"Expected argument `generator` to be a torch.Generator, but got {type(generator).__name__}"
            )
        if generator.device.type != x.device.type:
            raise ValueError(f"Expected argument `generator` on {x.device.type}, but got one on {generator.device}")
    sat = fmt.saturate_default if saturate is None else saturate
    if scale is None and mode is Rounding.NEAREST:
        fast = _fast_nearest(x, fmt, sat)
        if fast is not None:
            return fast
    return quantize_scaled(x, fmt, check_scale(scale, x), mode, sat, generator).to(x.dtype)


# --- fast paths of quantize(x, fmt) with nearest rounding and no scale -------------------------------------------

#: Formats that are torch dtypes, whose casts round to nearest-even in one step from float32/float16/bfloat16.
_NATIVE_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "bfloat16", "float16")
#: (device type, input dtype, format name, saturate) -> "cast", "clamp" (clamp to ±max, then cast) or None (neither
#: matches the reference on the probe values: the reference path is used).
_native_modes: dict[tuple[str, torch.dtype, str, bool], str | None] = {}


def _fast_nearest(x: torch.Tensor, fmt: FloatFormat, saturate: bool) -> torch.Tensor | None:
    """``quantize(x, fmt, saturate=saturate)`` without the ~30 elementwise kernels of the reference arithmetic, or
    None where no fast path applies (float64 inputs, formats that are no torch dtype on CPU, ``torch.compile``,
    inputs that record an autograd graph).

    - CUDA with Triton: one kernel (``_fused.triton_quantize``), one read and one write per element, for every format
      the fused diagnostics support (all presets but e8m0 and e0m7, and user formats like them).
    - CPU, formats that are no torch dtype but the fused diagnostics support (float6/float4, user formats): the same
      arithmetic in the C backend of the fused pass (``_fused.c_quantize``), where a C compiler built it.
    - Elsewhere, formats that are torch dtypes (float8_e4m3fn/e5m2 and their fnuz variants, bfloat16, float16): torch's
      own cast there and back. Its overflow and NaN behaviour differ between torch versions (torch < 2.12 turns
      float8_e4m3fn values above 464 into NaN, later versions saturate), so the cast is first checked once per device
      type, input dtype, format and overflow mode against the reference arithmetic on every code of the format, the
      midpoints between neighbours (ties) and their float32 neighbours, subnormal edges, values past max, ±inf,
      ±0 and NaN; if it differs, clamping to ±max first (for ``saturate=True``) is checked the same way, and if that
      differs too the reference path is used.
    """
    if x.dtype == torch.float64 or torch.compiler.is_compiling() or not x.is_contiguous():
        return None
    if x.requires_grad and torch.is_grad_enabled():  # keep the autograd graph the reference arithmetic builds
        return None
    if x.device.type == "cuda":
        from altgrad_lightning.functional._fused import HAS_TRITON, fused_format_supported, triton_quantize

        if HAS_TRITON and fused_format_supported(fmt):
            return triton_quantize(x, fmt, saturate)
    if fmt.name not in _NATIVE_DTYPES or not hasattr(torch, fmt.name):
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            from altgrad_lightning.functional import _fused_cpu
            from altgrad_lightning.functional._fused import c_quantize, fused_format_supported

            if fused_format_supported(fmt) and _fused_cpu.load() is not None:
                return c_quantize(x, fmt, saturate)
        return None
    key = (x.device.type, x.dtype, fmt.name, saturate)
    if key not in _native_modes:
        _native_modes[key] = _check_native(x.device, x.dtype, fmt, saturate)
    mode = _native_modes[key]
    if mode is None:
        return None
    return _native_cast(x, fmt, mode)


def _native_cast(x: torch.Tensor, fmt: FloatFormat, mode: str) -> torch.Tensor:
    dtype = getattr(torch, fmt.name)
    src = x.clamp(-fmt.max, fmt.max) if mode == "clamp" else x
    out = src.to(dtype).to(x.dtype)
    return out.clone() if out is x else out  # a bfloat16 tensor "cast" to bfloat16 is itself


def _check_native(device: torch.device, x_dtype: torch.dtype, fmt: FloatFormat, saturate: bool) -> str | None:
    """The first of "cast" and "clamp" whose results equal the reference arithmetic's on the probe values."""
    probe = _probe_values(fmt).to(device=device, dtype=x_dtype)
    want = _quantize_unscaled(probe.to(compute_dtype(x_dtype, fmt)), fmt, Rounding.NEAREST, saturate, None)
    want = want.to(x_dtype)
    for mode in ("cast", "clamp") if saturate else ("cast",):
        try:
            got = _native_cast(probe, fmt, mode)
        except (RuntimeError, TypeError):  # a cast this torch build or device does not implement
            return None
        same_sign = torch.signbit(got) == torch.signbit(want)
        if bool(((got == want) & same_sign | torch.isnan(got) & torch.isnan(want)).all()):
            return mode
    return None


def _probe_values(fmt: FloatFormat) -> torch.Tensor:
    """float32 points where a cast can go wrong: every finite value of the format (a torch dtype of 8 or 16 bits),
    the midpoints between neighbours and their float32 neighbours, values past max up to float32's max, float32
    denormals, ±inf and NaN; with both signs."""
    dtype = getattr(torch, fmt.name)
    if torch.finfo(dtype).bits == 8:
        codes = torch.arange(2**8, dtype=torch.int32).to(torch.uint8)
    else:
        codes = (torch.arange(2**16, dtype=torch.int32) - 2**15).to(torch.int16)
    grid = codes.view(dtype).to(torch.float64)
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    top = grid[-1]
    spacing = top - grid[-2]
    beyond = top + spacing * torch.arange(1, 9, dtype=torch.float64) / 4
    specials = torch.tensor(
        [2.0 * fmt.max, 1e30, 3.4e38, 2.0**-149, 2.0**-140, 2.0**-127, 2.0**-126, float("inf")], dtype=torch.float64
    )
    points = torch.cat([grid, mid, beyond, specials]).to(torch.float32)
    inf = torch.tensor(float("inf"))
    nudged = torch.cat([torch.nextafter(points, inf), torch.nextafter(points, -inf)])
    points = torch.cat([points, nudged, torch.tensor([float("nan")])])
    return torch.cat([points, -points])


def quantize_scaled(
    x: torch.Tensor,
    fmt: FloatFormat,
    scale: torch.Tensor | None,
    rounding: Rounding = Rounding.NEAREST,
    saturate: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``scale * q(x / scale)`` for validated arguments, in the working precision (:func:`compute_dtype`)."""
    xc = x.to(compute_dtype(x.dtype, fmt, scaled=scale is not None))
    if scale is None:
        return _quantize_unscaled(xc, fmt, rounding, saturate, generator)
    s = scale.to(xc.dtype)
    return _quantize_unscaled(xc / s, fmt, rounding, saturate, generator) * s


def _quantize_unscaled(
    x: torch.Tensor, fmt: FloatFormat, rounding: Rounding, saturate: bool, generator: torch.Generator | None
) -> torch.Tensor:
    a = x.abs()
    q = _round_magnitude(a, fmt, rounding, generator)
    limit = fmt.max
    over = q > limit
    if rounding is Rounding.TOWARD_ZERO:
        # Truncation never crosses max for a finite input; only inf (or an fn format's NaN code) is left to handle.
        over_finite = over & torch.isfinite(a)
        q = torch.where(over_finite, torch.full_like(q, limit), q)
        over = over & ~over_finite
    if saturate:
        overflow_value = limit
    else:
        overflow_value = float("inf") if fmt.has_inf else float("nan")
    q = torch.where(over, torch.full_like(q, overflow_value), q)
    if fmt.signed:
        q = torch.copysign(q, x)
        if not fmt.has_negative_zero:
            q = q + 0.0  # -0 + 0 is +0: fnuz formats have no negative zero
    else:
        # No sign bit: negative values (and, without a zero code, zero itself) have no value in the format.
        unrepresentable = (x < 0) | (x == 0) if not fmt.has_zero else x < 0
        q = torch.where(unrepresentable, torch.full_like(q, float("nan")), q + 0.0)
    return torch.where(torch.isnan(x), x, q)


def grid_index(q: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Order-preserving index of values ``q`` already on ``fmt``'s (unscaled) grid, as float64 (NaN stays NaN).

    Consecutive grid values differ by exactly 1; +0 and -0 are 0. Exact for every format with at most 53 bits of
    codes (all presets).
    """
    a = q.abs().to(torch.float64)
    e = _exponent(a, fmt)
    index = (e - fmt.emin).to(torch.float64) * 2.0**fmt.mantissa_bits + a / pow2(e - fmt.mantissa_bits, torch.float64)
    index = torch.where(torch.isinf(a), torch.full_like(a, float("inf")), index)
    return torch.where(q < 0, -index, index).where(~torch.isnan(a), a)


def code_index(x: torch.Tensor, fmt: FormatLike, *, scale: ScaleLike = None) -> torch.Tensor:
    """Order-preserving integer index of ``x`` on ``fmt``'s grid, as a float64 tensor.

    ``x`` is first rounded with ``quantize(x, fmt, scale=scale, saturate=True)`` (values already on the grid are
    unchanged), then numbered so that consecutive grid values differ by exactly 1, zero (either sign) is 0 and
    negative values have negative indices. ``|code_index(a) - code_index(b)|`` is the number of grid steps from a
    to b. float64 holds every index exactly for formats of up to 53 bits (all presets) and lets NaN stay NaN.

    Example:
        >>> code_index(torch.tensor([0.0, 2.0**-9, 2.0**-6, 1.0, 448.0, -448.0]), "float8_e4m3fn")
        tensor([   0.,    1.,    8.,   56.,  126., -126.], dtype=torch.float64)
    """
    check_float_tensor(x, "x")
    fmt = get_format(fmt, arg="fmt")
    return grid_index(quantize_to_grid(x, fmt, check_scale(scale, x)), fmt)


def quantize_to_grid(x: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None) -> torch.Tensor:
    """Nearest, saturating rounding of ``x / scale`` onto the *unscaled* grid, in the working precision."""
    xc = x.to(compute_dtype(x.dtype, fmt, scaled=scale is not None))
    if scale is not None:
        xc = xc / scale.to(xc.dtype)
    return _quantize_unscaled(xc, fmt, Rounding.NEAREST, True, None)


class _FakeQuantize(torch.autograd.Function):
    """Forward :func:`quantize`, backward the identity (straight-through estimator)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        fmt: FormatLike,
        scale: ScaleLike,
        rounding: str | Rounding,
        saturate: bool | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return quantize(x, fmt, scale=scale, rounding=rounding, saturate=saturate, generator=generator)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None]:  # type: ignore[override]
        return grad, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    fmt: FormatLike,
    *,
    scale: ScaleLike = None,
    rounding: str | Rounding = "nearest",
    saturate: bool | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`quantize` with a straight-through gradient: quantization-aware training's fake quantization.

    The forward value is ``quantize(x, fmt, scale=scale, rounding=rounding, saturate=saturate,
    generator=generator)`` bit for bit (it *is* that call, arguments validated there with the same errors); the
    gradient with respect to ``x`` is the upstream gradient unchanged (the straight-through estimator), also where
    the value saturates at ``±max`` or rounds to zero: no clipping of the gradient outside the range. No gradient
    flows to ``scale`` (a scale computed from ``x``, such as :func:`~altgrad_lightning.scaling.mx_scale` or
    :func:`~altgrad_lightning.scaling.amax_scale`, is a constant of the step). The usual construction
    ``x + (quantize(x.detach()) - x.detach())`` is *not* used: ``x + (q - x)`` rounds in floating point and need
    not equal ``q``. Implemented as a ``torch.autograd.Function``, it traces as one graph under
    ``torch.compile(fullgraph=True)``, forward and backward, except with a ``generator``: dynamo does not trace a
    ``torch.Generator`` argument (nor does it for :func:`quantize` itself), so stochastic rounding with one needs
    ``fullgraph=False`` (a graph break; the values are still those of the eager call).

    Args: as :func:`quantize`.

    Example:
        >>> x = torch.tensor([0.3, 1.1, -2.6, 500.0], requires_grad=True)
        >>> y = fake_quantize(x, "float8_e4m3fn")
        >>> y.tolist()  # 500 saturates to the largest value, 448
        [0.3125, 1.125, -2.5, 448.0]
        >>> (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
        >>> x.grad
        tensor([1., 2., 3., 4.])
    """
    out: torch.Tensor = _FakeQuantize.apply(x, fmt, scale, rounding, saturate, generator)
    return out
