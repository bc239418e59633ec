"""Copy bandwidth of the device, and the memory-traffic floor of one diagnostic pass of ``QuantizationMonitor``.

Copy bandwidth: ``dst.copy_(src)`` on two preallocated buffers of ``numel`` elements (by default float32, one
element per model parameter), median over repeats; the bytes moved are ``2 * numel * element_size`` (read src +
write dst). On CUDA each copy is timed with CUDA events; on CPU with ``time.perf_counter``.

Byte model of the diagnostic pass (issue 5), per selected parameter element and per *computed* step, whatever the
number of formats (one fused pass evaluates all formats on the same loads):

=====================================  =============================  ============================
traffic                                 needed by                      bytes (fp32 weights/grads)
=====================================  =============================  ============================
read ``w`` before the step              every diagnostic               ``weight_bytes`` (4)
read ``g``                              ``stiffness``                  ``grad_bytes``   (4)
write the snapshot of ``w``             ``ulp``, ``flips``             ``weight_bytes`` (4)
read the snapshot after the step        ``ulp``, ``flips``             ``weight_bytes`` (4)
read ``w'`` after the step              ``ulp``, ``flips``             ``weight_bytes`` (4)
=====================================  =============================  ============================

That is 20 B per fp32 parameter with all diagnostics. Under ``bf16-mixed`` the parameters and their gradients are
still fp32 (autocast computes in bf16 but stores fp32 masters), so 20 B applies to the GPU workload too. Metric
state (a few sums and histograms) is negligible.

``floor_seconds(bytes, bandwidth)`` is the time the pass would take at copy bandwidth. ``achieved_over_floor`` is
the achieved bandwidth over the copy bandwidth, i.e. ``floor time / measured time`` (1.0 = as fast as memory
allows; the issue's target is >= 0.8).

Usage::

    python3 benchmarks/bandwidth.py [--device cpu|cuda] [--numel N] [--repeats 21] [--pass-ms MS]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

import torch

try:
    from _common import ensure_importable, header_lines, median
except ModuleNotFoundError:  # imported as benchmarks.bandwidth
    from benchmarks._common import ensure_importable, header_lines, median

ALL_DIAGNOSTICS = ("stiffness", "grid", "ulp", "flips")


def diagnostic_bytes(
    n_params: int, weight_bytes: int = 4, grad_bytes: int = 4, diagnostics: Iterable[str] = ALL_DIAGNOSTICS
) -> int:
    """Bytes one computed step of the diagnostic pass must touch, at least (see the module docstring's table)."""
    diags = set(diagnostics)
    per_element = weight_bytes  # read w before the step (stiffness, grid; the snapshot copies it too)
    if "stiffness" in diags:
        per_element += grad_bytes  # read g
    if diags & {"ulp", "flips"}:
        per_element += weight_bytes  # write the snapshot of w
        per_element += weight_bytes  # read the snapshot after the step
        per_element += weight_bytes  # read w' after the step
    return n_params * per_element


def copy_bandwidth(
    numel: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    repeats: int = 21,
    warmup: int = 3,
) -> tuple[float, float]:
    """``(median seconds per copy, bytes per second)`` of ``dst.copy_(src)``; bytes = 2 * numel * element size."""
    device = torch.device(device)
    src = torch.randn(numel, dtype=torch.float32, device=device).to(dtype)
    dst = torch.empty_like(src)
    times: list[float] = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    seconds = median(times)
    return seconds, 2 * numel * src.element_size() / seconds


def floor_seconds(n_bytes: float, bandwidth: float) -> float:
    """Time to move ``n_bytes`` at ``bandwidth`` bytes/s."""
    return n_bytes / bandwidth


def achieved_over_floor(pass_seconds: float, n_bytes: float, bandwidth: float) -> float:
    """Achieved bandwidth of a pass (``n_bytes / pass_seconds``) over the copy bandwidth; 1.0 is the floor."""
    if not pass_seconds or pass_seconds != pass_seconds:  # zero or NaN
        return float("nan")
    return floor_seconds(n_bytes, bandwidth) / pass_seconds


def main(argv: list[str] | None = None) -> None:
    ensure_importable()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=int, default=85_600_000, help="elements (default ~ the GPU workload's params)")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--weight-bytes", type=int, default=4)
    parser.add_argument("--grad-bytes", type=int, default=4)
    parser.add_argument("--pass-ms", type=float, default=None, help="a measured pass time to compare with the floor")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    for line in header_lines(device):
        print(line)
    seconds, bw = copy_bandwidth(args.numel, device, repeats=args.repeats, warmup=args.warmup)
    n_bytes = diagnostic_bytes(args.numel, args.weight_bytes, args.grad_bytes)
    print(f"- copy of {args.numel:,} float32: {seconds * 1e3:.3f} ms median of {args.repeats} → {bw / 1e9:.1f} GB/s")
    print(
        f"- diagnostic pass, all diagnostics: {n_bytes / args.numel:.0f} B/param × {args.numel:,} = "
        f"{n_bytes / 2**20:.1f} MiB → floor {floor_seconds(n_bytes, bw) * 1e3:.3f} ms"
    )
    if args.pass_ms is not None:
        ratio = achieved_over_floor(args.pass_ms / 1e3, n_bytes, bw)
        print(f"- measured pass {args.pass_ms:.3f} ms → achieved/floor {ratio:.1%}")


if __name__ == "__main__":
    main()
