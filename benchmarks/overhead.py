"""Step-time overhead of ``QuantizationMonitor`` against no callback and against the naive hand-written callback.

Workloads (issue 5), a ``nn.TransformerEncoder`` language model on random tokens, AdamW, driven by a real
Lightning ``Trainer``:

- ``--device cuda``: d_model 768, 12 layers, 4 heads, feed-forward 4×d, vocabulary 512, sequence 1024, batch 8
  (≈ 86 M parameters), ``precision="bf16-mixed"``;
- ``--device cpu``: d_model 256, 4 layers, 4 heads, sequence 128, batch 8 (≈ 3.4 M parameters), fp32;
- ``--quick``: a tiny model, for a smoke run of the harness only (its numbers mean nothing).

Variants (``--variants``, comma-separated keys; ``F`` = ``--formats``):

- ``baseline``: no diagnostics callback;
- ``naive``: :class:`naive_callback.NaiveMonitor` on ``F[0]``, the hand-written way (per-parameter ``.item()``,
  means over parameters logged);
- ``naivelog``: the same, logging every per-parameter value with ``self.log`` (not in the default list);
- ``m1``, ``m2``, ``m3``, …: ``QuantizationMonitor`` with all diagnostics and the first 1, 2, 3, … formats of ``F``;
- ``every10``: ``m1`` with ``every_n_steps=10``;
- ``alt1``, ``alt2``, …: ``m1``, ``m2``, … with ``every_n_steps=2`` (not in the default list): computed and skipped
  steps alternate inside one run, which gives the **in-run ratio** (below);
- ``nosnap``: ``m1`` with ``diagnostics=("stiffness", "grid")`` (no snapshot of the weights);
- ``snaponly``: ``m1`` with ``diagnostics=("ulp", "flips")``;
- ``m1ref``: ``m1`` with ``fused=False`` (the reference path), where the callback has that argument (the fused path
  runs on CUDA with Triton and on the CPU with a C compiler; elsewhere ``m1ref`` equals ``m1``);
- ``m1triton``: ``m1`` with Triton's kernels instead of the CUDA C ones (NVRTC), on CUDA where the package
  has both (not in the default list);
- ``amax``, ``mx``: ``m1`` with ``scaling="amax"`` (per-tensor current scaling) and ``scaling="mx"`` (MX blocks of
  32); both take the reference path (not in the default list; issue 7 compares ``mx`` against ``amax``);
- ``sample2``, ``amaxs2``, ``mxs2``: ``m1``, ``amax`` and ``mx`` with ``sample_fraction=0.02`` (a fixed 2 % of the
  elements; not in the default list);

Method:

- **One process, interleaved.** After one unrecorded warm-up run of every variant, each of ``--repeats`` rounds runs
  every variant once in a shuffled order (seeded). One run = a fresh ``Trainer`` fitting the *same* model for
  ``warmup + steps + 1`` optimizer steps; the first ``warmup`` steps are dropped (optimizer state allocation,
  caches), and the last one only closes the interval of the last measured step.
- **Step time** = time between consecutive ``on_train_batch_start`` calls of a timing callback placed first in the
  callback list, with ``torch.cuda.synchronize()`` before reading the clock on CUDA. It includes everything of a
  training-loop iteration: forward, backward, optimizer, every callback hook, Lightning's logging of the step.
  Per run the median step is kept (``ms/step``) and the mean (``mean ms``, which amortises ``every_n_steps`` > 1);
  the table shows the median over repeats. ``ratio`` is the median over repeats of the run's median step time over
  the baseline's median step time *in the same round* (paired, so drift between rounds cancels).
- **In-run ratio** (``alt1``, ``alt2``, …). Where the machine drifts between runs by more than the effect (shared hosts:
  ±10 % between rounds on the GPU machines), pairing within one run is finer: every computed step over the mean of
  its two neighbours, which skip the diagnostics and cost what a step without the callback costs (``every10``).
  The median over all such triples of all rounds is printed under the table.
- **Callback time.** The per-step hooks the diagnostics callback overrides, and every optimizer step pre/post hook
  registered on the optimizer (the optimizer's ``register_step_*_hook`` is wrapped in ``configure_optimizers``), are
  wrapped with timers: CUDA events on the current stream on CUDA (no extra host synchronisation; GPU time from the
  hook's first to its last queued work, including GPU idle time while the host is busy), ``time.perf_counter`` on
  CPU. ``callback ms/step`` = all of them, mean per measured step. ``pass ms`` = the diagnostic pass: every wrapped
  hook but ``on_train_batch_end`` (where the callbacks compute and log the step's values), median over the *computed*
  steps (``global_step % every_n_steps == 0``).
- **Floor.** ``pass GB/s`` = :func:`bandwidth.diagnostic_bytes` (20 B per fp32 parameter with all diagnostics; 8 B
  without ulp/flips) over ``pass ms``; ``achieved/floor`` = that over the copy bandwidth measured by
  :func:`bandwidth.copy_bandwidth` in the same process, once per round, on a buffer of the parameter count
  (100 % = as fast as memory allows; the issue's target is >= 80 %).
- **Memory (CUDA).** ``torch.cuda.max_memory_allocated`` over the measured steps (read and reset at every batch
  start and in the timing callback's ``on_before_optimizer_step``, so the run's peak is the max of the segments);
  ``peak extra MiB`` = the variant's median peak minus the baseline's. On the GPU workload that peak is the
  activations' at the end of the forward pass, which hides memory a callback holds only around the optimizer step
  (a snapshot), so ``step-window extra MiB`` compares the peaks of the step windows alone (from the first
  ``on_before_optimizer_step`` to the next batch start: optimizer step, its hooks, ``on_train_batch_end``,
  logging). Not measured on CPU.
- **CPU time (CPU device).** The process's CPU time (``time.process_time``, all threads) per step is recorded
  too: with other processes on the machine it stays closer to the uncontended cost than wall time does (best with
  ``--threads 1``; with several threads it also counts OpenMP's spin-waiting). ``CPU-time ratio`` is paired per
  round like ``ratio``.
- **Logger.** By default a logger that drops what it gets is attached, so Lightning converts the logged tensors to
  Python floats at every log step as it would for TensorBoard/CSV (a host synchronisation per step on CUDA);
  ``--no-logger`` passes ``logger=False`` (then logged device tensors are never read). ``log_every_n_steps`` is 1
  unless ``--log-every-n-steps`` says otherwise.

Usage::

    python3 benchmarks/overhead.py [--device cpu|cuda] [--steps 20] [--warmup 3] [--repeats 5]
        [--formats float8_e4m3fn float8_e5m2 bfloat16] [--variants baseline,naive,m1,...] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import logging
import math
import os
import random
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from _common import ensure_importable, header_lines, load_average, median, synchronize
except ModuleNotFoundError:  # imported as benchmarks.overhead
    from benchmarks._common import ensure_importable, header_lines, load_average, median, synchronize

ensure_importable()

import lightning.pytorch as pl  # noqa: E402
from bandwidth import ALL_DIAGNOSTICS, achieved_over_floor, copy_bandwidth, diagnostic_bytes  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402
from naive_callback import NaiveMonitor  # noqa: E402

from altgrad_lightning import QuantizationMonitor  # noqa: E402

MiB = 2**20
# Callback hooks that run inside a training step; on_train_batch_end is where values are computed and logged.
PER_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
LOG_HOOKS = ("on_train_batch_end",)


# --- workload --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    d_model: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int
    precision: str

    @property
    def ffn(self) -> int:
        return 4 * self.d_model

    def describe(self) -> str:
        return (
            f"{self.name}: nn.TransformerEncoder LM, d_model {self.d_model}, {self.layers} layers, {self.heads} heads, "
            f"feed-forward {self.ffn}, vocabulary {self.vocab}, sequence {self.seq}, batch {self.batch}, "
            f"precision {self.precision}, AdamW, random tokens"
        )


WORKLOADS = {
    "cuda": Workload("GPU workload", 768, 12, 4, 512, 1024, 8, "bf16-mixed"),
    "cpu": Workload("CPU workload", 256, 4, 4, 512, 128, 8, "32-true"),
    "quick": Workload("quick smoke workload", 32, 2, 2, 64, 16, 2, "32-true"),
}


class TransformerLM(pl.LightningModule):
    """Embedding + learned positions + ``nn.TransformerEncoder`` (causal) + linear head, on fixed random tokens."""

    def __init__(self, w: Workload, n_batches: int = 4, lr: float = 1e-4, seed: int = 0) -> None:
        super().__init__()
        self.workload = w
        self.lr = lr
        self.emb = nn.Embedding(w.vocab, w.d_model)
        self.pos = nn.Parameter(torch.randn(w.seq, w.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(w.d_model, w.heads, w.ffn, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, w.layers, enable_nested_tensor=False)
        self.head = nn.Linear(w.d_model, w.vocab)
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, w.vocab, (n_batches, w.batch, w.seq + 1), generator=gen)
        # Device-resident data: no host-to-device batch copies inside the timed steps.
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(w.seq), persistent=False)
        self.hook_timer: HookTimer | None = None  # set by the harness for the duration of one run

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) + self.pos[: tokens.shape[1]]
        x = self.encoder(x, mask=self.mask, is_causal=True)
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tok = self.tokens[batch_idx % self.tokens.shape[0]]
        logits = self(tok[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tok[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if self.hook_timer is not None:
            self.hook_timer.instrument_optimizer(optimizer)
        return optimizer


class NullLogger(Logger):
    """Receives what Lightning logs (already converted to Python floats) and drops it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.keys: set[str] = set()

    @property
    def name(self) -> str:
        return "null"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls += 1
        self.keys.update(metrics)


# --- timing ----------------------------------------------------------------------------------------------------------
class StepRecorder(pl.Callback):
    """Clock read at every ``on_train_batch_start`` (after a device sync); first in the callback list."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device = device
        self.warmup = warmup
        self.steps = steps
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []  # process CPU time (all threads), robust to time-sharing with other load
        self.global_steps: list[int] = []
        self.step = -1
        self.hook_seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.pending_events: list[tuple[int, str, Any, Any]] = []
        # CUDA memory, measured steps only. The allocator's peak is read and reset at every batch start and in this
        # callback's on_before_optimizer_step (it runs before any other callback's), so that the peak of the run is
        # the max of two segments: forward+backward, and the step window (optimizer step, its hooks, every callback's
        # on_before_optimizer_step and on_train_batch_end, Lightning's logging).
        self.peak_bytes: int | None = None  # whole measured window
        self.window_peak_bytes: int | None = None  # step windows only
        self.allocated_at_start: int | None = None

    def _read_peak(self, window: bool) -> None:
        peak = torch.cuda.max_memory_allocated(self.device)
        self.peak_bytes = max(self.peak_bytes or 0, peak)
        if window:
            self.window_peak_bytes = max(self.window_peak_bytes or 0, peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.device.type == "cuda" and self.step in self.measured():
            self._read_peak(window=False)  # closes the forward+backward segment

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        synchronize(self.device)
        now = time.perf_counter()
        self.resolve_events()
        i = len(self.starts)
        if self.device.type == "cuda":
            if i == self.warmup:
                torch.cuda.reset_peak_memory_stats(self.device)
                self.allocated_at_start = torch.cuda.memory_allocated(self.device)
            elif self.warmup < i <= self.warmup + self.steps:
                self._read_peak(window=True)  # closes the previous step's window
        self.starts.append(now)
        self.cpu_starts.append(time.process_time())
        self.global_steps.append(trainer.global_step)
        self.step = i

    def add(self, step: int, category: str, seconds: float) -> None:
        self.hook_seconds[step][category] += seconds

    def resolve_events(self) -> None:
        """Turn the CUDA event pairs of finished hooks into seconds (called right after a synchronize)."""
        for step, category, start, end in self.pending_events:
            self.add(step, category, start.elapsed_time(end) / 1e3)
        self.pending_events = []

    def measured(self) -> range:
        return range(self.warmup, self.warmup + self.steps)

    def step_seconds(self) -> list[float]:
        return [self.starts[i + 1] - self.starts[i] for i in self.measured()]

    def step_cpu_seconds(self) -> list[float]:
        return [self.cpu_starts[i + 1] - self.cpu_starts[i] for i in self.measured()]


class HookTimer:
    """Wraps callback hooks and optimizer step hooks with timers that report into a :class:`StepRecorder`."""

    def __init__(self, recorder: StepRecorder) -> None:
        self.recorder = recorder
        self.cuda = recorder.device.type == "cuda"

    def timed(self, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        rec = self.recorder

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            step = rec.step
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.cuda:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    rec.pending_events.append((step, category, start, end))
                else:
                    rec.add(step, category, time.perf_counter() - t0)

        return wrapper

    def instrument_callback(self, callback: pl.Callback) -> None:
        for name in PER_STEP_HOOKS:
            if getattr(type(callback), name) is not getattr(pl.Callback, name):
                category = "log" if name in LOG_HOOKS else "pass"
                setattr(callback, name, self.timed(category, getattr(callback, name)))

    def instrument_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for register in ("register_step_pre_hook", "register_step_post_hook"):
            original = getattr(optimizer, register)

            def patched(hook: Callable[..., Any], _original: Callable[..., Any] = original) -> Any:
                return _original(self.timed("pass", hook))

            setattr(optimizer, register, patched)


# --- variants --------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    key: str
    label: str
    make: Callable[[], pl.Callback | None]
    every_n: int = 1
    diagnostics: tuple[str, ...] = ALL_DIAGNOSTICS
    runs: list[RunResult] = field(default_factory=list)


class _TritonKernels(QuantizationMonitor):
    """``QuantizationMonitor`` whose fused pass takes Triton's kernels (the CUDA C ones reported as absent
    while the pass is built): the A/B of the two backends in one process."""

    def __init__(self, formats: list[str]) -> None:
        super().__init__(formats=formats)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from altgrad_lightning.functional._fused import FusedPass

        original = FusedPass._cuda_compiles
        FusedPass._cuda_compiles = lambda self: False  # type: ignore[method-assign]
        try:
            super().on_fit_start(trainer, pl_module)
        finally:
            FusedPass._cuda_compiles = original  # type: ignore[method-assign]


def build_variants(formats: list[str]) -> dict[str, Variant]:
    f1 = formats[:1]
    naive_diags = ("stiffness", "grid", "ulp")
    out = [
        Variant("baseline", "baseline (no callback)", lambda: None, diagnostics=()),
        Variant("naive", f"naive callback, {f1[0]}", lambda: NaiveMonitor(f1[0]), diagnostics=naive_diags),
        Variant(
            "naivelog",
            f"naive callback, {f1[0]}, every value logged",
            lambda: NaiveMonitor(f1[0], log_per_parameter=True),
            diagnostics=naive_diags,
        ),
    ]
    for k in range(1, len(formats) + 1):
        fk = formats[:k]
        label = f"QuantizationMonitor, {k} format{'s' if k > 1 else ''}"
        out.append(Variant(f"m{k}", label, lambda fk=fk: QuantizationMonitor(formats=fk)))
    if "fused" in inspect.signature(QuantizationMonitor).parameters:
        out.append(
            Variant(
                "m1ref",
                "QuantizationMonitor, 1 format, fused=False",
                lambda: QuantizationMonitor(formats=f1, fused=False),
            )
        )
    try:
        from altgrad_lightning.functional import _fused
    except ImportError:  # pragma: no cover - older versions of the package
        _fused = None
    if _fused is not None and hasattr(_fused.FusedPass, "_cuda_compiles"):
        out.append(Variant("m1triton", "QuantizationMonitor, 1 format, Triton kernels", lambda: _TritonKernels(f1)))
    for scaling in ("amax", "mx"):
        out.append(
            Variant(
                scaling,
                f"QuantizationMonitor, 1 format, scaling={scaling}",
                lambda scaling=scaling: QuantizationMonitor(formats=f1, scaling=scaling),
            )
        )
    if "sample_fraction" in inspect.signature(QuantizationMonitor).parameters:
        for scaling in ("none", "amax", "mx"):
            key = "sample2" if scaling == "none" else f"{scaling}s2"
            out.append(
                Variant(
                    key,
                    f"QuantizationMonitor, 1 format, scaling={scaling}, sample_fraction=0.02",
                    lambda scaling=scaling: QuantizationMonitor(formats=f1, scaling=scaling, sample_fraction=0.02),
                )
            )
    for k in range(1, len(formats) + 1):
        fk = formats[:k]
        out.append(
            Variant(
                f"alt{k}",
                f"QuantizationMonitor, {k} format{'s' if k > 1 else ''}, every_n_steps=2",
                lambda fk=fk: QuantizationMonitor(formats=fk, every_n_steps=2),
                every_n=2,
            )
        )
    out += [
        Variant(
            "every10",
            "QuantizationMonitor, 1 format, every_n_steps=10",
            lambda: QuantizationMonitor(formats=f1, every_n_steps=10),
            every_n=10,
        ),
        Variant(
            "nosnap",
            "QuantizationMonitor, 1 format, stiffness+grid",
            lambda: QuantizationMonitor(formats=f1, diagnostics=("stiffness", "grid")),
            diagnostics=("stiffness", "grid"),
        ),
        Variant(
            "snaponly",
            "QuantizationMonitor, 1 format, ulp+flips",
            lambda: QuantizationMonitor(formats=f1, diagnostics=("ulp", "flips")),
            diagnostics=("ulp", "flips"),
        ),
    ]
    return {v.key: v for v in out}


@dataclass
class RunResult:
    step_median: float
    step_mean: float
    cpu_step_median: float  # process CPU time per step (meaningful on the CPU device)
    callback_per_step: float  # mean over measured steps, all wrapped hooks
    pass_median: float  # median over computed steps, all hooks but on_train_batch_end
    peak_bytes: int | None
    window_peak_bytes: int | None
    logged_keys: int
    computed_steps: int
    in_run_ratios: list[float]  # every_n == 2: each computed step over the mean of its two (skipped) neighbours


def run_once(variant: Variant, model: TransformerLM, device: torch.device, args: argparse.Namespace) -> RunResult:
    rec = StepRecorder(device, args.warmup, args.steps)
    timer = HookTimer(rec)
    callbacks: list[pl.Callback] = [rec]
    cb = variant.make()
    if cb is not None:
        timer.instrument_callback(cb)
        callbacks.append(cb)
    model.hook_timer = timer
    max_steps = args.warmup + args.steps + 1
    logger = False if args.no_logger else NullLogger()
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=model.workload.precision,
        max_steps=max_steps,
        max_epochs=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=args.log_every_n_steps,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    loader = torch.utils.data.DataLoader(list(range(max_steps)), batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    model.hook_timer = None
    if len(rec.starts) != max_steps:
        raise RuntimeError(f"{variant.key}: expected {max_steps} steps, got {len(rec.starts)}")
    steps = rec.step_seconds()
    measured = list(rec.measured())
    per_step_cb = [sum(rec.hook_seconds[i].values()) for i in measured]
    computed = [i for i in measured if rec.global_steps[i] % variant.every_n == 0]
    pass_times = [rec.hook_seconds[i]["pass"] for i in computed] if cb is not None else []
    by_step = dict(zip(measured, steps, strict=True))
    in_run = [
        by_step[i] / ((by_step[i - 1] + by_step[i + 1]) / 2)
        for i in computed
        if variant.every_n == 2 and i - 1 in by_step and i + 1 in by_step
    ]
    # QuantizationMonitor hands its values to the loggers directly; the naive callback logs through self.log.
    received = set(trainer.logged_metrics) | (logger.keys if isinstance(logger, NullLogger) else set())
    logged = [k for k in received if k.startswith(("altgrad/", "naive/"))]
    result = RunResult(
        step_median=median(steps),
        step_mean=sum(steps) / len(steps),
        cpu_step_median=median(rec.step_cpu_seconds()),
        callback_per_step=sum(per_step_cb) / len(per_step_cb),
        pass_median=median(pass_times),
        peak_bytes=rec.peak_bytes,
        window_peak_bytes=rec.window_peak_bytes,
        logged_keys=len(logged),
        computed_steps=len(computed),
        in_run_ratios=in_run,
    )
    model.zero_grad(set_to_none=True)
    del trainer, cb, callbacks, rec, timer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --- report ----------------------------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".1f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:{spec}}{suffix}"


def report(
    variants: list[Variant], n_params: int, weight_bytes: int, grad_bytes: int, bandwidths: list[float], cuda: bool
) -> None:
    base = variants[0]
    assert base.key == "baseline"
    bw = median(bandwidths)

    def med_peak(v: Variant, attr: str) -> float:
        return median([getattr(r, attr) for r in v.runs if getattr(r, attr) is not None])

    base_peak = med_peak(base, "peak_bytes") if cuda else None
    base_window = med_peak(base, "window_peak_bytes") if cuda else None
    last = "peak extra MiB | step-window extra MiB" if cuda else "CPU-time ms/step | CPU-time ratio"
    print(
        "| variant | ms/step | spread | mean ms/step | ratio vs baseline | callback ms/step | pass ms "
        f"| pass GB/s | achieved/floor | {last} |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for v in variants:
        meds = [r.step_median for r in v.runs]
        ratio = median([r.step_median / b.step_median for r, b in zip(v.runs, base.runs, strict=True)])
        spread = f"{min(meds) * 1e3:.1f}–{max(meds) * 1e3:.1f}"
        if v.key == "baseline":
            cb_ms = pass_ms = gbs = eff = None
        else:
            cb_ms = median([r.callback_per_step for r in v.runs]) * 1e3
            pass_s = median([r.pass_median for r in v.runs])
            pass_ms = pass_s * 1e3
            n_bytes = diagnostic_bytes(n_params, weight_bytes, grad_bytes, v.diagnostics)
            gbs = n_bytes / pass_s / 1e9 if pass_s == pass_s and pass_s > 0 else float("nan")
            eff = achieved_over_floor(pass_s, n_bytes, bw) * 100
        if cuda and base_peak is not None:
            extra_cols = [
                fmt((med_peak(v, "peak_bytes") - base_peak) / MiB, ".0f"),
                fmt((med_peak(v, "window_peak_bytes") - base_window) / MiB, ".0f"),
            ]
        elif cuda:
            extra_cols = ["—", "—"]
        else:
            cpu_ratio = median([r.cpu_step_median / b.cpu_step_median for r, b in zip(v.runs, base.runs, strict=True)])
            extra_cols = [f"{median([r.cpu_step_median for r in v.runs]) * 1e3:.1f}", f"{cpu_ratio:.3f}x"]
        print(
            f"| {v.label} | {median(meds) * 1e3:.1f} | {spread} | {median([r.step_mean for r in v.runs]) * 1e3:.1f} "
            f"| {ratio:.3f}x | {fmt(cb_ms, '.2f')} | {fmt(pass_ms, '.2f')} | {fmt(gbs, '.3g')} "
            f"| {fmt(eff, '.1f', ' %')} | {' | '.join(extra_cols)} |"
        )
    print()
    print(f"Copy bandwidth (median of per-round medians): {bw / 1e9:.1f} GB/s "
          f"(rounds: {', '.join(f'{b / 1e9:.1f}' for b in bandwidths)}).")  # fmt: skip
    floor_all = diagnostic_bytes(n_params, weight_bytes, grad_bytes) / bw
    print(
        f"Floor of the full diagnostic pass: {diagnostic_bytes(n_params, weight_bytes, grad_bytes) / n_params:.0f} B × "
        f"{n_params:,} params = {diagnostic_bytes(n_params, weight_bytes, grad_bytes) / MiB:.1f} MiB → "
        f"{floor_all * 1e3:.3f} ms at copy bandwidth."
    )
    for v in variants:
        pairs = [x for r in v.runs for x in r.in_run_ratios]
        if pairs:
            rounds = ", ".join(f"{median(r.in_run_ratios):.3f}" for r in v.runs if r.in_run_ratios)
            print(
                f"- {v.key}: in-run ratio {median(pairs):.3f}x (computed step over the mean of its two skipped "
                f"neighbours, median of {len(pairs)} triples; per round {rounds})"
            )
    for v in variants[1:]:
        keys = sorted({r.logged_keys for r in v.runs})
        computed = sorted({r.computed_steps for r in v.runs})
        print(f"- {v.key}: logged keys {keys}, computed steps per run {computed}")
    if cuda:
        print(
            f"Baseline peak allocated: {base_peak / MiB:.0f} MiB over the measured steps, {base_window / MiB:.0f} MiB "
            f"in the step windows (optimizer step and what follows); one fp32 copy of the parameters = "
            f"{n_params * weight_bytes / MiB:.0f} MiB."
        )
    print()
    if cuda:
        print("Per-round median ms/step (rounds in order):")
        for v in variants:
            print(f"- {v.key}: " + ", ".join(f"{r.step_median * 1e3:.1f}" for r in v.runs))
    else:
        print("Per-round median ms/step, wall (CPU time) (rounds in order):")
        for v in variants:
            print(
                f"- {v.key}: " + ", ".join(f"{r.step_median * 1e3:.1f} ({r.cpu_step_median * 1e3:.1f})" for r in v.runs)
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run (default 20; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="dropped steps at the start of every run (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--formats", nargs="+", default=["float8_e4m3fn", "float8_e5m2", "bfloat16"])
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated keys (see docstring); default baseline,naive,m1,m2,m3,every10,nosnap, plus m1ref on CUDA",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run of the harness")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--log-every-n-steps", type=int, default=1)
    parser.add_argument("--no-logger", action="store_true", help="Trainer(logger=False) instead of a null logger")
    parser.add_argument("--no-prewarm", action="store_true", help="skip the unrecorded warm-up run of every variant")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = args.repeats or (2 if args.quick else 5)

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningModule.*log.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    all_variants = build_variants(args.formats)
    if args.variants is None:
        args.variants = "baseline,naive,m1,m2,m3,every10,nosnap"
        if device.type == "cuda" and "m1ref" in all_variants:
            args.variants += ",m1ref"
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in all_variants]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(all_variants)}")
    keys = ["baseline"] + [k for k in keys if k != "baseline"]
    variants = [all_variants[k] for k in keys]

    workload = WORKLOADS["quick" if args.quick else device.type]
    torch.manual_seed(args.seed)
    model = TransformerLM(workload, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weight_bytes = next(model.parameters()).element_size()  # masters stay fp32 under bf16-mixed
    grad_bytes = weight_bytes

    print(f"# QuantizationMonitor overhead — {workload.name}")
    print()
    for line in header_lines(device):
        print(line)
    print(f"- lightning {pl.__version__}")
    print(f"- {workload.describe()}; {n_params:,} parameters")
    print(
        f"- {args.repeats} interleaved rounds × {len(variants)} variants, each run {args.warmup} warm-up + "
        f"{args.steps} measured steps; logger: {'none' if args.no_logger else 'null logger'}, "
        f"log_every_n_steps={args.log_every_n_steps}; formats {args.formats}"
    )
    print(f"- 1-min load average before: {load_average()}")
    print(flush=True)
    warn_if_loaded(device)

    def progress(tag: str, v: Variant, r: RunResult, seconds: float) -> None:
        print(
            f"  [{tag}] {v.key}: median {r.step_median * 1e3:.1f} ms/step, callback {r.callback_per_step * 1e3:.1f} "
            f"ms/step ({seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    if not args.no_prewarm:
        for v in variants:
            t = time.perf_counter()
            progress("warm-up", v, run_once(v, model, device, args), time.perf_counter() - t)
    bandwidths: list[float] = []
    t0 = time.perf_counter()
    for r in range(args.repeats):
        order = list(variants)
        random.Random(args.seed + r).shuffle(order)
        for v in order:
            t = time.perf_counter()
            v.runs.append(run_once(v, model, device, args))
            progress(f"round {r + 1}", v, v.runs[-1], time.perf_counter() - t)
        bandwidths.append(copy_bandwidth(n_params, device)[1])
        print(f"round {r + 1}/{args.repeats} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print()
    report(variants, n_params, weight_bytes, grad_bytes, bandwidths, device.type == "cuda")
    print()
    print(f"1-min load average after: {load_average()}")
    warn_if_loaded(device)


def warn_if_loaded(device: torch.device) -> None:
    """Other processes on the CPUs make wall-clock step times (and, on CPU, ratios) unreliable: say so."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(
            f"WARNING: 1-min load average {load:.2f} on {cpus} CPUs: other processes compete for the CPUs; "
            + (
                "read the CPU-time columns rather than wall-clock times."
                if device.type == "cpu"
                else "host-side launch and hook times may be inflated."
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
