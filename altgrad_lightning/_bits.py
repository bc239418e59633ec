"""Exact bit-level helpers shared by quantize and the diagnostics (torch only, no host synchronisation)."""

from __future__ import annotations

import torch

# dtype -> (same-width integer dtype, mantissa bits, exponent bias, exponent bits)
_LAYOUT: dict[torch.dtype, tuple[torch.dtype, int, int, int]] = {
    torch.float64: (torch.int64, 52, 1023, 11),
    torch.float32: (torch.int32, 23, 127, 8),
    torch.float16: (torch.int16, 10, 15, 5),
    torch.bfloat16: (torch.int16, 7, 127, 8),
}

FLOAT_DTYPES = tuple(_LAYOUT)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """``floor(log2(a))`` for positive finite float32/float64 ``a``, exact (denormals included), as int32/int64.

    Zero gives a number below every denormal exponent; inf and NaN give ``bias + 1``. Callers mask those.
    """
    itype, mbits, bias, ebits = _LAYOUT[a.dtype]
    tiny = a < torch.finfo(a.dtype).tiny
    # Scaling a denormal by 2**(mbits + 1) is exact and makes it normal, so its exponent field becomes readable.
    a = torch.where(tiny, a * 2.0 ** (mbits + 1), a)
    field = torch.bitwise_and(torch.bitwise_right_shift(a.view(itype), mbits), (1 << ebits) - 1)
    return field - bias - tiny.to(itype) * (mbits + 1)


def pow2(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2.0 ** p`` exactly for integer tensor ``p`` (clamped to the representable range of ``dtype``)."""
    itype, mbits, bias, _ = _LAYOUT[dtype]
    p = p.to(itype).clamp(1 - bias - mbits, bias)
    normal = torch.bitwise_left_shift(p + bias, mbits)
    sub = torch.bitwise_left_shift(torch.ones_like(p), (p + bias - 1 + mbits).clamp(0, mbits - 1))
    return torch.where(p >= 1 - bias, normal, sub).view(dtype)


def ordered_int(x: torch.Tensor) -> torch.Tensor:
    """Map floats to int64 so that consecutive representable values differ by 1 and +0 == -0.

    Sign-magnitude bits become two's complement: ``b`` if the sign is clear, ``-(b & magnitude_mask)`` if set.
    """
    itype, mbits, _, ebits = _LAYOUT[x.dtype]
    bits = x.view(itype).to(torch.int64)
    width = 1 + ebits + mbits
    magnitude = torch.bitwise_and(bits, (1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)
