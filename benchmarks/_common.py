"""Helpers shared by the overhead benchmarks: run header (machine, versions, date) and small timing utilities."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent


def ensure_importable() -> None:
    """Make ``altgrad_lightning`` and the sibling benchmark modules importable from a plain checkout."""
    for p in (str(BENCH_DIR), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)


def cpu_model() -> str:
    """The 'model name' line of /proc/cpuinfo, else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # not on every platform
        return "n/a"


def header_lines(device: torch.device) -> list[str]:
    """Date, device, versions and threads, one markdown bullet each."""
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {device} — {device_name(device)}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), torch threads: {torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}",
    ]
    if device.type == "cuda":
        lines.append(f"- CUDA {torch.version.cuda}, driver-visible GPUs: {torch.cuda.device_count()}")
    else:
        from altgrad_lightning.functional import _fused_cpu

        lib = _fused_cpu.load()
        built = _fused_cpu.describe(lib) if lib is not None else f"unavailable ({_fused_cpu.unavailable_reason()})"
        lines.append(f"- C backend of the fast path: {built}")
    return lines


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
