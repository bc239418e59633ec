"""ULP movement: how many representable values of the storage dtype each weight moved (SPEC §3.4)."""

from __future__ import annotations

import torch

from altgrad_lightning._bits import floor_log2, ordered_int, pow2
from altgrad_lightning.functional._reduce import Sums, count, masked_max, masked_sum, ratio
from altgrad_lightning.quantize import check_pair

__all__ = ["compute_ulp_distance", "ulp_statistics", "ulp_histogram_edges", "ULP_HISTOGRAM_BINS"]

_SUB = 16
"""Sub-buckets per octave of the fine histogram kept as state (the median's resolution)."""
_OCTAVES = 64
_FINE_BINS = 1 + _OCTAVES * _SUB
ULP_HISTOGRAM_BINS = 1 + _OCTAVES
"""Buckets of the logged histogram (65). Bucket 0 holds the distance 0; bucket k, for 1 <= k <= 64, holds the
integers d with 2**(k-1) <= d <= 2**k - 1: bucket 1 holds 1, bucket 2 holds 2 and 3, bucket 3 holds 4 to 7, ...,
bucket 63 holds 2**62 to 2**63 - 1 (the saturated float64 distance included). Bucket 64 (2**63 to 2**64 - 1) is
always empty, since int64 distances stop at 2**63 - 1; it is kept so the edges are 0 and every power of two below
2**64."""
_INT64_MAX = torch.iinfo(torch.int64).max


def compute_ulp_distance(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Exact number of representable values of the tensors' dtype between ``before`` and ``after``.

    Each value's bits map to an order-preserving integer (sign-magnitude to two's complement, +0 and -0 the same
    point) and the integers are subtracted, so the result equals the number of ``nextafter`` steps from one to the
    other, across binades, across zero and from zero; it is symmetric and an int64. ±inf is one step past ±max.
    Where either side is NaN the result is -1 (a distance is never negative, so the marker cannot be mistaken).
    float64 distances above 2**63 - 1 (only between values of opposite signs and magnitude around 1 or more)
    saturate at 2**63 - 1.

    Args:
        before, after: tensors of one float dtype (float32, float64, float16 or bfloat16), shape and device.

    Example:
        >>> before = torch.tensor([1.0, 1.0, 0.0, -0.0])
        >>> compute_ulp_distance(before, torch.tensor([1.0, 1.0 - 2**-24, 2**-149, 2**-149]))
        tensor([0, 1, 1, 1])
        >>> compute_ulp_distance(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([2.0], dtype=torch.bfloat16))
        tensor([128])
    """
    check_pair(before, after, ("before", "after"), same_dtype=True)
    return _ulp_distance(before, after)


def _ulp_distance(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    a, b = ordered_int(after), ordered_int(before)
    diff = a - b  # wraps (two's complement) only for float64 pairs of opposite signs more than 2**63 apart
    overflow = (torch.bitwise_xor(a, b) < 0) & (torch.bitwise_xor(a, diff) < 0)
    d = torch.where(overflow | (diff == -_INT64_MAX - 1), _INT64_MAX, diff.abs())  # |-2**63| is not an int64
    return torch.where(torch.isnan(before) | torch.isnan(after), -1, d)


def _fine_bucket(d_in: torch.Tensor) -> torch.Tensor:
    """Fine histogram bucket of non-negative int64 distances: 0 for 0, else ``1 + 16 k + floor(16 (d / 2**k - 1))``."""
    d = d_in
    d = d.clamp_min(1)
    k = floor_log2(d.to(torch.float64)).to(torch.int64).clamp(0, 62)  # int64 distances are below 2**63
    # float64 rounds integers above 2**53 and can bump k by one: correct it with exact integer arithmetic.
    k = torch.where(torch.bitwise_left_shift(torch.ones_like(k), k) > d, k - 1, k)
    rest = d - torch.bitwise_left_shift(torch.ones_like(k), k)  # in [0, 2**k)
    shift = k - _SUB.bit_length() + 1  # 16 sub-buckets: rest * 16 / 2**k = rest >> (k - 4)
    sub = torch.where(
        shift >= 0,
        torch.bitwise_right_shift(rest, shift.clamp_min(0)),
        torch.bitwise_left_shift(rest, (-shift).clamp_min(0)),
    )
    return torch.where(d_in == 0, 0, 1 + k * _SUB + sub.clamp(0, _SUB - 1))


def _fine_lower_edges(device: torch.device) -> torch.Tensor:
    """Smallest integer distance in each fine bucket (exact for every bucket below 2**53)."""
    b = torch.arange(1, _FINE_BINS, device=device, dtype=torch.int64)
    k, sub = torch.div(b - 1, _SUB, rounding_mode="floor"), torch.remainder(b - 1, _SUB)
    edges = torch.ceil(pow2(k, torch.float64) * (1.0 + sub / _SUB))
    return torch.cat([torch.zeros(1, dtype=torch.float64, device=device), edges])


def ulp_histogram_edges() -> list[int]:
    """Smallest integer of each logged bucket: ``[0, 1, 2, 4, 8, ..., 2**63]`` (65 edges, see
    :data:`ULP_HISTOGRAM_BINS`); bucket k holds the integers from edge k up to edge k+1 minus one."""
    return [0] + [2**k for k in range(_OCTAVES)]


def _ulp_update(before: torch.Tensor, after: torch.Tensor) -> Sums:
    """Mergeable sums for :func:`ulp_statistics`, including the fine histogram ``hist`` (int64 counts)."""
    d = _ulp_distance(before, after)
    valid = torch.isfinite(before) & torch.isfinite(after)
    bucket = torch.where(valid, _fine_bucket(d.clamp_min(0)), 0)
    hist = torch.zeros(_FINE_BINS, dtype=torch.int64, device=d.device)
    hist.scatter_add_(0, bucket.flatten(), valid.flatten().to(torch.int64))
    return {
        "n_total": torch.tensor(d.numel(), dtype=torch.int64, device=d.device),
        "n_valid": count(valid),
        "n_zero": count(valid & (d == 0)),
        "sum_ulp": masked_sum(d, valid),
        "ulp_max": masked_max(d, valid),
        "hist": hist,
    }


def _ulp_compute(sums: Sums) -> dict[str, torch.Tensor]:
    """Statistics from (merged) :func:`_ulp_update` sums; ``ulp_histogram`` holds the log2-bucket counts."""
    hist = sums["hist"]
    rank = torch.div(sums["n_valid"] + 1, 2, rounding_mode="floor").clamp_min(1)  # 1-based rank of the lower median
    median_bucket = torch.searchsorted(hist.cumsum(0), rank.reshape(1)).clamp_max(_FINE_BINS - 1)
    median = _fine_lower_edges(hist.device)[median_bucket].reshape(())
    coarse = torch.cat([hist[:1], hist[1:].reshape(_OCTAVES, _SUB).sum(1)])
    return {
        "ulp_mean": ratio(sums["sum_ulp"], sums["n_valid"]),
        "ulp_median": torch.where(sums["n_valid"] > 0, median, 0.0),
        "ulp_max": sums["ulp_max"],
        "ulp_zero_frac": ratio(sums["n_zero"], sums["n_valid"]),
        "ulp_nonfinite_frac": ratio(sums["n_total"] - sums["n_valid"], sums["n_total"]),
        "ulp_histogram": coarse,
    }


def ulp_statistics(before: torch.Tensor, after: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of :func:`compute_ulp_distance` over the pairs where both sides are finite.

    - ``ulp_mean``, ``ulp_max``: of the distances. A weight crossing zero moves ~2**31 float32 ULPs, so the mean
      is dominated by the few weights near zero: the median, the zero fraction and the histogram carry the story.
    - ``ulp_median``: the lower median, exact below 32 ULPs; above, the smallest integer of its 1/16-octave bucket
      (at most 1/16 below the true median). Kept in a fixed-size histogram so it merges across steps and ranks.
    - ``ulp_zero_frac``: fraction that did not move (stalled).
    - ``ulp_nonfinite_frac``: pairs with NaN or ±inf on either side, counted apart, as a fraction of all pairs.
    - ``ulp_histogram``: int64 counts in log2 buckets 0, 1, 2-3, 4-7, ... (edges: :func:`ulp_histogram_edges`).

    Example:
        >>> before = torch.tensor([1.0, 1.0, 1.0, 1.0])
        >>> after = before + torch.tensor([0.0, 2**-23, 3 * 2**-23, 2**-20])
        >>> stats = ulp_statistics(before, after)
        >>> [stats[k].item() for k in ("ulp_mean", "ulp_median", "ulp_max", "ulp_zero_frac")]
        [3.0, 1.0, 8.0, 0.25]
        >>> stats["ulp_histogram"][:5].tolist()
        [1, 1, 1, 0, 1]
    """
    check_pair(before, after, ("before", "after"), same_dtype=True)
    return _ulp_compute(_ulp_update(before, after))
