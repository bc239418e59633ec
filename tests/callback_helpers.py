"""Shared pieces of the callback tests: a tiny model, a probe that captures tensors independently of the monitor,
readers for what the loggers wrote, and a numpy/ml_dtypes recomputation of every logged statistic.

Nothing here imports altgrad_lightning's arithmetic: grids come from enumerating every code of the ml_dtypes /
numpy dtype, rounding from ml_dtypes casts of float32 values (one rounding), ULP distances from the dtype's bit
patterns. The probe reads the tensors itself (its own ``on_before_optimizer_step`` and its own optimizer step
post hooks), so a monitor that hooks the wrong point, windows the wrong steps or picks the wrong parameters
disagrees with it.
"""

from __future__ import annotations

import csv
import functools
import glob
import math
import os
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import ml_dtypes
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

E4M3 = ml_dtypes.float8_e4m3fn
E4M3_MAX, E4M3_EMIN, E4M3_EMAX, E4M3_M = 448.0, -6, 8, 3

#: Canonical format name -> the numpy dtype whose codes are its grid.
NP_FORMATS: dict[str, np.dtype] = {
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float6_e2m3fn": np.dtype(ml_dtypes.float6_e2m3fn),
    "float6_e3m2fn": np.dtype(ml_dtypes.float6_e3m2fn),
    "float4_e2m1fn": np.dtype(ml_dtypes.float4_e2m1fn),
}

STIFFNESS_STATS = (
    "grad_below_stiffness_frac",
    "grad_stiff_ratio_mean",
    "grad_stiff_correlation",
    "zero_weight_frac",
    "grad_nonfinite_frac",
)
GRID_STATS = (
    "grid_error_mean",
    "grid_error_max",
    "grid_error_std",
    "on_grid_frac",
    "overflow_frac",
    "underflow_frac",
    "grid_nonfinite_frac",
)
FLIP_STATS = ("flip_frac", "update_stall_frac", "updated_frac", "grid_steps_mean", "flip_nonfinite_frac")
ULP_STATS = ("ulp_mean", "ulp_median", "ulp_max", "ulp_zero_frac", "ulp_nonfinite_frac")


# --- model ---------------------------------------------------------------------------------------------------------


class RebindingSGD(torch.optim.Optimizer):
    """Plain SGD written as some hand-written optimizers are: ``p.data = p.data - lr * p.grad``, which gives every
    parameter new storage inside ``step()`` and frees the old one. From step ``strided_from`` on, the first
    two-dimensional parameter is rebound to a column-major (non-contiguous) tensor of the same values."""

    def __init__(self, params, lr: float, strided_from: int | None = None) -> None:
        super().__init__(params, {"lr": lr})
        self.strided_from, self.steps = strided_from, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        strided = self.strided_from is not None and self.steps >= self.strided_from
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                new = p.data - group["lr"] * p.grad
                if strided and new.dim() == 2:
                    new, strided = new.t().contiguous().t(), False
                p.data = new
        self.steps += 1
        return loss


class TinyRegressor(pl.LightningModule):
    """6 -> 12 -> 1 MLP (97 parameters) on a fixed synthetic regression set of 256 samples, batch 16."""

    def __init__(self, lr: float = 1e-2, optimizer: str = "adam", fused: bool = False) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
        self.lr, self.optimizer_name, self.fused = lr, optimizer, fused
        self.poison_step: int | None = None  # global step whose loss is multiplied by inf

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x).float(), y.to(torch.float32))
        if self.poison_step is not None and self.global_step == self.poison_step:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.optimizer_name.startswith("rebind"):  # "rebind", or "rebind-strided-<step>"
            strided_from = int(self.optimizer_name.rsplit("-", 1)[1]) if "strided" in self.optimizer_name else None
            return RebindingSGD(self.parameters(), lr=self.lr, strided_from=strided_from)
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused or None)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 6, generator=g)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(256, 1, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


class ShardedRegressor(TinyRegressor):
    """TinyRegressor with each Linear and the root wrapped by ``fully_shard`` on the strategy's device mesh (CPU
    under ``accelerator="cpu"``, also on a host with GPUs): on 2 ranks ``net.2`` (1 x 12 and a bias of 1) is sharded
    along dim 0, so rank 1 holds empty shards of it."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


def distributed_env(rank: int, port: int) -> None:
    """The environment of rank ``rank`` of 2 processes on one node (what a launcher sets)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")


def free_port() -> int:
    """A free TCP port on localhost for a process group's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_processes(context: Any, timeout_s: float = 120) -> None:
    """Wait for the processes of ``torch.multiprocessing.start_processes(..., join=False)``; fail instead of hanging
    on a deadlock (the processes are then killed)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            raise TimeoutError(f"the distributed run did not finish within {timeout_s} s (deadlock?)")


def finish_distributed() -> None:
    """End a worker as a script should: wait for the other rank, then tear the process group down. A rank that
    exits while gloo's threads still serve the other rank's last collective can abort ("terminate called without
    an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def fsdp2_cpu_trainer(tmp_path, callbacks: Sequence[Any], **overrides: Any) -> pl.Trainer:
    """A 2-process FSDP2 Trainer (``ModelParallelStrategy``, gloo, CPU) for 4 steps, logging CSV at steps 1 and 3
    (``overrides`` replace any of these Trainer arguments)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    kwargs: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "strategy": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"),
        "accelerator": "cpu",
        "devices": 2,
        "max_steps": 4,
        "log_every_n_steps": 2,  # logs at steps 1 and 3
        "logger": CSVLogger(tmp_path, name="csv"),
        "callbacks": list(callbacks),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    return pl.Trainer(**{**kwargs, **overrides})


# --- probe ---------------------------------------------------------------------------------------------------------


def native(t: torch.Tensor) -> np.ndarray:
    """A copy of ``t`` as a numpy array of the same dtype (bfloat16 as ml_dtypes.bfloat16), bit for bit."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def f64(t: torch.Tensor) -> np.ndarray:
    """Exact float64 copy (every float32/16/bf16 value is a float64 value)."""
    return t.detach().cpu().to(torch.float64).numpy().copy()


class Probe(pl.Callback):
    """Captures, for every real optimizer step, the tensors the monitor should have read, on its own hooks.

    ``steps`` holds one dict per step that really happened (the optimizer's post hook fired), in order:
    ``opt`` (index in ``trainer.optimizers``), ``names``, ``w`` and ``g`` (float64 copies read in
    ``on_before_optimizer_step``; ``g`` is the raw ``.grad``), ``scale`` (the GradScaler's scale still in ``g``
    for a fused optimizer under AMP, else 1.0: read with ``get_scale()``), ``dtype`` (the weights before the step,
    native dtype), ``w_after`` (native, in the post hook) and ``g_post`` (float64 ``.grad`` in the post hook, i.e.
    after gradient clipping). Only parameters with ``requires_grad`` and a gradient at that step are captured.
    ``befores`` counts ``on_before_optimizer_step`` calls (skipped steps included). With ``save_dir``, each rank
    pickles its steps to ``{save_dir}/probe_rank{r}.pkl`` at the end of fit (for ``ddp_spawn``).
    """

    def __init__(self, save_dir: str | os.PathLike | None = None) -> None:
        self.steps: list[dict[str, Any]] = []
        self.befores = 0
        self.save_dir = save_dir
        self._handles: list[Any] = []
        self._current: dict[int, dict[str, Any]] = {}
        self._names: dict[int, str] = {}
        self._opt_index: dict[int, int] = {}
        self._params: dict[int, list[torch.nn.Parameter]] = {}

    def on_fit_start(self, trainer, pl_module):
        self._names = {id(p): n for n, p in pl_module.named_parameters()}
        for i, opt in enumerate(trainer.optimizers):
            self._opt_index[id(opt)] = i
            self._params[id(opt)] = [p for group in opt.param_groups for p in group["params"]]
            self._handles.append(opt.register_step_post_hook(self._post))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.befores += 1
        params = [p for p in self._params[id(optimizer)] if p.requires_grad and p.grad is not None]
        scale = 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled() and optimizer.defaults.get("fused"):
            scale = float(scaler.get_scale())
        self._current[id(optimizer)] = {
            "opt": self._opt_index[id(optimizer)],
            "names": [self._names[id(p)] for p in params],
            "params": params,
            "w": [f64(p) for p in params],
            "g": [f64(p.grad) for p in params],
            "dtype": [native(p) for p in params],
            "scale": scale,
            "global_step": trainer.global_step,
        }

    def _post(self, optimizer, args, kwargs):
        current = self._current.pop(id(optimizer))
        params = current.pop("params")
        current["w_after"] = [native(p) for p in params]
        current["g_post"] = [f64(p.grad) for p in params]
        self.steps.append(current)

    def on_fit_end(self, trainer, pl_module):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.save_dir is not None:
            path = os.path.join(self.save_dir, f"probe_rank{trainer.global_rank}.pkl")
            with open(path, "wb") as fh:
                pickle.dump({"steps": self.steps, "befores": self.befores}, fh)


# --- running and reading back ----------------------------------------------------------------------------------------


def fit(tmp_path, monitor, model=None, max_steps=12, log_every_n_steps=1, **trainer_kwargs):
    """Train ``model`` (default a fresh TinyRegressor) on CPU with ``monitor`` and a Probe; CSV + TensorBoard."""
    model = model or TinyRegressor()
    probe = trainer_kwargs.pop("probe", None) or Probe()
    fit_kwargs = trainer_kwargs.pop("fit_kwargs", {})
    fit_model = trainer_kwargs.pop("fit_model", model)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        log_every_n_steps=log_every_n_steps,
        logger=trainer_kwargs.pop("logger", [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]),
        callbacks=[monitor, probe, *trainer_kwargs.pop("callbacks", [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False),
        accelerator=trainer_kwargs.pop("accelerator", "cpu"),
        devices=trainer_kwargs.pop("devices", 1),
        **trainer_kwargs,
    )
    trainer.fit(fit_model, **fit_kwargs)
    return trainer, probe, model


def csv_rows(tmp_path, name: str = "csv") -> list[dict[str, float]]:
    """The CSV's rows merged per ``step``, in order: each monitor (and Lightning itself) writes its own row."""
    (path,) = glob.glob(os.path.join(tmp_path, name, "*", "metrics.csv"))
    merged: dict[float, dict[str, float]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            values = {k: float(v) for k, v in row.items() if v != ""}
            merged.setdefault(values.get("step", math.nan), {}).update(values)
    return list(merged.values())


def tensorboard_scalars(tmp_path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = glob.glob(os.path.join(tmp_path, "tb", "*"))
    acc = EventAccumulator(run)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --- independent recomputation ----------------------------------------------------------------------------------------


@functools.cache
def _grid(name: str) -> np.ndarray:
    """Sorted distinct finite values of the format (+0 and -0 one point), by enumerating every code."""
    dtype = NP_FORMATS[name]
    codes = np.arange(2 ** (8 * dtype.itemsize), dtype=np.uint8 if dtype.itemsize == 1 else np.uint16)
    with np.errstate(invalid="ignore", over="ignore"):
        values = codes.view(dtype).astype(np.float64)
    return np.unique(values[np.isfinite(values)] + 0.0)


def _finfo(name: str):
    return ml_dtypes.finfo(NP_FORMATS[name])


def round_to(x: np.ndarray, name: str) -> np.ndarray:
    """Saturating nearest rounding of float32-representable float64 values with an ml_dtypes / numpy cast."""
    x32 = x.astype(np.float32)
    assert np.array_equal(x32.astype(np.float64), x, equal_nan=True), "round_to needs float32 values"
    m = np.float32(_finfo(name).max)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.clip(x32, -m, m).astype(NP_FORMATS[name]).astype(np.float64)


def stiffness_ref(w: np.ndarray, name: str) -> np.ndarray:
    """2**(clamp(floor(log2|w|), emin, emax) - M) from frexp."""
    fi = _finfo(name)
    e = np.clip(np.frexp(np.abs(w))[1] - 1, int(fi.minexp), int(fi.maxexp) - 1)
    return np.ldexp(1.0, e - int(fi.nmant))


def ordered(a: np.ndarray) -> np.ndarray:
    """Order-preserving integer of each value's bit pattern (sign-magnitude to two's complement), as int64."""
    ints = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    i = a.view(ints).astype(np.int64)
    magnitude = i & np.int64((1 << (8 * a.dtype.itemsize - 1)) - 1)
    return np.where(i < 0, -magnitude, magnitude)


def _frac(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def _cat(steps: Sequence[dict[str, Any]], key: str, scaled: bool = False) -> np.ndarray:
    parts = []
    for s in steps:
        for a in s[key]:
            parts.append(a.ravel() / s["scale"] if scaled else a.ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def reference(
    steps: Sequence[dict[str, Any]],
    formats: Iterable[str] = ("float8_e4m3fn",),
    grad_key: str = "g",
    unscale: bool = True,
    prefix: str = "altgrad",
) -> dict[str, float]:
    """Every logged key (but the histogram) of a window made of the probe's ``steps``, recomputed in numpy.

    ``grad_key`` picks the captured gradient (``g``: read before the step, ``g_post``: after it, i.e. clipped);
    ``unscale`` divides it by the probe's recorded GradScaler scale. Keys as the monitor logs them.
    """
    w = _cat(steps, "w")
    g = _cat(steps, grad_key, scaled=unscale)
    before = np.concatenate([a.ravel() for s in steps for a in s["dtype"]]) if steps else np.zeros(0, np.float32)
    after = np.concatenate([a.ravel() for s in steps for a in s["w_after"]]) if steps else np.zeros(0, np.float32)
    out: dict[str, float] = {}
    nonfinite = ~np.isfinite(w) | ~np.isfinite(g)
    zero = (w == 0) & ~nonfinite
    valid = ~nonfinite & ~zero
    wf = np.isfinite(w)
    bf, af = before.astype(np.float64), after.astype(np.float64)
    pair = np.isfinite(bf) & np.isfinite(af)
    for name in formats:
        key = f"{prefix}/{name}"
        s = stiffness_ref(w[valid], name)
        x = np.abs(g[valid])
        out[f"{key}/grad_below_stiffness_frac"] = _frac(np.sum(x < s), valid.sum())
        out[f"{key}/grad_stiff_ratio_mean"] = _frac(np.sum(x / s), valid.sum())
        corr = 0.0
        if x.size >= 2 and np.std(x) > 0 and np.std(s) > 0:
            corr = float(np.corrcoef(x, s)[0, 1])
        out[f"{key}/grad_stiff_correlation"] = corr
        out[f"{key}/zero_weight_frac"] = _frac(zero.sum(), w.size)
        out[f"{key}/grad_nonfinite_frac"] = _frac(nonfinite.sum(), w.size)

        wv = w[wf]
        if w.dtype == np.float64 and not np.array_equal(wv.astype(np.float32).astype(np.float64), wv):
            pass  # float64 weights: no one-rounding cast oracle here; grid stats are left to the functional tests
        else:
            q = round_to(wv, name)
            err = np.abs(wv - q)
            out[f"{key}/grid_error_mean"] = float(err.mean()) if err.size else 0.0
            out[f"{key}/grid_error_max"] = float(err.max()) if err.size else 0.0
            out[f"{key}/grid_error_std"] = float(err.std()) if err.size else 0.0
            out[f"{key}/on_grid_frac"] = _frac(np.sum(err == 0), wv.size)
            out[f"{key}/overflow_frac"] = _frac(np.sum(np.abs(wv) > float(_finfo(name).max)), wv.size)
            out[f"{key}/underflow_frac"] = _frac(np.sum((q == 0) & (wv != 0)), wv.size)
        out[f"{key}/grid_nonfinite_frac"] = _frac(np.sum(~wf), w.size)

        if before.dtype != np.float64:
            qb, qa = round_to(bf[pair], name), round_to(af[pair], name)
            grid = _grid(name)
            steps_moved = np.abs(np.searchsorted(grid, qa + 0.0) - np.searchsorted(grid, qb + 0.0))
            updated = af[pair] != bf[pair]
            out[f"{key}/flip_frac"] = _frac(np.sum(qa != qb), pair.sum())
            out[f"{key}/update_stall_frac"] = _frac(np.sum(updated & (qa == qb)), updated.sum())
            out[f"{key}/updated_frac"] = _frac(updated.sum(), pair.sum())
            out[f"{key}/grid_steps_mean"] = _frac(steps_moved.sum(), pair.sum())
        out[f"{key}/flip_nonfinite_frac"] = _frac(np.sum(~pair), before.size)

    # Python ints: float64 pairs of opposite signs can be more than 2**63 apart (the monitor saturates there).
    d = np.minimum(np.abs(ordered(after[pair]).astype(object) - ordered(before[pair]).astype(object)), 2**63 - 1)
    out[f"{prefix}/ulp_mean"] = _frac(sum(int(v) for v in d), d.size)
    out[f"{prefix}/ulp_max"] = float(max(d, default=0))
    out[f"{prefix}/ulp_zero_frac"] = _frac(np.sum(d == 0), d.size)
    out[f"{prefix}/ulp_nonfinite_frac"] = _frac(np.sum(~pair), before.size)
    if d.size:
        median = int(sorted(d)[(d.size + 1) // 2 - 1])  # the lower median
        if median < 32:  # exact below 32 ULPs (above, the monitor reports its 1/16-octave bucket's lower edge)
            out[f"{prefix}/ulp_median"] = float(median)
    else:
        out[f"{prefix}/ulp_median"] = 0.0
    return out


def ulp_histogram_ref(steps: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Fractions per log2 bucket (0, 1, 2-3, 4-7, ...) of the ULP distances, keyed by bucket label."""
    before = np.concatenate([a.ravel() for s in steps for a in s["dtype"]])
    after = np.concatenate([a.ravel() for s in steps for a in s["w_after"]])
    ok = np.isfinite(before.astype(np.float64)) & np.isfinite(after.astype(np.float64))
    d = np.abs(ordered(after[ok]) - ordered(before[ok]))
    buckets = np.array([0 if v == 0 else int(v).bit_length() for v in d])
    out = {}
    for b in range(int(buckets.max(initial=0)) + 1):
        label = "0" if b == 0 else ("1" if b == 1 else f"{2 ** (b - 1)}-{2**b - 1}")
        out[label] = _frac(np.sum(buckets == b), d.size)
    return out


#: Tolerances: logged values are float32; a std from sums of squares loses a few more digits.
REL, ABS = 2e-6, 1e-7


def assert_matches(row: dict[str, float], ref: dict[str, float], what: Any = "", keys: Iterable[str] | None = None):
    """Every reference key (or ``keys``) is in ``row`` with the reference value."""
    for key in ref if keys is None else keys:
        assert key in row, (what, key, sorted(row))
        rel = 1e-4 if key.endswith("grid_error_std") else REL
        assert row[key] == pytest.approx(ref[key], rel=rel, abs=ABS), (what, key, row[key], ref[key])


def monitor_keys(row: dict[str, float], prefix: str = "altgrad") -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith(prefix + "/")}


# --- distributed -----------------------------------------------------------------------------------------------------

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


class CollectiveCounter(pl.Callback):
    """Counts the ``torch.distributed`` collectives called from the monitor's code (its module or the metrics'
    ``_base``), by wrapping the functions in ``setup`` (in the spawned process). ``calls`` lists
    ``(global_step, name, op)`` per call; with ``save_dir`` each rank pickles it to ``collectives_rank{r}.pkl``."""

    def __init__(self, save_dir: str | os.PathLike | None = None) -> None:
        self.save_dir = save_dir
        self.calls: list[tuple[int, str, str]] = []
        self._originals: dict[str, Any] = {}
        self._trainer: Any = None

    def setup(self, trainer, pl_module, stage):
        import traceback

        import torch.distributed as dist

        self._trainer = trainer
        for name in _COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original

            def wrapped(*args, _name=name, _original=original, **kwargs):
                stack = traceback.extract_stack()
                if any("quantization_monitor" in f.filename or "metrics/_base" in f.filename for f in stack):
                    op = kwargs.get("op", args[1] if len(args) > 1 and _name == "all_reduce" else None)
                    self.calls.append((self._trainer.global_step, _name, str(op)))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}
        if self.save_dir is not None:
            with open(os.path.join(self.save_dir, f"collectives_rank{trainer.global_rank}.pkl"), "wb") as fh:
                pickle.dump(self.calls, fh)


class FullTensorProbe(Probe):
    """A :class:`Probe` for sharded parameters (DTensor): captures the whole tensors (``full_tensor()``, a
    collective every rank joins in the same order), so its steps are those of one process holding the model."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.befores += 1
        params = [p for p in self._params[id(optimizer)] if p.requires_grad and p.grad is not None]
        full = [p.detach().full_tensor() for p in params]
        grads = [p.grad.full_tensor() for p in params]
        self._current[id(optimizer)] = {
            "opt": self._opt_index[id(optimizer)],
            "names": [self._names[id(p)] for p in params],
            "params": params,
            "w": [f64(t) for t in full],
            "g": [f64(t) for t in grads],
            "dtype": [native(t) for t in full],
            "scale": 1.0,
            "global_step": trainer.global_step,
        }

    def _post(self, optimizer, args, kwargs):
        current = self._current.pop(id(optimizer))
        params = current.pop("params")
        current["w_after"] = [native(p.detach().full_tensor()) for p in params]
        current["g_post"] = [f64(p.grad.full_tensor()) for p in params]
        self.steps.append(current)
