"""Every file in configs/ parses and instantiates through the CLI; per_layer and ddp also run a few steps."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from altgrad_lightning import QuantizationMonitor
from altgrad_lightning.example import SequenceTransformer, SyntheticSequenceDataModule
from altgrad_lightning.example.cli import AltgradCLI, _trainer_defaults

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _instantiate(name: str, *overrides: str) -> AltgradCLI:
    """Parse configs/{name} and build Trainer, model and data module without fitting."""
    return AltgradCLI(
        SequenceTransformer,
        SyntheticSequenceDataModule,
        trainer_defaults=_trainer_defaults(),
        run=False,
        args=["--config", str(CONFIGS / name), *overrides],
    )


def _run_cli(tmp_path: Path, config: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``python -m altgrad_lightning fit --config configs/{config} ...`` in ``tmp_path`` (the real entry point)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "altgrad_lightning", "fit", "--config", str(CONFIGS / config), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _monitor(cli: AltgradCLI) -> QuantizationMonitor:
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, QuantizationMonitor)]
    return monitor


def _format_names(cli: AltgradCLI) -> list[str]:
    return [f.name for f in _monitor(cli).formats]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the configs log under ./runs


def test_every_config_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [
        "ddp.yaml",
        "format_sweep.yaml",
        "mlflow.yaml",
        "mx_whatif.yaml",
        "per_layer.yaml",
        "quickstart.yaml",
        "sampled.yaml",
        "storage_e4m3.yaml",
        "storage_e4m3_sr.yaml",
        "wandb.yaml",
    ]


def test_mx_whatif_instantiates_mxfp8_and_mxfp4():
    cli = _instantiate("mx_whatif.yaml")
    monitor = _monitor(cli)
    assert _format_names(cli) == ["float8_e4m3fn", "float4_e2m1fn"]
    assert (monitor.scaling, monitor.block_size, monitor.per_parameter) == ("mx", 32, True)


@pytest.mark.parametrize(
    ("name", "rounding"), [("storage_e4m3.yaml", "nearest"), ("storage_e4m3_sr.yaml", "stochastic")]
)
def test_storage_configs_instantiate_the_quantizer(name: str, rounding: str):
    from altgrad_lightning import WeightQuantizer

    cli = _instantiate(name)
    (quantizer,) = [c for c in cli.trainer.callbacks if isinstance(c, WeightQuantizer)]
    assert quantizer.format.name == "float8_e4m3fn" and quantizer.rounding.value == rounding
    assert _monitor(cli).stall_threshold == 0.9


def test_storage_config_run_observes_what_the_monitor_predicts(tmp_path: Path):
    """configs/storage_e4m3.yaml through the real entry point, 6 steps logged every step: the monitor's predicted
    update_stall_frac equals the WeightQuantizer's observed stored_update_stall_frac in every CSV row."""
    proc = _run_cli(
        tmp_path,
        "storage_e4m3.yaml",
        "--trainer.max_steps=6",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0",
        "--data.num_train=512",
        "--report=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_step: dict[str, dict[str, float]] = {}
    with open(tmp_path / "runs" / "storage_e4m3" / "version_0" / "metrics.csv", newline="") as f:
        for r in csv.DictReader(f):
            by_step.setdefault(r["step"], {}).update({k: float(v) for k, v in r.items() if v != ""})
    key = "altgrad/float8_e4m3fn/"
    rows = [r for r in by_step.values() if key + "update_stall_frac" in r]
    assert len(rows) == 6
    for r in rows:
        assert r[key + "update_stall_frac"] == r[key + "stored_update_stall_frac"]
    assert min(r[key + "update_stall_frac"] for r in rows) < 1.0  # some updates get through


def test_sampled_config_runs_on_a_two_percent_sample(tmp_path: Path):
    """configs/sampled.yaml through the real entry point: a 2 % sample with amax scaling logs the stall fractions
    of both formats, and says how many elements it measures."""
    cli = _instantiate("sampled.yaml")
    monitor = _monitor(cli)
    assert (monitor.sample_fraction, monitor.scaling, monitor.stall_threshold) == (0.02, "amax", 0.9)
    proc = _run_cli(
        tmp_path,
        "sampled.yaml",
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.limit_val_batches=0",
        "--data.num_train=512",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "measuring a fixed sample of" in proc.stdout + proc.stderr
    with open(tmp_path / "runs" / "sampled" / "version_0" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("altgrad/float8_e5m2/update_stall_frac")]
    assert len(rows) == 2
    for r in rows:
        assert 0.0 <= float(r["altgrad/float8_e4m3fn/update_stall_frac"]) <= 1.0


def test_quickstart_instantiates():
    cli = _instantiate("quickstart.yaml")
    assert _format_names(cli) == ["float8_e4m3fn", "float8_e5m2", "bfloat16"]
    monitor = _monitor(cli)
    assert monitor.per_parameter is True and monitor.diagnostics == ("stiffness", "ulp", "flips")
    assert any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks)
    assert [type(lg) for lg in cli.trainer.loggers] == [TensorBoardLogger, CSVLogger]
    assert {lg.log_dir for lg in cli.trainer.loggers} == {os.path.join("runs", "quickstart", "version_0")}
    assert cli.trainer.max_steps == 200 and cli.model.lr == 0.01 and cli.datamodule.task == "sort"
    assert (cli.model.hparams.vocab_size, cli.model.hparams.seq_len) == (16, 12)  # linked from the data module


def test_cli_overrides_reach_model_data_and_trainer():
    cli = _instantiate(
        "quickstart.yaml", "--model.lr=0.5", "--data.seq_len=7", "--data.vocab_size=9", "--trainer.max_steps=3"
    )
    assert cli.model.lr == 0.5 and cli.trainer.max_steps == 3
    assert (cli.model.hparams.vocab_size, cli.model.hparams.seq_len) == (9, 7)
    assert cli.model.head.out_features == 9 and cli.model.pos.shape == (7, 32)


def test_format_sweep_instantiates_a_user_defined_format():
    cli = _instantiate("format_sweep.yaml")
    names = _format_names(cli)
    assert names == [
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float6_e2m3fn",
        "float4_e2m1fn",
        "e0m7",
        "e3m4",
        "bfloat16",
        "float16",
        "e3m4_bias5",
    ]
    custom = _monitor(cli).formats[-1]
    # E3M4, bias 5, OCP-style (only all-ones is NaN): max = 2**(7 - 5) * (1 + 14/16), smallest normal 2**(1 - 5).
    assert (custom.exponent_bits, custom.mantissa_bits, custom.bias) == (3, 4, 5)
    assert custom.max == 7.5 and custom.smallest_normal == 2.0**-4


def test_per_layer_selects_by_regex_and_logs_those_parameters():
    """A 2-step fit: the per-parameter keys are exactly the layers the include/exclude regexes pick."""
    from altgrad_lightning.example.cli import main

    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "per_layer.yaml"),
            "--trainer.max_steps=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.num_sanity_val_steps=0",
            "--data.num_train=128",
            "--report=false",
        ]
    )
    with open(Path("runs/per_layer/version_0/metrics.csv"), newline="") as f:
        columns = next(csv.reader(f))
    head = "altgrad/float8_e4m3fn/update_stall_frac/"
    params = sorted(c[len(head) :] for c in columns if c.startswith(head))
    expected = sorted(
        f"encoder.layers.{i}.{p}"
        for i in (1, 2)
        for p in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")
    )
    assert params == expected


def test_ddp_config_instantiates():
    cli = _instantiate("ddp.yaml")
    strategy: Any = cli.trainer.strategy
    assert type(strategy).__name__ == "DDPStrategy" and cli.trainer.num_devices == 2
    assert _format_names(cli) == ["float8_e4m3fn", "float8_e5m2", "bfloat16"]


@pytest.mark.slow
def test_ddp_config_runs_on_two_cpu_processes(tmp_path: Path):
    """Two processes (gloo) through the real entry point: rank 0 logs and writes the report once."""
    proc = _run_cli(
        tmp_path,
        "ddp.yaml",
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        "--data.num_train=256",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp" / "version_0"
    assert sorted(p.name for p in (tmp_path / "runs" / "ddp").iterdir()) == ["version_0"]
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("altgrad/bfloat16/update_stall_frac")]
    assert [int(r["step"]) for r in rows] == [1, 3]
    assert all(0.0 <= float(r["altgrad/float8_e4m3fn/update_stall_frac"]) <= 1.0 for r in rows)
    assert (run_dir / "summary.md").is_file() and (run_dir / "format_comparison.png").is_file()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (pip install mlflow)")
def test_mlflow_config_instantiates():
    from lightning.pytorch.loggers import MLFlowLogger

    cli = _instantiate("mlflow.yaml")
    (mlflow_logger,) = [lg for lg in cli.trainer.loggers if isinstance(lg, MLFlowLogger)]
    assert mlflow_logger._tracking_uri == "file:./runs/mlruns"
    assert any(isinstance(lg, CSVLogger) for lg in cli.trainer.loggers)
    assert _monitor(cli).per_parameter is True


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_config_instantiates(monkeypatch: pytest.MonkeyPatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = _instantiate("wandb.yaml")
    (wandb_logger,) = [lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)]
    assert wandb_logger._wandb_init["mode"] == "offline"
    assert any(isinstance(lg, CSVLogger) for lg in cli.trainer.loggers)
