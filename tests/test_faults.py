"""The fault table (issue 6), single process: a real tiny Lightning Trainer on CPU with broken inputs.

Each test is one row of the README's "Fault table". What the loggers wrote is compared with the numpy/ml_dtypes
recomputation of ``callback_helpers.reference`` on tensors a separate probe captured, so "counted apart" means
"equal to a reference that excludes them from every other numerator and denominator".

Rows already covered elsewhere, referenced rather than repeated:

- a NaN weight: ``tests/test_callback_training.py::test_nan_weight_is_counted_apart_and_training_goes_on``
  (here: NaN and ±inf together, and in gradients)
- bfloat16 master weights (``precision="bf16-true"``):
  ``tests/test_callback_training.py::test_bf16_true_master_weights_ulps_in_bfloat16``
- float64 weights (``precision="64-true"``):
  ``tests/test_callback_training.py::test_float64_parameters_do_not_crash_and_match``
- frozen parameters and parameters without gradients at a step:
  ``tests/test_callback_training.py::test_frozen_and_gradless_parameters_are_not_counted``
- AMP skipped steps, scale changes, fused optimizers:
  ``tests/test_callback.py::test_amp_skipped_step_is_counted_not_logged_as_stall``,
  ``tests/test_callback_training.py::test_16_mixed_fused_optimizer_gradients_are_unscaled``,
  ``::test_16_mixed_fused_optimizer_skipped_step_is_counted_not_a_stall``, ``::test_16_mixed_non_fused_scaler_values``
- a resume after a clean stop:
  ``tests/test_callback.py::test_resume_from_checkpoint_logs_what_an_uninterrupted_run_logs``
  (here: after an exception)
"""

from __future__ import annotations

import csv
import glob
import math
import os
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from callback_helpers import TinyRegressor, assert_matches, csv_rows, fit, monitor_keys, reference
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from altgrad_lightning import QuantizationMonitor

FORMATS = ("float8_e4m3fn", "bfloat16")
NONFINITE_KEYS = [f"altgrad/{f}/{k}" for f in FORMATS for k in ("grad_nonfinite_frac", "grid_nonfinite_frac")]


def _csv(tmp_path):
    return CSVLogger(tmp_path, name="csv")


def _check_every_step(rows, steps, formats=FORMATS):
    assert len(rows) == len(steps)
    for i, (row, step) in enumerate(zip(rows, steps, strict=True)):
        assert_matches(row, reference([step], formats=formats), what=i)
        assert all(math.isfinite(v) for v in monitor_keys(row).values()), (i, row)


class MaskedWeights(TinyRegressor):
    """TinyRegressor whose second layer's first three weights are set to ``values`` and masked out of the forward
    pass (their gradient is 0, so SGD leaves them as they are and the loss stays finite)."""

    def __init__(self, values) -> None:
        super().__init__(optimizer="sgd", lr=1e-2)
        self.n_odd = len(values)
        with torch.no_grad():
            for j, v in enumerate(values):
                self.net[2].weight[0, j] = v

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.net[1](self.net[0](x))
        w = self.net[2].weight
        keep = torch.arange(w.shape[1]) >= self.n_odd
        w = torch.where(keep, w, torch.zeros_like(w))
        return torch.nn.functional.mse_loss(h @ w.T + self.net[2].bias, y)


def test_nan_and_inf_weights_counted_apart(tmp_path):
    """NaN, +inf and -inf weights: 3 of 97 elements in each ``*_nonfinite_frac`` key, excluded from every other
    fraction (the reference drops them from numerators and denominators), no NaN in any logged value."""
    torch.manual_seed(0)
    model = MaskedWeights([float("nan"), float("inf"), -float("inf")])
    _, probe, _ = fit(tmp_path, QuantizationMonitor(formats=FORMATS), model=model, max_steps=3, logger=_csv(tmp_path))
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    n = sum(a.size for a in probe.steps[0]["w"])
    for row in rows:
        for key in (
            NONFINITE_KEYS + [f"altgrad/{f}/flip_nonfinite_frac" for f in FORMATS] + ["altgrad/ulp_nonfinite_frac"]
        ):
            assert row[key] == pytest.approx(3 / n), key
        # Fractions among the finite weights only: a denominator of 97 would cap on_grid_frac below 94/97.
        assert row["altgrad/bfloat16/grad_below_stiffness_frac"] > 0


class PoisonedGradients(MaskedWeights):
    """Finite weights; ``on_after_backward`` writes NaN, +inf and -inf into the three masked weights' gradients.
    SGD then turns those weights into NaN, -inf and +inf from the second step on."""

    def __init__(self) -> None:
        super().__init__([0.25, 0.5, -0.75])

    def on_after_backward(self) -> None:
        grad = self.net[2].weight.grad
        grad[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])


def test_nan_and_inf_gradients_counted_apart(tmp_path):
    """NaN/±inf gradients: ``grad_nonfinite_frac`` counts them (first step: only the gradients are non-finite),
    the weights they poison are counted in the grid/flip/ULP non-finite keys, every other value equals the
    reference over the finite pairs, and nothing logged is NaN."""
    torch.manual_seed(0)
    _, probe, _ = fit(
        tmp_path, QuantizationMonitor(formats=FORMATS), model=PoisonedGradients(), max_steps=3, logger=_csv(tmp_path)
    )
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    n = sum(a.size for a in probe.steps[0]["w"])
    first, later = rows[0], rows[1:]
    for f in FORMATS:
        assert first[f"altgrad/{f}/grad_nonfinite_frac"] == pytest.approx(3 / n)
        assert first[f"altgrad/{f}/grid_nonfinite_frac"] == 0.0  # the weights were finite when read
        assert first[f"altgrad/{f}/flip_nonfinite_frac"] == pytest.approx(3 / n)  # ... and are not after the step
        for row in later:
            assert row[f"altgrad/{f}/grid_nonfinite_frac"] == pytest.approx(3 / n)
    assert first["altgrad/ulp_nonfinite_frac"] == pytest.approx(3 / n)


def test_zero_weights_counted_apart(tmp_path):
    """Exact zero weights (stiffness undefined) are ``zero_weight_frac``, excluded from the gradient-stiffness
    fractions, and on the grid (0 is a grid value) for the grid statistics."""
    torch.manual_seed(0)
    model = MaskedWeights([0.0, -0.0, 0.0, 0.0])
    _, probe, _ = fit(tmp_path, QuantizationMonitor(formats=FORMATS), model=model, max_steps=3, logger=_csv(tmp_path))
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    n = sum(a.size for a in probe.steps[0]["w"])
    for row in rows:
        for f in FORMATS:
            assert row[f"altgrad/{f}/zero_weight_frac"] == pytest.approx(4 / n)
            assert row[f"altgrad/{f}/grad_nonfinite_frac"] == 0.0


def test_denormal_float32_weights(tmp_path):
    """float32 denormal weights (not flushed): subnormal spacing for stiffness, underflow in float8_e4m3fn, a
    bfloat16 subnormal on its grid, all equal to the reference."""
    torch.manual_seed(0)
    values = [2.0**-149, -3 * 2.0**-149, 2.0**-130, -(2.0**-127), 2.0**-126 - 2.0**-149]
    model = MaskedWeights(values)
    _, probe, _ = fit(tmp_path, QuantizationMonitor(formats=FORMATS), model=model, max_steps=3, logger=_csv(tmp_path))
    assert np.array_equal(probe.steps[-1]["w"][2][0, :5], np.array(values))  # really denormal, really stored
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    n = sum(a.size for a in probe.steps[0]["w"])
    assert all(r["altgrad/float8_e4m3fn/underflow_frac"] >= 5 / n for r in rows)


def test_float16_master_weights(tmp_path):
    """Pure float16 training (``precision="16-true"``: float16 parameters, no master copy): ULPs are counted in
    float16's grid and every value equals the reference."""
    torch.manual_seed(0)
    trainer, probe, _ = fit(
        tmp_path,
        QuantizationMonitor(formats=FORMATS),
        model=TinyRegressor(lr=1e-3),
        max_steps=4,
        precision="16-true",
        logger=_csv(tmp_path),
    )
    assert all(a.dtype == np.float16 for a in probe.steps[0]["dtype"])
    rows = csv_rows(tmp_path)
    _check_every_step(rows, probe.steps)
    assert 0 < rows[-1]["altgrad/ulp_median"] < 2**8  # float16 steps, not float32's (~2**13 times more)
    assert all(r["altgrad/skipped_steps"] == 0 for r in rows)


def _count_selection_warnings(record) -> int:
    return sum("no trainable parameter matches" in str(w.message) for w in record)


@pytest.mark.parametrize("selection", [{"include": "no_such_parameter"}, {"exclude": ".*"}])
def test_selection_matching_nothing_warns_once_and_trains(tmp_path, selection):
    """include/exclude selecting nothing: exactly one warning, the run trains to the end, logs no NaN."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, probe, _ = fit(tmp_path, QuantizationMonitor(**selection), max_steps=3, logger=_csv(tmp_path))
    assert _count_selection_warnings(record) == 1
    assert trainer.global_step == 3 and len(probe.steps) == 3
    rows = csv_rows(tmp_path)
    assert len(rows) == 3 and all(math.isfinite(v) for r in rows for v in monitor_keys(r).values())


class NoParameters(pl.LightningModule):
    """A model without any parameter: no optimizer; ``training_step`` returns None (nothing to optimize)."""

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 2)), batch_size=2)


def test_model_with_zero_parameters(tmp_path):
    """A model with zero parameters: one selection warning, no crash, nothing measured."""
    model = NoParameters()
    assert not list(model.parameters())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = pl.Trainer(
            default_root_dir=tmp_path,
            max_epochs=1,
            logger=_csv(tmp_path),
            callbacks=[QuantizationMonitor()],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            accelerator="cpu",
            devices=1,
            log_every_n_steps=1,
        )
        trainer.fit(model)
    assert _count_selection_warnings(record) == 1
    assert trainer.state.finished
    assert all(not opt._optimizer_step_post_hooks for opt in trainer.optimizers)


def _series(root) -> dict[int, dict[str, float]]:
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "csv", "*", "metrics.csv"))):
        with open(path) as fh:
            rows += [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]
    return {int(r["step"]): {k: v for k, v in r.items() if k.startswith("altgrad/")} for r in rows}


class CrashAt(pl.Callback):
    def __init__(self, step: int, error: type[BaseException], hook: str = "on_train_batch_end") -> None:
        self.step, self.error, self.hook = step, error, hook

    def _maybe(self, trainer) -> None:
        if trainer.global_step == self.step:
            raise self.error("injected fault")

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.hook == "on_train_batch_end":
            self._maybe(trainer)

    def on_before_optimizer_step(self, trainer, *args) -> None:
        if self.hook == "on_before_optimizer_step":
            self._maybe(trainer)


def _trainer(root, callbacks, logger=True, **kwargs):
    return pl.Trainer(
        default_root_dir=root,
        log_every_n_steps=3,
        logger=CSVLogger(root, name="csv") if logger else False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        limit_train_batches=4,
        **kwargs,
    )


def test_exception_mid_run_then_resume_logs_the_uninterrupted_series(tmp_path):
    """A RuntimeError at step 6 (epoch 1, mid logging window); resuming from the last checkpoint (end of epoch 0,
    which holds the monitor's pending window sums) logs the same series as a run that never failed. The exception
    also leaves no hook on the optimizer."""

    def ckpt(root):
        return ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), save_last=True)

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    torch.manual_seed(0)
    _trainer(straight, [QuantizationMonitor(formats=FORMATS), ckpt(straight)], max_epochs=3).fit(TinyRegressor())

    torch.manual_seed(0)
    monitor = QuantizationMonitor(formats=FORMATS)
    trainer = _trainer(broken, [monitor, ckpt(broken), CrashAt(6, RuntimeError)], max_epochs=3)
    model = TinyRegressor()
    with pytest.raises(RuntimeError, match="injected fault"):
        trainer.fit(model)
    assert trainer.global_step == 6
    assert not trainer.optimizers[0]._optimizer_step_post_hooks and not monitor._handles

    torch.manual_seed(1)  # the resumed run must not depend on the fresh model's initialisation
    resumed = _trainer(broken, [QuantizationMonitor(formats=FORMATS), ckpt(broken)], max_epochs=3)
    resumed.fit(TinyRegressor(), ckpt_path=os.path.join(broken, "ckpt", "last.ckpt"))

    a, b = _series(straight), _series(broken)
    assert sorted(a) == sorted(b) == [2, 5, 8, 11]
    for step in a:
        assert a[step].keys() == b[step].keys()
        for key, value in a[step].items():
            assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (step, key)


@pytest.mark.parametrize("hook", ["on_train_batch_end", "on_before_optimizer_step"])
def test_keyboard_interrupt_leaves_no_hooks(tmp_path, hook):
    """KeyboardInterrupt (Lightning's graceful stop) between steps, or inside a step after the monitor read the
    weights: no step hook stays on the optimizer and no snapshot is kept."""
    monitor = QuantizationMonitor(formats=FORMATS)
    trainer = _trainer(tmp_path, [monitor, CrashAt(2, KeyboardInterrupt, hook)], max_steps=5, logger=False)
    with pytest.raises(SystemExit):  # Lightning turns a KeyboardInterrupt into a graceful shutdown and exit(1)
        trainer.fit(TinyRegressor())
    assert trainer.interrupted and trainer.global_step == 2
    assert not trainer.optimizers[0]._optimizer_step_post_hooks
    assert not monitor._handles and not monitor._pending and not monitor._stepping
