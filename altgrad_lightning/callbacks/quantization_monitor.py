"""The Lightning callback: when to feed which tensors to which Metric, and logging (SPEC §4)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.hooks import RemovableHandle

from altgrad_lightning.formats import FloatFormat, FormatLike, get_format
from altgrad_lightning.functional import _fused_cpu
from altgrad_lightning.functional._fused import FusedPass, fused_supported
from altgrad_lightning.functional.flips import _flip_sums_and_masks
from altgrad_lightning.functional.ulp import ulp_histogram_edges
from altgrad_lightning.metrics import GradientStiffness, GridAlignment, GridFlips, SumsMetric, UlpMovement
from altgrad_lightning.metrics._base import all_reduce_sums, reset_all, sums_to_host
from altgrad_lightning.report import MX_BLOCK_FILE
from altgrad_lightning.scaling import (
    _amax,
    _amax_scale,
    _block_amax,
    _check_block_size,
    _mx_block_scale,
    _per_element,
    _scale_for,
    block_sums,
)

__all__ = ["QuantizationMonitor"]

DIAGNOSTICS = ("stiffness", "grid", "ulp", "flips")
_FAMILIES: dict[str, type[SumsMetric]] = {
    "stiffness": GradientStiffness,
    "grid": GridAlignment,
    "ulp": UlpMovement,
    "flips": GridFlips,
}
_SCALINGS = ("none", "amax", "mx")
_CPU_BATCH = 1 << 18  # elements: the reference path joins the parameters of a CPU step up to this size
_GPU_BATCH = 1 << 22  # on a GPU: its float64 temporaries (a dozen live at once) stay within ~0.5 GiB


class QuantizationMonitor(Callback):
    r"""Logs, every optimizer step, which weight updates each target number format would swallow.

    Gradients and weights are read in ``on_before_optimizer_step`` (after AMP unscaling, before gradient clipping);
    the updated weights right after the optimizer really stepped, through the optimizer's own
    ``register_step_post_hook``. A step the AMP ``GradScaler`` skips (inf/NaN gradients) produces no ULP or flip
    sample and is counted in ``skipped_steps``. A fused optimizer (e.g. ``Adam(fused=True)``) unscales inside its
    ``step()``, after ``on_before_optimizer_step``: its gradients are divided by the scaler's scale before use,
    and a step the scaler skips (the fused kernel leaves the weights alone, but the post hook still fires) is
    recognised from the scaler's ``found_inf`` and counted in ``skipped_steps`` as well. Sampled steps accumulate
    into the Metrics of :mod:`altgrad_lightning.metrics`, which are logged at the Trainer's logging cadence
    (``log_every_n_steps``) as the aggregate of the steps since the previous log, then reset.

    Only real optimizer steps count: with gradient accumulation, batches that only accumulate add nothing. With
    several optimizers (e.g. manual optimization), every ``optimizer.step()`` of each optimizer is sampled with
    that optimizer's own parameters, and the keys below hold the aggregate over all optimizers' parameters; use
    ``per_parameter`` (or a second monitor with ``include``/``exclude`` and its own ``prefix``) to tell them apart.
    Parameters without ``requires_grad`` are never measured, and a parameter without a gradient at a step is
    left out of that step (its per-parameter keys then log the 0.0 of an empty window).

    Args:
        formats: one or more target formats (names such as ``"float8_e4m3fn"``, ``"e5m2"``, ``"bf16"`` or
            :class:`~altgrad_lightning.FloatFormat` s), all evaluated in the same pass over the parameters.
        diagnostics: any of ``"stiffness"``, ``"grid"``, ``"ulp"``, ``"flips"``.
        include: regular expressions; a parameter is selected if its name matches one (``re.search``). Default:
            every trainable parameter that has a gradient at the step.
        exclude: regular expressions; matching parameters are dropped (after ``include``).
        per_parameter: also log every statistic per parameter (keys end in ``/{parameter_name}``).
        every_n_steps: sample the optimizer steps of one stepping batch in ``n`` (counted as Lightning counts
            batches for ``log_every_n_steps``; with one optimizer in automatic optimization this is
            ``trainer.global_step``); other steps cost nothing. With several optimizers stepping in one batch (manual
            optimization), the sampled batches measure every optimizer, where ``global_step``, which counts each
            optimizer's steps, would keep sampling the same one. A logging step whose window sampled no optimizer
            step logs nothing (not the zeros of an empty window) and costs nothing either.
        scaling: ``"none"``; ``"amax"`` for the grid an FP8 recipe with current per-tensor scaling would use:
            ``scale = amax(|w|) / fmt.max`` per parameter and format; or ``"mx"`` for OCP Microscaling (MX v1.0):
            blocks of ``block_size`` elements along each parameter's last dimension share a float8_e8m0fnu scale
            ``2**(floor(log2(amax_block)) - fmt.emax)`` (:func:`~altgrad_lightning.scaling.mx_scale`), so
            ``formats=["float8_e4m3fn", "float4_e2m1fn"]`` with ``scaling="mx"`` measures MXFP8 and MXFP4. Flips
            use the scales of the weights before the step on both sides, so a flip is movement of the weight, not
            of the scale. With FSDP2 (``ModelParallelStrategy``, DTensors sharded along dim 0) a weight's shard
            holds whole rows, so whole blocks; a 1-D parameter's shard can cut a block, whose scale then comes from
            one packed ``MAX`` all-reduce of block amaxes per sampled step. FSDP1's flattened shards hide the shapes
            blocks are formed in: ``"mx"`` raises a ValueError there, as for other placements.
        block_size: elements per MX block (``scaling="mx"`` only; default 32, as MXFP8/MXFP6/MXFP4). With
            ``scaling="mx"`` and ``per_parameter``, the monitor also counts, over the whole fit, each block's updated
            and stalled weights per format and parameter, and rank 0 saves them at the end of fit as
            ``mx_block_stalls.pt`` in ``trainer.log_dir`` (``{"block_size": int, "stalls": {format: {parameter:
            float64 tensor (rows, blocks, 2) of [n_updated, n_stall]}}}``); ``altgrad-lightning report`` draws them
            as ``mx_block_heatmap.png``.
        prefix: first component of every key.
        log_histogram: log the ULP-movement histogram as fractions per log2 bucket.
        stall_threshold: alert level for ``update_stall_frac`` (needs ``"flips"``), a fraction in (0, 1]. At each
            logging step, for every format, the monitor logs ``{prefix}/{fmt}/stall_alert`` (1.0 when the window's
            overall stall fraction or that of any selected parameter exceeds the threshold, else 0.0; also in
            ``trainer.callback_metrics``, so ``EarlyStopping(monitor=..., mode="min", divergence_threshold=0.5)``
            or ``ModelCheckpoint`` can act on it) and warns once on rank 0 naming the parameters above it (each
            parameter and format is named once per fit). Per-parameter counts cost two numbers per parameter and
            format, not the ``per_parameter`` keys.
        fused: compute every diagnostic of every format in two fused passes over all parameters of an optimizer
            (about 20 bytes of memory traffic per float32 parameter and step) instead of dozens of tensor
            operations per parameter: on CUDA, CUDA C kernels compiled at run time by the NVRTC that ships with
            torch (Triton kernels where that does not build, and with ``sample_fraction``), and on the CPU a small C
            library built once with the system C compiler (``$CC`` or ``cc``; a few seconds, then cached under
            ``~/.cache/altgrad_lightning``; without a compiler the monitor warns once per fit and takes the
            reference path). Same numbers (tested equal); applies to contiguous float32 weights and gradients
            without ``per_parameter`` or ``scaling``, and to every preset format but ``float8_e8m0fnu`` and
            ``e0m7``; anything else takes the reference path, per optimizer and step.
        sample_fraction: measure a fixed random subset of the weight elements instead of all of them: each element
            of each selected parameter (of the rank's shard, when sharded) is in it independently with this
            probability, drawn once at the start of fit from ``sample_seed`` (plus the rank when sharded), so the same
            elements are measured at every step and again after a resume. Memory: the snapshot and an int32 index per
            sampled element, ``2 * sample_fraction`` of one float32 copy of the parameters (0.02 gives 4 %) instead
            of one whole copy; time falls about in proportion. Because the subset ignores the values, it is a
            simple random sample of the weights: every logged fraction and mean is an unbiased estimate of the
            whole model's (fractions among a subset of elements, such as ``update_stall_frac`` among updated
            weights, are ratio estimates whose bias falls as 1 / sampled elements), with a standard error of at most
            ``0.5 / sqrt(n)`` for ``n`` sampled elements in its denominator; maxima, the median and the histogram
            are the sample's.
            ``None`` (the default) measures every element, exactly.
        sample_seed: seed of the subset (an int).

    Logged metrics (``{fmt}`` is the canonical format name, e.g. ``float8_e4m3fn``):

    - ``{prefix}/{fmt}/grad_below_stiffness_frac``, ``grad_stiff_ratio_mean``, ``grad_stiff_correlation``,
      ``zero_weight_frac``, ``grad_nonfinite_frac`` (``"stiffness"``)
    - ``{prefix}/{fmt}/grid_error_mean``, ``grid_error_max``, ``grid_error_std``, ``on_grid_frac``,
      ``overflow_frac``, ``underflow_frac``, ``grid_nonfinite_frac``, ``unrepresentable_frac`` (``"grid"``)
    - ``{prefix}/{fmt}/flip_frac``, ``update_stall_frac``, ``updated_frac``, ``grid_steps_mean``,
      ``flip_nonfinite_frac``, and what stochastic rounding would buy: ``sr_update_stall_frac``,
      ``update_norm_retained``, ``sr_update_norm_retained`` (``"flips"``; see
      :func:`~altgrad_lightning.functional.flip_statistics`)
    - ``{prefix}/ulp_mean``, ``ulp_median``, ``ulp_max``, ``ulp_zero_frac``, ``ulp_nonfinite_frac`` and, with
      ``log_histogram``, ``{prefix}/ulp_hist/{bucket}`` (bucket ``0``, ``1``, ``2-3``, ``4-7``, ...) (``"ulp"``,
      in the weights' own storage dtype)
    - ``{prefix}/{fmt}/stall_alert`` with ``stall_threshold``
    - ``{prefix}/skipped_steps``: optimizer steps skipped by the AMP scaler since the previous log (and steps after
      which the optimizer left a parameter as a tensor the fast path cannot read, with a warning: no ULP or flip
      sample either)
    - with ``per_parameter``, each of the above (but the histogram) again with ``/{parameter_name}`` appended

    Example::

        trainer = Trainer(callbacks=[QuantizationMonitor(formats=["float8_e4m3fn", "bfloat16"])])
    """

    def __init__(
        self,
        formats: FormatLike | Sequence[FormatLike] = "float8_e4m3fn",
        diagnostics: Sequence[str] = DIAGNOSTICS,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        per_parameter: bool = False,
        every_n_steps: int = 1,
        scaling: str = "none",
        block_size: int = 32,
        prefix: str = "altgrad",
        log_histogram: bool = True,
        stall_threshold: float | None = None,
        fused: bool = True,
        sample_fraction: float | None = None,
        sample_seed: int = 0,
    ) -> None:
        # A lone format, or a lone non-format (e.g. 8) that get_format below rejects naming `formats`.
        fmt_list: list[Any] = (
            list(formats)
            if isinstance(formats, Sequence) and not isinstance(formats, (str, FloatFormat))
            else [formats]
        )
        if not fmt_list:
            raise ValueError("Expected argument `formats` to name at least one format, but got an empty sequence")
        self.formats: list[FloatFormat] = [get_format(f, arg="formats") for f in fmt_list]
        names = [f.name for f in self.formats]
        if len(set(names)) != len(names):
            raise ValueError(f"Expected argument `formats` to hold distinct formats, but got {names}")
        diag = [diagnostics] if isinstance(diagnostics, str) else list(diagnostics)
        unknown = [d for d in diag if d not in DIAGNOSTICS]
        if unknown or not diag:
            raise ValueError(
                f"Expected argument `diagnostics` to be a non-empty subset of {DIAGNOSTICS}, but got {diag}"
            )
        self.diagnostics = tuple(d for d in DIAGNOSTICS if d in diag)
        self.include = _compile(include, "include")
        self.exclude = _compile(exclude, "exclude")
        if not isinstance(per_parameter, bool):
            raise ValueError(f"Expected argument `per_parameter` to be a bool, but got {per_parameter!r}")
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"Expected argument `every_n_steps` to be a positive int, but got {every_n_steps!r}")
        if scaling not in _SCALINGS:
            raise ValueError(f"Expected argument `scaling` to be one of {_SCALINGS}, but got {scaling!r}")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"Expected argument `prefix` to be a non-empty key component, but got {prefix!r}")
        self.per_parameter = per_parameter
        self.every_n_steps = every_n_steps
        self.scaling = scaling
        self.block_size = _check_block_size(block_size)
        self.prefix = prefix
        if not isinstance(log_histogram, bool):
            raise TypeError(f"Expected argument `log_histogram` to be a bool, but got {log_histogram!r}")
        self.log_histogram = log_histogram
        self.stall_threshold = _check_fraction(stall_threshold, "stall_threshold")
        if self.stall_threshold is not None and "flips" not in self.diagnostics:
            raise ValueError(
                "Expected argument `stall_threshold` to come with the 'flips' diagnostic (it watches "
                f"update_stall_frac), but got diagnostics={list(self.diagnostics)}"
            )
        # Alerts: per selected parameter and format, the window's [n_updated, n_stall] (rows in selection order).
        self._param_names: list[str] = []
        self._param_row: dict[int, int] = {}  # id(parameter) -> row
        self._stall_counts: dict[str, torch.Tensor] = {}
        self._window_stalls: dict[str, torch.Tensor] = {}  # the last logged window's counts (reduced when sharded)
        self._stall_warned: set[tuple[str, str]] = set()  # (format, parameter) already named in a warning
        # scaling="mx" with per_parameter: format -> parameter -> (rows, blocks, 2) [n_updated, n_stall] of the fit
        self._block_stalls: dict[str, dict[str, torch.Tensor]] = {}
        if not isinstance(fused, bool):
            raise ValueError(f"Expected argument `fused` to be a bool, but got {fused!r}")
        self.fused = fused
        self.sample_fraction = _check_fraction(sample_fraction, "sample_fraction")
        if not isinstance(sample_seed, int) or isinstance(sample_seed, bool):
            raise TypeError(f"Expected argument `sample_seed` to be an int, but got {sample_seed!r}")
        self.sample_seed = sample_seed
        # With sample_fraction: id(parameter) -> the int32 indices of its sampled elements (of the rank's shard), and
        # the number of elements they were drawn from.
        self._samples: dict[int, torch.Tensor] = {}
        self._sample_sizes: dict[int, int] = {}
        self._fused_passes: dict[int, FusedPass] = {}  # id(optimizer) -> its fast path, where it applies
        self._fused_steps = 0  # optimizer steps that took the fast path (for tests and benchmarks)

        self._metrics: dict[str, SumsMetric] = {}
        self._selected: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}  # id(optimizer) -> parameters
        # id(optimizer) -> what its step post hook needs: [(name, parameter, snapshot, scales)], or its FusedPass
        self._pending: dict[int, Any] = {}
        self._stepping: set[int] = set()  # optimizers between on_before_optimizer_step and their post hook
        self._handles: list[RemovableHandle] = []
        self._hist_buckets = 0
        self._skipped_steps = 0
        self._sampled = 0  # optimizer steps sampled since the last log (0: the window has nothing to log)
        # Steps of fused optimizers skipped by the scaler: their post hook fires, the verdict stays on the device.
        self._skipped_on_device: torch.Tensor | None = None
        self._restored: dict[str, Any] | None = None
        # Sharded parameters (FSDP1 flat shards, FSDP2 / DTensor): each rank counts the elements it owns and the
        # sums are all-reduced at logging steps. Replicated ones (one process, DDP): no collective at all.
        self._sharded = False
        self._rank = 0
        # id(parameter) -> the rank's own elements of a parameter-shaped tensor (the parameter or its gradient),
        # or None where another rank counts this parameter (a replica). Only filled when sharded.
        self._local: dict[int, Callable[[torch.Tensor], torch.Tensor] | None] = {}
        # scaling="mx" when sharded: id(parameter) -> its shard's MxLayout.
        self._mx_layout: dict[int, _MxLayout] = {}
        self._mx_takes: dict[int, torch.Tensor] = {}  # id(parameter) -> see _mx_take
        self._row_tensors: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}  # see _rows_tensor

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, formats=[f.name for f in self.formats])

    # --- metric bookkeeping --------------------------------------------------------------------------------------
    def _key(self, family: str, fmt: FloatFormat | str | None, param: str | None = None) -> str:
        """Metric key: family, format name ("" for ULP) and parameter name ("" for the aggregate)."""
        fmt_name = fmt.name if isinstance(fmt, FloatFormat) else (fmt or "")
        return "|".join([family, fmt_name, param or ""])

    def _metric(self, family: str, fmt: FloatFormat | None, param: str) -> list[SumsMetric]:
        """The aggregate metric and, with ``per_parameter``, the parameter's own."""
        out = [self._metrics[self._key(family, fmt)]]
        if self.per_parameter:
            out.append(self._metrics[self._key(family, fmt, param)])
        return out

    def _build_metrics(self, names: Iterable[str], device: torch.device) -> None:
        self._metrics = {}
        for family in self.diagnostics:
            cls = _FAMILIES[family]
            fmts: list[FloatFormat | None] = [None] if family == "ulp" else list(self.formats)
            for fmt in fmts:
                for param in [None, *(names if self.per_parameter else [])]:
                    # No torchmetrics sync (one collective per state): DDP replicas compute the same numbers
                    # locally, and sharded runs reduce every state at once in _compute_and_reset.
                    metric = cls(fmt, sync_on_compute=False) if fmt is not None else cls(sync_on_compute=False)
                    self._metrics[self._key(family, fmt, param)] = metric.to(device)

    # --- Lightning hooks -----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # States are (re)built in on_fit_start: with ddp_spawn, CPU states made earlier can sit in shared memory.
        self._metrics = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._selected = _select_parameters(trainer, pl_module, self.include, self.exclude)
        selected_names = [name for chosen in self._selected.values() for name, _ in chosen]
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self._sharded = _is_sharded(trainer, pl_module)
        # scaling="mx" when sharded: where each rank's shard lies in the (rows, last dimension) view of its
        # parameter, which the blocks are formed in (ValueError for layouts that are not such a rectangle).
        self._mx_layout = {}
        if self._sharded and self.scaling == "mx":
            self._mx_layout = {id(p): _mx_shard_layout(name, p) for ps in self._selected.values() for name, p in ps}
        self._rank = trainer.global_rank
        self._local = _local_views(trainer, [p for ps in self._selected.values() for _, p in ps], self._sharded)
        self._samples, self._sample_sizes = ({}, {}) if self.sample_fraction is None else self._draw_samples(trainer)
        self._mx_takes = {}
        self._row_tensors = {}
        self._fused_passes = {}
        # The fast path reads whole plain tensors: never DTensors, nor (padded, partly replicated) sharded runs.
        if self.fused and not self.per_parameter and not self._sharded:
            warned = False
            for key, chosen in self._selected.items():
                params = [p for _, p in chosen]
                if any(_is_dtensor(p) for p in params):
                    continue
                if fused_supported(
                    params, self.formats, scaled=self.scaling != "none", sampled=self.sample_fraction is not None
                ):
                    self._fused_passes[key] = self._new_fused_pass(params)
                elif params and params[0].device.type == "cpu" and _fused_cpu.unavailable_reason() and not warned:
                    warned = True
                    rank_zero_warn(
                        "QuantizationMonitor: the CPU fast path is unavailable, so every step takes the reference "
                        f"path (several times slower): {_fused_cpu.unavailable_reason()}"
                    )
        if not selected_names:
            rank_zero_warn(
                f"QuantizationMonitor: no trainable parameter matches include={self.include} "
                f"exclude={self.exclude}; nothing will be logged."
            )
        bits = [p.element_size() * 8 for ps in self._selected.values() for _, p in ps]
        self._hist_buckets = 1 + max(bits, default=0)
        self._build_metrics(dict.fromkeys(selected_names), pl_module.device)
        chosen_all = [(n, p) for ps in self._selected.values() for n, p in ps]
        self._param_names = [n for n, _ in chosen_all]
        self._param_row = {id(p): i for i, (_, p) in enumerate(chosen_all)}
        self._stall_counts = {}
        self._block_stalls = {f.name: {} for f in self.formats} if self.scaling == "mx" and self.per_parameter else {}
        if self.stall_threshold is not None:
            self._stall_counts = {
                f.name: torch.zeros((len(chosen_all), 2), dtype=torch.float64, device=pl_module.device)
                for f in self.formats
            }
        if self._restored is not None:
            self._apply_restored(self._restored)
            self._restored = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        key = id(optimizer)
        self._stepping.add(key)
        self._pending.pop(key, None)
        if _stepping_batches(trainer) % self.every_n_steps != 0 or key not in self._selected:
            return
        self._sampled += 1
        grad_scale = self._unapplied_grad_scale(trainer, optimizer)
        if self._fused_before(key, grad_scale):
            return
        keep_before = "ulp" in self.diagnostics or "flips" in self.diagnostics
        pending: list[_Pending] = []
        with torch.no_grad():
            if self._sharded and self.scaling != "none":
                shard_scales = self._sharded_scales(key)
            elif self.scaling == "amax":  # every parameter's amax from one multi-tensor kernel, not one per tensor
                shard_scales = self._amax_scales([p for _, p in self._selected[key] if p.grad is not None])
            elif self.scaling == "mx" and not self._block_stalls:  # the scale arithmetic once for all blocks
                shard_scales = self._mx_scales([p for _, p in self._selected[key] if p.grad is not None])
            else:
                shard_scales = {}
            items = []
            for name, p in self._selected[key]:
                if p.grad is None or not self._owns(p):
                    continue
                if id(p) in shard_scales:
                    scales = shard_scales[id(p)]
                else:
                    w_all = self._view(p, p.detach())
                    scales = [self._scale(w_all, fmt) for fmt in self.formats]
                idx = self._sample_of(p)
                if idx is not None:  # the scales of the whole tensor, at the sampled elements
                    scales = [
                        s if s is None or isinstance(s, _BlockScales) or s.dim() == 0
                        else torch.index_select(s.reshape(-1), 0, idx)
                        for s in scales
                    ]  # fmt: skip
                w = self._sampled_values(p, p.detach())
                g = self._sampled_values(p, p.grad.detach())
                g = g if grad_scale is None else g / grad_scale
                items.append(_Pending((name,), (p,), w, scales, g, copied=idx is not None))
            for item in self._batched(items):
                w, grad = item.before, item.grad
                assert grad is not None
                for fmt, scale in zip(self.formats, item.scales, strict=False):
                    if "stiffness" in self.diagnostics:
                        for m in self._metric("stiffness", fmt, item.names[0]):
                            m.accumulate(m.sums_of(w, grad, scale))
                    if "grid" in self.diagnostics:
                        for m in self._metric("grid", fmt, item.names[0]):
                            m.accumulate(m.sums_of(w, w, scale))
                if keep_before:
                    item.grad = None
                    if not item.copied:
                        item.before = w.clone()
                    pending.append(item)
        self._pending[key] = pending

    def _amax_scales(self, params: Sequence[torch.Tensor]) -> dict[int, list[torch.Tensor | None]]:
        """The ``amax`` scales of unsharded parameters, per format: amaxes from ``torch._foreach_norm(ord=inf)``
        (NaN and inf propagate as in ``amax``; empty tensors, which it refuses, have amax 0), then the scale
        arithmetic once per dtype and format on the vector of amaxes."""
        views = [(p, self._view(p, p.detach())) for p in params]
        full = [(p, v) for p, v in views if v.numel()]
        norms = torch._foreach_norm([v for _, v in full], ord=float("inf")) if full else []
        groups: dict[tuple[torch.dtype, torch.device], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for (p, _), norm in zip(full, norms, strict=True):
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            groups.setdefault((dtype, p.device), []).append((p, norm))
        for p, v in views:
            if not v.numel():
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                groups.setdefault((dtype, p.device), []).append((p, torch.zeros((), dtype=dtype, device=p.device)))
        out: dict[int, list[torch.Tensor | None]] = {}
        for (dtype, _), entries in groups.items():
            amax = torch.stack([norm.to(dtype) for _, norm in entries])
            per_format = [_amax_scale(amax, fmt).unbind() for fmt in self.formats]
            for i, (p, _) in enumerate(entries):
                out[id(p)] = [scales[i] for scales in per_format]
        return out

    def _mx_scales(self, params: Sequence[torch.Tensor]) -> dict[int, list[Any]]:
        """The MX scales of unsharded parameters, per format, as :class:`_BlockScales`: each parameter's block amaxes
        (two small operations), then the scale arithmetic once per dtype and format on all blocks together; spread to
        the elements (or the sampled ones) per joined run in :meth:`_batched`."""
        bs = self.block_size
        groups: dict[tuple[torch.dtype, torch.device], list[tuple[torch.Tensor, torch.Tensor, torch.Size]]] = {}
        for p in params:
            w = self._view(p, p.detach())
            amax = _block_amax(w, bs).reshape(-1)
            groups.setdefault((amax.dtype, amax.device), []).append((p, amax, w.shape))
        out: dict[int, list[Any]] = {}
        for entries in groups.values():
            amaxes = torch.cat([a for _, a, _ in entries])
            sizes = [a.numel() for _, a, _ in entries]
            per_format = [_mx_block_scale(amaxes, fmt).split(sizes) for fmt in self.formats]
            for i, (p, _, shape) in enumerate(entries):
                take = self._mx_take(p, shape)
                out[id(p)] = [
                    _BlockScales(scales[i], take, shape, self._samples.get(id(p)) is not None) for scales in per_format
                ]
        return out

    def _mx_take(self, p: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Which block each element of ``p`` (or each sampled element) takes its scale from: the elements per block
        in row order (for ``repeat_interleave``), or the sampled elements' block numbers; cached per parameter."""
        cached = self._mx_takes.get(id(p))
        if cached is not None:
            return cached
        bs = self.block_size
        layout = _MxLayout.whole(shape)
        idx = self._samples.get(id(p))
        if idx is None:
            rows, n_blocks = layout.block_shape(bs)
            counts = torch.full((n_blocks,), bs, dtype=torch.int64, device=p.device)
            counts[-1] = layout.cols - (n_blocks - 1) * bs
            take = counts.repeat(rows)
        else:
            take = layout.block_of(idx, bs)
        self._mx_takes[id(p)] = take
        return take

    def _batched(self, items: list[_Pending]) -> list[_Pending]:
        """The parameters' tensors as they are (``per_parameter``, MX block counts: every parameter on its own), or
        concatenated into one flat tensor per dtype and device, so that the reference arithmetic runs once per step
        instead of once per parameter: on a GPU each of its several hundred elementwise operations is a kernel launch,
        which made a step of ~150 parameters take about a second. Scales are spread to one per element. On the CPU
        only groups of up to ``_CPU_BATCH`` elements (e.g. samples) are joined: there the cost is the arithmetic, and
        per-parameter temporaries stay in the caches, where one flat tensor's (and fresh pages for them) do not."""
        if self.per_parameter or self._block_stalls or len(items) < 2:
            return [_spread_block_scales(item) for item in items]
        groups: dict[tuple[Any, ...], list[_Pending]] = {}
        for item in items:
            assert item.grad is not None
            groups.setdefault((item.before.dtype, item.grad.dtype, item.before.device), []).append(item)
        out = []
        for same_kind in groups.values():
            cap = _CPU_BATCH if same_kind[0].before.device.type == "cpu" else _GPU_BATCH
            for group in _runs(same_kind, cap):
                if len(group) < 2:
                    out += [_spread_block_scales(item) for item in group]
                    continue
                scales: list[torch.Tensor | None] = []
                for f in range(len(self.formats)):
                    parts = [it.scales[f] for it in group]
                    if all(s is None for s in parts):
                        scales.append(None)
                        continue
                    if all(isinstance(s, _BlockScales) for s in parts):
                        scales.append(_BlockScales.spread_all(parts))
                        continue
                    spread = [
                        s.reshape(1).expand(it.before.numel()) if s.dim() == 0 else s.reshape(-1)
                        for s, it in zip(parts, group, strict=True)
                        if s is not None
                    ]
                    scales.append(torch.cat(spread))
                out.append(
                    _Pending(
                        tuple(n for it in group for n in it.names),
                        tuple(p for it in group for p in it.params),
                        torch.cat([it.before.reshape(-1) for it in group]),
                        scales,
                        torch.cat([it.grad.reshape(-1) for it in group if it.grad is not None]),
                        copied=True,
                        sizes=tuple(it.before.numel() for it in group),
                    )
                )
        return out

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        self._stepping.discard(key)
        pending = self._pending.pop(key, [])
        # A fused optimizer under a GradScaler is stepped even when the scaler found inf/NaN gradients: the kernel
        # then leaves the weights alone. GradScaler.step exposes its verdict as `optimizer.found_inf` during the
        # step; keep it on the device (no host synchronisation) and mask the step's sums with it.
        found_inf = getattr(optimizer, "found_inf", None)
        taken = None
        if isinstance(found_inf, torch.Tensor):
            taken = found_inf == 0
            skipped = (~taken).to(torch.float64)
            self._skipped_on_device = skipped if self._skipped_on_device is None else self._skipped_on_device + skipped
        if isinstance(pending, FusedPass):
            with torch.no_grad():
                if not pending.after(taken):  # into the pass's running sums, drained at logging steps
                    # The step left a parameter in storage the pass cannot read: no ULP or flip sample, counted.
                    self._skipped_steps += 1
                    rank_zero_warn(
                        "QuantizationMonitor: the optimizer's step left a parameter as a tensor the fast path cannot "
                        "read (another dtype, layout or size); that step has no ULP or flip sample (counted in "
                        "skipped_steps), and if the parameter still does not fit at the next step, its optimizer "
                        "takes the reference path for the rest of the fit."
                    )
            return
        with torch.no_grad():
            for item in pending:
                if item.sizes is None:
                    (p,) = item.params
                    w = self._sampled_values(p, p.detach())
                else:
                    w = torch.cat([self._sampled_values(p, p.detach()).reshape(-1) for p in item.params])
                name = item.names[0]  # only read with per_parameter, where every item is one parameter
                before = item.before
                if "ulp" in self.diagnostics:
                    for m in self._metric("ulp", None, name):
                        m.accumulate(_masked(m.sums_of(before, w), taken))
                if "flips" in self.diagnostics:
                    for fmt, scale in zip(self.formats, item.scales, strict=False):
                        metrics = self._metric("flips", fmt, name)
                        if self._block_stalls or (self._stall_counts and item.sizes is not None):
                            sums, updated, stalled = _flip_sums_and_masks(before, w, fmt, scale)
                            if self._block_stalls:  # the same pass also gives the per-block counts
                                self._count_block_stalls(fmt, name, item.params[0], updated, stalled, taken)
                        else:
                            sums = metrics[0].sums_of(before, w, scale)
                        sums = _masked(sums, taken)
                        for m in metrics:
                            m.accumulate(sums)
                        if self._stall_counts:
                            row_ids = [self._param_row[id(p)] for p in item.params]
                            if item.sizes is None:
                                counts = torch.stack([sums["n_updated"], sums["n_stall"]]).to(torch.float64)[None]
                            else:  # per parameter: segment sums of the masks
                                counts = torch.stack(
                                    [_segment_sums(updated, item.sizes), _segment_sums(stalled, item.sizes)], 1
                                )
                                if taken is not None:
                                    counts = torch.where(taken, counts, torch.zeros_like(counts))
                            target = self._stall_counts[fmt.name]
                            target.index_add_(0, self._rows_tensor(row_ids, target.device), counts.to(target))

    def _rows_tensor(self, rows: list[int], device: torch.device) -> torch.Tensor:
        """``rows`` as an index tensor on ``device``, uploaded once per distinct list (a synchronous copy otherwise
        at every step)."""
        key = (tuple(rows), device)
        cached = self._row_tensors.get(key)
        if cached is None:
            cached = self._row_tensors[key] = torch.tensor(rows, device=device)
        return cached

    def _count_block_stalls(
        self,
        fmt: FloatFormat,
        name: str,
        p: torch.Tensor,
        updated: torch.Tensor,
        stalled: torch.Tensor,
        taken: torch.Tensor | None,
    ) -> None:
        """Add one step's updated and stalled weights per MX block of parameter ``name`` (``_block_stalls``).
        Sharded, a rank adds its shard's blocks into a tensor of the whole parameter's blocks (reduced at fit end).
        With a sample, ``updated`` and ``stalled`` are the sampled elements': each is added to its own block."""
        layout = self._mx_layout.get(id(p))
        idx = self._samples.get(id(p))
        if idx is not None:
            self._count_sampled_block_stalls(fmt, name, p, idx, updated, stalled, taken)
            return
        lead = 0 if layout is None else layout.col_offset % self.block_size
        counts = torch.stack(
            [block_sums(updated, self.block_size, lead), block_sums(stalled, self.block_size, lead)], -1
        ).to(torch.float64)
        if taken is not None:
            counts = torch.where(taken, counts, torch.zeros_like(counts))
        store = self._block_stalls[fmt.name]
        if layout is not None:
            whole = store.get(name)
            if whole is None:
                whole = store[name] = counts.new_zeros(layout.block_shape(self.block_size) + (2,))
            r0, c0 = layout.row_offset, layout.col_offset // self.block_size
            whole[r0 : r0 + counts.shape[0], c0 : c0 + counts.shape[1]] += counts
            return
        store[name] = counts if name not in store else store[name] + counts

    def _count_sampled_block_stalls(
        self,
        fmt: FloatFormat,
        name: str,
        p: torch.Tensor,
        idx: torch.Tensor,
        updated: torch.Tensor,
        stalled: torch.Tensor,
        taken: torch.Tensor | None,
    ) -> None:
        layout = self._mx_layout.get(id(p)) or _MxLayout.whole(self._view(p, p.detach()).shape)
        rows, n_blocks = layout.block_shape(self.block_size)
        block = layout.block_of(idx, self.block_size)
        counts = torch.stack([updated, stalled], -1).to(torch.float64)
        if taken is not None:
            counts = torch.where(taken, counts, torch.zeros_like(counts))
        store = self._block_stalls[fmt.name]
        whole = store.get(name)
        if whole is None:
            whole = store[name] = counts.new_zeros((rows, n_blocks, 2))
        whole.view(-1, 2).index_add_(0, block, counts)

    def _whole_block_stalls(self) -> dict[str, dict[str, torch.Tensor]]:
        """The fit's block counts on the host; sharded, summed over the ranks (one all-reduce every rank joins), with
        every selected parameter (zeros where no rank counted a step)."""
        if not self._mx_layout:
            return {f: {n: t.detach().cpu().clone() for n, t in by_p.items()} for f, by_p in self._block_stalls.items()}
        import torch.distributed as dist

        device = self._device()
        parts: list[tuple[str, str, torch.Tensor]] = []  # the same entries, in the same order, on every rank
        for fmt_name, by_param in self._block_stalls.items():
            for name, p in ((n, p) for ps in self._selected.values() for n, p in ps):
                counts = by_param.get(name)
                if counts is None:
                    shape = (*self._mx_layout[id(p)].block_shape(self.block_size), 2)
                    counts = torch.zeros(shape, dtype=torch.float64, device=device)
                parts.append((fmt_name, name, counts.to(device)))
        if not parts:
            return {f: {} for f in self._block_stalls}
        packed = torch.cat([t.reshape(-1) for _, _, t in parts])
        if _distributed_ready():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed = packed.cpu()
        out: dict[str, dict[str, torch.Tensor]] = {f: {} for f in self._block_stalls}
        offset = 0
        for fmt_name, name, counts in parts:
            out[fmt_name][name] = packed[offset : offset + counts.numel()].reshape(counts.shape)
            offset += counts.numel()
        return out

    def _save_block_stalls(self, trainer: pl.Trainer) -> None:
        if not self._block_stalls:
            return
        # Both are collectives every rank joins (trainer.log_dir broadcasts rank 0's), before rank 0 alone goes on.
        stalls = self._whole_block_stalls()
        directory = trainer.log_dir or trainer.default_root_dir
        if trainer.global_rank != 0:
            return
        os.makedirs(directory, exist_ok=True)
        torch.save({"block_size": self.block_size, "stalls": stalls}, os.path.join(directory, MX_BLOCK_FILE))

    def _new_fused_pass(self, params: Sequence[torch.Tensor]) -> FusedPass:
        samples = [self._samples[id(p)] for p in params] if self._samples else None
        fused = FusedPass(
            params,
            self.formats,
            self.diagnostics,
            per_parameter_stalls=self.stall_threshold is not None,
            samples=samples,
        )
        if samples is not None:  # keep one copy of the indices: the pass's own buffer
            self._samples.update({id(p): fused.sample_of(i) for i, p in enumerate(params)})
        return fused

    def _draw_samples(self, trainer: pl.Trainer) -> tuple[dict[int, torch.Tensor], dict[int, int]]:
        """Every selected parameter's sampled elements (of this rank's shard), and the number of elements each was
        drawn from: each element independently with probability ``sample_fraction``, from a generator seeded with
        ``sample_seed`` (plus the global rank when sharded, so that shards draw independently); the same subset for
        the whole fit and again after a resume."""
        generators: dict[torch.device, torch.Generator] = {}
        samples: dict[int, torch.Tensor] = {}
        sizes: dict[int, int] = {}
        for p in (p for ps in self._selected.values() for _, p in ps):
            if id(p) in samples or not self._owns(p):
                continue
            n = sizes[id(p)] = self._view(p, p.detach()).numel()
            g = generators.get(p.device)
            if g is None:
                g = generators[p.device] = torch.Generator(device=p.device)
                # Replicas (one process, DDP) draw the same subset, so every rank computes the same numbers.
                g.manual_seed(self.sample_seed + (trainer.global_rank if self._sharded else 0))
            samples[id(p)] = self._draw(n, g, p.device)
        n_sampled = sum(idx.numel() for idx in samples.values())
        rank_zero_info(
            f"QuantizationMonitor: measuring a fixed sample of {n_sampled:,} of {sum(sizes.values()):,} weight "
            f"elements (sample_fraction={self.sample_fraction}; rank 0's shard when sharded)."
        )
        return samples, sizes

    def _draw(self, n: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
        """The indices of a sample of ``n`` elements, each taken with probability ``sample_fraction``."""
        assert self.sample_fraction is not None
        chosen = torch.rand(n, generator=g, device=device) < self.sample_fraction
        return chosen.nonzero().flatten().to(torch.int32 if n < 2**31 else torch.int64)

    def _sample_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """Parameter ``p``'s sampled elements (``None`` without a sample), drawn again where its size changed since
        they were drawn (``p.data`` replaced mid-fit by a tensor of another size, whose end the old indices would
        read past), from a generator seeded with ``sample_seed`` and the new size (the same on every replica)."""
        idx = self._samples.get(id(p))
        if idx is None:
            return None
        n = self._view(p, p.detach()).numel()
        if n != self._sample_sizes[id(p)]:
            g = torch.Generator(device=p.device)
            g.manual_seed(self.sample_seed + n + (self._rank if self._sharded else 0))
            idx = self._samples[id(p)] = self._draw(n, g, p.device)
            self._sample_sizes[id(p)] = n
            self._mx_takes.pop(id(p), None)
            rank_zero_warn(
                f"QuantizationMonitor: a sampled parameter changed size mid-fit (now {n:,} elements); its sample "
                "was drawn again."
            )
        return idx

    def _sampled_values(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The rank's elements of ``t`` (``p`` itself or its gradient), only the sampled ones with a sample."""
        idx = self._sample_of(p)
        t = self._view(p, t)
        return t if idx is None else torch.index_select(t.reshape(-1), 0, idx)  # cheaper than t[idx]

    def _fused_before(self, key: int, grad_scale: torch.Tensor | None) -> bool:
        """Run the fast path's ``before`` half for this optimizer, if it applies to this step's gradients."""
        fused = self._fused_passes.get(key)
        if fused is None:
            return False
        # A parameter's storage moved since the last step (``p.data = ...``, ``model.to(...)``, an optimizer that
        # rebinds its parameters on steps that took no fast path): the pass follows it where every parameter still
        # fits its layout, else it is laid out again, or, where the parameters no longer fit the fast path at all,
        # this optimizer takes the reference path for the rest of the fit.
        if not fused.follow_storage():
            self._drain_fused(fused)
            for p in fused.params:
                self._sample_of(p)  # a sample drawn again where a parameter changed size
            if not fused_supported(fused.params, self.formats, scaled=False, sampled=self.sample_fraction is not None):
                del self._fused_passes[key]
                return False
            fused = self._fused_passes[key] = self._new_fused_pass(fused.params)
        step = fused.step_grads()
        if step is None:  # e.g. a parameter without gradient at this step
            return False
        grads, g_ptrs = step
        with torch.no_grad():
            fused.before(grads, grad_scale, g_ptrs)
        self._pending[key] = fused  # its after half reads the snapshot it holds
        self._fused_steps += 1
        return True

    def _drain_fused(self, *passes: FusedPass) -> None:
        """Move the running sums of fused passes (all by default) into the Metrics and the stall counts: at logging
        steps and checkpoints, so that a step costs the kernels and a few small operations only."""
        with torch.no_grad():
            for fused in passes or tuple(self._fused_passes.values()):
                sums, stalls = fused.drain()
                for family, by_format in sums.items():
                    for fmt_name, family_sums in by_format.items():
                        self._metrics[self._key(family, fmt_name)].accumulate(family_sums)  # the aggregate metric
                if self._stall_counts and stalls:
                    # The optimizer's selection is a contiguous run of rows (no index upload, no host sync).
                    first = self._param_row[id(fused.params[0])]
                    for fmt_name, counts in stalls.items():
                        self._stall_counts[fmt_name][first : first + len(fused.params)] += counts

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # An optimizer whose post hook did not fire since on_before_optimizer_step was skipped (AMP inf/NaN).
        self._skipped_steps += len(self._stepping)
        self._stepping.clear()
        self._pending.clear()
        if _flushes_logs(trainer, pl_module) and self._sampled:
            self._sampled = 0
            values = _to_host(self._compute_and_reset())
            if self.stall_threshold is not None:
                values.update(self._alerts(values))
            _log_values(trainer, values)

    def _alerts(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ``stall_alert`` flags of the window just computed, and the once-per-parameter warning (rank 0)."""
        assert self.stall_threshold is not None
        threshold = self.stall_threshold
        host = self._window_stalls  # on the host already (see _compute_and_reset)
        out = {}
        for fmt in self.formats:
            overall = float(values[f"{self.prefix}/{fmt.name}/update_stall_frac"])
            counts = host.get(fmt.name)
            above: list[tuple[str, float]] = []
            if counts is not None:
                for name, (updated, stalled) in zip(self._param_names, counts.tolist(), strict=True):
                    if updated > 0 and stalled / updated > threshold:
                        above.append((name, stalled / updated))
            out[f"{self.prefix}/{fmt.name}/stall_alert"] = torch.tensor(
                float(overall > threshold or bool(above)), dtype=torch.float64
            )
            new = [(n, f) for n, f in above if (fmt.name, n) not in self._stall_warned]
            if new:
                self._stall_warned.update((fmt.name, n) for n, _ in new)
                shown = ", ".join(f"{n} ({f:.3f})" for n, f in new[:10])
                more = f" and {len(new) - 10} more" if len(new) > 10 else ""
                rank_zero_warn(
                    f"QuantizationMonitor: {fmt.name} would swallow more than stall_threshold={threshold} of the "
                    f"updates of {shown}{more} (update_stall_frac of the window; the whole selection: {overall:.3f})."
                )
        return out

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._save_block_stalls(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # --- checkpointing -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The window not logged yet (its sums), counters and alerts already given, for checkpoints.

        Sharded (FSDP, ``ModelParallelStrategy``): every rank holds the sums of its own elements, and only rank 0's
        copy of callback states reaches the checkpoint; the pending sums are therefore reduced over the ranks here
        (one packed SUM and one packed MAX all-reduce), and rank 0 alone takes them back on resume. This makes
        ``state_dict`` a collective in a sharded run, as the model's own state dict is: Lightning calls it on every
        rank when it saves a checkpoint (``trainer.save_checkpoint`` must be called on every rank).
        """
        window = self._window_sums()
        sums, stalls = window[: len(self._metrics)], window[len(self._metrics) :]
        return {
            "skipped_steps": self._skipped_steps + self._skipped_device_count(),
            "sampled_steps": self._sampled,
            # Copies: the states are updated in place (on CPU, .cpu() alone would hand out the live tensors).
            "metrics": {
                key: {k: v.detach().cpu().clone() for k, v in s.items()}
                for key, s in zip(self._metrics, sums, strict=True)
            },
            "stall_counts": {
                name: s["counts"].detach().cpu().clone() for name, s in zip(self._stall_counts, stalls, strict=True)
            },
            "stall_warned": sorted(self._stall_warned),
            "block_stalls": self._whole_block_stalls(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start builds the metrics: keep the state until then.
        self._restored = state_dict
        if self._metrics:
            self._apply_restored(state_dict)
            self._restored = None

    def _apply_restored(self, state: dict[str, Any]) -> None:
        self._skipped_steps = int(state.get("skipped_steps", 0))
        self._sampled = int(state.get("sampled_steps", 0))
        self._skipped_on_device = None
        self._stall_warned = {(f, n) for f, n in state.get("stall_warned", [])}
        # Sharded: the checkpoint holds the sums reduced over all ranks (see state_dict). Restoring them on every
        # rank would count them once per rank: rank 0 alone takes them.
        if self._sharded and self._rank != 0:
            return
        for fmt_name, by_param in state.get("block_stalls", {}).items():
            if fmt_name in self._block_stalls:
                self._block_stalls[fmt_name] = {n: t.to(self._device()) for n, t in by_param.items()}
        for key, sums in state.get("metrics", {}).items():
            metric = self._metrics.get(key)
            if metric is not None:
                metric.reset()
                metric.accumulate({k: v.to(metric.device) for k, v in sums.items()})
        for name, counts in state.get("stall_counts", {}).items():
            if name in self._stall_counts and counts.shape == self._stall_counts[name].shape:
                self._stall_counts[name] = counts.to(self._stall_counts[name].device)

    # --- helpers -------------------------------------------------------------------------------------------------
    def _owns(self, p: torch.Tensor) -> bool:
        """Whether this rank counts (its local elements of) ``p``: always when not sharded."""
        return not self._sharded or self._local.get(id(p)) is not None

    def _view(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """This rank's own elements of ``t`` (``p`` itself or its gradient): ``t`` unless sharded."""
        view = self._local.get(id(p)) if self._sharded else None
        return t if view is None else view(t)

    def _scale(self, w: torch.Tensor, fmt: FloatFormat) -> torch.Tensor | None:
        return _scale_for(w, fmt, self.scaling, self.block_size)

    def _sharded_scales(self, key: int) -> dict[int, list[torch.Tensor | None]]:
        """The ``amax`` scales of a sharded run: the amax of each whole parameter, from one packed all-reduce
        (``MAX``) of the shards' amaxes per sampled optimizer step. Every rank joins it with one entry per selected
        parameter (0 where it owns no element), in the same order."""
        import torch.distributed as dist

        chosen = self._selected[key]
        if not chosen:
            return {}
        if self.scaling == "mx":
            return self._sharded_mx_scales(chosen)
        local = []
        for _, p in chosen:
            owned = self._owns(p)
            w = self._view(p, p.detach()) if owned else torch.zeros(0, dtype=p.dtype, device=p.device)
            # NaN would not survive a MAX reduction everywhere: +inf gives the same (unscaled) grid.
            local.append(torch.nan_to_num(_amax(w).to(torch.float64), nan=float("inf")))
        amax = torch.stack(local).to(self._device())
        dist.all_reduce(amax, op=dist.ReduceOp.MAX)
        out: dict[int, list[torch.Tensor | None]] = {}
        for (_, p), a in zip(chosen, amax.unbind(), strict=True):
            a = a.to(device=p.device, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
            out[id(p)] = [_amax_scale(a, fmt) for fmt in self.formats]
        return out

    def _sharded_mx_scales(
        self, chosen: Sequence[tuple[str, torch.nn.Parameter]]
    ) -> dict[int, list[torch.Tensor | None]]:
        """The MX scales of the shards that split blocks (1-D parameters sharded along their only dimension): each
        rank fills the amaxes of its blocks into a vector of the whole parameter's blocks, and one packed ``MAX``
        all-reduce per sampled optimizer step, joined by every rank, completes the blocks shared by two shards. Shards
        of whole rows (FSDP2 shards along dim 0) hold whole blocks: their scales are local (not returned here)."""
        import torch.distributed as dist

        bs = self.block_size
        split = [(p, self._mx_layout[id(p)]) for _, p in chosen if self._mx_layout[id(p)].splits_blocks]
        if not split:
            return {}
        vectors = []
        for p, layout in split:
            n_blocks = layout.block_shape(bs)[1]
            vector = torch.zeros(n_blocks, dtype=torch.float64, device=self._device())
            w = self._view(p, p.detach()) if self._owns(p) else None
            if w is not None and w.numel():
                amax = _block_amax(w, bs, layout.col_offset % bs)[0].to(vector)
                first = layout.col_offset // bs
                vector[first : first + amax.numel()] = torch.nan_to_num(amax, nan=float("inf"))  # NaN: no MAX
            vectors.append(vector)
        packed = torch.cat(vectors)
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        out: dict[int, list[torch.Tensor | None]] = {}
        offset = 0
        for (p, layout), vector in zip(split, vectors, strict=True):
            n_blocks = vector.numel()
            whole = packed[offset : offset + n_blocks]
            offset += n_blocks
            if not self._owns(p):
                continue
            w = self._view(p, p.detach())
            lead, first = layout.col_offset % bs, layout.col_offset // bs
            mine = whole[first : first + -(-(lead + w.numel()) // bs)].unsqueeze(0).to(p.device)
            mine = mine.to(torch.float64 if p.dtype == torch.float64 else torch.float32)
            out[id(p)] = [_per_element(_mx_block_scale(mine, fmt), bs, w.shape, lead) for fmt in self.formats]
        return out

    def _device(self) -> torch.device:
        return next(iter(self._metrics.values())).device if self._metrics else torch.device("cpu")

    @staticmethod
    def _unapplied_grad_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """The AMP loss scale still in the gradients: fused optimizers unscale inside ``step()``, after our hook."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not _optimizer_handles_unscaling(optimizer) or not scaler.is_enabled():
            return None
        return scaler._scale  # a device tensor: dividing by it needs no host synchronisation

    def _window_sums(self) -> list[dict[str, torch.Tensor]]:
        """The window's sums of every metric, then its per-parameter stall counts (``{"counts": ...}`` per format),
        made global: sharded, every rank holds the sums of its own elements, and one packed SUM and one packed MAX
        all-reduce (see ``all_reduce_sums``) reduce them; replicated (DDP), every rank has the global numbers."""
        self._drain_fused()
        local = [metric.sums() for metric in self._metrics.values()]
        stalls = [{"counts": c} for c in self._stall_counts.values()]
        if self._sharded and local and _distributed_ready():
            return all_reduce_sums(local + stalls)
        return local + stalls

    def _compute_and_reset(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        n_metrics = len(self._metrics)
        totals = self._window_sums()
        # The statistics are a few dozen tiny operations per metric: on the host, after one transfer.
        skipped_dev = {} if self._skipped_on_device is None else {"skipped": self._skipped_on_device}
        totals = sums_to_host([*totals, skipped_dev])
        skipped_dev = totals.pop()
        totals, stall_totals = totals[:n_metrics], totals[n_metrics:]
        self._window_stalls = {name: t["counts"] for name, t in zip(self._stall_counts, stall_totals, strict=True)}
        self._stall_counts = {name: torch.zeros_like(c) for name, c in self._stall_counts.items()}
        for (key, metric), sums in zip(self._metrics.items(), totals, strict=True):
            family, fmt_name, param = key.split("|")
            # An empty window (e.g. the only step was skipped by AMP) logs the zero fractions of empty sums.
            values = type(metric).compute_fn(sums)
            for stat, value in values.items():
                if stat == "ulp_histogram":
                    if self.log_histogram and not param:
                        out.update(self._histogram_keys(value))
                    continue
                parts = [self.prefix, fmt_name, stat, param]
                out["/".join(p for p in parts if p)] = value
        reset_all(list(self._metrics.values()))
        skipped = torch.tensor(float(self._skipped_steps), dtype=torch.float64)
        if skipped_dev:
            skipped = skipped + skipped_dev["skipped"].to(torch.float64)
        out[f"{self.prefix}/skipped_steps"] = skipped
        self._skipped_steps = 0
        self._skipped_on_device = None
        return out

    def _skipped_device_count(self) -> int:
        return 0 if self._skipped_on_device is None else int(self._skipped_on_device.item())  # checkpoints only

    def _histogram_keys(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        total = counts.sum().clamp_min(1).to(torch.float64)
        edges = ulp_histogram_edges()
        out = {}
        for b in range(min(self._hist_buckets, len(edges))):
            lo = edges[b]
            label = str(lo) if lo < 2 else f"{lo}-{2 * lo - 1}"
            out[f"{self.prefix}/ulp_hist/{label}"] = counts[b].to(torch.float64) / total
        return out

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending.clear()
        self._stepping.clear()
        if self._metrics:
            self._drain_fused()  # the window not logged yet stays in the Metrics (and in a later checkpoint)
        self._fused_passes = {}  # frees the snapshots (one copy of the selected parameters) after fit


@dataclass
class _Pending:
    """What a step's post hook needs of one parameter (``sizes`` None), or of several concatenated into one flat
    tensor (``sizes``: their element counts, in order): their weights before the step (a copy), the scales per
    format and, until the pre-step pass is done, the gradient."""

    names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]
    before: torch.Tensor
    scales: list[torch.Tensor | None]
    grad: torch.Tensor | None = None
    copied: bool = False  # ``before`` is a copy already (a gathered sample, a concatenation)
    sizes: tuple[int, ...] | None = None


@dataclass
class _BlockScales:
    """The MX scales of one parameter's blocks (flat, row order) and how its elements take them: ``take`` holds the
    elements per block (spread with ``repeat_interleave``) or, ``sampled``, each sampled element's block number."""

    blocks: torch.Tensor
    take: torch.Tensor
    shape: torch.Size
    sampled: bool

    def per_element(self) -> torch.Tensor:
        """One scale per element, shaped like the parameter (flat for a sample)."""
        if self.sampled:
            return torch.index_select(self.blocks, 0, self.take)
        return torch.repeat_interleave(self.blocks, self.take).reshape(self.shape)

    @staticmethod
    def spread_all(parts: Sequence[Any]) -> torch.Tensor:
        """The flat per-element scales of several parameters joined in order: one operation for whole tensors."""
        if all(not s.sampled for s in parts):
            return torch.repeat_interleave(torch.cat([s.blocks for s in parts]), torch.cat([s.take for s in parts]))
        return torch.cat([s.per_element().reshape(-1) for s in parts])


def _spread_block_scales(item: _Pending) -> _Pending:
    """``item`` with any :class:`_BlockScales` turned into per-element scales (for a parameter measured alone)."""
    item.scales = [s.per_element() if isinstance(s, _BlockScales) else s for s in item.scales]
    return item


def _runs(items: list[_Pending], cap: int) -> list[list[_Pending]]:
    """``items`` in order, cut into consecutive runs of at most ``cap`` elements (a larger item is a run alone)."""
    runs: list[list[_Pending]] = []
    size = cap + 1
    for item in items:
        n = item.before.numel()
        if size + n > cap:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += n
    return runs


def _segment_sums(mask: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Per consecutive segment of ``sizes`` elements, the number of true elements of flat boolean ``mask`` (float64;
    empty segments count 0), from one cumulative sum."""
    total = torch.cat([mask.new_zeros(1, dtype=torch.int64), mask.to(torch.int64).cumsum(0)])
    ends = torch.tensor([0, *sizes], device=mask.device).cumsum(0)
    return (total[ends[1:]] - total[ends[:-1]]).to(torch.float64)


@dataclass(frozen=True)
class _MxLayout:
    """Where a rank's shard of a parameter lies in the ``(rows, last dimension)`` view MX blocks are formed in:
    rows ``[row_offset, row_offset + local rows)`` of ``rows``, columns from ``col_offset`` of ``cols``."""

    row_offset: int
    rows: int
    col_offset: int
    cols: int
    splits_blocks: bool  # the shard cuts rows, so blocks may be shared with another rank's shard

    def block_shape(self, block_size: int) -> tuple[int, int]:
        return self.rows, -(-self.cols // block_size)

    def block_of(self, idx: torch.Tensor, block_size: int) -> torch.Tensor:
        """The flat (row-major) block number of each of the shard's flat element indices ``idx`` (int64)."""
        i = idx.to(torch.int64)
        n_blocks = self.block_shape(block_size)[1]
        return (self.row_offset + i // self.cols) * n_blocks + (self.col_offset + i % self.cols) // block_size

    @staticmethod
    def whole(shape: torch.Size) -> _MxLayout:
        """A whole (unsharded) tensor of ``shape`` as rows of its last dimension (at least one column, so that an
        empty tensor has no rows)."""
        cols = max(shape[-1] if len(shape) else 1, 1)
        return _MxLayout(0, math.prod(shape) // cols, 0, cols, False)


def _mx_shard_layout(name: str, p: torch.Tensor) -> _MxLayout:
    """The :class:`_MxLayout` of this rank's shard of ``p`` (a replica: the whole tensor). Shards of FSDP2 (DTensor
    sharded along dim 0, possibly replicated too) are supported; a ValueError names the parameter otherwise."""
    shape = tuple(p.shape)
    cols = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if shape else 1
    if _is_fsdp1_flattened(p):
        raise ValueError(
            f"QuantizationMonitor(scaling='mx') needs each parameter's shape, which FSDP1's flattened shards hide "
            f"(parameter {name!r}): use FSDP2 (ModelParallelStrategy, fully_shard), or scaling='amax' or 'none'."
        )
    if not _is_dtensor(p):
        return _MxLayout(0, rows, 0, cols, False)
    placements = p.placements  # type: ignore[attr-defined]
    if not all(pl_.is_replicate() or pl_.is_shard(dim=0) for pl_ in placements):
        raise ValueError(
            f"QuantizationMonitor(scaling='mx') supports parameters sharded along dim 0 (FSDP2), but {name!r} has "
            f"placements {tuple(placements)}: use scaling='amax' or 'none', or exclude it."
        )
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - torch < 2.5
        from torch.distributed._tensor._utils import (  # type: ignore[no-redef]
            compute_local_shape_and_global_offset,
        )
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)  # type: ignore[attr-defined]
    sharded = any(pl_.is_shard() for pl_ in placements)
    if len(shape) == 1:
        return _MxLayout(0, 1, int(offset[0]), cols, sharded)
    return _MxLayout(int(offset[0]) * math.prod(shape[1:-1]), rows, 0, cols, False)


def _distributed_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch.distributed not built
        return False
    return isinstance(t, DTensor)


def _is_fsdp1_flattened(t: Any) -> bool:
    """A FSDP1 ``FlatParameter`` or an original parameter that FSDP1 turned into a view of one (use_orig_params)."""
    return bool(getattr(t, "_fsdp_flattened", False))


def _is_sharded(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether parameters are sharded across ranks, from the strategy or the parameters (DTensor, FSDP1 flat
    parameters). Decided from every parameter of the module, not the selection, so that all ranks agree."""
    if trainer.world_size <= 1:
        return False
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
        return True
    return any(_is_dtensor(p) or _is_fsdp1_flattened(p) for p in pl_module.parameters())


def _local_views(
    trainer: pl.Trainer, params: Sequence[torch.Tensor], sharded: bool
) -> dict[int, Callable[[torch.Tensor], torch.Tensor] | None]:
    """For a sharded run, which elements of each parameter (and of its gradient) this rank counts, so that every
    element of the model is counted by exactly one rank:

    - DTensor (FSDP2 / ``fully_shard``, tensor parallel): its ``to_local()`` shard, on the ranks whose coordinate is
      0 along every mesh dimension where the parameter is replicated (e.g. HSDP's replica dimension);
    - FSDP1 ``FlatParameter`` (``use_orig_params=False``): the local flat shard without its end padding;
    - FSDP1 original parameters (``use_orig_params=True``): the local 1-D view FSDP gives them (possibly empty);
    - anything else, and FSDP1 ``NO_SHARD`` parameters, are replicas: counted on global rank 0 alone. With FSDP1
      hybrid sharding the replicas of one shard group are counted on the first node only.
    """
    if not sharded:
        return {}
    from lightning.pytorch.strategies import FSDPStrategy

    rank = trainer.global_rank
    fsdp1 = isinstance(trainer.strategy, FSDPStrategy)
    strategy = getattr(trainer.strategy, "sharding_strategy", None) if fsdp1 else None
    strategy_name = getattr(strategy, "name", "FULL_SHARD")
    replica0 = rank < max(trainer.world_size // max(trainer.num_nodes, 1), 1)
    views: dict[int, Callable[[torch.Tensor], torch.Tensor] | None] = {}
    for p in params:
        view: Callable[[torch.Tensor], torch.Tensor] | None
        if _is_dtensor(p):
            coordinate = p.device_mesh.get_coordinate()  # type: ignore[attr-defined]
            replicated = [i for i, pl_ in enumerate(p.placements) if pl_.is_replicate()]  # type: ignore[attr-defined]
            owner = coordinate is not None and all(coordinate[i] == 0 for i in replicated)
            view = _to_local if owner else None
        elif _is_fsdp1_flattened(p) and strategy_name != "NO_SHARD":
            owner = replica0 if "HYBRID" in strategy_name else True
            padded = int(getattr(p, "_shard_numel_padded", 0) or 0)
            view = (_unpadded(p.numel() - padded) if padded else _identity) if owner else None
        else:
            view = _identity if rank == 0 else None
        views[id(p)] = view
    return views


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _to_local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def _unpadded(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.reshape(-1)[:n]


def _select_parameters(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    include: Sequence[re.Pattern[str]],
    exclude: Sequence[re.Pattern[str]],
) -> dict[int, list[tuple[str, torch.nn.Parameter]]]:
    """Per optimizer (``id``), its trainable parameters whose name matches one ``include`` pattern (any, when there
    are none) and no ``exclude`` pattern, as ``(name, parameter)`` in the optimizer's order. A parameter the module
    does not name is called ``optimizer_{i}.param_{j}``."""
    names = {id(p): n for n, p in pl_module.named_parameters()}
    selected = {}
    for i, optimizer in enumerate(trainer.optimizers):
        chosen = []
        for j, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
            name = names.get(id(p), f"optimizer_{i}.param_{j}")
            wanted = not include or any(r.search(name) for r in include)
            if p.requires_grad and wanted and not any(r.search(name) for r in exclude):
                chosen.append((name, p))
        selected[id(optimizer)] = chosen
    return selected


def _flushes_logs(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether Lightning flushes its logs after this batch: the tests it uses itself. Batches that only accumulate
    gradients pass ``should_update_logs`` too, but Lightning drops what they log: computing (and resetting) there
    would lose the window's earlier steps."""
    accumulating = pl_module.automatic_optimization and trainer.fit_loop._should_accumulate()
    return bool(trainer._logger_connector.should_update_logs) and not accumulating


def _stepping_batches(trainer: pl.Trainer) -> int:
    """Batches that stepped before the current one: Lightning's counter for the logging cadence (restored on resume)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _log_values(trainer: pl.Trainer, values: dict[str, torch.Tensor]) -> None:
    """Hand host values to every logger, and to ``trainer.callback_metrics`` for monitoring callbacks.

    Straight to the loggers, at the step Lightning itself logs this batch under, as Lightning's own
    ``LearningRateMonitor`` does: ``LightningModule.log`` costs about 0.3 ms of Python per key and step (some 25 ms
    for the ~80 keys of two formats), more than the whole diagnostic pass on a GPU. ``EarlyStopping`` and
    ``ModelCheckpoint`` read ``trainer.callback_metrics``, which gets the same values as 0-d tensors.
    """
    if not values:
        return
    step = _stepping_batches(trainer)  # Lightning's logging step for this batch (incremented after the batch)
    scalars = dict(zip(values, torch.stack(list(values.values())).tolist(), strict=True))
    for logger in trainer.loggers:  # rank-zero-only methods: other ranks log nothing
        logger.log_metrics(scalars, step=step)
    trainer.callback_metrics.update(values)


def _to_host(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logged values as CPU tensors, in one device-to-host transfer.

    Loggers need host numbers; converting device tensors one by one would synchronise once per key (about 80
    ``.item()`` calls per logging step). Stacking them first makes it one transfer; float64 keeps every value.
    """
    if not values:
        return values
    device = next(iter(values.values())).device
    host = torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) for v in values.values()]).cpu()
    return dict(zip(values, host.unbind(), strict=True))


def _masked(sums: dict[str, torch.Tensor], taken: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The sums of a step, or zeros (the empty sums: neutral for sums and for the non-negative maxima) where the
    step was not taken."""
    if taken is None:
        return sums
    return {k: torch.where(taken.to(v.device), v, torch.zeros_like(v)) for k, v in sums.items()}


def _check_fraction(value: object, arg: str) -> float | None:
    """``value`` as a float in (0, 1], or None; one clear error naming ``arg`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected argument `{arg}` to be None or a float, but got {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"Expected argument `{arg}` to lie in (0, 1], but got {value!r}")
    return float(value)


def _compile(patterns: str | Sequence[str] | None, arg: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    items = [patterns] if isinstance(patterns, str) else list(patterns)
    compiled = []
    for p in items:
        if not isinstance(p, str):
            raise ValueError(f"Expected argument `{arg}` to hold regular expressions (str), but got {p!r}")
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"Expected argument `{arg}` to hold valid regular expressions, but {p!r}: {err}") from None
    return compiled
