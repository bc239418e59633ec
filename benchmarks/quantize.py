"""Throughput of ``altgrad_lightning.quantize`` against torch's native cast, ml_dtypes and a plain copy.

For each format (float8_e4m3fn, float8_e5m2, bfloat16, and float6_e2m3fn, float4_e2m1fn, which are no torch dtypes)
the candidates are, on one float32 tensor ``x``:

- ``quantize``: ``altgrad_lightning.quantize(x, fmt)`` (nearest rounding, the format's default saturation), which
  takes its fast path (one Triton kernel on CUDA; on CPU torch's checked cast for torch dtypes, the compiled C
  backend for the others);
- ``reference arithmetic``: the same result through quantize's exact elementwise arithmetic (``quantize_scaled``),
  what ``quantize`` ran for every call before the fast path;
- ``torch cast``: the native round trip ``x.to(dtype).to(torch.float32)``;
- ``ml_dtypes``: ``a.astype(ml_dtypes.<fmt>).astype(np.float32)`` on ``a = x.numpy()`` (CPU only; torch dtypes);

plus ``copy``: ``y.copy_(x)`` into a preallocated float32 tensor, the memory-bandwidth reference.

Method: every candidate is warmed up, then each repeat runs every candidate once, round-robin, with the starting
candidate rotated from one repeat to the next, so that slow drift (frequency, other load) hits all of them alike.
The median time per call is reported, with the median count of minor page faults per call (fresh pages that a
new output or intermediate touches after the allocator handed memory back to the OS). GB/s counts the bytes of a
float32 round trip, 8 B per element (read 4 B, write 4 B), for every candidate, whatever its intermediates touch.
The floor is the copy: the same bytes at the copy's GB/s, measured in the same process, so ``achieved/floor`` is a
candidate's median time over the copy's.

The issue-5 targets read off the "vs torch cast" column: float8 formats within 1.3x of their own cast, other formats
within 2x of the float8_e4m3fn cast (their ratio is taken against it, marked "e4m3 cast").

Correctness: ``quantize`` must equal torch's cast bit for bit on the benchmark input (NaN matching NaN; for formats
that are no torch dtype, the reference arithmetic); the script
prints the number of mismatching elements and exits with status 1 if any ``quantize`` result differs within the
format's range, so a speed-up cannot come from a wrong result; mismatches at ``|x| > max`` are counted apart and only
noted, since they mean another overflow convention rather than wrong rounding (torch 2.13's float8_e4m3fn cast
saturates to 448 like ``quantize``'s default; torch 2.11's gives NaN above 464). ml_dtypes mismatches are reported
for information only (its float8_e4m3fn gives NaN above 464).

Usage::

    python3 benchmarks/quantize.py [--numel 4194304] [--repeats 21] [--warmup 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import datetime
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from _common import cpu_model

try:
    import altgrad_lightning
except ModuleNotFoundError:  # run from a checkout without installing: python3 benchmarks/quantize.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import altgrad_lightning

quantize = altgrad_lightning.quantize

FORMATS: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "bfloat16": torch.bfloat16,
}
OTHER_FORMATS = ("float6_e2m3fn", "float4_e2m1fn")  # no torch dtype: compared with the float8_e4m3fn cast
BYTES_PER_ELEMENT = 8  # float32 round trip: read 4 B + write 4 B


@dataclass
class Candidate:
    """One timed callable and its samples (seconds per call)."""

    method: str
    fmt: str
    fn: Callable[[], object]
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``getrusage`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def make_input(numel: int, device: torch.device, seed: int) -> torch.Tensor:
    """Standard normal times 2**k, k uniform in [-12, 12]: spans the float8 grids, their subnormals and e4m3fn overflow.

    No float32 subnormals, infinities or NaN, so no candidate meets a denormal slow path of the CPU.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g, dtype=torch.float32)
    x = torch.ldexp(x, torch.randint(-12, 13, (numel,), generator=g, dtype=torch.int32))
    return x.to(device)


@dataclass(frozen=True)
class Mismatch:
    """Elements that differ from the reference, and how many of them lie beyond the format's max (overflow)."""

    total: int
    overflow: int

    def __str__(self) -> str:
        return f"{self.total} ({self.overflow} at \\|x\\| > max)" if self.total else "0"


def mismatches(got: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, limit: float) -> Mismatch:
    """Elements whose float32 bits differ (two NaNs count as equal); ``limit`` is the format's max."""
    differ = (got.view(torch.int32) != ref.view(torch.int32)) & ~(torch.isnan(got) & torch.isnan(ref))
    return Mismatch(int(differ.sum()), int((differ & (x.abs() > limit)).sum()))


def _quantize_fn(x: torch.Tensor, name: str) -> Callable[[], object]:
    return lambda: quantize(x, name)


def _reference_fn(x: torch.Tensor, name: str) -> Callable[[], object]:
    from altgrad_lightning.quantize import Rounding, quantize_scaled

    fmt = altgrad_lightning.get_format(name)
    return lambda: quantize_scaled(x, fmt, None, Rounding.NEAREST, fmt.saturate_default).to(x.dtype)


def _torch_cast_fn(x: torch.Tensor, dtype: torch.dtype) -> Callable[[], object]:
    return lambda: x.to(dtype).to(torch.float32)


def _ml_dtypes_fn(a: np.ndarray, np_dtype: type) -> Callable[[], object]:
    return lambda: a.astype(np_dtype).astype(np.float32)


def build_candidates(x: torch.Tensor, y: torch.Tensor, with_ml_dtypes: bool) -> list[Candidate]:
    """The candidates, in table order: copy, then per format quantize, reference arithmetic, torch cast, ml_dtypes."""
    cands = [Candidate("copy `y.copy_(x)`", "float32", lambda: y.copy_(x))]
    for name in OTHER_FORMATS:
        cands.append(Candidate("quantize", name, _quantize_fn(x, name)))
        cands.append(Candidate("reference arithmetic", name, _reference_fn(x, name)))
    for name, dtype in FORMATS.items():
        cands.append(Candidate("quantize", name, _quantize_fn(x, name)))
        cands.append(Candidate("reference arithmetic", name, _reference_fn(x, name)))
        cands.append(Candidate("torch cast", name, _torch_cast_fn(x, dtype)))
        if with_ml_dtypes:
            import ml_dtypes

            cands.append(Candidate("ml_dtypes", name, _ml_dtypes_fn(x.numpy(), getattr(ml_dtypes, name))))
    return cands


def run(cands: list[Candidate], repeats: int, warmup: int, sync: Callable[[], None]) -> None:
    """Warm every candidate up, then time them round-robin, rotating the start each repeat."""
    for c in cands:
        for _ in range(warmup):
            c.fn()
    sync()
    n = len(cands)
    for r in range(repeats):
        for i in range(n):
            c = cands[(r + i) % n]
            f0 = minor_faults()
            sync()
            t0 = time.perf_counter()
            c.fn()
            sync()
            c.times.append(time.perf_counter() - t0)
            c.faults.append(minor_faults() - f0)


def check(x: torch.Tensor, with_ml_dtypes: bool) -> dict[tuple[str, str], Mismatch]:
    """Mismatching elements against torch's cast, per (method, format)."""
    out: dict[tuple[str, str], Mismatch] = {}
    for name in OTHER_FORMATS:
        limit = altgrad_lightning.get_format(name).max
        out[("quantize", name)] = mismatches(quantize(x, name), _reference_fn(x, name)(), x, limit)
    for name, dtype in FORMATS.items():
        ref = x.to(dtype).to(torch.float32)
        limit = altgrad_lightning.get_format(name).max
        out[("quantize", name)] = mismatches(quantize(x, name), ref, x, limit)
        out[("reference arithmetic", name)] = mismatches(_reference_fn(x, name)(), ref, x, limit)
        if with_ml_dtypes:
            import ml_dtypes

            got = torch.from_numpy(x.numpy().astype(getattr(ml_dtypes, name)).astype(np.float32))
            out[("ml_dtypes", name)] = mismatches(got, ref, x, limit)
    return out


def load_average() -> float:
    """The 1-minute load average (NaN where the OS does not report it): other work on the machine skews timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def header(args: argparse.Namespace, device: torch.device, load: tuple[float, float]) -> list[str]:
    lines = [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu_model()} ({torch.get_num_threads()} torch threads)",
        f"- torch {torch.__version__}, numpy {np.__version__}, altgrad_lightning {altgrad_lightning.__version__}",
    ]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    else:
        import ml_dtypes

        lines[-1] += f", ml_dtypes {ml_dtypes.__version__}"
    lines.append(
        f"- device {device.type}, numel {args.numel:,} float32, {args.warmup} warm-up + {args.repeats} interleaved "
        f"repeats, median per call; GB/s counts {BYTES_PER_ELEMENT} B/element (read 4 B + write 4 B)"
    )
    lines.append(f"- 1-min load average before / after: {load[0]:.2f} / {load[1]:.2f} ({os.cpu_count()} CPUs)")
    return lines


def table(cands: list[Candidate], numel: int, bad: dict[tuple[str, str], Mismatch]) -> list[str]:
    copy_t = cands[0].median
    cast_t = {c.fmt: c.median for c in cands if c.method == "torch cast"}
    rows = [
        "| method | format | median ms | GB/s | vs torch cast | achieved/floor | faults/call | mismatches |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cands:
        t = c.median
        gbs = numel * BYTES_PER_ELEMENT / t / 1e9
        if c.fmt in cast_t:
            ratio = f"{t / cast_t[c.fmt]:.2f}x"
        elif c.fmt in OTHER_FORMATS:
            ratio = f"{t / cast_t['float8_e4m3fn']:.2f}x (e4m3 cast)"
        else:
            ratio = "—"
        if c.method == "torch cast" or (c.fmt in OTHER_FORMATS and c.method == "reference arithmetic"):
            mism = "ref"
        else:
            mism = str(bad[(c.method, c.fmt)]) if (c.method, c.fmt) in bad else "—"
        cells = [c.method, c.fmt, f"{t * 1e3:.2f}", f"{gbs:.2f}", ratio, f"{t / copy_t:.2f}x"]
        cells += [f"{statistics.median(c.faults):.0f}", mism]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=4 * 1024 * 1024, help="float32 elements (default 4Mi)")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved timed rounds (default 21)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate first (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.numel < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--numel and --repeats must be positive, --warmup non-negative")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    load_before = load_average()
    x = make_input(args.numel, device, args.seed)
    y = torch.empty_like(x)
    bad = check(x, with_ml_dtypes=not cuda)
    cands = build_candidates(x, y, with_ml_dtypes=not cuda)
    run(cands, args.repeats, args.warmup, sync)

    print("\n".join(header(args, device, (load_before, load_average()))))
    print()
    print("\n".join(table(cands, args.numel, bad)))
    print()
    print(
        "vs torch cast: median time / torch's `x.to(dtype).to(float32)` median for the same format (for formats "
        "that are no torch dtype: the float8_e4m3fn cast's). mismatches: against torch's cast, or against the "
        "reference arithmetic for formats that are no torch dtype (marked ref). "
        "achieved/floor: median time / copy median time (the floor: the same bytes at the copy's GB/s). "
        f"faults/call: median minor page faults of the process per call ({mmap.PAGESIZE // 1024} KiB pages touched "
        f"for the first time since the allocator got them from the OS; {args.numel * 4 // mmap.PAGESIZE} = one "
        "float32 tensor of numel)."
    )
    ours = {(method, name): m for (method, name), m in bad.items() if method != "ml_dtypes" and m.total}
    for (method, name), m in ours.items():
        if m.overflow == m.total:  # e.g. torch < 2.12: float8_e4m3fn casts give NaN above 464, quantize saturates
            print(f"note: {method} {name} differs from this torch's cast only at |x| > max ({m.total} elements): "
                  "another overflow convention, not another rounding")  # fmt: skip
    failed = {key: m for key, m in ours.items() if m.total > m.overflow}
    for (method, name), m in failed.items():
        print(
            f"FAIL: {method} {name} differs from torch's cast in {m.total - m.overflow} of {args.numel} elements "
            "within the format's range",
            file=sys.stderr,
        )
    if failed:
        return 1
    print("quantize matches torch's cast bit for bit on all formats.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
