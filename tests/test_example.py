"""The bundled example and the ``altgrad-lightning`` entry point: a short real run leaves logs, figures, summary."""

from __future__ import annotations

import csv
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from altgrad_lightning.example import SequenceTransformer, SyntheticSequenceDataModule, make_sequence_task
from altgrad_lightning.example.cli import _share_logger_version, main
from altgrad_lightning.example.model import warmup_cosine

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
FORMATS = ("float8_e4m3fn", "float8_e5m2", "bfloat16")


def _csv_columns_and_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main job's config, shortened to 6 steps, run through ``main`` from a fresh folder."""
    cwd = tmp_path_factory.mktemp("quickstart")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        main(
            [
                "fit",
                "--config",
                str(QUICKSTART),
                "--trainer.max_steps=6",
                "--trainer.log_every_n_steps=2",
                "--trainer.enable_progress_bar=false",
                "--data.num_train=512",
            ]
        )
    finally:
        os.chdir(old)
    return cwd


def test_make_sequence_task_is_seeded_and_correct():
    x, y = make_sequence_task(64, 12, 16, "sort", seed=3)
    x2, _ = make_sequence_task(64, 12, 16, "sort", seed=3)
    x3, _ = make_sequence_task(64, 12, 16, "sort", seed=4)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    assert x.dtype == torch.int64 and x.min() >= 0 and x.max() < 16
    assert torch.equal(y, torch.tensor([sorted(row) for row in x.tolist()]))
    xr, yr = make_sequence_task(5, 7, 10, "reverse", seed=0)
    assert yr.tolist() == [row[::-1] for row in xr.tolist()]
    with pytest.raises(ValueError, match="Expected argument `task`"):
        make_sequence_task(2, 3, 4, "shuffle")  # type: ignore[arg-type]


def test_warmup_cosine_schedule_decays_to_the_floor():
    values = [warmup_cosine(s, 100, 10, 0.1) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0) and values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay: cos(pi/2) = 0
    assert values[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))  # monotone decay


def test_model_shapes_and_parameters():
    model = SequenceTransformer(vocab_size=16, seq_len=12, d_model=32, num_layers=2)
    x, _ = make_sequence_task(3, 12, 16)
    assert model(x).shape == (3, 12, 16)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 16 and "encoder.layers.1.norm2.weight" in names and not any("bias" in n for n in names)
    dm = SyntheticSequenceDataModule(num_train=128, num_val=32, batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (16, 12) and len(dm.train_dataloader()) == 8


def test_loggers_share_one_new_version(tmp_path: Path):
    (tmp_path / "exp" / "version_3").mkdir(parents=True)
    from jsonargparse import Namespace

    def logger(cls: str) -> Namespace:
        return Namespace(class_path=cls, init_args=Namespace(save_dir=str(tmp_path), name="exp", version=None))

    config = Namespace(
        trainer=Namespace(
            logger=[
                logger("lightning.pytorch.loggers.TensorBoardLogger"),
                logger("lightning.pytorch.loggers.CSVLogger"),
                Namespace(class_path="x.MLFlowLogger", init_args=Namespace(version=None)),
            ]
        )
    )
    _share_logger_version(config)
    versions = [lg.init_args.version for lg in config.trainer.logger]
    assert versions == [4, 4, None]


def test_quickstart_run_leaves_logs_figures_and_summary(quickstart_run: Path):
    run_dir = quickstart_run / "runs" / "quickstart" / "version_0"
    assert sorted(p.name for p in (quickstart_run / "runs" / "quickstart").iterdir()) == ["version_0"]
    names = {p.name for p in run_dir.iterdir()}
    assert {"metrics.csv", "config.yaml", "summary.md", "summary.json"} <= names
    assert {"stall_heatmap.png", "format_comparison.png", "ulp_histogram.png"} <= names
    assert any(n.startswith("events.out.tfevents.") for n in names)
    columns, rows = _csv_columns_and_rows(run_dir / "metrics.csv")
    for fmt in FORMATS:
        assert f"altgrad/{fmt}/update_stall_frac" in columns
        assert f"altgrad/{fmt}/update_stall_frac/encoder.layers.0.linear1.weight" in columns
    assert "altgrad/ulp_hist/0" in columns and "lr-AdamW" in columns
    logged_steps = sorted({int(r["step"]) for r in rows if r.get("altgrad/bfloat16/update_stall_frac")})
    assert logged_steps == [1, 3, 5]  # log_every_n_steps=2 over 6 steps
    for row in rows:
        for key in columns:
            if key.startswith("altgrad/") and key.endswith("_frac") and row.get(key):
                assert 0.0 <= float(row[key]) <= 1.0
    assert "## Parameters at risk" in (run_dir / "summary.md").read_text()


def test_report_subcommand_and_module_entry_point(quickstart_run: Path, tmp_path: Path):
    out = tmp_path / "again"
    # `python -m altgrad_lightning report` on the parent folder picks its newest version.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "altgrad_lightning",
            "report",
            str(quickstart_run / "runs" / "quickstart"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    again = (out / "summary.md").read_text().splitlines()
    first = (quickstart_run / "runs/quickstart/version_0/summary.md").read_text().splitlines()
    assert again[1:] == first[1:] and again[0].endswith("runs/quickstart/version_0`")  # line 0 names the folder
    assert str(out / "stall_heatmap.png") in proc.stdout


def test_console_script_is_declared():
    try:
        dist = importlib.metadata.distribution("altgrad_lightning")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("altgrad_lightning is not installed (pip install -e .): no console script to check")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    if "altgrad-lightning" not in scripts:
        pytest.skip("installed metadata predates the console script: reinstall with pip install -e .")
    assert scripts["altgrad-lightning"] == "altgrad_lightning.__main__:main"


def test_report_flag_off_writes_no_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--trainer.max_steps=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.num_sanity_val_steps=0",
            "--data.num_train=64",
            "--report=false",
        ]
    )
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run_dir / "metrics.csv").is_file() and not (run_dir / "summary.md").exists()
