"""The baseline of issue 5: the diagnostics as a careful user would write them by hand, without altgrad_lightning.

Per parameter and per step, every intermediate materialised, one ``.item()`` per statistic:

- in ``on_before_optimizer_step`` (gradients final, weights not yet updated):
  - stiffness ``S = 2**(floor(log2|w|) - M)`` (``M`` = the format's mantissa bits), NaN where ``w == 0``;
  - the fraction of elements with ``|g| < S`` (bit-stall risk);
  - the grid error through torch's cast round trip: ``mean |w - w.to(fp8).to(w.dtype)|``;
  - a snapshot ``w.clone()``;
- in a ``register_step_post_hook`` of the optimizer (registered in ``on_fit_start``), after the real step:
  - the ULP distance ``round(|w' - w| / (nextafter(|w|, inf) - |w|))`` against the snapshot, its mean, max and
    the fraction of zeros.

The per-parameter floats are kept in ``self.values`` (``{"{fmt}/{stat}/{param}": float}``) and their means over
parameters are logged once per step with ``pl_module.log_dict`` (a handful of keys, as a user would log). With
``log_per_parameter=True`` every per-parameter float is logged instead (one ``self.log`` per value: what a user who
wants per-layer curves writes; Lightning's per-call cost then adds to the diagnostics').
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch

# name -> (torch dtype of the cast round trip, mantissa bits M)
NAIVE_FORMATS: dict[str, tuple[torch.dtype, int]] = {
    "float8_e4m3fn": (torch.float8_e4m3fn, 3),
    "float8_e5m2": (torch.float8_e5m2, 2),
    "bfloat16": (torch.bfloat16, 7),
    "float16": (torch.float16, 10),
}


class NaiveMonitor(pl.Callback):
    """Hand-written per-parameter diagnostics (stiffness, |g| < S, grid error, ULP distance), ``.item()`` per value."""

    def __init__(self, formats: str | list[str] = "float8_e4m3fn", log_per_parameter: bool = False) -> None:
        names = [formats] if isinstance(formats, str) else list(formats)
        unknown = [n for n in names if n not in NAIVE_FORMATS]
        if unknown:
            raise ValueError(f"NaiveMonitor knows {sorted(NAIVE_FORMATS)}, not {unknown}")
        self.formats = names
        self.log_per_parameter = log_per_parameter
        self.values: dict[str, float] = {}
        self._snapshots: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        self._handles: list[Any] = []
        self._names: dict[int, str] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._names = {id(p): n for n, p in pl_module.named_parameters()}
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._snapshots = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = self._names.get(id(p), str(id(p)))
                w = p.detach()
                g = p.grad.detach()
                a = w.abs()
                for fmt in self.formats:
                    dtype, mantissa = NAIVE_FORMATS[fmt]
                    stiffness = torch.exp2(torch.floor(torch.log2(a)) - mantissa)
                    stiffness = torch.where(a == 0, torch.full_like(stiffness, math.nan), stiffness)
                    self.values[f"{fmt}/grad_below_stiffness_frac/{name}"] = (g.abs() < stiffness).float().mean().item()
                    grid_error = (w - w.to(dtype).to(w.dtype)).abs()
                    self.values[f"{fmt}/grid_error_mean/{name}"] = grid_error.mean().item()
                self._snapshots.append((name, p, w.clone()))

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for name, p, before in self._snapshots:
            after = p.detach()
            a = before.abs()
            spacing = torch.nextafter(a, torch.full_like(a, math.inf)) - a
            ulp = torch.round((after - before).abs() / spacing)
            self.values[f"ulp_mean/{name}"] = ulp.mean().item()
            self.values[f"ulp_max/{name}"] = ulp.max().item()
            self.values[f"ulp_zero_frac/{name}"] = (ulp == 0).float().mean().item()
        self._snapshots = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.log_per_parameter:
            pl_module.log_dict({"naive/" + k: v for k, v in self.values.items()}, on_step=True, on_epoch=False)
            return
        pooled: dict[str, list[float]] = defaultdict(list)
        for key, value in self.values.items():
            pooled["naive/" + key.rsplit("/", 1)[0]].append(value)
        if pooled:
            pl_module.log_dict({k: sum(v) / len(v) for k, v in pooled.items()}, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._snapshots = []
