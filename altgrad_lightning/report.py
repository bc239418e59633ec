"""Figures and a Markdown summary of a run's logs: ``altgrad-lightning report RUN_DIR``.

Reads what :class:`~altgrad_lightning.QuantizationMonitor` logged (the ``metrics.csv`` of Lightning's
``CSVLogger``, or else the TensorBoard event files of the folder) and writes into the run folder:

- ``stall_heatmap.png``: ``update_stall_frac`` per parameter (rows) and logged step (columns), one panel per
  format logged with ``per_parameter=True``;
- ``format_comparison.png``: ``update_stall_frac`` and ``grad_below_stiffness_frac`` over steps, one line per
  format, with the learning rate when a ``LearningRateMonitor`` logged it;
- ``ulp_histogram.png``: how many storage-dtype ULPs the weights moved per step (``ulp_hist/*``), early vs late;
- ``mx_block_heatmap.png``, when the monitor ran with ``scaling="mx"`` and ``per_parameter=True``: the stall
  fraction of every MX block over the whole run, per format and (largest) parameter, from ``mx_block_stalls.pt``;
- ``summary.md`` (and the same numbers in ``summary.json``): per-format stall fractions (first logged window, the
  window of peak learning rate, last window, mean over windows) and the parameters at risk.

Every number of the summary is a value of the log (or a plain mean of logged values), so it can be checked against
the CSV. This module uses matplotlib and the standard library (and torch to read ``mx_block_stalls.pt``); it does not
import Lightning.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RunLog",
    "find_run_dir",
    "load_run",
    "main",
    "plot_format_comparison",
    "plot_stall_heatmap",
    "plot_ulp_histogram",
    "summarize",
    "write_report",
]

Series = dict[int, float]  # optimizer step -> logged value

STALL = "update_stall_frac"
BELOW = "grad_below_stiffness_frac"
_FIGURES = ("stall_heatmap.png", "format_comparison.png", "ulp_histogram.png")
MX_FIGURE = "mx_block_heatmap.png"


@dataclass
class RunLog:
    """The scalars of one run: ``metrics[key][step] = value`` (NaN and empty cells left out)."""

    run_dir: Path
    metrics: dict[str, Series]
    prefix: str = "altgrad"
    keys_in_order: list[str] = field(default_factory=list)

    def series(self, key: str) -> Series:
        return self.metrics.get(key, {})

    @property
    def formats(self) -> list[str]:
        """Formats with a logged ``update_stall_frac`` or ``grad_below_stiffness_frac``, in logging order."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}/([^/]+)/(?:{STALL}|{BELOW})$")
        return list(dict.fromkeys(m.group(1) for k in self.keys_in_order if (m := pattern.match(k))))

    def parameters(self, fmt: str, stat: str = STALL) -> list[str]:
        """Parameters with a per-parameter ``stat`` for ``fmt``, in logging (model) order."""
        head = f"{self.prefix}/{fmt}/{stat}/"
        return [k[len(head) :] for k in self.keys_in_order if k.startswith(head)]

    @property
    def lr_key(self) -> str | None:
        """The first learning-rate key of Lightning's ``LearningRateMonitor`` (``lr-AdamW``, ...), if logged."""
        return next((k for k in self.keys_in_order if k.startswith("lr-") and "momentum" not in k), None)

    @property
    def histogram_buckets(self) -> list[str]:
        """``ulp_hist`` bucket labels (``0``, ``1``, ``2-3``, ...) in increasing order."""
        head = f"{self.prefix}/ulp_hist/"
        labels = [k[len(head) :] for k in self.keys_in_order if k.startswith(head)]
        return sorted(labels, key=lambda s: int(s.split("-")[0]))


# --- reading ---------------------------------------------------------------------------------------------------
def find_run_dir(path: str | os.PathLike[str]) -> Path:
    """The run folder for ``path``: itself if it holds logs, else its newest ``version_N`` subfolder with logs.

    So ``altgrad-lightning report runs/quickstart`` reports the latest run of that experiment.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"Expected argument `run_dir` to be a folder of logs, but {str(root)!r} is not one")
    if _has_logs(root):
        return root
    versions = [(int(m.group(1)), d) for d in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", d.name))]
    for _, d in sorted(versions, reverse=True):
        if _has_logs(d):
            return d
    raise FileNotFoundError(
        f"Expected argument `run_dir` to hold metrics.csv or TensorBoard event files (or version_N folders with "
        f"them), but found none in {str(root)!r}"
    )


def _has_logs(d: Path) -> bool:
    return (d / "metrics.csv").is_file() or any(d.glob("events.out.tfevents.*"))


def read_csv_metrics(path: str | os.PathLike[str]) -> tuple[dict[str, Series], list[str]]:
    """Scalars of a Lightning ``CSVLogger`` file. Rows of one step may be split; they are merged by step."""
    metrics: dict[str, Series] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c not in ("step", "epoch")]
        for row in reader:
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for key in columns:
                cell = row.get(key)
                if cell in (None, ""):
                    continue
                value = float(cell)
                if not math.isnan(value):
                    metrics.setdefault(key, {})[step] = value
    return metrics, columns


def read_tensorboard_metrics(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Series], list[str]]:
    """Scalars of the TensorBoard event files in ``run_dir`` (needs the ``tensorboard`` package)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    metrics: dict[str, Series] = {}
    for key in acc.Tags()["scalars"]:
        metrics[key] = {e.step: float(e.value) for e in acc.Scalars(key) if not math.isnan(e.value)}
    return metrics, list(metrics)


def load_run(run_dir: str | os.PathLike[str], prefix: str = "altgrad") -> RunLog:
    """Read a run folder (see :func:`find_run_dir`): ``metrics.csv`` if present, else TensorBoard events."""
    d = find_run_dir(run_dir)
    if (d / "metrics.csv").is_file():
        metrics, order = read_csv_metrics(d / "metrics.csv")
    else:
        metrics, order = read_tensorboard_metrics(d)
    return RunLog(d, metrics, prefix, order)


# --- numbers ---------------------------------------------------------------------------------------------------
def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _describe(series: Series, peak_step: int | None) -> dict[str, Any]:
    steps = sorted(series)
    if not steps:
        return {}
    out = {
        "first_step": steps[0],
        "first": series[steps[0]],
        "last_step": steps[-1],
        "last": series[steps[-1]],
        "mean": _mean([series[s] for s in steps]),
        "windows": len(steps),
    }
    if peak_step is not None and peak_step in series:
        out["peak_lr_step"] = peak_step
        out["at_peak_lr"] = series[peak_step]
    return out


def summarize(run: RunLog, top_k: int = 5) -> dict[str, Any]:
    """The numbers of ``summary.md``: per format and per parameter, all taken from the log.

    ``mean`` is the plain mean over the logged windows (each window pools ``log_every_n_steps`` steps);
    ``at_peak_lr`` is the window logged at the step of the highest logged learning rate.
    """
    lr_key = run.lr_key
    lr = run.series(lr_key) if lr_key else {}
    stall_steps = set().union(*(run.series(f"{run.prefix}/{f}/{STALL}") for f in run.formats)) if run.formats else set()
    peak_step = max((s for s in lr if s in stall_steps), key=lambda s: (lr[s], -s), default=None)
    formats: dict[str, Any] = {}
    at_risk: dict[str, list[dict[str, Any]]] = {}
    for fmt in run.formats:
        formats[fmt] = {
            stat: _describe(run.series(f"{run.prefix}/{fmt}/{stat}"), peak_step) for stat in (STALL, BELOW, "flip_frac")
        }
        ranked: list[dict[str, Any]] = []
        for param in run.parameters(fmt):
            stall = run.series(f"{run.prefix}/{fmt}/{STALL}/{param}")
            below = run.series(f"{run.prefix}/{fmt}/{BELOW}/{param}")
            if not stall:
                continue
            ranked.append(
                {
                    "parameter": param,
                    "mean_stall": _mean(list(stall.values())),
                    "last_stall": stall[max(stall)],
                    "mean_below": _mean(list(below.values())) if below else float("nan"),
                }
            )
        ranked.sort(key=lambda r: (-float(r["mean_stall"]), str(r["parameter"])))
        if ranked:
            at_risk[fmt] = ranked[:top_k]
    return {
        "run_dir": str(run.run_dir),
        "prefix": run.prefix,
        "learning_rate": _describe(lr, peak_step) if lr else {},
        "learning_rate_key": lr_key,
        "formats": formats,
        "at_risk": at_risk,
    }


def _f(x: Any) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: what a reader needs to decide which parameters a low-precision format would freeze."""
    p = summary["prefix"]
    lines = [f"# Bit-stall report: `{summary['run_dir']}`", ""]
    lr = summary["learning_rate"]
    if lr:
        lines += [
            f"Learning rate (`{summary['learning_rate_key']}`): {lr['first']:.3g} at step {lr['first_step']}, "
            f"peak {lr.get('at_peak_lr', float('nan')):.3g} at step {lr.get('peak_lr_step', '—')}, "
            f"{lr['last']:.3g} at step {lr['last_step']}.",
            "",
        ]
    lines += [
        f"## Stall fraction per format (`{p}/{{format}}/{STALL}`)",
        "",
        "Among the weights the optimizer changed, the fraction whose value in the format stayed the same: the",
        "update would have been lost had the weights been stored in that format. Each logged value pools the steps",
        "of one logging window; *mean* is the plain mean over the logged windows.",
        "",
        "| format | first window | at peak LR | last window | mean | grad below spacing (mean) | windows |",
        "|---|---|---|---|---|---|---|",
    ]
    for fmt, stats in summary["formats"].items():
        s, b = stats[STALL], stats[BELOW]
        if not s:
            continue
        lines.append(
            f"| `{fmt}` | {_f(s['first'])} (step {s['first_step']}) | {_f(s.get('at_peak_lr'))} | "
            f"{_f(s['last'])} (step {s['last_step']}) | {_f(s['mean'])} | {_f(b.get('mean'))} | {s['windows']} |"
        )
    lines += [
        "",
        f"*grad below spacing* is `{p}/{{format}}/{BELOW}`: the fraction of weights whose gradient is smaller than",
        "the format's grid spacing at the weight (a plain-SGD step of learning rate 1 would not reach the next value).",
        "",
        "## Parameters at risk",
        "",
    ]
    if not summary["at_risk"]:
        lines.append("No per-parameter keys in this log: run the monitor with `per_parameter: true` to rank them.")
    for fmt, rows in summary["at_risk"].items():
        lines += [
            f"Highest mean `{STALL}` in `{fmt}` (the weights this format would freeze first):",
            "",
            "| parameter | mean stall | last stall | grad below spacing (mean) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{r['parameter']}` | {_f(r['mean_stall'])} | {_f(r['last_stall'])} | {_f(r['mean_below'])} |"
            for r in rows
        ]
        lines.append("")
    lines += ["Figures: " + ", ".join(f"`{name}`" for name in _FIGURES) + ".", ""]
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------------------------
def _format_colors(run: RunLog) -> dict[str, str]:
    """One colour per format, the same in every figure."""
    return {fmt: f"C{i % 10}" for i, fmt in enumerate(run.formats)}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_stall_heatmap(run: RunLog, path: str | os.PathLike[str]) -> bool:
    """Parameters x logged steps, colour = ``update_stall_frac``, a panel per format (False: no per-parameter keys)."""
    fmts = [f for f in run.formats if run.parameters(f)]
    if not fmts:
        return False
    plt = _pyplot()
    import numpy as np

    params = run.parameters(fmts[0])
    steps = sorted(set().union(*(run.series(f"{run.prefix}/{fmts[0]}/{STALL}/{p}") for p in params)))
    height = max(3.5, 0.32 * len(params) + 1.8)
    fig, axes = plt.subplots(1, len(fmts), figsize=(4.2 * len(fmts) + 3.5, height), sharey=True, squeeze=False)
    image = None
    for ax, fmt in zip(axes[0], fmts, strict=True):
        grid = np.full((len(params), len(steps)), np.nan)
        for i, param in enumerate(params):
            series = run.series(f"{run.prefix}/{fmt}/{STALL}/{param}")
            for j, step in enumerate(steps):
                grid[i, j] = series.get(step, np.nan)
        image = ax.imshow(
            grid,
            aspect="auto",
            interpolation="nearest",
            vmin=0.0,
            vmax=1.0,
            cmap="magma",
            extent=(-0.5, len(steps) - 0.5, len(params) - 0.5, -0.5),
        )
        ax.set_title(fmt)
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int)
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
        ax.set_xlabel("optimizer step (end of logging window)")
    axes[0][0].set_yticks(range(len(params)), params, fontsize=8)
    axes[0][0].set_ylabel("parameter")
    fig.suptitle(
        "Per-parameter bit stalls: share of each tensor's weight updates the format would swallow\n"
        f"({run.prefix}/{{format}}/{STALL}/{{parameter}}; 0 = every update changes the stored value, "
        "1 = none does)",
        fontsize=11,
    )
    fig.colorbar(image, ax=axes[0].tolist(), label="update stall fraction (0–1)", fraction=0.03, pad=0.02)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


MX_BLOCK_FILE = "mx_block_stalls.pt"
_MX_PANELS = 6  # the largest parameters per format


def plot_mx_block_heatmap(run: RunLog, path: str | os.PathLike[str]) -> bool:
    """Per MX block (columns) and row of each parameter (rows), the share of the block's updates the format would
    swallow over the whole fit, from the monitor's ``mx_block_stalls.pt`` (``scaling="mx"`` with
    ``per_parameter``); one row of panels per format, the largest parameters first (False: no such file)."""
    file = run.run_dir / MX_BLOCK_FILE
    if not file.is_file():
        return False
    import numpy as np
    import torch

    data = torch.load(file, map_location="cpu", weights_only=True)
    stalls: dict[str, dict[str, torch.Tensor]] = {f: p for f, p in data["stalls"].items() if p}
    if not stalls:
        return False
    plt = _pyplot()
    n_cols = min(_MX_PANELS, max(len(p) for p in stalls.values()))
    size = (3.2 * n_cols + 1.5, 3.4 * len(stalls) + 1.0)
    fig, axes = plt.subplots(len(stalls), n_cols, figsize=size, squeeze=False, layout="constrained")
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad("lightgrey")  # blocks without any update
    image = None
    for r, (fmt, by_param) in enumerate(stalls.items()):
        largest = sorted(by_param, key=lambda n: -by_param[n][..., 0].numel())[:n_cols]
        for c in range(n_cols):
            ax = axes[r][c]
            if c >= len(largest):
                ax.axis("off")
                continue
            counts = by_param[largest[c]].to(torch.float64).numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.where(counts[..., 0] > 0, counts[..., 1] / counts[..., 0], np.nan)
            image = ax.imshow(frac, aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap=cmap)
            n_blocks = frac.shape[1]
            ax.set_xticks(np.unique(np.linspace(0, max(n_blocks - 1, 0), min(n_blocks, 6)).round().astype(int)))
            ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
            ax.set_title(f"{fmt}\n{largest[c]}", fontsize=8)
            ax.set_xlabel(f"block of {data['block_size']} (last dim)", fontsize=8)
            if c == 0:
                ax.set_ylabel("row", fontsize=8)
    fig.suptitle(
        "MX block stalls over the whole run: share of each block's weight updates the MX format would swallow\n"
        "(0 = every update changes the stored value, 1 = none does; grey = no update)",
        fontsize=10,
    )
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="update stall fraction (0–1)", fraction=0.03, pad=0.02)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_format_comparison(run: RunLog, path: str | os.PathLike[str]) -> bool:
    """``update_stall_frac`` and ``grad_below_stiffness_frac`` over steps, one line per format; LR on a twin axis."""
    if not run.formats:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True)
    panels = (
        (STALL, "Updates the format would swallow", "update stall fraction\n(of updated weights)"),
        (BELOW, "Gradients smaller than the format's grid spacing", "fraction of weights\nwith |grad| < spacing"),
    )
    lr_key = run.lr_key
    colors = _format_colors(run)
    for ax, (stat, title, ylabel) in zip(axes, panels, strict=True):
        for fmt in run.formats:
            series = run.series(f"{run.prefix}/{fmt}/{stat}")
            if series:
                steps = sorted(series)
                ax.plot(steps, [series[s] for s in steps], marker="o", markersize=3, label=fmt, color=colors[fmt])
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({run.prefix}/{{format}}/{stat})", fontsize=10)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if lr_key:
            lr = run.series(lr_key)
            twin = ax.twinx()
            steps = sorted(lr)
            (line,) = twin.plot(steps, [lr[s] for s in steps], color="0.5", linestyle="--", label="learning rate")
            twin.set_ylabel("learning rate", color="0.4")
            twin.set_ylim(bottom=0)
            handles, labels = [*handles, line], [*labels, "learning rate (right axis)"]
        ax.legend(handles, labels, loc="best", fontsize=8, title="target format")
    axes[-1].set_xlabel("optimizer step (each point pools the steps of one logging window)")
    fig.suptitle("Format comparison on the same training run (weights stored in float32)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _bucket_tick(label: str) -> str:
    lo = int(label.split("-")[0])
    return label if lo < 4 else f"$2^{{{lo.bit_length() - 1}}}$"


def plot_ulp_histogram(
    run: RunLog, path: str | os.PathLike[str], storage_mantissa_bits: int = 23, formats: Sequence[Any] = ()
) -> bool:
    """Share of weights per bucket of storage-dtype ULPs moved in one step: first vs last quarter of the windows.

    Vertical lines mark one grid step of each target format in storage ULPs in the normal range,
    ``2**(storage_mantissa_bits - M)`` (float32 storage: 23); a move shorter than half of it usually stalls there.
    """
    buckets = run.histogram_buckets
    if not buckets:
        return False
    plt = _pyplot()
    import numpy as np

    from altgrad_lightning.formats import get_format

    keys = [f"{run.prefix}/ulp_hist/{b}" for b in buckets]
    steps = sorted(set().union(*(run.series(k) for k in keys)))
    quarter = max(1, len(steps) // 4)
    groups = [("early", steps[:quarter]), ("late", steps[-quarter:])]
    values = {
        name: np.array([_mean([run.series(k)[s] for s in sel if s in run.series(k)]) for k in keys])
        for name, sel in groups
    }
    used = [i for i in range(len(buckets)) if any(np.nan_to_num(v[i]) > 0 for v in values.values())]
    last = (max(used) if used else len(buckets) - 1) + 1
    x = np.arange(last)
    fig, ax = plt.subplots(figsize=(10, 5.2))
    width = 0.4
    for offset, shade, (name, sel) in zip((-width / 2, width / 2), ("0.7", "0.25"), groups, strict=True):
        ax.bar(
            x + offset,
            np.nan_to_num(values[name][:last]),
            width,
            color=shade,
            label=f"{name}: mean of the windows logged at steps {sel[0]}–{sel[-1]}",
        )
    colors = _format_colors(run)
    top = ax.get_ylim()[1]
    for fmt_name in formats or run.formats:
        fmt = get_format(fmt_name)
        shift = storage_mantissa_bits - fmt.mantissa_bits
        # Bucket index k + 1 holds 2**k ... 2**(k+1) - 1 ULPs, so its left edge sits at k + 0.5.
        if 1 <= shift < last - 1:
            color = colors.get(fmt.name, "k")
            ax.axvline(shift + 0.5, color=color, linestyle=":", linewidth=1.8)
            ax.text(
                shift + 0.5,
                top * 0.98,
                f"one {fmt.name} step ($2^{{{shift}}}$)",
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color=color,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.6},
            )
    ax.set_xticks(x, [_bucket_tick(b) for b in buckets[:last]], fontsize=8)
    ax.set_xlabel(
        "distance moved in one optimizer step, in ULPs of the weights' storage dtype (dotted lines assume float32)\n"
        "bucket $2^k$ holds $2^k$ … $2^{k+1}-1$ ULPs; 0 = the weight did not change; dotted: one grid step of a "
        "format (normal range)"
    )
    ax.set_ylabel("fraction of weights")
    ax.set_title(
        f"How far the weights move per optimizer step ({run.prefix}/ulp_hist/*), early vs late in training\n"
        "moves left of a format's dotted line mostly vanish in that format",
        fontsize=11,
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# --- entry points ----------------------------------------------------------------------------------------------
def write_report(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    prefix: str = "altgrad",
    top_k: int = 5,
) -> list[Path]:
    """Write the figures, ``summary.md`` and ``summary.json`` of a run; returns the paths written."""
    run = load_run(run_dir, prefix)
    if not run.formats and not run.histogram_buckets:
        raise ValueError(
            f"Expected the logs in {str(run.run_dir)!r} to hold keys of a QuantizationMonitor with prefix "
            f"{prefix!r} (e.g. {prefix}/float8_e4m3fn/{STALL}), but found none"
        )
    out = Path(out_dir) if out_dir is not None else run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in zip(_FIGURES, (plot_stall_heatmap, plot_format_comparison, plot_ulp_histogram), strict=True):
        if plot(run, out / name):
            written.append(out / name)
    mx = plot_mx_block_heatmap(run, out / MX_FIGURE)
    if mx:
        written.append(out / MX_FIGURE)
    summary = summarize(run, top_k)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    markdown = summary_markdown(summary)
    if mx:
        markdown += f"MX blocks: `{MX_FIGURE}` (stall fraction per block over the whole run, from `{MX_BLOCK_FILE}`).\n"
    (out / "summary.md").write_text(markdown)
    written += [out / "summary.md", out / "summary.json"]
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """``altgrad-lightning report RUN_DIR [--out DIR] [--prefix altgrad] [--top-k 5]``."""
    parser = argparse.ArgumentParser(
        prog="altgrad-lightning report",
        description="Write bit-stall figures (PNG) and summary.md for a run folder of CSV or TensorBoard logs.",
    )
    parser.add_argument("run_dir", help="a run folder (runs/quickstart/version_0) or its parent (newest version)")
    parser.add_argument("--out", default=None, help="where to write (default: the run folder)")
    parser.add_argument("--prefix", default="altgrad", help="the QuantizationMonitor's key prefix")
    parser.add_argument("--top-k", type=int, default=5, help="parameters at risk listed per format")
    args = parser.parse_args(argv)
    for path in write_report(args.run_dir, args.out, args.prefix, args.top_k):
        print(path)
