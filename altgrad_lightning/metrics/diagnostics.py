"""One torchmetrics ``Metric`` per diagnostic family of ``../shared/SPEC.md`` §3."""

from __future__ import annotations

from typing import Any

import torch

from altgrad_lightning.formats import FloatFormat
from altgrad_lightning.functional._reduce import Sums
from altgrad_lightning.functional.flips import _flip_compute, _flip_update
from altgrad_lightning.functional.grid import _grid_alignment_compute, _grid_alignment_update
from altgrad_lightning.functional.stiffness import _gradient_stiffness_compute, _gradient_stiffness_update
from altgrad_lightning.functional.ulp import _ulp_compute, _ulp_update
from altgrad_lightning.metrics._base import SumsMetric
from altgrad_lightning.quantize import ScaleLike

__all__ = ["GradientStiffness", "GridAlignment", "GridFlips", "UlpMovement"]


class GradientStiffness(SumsMetric):
    """:func:`~altgrad_lightning.functional.gradient_stiffness_correlation`, accumulated over steps and ranks.

    ``update(w, g, scale=None)``: weights and their gradients. ``compute()``: ``grad_below_stiffness_frac``,
    ``grad_stiff_ratio_mean``, ``grad_stiff_correlation``, ``zero_weight_frac``, ``grad_nonfinite_frac``.

    Example:
        >>> import torch
        >>> metric = GradientStiffness("float8_e4m3fn")
        >>> metric.update(torch.tensor([1.0, 1.0]), torch.tensor([0.0625, 0.25]))
        >>> metric.update(torch.tensor([4.0]), torch.tensor([0.25]))
        >>> round(metric.compute()["grad_below_stiffness_frac"].item(), 4)
        0.6667
    """

    update_fn = staticmethod(_gradient_stiffness_update)
    compute_fn = staticmethod(_gradient_stiffness_compute)
    arg_names = ("w", "g")


def _grid_pair_update(w: torch.Tensor, _same_w: torch.Tensor, fmt: FloatFormat, scale: torch.Tensor | None) -> Sums:
    return _grid_alignment_update(w, fmt, scale)


class GridAlignment(SumsMetric):
    """:func:`~altgrad_lightning.functional.grid_alignment_statistics`, accumulated over steps and ranks.

    ``update(w, scale=None)``: weights. ``compute()``: ``grid_error_mean``,
    ``grid_error_max``, ``grid_error_std``, ``on_grid_frac``, ``overflow_frac``, ``underflow_frac``,
    ``grid_nonfinite_frac``, ``unrepresentable_frac``.

    Example:
        >>> import torch
        >>> metric = GridAlignment("float8_e4m3fn")
        >>> metric.update(torch.tensor([1.0, 500.0]))
        >>> metric.update(torch.tensor([1.0625, 2.0**-11]))
        >>> {k: metric.compute()[k].item() for k in ("on_grid_frac", "overflow_frac", "underflow_frac")}
        {'on_grid_frac': 0.25, 'overflow_frac': 0.25, 'underflow_frac': 0.25}
    """

    update_fn = staticmethod(_grid_pair_update)
    compute_fn = staticmethod(_grid_alignment_compute)
    arg_names = ("w", "w")

    def update(self, w: torch.Tensor, scale: ScaleLike = None) -> None:  # type: ignore[override]  # one tensor
        """Add weights ``w`` (optionally on the grid ``scale * grid``)."""
        super().update(w, w, scale)


class UlpMovement(SumsMetric):
    """:func:`~altgrad_lightning.functional.ulp_statistics` in the storage dtype, accumulated over steps and ranks.

    ``update(before, after)``: weights before and after an optimizer step (same dtype). ``compute()``:
    ``ulp_mean``, ``ulp_median``, ``ulp_max``, ``ulp_zero_frac``, ``ulp_nonfinite_frac``, ``ulp_histogram``.

    Example:
        >>> import torch
        >>> metric = UlpMovement()
        >>> metric.update(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0 + 2**-23]))
        >>> metric.update(torch.tensor([0.0]), torch.tensor([2.0**-149]))
        >>> {k: metric.compute()[k].item() for k in ("ulp_median", "ulp_max", "ulp_zero_frac")}
        {'ulp_median': 1.0, 'ulp_max': 1.0, 'ulp_zero_frac': 0.3333333333333333}
    """

    update_fn = staticmethod(_ulp_update)
    compute_fn = staticmethod(_ulp_compute)
    uses_format = False

    def __init__(self, fmt: None = None, **kwargs: Any) -> None:
        # ULPs are counted in the tensors' own dtype: a format passed here would be silently ignored.
        if fmt is not None:
            raise ValueError(
                "Expected argument `fmt` of UlpMovement to be None (ULPs are counted in the tensors' own dtype), "
                f"but got {fmt!r}"
            )
        super().__init__(None, **kwargs)

    def update(self, before: torch.Tensor, after: torch.Tensor, scale: ScaleLike = None) -> None:
        """Add weights ``before`` and ``after`` one optimizer step (same dtype, shape and device)."""
        if scale is not None:  # said here with what was passed; the base class would only say that it has no format
            got = f"a tensor of shape {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else repr(scale)
            raise ValueError(f"Expected argument `scale` of UlpMovement to be None (it has no format), but got {got}")
        super().update(before, after)


class GridFlips(SumsMetric):
    """:func:`~altgrad_lightning.functional.flip_statistics`, accumulated over steps and ranks.

    ``update(before, after, scale=None)``: weights before and after an optimizer step. ``compute()``:
    ``flip_frac``, ``update_stall_frac``, ``updated_frac``, ``grid_steps_mean``, ``flip_nonfinite_frac``.

    Example:
        >>> import torch
        >>> metric = GridFlips("bfloat16")
        >>> before = torch.ones(4)
        >>> metric.update(before, before + torch.tensor([0.0, 1e-3, 1e-3, 1e-2]))
        >>> metric.compute()["update_stall_frac"].item()
        0.6666666666666666
    """

    update_fn = staticmethod(_flip_update)
    compute_fn = staticmethod(_flip_compute)
