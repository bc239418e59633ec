"""The CPU pass's loops alone, one thread, data in cache: versions of ``_fused_cpu.c`` side by side.

``cpu_pass.py`` times the whole pass as the callback runs it (all threads, after a matmul, the workload's
parameters). Differences of a few percent in the loops drown there in the host's noise. This script times one
call of ``altgrad_fused_pass`` with ``threads=1`` on one synthetic parameter small enough for L2 (``--elements``,
default 131 072), the minimum over ``--repeats`` calls. The sources given are built as the installed one is, and
their calls are interleaved. Figures are ns per element for ``before`` and ``after``, for 1, 2, … formats, and the
cost of each further format. This is how session 13 found and measured its changes (``benchmarks/NOTES.md``).

- ``--families`` picks the diagnostics (default all four); ``--no-histogram`` drops the ULP fine histogram.
- The weights are normal with standard deviation 0.02. The gradients are normal at 1e-3, and the update moves each
  weight by up to 1e-3 against its gradient's sign. Every block stays far from every format's max, so the loops take
  their fast branch.
- Every source's partial rows must equal the first one's (float64 sums to 1e-12 relative); the script exits 1
  otherwise.

Usage::

    python3 benchmarks/cpu_loops.py [SOURCE.c ...] [--formats float8_e4m3fn ...] [--families stiffness,grid,ulp,flips]
                                    [--no-histogram] [--elements 131072] [--repeats 60]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_importable, header_lines  # noqa: E402

ensure_importable()
from cpu_pass import build_other  # noqa: E402

from altgrad_lightning import get_format  # noqa: E402
from altgrad_lightning.functional import _fused, _fused_cpu  # noqa: E402

FAMILIES = ("stiffness", "grid", "ulp", "flips")


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", type=Path, help="versions of _fused_cpu.c (default: the installed one)")
    parser.add_argument("--formats", nargs="+", default=["float8_e4m3fn", "float8_e5m2", "bfloat16", "float16"])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--no-histogram", action="store_true")
    parser.add_argument("--elements", type=int, default=131072)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    families = set(args.families.split(","))
    if not families <= set(FAMILIES):
        parser.error(f"--families: expected a comma-separated subset of {','.join(FAMILIES)}, got {args.families!r}")
    if args.elements < 1 or args.repeats < 1:
        parser.error("--elements and --repeats: expected positive integers")
    sources = args.sources or [_fused_cpu._SOURCE]
    libs = [build_other(s) for s in sources]

    n, chunk = args.elements, _fused.CHUNK
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g) * 0.02
    grad = torch.randn(n, generator=g) * 1e-3
    moved = w - 1e-3 * torch.sign(grad) * torch.rand(n, generator=g)
    snap = torch.empty(n)
    n_chunks = -(-n // chunk)
    chunk_t = torch.zeros(n_chunks, dtype=torch.int32)
    chunk_start = torch.arange(n_chunks, dtype=torch.int64) * chunk
    numel, snap_off = torch.tensor([n]), torch.tensor([0])
    hist = torch.zeros(1024, dtype=torch.int64)
    rows = torch.tensor([_fused._format_constants(get_format(f)) for f in args.formats], dtype=torch.float64)
    do = [int(f in families) for f in FAMILIES]

    def call(lib: ctypes.CDLL, nf: int, after: int, weights: torch.Tensor) -> tuple[float, torch.Tensor]:
        ncols = 5 + 11 * nf if not after else 6 + 6 * nf  # at least as many columns as either pass writes
        part = torch.zeros(n_chunks, ncols, dtype=torch.float64)
        w_tab, g_tab = torch.tensor([weights.data_ptr()]), torch.tensor([grad.data_ptr()])
        flags = torch.tensor([after, 0, 1, 0, *do, do[2] and not args.no_histogram], dtype=torch.int32)
        t0 = time.perf_counter()
        lib.altgrad_fused_pass(_ptr(w_tab), _ptr(g_tab), _ptr(snap_off), _ptr(chunk_t), _ptr(chunk_start), _ptr(numel),
                               _ptr(snap), _ptr(part), _ptr(hist), None, 1.0, _ptr(flags), _ptr(rows), nf, ncols, chunk,
                               n_chunks, 1)  # fmt: skip
        return time.perf_counter() - t0, part

    print("# CPU pass loops, one thread")
    print("\n".join(header_lines(torch.device("cpu"))))
    print(f"- {n:,} elements, formats {args.formats}, families {sorted(families)}, fine histogram: "
          f"{'ulp' in families and not args.no_histogram}; minimum of {args.repeats} interleaved calls\n")  # fmt: skip
    print("| formats | " + " | ".join(f"{s.name} before / after ns/el" for s in sources) + " |")
    print("|--:|" + "--:|" * len(sources))
    best: dict[tuple[int, int], list[float]] = {}
    bad = 0
    for nf in range(1, len(args.formats) + 1):
        times = {i: [float("inf"), float("inf")] for i in range(len(libs))}
        parts: dict[int, list[torch.Tensor]] = {}
        for _ in range(args.repeats):
            for i, lib in enumerate(libs):
                tb, pb = call(lib, nf, 0, w)
                ta, pa = call(lib, nf, 1, moved)
                times[i] = [min(times[i][0], tb), min(times[i][1], ta)]
                parts[i] = [pb, pa]
        for i in range(1, len(libs)):
            for k, name in enumerate(("before", "after")):
                if not torch.allclose(parts[i][k], parts[0][k], rtol=1e-12, atol=0.0):
                    print(f"MISMATCH: {sources[i]} differs from {sources[0]} in `{name}` with {nf} formats")
                    bad += 1
        for i in range(len(libs)):
            best[(i, nf)] = [t / n * 1e9 for t in times[i]]
        print(f"| {nf} | " + " | ".join(f"{best[(i, nf)][0]:.3f} / {best[(i, nf)][1]:.3f}" for i in range(len(libs)))
              + " |")  # fmt: skip
    k = len(args.formats)
    if k > 1:
        print()
        for i, s in enumerate(sources):
            per = [(best[(i, k)][j] - best[(i, 1)][j]) / (k - 1) for j in (0, 1)]
            print(f"- {s.name}: each further format {per[0]:.3f} ns/el in `before`, {per[1]:.3f} in `after`")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
