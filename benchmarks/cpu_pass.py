"""Time of one step's diagnostic pass on the CPU: the compiled C backend against the reference path and a copy.

The CPU twin of ``diagnostic_pass.py``, on the parameter shapes of the issue-5 CPU workload (``nn.TransformerEncoder``,
d_model 256, 4 layers, feed-forward 4×d, vocabulary 512: about 3.4 M float32 parameters), random weights,
gradients and an update:

- ``reference``: per parameter and format the functional ``_update`` sums, a ``clone()`` snapshot, then the ULP
  and flip sums (what the callback runs with ``fused=False``);
- ``fused``: :class:`~altgrad_lightning.functional._fused.FusedPass` ``before`` + ``after`` through the C backend
  (``_fused_cpu.c``), timed apart;
- ``copy``: ``dst.copy_(src)`` of all parameters as one flat buffer. On this machine its 13.7 MB live in L3, so
  ``achieved/floor`` (floor = 20 B per parameter for one format, 8 B more per further format, at the copy's
  bandwidth) says how far the compute-bound pass is from memory speed, not from DRAM's.

Method: every call is preceded (untimed) by a 256×1024 @ 1024×1024 matmul, so that torch's OpenMP workers are
busy or spinning as after a backward pass (``--idle`` drops it); candidates run interleaved in a rotating order;
medians over ``--repeats``. ``fused`` is first checked equal to ``reference`` (counts exactly, float64 sums to 1e-9
relative); the script exits 1 otherwise. ``--formats-sweep`` times 1, 2, ... formats (the cost of each further
format). ``--ab OTHER.c`` builds another version of the C source with the same flags and interleaves its passes
with the installed one's (how the session-6 and -7 optimisations were measured). ``--ablate`` also times each
diagnostic family alone, and ULP without its fine histogram (where the full pass's time goes).

Usage::

    python3 benchmarks/cpu_pass.py [--formats float8_e4m3fn ...] [--repeats 15] [--no-reference]
                                   [--formats-sweep] [--ab path/to/_fused_cpu.c] [--idle] [--ablate]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_importable, header_lines  # noqa: E402

ensure_importable()
from diagnostic_pass import reference_pass, workload_shapes  # noqa: E402

from altgrad_lightning import get_format  # noqa: E402
from altgrad_lightning.functional import _fused, _fused_cpu  # noqa: E402
from altgrad_lightning.functional._fused import FusedPass  # noqa: E402

DIAGNOSTICS = ("stiffness", "grid", "ulp", "flips")


def build_other(source: Path) -> ctypes.CDLL:
    """Another version of ``_fused_cpu.c``, built as the installed one is (same compiler, flags, runtime)."""
    target = Path(tempfile.mkdtemp()) / "other.so"
    lib, errors = _fused_cpu._build(_fused_cpu._compiler(), _fused_cpu._openmp_runtime(), target, source.resolve())
    if lib is None:
        raise SystemExit(f"--ab: {source} does not build: {errors}")
    return _fused_cpu._declare(lib)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["float8_e4m3fn"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-reference", action="store_true", help="skip timing the (slow) reference path")
    ap.add_argument("--formats-sweep", action="store_true", help="time 1, 2, ... of the formats")
    ap.add_argument("--ab", type=Path, default=None, help="another _fused_cpu.c to time side by side")
    ap.add_argument("--idle", action="store_true", help="no torch matmul before each call")
    ap.add_argument(
        "--ablate",
        action="store_true",
        help="also time each diagnostic family alone (and ULP without its fine histogram)",
    )
    args = ap.parse_args()
    if _fused_cpu.load() is None:
        raise SystemExit(f"the C backend is unavailable: {_fused_cpu.unavailable_reason()}")
    fmts = [get_format(f) for f in args.formats]
    shapes = workload_shapes(256, 4, 512)
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    gs = [torch.randn(s, generator=gen) * 1e-4 for s in shapes]
    afters = [w + torch.randn(s, generator=gen) * 1e-4 for w, s in zip(ws, shapes, strict=True)]
    params = [w.clone() for w in ws]
    n = sum(w.numel() for w in ws)
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)

    def busy() -> None:
        if not args.idle:
            a @ b

    def fused_pass(fp: FusedPass) -> tuple[float, float]:
        torch._foreach_copy_(params, ws)
        busy()
        t0 = time.perf_counter()
        fp.before(gs, None)
        t1 = time.perf_counter()
        torch._foreach_copy_(params, afters)
        busy()
        t2 = time.perf_counter()
        fp.after()
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2

    # Correctness first.
    check = FusedPass(params, fmts, DIAGNOSTICS)
    fused_pass(check)
    got, _ = check.drain()
    ref = reference_pass(ws, gs, afters, fmts)
    bad = 0
    for (family, name), sums in ref.items():
        for k, v in sums.items():
            mine = got[family][name][k]
            same = torch.equal(mine, v) if v.dtype == torch.int64 else torch.allclose(mine, v, rtol=1e-9, atol=0.0)
            bad += int(not same)

    src, dst = torch.randn(n), torch.empty(n)
    candidates: dict[str, Callable[[], tuple[float, float]]] = {}
    counts = range(1, len(fmts) + 1) if args.formats_sweep else [len(fmts)]
    passes = {k: FusedPass(params, fmts[:k], DIAGNOSTICS) for k in counts}
    for k, fp in passes.items():
        candidates[f"fused, {k} format{'s' if k > 1 else ''}"] = lambda fp=fp: fused_pass(fp)
    if args.ab is not None:
        other = FusedPass(params, fmts, DIAGNOSTICS)
        other._lib = build_other(args.ab)
        candidates[f"fused, {len(fmts)} formats, {args.ab}"] = lambda: fused_pass(other)
    if args.ablate:  # each family alone: where the time of the full pass goes (ULP's `before` is the snapshot)
        for family in ("stiffness", "grid", "ulp", "flips"):
            fp = FusedPass(params, fmts, (family,))
            candidates[f"ablate: {family}"] = lambda fp=fp: fused_pass(fp)
        no_hist = FusedPass(params, fmts, ("ulp",))

        def ulp_without_histogram() -> tuple[float, float]:
            _fused._HIST = False
            try:
                return fused_pass(no_hist)
            finally:
                _fused._HIST = True

        candidates["ablate: ulp without the fine histogram"] = ulp_without_histogram
    if not args.no_reference:

        def reference() -> tuple[float, float]:
            busy()
            t0 = time.perf_counter()
            reference_pass(ws, gs, afters, fmts)
            return time.perf_counter() - t0, 0.0

        candidates["reference"] = reference

    def copy() -> tuple[float, float]:
        busy()
        t0 = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - t0, 0.0

    candidates["copy"] = copy
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in candidates}
    names = list(candidates)
    for r in range(args.repeats + 2):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = candidates[name]()
            if r >= 2:
                times[name].append(t)
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    bw = 8 * n / med["copy"][0]
    print("# CPU diagnostic pass")
    print("\n".join(header_lines(torch.device("cpu"))))
    print(f"- params {n / 1e6:.2f} M in {len(shapes)} tensors, formats {args.formats}, torch matmul before each "
          f"call: {not args.idle}; fused == reference: {'yes' if bad == 0 else f'NO ({bad} mismatches)'}")  # fmt: skip
    print(f"- copy bandwidth {bw / 1e9:.1f} GB/s (read+write, a buffer of the parameters' size)\n")
    print("| candidate | before ms | after ms | pass ms | achieved/floor |")
    print("|---|--:|--:|--:|--:|")
    for name, (tb, ta) in med.items():
        if name.startswith("ablate: "):
            continue
        if name == "copy":
            print(f"| copy of all parameters | | | {tb * 1e3:.2f} | — |")
            continue
        k = len(fmts) if not name.startswith("fused, ") else int(name.split()[1])
        floor = n * (20 + 8 * (k - 1)) / bw
        split = ("", "") if name == "reference" else (f"{tb * 1e3:.2f}", f"{ta * 1e3:.2f}")
        print(f"| {name} | {split[0]} | {split[1]} | {(tb + ta) * 1e3:.2f} | {floor / (tb + ta):.3f} |")
    ablated = {k.removeprefix("ablate: "): v for k, v in med.items() if k.startswith("ablate: ")}
    if ablated:
        print("\n| diagnostics alone | before ms | after ms |")
        print("|---|--:|--:|")
        for name, (tb, ta) in ablated.items():
            print(f"| {name} | {tb * 1e3:.2f} | {ta * 1e3:.2f} |")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
