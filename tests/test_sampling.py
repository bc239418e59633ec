"""QuantizationMonitor(sample_fraction=...): the diagnostics of a fixed random subset of the weight elements.

Each element is in the subset independently with probability ``sample_fraction`` (drawn once per fit from
``sample_seed``), so the statistics are those of a simple random sample of the weights, whatever their values. The
logged numbers must be exactly the numpy recomputation on the subset's elements (every family, per parameter, the
scaled grids and the MX block counts); the subset itself must be fixed for the fit, reproducible from the seed and
of about the requested size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from callback_helpers import TinyRegressor, assert_matches, csv_rows, fit, reference

from altgrad_lightning import QuantizationMonitor

FORMATS = ("float8_e4m3fn", "bfloat16")
STEP_KEYS = ("w", "g", "dtype", "w_after", "g_post")


def _subset(step, picks):
    """A probe step restricted to the sampled elements (flat) of each parameter."""
    out = dict(step)
    for k in STEP_KEYS:
        out[k] = [a.reshape(-1)[picks[n]] for a, n in zip(step[k], step["names"], strict=True)]
    return out


def _picks(monitor):
    return {n: monitor._samples[id(p)].cpu().numpy() for ps in monitor._selected.values() for n, p in ps}


def test_sampled_statistics_equal_the_recomputation_on_the_subset(tmp_path):
    torch.manual_seed(0)
    monitor = QuantizationMonitor(formats=list(FORMATS), per_parameter=True, sample_fraction=0.4, sample_seed=3)
    _, probe, _ = fit(tmp_path, monitor, max_steps=6)
    picks = _picks(monitor)
    sizes = {n: int(np.prod(a.shape)) for n, a in zip(probe.steps[0]["names"], probe.steps[0]["w"], strict=True)}
    for name, idx in picks.items():
        assert idx.dtype == np.int32 and np.all(np.diff(idx) > 0) and (idx.size == 0 or idx[-1] < sizes[name])
    n_sampled, n_all = sum(i.size for i in picks.values()), sum(sizes.values())
    assert abs(n_sampled - 0.4 * n_all) < 4 * np.sqrt(n_all * 0.4 * 0.6)  # Binomial(97, 0.4): within 4 sigma
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 6
    for row, step in zip(rows, probe.steps, strict=True):
        sub = _subset(step, picks)
        assert_matches(row, reference([sub], formats=FORMATS), what=row["step"])
        for i, name in enumerate(step["names"]):
            one = {**sub, **{k: sub[k][i : i + 1] for k in STEP_KEYS}}
            ref = {f"{k}/{name}": v for k, v in reference([one], formats=FORMATS).items()}
            assert_matches(row, ref, what=(name, row["step"]))


def test_the_subset_is_fixed_by_the_seed(tmp_path):
    """The same seed draws the same subset in another fit (so a resumed run measures the same elements); another
    seed draws another one."""
    subsets = []
    for run, seed in enumerate((3, 3, 4)):
        torch.manual_seed(0)
        monitor = QuantizationMonitor(formats="e4m3", sample_fraction=0.5, sample_seed=seed)
        fit(tmp_path / str(run), monitor, max_steps=1)
        subsets.append(_picks(monitor))
    same = all(np.array_equal(subsets[0][n], subsets[1][n]) for n in subsets[0])
    other = all(np.array_equal(subsets[0][n], subsets[2][n]) for n in subsets[0])
    assert same and not other


def test_sampled_amax_scaling_uses_the_whole_tensors_amax(tmp_path):
    """With scaling="amax" the grid is the whole tensor's (amax over every element, not the sample's)."""
    from test_fsdp import _amax_reference

    torch.manual_seed(0)
    monitor = QuantizationMonitor(formats=list(FORMATS), scaling="amax", sample_fraction=0.5, prefix="amax")
    _, probe, _ = fit(tmp_path, monitor, max_steps=3)
    picks = _picks(monitor)
    for row, step in zip(csv_rows(tmp_path), probe.steps, strict=True):
        expected = _amax_reference([step], keep={n: np.isin(np.arange(a.size), picks[n]).reshape(a.shape)
                                                 for n, a in zip(step["names"], step["w"], strict=True)})  # fmt: skip
        assert_matches(row, expected, what=row["step"])


@pytest.mark.parametrize("block_size", [4, 32])
def test_sampled_mx_scaling_uses_the_whole_blocks_scales(tmp_path, block_size):
    """With scaling="mx" each sampled element is measured on the grid of its whole block (block 4: full and partial
    blocks in TinyRegressor's 6- and 12-wide rows; 32: one partial block per row)."""
    from test_mx import mx_window_expected

    torch.manual_seed(0)
    names = ("float8_e4m3fn", "float4_e2m1fn")
    monitor = QuantizationMonitor(formats=list(names), scaling="mx", block_size=block_size, sample_fraction=0.5)
    _, probe, _ = fit(tmp_path, monitor, model=TinyRegressor(lr=3e-3), max_steps=3)
    picks = _picks(monitor)
    for row, step in zip(csv_rows(tmp_path), probe.steps, strict=True):
        masks = {n: np.isin(np.arange(a.size), picks[n]).reshape(a.shape)
                 for n, a in zip(step["names"], step["w"], strict=True)}  # fmt: skip
        for name in names:
            for stat, value in mx_window_expected([step], name, block_size, masks=masks).items():
                assert row[f"altgrad/{name}/{stat}"] == pytest.approx(value, abs=1e-12), (row["step"], name, stat)


def test_sampled_mx_block_counts_count_the_sampled_elements(tmp_path):
    from test_mx import mx_block_counts

    torch.manual_seed(0)
    monitor = QuantizationMonitor(
        formats=["float8_e4m3fn"], scaling="mx", block_size=4, per_parameter=True, sample_fraction=0.5
    )
    _, probe, _ = fit(tmp_path, monitor, model=TinyRegressor(lr=3e-3), max_steps=4)
    picks = _picks(monitor)
    masks = {
        n: np.isin(np.arange(a.size), picks[n]).reshape(a.shape)
        for n, a in zip(probe.steps[0]["names"], probe.steps[0]["w"], strict=True)
    }
    data = torch.load(tmp_path / "csv" / "version_0" / "mx_block_stalls.pt", weights_only=True)
    expected = mx_block_counts(probe.steps, "float8_e4m3fn", 4, masks=masks)
    for name, counts in expected.items():
        np.testing.assert_array_equal(data["stalls"]["float8_e4m3fn"][name].numpy(), counts, err_msg=name)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sample_fraction": 0.0}, ValueError),
        ({"sample_fraction": 1.5}, ValueError),
        ({"sample_fraction": "0.1"}, TypeError),
        ({"sample_fraction": True}, TypeError),
        ({"sample_fraction": 0.1, "sample_seed": 1.5}, TypeError),
    ],
)
def test_bad_sampling_arguments(kwargs, error):
    name = "sample_seed" if "sample_seed" in kwargs else "sample_fraction"
    with pytest.raises(error, match=f"`{name}`"):
        QuantizationMonitor(**kwargs)


def test_joined_parameters_in_runs_log_the_recomputation(tmp_path, monkeypatch):
    """The reference path joins a step's parameters into flat tensors, in runs of a bounded number of elements
    (here 40: runs [72], [12, 12, 1] of TinyRegressor's parameters): amax scales spread per element and
    per-parameter stall counts (segment sums, behind ``stall_alert``) equal numpy's."""
    import importlib

    from test_fsdp import _amax_reference, _round64

    qm = importlib.import_module("altgrad_lightning.callbacks.quantization_monitor")
    monkeypatch.setattr(qm, "_CPU_BATCH", 40)
    torch.manual_seed(0)
    threshold = 0.5
    monitor = QuantizationMonitor(formats=list(FORMATS), scaling="amax", prefix="amax", stall_threshold=threshold)
    _, probe, _ = fit(tmp_path, monitor, max_steps=4)
    for row, step in zip(csv_rows(tmp_path), probe.steps, strict=True):
        assert_matches(row, _amax_reference([step]), what=row["step"])
        for name in FORMATS:
            fmt_max = np.float32(qm.get_format(name).max)
            fractions = []
            for before, after in zip(step["dtype"], step["w_after"], strict=True):
                x = np.float64(np.float32(np.abs(before).max()) / fmt_max)
                b, a = before.astype(np.float64).ravel(), after.astype(np.float64).ravel()
                updated = a != b
                stalled = updated & (_round64(a / x, name) == _round64(b / x, name))
                fractions.append(stalled.sum() / max(updated.sum(), 1))
            overall = row[f"amax/{name}/update_stall_frac"]
            expected = float(overall > threshold or max(fractions) > threshold)
            assert row[f"amax/{name}/stall_alert"] == expected, (name, fractions)
