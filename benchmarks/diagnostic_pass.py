"""Time of one step's diagnostic pass, against the memory-bandwidth floor, on the GPU workload's parameters.

Candidates, on the parameter shapes of the issue-5 GPU workload (``nn.TransformerEncoder``, d_model 768, 12
layers, feed-forward 4×d, vocabulary 512: about 86 M float32 parameters in ~150 tensors), with random weights,
gradients and an update:

- ``reference``: what the callback did before the fast path: per parameter and format, the functional
  ``_update`` sums of stiffness and grid alignment, a ``clone()`` snapshot, then the ULP and flip sums;
- ``fused``: :class:`altgrad_lightning.functional._fused.FusedPass` ``before`` + ``after`` (two Triton kernels
  per format over all parameters);
- ``copy``: ``dst.copy_(src)`` of all parameters as one flat buffer, the bandwidth reference.

Floor: the bytes one step must touch, 20 B per float32 parameter for one format (read w and g, write the
snapshot; read the snapshot and w') and 8 B more per further format (w and g again before the step, snapshot and
w' after), at the copy's bandwidth (bytes read + written per second) measured in the same run. achieved/floor
= floor time / measured time (1.0 = as fast as memory allows).

Interleaved repeats, median, ``torch.cuda.synchronize()`` around each call. Before timing, ``fused`` is checked
equal to ``reference`` (counts exactly, float64 sums to 1e-9 relative) and the script exits 1 otherwise.

Usage::

    python3 benchmarks/diagnostic_pass.py [--formats float8_e4m3fn ...] [--repeats 15] [--small]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch

from altgrad_lightning import get_format
from altgrad_lightning.functional import _fused
from altgrad_lightning.functional._fused import FusedPass
from altgrad_lightning.functional._reduce import merge
from altgrad_lightning.functional.flips import _flip_update
from altgrad_lightning.functional.grid import _grid_alignment_update
from altgrad_lightning.functional.stiffness import _gradient_stiffness_update
from altgrad_lightning.functional.ulp import _ulp_update


def workload_shapes(d: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of the benchmark LM: embedding, ``layers`` encoder layers, final norm-free head."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return shapes + [(vocab, d), (vocab,)]


def reference_pass(ws, gs, afters, fmts):
    out: dict[tuple[str, str], dict] = {}

    def add(key, sums):
        out[key] = merge(out[key], sums) if key in out else sums

    snaps = []
    for w, g in zip(ws, gs, strict=True):
        for fmt in fmts:
            add(("stiffness", fmt.name), _gradient_stiffness_update(w, g, fmt))
            add(("grid", fmt.name), _grid_alignment_update(w, fmt))
        snaps.append(w.clone())
    for s, a in zip(snaps, afters, strict=True):
        add(("ulp", ""), _ulp_update(s, a))
        for fmt in fmts:
            add(("flips", fmt.name), _flip_update(s, a, fmt))
    return out


def _split_times(fused, gs, params, ws, afters, repeats=9):
    """Median time of ``before`` and of ``after`` alone."""
    tb, ta = [], []
    for r in range(repeats + 2):
        torch._foreach_copy_(params, ws)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fused.before(gs, None)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        torch._foreach_copy_(params, afters)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        fused.after()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if r >= 2:
            tb.append(t1 - t0)
            ta.append(t3 - t2)
    return statistics.median(tb), statistics.median(ta)


def _queued_times(fused, gs, params, ws, afters, reps=10, rounds=5):
    """GPU time of ``before`` and of ``after`` with the launch queue kept full (CUDA events around ``reps``
    back-to-back calls, median over ``rounds``), and the host time of one call (launch overhead, no sync): what a
    GPU-bound training step pays, and what the CPU pays, separately."""
    tb, ta, cb, ca = [], [], [], []
    for _ in range(rounds):
        torch._foreach_copy_(params, ws)
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fused.before(gs, None)
        t1 = time.perf_counter()
        ev[1].record()
        torch._foreach_copy_(params, afters)
        ev[2].record()  # the copy is timed apart below
        t2 = time.perf_counter()
        for _ in range(reps):
            fused.after()
        t3 = time.perf_counter()
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        torch.cuda.synchronize()
        fused.drain()
        tb.append(ev[0].elapsed_time(ev[1]) / reps / 1e3)
        ta.append(ev[2].elapsed_time(end) / reps / 1e3)
        cb.append((t1 - t0) / reps)
        ca.append((t3 - t2) / reps)
    return tuple(statistics.median(v) for v in (tb, ta, cb, ca))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", nargs="+", default=["float8_e4m3fn"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--small", action="store_true", help="d_model 256, 4 layers (the CPU workload's shapes)")
    ap.add_argument("--sweep", action="store_true", help="also time other CHUNK/BLOCK/num_warps settings")
    ap.add_argument("--ablate", action="store_true", help="time each diagnostic family alone, and no histogram")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the (slow) reference path")
    ap.add_argument("--groups", action="store_true", help="time formats per launch (before/after) alternatives")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA (on the CPU: benchmarks/cpu_pass.py)")
        return 2
    dev = torch.device("cuda")
    d, layers = (256, 4) if args.small else (768, 12)
    shapes = workload_shapes(d, layers, 512)
    gen = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(s, device=dev, generator=gen) * 0.02 for s in shapes]
    gs = [torch.randn(s, device=dev, generator=gen) * 1e-4 for s in shapes]
    steps = [torch.randn(s, device=dev, generator=gen) * 1e-4 for s in shapes]
    afters = [w - st for w, st in zip(ws, steps, strict=True)]
    fmts = [get_format(f) for f in args.formats]
    n = sum(w.numel() for w in ws)
    params = [w.clone() for w in ws]
    fused = FusedPass(params, fmts, ("stiffness", "grid", "ulp", "flips"))

    def run_fused():
        for p, w in zip(params, ws, strict=True):
            p.copy_(w)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fused.before(gs, None)
        torch._foreach_copy_(params, afters)  # the optimizer step (not timed below)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        fused.after()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        copy_t = t1 - t0  # includes the step copy: measured separately and subtracted
        sums, _ = fused.drain()  # once per logging step in the monitor: not part of a step's time
        return sums, copy_t + (t2 - t1)

    step_copy_t = []

    def run_step_copy():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch._foreach_copy_(params, afters)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    flat_src = torch.randn(n, device=dev)
    flat_dst = torch.empty_like(flat_src)

    def run_copy():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        flat_dst.copy_(flat_src)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def run_reference():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = reference_pass(ws, gs, afters, fmts)
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    # Correctness first.
    got, _ = run_fused()
    ref, _ = run_reference()
    bad = 0
    for (family, name), sums in ref.items():
        mine = got[family][name]
        for k, v in sums.items():
            if v.dtype == torch.int64:
                bad += int(not torch.equal(mine[k], v))
            else:
                bad += int(not torch.allclose(mine[k], v, rtol=1e-9, atol=0.0))
    times: dict[str, list[float]] = {"reference": [], "fused": [], "copy": []}
    for _ in range(3):
        run_fused(), run_copy(), run_step_copy()
        if not args.no_reference:
            run_reference()
    for r in range(args.repeats):
        order = ["fused", "copy"] if args.no_reference else ["reference", "fused", "copy"]
        order = order[r % 3 :] + order[: r % 3]
        for name in order:
            if name == "fused":
                times[name].append(run_fused()[1])
                step_copy_t.append(run_step_copy())
            elif name == "reference":
                times[name].append(run_reference()[1])
            else:
                times[name].append(run_copy())
    med = {k: statistics.median(v) for k, v in times.items() if v}
    split = _split_times(fused, gs, params, ws, afters)
    med["fused"] -= statistics.median(step_copy_t)
    bw = 8 * n / med["copy"]
    bytes_needed = n * (20 + 8 * (len(fmts) - 1))
    floor = bytes_needed / bw
    print(f"# diagnostic pass, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, params {n / 1e6:.1f} M "
          f"in {len(shapes)} tensors, formats {args.formats}")  # fmt: skip
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read+write); floor {bytes_needed / n:.0f} B/param = "
          f"{floor * 1e3:.3f} ms; fused == reference: {'yes' if bad == 0 else f'NO ({bad} mismatches)'}")  # fmt: skip
    print("| candidate | ms/step | achieved/floor |")
    print("|---|---|---|")
    for name in ("fused",) if args.no_reference else ("reference", "fused"):
        print(f"| {name} | {med[name] * 1e3:.3f} | {floor / med[name]:.2f} |")
    print(f"| copy of all parameters | {med['copy'] * 1e3:.3f} | - |")
    print(f"fused split: before {split[0] * 1e3:.3f} ms, after {split[1] * 1e3:.3f} ms "
          f"(CHUNK {_fused.CHUNK}, tile {_fused._ROWS}x{_fused._VEC}, warps {_fused._NUM_WARPS})")  # fmt: skip
    passes = [fused]
    if fused.backend != "triton":  # the all-Triton pass side by side, for the CUDA C after kernel's gain
        passes.append(FusedPass(params, fmts, ("stiffness", "grid", "ulp", "flips"), backend="triton"))
    for candidate in passes:
        qb, qa, cb, ca = _queued_times(candidate, gs, params, ws, afters)
        print(f"queued (GPU time, launch queue full; backend {candidate.backend!r}): before {qb * 1e3:.3f} ms, after "
              f"{qa * 1e3:.3f} ms, pass {(qb + qa) * 1e3:.3f} ms, achieved/floor {floor / (qb + qa):.2f}; host time "
              f"per call: before {cb * 1e3:.3f} ms, after {ca * 1e3:.3f} ms")  # fmt: skip
    if args.groups:  # the limits of the pass's backend; on CUDA C, session 10's 4 per launch, then 4 / 8 and 3 / 8
        limits = _fused._MAX_FORMATS_CUDA if fused.backend == "cuda" else _fused._MAX_FORMATS
        default = dict(limits)
        alternatives = [(4, 4), (4, 8), (3, 8)] if fused.backend == "cuda" else [(1, 1), (2, 2), (4, 1), (4, 2), (2, 1)]
        for rnd in range(3):  # interleaved rounds
            for nb, na in alternatives:
                limits.update(before=nb, after=na)
                gp = FusedPass(params, fmts, ("stiffness", "grid", "ulp", "flips"))
                qb, qa, cb, ca = _queued_times(gp, gs, params, ws, afters)
                print(f"round {rnd}, formats per launch before {nb} / after {na} ({gp.backend}): queued before "
                      f"{qb * 1e3:.3f} ms, after {qa * 1e3:.3f} ms, pass {(qb + qa) * 1e3:.3f} ms, achieved/floor "
                      f"{floor / (qb + qa):.2f}; host before {cb * 1e3:.3f}, after {ca * 1e3:.3f} ms")  # fmt: skip
        limits.update(default)
    if args.ablate:
        for diags, hist in [(("stiffness",), True), (("grid",), True), (("ulp",), True), (("ulp",), False),
                            (("flips",), True), (("ulp", "flips"), False)]:  # fmt: skip
            _fused._HIST = hist
            qb, qa, _, _ = _queued_times(FusedPass(params, fmts, diags), gs, params, ws, afters)
            print(f"ablate {'+'.join(diags)}{'' if hist else ' (no histogram)'}: queued before {qb * 1e3:.3f} ms, "
                  f"after {qa * 1e3:.3f} ms")  # fmt: skip
        _fused._HIST = True
        for window in (64, 128, 512):
            _fused._WINDOW = window
            b_t, a_t = _split_times(FusedPass(params, fmts, ("ulp",)), gs, params, ws, afters)
            print(f"ablate ulp, histogram window {window} buckets: after {a_t * 1e3:.3f} ms")
        _fused._WINDOW = 256
    if args.sweep:
        default = _fused.CHUNK, _fused._ROWS, _fused._NUM_WARPS, _fused._STAGES
        for chunk, rows_per_thread, warps, stages in [(8192, 1, 4, 2), (8192, 1, 4, 3), (16384, 1, 4, 2),
                                                      (16384, 1, 4, 1), (8192, 1, 2, 1), (8192, 1, 2, 2)]:  # fmt: skip
            _fused.CHUNK, _fused._ROWS, _fused._NUM_WARPS = chunk, 32 * warps * rows_per_thread, warps
            _fused._STAGES = stages
            sweep_pass = FusedPass(params, fmts, ("stiffness", "grid", "ulp", "flips"))
            b_t, a_t, _, _ = _queued_times(sweep_pass, gs, params, ws, afters)
            print(f"sweep CHUNK {chunk} tile {_fused._ROWS}x{_fused._VEC} warps {warps} stages {stages}: queued "
                  f"before {b_t * 1e3:.3f} ms, after {a_t * 1e3:.3f} ms, "
                  f"achieved/floor {floor / (b_t + a_t):.2f}")  # fmt: skip
        _fused.CHUNK, _fused._ROWS, _fused._NUM_WARPS, _fused._STAGES = default
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
