"""QuantizationMonitor with sharded parameters, on 2 CPU processes (gloo).

FSDP2 (``fully_shard``, DTensor parameters) runs under Lightning's ``ModelParallelStrategy`` on CPU: each rank
counts the elements of its own shards and the monitor reduces all its sums at a logging step with one packed SUM
and one packed MAX all-reduce. A probe captures the whole tensors (``full_tensor()``) and what rank 0 logged must be
the single-process numpy recomputation on them. FSDP1 (``FSDPStrategy``) is refused on CPU by Lightning 2.6
("The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`"): its flat shards are not run
here; the packed reduction itself is also tested on hand-made shards.
"""

from __future__ import annotations

import glob
import os
import pickle
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from callback_helpers import (
    NP_FORMATS,
    CollectiveCounter,
    FullTensorProbe,
    ShardedRegressor,
    _grid,
    assert_matches,
    csv_rows,
    distributed_env,
    finish_distributed,
    free_port,
    fsdp2_cpu_trainer,
    join_processes,
    reference,
)
from lightning.pytorch.loggers import CSVLogger

from altgrad_lightning import QuantizationMonitor, WeightQuantizer
from altgrad_lightning.metrics import GradientStiffness, GridAlignment, UlpMovement
from altgrad_lightning.metrics._base import all_reduce_sums

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

FORMATS = ("float8_e4m3fn", "bfloat16")
MX_FORMATS = ("float8_e4m3fn", "float4_e2m1fn")
TIMEOUT_S = 120


def _fsdp2_worker(rank: int, port: int, tmp_path: str) -> None:

    distributed_env(rank, port)
    torch.manual_seed(0)
    monitors = [
        QuantizationMonitor(formats=FORMATS, per_parameter=True),
        QuantizationMonitor(formats=FORMATS, include=r"^net\.2\.", prefix="last"),  # rank 1 owns no element
        QuantizationMonitor(formats=FORMATS, include="no_such_parameter", prefix="none"),
        QuantizationMonitor(formats=FORMATS, scaling="amax", prefix="amax"),
    ]
    trainer = fsdp2_cpu_trainer(
        tmp_path, [*monitors, FullTensorProbe(save_dir=tmp_path), CollectiveCounter(save_dir=tmp_path)]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ShardedRegressor())
    shards = {n: tuple(p.to_local().shape) for n, p in trainer.lightning_module.named_parameters()}
    with open(os.path.join(tmp_path, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(
            {
                "warnings": [str(w.message) for w in caught if "QuantizationMonitor" in str(w.message)],
                "sharded": [m._sharded for m in monitors],
                "fused_steps": [m._fused_steps for m in monitors],
                "shards": shards,
            },
            fh,
        )
    finish_distributed()


def test_fsdp2_two_cpu_processes_log_the_global_values(tmp_path):
    context = mp.start_processes(_fsdp2_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    join_processes(context, TIMEOUT_S)

    info = [pickle.load(open(tmp_path / f"rank{r}.pkl", "rb")) for r in (0, 1)]
    assert info[0]["sharded"] == info[1]["sharded"] == [True] * 4
    assert info[0]["fused_steps"] == [0] * 4
    # The layout the test relies on: rank 1 holds empty shards of net.2.
    assert info[0]["shards"]["net.2.weight"] == (1, 12) and info[1]["shards"]["net.2.weight"] == (0, 12)
    assert info[0]["shards"]["net.0.weight"] == info[1]["shards"]["net.0.weight"] == (6, 6)
    # The selection that matches nothing warns once, on rank 0 only.
    assert sum("no_such_parameter" in w for w in info[0]["warnings"]) == 1
    assert not any("no_such_parameter" in w for w in info[1]["warnings"])

    steps = pickle.load(open(tmp_path / "probe_rank0.pkl", "rb"))["steps"]
    steps1 = pickle.load(open(tmp_path / "probe_rank1.pkl", "rb"))["steps"]
    assert len(steps) == len(steps1) == 4
    for s0, s1 in zip(steps, steps1, strict=True):  # full tensors: the same on both ranks
        assert all(np.array_equal(a, b) for a, b in zip(s0["w"], s1["w"], strict=True))
    assert sum(a.size for a in steps[0]["w"]) == 97

    rows = csv_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 3]
    for row, window in zip(rows, (steps[0:2], steps[2:4]), strict=True):
        assert_matches(row, reference(window, formats=FORMATS), what=row["step"])
        last = [{**s, **{k: s[k][2:] for k in ("w", "g", "dtype", "w_after", "g_post")}} for s in window]
        assert_matches(row, reference(last, formats=FORMATS, prefix="last"), what=("last", row["step"]))
        for i, name in enumerate(window[0]["names"]):
            one = [{**s, **{k: s[k][i : i + 1] for k in ("w", "g", "dtype", "w_after", "g_post")}} for s in window]
            ref = {f"{k}/{name}": v for k, v in reference(one, formats=FORMATS).items()}
            assert_matches(row, ref, what=(name, row["step"]))
        assert row["none/float8_e4m3fn/grad_below_stiffness_frac"] == 0.0
        assert row["none/ulp_mean"] == 0.0
        assert_matches(row, _amax_reference(window), what=("amax", row["step"]))

    # Two collectives (one SUM, one MAX) per monitor and logging step, on both ranks, and one MAX of the shards'
    # amaxes per step for the amax monitor; nothing else.
    for r in (0, 1):
        calls = pickle.load(open(tmp_path / f"collectives_rank{r}.pkl", "rb"))
        assert all(name == "all_reduce" for _, name, _ in calls), calls
        by_step = {}
        for step, _, op in calls:
            by_step.setdefault(step, []).append(op)
        assert sorted(by_step) == [0, 1, 2, 3, 4], calls  # global_step has advanced when on_train_batch_end runs
        for step, ops in by_step.items():  # the amax MAX runs before global_step advances, the logging after
            sums = 4 if step in (2, 4) else 0
            maxes = sums + (step < 4)
            assert sum("SUM" in op for op in ops) == sums and sum("MAX" in op for op in ops) == maxes, (step, ops)


def _round64(x: np.ndarray, name: str) -> np.ndarray:
    """Saturating nearest rounding of float64 values (``w / scale`` need not be a float32) onto the format's grid,
    by enumerating it; ties (which random data does not produce) are refused rather than guessed."""
    grid = _grid(name)
    x = np.clip(x, grid[0], grid[-1])
    hi = np.clip(np.searchsorted(grid, x), 1, grid.size - 1)
    below, above = grid[hi - 1], grid[hi]
    assert not np.any(x - below == above - x), "a tie: this reference does not round ties"
    return np.where(x - below < above - x, below, above)


def _amax_reference(window, keep=None) -> dict[str, float]:
    """The ``amax``-scaled fractions of a window of the probe's (whole-tensor) steps: per parameter and step,
    ``scale = amax(|w|) / max`` in float32 (as the monitor computes it for float32 weights), grids ``scale * F``;
    each parameter's largest weight is then on the grid (``scale * max`` rounds back to it in float32). With
    ``keep`` (parameter name -> boolean array of its shape) only the marked elements count; the scales stay those
    of the whole tensors."""
    from callback_helpers import stiffness_ref

    out = {}
    for name in FORMATS:
        fmt_max = np.float32(ml_dtypes.finfo(NP_FORMATS[name]).max)
        w_all, g_all, x_all, b_all, a_all = [], [], [], [], []
        for step in window:
            for pname, w, g, before, after in zip(
                step["names"], step["w"], step["g"], step["dtype"], step["w_after"], strict=True
            ):
                x = np.float64(np.float32(np.abs(before).max()) / fmt_max)
                mask = np.ones(w.size, bool) if keep is None else keep[pname].ravel()
                w_all.append(w.ravel()[mask])
                g_all.append(g.ravel()[mask])
                x_all.append(np.full(int(mask.sum()), x))
                b_all.append(before.astype(np.float64).ravel()[mask])
                a_all.append(after.astype(np.float64).ravel()[mask])
        w, g, x, b, a = (np.concatenate(v) for v in (w_all, g_all, x_all, b_all, a_all))
        valid = w != 0
        q = (x * _round64(w / x, name)).astype(np.float32)  # quantize returns the weights' dtype
        qb, qa = _round64(b / x, name), _round64(a / x, name)
        updated = a != b
        expected = {
            "grad_below_stiffness_frac": np.mean(np.abs(g[valid]) < (x * stiffness_ref(w / x, name))[valid]),
            "on_grid_frac": np.mean(q == w),
            "overflow_frac": np.mean(np.abs(w / x) > fmt_max),
            "underflow_frac": np.mean((q == 0) & (w != 0)),
            "flip_frac": np.mean(qa != qb),
            "update_stall_frac": np.mean(qa[updated] == qb[updated]),
            "updated_frac": np.mean(updated),
        }
        out.update({f"amax/{name}/{k}": float(v) for k, v in expected.items()})
    return out


# --- MX block scaling on shards ---------------------------------------------------------------------------------------


def _mx_worker(rank: int, port: int, tmp_path: str) -> None:
    distributed_env(rank, port)
    torch.manual_seed(0)
    monitor = QuantizationMonitor(formats=MX_FORMATS, scaling="mx", block_size=4, per_parameter=True)
    trainer = fsdp2_cpu_trainer(tmp_path, [monitor, FullTensorProbe(save_dir=tmp_path)])
    trainer.fit(ShardedRegressor())
    finish_distributed()


def test_fsdp2_mx_scaling_logs_the_whole_tensor_recomputation(tmp_path):
    """scaling="mx" (block 4) on FSDP2 shards: rows of a weight stay whole on one rank, while ``net.0.bias`` (12
    elements, 6 per rank) is cut in the middle of its second block, whose scale then comes from both ranks (one MAX
    all-reduce). Every logged fraction and the fit's per-block counts equal the numpy recomputation on the whole
    tensors."""
    from test_mx import mx_block_counts, mx_window_expected

    context = mp.start_processes(_mx_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    join_processes(context, TIMEOUT_S)
    steps = pickle.load(open(tmp_path / "probe_rank0.pkl", "rb"))["steps"]
    rows = csv_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 3]
    for row, window in zip(rows, (steps[0:2], steps[2:4]), strict=True):
        for name in MX_FORMATS:
            for stat, value in mx_window_expected(window, name, 4).items():
                assert row[f"altgrad/{name}/{stat}"] == pytest.approx(value, abs=1e-12), (row["step"], name, stat)
    (path,) = glob.glob(os.path.join(tmp_path, "csv", "*", "mx_block_stalls.pt"))
    stalls = torch.load(path, weights_only=True)["stalls"]
    for name in MX_FORMATS:
        expected = mx_block_counts(steps, name, 4)
        assert sorted(stalls[name]) == sorted(expected)
        for pname, counts in expected.items():
            np.testing.assert_array_equal(stalls[name][pname].numpy(), counts, err_msg=f"{name} {pname}")


# --- a sample of the shards ------------------------------------------------------------------------------------------


def _sampled_worker(rank: int, port: int, tmp_path: str) -> None:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    distributed_env(rank, port)
    torch.manual_seed(0)
    monitor = QuantizationMonitor(formats=FORMATS, sample_fraction=0.5, sample_seed=1)
    trainer = fsdp2_cpu_trainer(tmp_path, [monitor, FullTensorProbe(save_dir=tmp_path)])
    trainer.fit(ShardedRegressor())
    picks = {}  # parameter -> this rank's sampled elements as flat indices into the whole tensor
    for name, p in trainer.lightning_module.named_parameters():
        idx = monitor._samples.get(id(p))
        if idx is None:
            continue
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        inner = int(np.prod(p.shape[1:])) if p.dim() > 1 else 1
        picks[name] = offset[0] * inner + idx.cpu().numpy().astype(np.int64)
    with open(os.path.join(tmp_path, f"picks{rank}.pkl"), "wb") as fh:
        pickle.dump(picks, fh)
    finish_distributed()


def test_fsdp2_sampled_shards_log_the_recomputation_on_the_union_of_the_samples(tmp_path):
    """sample_fraction on FSDP2: each rank samples its own shard (its own seed), and the logged values are the
    numpy recomputation on the union of both ranks' sampled elements of the whole tensors."""
    from test_sampling import _subset

    context = mp.start_processes(_sampled_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    join_processes(context, TIMEOUT_S)
    ranks = [pickle.load(open(tmp_path / f"picks{r}.pkl", "rb")) for r in (0, 1)]
    picks = {name: np.sort(np.concatenate([r.get(name, np.zeros(0, np.int64)) for r in ranks])) for name in ranks[0]}
    assert all(np.unique(v).size == v.size for v in picks.values())  # shards do not overlap
    steps = pickle.load(open(tmp_path / "probe_rank0.pkl", "rb"))["steps"]
    rows = csv_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 3]
    for row, window in zip(rows, (steps[0:2], steps[2:4]), strict=True):
        assert_matches(row, reference([_subset(s, picks) for s in window], formats=FORMATS), what=row["step"])


# --- resuming a sharded run ------------------------------------------------------------------------------------------


def _resume_worker(rank: int, port: int, tmp_path: str, resume: bool) -> None:
    """Two epochs of 3 steps, logging at steps 1, 3 and 5: the window of step 3 holds step 2 of epoch 0 and step 3
    of epoch 1. Straight through (saving a checkpoint at every epoch end), or resumed from the epoch-0 checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    distributed_env(rank, port)
    torch.manual_seed(1 if resume else 0)  # the resumed run must not depend on the fresh model's initialisation
    root = os.path.join(tmp_path, "resumed" if resume else "straight")
    callbacks = [
        QuantizationMonitor(formats=FORMATS, per_parameter=True, stall_threshold=0.5),
        WeightQuantizer("bfloat16", prefix="stored"),
        ModelCheckpoint(dirpath=os.path.join(tmp_path, "ckpt"), save_top_k=-1),
    ]
    trainer = fsdp2_cpu_trainer(
        root,
        callbacks,
        max_steps=-1,
        max_epochs=2,
        limit_train_batches=3,
        enable_checkpointing=True,
        logger=CSVLogger(root, name="csv"),
    )
    ckpt = os.path.join(tmp_path, "ckpt", "epoch=0-step=3.ckpt") if resume else None
    trainer.fit(ShardedRegressor(), ckpt_path=ckpt)
    finish_distributed()


def test_fsdp2_resume_mid_window_logs_the_uninterrupted_series(tmp_path):
    """A checkpoint taken mid logging window holds the window's sums of both ranks (reduced in ``state_dict``), for
    the monitor and for WeightQuantizer's counts: the run resumed from it logs what the run that never stopped logs,
    every key (per parameter, stall alert, stored-weight fractions) at every logging step."""
    for resume in (False, True):
        context = mp.start_processes(_resume_worker, args=(free_port(), str(tmp_path), resume), nprocs=2, join=False)
        join_processes(context, TIMEOUT_S)
    straight, resumed = csv_rows(tmp_path / "straight"), csv_rows(tmp_path / "resumed")
    logged = lambda rows: {r["step"]: r for r in rows if "altgrad/ulp_mean" in r}  # noqa: E731
    straight, resumed = logged(straight), logged(resumed)
    assert sorted(straight) == [1, 3, 5] and sorted(resumed) == [3, 5]
    for step in (3, 5):
        keys = [k for k in straight[step] if k.startswith(("altgrad/", "stored/"))]
        assert len(keys) > 100 and set(keys) <= set(resumed[step])
        assert "stored/bfloat16/stored_update_stall_frac" in keys
        for key in keys:
            assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-12, abs=1e-15), (step, key)


# --- the packed reduction on hand-made shards ------------------------------------------------------------------------


def _reduction_worker(rank: int, port: int, tmp_path: str) -> None:
    distributed_env(rank, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(1)
        w = torch.randn(41, generator=g) * 3
        grad = torch.randn(41, generator=g) * 1e-2
        w[3], grad[5], w[7], w[33] = 0.0, float("nan"), 600.0, 1e-9
        after = w + torch.randn(41, generator=g) * 1e-3
        # Uneven shards, two "parameters" per rank: rank 0 holds [0, 17) and [17, 29), rank 1 [29, 41) and an empty
        # piece (an empty shard still contributes its zero sums).
        parts = ((0, 17), (17, 29)) if rank == 0 else ((29, 41), (41, 41))
        metrics = [GradientStiffness("float8_e4m3fn"), GridAlignment("bfloat16"), UlpMovement()]
        for lo, hi in parts:
            metrics[0].update(w[lo:hi], grad[lo:hi])
            metrics[1].update(w[lo:hi])
            metrics[2].update(w[lo:hi], after[lo:hi])
        local = [m.sums() for m in metrics]
        before = [{k: v.clone() for k, v in sums.items()} for sums in local]
        reduced = all_reduce_sums(local)
        for sums, kept in zip(local, before, strict=True):  # the inputs are left untouched
            assert all(torch.equal(v, kept[k]) for k, v in sums.items())
        out = [type(m).compute_fn(s) for m, s in zip(metrics, reduced, strict=True)]
        # The whole tensors in one process (no torchmetrics sync: every rank holds all of them here).
        off = {"sync_on_compute": False}
        single = [GradientStiffness("float8_e4m3fn", **off), GridAlignment("bfloat16", **off), UlpMovement(**off)]
        single[0].update(w, grad)
        single[1].update(w)
        single[2].update(w, after)
        expected = [m.compute() for m in single]
        dtypes = [{k: v.dtype for k, v in s.items()} for s in reduced]
        with open(os.path.join(tmp_path, f"reduce{rank}.pkl"), "wb") as fh:
            pickle.dump({"out": out, "expected": expected, "dtypes": dtypes}, fh)
    finally:
        torch.distributed.destroy_process_group()


def test_packed_all_reduce_of_uneven_shards_equals_one_process(tmp_path):
    mp.spawn(_reduction_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    for r in (0, 1):
        res = pickle.load(open(tmp_path / f"reduce{r}.pkl", "rb"))
        assert res["dtypes"][0]["n_total"] == torch.int64 and res["dtypes"][1]["err_max"] == torch.float64
        for got, want in zip(res["out"], res["expected"], strict=True):
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=0, msg=k)
