"""QuantizationMonitor under 2-process DDP on CPU (gloo, ``ddp_spawn``), and on 2 GPUs (NCCL) where they are.

DDP replicas hold identical parameters and, after the all-reduce, identical gradients: every rank computes the same
numbers, so the monitor neither syncs nor counts the replicas twice. Each rank's probe pickles what it captured; the
test checks that the ranks saw the same tensors and that what rank 0 logged is the single-process numpy
recomputation on them, and that the checkpointed window holds one replica's counts, not two.
"""

from __future__ import annotations

import glob
import os
import pickle
import signal

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed
from callback_helpers import CollectiveCounter, Probe, TinyRegressor, assert_matches, csv_rows, reference
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy

from altgrad_lightning import QuantizationMonitor

FORMATS = ("float8_e4m3fn", "bfloat16")


class _Timeout:
    """Fail instead of hanging if the spawned run deadlocks."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def _raise(self, *_):
        raise TimeoutError(f"DDP run did not finish within {self.seconds} s (deadlock?)")

    def __enter__(self):
        self._old = signal.signal(signal.SIGALRM, self._raise)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self._old)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=TWO_GPUS)])
def test_ddp_spawn_two_processes_log_single_process_values(tmp_path, accelerator):
    """On 2 CPU processes (gloo; the C fast path) and, where 2 GPUs are, on 2 GPUs (NCCL; each rank's fast path
    compiles and launches its kernels on its own device)."""
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo" if accelerator == "cpu" else "nccl"),
        accelerator=accelerator,
        devices=2,
        max_steps=5,
        log_every_n_steps=2,  # logs at steps 1 and 3; step 4 is still pending in the final checkpoint
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[QuantizationMonitor(formats=FORMATS), Probe(save_dir=tmp_path), CollectiveCounter(tmp_path), ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with _Timeout(240):
        trainer.fit(TinyRegressor())

    captured = []
    for rank in (0, 1):
        with open(tmp_path / f"probe_rank{rank}.pkl", "rb") as fh:
            captured.append(pickle.load(fh))
    steps0, steps1 = captured[0]["steps"], captured[1]["steps"]
    assert len(steps0) == len(steps1) == 5
    # The replicas: the same weights, (all-reduced) gradients and updates on both ranks, bit for bit.
    for s0, s1 in zip(steps0, steps1, strict=True):
        for key in ("w", "g", "w_after"):
            assert all(np.array_equal(a, b) for a, b in zip(s0[key], s1[key], strict=True)), key

    # Replicas: the monitor calls no collective at all, at logging steps or elsewhere, on either rank.
    for rank in (0, 1):
        with open(tmp_path / f"collectives_rank{rank}.pkl", "rb") as fh:
            assert pickle.load(fh) == []

    rows = csv_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 3]
    for row, window in zip(rows, (steps0[0:2], steps0[2:4]), strict=True):
        assert_matches(row, reference(window, formats=FORMATS), what=row["step"])

    # The checkpoint (written by rank 0) holds the pending window of step 4 alone, with one replica's counts.
    (path,) = glob.glob(os.path.join(tmp_path, "ckpt", "last*.ckpt"))
    state = torch.load(path, weights_only=False)["callbacks"]
    (monitor_state,) = [v for k, v in state.items() if k.startswith("QuantizationMonitor")]
    n_params = sum(p.size for p in steps0[4]["w"])
    stiffness = monitor_state["metrics"]["stiffness|float8_e4m3fn|"]
    assert int(stiffness["n_total"]) == n_params
    assert int(monitor_state["metrics"]["ulp||"]["n_total"]) == n_params
