"""QuantizationMonitor across training set-ups: precisions, AMP scaling, clipping, accumulation, manual optimization,
frozen parameters, torch.compile and odd weights. Every check compares what CSVLogger wrote with a numpy/ml_dtypes
recomputation (``callback_helpers.reference``) from tensors a separate probe captured on its own hooks.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from callback_helpers import (
    GRID_STATS,
    STIFFNESS_STATS,
    TinyRegressor,
    assert_matches,
    csv_rows,
    fit,
    monitor_keys,
    reference,
)
from lightning.pytorch.loggers import CSVLogger

from altgrad_lightning import QuantizationMonitor

FORMATS = ("float8_e4m3fn", "bfloat16")


def _csv(tmp_path):
    return CSVLogger(tmp_path, name="csv")


def _check_every_step(rows, steps, formats=FORMATS, **ref_kwargs):
    assert len(rows) == len(steps)
    for i, (row, step) in enumerate(zip(rows, steps, strict=True)):
        assert_matches(row, reference([step], formats=formats, **ref_kwargs), what=i)


# --- precisions ----------------------------------------------------------------------------------------------------


def test_bf16_mixed_logs_the_recomputation(tmp_path):
    """precision="bf16-mixed" on CPU: float32 master weights, bf16 autocast; every logged stat equals numpy's."""
    torch.manual_seed(0)
    trainer, probe, _ = fit(
        tmp_path, QuantizationMonitor(formats=FORMATS), max_steps=6, precision="bf16-mixed", logger=_csv(tmp_path)
    )
    assert trainer.precision == "bf16-mixed"
    assert all(a.dtype == np.float32 for a in probe.steps[0]["dtype"])
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    assert all(r["altgrad/skipped_steps"] == 0 for r in rows)


def test_bf16_true_master_weights_ulps_in_bfloat16(tmp_path):
    """precision="bf16-true": bfloat16 parameters; ULP movement is counted in bfloat16's own grid (not float32's)."""
    torch.manual_seed(0)
    trainer, probe, _ = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS),
        model=TinyRegressor(lr=1e-3),
        max_steps=5,
        precision="bf16-true",
        logger=_csv(tmp_path),
    )
    assert all(str(a.dtype) == "bfloat16" for a in probe.steps[0]["dtype"])
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    # A bfloat16 weight's move of lr=1e-3 is a handful of bfloat16 ULPs (a float32 count would be ~2**16 times more);
    # even a crossing of zero is fewer than 2**15 bfloat16 steps.
    assert 0 < rows[-1]["altgrad/ulp_median"] < 2**6
    assert rows[-1]["altgrad/ulp_max"] < 2**15
    # bfloat16 weights are on bfloat16's grid by construction.
    assert all(r["altgrad/bfloat16/on_grid_frac"] == 1.0 for r in rows)


def test_float64_parameters_do_not_crash_and_match(tmp_path):
    """precision="64-true": float64 weights; stiffness and ULP stats (in float64's grid) equal numpy's."""
    torch.manual_seed(0)
    _, probe, _ = fit(
        tmp_path, QuantizationMonitor(formats=FORMATS), max_steps=3, precision="64-true", logger=_csv(tmp_path)
    )
    assert all(a.dtype == np.float64 for a in probe.steps[0]["dtype"])
    rows = csv_rows(tmp_path)
    keys = [f"altgrad/{f}/{s}" for f in FORMATS for s in STIFFNESS_STATS] + [
        "altgrad/ulp_mean",
        "altgrad/ulp_max",
        "altgrad/ulp_zero_frac",
    ]
    for i, (row, step) in enumerate(zip(rows, probe.steps, strict=True)):
        assert_matches(row, reference([step], formats=FORMATS), what=i, keys=keys)
        assert all(math.isfinite(v) for v in monitor_keys(row).values())
    # A float64 Adam step is ~2**40 float64 ULPs (the same move is ~2**13 in float32).
    assert rows[-1]["altgrad/ulp_median"] > 2**30


# --- AMP with a GradScaler -----------------------------------------------------------------------------------------


def _fused_adam_on_cpu() -> bool:
    try:
        p = torch.nn.Parameter(torch.ones(2))
        torch.optim.Adam([p], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


@pytest.mark.skipif(not _fused_adam_on_cpu(), reason="this torch has no fused Adam on CPU")
def test_16_mixed_fused_optimizer_gradients_are_unscaled(tmp_path):
    """16-mixed with a GradScaler and fused Adam: Lightning does not unscale before on_before_optimizer_step
    (the fused step unscales inside), so the raw gradients still carry the loss scale. The monitor must log the
    statistics of the unscaled gradients; the scaled ones would give other values.
    """
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)  # the scale changes during the run
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    _, probe, model = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS),
        model=TinyRegressor(fused=True),
        max_steps=6,
        plugins=[plugin],
        logger=_csv(tmp_path),
    )
    assert model.trainer.optimizers[0].defaults["fused"]
    scales = [s["scale"] for s in probe.steps]
    assert len(probe.steps) == probe.befores == 6 and min(scales) >= 2.0**12 and len(set(scales)) > 1
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    key = "altgrad/float8_e4m3fn/grad_below_stiffness_frac"
    for row, step in zip(rows, probe.steps, strict=True):
        scaled = reference([step], unscale=False)[key]
        assert scaled != pytest.approx(row[key], abs=1e-3), "the scaled gradients would have given the same value"


@pytest.mark.skipif(not _fused_adam_on_cpu(), reason="this torch has no fused Adam on CPU")
def test_16_mixed_fused_optimizer_skipped_step_is_counted_not_a_stall(tmp_path):
    """A fused optimizer's step skipped by the scaler (inf gradient) still calls optimizer.step(), which fires the
    post hook without moving any weight: it must count as a skipped step, not as a window of stalled updates.
    """
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    model = TinyRegressor(fused=True)
    model.poison_step = 2
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    _, probe, _ = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS),
        model=model,
        max_steps=4,
        plugins=[plugin],
        logger=_csv(tmp_path),
    )
    rows = csv_rows(tmp_path)
    assert [r["altgrad/skipped_steps"] for r in rows] == [0, 0, 1, 0]
    skipped = rows[2]
    # The fused kernel left every weight as it was (the probe's own copies), and the monitor took no sample.
    assert all(np.array_equal(a, b) for a, b in zip(probe.steps[2]["dtype"], probe.steps[2]["w_after"], strict=True))
    for fmt in FORMATS:
        assert skipped[f"altgrad/{fmt}/update_stall_frac"] == 0.0
        assert skipped[f"altgrad/{fmt}/updated_frac"] == 0.0
    assert skipped["altgrad/ulp_zero_frac"] == 0.0
    for i in (0, 1, 3):
        assert_matches(rows[i], reference([probe.steps[i]], formats=FORMATS), what=i)
    # The skipped step's gradients and weights were still read (as for a non-fused optimizer): its inf gradients
    # are counted apart, and the weights' grid statistics are those of the probe's copies.
    ref = reference([probe.steps[2]], formats=FORMATS)
    assert_matches(skipped, ref, what=2, keys=[k for k in ref if k.rsplit("/", 1)[1] in STIFFNESS_STATS + GRID_STATS])
    assert skipped["altgrad/float8_e4m3fn/grad_nonfinite_frac"] > 0


def test_16_mixed_non_fused_scaler_values(tmp_path):
    """16-mixed with a GradScaler and plain Adam: Lightning unscales before the hook; values equal numpy's."""
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    _, probe, _ = fit(
        tmp_path, QuantizationMonitor(formats=FORMATS), max_steps=4, plugins=[plugin], logger=_csv(tmp_path)
    )
    assert all(s["scale"] == 1.0 for s in probe.steps) and len(probe.steps) == 4
    _check_every_step(csv_rows(tmp_path), probe.steps)


# --- clipping and accumulation -------------------------------------------------------------------------------------


def test_gradients_are_read_before_clipping(tmp_path):
    """gradient_clip_val: the monitor sees the unclipped gradient (what the model produced); the clipped one,
    which the probe reads after the step, gives a different value."""
    torch.manual_seed(0)
    _, probe, _ = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS),
        model=TinyRegressor(optimizer="sgd"),
        max_steps=4,
        gradient_clip_val=1e-3,
        logger=_csv(tmp_path),
    )
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    key = "altgrad/float8_e4m3fn/grad_stiff_ratio_mean"
    for row, step in zip(rows, probe.steps, strict=True):
        g, g_post = np.concatenate([a.ravel() for a in step["g"]]), np.concatenate([a.ravel() for a in step["g_post"]])
        assert np.linalg.norm(g_post) == pytest.approx(1e-3, rel=1e-3)  # clipping did happen
        assert np.linalg.norm(g) > 1e-2
        clipped = reference([step], grad_key="g_post")[key]
        assert clipped < 0.5 * row[key]


def test_accumulation_counts_only_stepping_batches(tmp_path):
    """accumulate_grad_batches=2, 4 optimizer steps (8 batches), logged every 2 steps: each row pools exactly the
    2 optimizer steps of its window (samples = optimizer steps, accumulating batches contribute nothing)."""
    torch.manual_seed(0)
    _, probe, _ = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS),
        max_steps=4,
        log_every_n_steps=2,
        accumulate_grad_batches=2,
        logger=_csv(tmp_path),
    )
    assert probe.befores == len(probe.steps) == 4
    rows = csv_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 3]
    for row, window in zip(rows, (probe.steps[0:2], probe.steps[2:4]), strict=True):
        assert_matches(row, reference(window, formats=FORMATS), what=row["step"])


def test_accumulation_every_step(tmp_path):
    """accumulate_grad_batches=2 with log_every_n_steps=1: one row per optimizer step, its own values."""
    torch.manual_seed(0)
    _, probe, _ = fit(
        tmp_path, QuantizationMonitor(formats=FORMATS), max_steps=3, accumulate_grad_batches=2, logger=_csv(tmp_path)
    )
    _check_every_step(csv_rows(tmp_path), probe.steps)


# --- manual optimization -------------------------------------------------------------------------------------------


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: an encoder with Adam and a head with SGD, each stepping once per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_enc, opt_head = self.optimizers()
        loss = torch.nn.functional.mse_loss(self.head(self.encoder(x)), y)
        opt_enc.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(loss)
        opt_enc.step()
        opt_head.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.encoder.parameters(), lr=1e-2), torch.optim.SGD(self.head.parameters(), lr=0.1)

    def train_dataloader(self):
        return TinyRegressor().train_dataloader()


def test_manual_optimization_two_optimizers(tmp_path):
    """Every real optimizer.step() of both optimizers is measured: a batch's row pools the encoder's and the head's
    steps (the aggregate over optimizers, as the class docstring says); per-parameter keys cover both."""
    torch.manual_seed(0)
    model = TwoOptimizers()
    _, probe, _ = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS, per_parameter=True),
        model=model,
        max_steps=6,  # manual optimization: global_step counts every optimizer step, so 3 batches
        logger=_csv(tmp_path),
    )
    assert [s["opt"] for s in probe.steps] == [0, 1] * 3
    rows = csv_rows(tmp_path)
    assert len(rows) == 3
    names = {n for n, _ in model.named_parameters()}
    for b, row in enumerate(rows):
        window = probe.steps[2 * b : 2 * b + 2]
        assert_matches(row, reference(window, formats=FORMATS), what=b)
        assert {k.rsplit("/", 1)[1] for k in row if k.endswith(("weight", "bias"))} == names
        for step in window:  # each optimizer's parameters, measured on their own
            for name, w, g, before, after in zip(
                step["names"], step["w"], step["g"], step["dtype"], step["w_after"], strict=True
            ):
                one = {"w": [w], "g": [g], "dtype": [before], "w_after": [after], "scale": 1.0}
                ref = reference([one], formats=FORMATS)
                assert_matches(row, {f"{k}/{name}": v for k, v in ref.items()}, what=(b, name))


# --- parameter selection -------------------------------------------------------------------------------------------


class PartlyFrozen(TinyRegressor):
    """The first layer's bias is frozen; ``extra`` is used only on even global steps (no gradient on odd ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].bias.requires_grad_(False)
        self.extra = torch.nn.Parameter(torch.full((3,), 0.5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        if self.global_step % 2 == 0:
            out = out + self.extra.sum()
        return torch.nn.functional.mse_loss(out, y)


def test_frozen_and_gradless_parameters_are_not_counted(tmp_path):
    """A frozen parameter is never measured and gets no key; a parameter without gradient at a step is left out
    of that step's sample (the probe's captures list exactly the parameters that had a gradient)."""
    torch.manual_seed(0)
    model = PartlyFrozen()
    _, probe, _ = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS, per_parameter=True),
        model=model,
        max_steps=4,
        logger=_csv(tmp_path),
    )
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    assert ["extra" in s["names"] for s in probe.steps] == [True, False, True, False]
    assert all("net.0.bias" not in s["names"] for s in probe.steps)
    assert not any(k.endswith("/net.0.bias") for r in rows for k in r)
    assert all("altgrad/bfloat16/grad_below_stiffness_frac/extra" in r for r in rows)
    # Odd steps: extra has no gradient, so its per-parameter window is empty (0.0), not a stall of its 3 weights.
    assert rows[1]["altgrad/float8_e4m3fn/updated_frac/extra"] == 0.0
    assert rows[0]["altgrad/float8_e4m3fn/updated_frac/extra"] == 1.0


# --- robustness ----------------------------------------------------------------------------------------------------


class NaNWeight(TinyRegressor):
    """One weight of the second layer is NaN (it is masked out of the forward pass, so training goes on)."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd")
        with torch.no_grad():
            self.net[2].weight[0, 0] = float("nan")

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.net[1](self.net[0](x))
        w = torch.nan_to_num(self.net[2].weight, nan=0.0)
        return torch.nn.functional.mse_loss(h @ w.T + self.net[2].bias, y)


def test_nan_weight_is_counted_apart_and_training_goes_on(tmp_path):
    """A NaN weight: the *_nonfinite_frac keys are > 0 and every other fraction stays finite (and equals numpy's)."""
    torch.manual_seed(0)
    _, probe, _ = fit(
        tmp_path, QuantizationMonitor(formats=FORMATS), model=NaNWeight(), max_steps=3, logger=_csv(tmp_path)
    )
    rows = csv_rows(tmp_path)
    assert len(rows) == len(probe.steps) == 3
    n = sum(a.size for a in probe.steps[0]["w"])
    for i, row in enumerate(rows):
        assert_matches(row, reference([probe.steps[i]], formats=FORMATS), what=i)
        for fmt in FORMATS:
            assert row[f"altgrad/{fmt}/grad_nonfinite_frac"] == pytest.approx(1 / n)
            assert row[f"altgrad/{fmt}/grid_nonfinite_frac"] == pytest.approx(1 / n)
            assert row[f"altgrad/{fmt}/flip_nonfinite_frac"] == pytest.approx(1 / n)
        assert row["altgrad/ulp_nonfinite_frac"] == pytest.approx(1 / n)
        assert all(math.isfinite(v) for v in monitor_keys(row).values()), row


# --- torch.compile -------------------------------------------------------------------------------------------------


def _compile_available() -> bool:
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


@pytest.mark.skipif(not _compile_available(), reason="torch.compile is not supported here")
@pytest.mark.parametrize(
    ("what", "backend"),
    [
        ("module", "aot_eager"),
        ("inner", "aot_eager"),
        pytest.param("module", "inductor", marks=pytest.mark.slow),  # ~15 s of C++ compilation on CPU
    ],
)
def test_torch_compiled_module(tmp_path, what, backend):
    """A torch.compile'd LightningModule (Lightning unwraps it) or a compiled inner nn.Module trains with the monitor
    and logs the recomputation of the probe's tensors. ``aot_eager`` traces forward and backward like the default
    backend without its C++ build; the default ``inductor`` runs once, marked slow."""
    torch.manual_seed(0)
    model = TinyRegressor()
    if what == "inner":
        model.net = torch.compile(model.net, backend=backend)
        fit_model = model
    else:
        fit_model = torch.compile(model, backend=backend)
    _, probe, _ = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS),
        model=model,
        fit_model=fit_model,
        max_steps=3,
        logger=_csv(tmp_path),
    )
    assert len(probe.steps) == 3
    _check_every_step(csv_rows(tmp_path), probe.steps)


def test_manual_optimization_every_n_steps_samples_both_optimizers(tmp_path):
    """every_n_steps=2 with two optimizers stepping per batch: batches 0 and 2 are sampled, each with both
    optimizers' steps (sampling by global_step, which counts every optimizer step, would only ever see the first
    optimizer)."""
    torch.manual_seed(0)
    _, probe, _ = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS, every_n_steps=2),
        model=TwoOptimizers(),
        max_steps=8,  # 4 batches
        log_every_n_steps=2,
        logger=_csv(tmp_path),
    )
    rows = csv_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 3]
    for row, window in zip(rows, (probe.steps[0:2], probe.steps[4:6]), strict=True):
        assert [s["opt"] for s in window] == [0, 1]
        assert_matches(row, reference(window, formats=FORMATS), what=row["step"])
