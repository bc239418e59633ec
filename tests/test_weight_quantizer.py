"""WeightQuantizer (simulated low-precision weight storage) and fake_quantize (issue #7).

References are independent of the code under test: grids and nearest rounding from ml_dtypes casts
(``callback_helpers.round_to``) or, for float64 quotients (which ml_dtypes rounds twice, through float32), from the
enumerated grid in numpy; MX scales from ``np.frexp``. The raw update ``w'`` is read by callback_helpers' Probe,
whose optimizer post hook (registered in ``on_fit_start``) runs before the quantizer's (``on_train_start``); the
stored weights are read in ``on_train_batch_end``, after every hook of the step.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from callback_helpers import (
    FullTensorProbe,
    ShardedRegressor,
    TinyRegressor,
    _grid,
    csv_rows,
    distributed_env,
    finish_distributed,
    fit,
    free_port,
    fsdp2_cpu_trainer,
    join_processes,
    native,
    round_to,
)
from lightning.pytorch.loggers import CSVLogger

from altgrad_lightning.callbacks.quantization_monitor import QuantizationMonitor
from altgrad_lightning.callbacks.weight_quantizer import WeightQuantizer
from altgrad_lightning.quantize import fake_quantize, quantize
from altgrad_lightning.scaling import mx_scale

E4M3 = "float8_e4m3fn"
KEY = f"altgrad/{E4M3}"


# --- helpers ---------------------------------------------------------------------------------------------------------


class Stored(pl.Callback):
    """Every parameter as the first forward of each batch sees it (``seen``) and as stored after the batch's step
    and all its hooks (``stored``), as float64 numpy arrays by name."""

    def __init__(self) -> None:
        self.seen: list[dict[str, np.ndarray]] = []
        self.stored: list[dict[str, np.ndarray]] = []
        self.pre_hooks: list = []  # the owners of the optimizers' step hooks, read in the last on_train_batch_end
        self.post_hooks: list = []

    @staticmethod
    def _read(pl_module: pl.LightningModule) -> dict[str, np.ndarray]:
        return {n: native(p).astype(np.float64) for n, p in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(self._read(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stored.append(self._read(pl_module))
        self.pre_hooks = [getattr(h, "__self__", None) for o in trainer.optimizers for h in _pre(o).values()]
        self.post_hooks = [getattr(h, "__self__", None) for o in trainer.optimizers for h in _post(o).values()]


def _pre(optimizer):
    return optimizer._optimizer_step_pre_hooks


def _post(optimizer):
    return optimizer._optimizer_step_post_hooks


def initial_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: native(p).astype(np.float64) for n, p in model.named_parameters()}


def run(tmp_path, callbacks, model=None, max_steps=10, log_every_n_steps=1, **kwargs):
    """fit() with a CSV logger only and the callbacks ``[callbacks[0], Probe, *callbacks[1:], Stored]``."""
    stored = Stored()
    first, *rest = callbacks
    trainer, probe, model = fit(
        tmp_path,
        first,
        model=model,
        max_steps=max_steps,
        log_every_n_steps=log_every_n_steps,
        logger=CSVLogger(tmp_path, name="csv"),
        callbacks=[*rest, stored],
        **kwargs,
    )
    return trainer, probe, stored, model


def round_grid64(x: np.ndarray, name: str) -> np.ndarray:
    """Saturating nearest (ties to even) rounding of float64 values onto the enumerated grid of ``name``."""
    grid = _grid(name)
    pos = grid[grid >= 0]  # 0, smallest subnormal, ...: the index of a magnitude is its code (parity = last bit)
    a = np.minimum(np.abs(x), pos[-1])
    hi = np.searchsorted(pos, a, side="left")
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - pos[lo], pos[hi] - a
    pick = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    return np.copysign(pos[pick], x)


def mx_scale_ref(w: np.ndarray, block: int, emax: int = 8) -> np.ndarray:
    """OCP MX scale per element: 2**(floor(log2(amax_block)) - emax), at least 2**-127, blocks along the last dim."""
    rows = w.reshape(-1, w.shape[-1]) if w.ndim else w.reshape(1, 1)
    out = np.empty_like(rows)
    for start in range(0, rows.shape[1], block):
        amax = np.abs(rows[:, start : start + block]).max(axis=1)
        _, e = np.frexp(amax)  # amax = m * 2**e with m in [0.5, 1): floor(log2 amax) = e - 1
        exponent = np.where(amax > 0, e - 1 - emax, -127)
        out[:, start : start + block] = np.ldexp(1.0, np.maximum(exponent, -127))[:, None]
    return out.reshape(w.shape)


def stored_ref(raw: np.ndarray, scaling: str) -> np.ndarray:
    """What storing float32 ``raw`` in float8_e4m3fn should give, as float64."""
    if scaling == "none":
        return round_to(raw, E4M3)
    if scaling == "mx":
        s = mx_scale_ref(raw, 4)
        return s * round_to(raw / s, E4M3)  # powers of two: every product and quotient here is exact
    s = float(np.float32(np.abs(raw).max()) / np.float32(448.0))  # float32 division, as amax_scale
    return (s * round_grid64(raw / s, E4M3)).astype(np.float32).astype(np.float64)


def pooled(rows, stat_key: str, weight_key: str, n: int) -> tuple[float, float]:
    """Pool per-step fractions ``stat`` of ``weight_frac * n`` elements: (pooled count, pooled denominator)."""
    num = den = 0.0
    for r in rows:
        updated = round(r[weight_key] * n)
        num += r[stat_key] * updated
        den += updated
    return num, den


# --- storage after every step ----------------------------------------------------------------------------------------


def test_selected_weights_stored_after_every_step_others_untouched(tmp_path):
    model = TinyRegressor(lr=1e-2)
    model.net[0].bias.requires_grad_(False)  # frozen: never selected
    init = initial_weights(model)
    quantizer = WeightQuantizer(E4M3, exclude=r"^net\.2\.bias$")
    trainer, probe, stored, _ = run(tmp_path, [quantizer], model=model, max_steps=6)
    selected = ["net.0.weight", "net.2.weight"]

    assert len(probe.steps) == len(stored.stored) == 6
    # The first forward already sees stored values; the rest as initialised.
    for name in selected:
        assert np.array_equal(stored.seen[0][name], round_to(init[name], E4M3)), name
        assert not np.array_equal(init[name], round_to(init[name], E4M3)), name  # the snap did something
    for name in ("net.0.bias", "net.2.bias"):
        assert np.array_equal(stored.seen[0][name], init[name]), name

    for i, step in enumerate(probe.steps):
        raw = dict(zip(step["names"], step["w_after"], strict=True))
        after = stored.stored[i]
        for name in selected:
            w = after[name]
            assert np.array_equal(w, round_to(raw[name].astype(np.float64), E4M3)), (i, name)
            assert np.array_equal(round_to(w, E4M3), w), (i, name)  # on the grid
        assert np.array_equal(after["net.2.bias"], raw["net.2.bias"].astype(np.float64)), i  # excluded: raw update
        assert not np.array_equal(round_to(after["net.2.bias"], E4M3), after["net.2.bias"])
        assert np.array_equal(after["net.0.bias"], init["net.0.bias"]), i  # frozen
        if i + 1 < len(stored.seen):  # the next forward sees what was stored
            assert all(np.array_equal(stored.seen[i + 1][n], after[n]) for n in after)

    # A pre and a post hook during fit; gone after it, on every optimizer.
    assert stored.pre_hooks.count(quantizer) == stored.post_hooks.count(quantizer) == 1
    for opt in trainer.optimizers:
        for hooks in (_pre(opt), _post(opt)):
            assert not any(getattr(h, "__self__", None) is quantizer for h in hooks.values())
    assert quantizer._handles == [] and quantizer._snapshots == {}


@pytest.mark.parametrize("scaling", ["mx", "amax"])
def test_scaled_storage_on_the_block_scaled_grid(tmp_path, scaling):
    quantizer = WeightQuantizer(E4M3, scaling=scaling, block_size=4, log_stats=False)
    model = TinyRegressor(lr=1e-2)
    init = initial_weights(model)
    trainer, probe, stored, _ = run(tmp_path, [quantizer], model=model, max_steps=4)
    for name, w in stored.seen[0].items():
        assert np.array_equal(w, stored_ref(init[name], scaling)), name
    for i, step in enumerate(probe.steps):
        for name, raw in zip(step["names"], step["w_after"], strict=True):
            w = stored.stored[i][name]
            assert np.array_equal(w, stored_ref(raw.astype(np.float64), scaling)), (i, name)
            if scaling == "mx":  # w / scale is on the grid (the scale of the stored block is the raw block's)
                s = mx_scale_ref(w, 4)
                assert np.array_equal(s, mx_scale_ref(raw.astype(np.float64), 4)), (i, name)
                assert np.array_equal(round_to(w / s, E4M3), w / s), (i, name)
            else:  # the largest magnitude lands on (a float32 rounding of) scale * 448
                s = float(np.float32(np.abs(raw).max()) / np.float32(448.0))
                assert np.abs(w).max() == float(np.float32(s * 448.0)), (i, name)
    assert not any("stored" in k for k in trainer.callback_metrics)  # log_stats=False logs nothing
    assert quantizer not in stored.pre_hooks and quantizer in stored.post_hooks  # no snapshots without stats


# --- predicted (QuantizationMonitor) == observed (WeightQuantizer) ----------------------------------------------------


@pytest.mark.parametrize("quantizer_first", [True, False], ids=["quantizer_first", "quantizer_last"])
def test_monitor_prediction_equals_observed_stalls_for_nearest(tmp_path, quantizer_first):
    monitor = QuantizationMonitor(formats=E4M3, diagnostics=("flips",))
    quantizer = WeightQuantizer(E4M3)
    callbacks = [quantizer, monitor] if quantizer_first else [monitor, quantizer]
    _, probe, _, _ = run(tmp_path, callbacks, model=TinyRegressor(lr=1e-2), max_steps=10)
    rows = csv_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(10))
    stalls = []
    for row, step in zip(rows, probe.steps, strict=True):
        assert row[f"{KEY}/update_stall_frac"] == row[f"{KEY}/stored_update_stall_frac"], row["step"]
        assert row[f"{KEY}/updated_frac"] == row[f"{KEY}/stored_updated_frac"], row["step"]
        # ... and both are the numpy count on the probe's (before = stored, raw after) pairs.
        before = np.concatenate([a.ravel() for a in step["dtype"]]).astype(np.float64)
        raw = np.concatenate([a.ravel() for a in step["w_after"]]).astype(np.float64)
        updated = raw != before
        moved = round_to(raw, E4M3) != before
        assert np.array_equal(round_to(before, E4M3), before)  # the step started from stored values
        assert row[f"{KEY}/stored_update_stall_frac"] == np.sum(updated & ~moved) / np.sum(updated)
        assert row[f"{KEY}/stored_moved_frac"] == np.mean(moved)
        assert row[f"{KEY}/flip_frac"] == row[f"{KEY}/stored_moved_frac"]  # flips of stored weights: moves
        stalls.append(row[f"{KEY}/stored_update_stall_frac"])
    assert 0.1 < min(stalls) and max(stalls) < 0.95  # a non-trivial mix of stalls and moves


def test_stochastic_rounding_observed_stalls_match_sr_prediction(tmp_path):
    n_steps, lr = 30, 2e-3

    def one(path, rounding):
        torch.manual_seed(0)
        monitor = QuantizationMonitor(formats=E4M3, diagnostics=("flips",))
        model = TinyRegressor(lr=lr)
        _, probe, stored, _ = run(
            path, [monitor, WeightQuantizer(E4M3, rounding=rounding)], model=model, max_steps=n_steps
        )
        return csv_rows(path), stored

    rows, sr_stored = one(tmp_path / "sr", "stochastic")
    n = 97
    observed, updated = pooled(rows, f"{KEY}/stored_update_stall_frac", f"{KEY}/stored_updated_frac", n)
    predicted, _ = pooled(rows, f"{KEY}/sr_update_stall_frac", f"{KEY}/updated_frac", n)
    nearest, _ = pooled(rows, f"{KEY}/update_stall_frac", f"{KEY}/updated_frac", n)
    # Per step the stalls are independent Bernoulli draws with the predicted probabilities; their variance is at
    # most that of a binomial with the step's mean probability.
    var = sum(
        round(r[f"{KEY}/updated_frac"] * n) * r[f"{KEY}/sr_update_stall_frac"] * (1 - r[f"{KEY}/sr_update_stall_frac"])
        for r in rows
    )
    print(
        f"pooled stall fraction: observed {observed / updated:.4f}, SR prediction {predicted / updated:.4f}, "
        f"nearest {nearest / updated:.4f} over {updated:.0f} updates (sd {math.sqrt(var) / updated:.4f})"
    )
    assert abs(observed - predicted) <= 4 * math.sqrt(var)
    assert observed < nearest - 10 * math.sqrt(var)  # the weights move again
    assert nearest / updated > 0.9  # most updates are below half the grid spacing

    rows_n, nearest_stored = one(tmp_path / "nearest", "nearest")
    start_sr, end_sr = sr_stored.seen[0], sr_stored.stored[-1]
    start_n, end_n = nearest_stored.seen[0], nearest_stored.stored[-1]
    moved_sr = np.mean(np.concatenate([(end_sr[k] != start_sr[k]).ravel() for k in start_sr]))
    moved_n = np.mean(np.concatenate([(end_n[k] != start_n[k]).ravel() for k in start_n]))
    print(f"weights moved over {n_steps} steps: stochastic {moved_sr:.3f}, nearest {moved_n:.3f}")
    assert moved_n < 0.5 and moved_sr > moved_n + 0.2


# --- checkpointing ---------------------------------------------------------------------------------------------------


class OneBatch(TinyRegressor):
    """Every step sees the same 16 samples, so a resumed run sees the data of the uninterrupted one whatever batch
    Lightning resumes its (mid-)epoch at."""

    def train_dataloader(self):
        x, y = super().train_dataloader().dataset.tensors
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:16], y[:16]), batch_size=16)


def test_resume_keeps_pending_counts_and_generator(tmp_path):
    def quantizer():
        return WeightQuantizer(E4M3, rounding="stochastic", seed=7)

    def trainer(path, max_steps):
        return pl.Trainer(
            default_root_dir=path,
            max_steps=max_steps,
            log_every_n_steps=4,  # logs at steps 3 and 7: the second window spans the interruption at 6
            logger=CSVLogger(path, name="csv"),
            callbacks=[quantizer()],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            accelerator="cpu",
        )

    torch.manual_seed(0)
    whole = OneBatch(lr=1e-2)
    torch.manual_seed(0)
    first, second = OneBatch(lr=1e-2), OneBatch(lr=1e-2)
    trainer(tmp_path / "whole", 8).fit(whole)
    t1 = trainer(tmp_path / "first", 6)
    t1.fit(first)
    ckpt = tmp_path / "six.ckpt"
    t1.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    (saved,) = state.values()
    assert saved["counts"][0] == 2 * 97  # steps 4 and 5 pending
    t2 = trainer(tmp_path / "second", 8)
    t2.fit(second, ckpt_path=ckpt)

    rows_whole, rows_resumed = csv_rows(tmp_path / "whole"), csv_rows(tmp_path / "second")
    key = f"{KEY}/stored_update_stall_frac"
    (row7,) = [r for r in rows_whole if r["step"] == 7 and key in r]
    (resumed7,) = [r for r in rows_resumed if r["step"] == 7 and key in r]
    for stat in ("stored_update_stall_frac", "stored_updated_frac", "stored_moved_frac"):
        assert resumed7[f"{KEY}/{stat}"] == row7[f"{KEY}/{stat}"], stat
    for (name, a), b in zip(whole.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name  # the same stochastic draws after the resume


# --- sharded parameters (FSDP2 on 2 CPU processes) --------------------------------------------------------------------


class FullStored(pl.Callback):
    """The whole stored parameters after every batch (``full_tensor()``, a collective both ranks join)."""

    def __init__(self, save_dir) -> None:
        self.save_dir, self.stored = save_dir, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stored.append({n: native(p.detach().full_tensor()) for n, p in pl_module.named_parameters()})

    def on_fit_end(self, trainer, pl_module):
        with open(os.path.join(self.save_dir, f"stored_rank{trainer.global_rank}.pkl"), "wb") as fh:
            pickle.dump(self.stored, fh)


def _fsdp2_worker(rank: int, port: int, tmp_path: str) -> None:
    distributed_env(rank, port)
    torch.manual_seed(0)
    callbacks = [
        WeightQuantizer(E4M3),
        QuantizationMonitor(formats=E4M3, diagnostics=("flips",)),
        FullTensorProbe(save_dir=tmp_path),
        FullStored(tmp_path),
    ]
    trainer = fsdp2_cpu_trainer(tmp_path, callbacks)
    trainer.fit(ShardedRegressor(lr=1e-2))
    finish_distributed()


def test_fsdp2_shards_are_stored_in_place_and_counted_once(tmp_path):
    import torch.multiprocessing as mp

    context = mp.start_processes(_fsdp2_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    join_processes(context, 120)

    steps = pickle.load(open(tmp_path / "probe_rank0.pkl", "rb"))["steps"]
    stored = [pickle.load(open(tmp_path / f"stored_rank{r}.pkl", "rb")) for r in (0, 1)]
    assert len(steps) == len(stored[0]) == 4
    for i, step in enumerate(steps):
        for name, raw in zip(step["names"], step["w_after"], strict=True):
            w = stored[0][i][name].astype(np.float64)
            assert np.array_equal(w, round_to(raw.astype(np.float64), E4M3)), (i, name)
            assert np.array_equal(stored[1][i][name], stored[0][i][name])
    rows = csv_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 3]
    for row, window in zip(rows, (steps[0:2], steps[2:4]), strict=True):
        before = np.concatenate([a.ravel() for s in window for a in s["dtype"]]).astype(np.float64)
        raw = np.concatenate([a.ravel() for s in window for a in s["w_after"]]).astype(np.float64)
        updated, moved = raw != before, round_to(raw, E4M3) != before
        assert before.size == 2 * 97  # every element counted once, over both ranks
        assert row[f"{KEY}/stored_update_stall_frac"] == row[f"{KEY}/update_stall_frac"]
        assert row[f"{KEY}/stored_update_stall_frac"] == np.sum(updated & ~moved) / np.sum(updated)
        assert row[f"{KEY}/stored_moved_frac"] == np.mean(moved)


def test_sharded_runs_refuse_scaled_storage(tmp_path, monkeypatch):
    import altgrad_lightning.callbacks.weight_quantizer as module

    monkeypatch.setattr(module, "_is_sharded", lambda trainer, pl_module: True)
    with pytest.raises(ValueError, match="scaling='amax'.*sharded"):
        run(tmp_path, [WeightQuantizer(E4M3, scaling="amax")], max_steps=1)


# --- arguments -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, arg",
    [
        ({"format": "float9"}, ValueError, "format"),
        ({"format": 8}, TypeError, "format"),
        ({"format": ["e4m3"]}, TypeError, "format"),
        ({"rounding": "up"}, ValueError, "rounding"),
        ({"scaling": "tensor"}, ValueError, "scaling"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"block_size": 4.0}, ValueError, "block_size"),
        ({"include": "("}, ValueError, "include"),
        ({"include": [3]}, ValueError, "include"),
        ({"exclude": "["}, ValueError, "exclude"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": True}, ValueError, "seed"),
        ({"seed": 1.5}, ValueError, "seed"),
        ({"log_stats": 1}, TypeError, "log_stats"),
        ({"prefix": ""}, ValueError, "prefix"),
        ({"prefix": "a/"}, ValueError, "prefix"),
        ({"prefix": 3}, ValueError, "prefix"),
    ],
)
def test_bad_arguments(kwargs, error, arg):
    with pytest.raises(error, match=f"`{arg}`"):
        WeightQuantizer(**kwargs)


def test_defaults_and_no_match_warning(tmp_path):
    q = WeightQuantizer()
    assert (q.format.name, q.rounding.value, q.scaling, q.block_size, q.seed, q.log_stats, q.prefix) == (
        E4M3,
        "nearest",
        "none",
        32,
        0,
        True,
        "altgrad",
    )
    model = TinyRegressor()
    init = initial_weights(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tmp_path, [WeightQuantizer(include="no_such_parameter")], model=model, max_steps=1)
    assert sum("WeightQuantizer" in str(w.message) and "no_such_parameter" in str(w.message) for w in caught) == 1
    # Nothing selected: the weights are the optimizer's raw values, off the grid.
    after = initial_weights(model)
    assert all(not np.array_equal(after[k], init[k]) for k in init)
    assert all(not np.array_equal(round_to(v, E4M3), v) for v in after.values())


# --- fake_quantize ---------------------------------------------------------------------------------------------------


def _inputs(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g) * torch.logspace(-6, 3, 64)
    x[0, :4] = torch.tensor([0.0, -0.0, 1e6, -1e6])
    return x.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal (NaN where NaN, signed zeros)."""
    return a.dtype == b.dtype and np.array_equal(native(a).view(np.uint8), native(b).view(np.uint8))


@pytest.mark.parametrize("fmt", [E4M3, "float8_e5m2", "bfloat16", "float4_e2m1fn", "e0m7", "float8_e4m3fnuz"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "toward_zero"])
@pytest.mark.parametrize("scale", [None, 2.0**-3, "mx"])
def test_fake_quantize_forward_is_quantize_gradient_is_identity(fmt, rounding, scale):
    for dtype in (torch.float32, torch.bfloat16):
        x0 = _inputs(dtype)
        s = mx_scale(x0, fmt, block_size=8) if scale == "mx" else scale
        x = x0.clone().requires_grad_(True)
        y = fake_quantize(x, fmt, scale=s, rounding=rounding, generator=torch.Generator().manual_seed(5))
        q = quantize(x0, fmt, scale=s, rounding=rounding, generator=torch.Generator().manual_seed(5))
        assert _same(y.detach(), q), (fmt, rounding, scale, dtype)
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        y.backward(upstream)
        assert _same(x.grad, upstream)
        x.grad = None
        fake_quantize(x, fmt, scale=s, rounding=rounding, saturate=True).sum().backward()
        assert _same(x.grad, torch.ones_like(x))


def test_fake_quantize_is_not_x_plus_difference():
    """The detach construction x + (q - x) is not q in floating point (1e20 saturates to 448, but 448 - 1e20 rounds
    to -1e20, so x + (q - x) is 0, and -3e9 gives -512); fake_quantize's value is q."""
    x = torch.tensor([1e20, -3e9, 1.0 + 2.0**-5], requires_grad=True)
    q = quantize(x.detach(), E4M3)
    assert q.tolist() == [448.0, -448.0, 1.0]
    assert (x.detach() + (q - x.detach())).tolist() == [0.0, -512.0, 1.0]
    y = fake_quantize(x, E4M3)
    assert _same(y.detach(), q)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]  # straight through, also where the value saturates


@pytest.mark.parametrize(
    "args, kwargs",
    [
        (([1.0], E4M3), {}),
        ((torch.tensor([1, 2]), E4M3), {}),
        ((torch.ones(2), "float9"), {}),
        ((torch.ones(2), 8), {}),
        ((torch.ones(2), E4M3), {"rounding": "up"}),
        ((torch.ones(2), E4M3), {"scale": -1.0}),
        ((torch.ones(2), E4M3), {"scale": torch.ones(3)}),
        ((torch.ones(2), E4M3), {"scale": torch.tensor([0.0, 1.0])}),
        ((torch.ones(2), E4M3), {"saturate": 1}),
        ((torch.ones(2), E4M3), {"generator": 3}),
    ],
)
def test_fake_quantize_bad_arguments_raise_like_quantize(args, kwargs):
    with pytest.raises(Exception) as want:
        quantize(*args, **kwargs)
    with pytest.raises(want.type, match=re.escape(str(want.value))):
        fake_quantize(*args, **kwargs)


def test_fake_quantize_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    x0 = _inputs()
    s = mx_scale(x0, E4M3, block_size=8)
    fn = torch.compile(
        lambda t, sc: fake_quantize(t, E4M3, scale=sc, rounding="toward_zero") * 2.0,
        fullgraph=True,
        backend="aot_eager",
    )
    x = x0.clone().requires_grad_(True)
    y = fn(x, s)
    assert _same(y.detach(), quantize(x0, E4M3, scale=s, rounding="toward_zero") * 2.0)
    y.sum().backward()
    assert _same(x.grad, torch.full_like(x0, 2.0))
