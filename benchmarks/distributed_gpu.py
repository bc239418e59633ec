"""``QuantizationMonitor`` under sharded training on 2 GPUs: logged values against one process, and what the
logging step's reduction costs (issue 6).

**Equality.** The same small deterministic model (``Linear(16, 32)``, ``LayerNorm``, ``Linear(32, 32)``,
``Linear(32, 1)``; float32, ``precision="32-true"``, AdamW, ``--steps`` steps, ``log_every_n_steps=1``, a
``CSVLogger``) is trained with ``QuantizationMonitor(formats=["float8_e4m3fn", "bfloat16"])`` under:

- ``single``: one process on one device (the reference; on CUDA the monitor takes its fused path);
- ``single_unfused``: the same with ``fused=False`` (CUDA only: where the reference path of the sharded runs and
  the fused path of ``single`` differ, this row says which);
- ``fsdp1``: Lightning ``FSDPStrategy`` (FSDP1), ``use_orig_params=False``, every ``nn.Linear`` its own unit
  (flat parameters; the 33 elements of ``Linear(32, 1)`` are padded to 2 x 17);
- ``fsdp1_orig``: the same with ``use_orig_params=True`` (the original parameters are 1-D views of the local
  shard: rank 0's views of the biases are empty, so is rank 1's of the LayerNorm weight);
- ``fsdp2``: ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) on every ``nn.Linear`` and the root in
  ``configure_model`` (rank 1 holds empty shards of ``Linear(32, 1)``);

each sharded run on 2 devices. Every rank sees the same batch at every step (``use_distributed_sampler=False``, a
fixed data set, no shuffling), so the averaged gradient is the single-process gradient bit for bit
(``(g + g) / 2 == g``), the weights follow the same trajectory, and every logged ``altgrad/...`` value must equal the
single-process run's up to the summation order of float64 sums (each rank sums its own elements, the all-reduce adds
the two). The script reads back each run's CSV (written by rank 0) and prints, per run: strategy, the monitor's
``_sharded`` decision, elements the monitor counts on each rank (their total must be the model's; FSDP1 padding is
left out), number of logged ``altgrad/`` keys and steps, max ``|difference|`` against ``single`` over all those keys
and steps, how many values differ by more than 1e-12, the max difference of the logged loss (the training itself),
and the median step time; then which parameters a rank holds an empty shard of. It exits with status 1 if a value
differs by more than 1e-9 (naming the first key and step), if keys or steps are missing, or if a run fails.

**Cost of the logging step.**

- Microbenchmark (``comm``), 2 processes (NCCL on CUDA, gloo on CPU): the metric states the callback builds for two
  formats and all diagnostics (``QuantizationMonitor._build_metrics``, filled by one update), and, after warm-up,
  ``--comm-iters`` timed calls of: ``all_reduce_sums`` (one packed float64 ``SUM`` and one packed ``MAX``
  all-reduce); the two bare all-reduces on already-packed tensors (the collective floor); one all-reduce per state
  tensor (what a per-state sync would cost); and the monitor's whole sharded logging step
  (``_compute_and_reset`` + ``_to_host``: reduction, statistics, reset, one device-to-host copy). Each call is
  timed on the host between two ``torch.cuda.synchronize()`` (wall) and, on CUDA, with CUDA events on the current
  stream; medians in microseconds, per rank. Bytes = packed float64 elements x 8.
- Training steps (``timing``): ``fsdp2`` (2 processes) with the monitor and ``log_every_n_steps=1`` against
  ``log_every_n_steps=1000`` (nothing logged; the monitor still accumulates every step), alternating in one pair of
  processes for ``--timing-rounds`` rounds of ``--timing-steps`` steps. Step time = time between consecutive
  ``on_train_batch_start`` (after a device synchronisation), the first 5 steps of each fit dropped; median per fit,
  then median over rounds (rank 0). The loss is not logged in these fits, so the difference is the monitor's
  logging step plus Lightning's handling of its keys. The monitor's ``on_train_batch_end`` and its
  ``_compute_and_reset`` are also timed (synchronised before and after), which splits that cost into the reduction
  and statistics, and ``_to_host`` + ``LightningModule.log_dict`` (Lightning's per-key ``self.log``).

**Design.** Run without ``--run`` / ``--comm`` / ``--timing``, the script is a driver: it starts one child process
``python3 benchmarks/distributed_gpu.py --run NAME --out DIR`` per run (Lightning's subprocess launcher then starts
the second rank by re-running that command line), one ``--timing`` child and one ``--comm`` child (which spawns its
2 ranks with ``torch.multiprocessing``). Each child has a timeout (``--timeout``, default 240 s; its process group is
killed) and its output goes to ``DIR/NAME/{stdout,stderr}.txt``; the tail of stderr is printed when it fails.
Children run with ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (reproducible cuBLAS).

Usage::

    python3 benchmarks/distributed_gpu.py                    # 2 CUDA GPUs: single, single_unfused, fsdp1, fsdp1_orig,
                                                             # fsdp2, timing, comm
    python3 benchmarks/distributed_gpu.py --accelerator cpu  # smoke test: single, fsdp2 (gloo), timing, comm (gloo)
        [--runs single,fsdp2,...] [--steps 12] [--no-timing] [--no-comm] [--comm-iters 200]
        [--timing-steps 40] [--timing-rounds 2] [--timeout 240] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
from torch import nn

try:
    from _common import ensure_importable, header_lines, median, synchronize
except ModuleNotFoundError:  # imported as benchmarks.distributed_gpu
    from benchmarks._common import ensure_importable, header_lines, median, synchronize

ensure_importable()

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from altgrad_lightning import QuantizationMonitor  # noqa: E402

FORMATS = ("float8_e4m3fn", "bfloat16")
PREFIX = "altgrad"
FAIL_ABOVE = 1e-9  # exit status 1 above this
REPORT_ABOVE = 1e-12  # counted in the table
TIMING_WARMUP = 5  # steps dropped at the start of every timed fit
BATCH, IN_FEATURES, HIDDEN = 32, 16, 32
RUNS = {
    "single": "single process, 1 device",
    "single_unfused": "single process, 1 device, fused=False",
    "fsdp1": "FSDPStrategy (FSDP1), use_orig_params=False",
    "fsdp1_orig": "FSDPStrategy (FSDP1), use_orig_params=True",
    "fsdp2": "ModelParallelStrategy + fully_shard (FSDP2)",
}
REFERENCE = "single"
CPU_RUNS = ("single", "fsdp2")  # Lightning refuses FSDPStrategy on CPU; the fused path is CUDA only


# --- the model -------------------------------------------------------------------------------------------------------
class Regressor(pl.LightningModule):
    """16 -> 32 (LayerNorm, tanh) -> 32 (tanh) -> 1 regression, 1697 parameters, the same initial weights in every
    process (seeded here). ``shard="fsdp2"`` applies ``fully_shard`` to every ``nn.Linear`` and the root in
    ``configure_model`` (``Linear(32, 1)``: weight (1, 32), bias (1,), so rank 1 of 2 holds empty shards)."""

    def __init__(self, shard: str = "none", log_loss: bool = True, lr: float = 3e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(IN_FEATURES, HIDDEN),
            nn.LayerNorm(HIDDEN),
            nn.Tanh(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.Tanh(),
            nn.Linear(HIDDEN, 1),
        )
        self.shard = shard
        self.log_loss = log_loss
        self.lr = lr

    def configure_model(self) -> None:
        if self.shard != "fsdp2":
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.log_loss:
            self.log("loss", loss, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def make_loader(steps: int) -> torch.utils.data.DataLoader:
    """``steps`` batches of a fixed data set, in order: every rank sees the same batch (no distributed sampler)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * BATCH, IN_FEATURES, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.1 * torch.randn(steps * BATCH, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


class StepTimer(pl.Callback):
    """Clock at every ``on_train_batch_start``, after a device synchronisation; with :meth:`instrument`, also the
    time of the monitor's ``on_train_batch_end`` and of its ``_compute_and_reset`` inside it (synchronised)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.starts: list[float] = []
        self.hooks: dict[str, list[float]] = {"batch_end": [], "compute": []}

    def instrument(self, monitor: QuantizationMonitor) -> None:
        device = torch.device(self.device_type)

        def timed(fn: Any, bucket: str) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                synchronize(device)
                t0 = time.perf_counter()
                result = fn(*args, **kwargs)
                synchronize(device)
                self.hooks[bucket].append(time.perf_counter() - t0)
                return result

            return wrapper

        # Instance attributes: Lightning looks hooks up with getattr, the monitor calls self._compute_and_reset().
        monitor.on_train_batch_end = timed(monitor.on_train_batch_end, "batch_end")  # type: ignore[method-assign]
        monitor._compute_and_reset = timed(monitor._compute_and_reset, "compute")  # type: ignore[method-assign]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        synchronize(torch.device(self.device_type))
        self.starts.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


def make_strategy(name: str, accelerator: str) -> Any:
    if name in ("single", "single_unfused"):
        return "auto"
    if name in ("fsdp1", "fsdp1_orig"):
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(auto_wrap_policy={nn.Linear}, use_orig_params=name == "fsdp1_orig")
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        backend = "gloo" if accelerator == "cpu" else None
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend=backend)
    raise ValueError(f"unknown run {name!r}")


def fit(
    name: str,
    accelerator: str,
    steps: int,
    out: str,
    log_every_n_steps: int = 1,
    log_loss: bool = True,
    instrument: bool = False,
) -> tuple[pl.Trainer, QuantizationMonitor, StepTimer]:
    monitor = QuantizationMonitor(formats=list(FORMATS), fused=name != "single_unfused")
    timer = StepTimer("cuda" if accelerator == "cuda" else "cpu")
    if instrument:
        timer.instrument(monitor)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1 if name.startswith("single") else 2,
        strategy=make_strategy(name, accelerator),
        precision="32-true",
        max_steps=steps,
        max_epochs=1,
        log_every_n_steps=log_every_n_steps,
        logger=CSVLogger(out, name="csv", version=0),
        callbacks=[timer, monitor],
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Regressor(shard="fsdp2" if name == "fsdp2" else "none", log_loss=log_loss), make_loader(steps))
    return trainer, monitor, timer


def counted_elements(monitor: QuantizationMonitor) -> dict[str, Any]:
    """What this rank's monitor counts of the selected parameters: elements, padding it leaves out (FSDP1 flat
    shards), and the parameters of which it counts nothing here (empty shards, or replicas counted elsewhere)."""
    from torch.distributed.tensor import DTensor

    counted = padded = 0
    empty: list[str] = []
    for params in monitor._selected.values():
        for name, p in params:
            if not monitor._sharded:
                counted += p.numel()
                continue
            view = monitor._local.get(id(p))
            n = 0 if view is None else view(p.detach()).numel()
            local = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
            counted += n
            padded += local - n if view is not None else 0
            if n == 0:
                empty.append(name)
    return {"counted": counted, "padded": padded, "empty": empty}


def quiet() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*float32_matmul_precision.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --- children --------------------------------------------------------------------------------------------------------
def child_run(args: argparse.Namespace) -> None:
    """One strategy's fit; each rank writes ``rank{r}.json`` to ``args.out``, rank 0 the CSV."""
    quiet()
    trainer, monitor, timer = fit(args.run, args.accelerator, args.steps, args.out)
    module = trainer.lightning_module
    info = {
        "run": args.run,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "device": str(module.device),
        "sharded": monitor._sharded,
        "fused_steps": monitor._fused_steps,
        "optimizer_params": sum(len(ps) for ps in monitor._selected.values()),
        "step_seconds": timer.step_seconds(),
        **counted_elements(monitor),
    }
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(info, fh)


def child_timing(args: argparse.Namespace) -> None:
    """``fsdp2`` with log_every_n_steps 1 and 1000, alternating, in the same 2 processes (after the first fit the
    launcher's environment variables are set, so the later Trainers reuse the processes and the process group)."""
    quiet()
    results: dict[str, dict[str, list[float]]] = {
        e: {"step": [], "batch_end": [], "compute": []} for e in ("1", "1000")
    }
    rank = 0
    for r in range(args.timing_rounds):
        order = ("1", "1000") if r % 2 == 0 else ("1000", "1")
        for every in order:
            out = os.path.join(args.out, f"round{r}_every{every}")
            trainer, _, timer = fit(
                "fsdp2", args.accelerator, args.timing_steps, out, int(every), log_loss=False, instrument=True
            )
            rank = trainer.global_rank
            results[every]["step"].append(median(timer.step_seconds()[TIMING_WARMUP:]))
            for bucket, times in timer.hooks.items():
                results[every][bucket].append(median(times[TIMING_WARMUP:]))
    if rank == 0:
        with open(os.path.join(args.out, "timing.json"), "w") as fh:
            json.dump(results, fh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_comm(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_comm_worker, args=(_free_port(), args), nprocs=2, join=True, start_method="spawn")


def _comm_worker(rank: int, port: int, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from altgrad_lightning.callbacks.quantization_monitor import _to_host
    from altgrad_lightning.metrics._base import all_reduce_sums

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    cuda = args.accelerator == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    if cuda:
        dist.init_process_group("nccl", rank=rank, world_size=2, device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        monitor = QuantizationMonitor(formats=list(FORMATS))
        monitor._build_metrics([], device)
        monitor._sharded = True
        monitor._hist_buckets = 33  # float32 weights: what on_fit_start sets
        g = torch.Generator().manual_seed(rank)
        w = (torch.randn(4096, generator=g) * 0.1).to(device)
        grad = (torch.randn(4096, generator=g) * 1e-3).to(device)
        after = w - 1e-3 * torch.sign(grad)

        def fill() -> None:
            for key, m in monitor._metrics.items():
                family = key.split("|")[0]
                b = grad if family == "stiffness" else (w if family == "grid" else after)
                m.accumulate(m.sums_of(w, b))

        fill()
        sums = [m.sums() for m in monitor._metrics.values()]
        states = [(name, v) for s in sums for name, v in s.items()]
        n_sum = sum(v.numel() for name, v in states if not name.endswith("_max"))
        n_max = sum(v.numel() for name, v in states if name.endswith("_max"))
        packed_sum = torch.zeros(n_sum, dtype=torch.float64, device=device)
        packed_max = torch.zeros(n_max, dtype=torch.float64, device=device)
        per_state = [v.detach().clone().to(torch.float64) for _, v in states]

        def bare() -> None:
            dist.all_reduce(packed_sum)
            if n_max:
                dist.all_reduce(packed_max, op=dist.ReduceOp.MAX)

        def each_state() -> None:
            for name, t in zip((n for n, _ in states), per_state, strict=True):
                dist.all_reduce(t, op=dist.ReduceOp.MAX if name.endswith("_max") else dist.ReduceOp.SUM)

        def logging_step() -> None:
            _to_host(monitor._compute_and_reset())

        # label -> (timed call, untimed preparation before each call)
        cases = {
            "all_reduce_sums": (lambda: all_reduce_sums(sums), None),
            "bare packed all-reduces": (bare, None),
            "one all-reduce per state": (each_state, None),
            "_compute_and_reset + _to_host": (logging_step, fill),  # refill what the previous call reset
        }
        collectives = {
            "all_reduce_sums": 1 + (n_max > 0),
            "bare packed all-reduces": 1 + (n_max > 0),
            "one all-reduce per state": len(states),
            "_compute_and_reset + _to_host": 1 + (n_max > 0),
        }
        results: dict[str, Any] = {}
        for label, (fn, prepare) in cases.items():
            for _ in range(args.comm_warmup):
                if prepare is not None:
                    prepare()
                fn()
            dist.barrier()
            synchronize(device)
            wall, events = [], []
            for _ in range(args.comm_iters):
                if prepare is not None:
                    prepare()
                synchronize(device)
                t0 = time.perf_counter()
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                fn()
                if cuda:
                    end.record()
                    events.append((start, end))
                synchronize(device)
                wall.append(time.perf_counter() - t0)
            gpu = [s.elapsed_time(e) * 1e3 for s, e in events]  # ms -> us
            results[label] = {
                "wall_us": median(wall) * 1e6,
                "gpu_us": median(gpu) if gpu else None,
                "collectives": collectives[label],
            }
        gathered: list[Any] = [None, None]
        dist.all_gather_object(gathered, results)
        if rank == 0:
            info = {
                "backend": dist.get_backend(),
                "metrics": len(monitor._metrics),
                "state_tensors": len(states),
                "sum_elements": n_sum,
                "max_elements": n_max,
                "iters": args.comm_iters,
                "ranks": gathered,
            }
            with open(os.path.join(args.out, "comm.json"), "w") as fh:
                json.dump(info, fh)
    finally:
        dist.destroy_process_group()


# --- driver ----------------------------------------------------------------------------------------------------------
def launch(name: str, extra: list[str], out: str, timeout: int, cpu: bool) -> bool:
    """Run this script as a child with ``extra`` arguments; False (and the tail of its stderr) if it fails."""
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONUNBUFFERED="1")
    if cpu:
        # One intra-op thread in every process: a CPU matmul's result depends on its thread count, and Lightning
        # gives each of 2 ranks cpu_count // 2 threads (1 here), so the single process must use as many.
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), *extra, "--out", out]
    t0 = time.perf_counter()
    with open(os.path.join(out, "stdout.txt"), "w") as so, open(os.path.join(out, "stderr.txt"), "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and the rank it launched (same session)
            proc.wait()
            rc = f"timeout after {timeout} s"
    print(f"  {name}: rc {rc} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if rc == 0:
        return True
    with open(os.path.join(out, "stderr.txt"), errors="replace") as fh:
        tail = fh.read()[-4000:]
    print(f"\n!! {name} failed: rc {rc}; command: {' '.join(cmd)}\n--- stderr tail ---\n{tail}\n---", flush=True)
    return False


def read_csv(out: str) -> dict[int, dict[str, float]]:
    """step -> {key: value} of the non-empty cells of the run's metrics.csv."""
    (path,) = glob.glob(os.path.join(out, "csv", "*", "metrics.csv"))
    rows: dict[int, dict[str, float]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            values = {k: float(v) for k, v in row.items() if v not in ("", None)}
            rows.setdefault(int(values.pop("step")), {}).update(values)
    return rows


def compare(ref: dict[int, dict[str, float]], got: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Max |difference| and counts over every monitor key and step of ``ref``; missing keys/steps are failures."""
    max_diff, above, loss_diff = 0.0, 0, 0.0
    first_failure: str | None = None
    problems: list[str] = []
    if sorted(ref) != sorted(got):
        problems.append(f"steps differ: reference {sorted(ref)}, run {sorted(got)}")
    for step in sorted(ref):
        row = got.get(step, {})
        keys = sorted(k for k in ref[step] if k.startswith(PREFIX + "/"))
        extra = sorted(k for k in row if k.startswith(PREFIX + "/") and k not in ref[step])
        if extra:
            problems.append(f"step {step}: keys not in the reference: {extra[:5]}")
        for key in keys:
            a, b = ref[step][key], row.get(key)
            if b is None:
                problems.append(f"step {step}: {key} missing")
                continue
            d = 0.0 if (math.isnan(a) and math.isnan(b)) or a == b else abs(a - b)
            d = math.inf if math.isnan(d) else d
            max_diff = max(max_diff, d)
            above += d > REPORT_ABOVE
            if d > FAIL_ABOVE and first_failure is None:
                first_failure = f"step {step}: {key} = {b!r}, reference {a!r} (|diff| {d:.3g})"
        if "loss" in ref[step] and "loss" in row:
            loss_diff = max(loss_diff, abs(ref[step]["loss"] - row["loss"]))
    return {"max": max_diff, "above": above, "loss": loss_diff, "first": first_failure, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", choices=["cuda", "gpu", "cpu"], default="cuda")
    parser.add_argument("--runs", default=None, help=f"comma-separated, of {list(RUNS)} (default: all that apply)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each equality run")
    parser.add_argument("--timing-steps", type=int, default=40, help="steps of each timed fit")
    parser.add_argument("--timing-rounds", type=int, default=2, help="rounds of (log every step, every 1000 steps)")
    parser.add_argument("--comm-iters", type=int, default=200)
    parser.add_argument("--comm-warmup", type=int, default=20)
    parser.add_argument("--no-timing", action="store_true", help="skip the step-time comparison")
    parser.add_argument("--no-comm", action="store_true", help="skip the all-reduce microbenchmark")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per child process")
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one, removed)")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # child: one equality run
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)  # child: step times
    parser.add_argument("--comm", action="store_true", help=argparse.SUPPRESS)  # child: microbenchmark
    args = parser.parse_args(argv)
    args.accelerator = "cuda" if args.accelerator == "gpu" else args.accelerator

    if args.run or args.timing or args.comm:
        if args.out is None:
            parser.error("children need --out")
        if args.run:
            child_run(args)
        elif args.timing:
            child_timing(args)
        else:
            child_comm(args)
        return 0

    cuda = args.accelerator == "cuda"
    if cuda and torch.cuda.device_count() < 2:
        parser.error(f"--accelerator cuda needs 2 GPUs, found {torch.cuda.device_count()} (use --accelerator cpu)")
    runs = list(RUNS) if cuda else list(CPU_RUNS)
    if args.runs:
        runs = [r.strip() for r in args.runs.split(",") if r.strip()]
        unknown = [r for r in runs if r not in RUNS]
        if unknown:
            parser.error(f"unknown runs {unknown}; known: {list(RUNS)}")
    if REFERENCE not in runs:
        runs.insert(0, REFERENCE)
    keep = args.out is not None
    root = os.path.abspath(args.out) if keep else tempfile.mkdtemp(prefix="altgrad_dist_")

    print("# QuantizationMonitor under sharded training, 2 ranks (issue 6)")
    print()
    for line in header_lines(torch.device("cuda", 0) if cuda else torch.device("cpu")):
        print(line)
    print(f"- lightning {pl.__version__}; formats {list(FORMATS)}; {args.steps} steps per equality run")
    if not cuda:
        print("- child processes run with OMP_NUM_THREADS=1 (as Lightning gives each of 2 ranks on 2 CPUs)")
    print(f"- output: {root}{'' if keep else ' (temporary, removed at the end)'}")
    print(flush=True)

    ok = True
    t_start = time.perf_counter()
    common = ["--accelerator", args.accelerator, "--steps", str(args.steps)]

    def child(name: str, flags: list[str]) -> bool:
        return launch(name, [*flags, *common], os.path.join(root, name), args.timeout, not cuda)

    done = {r for r in runs if child(r, ["--run", r])}
    ok &= len(done) == len(runs)
    timing_flags = ["--timing", "--timing-steps", str(args.timing_steps), "--timing-rounds", str(args.timing_rounds)]
    timing_ok = not args.no_timing and child("timing", timing_flags)
    ok &= args.no_timing or timing_ok
    comm_ok = not args.no_comm and child(
        "comm", ["--comm", "--comm-iters", str(args.comm_iters), "--comm-warmup", str(args.comm_warmup)]
    )
    ok &= args.no_comm or comm_ok

    # --- equality table ---
    print()
    print(f"## Logged values against `{REFERENCE}` ({args.accelerator})")
    print()
    print(
        "| run | strategy | ranks | sharded | counted elements (per rank) | keys | steps | max abs diff "
        f"| # > {REPORT_ABOVE:g} | loss max diff | median ms/step |"
    )
    print("|---|---|--:|---|---|--:|--:|--:|--:|--:|--:|")
    ref_rows = read_csv(os.path.join(root, REFERENCE)) if REFERENCE in done else None
    failures: list[str] = []
    notes: list[str] = []
    for r in runs:
        if r not in done:
            print(f"| {r} | {RUNS[r]} | FAILED | | | | | | | | |")
            continue
        out = os.path.join(root, r)
        infos = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "rank*.json")))]
        rows = read_csv(out)
        n_keys = len({k for row in rows.values() for k in row if k.startswith(PREFIX + "/")})
        counted = " + ".join(str(i["counted"]) for i in infos)
        if len(infos) > 1:
            counted += f" = {sum(i['counted'] for i in infos)}"
        padded = sum(i["padded"] for i in infos)
        counted += f", {padded} padding left out" if padded else ""
        for i in infos:
            if i["empty"]:
                notes.append(f"- {r}, rank {i['rank']}: empty shard (nothing counted) of {', '.join(i['empty'])}")
        step_ms = median(infos[0]["step_seconds"][1:]) * 1e3
        if ref_rows is None:
            cmp = {"max": math.nan, "above": "—", "loss": math.nan, "first": None, "problems": []}
        else:
            cmp = compare(ref_rows, rows)
        print(
            f"| {r} | {RUNS[r]} | {infos[0]['world_size']} | {infos[0]['sharded']} | {counted} | {n_keys} "
            f"| {len(rows)} | {cmp['max']:.3g} | {cmp['above']} | {cmp['loss']:.3g} | {step_ms:.1f} |"
        )
        if cmp["first"]:
            failures.append(f"{r}: first difference above {FAIL_ABOVE:g}: {cmp['first']}")
        failures += [f"{r}: {p}" for p in cmp["problems"][:10]]
        if infos[0]["fused_steps"]:
            notes.append(f"- {r}: the monitor took its fused path on {infos[0]['fused_steps']} optimizer steps")
    total = sum(p.numel() for p in Regressor().parameters())
    print()
    print(f"The model has {total} parameters; a sharded run must count each exactly once (sum over ranks).")
    if notes:
        print("\n".join(notes))
    if REFERENCE not in done:
        failures.append(f"the reference run {REFERENCE} failed: nothing to compare against")
    for line in failures:
        print(f"FAIL {line}")
    ok &= not failures

    # --- timing ---
    if timing_ok:
        t = json.load(open(os.path.join(root, "timing", "timing.json")))
        every1, every1000 = median(t["1"]["step"]), median(t["1000"]["step"])
        end1, compute1 = median(t["1"]["batch_end"]), median(t["1"]["compute"])
        print()
        print(f"## fsdp2 step time, log_every_n_steps=1 against 1000 ({args.accelerator}, 2 ranks, rank 0)")
        print()
        print(f"- log_every_n_steps=1: {every1 * 1e3:.3f} ms/step (per round: {_ms(t['1']['step'])})")
        print(f"- log_every_n_steps=1000: {every1000 * 1e3:.3f} ms/step (per round: {_ms(t['1000']['step'])})")
        print(
            f"- difference: {(every1 - every1000) * 1e6:.0f} us per step = the cost of one logging step "
            f"({args.timing_steps} steps per fit, first {TIMING_WARMUP} dropped, median per fit, median over "
            f"{args.timing_rounds} rounds)"
        )
        print(
            f"- inside it, the monitor's on_train_batch_end: {end1 * 1e6:.0f} us, of which _compute_and_reset "
            f"(the 2 all-reduces and the statistics) {compute1 * 1e6:.0f} us; the rest is _to_host and "
            f"LightningModule.log_dict of the keys (with log_every_n_steps=1000: on_train_batch_end "
            f"{median(t['1000']['batch_end']) * 1e6:.0f} us)"
        )

    # --- communication ---
    if comm_ok:
        c = json.load(open(os.path.join(root, "comm", "comm.json")))
        print()
        print(f"## Reduction of the monitor's states at a logging step ({c['backend']}, 2 ranks)")
        print()
        print(
            f"{c['metrics']} metrics ({len(FORMATS)} formats, all diagnostics), {c['state_tensors']} state tensors: "
            f"SUM part {c['sum_elements']} float64 = {c['sum_elements'] * 8} B, MAX part {c['max_elements']} "
            f"float64 = {c['max_elements'] * 8} B; median of {c['iters']} calls after warm-up."
        )
        print()
        print("| operation | collectives | rank 0 wall us | rank 1 wall us | rank 0 GPU us | rank 1 GPU us |")
        print("|---|--:|--:|--:|--:|--:|")
        r0, r1 = c["ranks"]
        for label, v in r0.items():
            w = r1[label]
            print(
                f"| {label} | {v['collectives']} | {v['wall_us']:.1f} | {w['wall_us']:.1f} "
                f"| {_us(v['gpu_us'])} | {_us(w['gpu_us'])} |"
            )
    print()
    print(f"Total {time.perf_counter() - t_start:.0f} s. {'OK' if ok else 'FAILED'}")
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


def _ms(xs: list[float]) -> str:
    return ", ".join(f"{x * 1e3:.3f}" for x in xs)


def _us(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    sys.exit(main())
