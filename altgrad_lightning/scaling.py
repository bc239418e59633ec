"""Scales for scaled grids: per-tensor ``amax`` scaling and OCP Microscaling (MX) block scaling.

A scale turns a format's grid into ``scale * grid``; every function of this package takes it as ``scale=``, so
``quantize(x, "float4_e2m1fn", scale=mx_scale(x, "float4_e2m1fn"))`` is MXFP4 quantize-dequantize and
``compute_stiffness_field(w, "e4m3", scale=mx_scale(w, "e4m3"))`` the spacing of MXFP8 E4M3 storage.
"""

from __future__ import annotations

import torch

from altgrad_lightning._bits import floor_log2, pow2
from altgrad_lightning.formats import FloatFormat, FormatLike, get_format
from altgrad_lightning.quantize import check_float_tensor

__all__ = ["amax_scale", "mx_scale"]

MX_SCALE_EMAX = 127
"""The shared scale is a float8_e8m0fnu value: a power of two 2**X with -127 <= X <= 127 (0xFF is NaN)."""


def _check_block_size(block_size: object) -> int:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"Expected argument `block_size` to be a positive int, but got {block_size!r}")
    return block_size


def mx_scale(x: torch.Tensor, fmt: FormatLike, *, block_size: int = 32) -> torch.Tensor:
    """The OCP Microscaling (MX v1.0) shared scale of each element of ``x``, for element format ``fmt``.

    Blocks are ``block_size`` consecutive elements along the last dimension (a 0-d tensor is one block of one; the
    last block of a row may be partial and is scaled on its own elements). Each block's scale is the
    float8_e8m0fnu value ``X = 2**(floor(log2(amax)) - emax_elem)``, with ``amax`` the largest magnitude in the
    block and ``emax_elem = fmt.emax`` the exponent of the element format's largest normal (MX v1.0 §6.3):

    - the exponent is clamped below at -127 (e8m0's smallest value), so a block of zeros, or of values too small
      for any scale, gets ``2**-127``;
    - a block holding NaN or ±inf, or whose exponent would pass 127 (float64 inputs only), gets NaN: e8m0's NaN
      code, which makes the whole block NaN in :func:`~altgrad_lightning.quantize` and counted as non-finite in
      the diagnostics.

    The elements are then ``quantize(x, fmt, scale=mx_scale(x, fmt), saturate=True)``: MX clamps the elements of a
    block whose amax rounds past ``fmt.max`` (e.g. E4M3 elements of 1.99 * 2**8 become 448) instead of overflowing,
    so pass ``saturate=True`` for formats that do not saturate by default (E5M2). The diagnostics round with
    saturation already.

    Returns a float32 tensor of ``x``'s shape (every scale is a float32 value), on ``x``'s device. No host
    synchronisation.

    Example:
        >>> x = torch.tensor([[1.0, 0.3, -5.0, 0.0], [0.0, 0.0, 0.0, 2.0**-140]])
        >>> mx_scale(x, "float4_e2m1fn", block_size=2)  # emax of E2M1 is 2: 2**(0 - 2), 2**(2 - 2), 2**-127
        tensor([[2.5000e-01, 2.5000e-01, 1.0000e+00, 1.0000e+00],
                [5.8775e-39, 5.8775e-39, 5.8775e-39, 5.8775e-39]])
    """
    check_float_tensor(x, "x")
    return _mx_scale(x, get_format(fmt, arg="fmt"), _check_block_size(block_size))


def _blocks(x: torch.Tensor, block_size: int, lead: int = 0) -> torch.Tensor:
    """``x`` as ``(rows, n_blocks, block_size)``: blocks along the last dimension (a 0-d tensor is one row of one),
    the last block of a row padded with zeros, which change no block's amax or sum. ``lead`` zeros go before each
    row's first element: a shard whose last dimension starts ``lead`` elements into a block."""
    n = x.shape[-1] if x.ndim else 1
    rows = x.reshape(x.numel() // n if n else 0, n)
    n_blocks = -(-(lead + n) // block_size)
    if lead or n_blocks * block_size != n:
        rows = torch.nn.functional.pad(rows, (lead, n_blocks * block_size - n - lead))
    return rows.reshape(rows.shape[0], n_blocks, block_size)


def block_sums(x: torch.Tensor, block_size: int, lead: int = 0) -> torch.Tensor:
    """Sum of each MX block of ``x`` (blocks as :func:`mx_scale` forms them; ``lead`` as in ``_blocks``), shape
    ``(rows, n_blocks)``, int64 for a boolean ``x``."""
    return _blocks(x.to(torch.int64) if x.dtype == torch.bool else x, block_size, lead).sum(-1)


def _block_amax(x: torch.Tensor, block_size: int, lead: int = 0) -> torch.Tensor:
    """The largest magnitude of each MX block of ``x`` (NaN where a block holds NaN), ``(rows, n_blocks)``, float32
    (float64 for float64 ``x``)."""
    blocks = _blocks(x.abs().to(torch.float64 if x.dtype == torch.float64 else torch.float32), block_size, lead)
    return blocks.amax(-1) if blocks.numel() else blocks.new_zeros(blocks.shape[:2])


def _mx_block_scale(amax: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """The e8m0 scale (float32) of blocks with these amaxes: NaN for NaN/±inf amaxes and exponents past 127."""
    exponent = (floor_log2(amax) - fmt.emax).clamp_min(-MX_SCALE_EMAX)
    bad = ~torch.isfinite(amax) | (exponent > MX_SCALE_EMAX)
    return torch.where(bad, float("nan"), pow2(exponent.clamp_max(MX_SCALE_EMAX), torch.float32))


def _per_element(block_scale: torch.Tensor, block_size: int, shape: torch.Size, lead: int = 0) -> torch.Tensor:
    """Blocks' scales ``(rows, n_blocks)`` spread over the elements of a tensor of ``shape`` (``lead`` as above)."""
    n = shape[-1] if len(shape) else 1
    return block_scale.repeat_interleave(block_size, dim=-1)[:, lead : lead + n].reshape(shape)


def _mx_scale(x: torch.Tensor, fmt: FloatFormat, block_size: int) -> torch.Tensor:
    return _per_element(_mx_block_scale(_block_amax(x, block_size), fmt), block_size, x.shape)


def amax_scale(x: torch.Tensor, fmt: FormatLike) -> torch.Tensor:
    """Per-tensor current scaling as FP8 recipes use it: ``amax(|x|) / fmt.max``, a 0-d tensor.

    A tensor that is empty, all zero or holds NaN/±inf has no meaningful amax and gets 1 (the unscaled grid).
    float32 (float64 for float64 ``x``); no host synchronisation.

    Example:
        >>> amax_scale(torch.tensor([0.5, -896.0]), "float8_e4m3fn")
        tensor(2.)
    """
    check_float_tensor(x, "x")
    return _amax_scale(_amax(x), get_format(fmt, arg="fmt"))


def _amax(x: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        return torch.zeros((), dtype=dtype, device=x.device)
    return x.abs().amax().to(dtype)


def _amax_scale(amax: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    return torch.where(torch.isfinite(amax) & (amax > 0), amax / fmt.max, torch.ones_like(amax))


def _scale_for(w: torch.Tensor, fmt: FloatFormat, scaling: str, block_size: int) -> torch.Tensor | None:
    """The scale of ``w`` on ``fmt``'s grid for a callback's ``scaling`` (``"none"``, ``"amax"`` or ``"mx"``)."""
    if scaling == "mx":
        return _mx_scale(w, fmt, block_size)
    if scaling == "amax":
        return _amax_scale(_amax(w), fmt)
    return None
