"""The report: its numbers equal the logged ones (read here with the csv module), its figures are real PNGs."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import pytest

from altgrad_lightning.report import find_run_dir, load_run, main, write_report

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("stall_heatmap.png", "format_comparison.png", "ulp_histogram.png")


def _logged(path: Path) -> dict[str, dict[int, float]]:
    """key -> {step: value}, read independently of the package (rows of a step may be split)."""
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, cell in row.items():
                if key not in ("step", "epoch") and cell not in (None, ""):
                    out.setdefault(key, {})[int(row["step"])] = float(cell)
    return out


def _table(md: str, heading_regex: str) -> list[list[str]]:
    """Rows (cells stripped of backticks) of the first Markdown table after a line matching ``heading_regex``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(heading_regex, line))
    rows, seen = [], False
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
            if not set(cells[0]) <= {"-"} and cells[0] not in ("format", "parameter"):
                rows.append(cells)
        elif seen:
            break
    return rows


def _num(cell: str) -> float:
    return float(cell.split()[0])


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real run of the example (per-parameter keys for three formats, LR monitor, histogram)."""
    from altgrad_lightning.example.cli import main as cli_main

    cwd = tmp_path_factory.mktemp("report_run")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        cli_main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "quickstart.yaml"),
                "--trainer.max_steps=12",
                "--trainer.log_every_n_steps=3",
                "--trainer.enable_progress_bar=false",
                "--trainer.num_sanity_val_steps=0",
                "--data.num_train=1024",
                "--report=false",
            ]
        )
    finally:
        os.chdir(old)
    return cwd / "runs" / "quickstart" / "version_0"


def test_summary_numbers_equal_the_logged_ones(real_run: Path, tmp_path: Path):
    written = write_report(real_run, tmp_path)
    assert {p.name for p in written} == {*FIGURES, "summary.md", "summary.json"}
    logged = _logged(real_run / "metrics.csv")
    md = (tmp_path / "summary.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())

    lr = logged["lr-AdamW"]
    stall_steps = sorted(logged["altgrad/bfloat16/update_stall_frac"])
    assert stall_steps == [2, 5, 8, 11]
    peak = max(stall_steps, key=lambda s: (lr[s], -s))
    assert summary["learning_rate"]["peak_lr_step"] == peak

    rows = _table(md, r"^## Stall fraction per format")
    assert [r[0] for r in rows] == ["bfloat16", "float8_e4m3fn", "float8_e5m2"]
    for fmt, first, at_peak, last, mean, below, windows in rows:
        stall = logged[f"altgrad/{fmt}/update_stall_frac"]
        values = [stall[s] for s in sorted(stall)]
        below_values = list(logged[f"altgrad/{fmt}/grad_below_stiffness_frac"].values())
        assert _num(first) == round(values[0], 4) and f"(step {stall_steps[0]})" in first
        assert _num(at_peak) == round(stall[peak], 4)
        assert _num(last) == round(values[-1], 4) and f"(step {stall_steps[-1]})" in last
        assert _num(mean) == round(sum(values) / len(values), 4)
        assert _num(below) == round(sum(below_values) / len(below_values), 4)
        assert int(windows) == len(values)
        exact = summary["formats"][fmt]["update_stall_frac"]
        assert exact["first"] == values[0] and exact["last"] == values[-1]
        assert exact["mean"] == pytest.approx(sum(values) / len(values), rel=1e-12)

    # Parameters at risk: the highest mean per-parameter stall fraction, in that order, with the logged numbers.
    for fmt in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        head = f"altgrad/{fmt}/update_stall_frac/"
        means = {k[len(head) :]: sum(v.values()) / len(v) for k, v in logged.items() if k.startswith(head)}
        assert len(means) == 16
        expected = sorted(means, key=lambda p: (-means[p], p))[:5]
        at_risk = _table(md, rf"Highest mean `update_stall_frac` in `{fmt}`")
        assert [r[0] for r in at_risk] == expected
        for param, mean_stall, last_stall, _ in at_risk:
            series = logged[head + param]
            assert _num(mean_stall) == round(means[param], 4)
            assert _num(last_stall) == round(series[max(series)], 4)


def test_figures_are_valid_pngs(real_run: Path, tmp_path: Path):
    write_report(real_run, tmp_path)
    for name in FIGURES:
        _assert_png(tmp_path / name)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_hand_written_log_split_rows_and_ranking(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Known numbers: rows of one step split over two lines (as CSVLogger writes them), two parameters."""
    s, b = "altgrad/e4m3/update_stall_frac", "altgrad/e4m3/grad_below_stiffness_frac"
    header = [
        "epoch",
        "step",
        s,
        f"{s}/a.weight",
        f"{s}/b.weight",
        b,
        "lr-SGD",
        "altgrad/ulp_hist/0",
        "altgrad/ulp_hist/1",
        "altgrad/ulp_hist/2-3",
    ]
    rows = [
        [0, 4, 0.5, 0.25, 0.75, 0.5, "", 0.5, 0.25, 0.25],
        [0, 4, "", "", "", "", 0.1, "", "", ""],
        [0, 9, 0.75, 0.5, 1.0, 0.25, 0.05, 0.75, 0.25, 0.0],
        [0, 14, 1.0, 1.0, 1.0, "nan", 0.0, 1.0, 0.0, 0.0],
    ]
    run = tmp_path / "exp" / "version_1"
    _write_csv(run / "metrics.csv", header, rows)
    _write_csv(tmp_path / "exp" / "version_0" / "metrics.csv", ["step"], [])
    assert find_run_dir(tmp_path / "exp") == run  # the newest version
    log = load_run(tmp_path / "exp")
    assert log.formats == ["e4m3"] and log.lr_key == "lr-SGD" and log.histogram_buckets == ["0", "1", "2-3"]
    main([str(tmp_path / "exp")])
    assert str(run / "summary.md") in capsys.readouterr().out
    md = (run / "summary.md").read_text()
    (row,) = _table(md, r"^## Stall fraction per format")
    assert row == ["e4m3", "0.5000 (step 4)", "0.5000", "1.0000 (step 14)", "0.7500", "0.3750", "3"]
    at_risk = _table(md, r"Highest mean `update_stall_frac` in `e4m3`")
    assert at_risk == [["b.weight", "0.9167", "1.0000", "—"], ["a.weight", "0.5833", "1.0000", "—"]]
    assert "0.1 at step 4, peak 0.1 at step 4, 0 at step 14" in md
    for name in FIGURES:
        _assert_png(run / name)


def test_no_monitor_keys_is_an_error(tmp_path: Path):
    _write_csv(tmp_path / "metrics.csv", ["step", "train/loss"], [[0, 1.0]])
    with pytest.raises(ValueError, match="QuantizationMonitor"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="metrics.csv or TensorBoard"):
        find_run_dir(tmp_path / "nothing_here" if (tmp_path / "nothing_here").mkdir() is None else tmp_path)


def test_tensorboard_only_run_is_read(real_run: Path, tmp_path: Path):
    """Without metrics.csv the event files are read: same numbers (float32 in TensorBoard)."""
    pytest.importorskip("tensorboard", reason="tensorboard is needed to read event files")
    tb_only = tmp_path / "tb"
    tb_only.mkdir()
    for event in real_run.glob("events.out.tfevents.*"):
        (tb_only / event.name).write_bytes(event.read_bytes())
    tb = load_run(tb_only)
    csv_log = load_run(real_run)
    key = "altgrad/float8_e4m3fn/update_stall_frac"
    assert sorted(tb.series(key)) == sorted(csv_log.series(key))
    for step, value in csv_log.series(key).items():
        assert math.isclose(tb.series(key)[step], value, rel_tol=1e-6)
