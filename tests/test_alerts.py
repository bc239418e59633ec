"""stall_threshold: the stall_alert flag against a numpy recomputation, the once-per-parameter warning, and
EarlyStopping acting on the flag in a real Trainer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from callback_helpers import TinyRegressor, csv_rows, fit, round_to
from lightning.pytorch.callbacks import EarlyStopping

from altgrad_lightning import QuantizationMonitor

FORMATS = ("float8_e4m3fn", "bfloat16")


def _stall_fractions(step: dict, name: str) -> tuple[dict[str, tuple[int, int]], float]:
    """Per parameter (updated, stalled) counts of one probed step, and the whole selection's stall fraction."""
    per_param = {}
    for pname, before, after in zip(step["names"], step["dtype"], step["w_after"], strict=True):
        b, a = before.astype(np.float64).ravel(), after.astype(np.float64).ravel()
        updated = a != b
        stalled = updated & (round_to(a, name) == round_to(b, name))
        per_param[pname] = (int(updated.sum()), int(stalled.sum()))
    n_upd = sum(u for u, _ in per_param.values())
    n_stall = sum(s for _, s in per_param.values())
    return per_param, (n_stall / n_upd if n_upd else 0.0)


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_stall_alert_flag_and_warning_match_recomputation(tmp_path, threshold: float) -> None:
    """Every logged stall_alert equals (overall > threshold or any parameter > threshold) recomputed from the probe;
    each (format, parameter) above the threshold is named in exactly one warning, the first window it exceeds it."""
    monitor = QuantizationMonitor(formats=list(FORMATS), stall_threshold=threshold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, probe, _ = fit(tmp_path, monitor, model=TinyRegressor(lr=3e-3), max_steps=8)
    messages = [str(w.message) for w in caught if "stall_threshold" in str(w.message)]
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 8
    expected_named: dict[str, list[str]] = {name: [] for name in FORMATS}
    expected_warnings = 0
    for row, step in zip(rows, probe.steps, strict=True):
        for name in FORMATS:
            per_param, overall = _stall_fractions(step, name)
            assert row[f"altgrad/{name}/update_stall_frac"] == pytest.approx(overall, abs=1e-15)
            above = [p for p, (u, s) in per_param.items() if u and s / u > threshold]
            assert row[f"altgrad/{name}/stall_alert"] == float(overall > threshold or bool(above)), (name, step)
            new = [p for p in above if p not in expected_named[name]]
            expected_named[name] += new
            expected_warnings += bool(new)  # one warning per window that brings new names
    for name in FORMATS:
        for pname in expected_named[name]:
            hits = [m for m in messages if m.startswith(f"QuantizationMonitor: {name} ") and f"{pname} (" in m]
            assert len(hits) == 1, (name, pname, messages)
    assert len(messages) == expected_warnings
    # The fp8 grid swallows most of these small updates: at 0.3 every parameter is named for it.
    if threshold == 0.3:
        assert len(expected_named["float8_e4m3fn"]) == 4


def test_early_stopping_acts_on_the_stall_alert(tmp_path) -> None:
    """EarlyStopping(monitor=stall_alert, mode="min", divergence_threshold=0.5) stops the run at the first epoch
    end whose last window raised the alert: one epoch of 16 batches instead of 4."""
    key = "altgrad/float8_e4m3fn/stall_alert"
    stopper = EarlyStopping(monitor=key, mode="min", divergence_threshold=0.5, check_on_train_epoch_end=True)
    monitor = QuantizationMonitor(formats="float8_e4m3fn", stall_threshold=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _, _ = fit(tmp_path, monitor, model=TinyRegressor(lr=3e-3), max_steps=-1, max_epochs=4,
                            callbacks=[stopper])  # fmt: skip
    assert trainer.callback_metrics[key].item() == 1.0
    assert trainer.global_step == 16 and trainer.should_stop


def test_without_threshold_no_alert_key(tmp_path) -> None:
    fit(tmp_path, QuantizationMonitor(formats="float8_e4m3fn"), max_steps=2)
    assert not any(k.endswith("/stall_alert") for k in csv_rows(tmp_path)[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stall_threshold": 0.0}, ValueError, "(0, 1]"),
        ({"stall_threshold": 1.5}, ValueError, "(0, 1]"),
        ({"stall_threshold": float("nan")}, ValueError, "(0, 1]"),
        ({"stall_threshold": "0.5"}, TypeError, "float"),
        ({"stall_threshold": True}, TypeError, "float"),
        ({"stall_threshold": 0.5, "diagnostics": ["grid"]}, ValueError, "flips"),
    ],
)
def test_bad_stall_threshold(kwargs, error, match) -> None:
    with pytest.raises(error, match="`stall_threshold`") as info:
        QuantizationMonitor(**kwargs)
    assert match in str(info.value)


def test_stall_counts_survive_a_checkpoint() -> None:
    monitor = QuantizationMonitor(formats="float8_e4m3fn", stall_threshold=0.5)
    monitor._stall_counts = {"float8_e4m3fn": torch.tensor([[4.0, 3.0]], dtype=torch.float64)}
    monitor._stall_warned = {("float8_e4m3fn", "net.0.weight")}
    state = monitor.state_dict()
    fresh = QuantizationMonitor(formats="float8_e4m3fn", stall_threshold=0.5)
    fresh._stall_counts = {"float8_e4m3fn": torch.zeros((1, 2), dtype=torch.float64)}
    fresh._metrics = {}
    fresh._apply_restored(state)
    assert fresh._stall_counts["float8_e4m3fn"].tolist() == [[4.0, 3.0]]
    assert fresh._stall_warned == {("float8_e4m3fn", "net.0.weight")}
