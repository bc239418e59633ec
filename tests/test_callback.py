"""QuantizationMonitor inside a real Trainer: what the loggers wrote equals an independent recomputation.

The recomputation uses numpy and ml_dtypes on tensors captured by a separate probe callback, not the package's
functional core, so a wrong hook, a wrong window or a wrong key shows up here.
"""

from __future__ import annotations

import csv
import glob
import math
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from callback_helpers import (
    E4M3,
    E4M3_EMAX,
    E4M3_EMIN,
    E4M3_M,
    E4M3_MAX,
    TinyRegressor,
    assert_matches,
    reference,
    ulp_histogram_ref,
)
from callback_helpers import csv_rows as _csv_rows
from callback_helpers import fit as _fit
from callback_helpers import tensorboard_scalars as _tensorboard_scalars
from lightning.pytorch.loggers import CSVLogger

from altgrad_lightning import QuantizationMonitor
from altgrad_lightning.functional import _fused_cpu


def _reference(step: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """numpy/ml_dtypes recomputation of a few logged statistics for float8_e4m3fn."""
    w = np.concatenate([a.ravel() for a in step["w"]])
    g = np.concatenate([a.ravel() for a in step["g"]])
    before = np.concatenate([a.ravel() for a in step["dtype"]])
    after = np.concatenate([a.ravel() for a in step["w_after"]])
    valid = w != 0
    e = np.clip(np.frexp(np.abs(w[valid]))[1] - 1, E4M3_EMIN, E4M3_EMAX)
    stiffness = np.ldexp(1.0, e - E4M3_M)
    q_before = np.clip(before, -E4M3_MAX, E4M3_MAX).astype(E4M3).astype(np.float32)
    q_after = np.clip(after, -E4M3_MAX, E4M3_MAX).astype(E4M3).astype(np.float32)
    updated = after != before
    return {
        "grad_below_stiffness_frac": float(np.mean(np.abs(g[valid]) < stiffness)),
        "grad_stiff_ratio_mean": float(np.mean(np.abs(g[valid]) / stiffness)),
        "flip_frac": float(np.mean(q_after != q_before)),
        "update_stall_frac": float(np.sum(updated & (q_after == q_before)) / np.sum(updated)),
        "ulp_zero_frac": float(np.mean(after == before)),
        "on_grid_frac": float(np.mean(np.clip(w, -448, 448).astype(E4M3).astype(np.float64) == w)),
    }


@pytest.mark.parametrize("fused", [True, False], ids=["fast-path", "reference-path"])
def test_logged_values_equal_independent_recomputation_every_step(tmp_path, fused):
    """CSV and TensorBoard hold, for each of 12 Adam steps, the values a numpy/ml_dtypes recomputation gives: on the
    fast path (the compiled C pass on the CPU, where a C compiler is found) and on the reference path."""
    torch.manual_seed(0)
    monitor = QuantizationMonitor(formats=["float8_e4m3fn", "bfloat16"], fused=fused)
    _, probe, _ = _fit(tmp_path, monitor)
    assert monitor._fused_steps == (12 if fused and _fused_cpu.load() is not None else 0)
    rows = _csv_rows(tmp_path)
    assert len(probe.steps) == 12 and len(rows) == 12
    scalars = _tensorboard_scalars(tmp_path)
    for i, (row, step) in enumerate(zip(rows, probe.steps, strict=False)):
        assert row["step"] == i
        ref = _reference(step)
        for stat in (
            "grad_below_stiffness_frac",
            "grad_stiff_ratio_mean",
            "flip_frac",
            "update_stall_frac",
            "on_grid_frac",
        ):
            key = f"altgrad/float8_e4m3fn/{stat}"
            assert row[key] == pytest.approx(ref[stat], rel=1e-6, abs=1e-7), (i, stat)
            tb_step, tb_value = scalars[key][i]
            assert tb_step == i and tb_value == pytest.approx(ref[stat], rel=1e-6, abs=1e-7)
        assert row["altgrad/ulp_zero_frac"] == pytest.approx(ref["ulp_zero_frac"], abs=1e-7)
        assert row["altgrad/skipped_steps"] == 0
        # Every logged statistic of both formats, and the ULP histogram, against the full numpy recomputation.
        assert_matches(row, reference([step], formats=("float8_e4m3fn", "bfloat16")), what=i)
        for label, value in ulp_histogram_ref([step]).items():
            assert row[f"altgrad/ulp_hist/{label}"] == pytest.approx(value, abs=1e-7), (i, label)
    # Adam moves every weight at lr 1e-2, but float8's grid swallows most of those moves: the story is visible.
    assert rows[-1]["altgrad/float8_e4m3fn/update_stall_frac"] > rows[-1]["altgrad/bfloat16/update_stall_frac"]


def test_window_aggregates_steps_between_logs(tmp_path):
    """With log_every_n_steps=4, a logged fraction pools the 4 steps of its window (counts, not an average of means)."""
    torch.manual_seed(0)
    _, probe, _ = _fit(
        tmp_path,
        QuantizationMonitor(formats="e4m3"),
        max_steps=8,
        log_every_n_steps=4,
        logger=CSVLogger(tmp_path, name="csv"),
    )
    rows = _csv_rows(tmp_path)
    assert [r["step"] for r in rows] == [3, 7]
    for row, window in zip(rows, (probe.steps[0:4], probe.steps[4:8]), strict=False):
        below = total = 0
        for step in window:
            w = np.concatenate([a.ravel() for a in step["w"]])
            g = np.concatenate([a.ravel() for a in step["g"]])
            e = np.clip(np.frexp(np.abs(w))[1] - 1, E4M3_EMIN, E4M3_EMAX)
            below += int(np.sum(np.abs(g) < np.ldexp(1.0, e - E4M3_M)))
            total += w.size
        assert row["altgrad/float8_e4m3fn/grad_below_stiffness_frac"] == pytest.approx(below / total, rel=1e-6)


def test_every_n_steps_samples_only_those_steps(tmp_path):
    """every_n_steps=3 over 6 steps logged at step 5: the window holds steps 3 (sampled) only... and 0 before it."""
    torch.manual_seed(0)
    _, probe, _ = _fit(
        tmp_path,
        QuantizationMonitor(formats="e4m3", every_n_steps=3),
        max_steps=6,
        log_every_n_steps=6,
        logger=CSVLogger(tmp_path, name="csv"),
    )
    (row,) = _csv_rows(tmp_path)
    pooled_w = np.concatenate([a.ravel() for s in (probe.steps[0], probe.steps[3]) for a in s["w"]])
    pooled_g = np.concatenate([a.ravel() for s in (probe.steps[0], probe.steps[3]) for a in s["g"]])
    e = np.clip(np.frexp(np.abs(pooled_w))[1] - 1, E4M3_EMIN, E4M3_EMAX)
    expected = float(np.mean(np.abs(pooled_g) < np.ldexp(1.0, e - E4M3_M)))
    assert row["altgrad/float8_e4m3fn/grad_below_stiffness_frac"] == pytest.approx(expected, rel=1e-6)


def test_windows_without_a_sampled_step_log_nothing(tmp_path):
    """every_n_steps=3 with log_every_n_steps=1 over 7 steps: rows at steps 0, 3 and 6 only (an unsampled window
    would otherwise log the zeros of empty sums, a stall fraction of 0 that was never measured)."""
    _fit(
        tmp_path,
        QuantizationMonitor(formats="e4m3", every_n_steps=3),
        max_steps=7,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="csv"),
    )
    assert [row["step"] for row in _csv_rows(tmp_path)] == [0.0, 3.0, 6.0]


@pytest.mark.parametrize("fused", [True, False], ids=["fast-path", "reference-path"])
def test_amp_skipped_step_is_counted_not_logged_as_stall(tmp_path, fused):
    """16-mixed with a GradScaler on CPU: an inf loss makes the scaler skip the step; it is counted, no ULP sample."""
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    model = TinyRegressor()
    model.poison_step = 2
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    _, probe, _ = _fit(
        tmp_path,
        QuantizationMonitor(formats="e4m3", fused=fused),
        model=model,
        max_steps=5,
        plugins=[plugin],
        logger=CSVLogger(tmp_path, name="csv"),
    )
    rows = _csv_rows(tmp_path)
    skipped = [r["altgrad/skipped_steps"] for r in rows]
    # The scaler may also skip early steps while it calibrates its scale: the probe's own count is the reference.
    assert sum(skipped) == probe.befores - len(probe.steps) >= 1
    assert skipped[2] == 1  # the poisoned step
    for row, n_skipped in zip(rows, skipped, strict=False):
        if n_skipped:  # a one-step window whose step was skipped: no ULP/flip sample, logged as 0, not as a stall
            assert row["altgrad/float8_e4m3fn/update_stall_frac"] == 0.0
            assert row["altgrad/float8_e4m3fn/updated_frac"] == 0.0
            assert row["altgrad/ulp_zero_frac"] == 0.0
        else:
            assert row["altgrad/float8_e4m3fn/updated_frac"] > 0.0


def test_hooks_removed_after_fit_and_after_interrupt(tmp_path):
    """No step hook stays on the optimizer after fit, nor after a KeyboardInterrupt raised mid-run."""
    monitor = QuantizationMonitor(formats="e4m3")
    trainer, _, _ = _fit(tmp_path, monitor, max_steps=2, logger=False)
    assert all(not opt._optimizer_step_post_hooks for opt in trainer.optimizers)

    class Interrupt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    monitor = QuantizationMonitor(formats="e4m3")
    model = TinyRegressor()
    with pytest.raises(SystemExit):  # Lightning turns a KeyboardInterrupt into a graceful shutdown and exit(1)
        _fit(tmp_path, monitor, model=model, max_steps=5, logger=False, callbacks=[Interrupt()])
    optimizer = model.trainer.optimizers[0]
    assert model.trainer.interrupted and model.trainer.global_step == 2
    assert not monitor._handles
    # Only the probe's hook (which removes itself in on_fit_end, never reached) may remain.
    assert len(optimizer._optimizer_step_post_hooks) == 1


def test_resume_from_checkpoint_logs_what_an_uninterrupted_run_logs(tmp_path):
    """A run stopped after epoch 0 (mid logging window) and resumed logs the same series as one uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, ckpt_path=None, **limits):
        torch.manual_seed(0)
        ckpt = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_top_k=-1)
        trainer = pl.Trainer(
            default_root_dir=root,
            log_every_n_steps=3,
            logger=CSVLogger(root, name="csv"),
            callbacks=[QuantizationMonitor(formats="e4m3"), ckpt],
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
            limit_train_batches=4,
            **limits,
        )
        trainer.fit(TinyRegressor(), ckpt_path=ckpt_path)

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run(straight, max_epochs=3)
    run(broken, max_epochs=1)  # 4 steps; logs at steps 2, 5, 8, ...: the checkpoint holds step 3's pending sums
    (ckpt,) = glob.glob(os.path.join(broken, "ckpt", "*.ckpt"))
    run(broken, ckpt_path=ckpt, max_epochs=3)

    def series(root):
        rows = []
        for path in sorted(glob.glob(os.path.join(root, "csv", "*", "metrics.csv"))):
            with open(path) as fh:
                rows += [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
        return {int(r["step"]): {k: v for k, v in r.items() if k.startswith("altgrad/")} for r in rows}

    a, b = series(straight), series(broken)
    assert sorted(a) == sorted(b) == [2, 5, 8, 11]
    for step in a:
        assert a[step].keys() == b[step].keys()
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


def test_two_instances_coexist_with_their_own_state(tmp_path):
    """Two monitors with different prefixes log side by side and checkpoint under distinct state keys."""
    m1 = QuantizationMonitor(formats="e4m3", prefix="fp8")
    m2 = QuantizationMonitor(formats="bf16", prefix="bf16", diagnostics=["stiffness"])
    assert m1.state_key != m2.state_key
    _fit(tmp_path, m1, max_steps=3, logger=CSVLogger(tmp_path, name="csv"), callbacks=[m2])
    row = _csv_rows(tmp_path)[-1]
    assert "fp8/float8_e4m3fn/update_stall_frac" in row and "bf16/bfloat16/grad_below_stiffness_frac" in row
    assert not any(k.startswith("bf16/") and "flip" in k for k in row)


def test_include_exclude_and_per_parameter_keys(tmp_path):
    """Regex selection restricts the parameters; per-parameter keys carry the parameter name."""
    monitor = QuantizationMonitor(formats="e4m3", include=r"^net\.0\.", exclude=r"bias$", per_parameter=True)
    _, probe, _ = _fit(tmp_path, monitor, max_steps=2, logger=CSVLogger(tmp_path, name="csv"))
    row = _csv_rows(tmp_path)[0]
    per_param = {k.rsplit("/", 1)[1] for k in row if k.endswith(".weight") or k.endswith(".bias")}
    assert per_param == {"net.0.weight"}
    w = probe.steps[0]["w"][0].ravel()
    g = probe.steps[0]["g"][0].ravel()
    e = np.clip(np.frexp(np.abs(w))[1] - 1, E4M3_EMIN, E4M3_EMAX)
    expected = float(np.mean(np.abs(g) < np.ldexp(1.0, e - E4M3_M)))
    assert row["altgrad/float8_e4m3fn/grad_below_stiffness_frac"] == pytest.approx(expected, rel=1e-6)
    assert row["altgrad/float8_e4m3fn/grad_below_stiffness_frac/net.0.weight"] == pytest.approx(expected, rel=1e-6)


def test_selection_matching_nothing_warns_and_trains(tmp_path):
    with pytest.warns(UserWarning, match="no trainable parameter matches"):
        _fit(tmp_path, QuantizationMonitor(include="no_such_parameter"), max_steps=2, logger=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"formats": "float7"}, ValueError, "`formats`"),
        ({"formats": []}, ValueError, "`formats`"),
        ({"formats": ["e4m3", "float8_e4m3fn"]}, ValueError, "`formats`"),
        ({"diagnostics": ["stiffness", "nope"]}, ValueError, "`diagnostics`"),
        ({"diagnostics": []}, ValueError, "`diagnostics`"),
        ({"include": "("}, ValueError, "`include`"),
        ({"exclude": [3]}, ValueError, "`exclude`"),
        ({"every_n_steps": 0}, ValueError, "`every_n_steps`"),
        ({"every_n_steps": 1.5}, ValueError, "`every_n_steps`"),
        ({"scaling": "mxfp8"}, ValueError, "`scaling`"),
        ({"prefix": ""}, ValueError, "`prefix`"),
        ({"per_parameter": "yes"}, ValueError, "`per_parameter`"),
    ],
)
def test_invalid_options_raise_in_init(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantizationMonitor(**kwargs)


def test_logged_keys_are_listed_in_the_docstring(tmp_path):
    """Every stat the monitor logs appears in its "Logged metrics" docstring section."""
    _fit(tmp_path, QuantizationMonitor(formats="e4m3"), max_steps=1, logger=CSVLogger(tmp_path, name="csv"))
    row = _csv_rows(tmp_path)[0]
    doc = QuantizationMonitor.__doc__ or ""
    for key in row:
        if key.startswith("altgrad/") and "/ulp_hist/" not in key:
            assert key.rsplit("/", 1)[1] in doc, key
    assert math.isfinite(row["altgrad/ulp_median"])
