"""The Metrics on their own, in a plain PyTorch loop (no Lightning): values over several steps equal a numpy/ml_dtypes
recomputation on the concatenated data (``callback_helpers.reference``); states merge across simulated ranks;
``reset()``, ``forward()``, ``MetricCollection`` and ``plot()`` work.
"""

from __future__ import annotations

import copy

import matplotlib
import pytest
import torch
from callback_helpers import (
    FLIP_STATS,
    GRID_STATS,
    STIFFNESS_STATS,
    ULP_STATS,
    f64,
    native,
    reference,
    ulp_histogram_ref,
)
from torchmetrics import MetricCollection

from altgrad_lightning.metrics import GradientStiffness, GridAlignment, GridFlips, UlpMovement

matplotlib.use("Agg")

FORMATS = ("float8_e4m3fn", "float8_e5m2", "bfloat16")


def _train(n_steps: int = 5, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A plain loop: a 5 -> 4 -> 1 MLP with Adam. Yields, per step, every parameter's (w, g, w') as tensors."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(32, 5, dtype=dtype)
    y = x.sum(1, keepdim=True)
    steps = []
    for _ in range(n_steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        pairs = [(p.detach().clone(), p.grad.detach().clone()) for p in model.parameters()]
        opt.step()
        steps.append([(w, g, p.detach().clone()) for (w, g), p in zip(pairs, model.parameters(), strict=True)])
    return steps


def _probe_steps(steps):
    """The same data in the probe's format, for the reference."""
    return [
        {
            "w": [f64(w) for w, _, _ in step],
            "g": [f64(g) for _, g, _ in step],
            "dtype": [native(w) for w, _, _ in step],
            "w_after": [native(a) for _, _, a in step],
            "scale": 1.0,
        }
        for step in steps
    ]


def _metrics(fmt: str) -> dict[str, object]:
    return {
        "stiffness": GradientStiffness(fmt),
        "grid": GridAlignment(fmt),
        "flips": GridFlips(fmt),
        "ulp": UlpMovement(),
    }


def _feed(metrics, steps):
    for step in steps:
        for w, g, after in step:
            metrics["stiffness"].update(w, g)
            metrics["grid"].update(w)
            metrics["flips"].update(w, after)
            metrics["ulp"].update(w, after)


def _check(metrics, ref, fmt):
    got = {}
    for family, stats in (("stiffness", STIFFNESS_STATS), ("grid", GRID_STATS), ("flips", FLIP_STATS)):
        values = metrics[family].compute()
        got.update({f"altgrad/{fmt}/{s}": values[s].item() for s in stats})
    values = metrics["ulp"].compute()
    got.update({f"altgrad/{s}": values[s].item() for s in ULP_STATS})
    for key, expected in ref.items():
        if key.startswith(f"altgrad/{fmt}/") or key.count("/") == 1:
            rel = 1e-9 if not key.endswith("grid_error_std") else 1e-6
            assert got[key] == pytest.approx(expected, rel=rel, abs=1e-12), (key, got[key], expected)
    return got


@pytest.mark.parametrize("fmt", FORMATS)
def test_metrics_over_steps_equal_recomputation_on_concatenated_data(fmt):
    """Five Adam steps, one update per parameter per step: compute() equals numpy on all the data at once."""
    steps = _train()
    metrics = _metrics(fmt)
    _feed(metrics, steps)
    ref = reference(_probe_steps(steps), formats=(fmt,))
    got = _check(metrics, ref, fmt)
    assert len([k for k in ref if k in got]) >= 18  # the comparison covered (nearly) every statistic
    # The ULP histogram: counts per log2 bucket (0, 1, 2-3, ...) over all the data.
    hist = metrics["ulp"].compute()["ulp_histogram"]
    ref_hist = ulp_histogram_ref(_probe_steps(steps))
    total = sum(w.numel() for s in steps for w, _, _ in s)
    assert int(hist.sum()) == total
    for b, fraction in enumerate(ref_hist.values()):
        assert hist[b].item() / total == pytest.approx(fraction, rel=1e-12), b
    assert int(hist[len(ref_hist) :].sum()) == 0


def test_bfloat16_weights_in_a_plain_loop():
    """bfloat16 parameters: ULPs are bfloat16 steps, and the statistics still equal numpy's."""
    steps = _train(n_steps=3, dtype=torch.bfloat16)
    metrics = _metrics("float8_e4m3fn")
    _feed(metrics, steps)
    _check(metrics, reference(_probe_steps(steps), formats=("float8_e4m3fn",)), "float8_e4m3fn")
    assert metrics["grid"].compute()["grid_nonfinite_frac"].item() == 0.0


def test_two_ranks_merge_to_one_metric_on_all_data():
    """Two instances fed disjoint halves (two simulated ranks), merged with merge_state (a Metric, or its state
    dict) or by adding their sums, hold the states of one metric fed everything (counts and maxima exactly)."""
    steps = _train()
    for fmt in ("float8_e4m3fn", "bfloat16"):
        whole, rank0, rank1 = _metrics(fmt), _metrics(fmt), _metrics(fmt)
        _feed(whole, steps)
        _feed(rank0, steps[0::2])
        _feed(rank1, steps[1::2])
        by_metric, by_dict, by_sums = copy.deepcopy(rank0), copy.deepcopy(rank0), copy.deepcopy(rank0)
        for family in whole:
            by_metric[family].merge_state(rank1[family])
            by_dict[family].merge_state(rank1[family].metric_state)
            by_sums[family].accumulate(rank1[family].sums())
            for merged in (by_metric, by_dict, by_sums):
                # Counts exactly; float64 sums up to the order of summation.
                for name, value in whole[family].sums().items():
                    got = merged[family].sums()[name]
                    if value.dtype == torch.int64:
                        assert torch.equal(got, value), (fmt, family, name)
                    else:
                        assert torch.allclose(got, value, rtol=1e-12, atol=0), (fmt, family, name)
                for stat, value in whole[family].compute().items():
                    assert torch.allclose(merged[family].compute()[stat], value, rtol=1e-12), (fmt, family, stat)
        # and the merged values are the numpy ones
        _check(by_metric, reference(_probe_steps(steps), formats=(fmt,)), fmt)


def test_reset_and_forward():
    """reset() returns to the empty state (fractions of nothing are 0.0); forward() returns the batch's values and
    accumulates like update()."""
    steps = _train(n_steps=2)
    m = GradientStiffness("float8_e4m3fn")
    w, g, _ = steps[0][0]
    m.update(w, g)
    m.reset()
    assert m.update_count == 0
    assert all(v.item() == 0 for v in m.sums().values())
    assert all(v.item() == 0.0 for v in m.compute().values())
    first = m(w, g)  # forward
    w2, g2, _ = steps[1][0]
    second = m(w2, g2)
    ref_first = reference(_probe_steps([[steps[0][0]]]))
    ref_both = reference(_probe_steps([[steps[0][0]], [steps[1][0]]]))
    key = "altgrad/float8_e4m3fn/grad_below_stiffness_frac"
    assert first["grad_below_stiffness_frac"].item() == pytest.approx(ref_first[key])
    assert second["grad_below_stiffness_frac"].item() == pytest.approx(reference(_probe_steps([[steps[1][0]]]))[key])
    assert m.compute()["grad_below_stiffness_frac"].item() == pytest.approx(ref_both[key])
    u = UlpMovement()
    u.update(w, steps[0][0][2])
    u.reset()
    assert int(u.compute()["ulp_histogram"].sum()) == 0
    u.update(w, w)
    assert u.compute()["ulp_zero_frac"].item() == 1.0


def test_metric_collection_keeps_formats_apart():
    """A MetricCollection of GridFlips in three formats: its first update moves nothing, so every state is equal
    and torchmetrics' compute groups would merge them; each format must still report its own values."""
    steps = _train(n_steps=3)
    keys = {"float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2", "bfloat16": "bf16"}  # "bfloat16" is a Module method
    coll = MetricCollection({keys[fmt]: GridFlips(fmt) for fmt in FORMATS})
    w0 = steps[0][0][0]
    coll.update(w0, w0.clone())  # no movement: identical states in every format
    for step in steps:
        for w, _, after in step:
            coll.update(w, after)
    values = coll.compute()
    data = _probe_steps(steps)
    data.insert(0, {"w": [f64(w0)], "g": [f64(w0)], "dtype": [native(w0)], "w_after": [native(w0)], "scale": 1.0})
    for fmt in FORMATS:
        ref = reference(data, formats=(fmt,))
        for stat in FLIP_STATS:
            assert values[f"{keys[fmt]}_{stat}"].item() == pytest.approx(ref[f"altgrad/{fmt}/{stat}"], rel=1e-9), (
                fmt,
                stat,
            )
    assert values["e4m3_update_stall_frac"] > values["bf16_update_stall_frac"]


@pytest.mark.parametrize("cls", [GradientStiffness, GridAlignment, GridFlips, UlpMovement])
def test_plot_produces_a_figure(cls):
    """plot() of a computed value, and of a series of values (one per step), returns a matplotlib figure."""
    import matplotlib.pyplot as plt

    steps = _train(n_steps=3)
    metric = cls() if cls is UlpMovement else cls("float8_e4m3fn")
    series = []
    for step in steps:
        for w, g, after in step:
            if cls is GridAlignment:
                metric.update(w)
            else:
                metric.update(w, g if cls is GradientStiffness else after)
        series.append(metric.compute())
    fig, ax = metric.plot()
    assert isinstance(fig, matplotlib.figure.Figure) and ax.has_data()
    fig2, ax2 = metric.plot(series)
    assert isinstance(fig2, matplotlib.figure.Figure) and len(ax2.get_lines()) >= 3
    plt.close("all")
