"""Simulated low-precision weight storage: round the weights onto a format's grid after every optimizer step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.hooks import RemovableHandle

from altgrad_lightning.callbacks.quantization_monitor import (
    _SCALINGS,
    _compile,
    _distributed_ready,
    _flushes_logs,
    _is_sharded,
    _local_views,
    _log_values,
    _select_parameters,
    _to_host,
    _to_local,
)
from altgrad_lightning.formats import FloatFormat, FormatLike, get_format
from altgrad_lightning.functional._reduce import count, ratio
from altgrad_lightning.quantize import Rounding, quantize
from altgrad_lightning.scaling import _check_block_size, _scale_for

__all__ = ["WeightQuantizer"]

_N_TOTAL, _N_UPDATED, _N_STALL, _N_MOVED = range(4)


class WeightQuantizer(Callback):
    r"""Simulates storing the selected weights in a low-precision format: after every optimizer step the weights
    are rounded onto the format's grid, in place, so the next forward pass (and the next step) sees the stored
    values. The optimizer's own state (Adam's moments, ...) is left in its own precision.

    When it acts:

    - ``on_train_start``: the selected parameters are chosen (those of ``trainer.optimizers`` with
      ``requires_grad`` whose name matches ``include`` and not ``exclude``) and rounded once, so training starts
      from stored values; a checkpoint restored by then is rounded too (weights stored by a previous run stay as
      they are: exactly for ``scaling="none"`` and ``"mx"``, whose scales they reproduce). The sanity-check
      validation that Lightning runs before training still sees the weights as loaded.
    - after every ``optimizer.step()`` (an optimizer step post hook): ``p <- quantize(p, format, scale=...,
      rounding=rounding, saturate=True, generator=...)`` for every selected parameter of that optimizer. A step
      that the AMP ``GradScaler`` skips does not call the optimizer (nothing happens); a fused optimizer's step
      that the scaler marks as skipped (``found_inf``) leaves the weights alone as well.

    Ordering with :class:`~altgrad_lightning.QuantizationMonitor`: the hooks are registered in ``on_train_start``,
    which Lightning calls after every callback's ``on_fit_start``, where the monitor registers its own post hook.
    Post hooks run in registration order, so whatever the order of the callbacks in ``Trainer(callbacks=...)`` the
    monitor sees the optimizer's raw update ``w'`` (the weights before the step being the stored values) and the
    quantizer then stores ``q(w')``. The monitor's ``update_stall_frac`` is therefore the *prediction* of the
    fraction of updates that storage swallows, and this callback's ``stored_update_stall_frac`` the *observation*:
    for ``rounding="nearest"`` and ``scaling="none"`` with the same format the two are equal, exactly. For
    ``rounding="stochastic"`` the observation is a random variable whose expectation is the monitor's
    ``sr_update_stall_frac``. (With ``scaling="amax"`` or ``"mx"`` the monitor measures on the grid of the weights
    before the step, this callback stores on the grid of the weights after it: close, not equal.)

    Overflow always saturates: a weight beyond ``±max`` (times its scale) is stored as ``±max``, never as inf or
    NaN, for every format. A NaN weight stays NaN; with ``scaling="mx"`` a block holding NaN or ±inf has no scale
    (e8m0's NaN) and is stored as NaN, as MX defines it.

    Stochastic rounding draws from a ``torch.Generator`` per device, seeded with ``seed`` when training starts and
    saved in checkpoints (a resumed run continues the same stream). Every rank of a DDP run seeds the same
    generator and rounds the same (replicated) weights with the same draws, so the replicas stay identical with no
    communication.

    Sharded parameters (FSDP, ``ModelParallelStrategy``): with ``scaling="none"`` rounding is elementwise, and each
    rank rounds its own shard in place (a DTensor's ``to_local()``, an FSDP1 flat shard); the statistics are
    counted on the elements each rank owns and summed over ranks with one all-reduce per logging step. Every rank
    seeds the same generator: replicas of a shard (HSDP) stay identical, different shards reuse the same draws
    (the rounding of each element is still unbiased). ``scaling="amax"`` and ``"mx"`` need the whole tensor (or
    whole blocks) and raise a ``ValueError`` there at ``on_train_start``.

    Args:
        format: the storage format (a name such as ``"float8_e4m3fn"``, ``"e5m2"``, ``"bf16"``, a
            :class:`~altgrad_lightning.FloatFormat` or a ``torch.dtype``).
        rounding: ``"nearest"`` (ties to even), ``"stochastic"`` or ``"toward_zero"``, as
            :func:`~altgrad_lightning.quantize`.
        scaling: ``"none"``: the format's own grid; ``"amax"``: per-tensor current scaling, the grid times
            ``amax(|w|) / format.max`` computed from the weights being stored (the stored value of a scale that
            is not a power of two is rounded once more to the parameter's dtype); ``"mx"``: OCP Microscaling, blocks
            of ``block_size`` elements along the last dimension share the power-of-two scale
            :func:`~altgrad_lightning.scaling.mx_scale` of the weights being stored.
        block_size: elements per MX block (``scaling="mx"`` only; default 32).
        include: regular expressions; a parameter is selected if its name matches one (``re.search``). Default:
            every trainable parameter of the optimizers.
        exclude: regular expressions; matching parameters are dropped (after ``include``).
        seed: seed of the stochastic-rounding generators (a non-negative int).
        log_stats: log, at the Trainer's logging cadence, what storage did to the updates of the window since the
            previous log (keys below). Costs one snapshot of the selected weights during each step.
        prefix: first component of every key.

    Logged metrics (with ``log_stats``; ``{fmt}`` is the canonical format name, e.g. ``float8_e4m3fn``), over the
    elements of the parameters that had a gradient at the step and were finite before and after it:

    - ``{prefix}/{fmt}/stored_update_stall_frac``: among elements the optimizer changed (``w' != w``), the fraction
      whose stored value did not change (``q(w') == w``): the observed stall fraction; 0.0 when nothing changed.
    - ``{prefix}/{fmt}/stored_updated_frac``: the fraction the optimizer changed (compare the monitor's
      ``updated_frac``).
    - ``{prefix}/{fmt}/stored_moved_frac``: the fraction whose stored value changed.

    Example::

        trainer = Trainer(callbacks=[QuantizationMonitor("float8_e4m3fn"), WeightQuantizer("float8_e4m3fn")])
    """

    def __init__(
        self,
        format: FormatLike = "float8_e4m3fn",
        rounding: str = "nearest",
        scaling: str = "none",
        block_size: int = 32,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        seed: int = 0,
        log_stats: bool = True,
        prefix: str = "altgrad",
    ) -> None:
        self.format: FloatFormat = get_format(format, arg="format")
        try:
            self.rounding = Rounding(rounding)
        except ValueError:
            known = ", ".join(repr(r.value) for r in Rounding)
            raise ValueError(f"Expected argument `rounding` to be one of {known}, but got {rounding!r}") from None
        if scaling not in _SCALINGS:
            raise ValueError(f"Expected argument `scaling` to be one of {_SCALINGS}, but got {scaling!r}")
        self.scaling = scaling
        self.block_size = _check_block_size(block_size)
        self.include = _compile(include, "include")
        self.exclude = _compile(exclude, "exclude")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"Expected argument `seed` to be a non-negative int below 2**64, but got {seed!r}")
        self.seed = seed
        if not isinstance(log_stats, bool):
            raise TypeError(f"Expected argument `log_stats` to be a bool, but got {log_stats!r}")
        self.log_stats = log_stats
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"Expected argument `prefix` to be a non-empty key component, but got {prefix!r}")
        self.prefix = prefix

        self._selected: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}  # id(optimizer) -> parameters
        self._snapshots: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}  # id(optimizer) -> before
        self._handles: list[RemovableHandle] = []
        self._generators: dict[str, torch.Generator] = {}  # str(device) -> generator
        self._counts: torch.Tensor = torch.zeros(4, dtype=torch.int64)  # n_total, n_updated, n_stall, n_moved
        self._restored: dict[str, Any] | None = None
        self._sharded = False
        self._rank = 0
        # Sharded runs only: id(parameter) -> this rank's own elements of a tensor of the parameter's local shard,
        # or None where another rank counts them (a replica). See quantization_monitor._local_views.
        self._local: dict[int, Callable[[torch.Tensor], torch.Tensor] | None] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            prefix=self.prefix,
            format=self.format.name,
            include=[r.pattern for r in self.include],
            exclude=[r.pattern for r in self.exclude],
        )

    # --- Lightning hooks -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._selected = _select_parameters(trainer, pl_module, self.include, self.exclude)
        unique = {id(p): p for chosen in self._selected.values() for _, p in chosen}
        self._sharded = _is_sharded(trainer, pl_module)
        if self._sharded and self.scaling != "none":
            raise ValueError(
                f"WeightQuantizer(scaling={self.scaling!r}) does not support sharded parameters (FSDP, "
                "ModelParallelStrategy): a shard is not the whole tensor, so its scales would differ from the "
                "unsharded run's. Use scaling='none' there."
            )
        self._rank = trainer.global_rank
        self._local = _local_views(trainer, list(unique.values()), self._sharded)
        if not unique:
            rank_zero_warn(
                f"WeightQuantizer: no trainable parameter matches include={self.include} exclude={self.exclude}; "
                "nothing will be quantized."
            )
        self._generators = {}
        self._counts = torch.zeros(4, dtype=torch.int64, device=pl_module.device)
        with torch.no_grad():
            for p in unique.values():  # training starts from stored values
                local = _to_local(p.detach())
                local.copy_(self._store(local))
        # Restored after the rounding above (which leaves a resumed run's weights, already stored, as they are), so
        # the generators continue where the checkpointed run left them.
        if self._restored is not None:
            self._apply_restored(self._restored)
            self._restored = None
        for optimizer in trainer.optimizers:
            if self.log_stats:
                self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Every selected parameter: in automatic optimization the closure that computes the gradients runs inside
        # step(), after this hook, so which ones get a gradient is only known in the post hook.
        chosen = self._selected.get(id(optimizer), [])
        self._snapshots[id(optimizer)] = [(p, _to_local(p.detach()).clone()) for _, p in chosen if self._owns(p)]

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        chosen = self._selected.get(id(optimizer), [])
        snapshots = {id(p): before for p, before in self._snapshots.pop(id(optimizer), [])}
        # A fused optimizer under a GradScaler is stepped even when the scaler found inf/NaN gradients (the kernel
        # then leaves the weights alone); keep the verdict on the device and leave such a step alone too.
        found_inf = getattr(optimizer, "found_inf", None)
        taken = (found_inf == 0) if isinstance(found_inf, torch.Tensor) else None
        with torch.no_grad():
            for _, p in chosen:
                raw = _to_local(p.detach())
                stored = self._store(raw)
                if taken is not None:
                    stored = torch.where(taken.to(raw.device), stored, raw)
                before = snapshots.get(id(p))
                if before is not None and p.grad is not None:  # as the monitor: parameters stepped with a gradient
                    self._count(p, before, raw, stored, taken)
                raw.copy_(stored)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._snapshots.clear()
        if not self.log_stats:
            return
        if _flushes_logs(trainer, pl_module):  # the monitor's logging steps
            _log_values(trainer, _to_host(self._compute_and_reset()))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # --- checkpointing -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Sharded: only rank 0's callback state reaches the checkpoint, so it holds the counts of all ranks (a
        # collective: Lightning calls this on every rank).
        return {
            "counts": self._window_counts().detach().cpu().clone(),
            "generators": {device: g.get_state() for device, g in self._generators.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_train_start selects the parameters: keep the state until then.
        self._restored = state_dict

    def _apply_restored(self, state: dict[str, Any]) -> None:
        for device, generator_state in state.get("generators", {}).items():
            self._generator(torch.device(device)).set_state(generator_state)
        # Sharded: the checkpoint holds the counts of all ranks (see state_dict); restoring them on every rank would
        # count them once per rank: rank 0 alone takes them.
        counts = state.get("counts")
        if counts is not None and not (self._sharded and self._rank != 0):
            self._counts = counts.to(device=self._counts.device, dtype=torch.int64).clone()

    # --- helpers -------------------------------------------------------------------------------------------------
    def _owns(self, p: torch.Tensor) -> bool:
        """Whether this rank counts (its local elements of) ``p``: always when not sharded."""
        return not self._sharded or self._local.get(id(p)) is not None

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return generator

    def _store(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` rounded onto the (scaled) grid, saturating, in ``w``'s dtype."""
        scale = _scale_for(w, self.format, self.scaling, self.block_size)
        generator = self._generator(w.device) if self.rounding is Rounding.STOCHASTIC else None
        return quantize(w, self.format, scale=scale, rounding=self.rounding, saturate=True, generator=generator)

    def _count(
        self,
        p: torch.Tensor,
        before: torch.Tensor,
        raw: torch.Tensor,
        stored: torch.Tensor,
        taken: torch.Tensor | None,
    ) -> None:
        """Add one step of one parameter to the window's counts, on the device (no host synchronisation)."""
        view = self._local.get(id(p)) if self._sharded else None
        if view is not None:
            before, raw, stored = view(before), view(raw), view(stored)
        valid = torch.isfinite(before) & torch.isfinite(raw)
        updated = valid & (raw != before)
        counts = torch.stack(
            [count(valid), count(updated), count(updated & (stored == before)), count(valid & (stored != before))]
        )
        if taken is not None:
            counts = torch.where(taken.to(counts.device), counts, torch.zeros_like(counts))
        self._counts += counts.to(self._counts.device)

    def _window_counts(self) -> torch.Tensor:
        """The window's counts; sharded (each rank counts its own shard), summed over the ranks by one all-reduce."""
        counts = self._counts
        if self._sharded and _distributed_ready():
            import torch.distributed as dist

            counts = counts.clone()
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return counts

    def _compute_and_reset(self) -> dict[str, torch.Tensor]:
        counts = self._window_counts()
        key = f"{self.prefix}/{self.format.name}"
        out = {
            f"{key}/stored_update_stall_frac": ratio(counts[_N_STALL], counts[_N_UPDATED]),
            f"{key}/stored_updated_frac": ratio(counts[_N_UPDATED], counts[_N_TOTAL]),
            f"{key}/stored_moved_frac": ratio(counts[_N_MOVED], counts[_N_TOTAL]),
        }
        self._counts = torch.zeros_like(self._counts)
        return out

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._snapshots.clear()
