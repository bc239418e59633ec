"""What the fine ULP histogram costs on the GPU: Triton's ``tl.histogram`` against shared-memory atomics.

A probe for issue 5 (session 7), which led to the package's CUDA C ``after`` kernel (``_fused_cuda.cu``). Triton's
``after`` kernel spends ~0.34 ms of its ~1.1 ms on the exact 1/16-octave ULP histogram (the state behind
``ulp_median``; session-5 ablation on an H100): Triton 3.6 lowers ``tl.histogram`` to a ballot per bit of the bin
index and a popcount per bin it owns, per element, so its cost grows with the bins. CUDA C can count in shared
memory with one atomic per element instead: Triton exposes no shared memory, but the NVRTC that ships with torch's
CUDA wheels compiles CUDA C at run time, and the driver API (ctypes) loads and launches it on torch's stream. This
script times, on the same 85.8 M float32 pairs (the issue-5 GPU workload's parameter count; random weights and
updates):

- ``triton ULP``: the package's ``after`` kernel with the ULP diagnostic only, with and without the histogram;
- ``cuda ULP``: the same ULP distance in CUDA C (NVRTC), with no histogram and with a 1025-bin shared-memory one.

Both count the same buckets; the script checks the CUDA histogram against the package's ``_fine_hist`` state.
Usage: ``python3 benchmarks/histogram_gpu.py`` (CUDA only).
"""

from __future__ import annotations

import ctypes
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_importable, header_lines  # noqa: E402

ensure_importable()
from diagnostic_pass import workload_shapes  # noqa: E402

from altgrad_lightning import get_format  # noqa: E402
from altgrad_lightning.functional import _fused, _fused_cuda  # noqa: E402
from altgrad_lightning.functional._fused import FusedPass  # noqa: E402

SOURCE = r"""
extern "C" __global__ void ulp_hist(const float *__restrict__ b, const float *__restrict__ w, long long n,
                                    unsigned long long *__restrict__ hist, unsigned long long *__restrict__ sums,
                                    int with_hist) {
    __shared__ unsigned int h[1024];
    for (int i = threadIdx.x; i < 1024; i += blockDim.x) h[i] = 0;
    __syncthreads();
    unsigned long long s = 0;
    unsigned int zero = 0;
    const long long stride = (long long)gridDim.x * blockDim.x * 4;
    for (long long base = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4; base < n; base += stride) {
        const float4 bv = *(const float4 *)(b + base), wv = *(const float4 *)(w + base);
        const float bb[4] = {bv.x, bv.y, bv.z, bv.w}, ww[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int ib = __float_as_int(bb[j]), iw = __float_as_int(ww[j]);
            const int kb = ib < 0 ? -(ib & 0x7fffffff) : ib, kw = iw < 0 ? -(iw & 0x7fffffff) : iw;
            const unsigned d = kw >= kb ? (unsigned)kw - (unsigned)kb : (unsigned)kb - (unsigned)kw;
            s += d;
            zero += d == 0;
            if (with_hist && d != 0) {
                const unsigned big = d >= (1u << 24);
                const unsigned dd = big ? d >> 8 : d;
                const int bucket = (__float_as_int((float)dd) >> 19) - (16 * 127 - 1) + (big ? 128 : 0);
                atomicAdd(&h[bucket], 1u);
            }
        }
    }
    __syncthreads();
    if (with_hist)
        for (int i = threadIdx.x; i < 1024; i += blockDim.x)
            if (h[i]) atomicAdd(&hist[i], (unsigned long long)h[i]);
    for (int off = 16; off > 0; off >>= 1) { /* one atomic per warp: a same-address atomic per thread serialises */
        s += __shfl_down_sync(0xffffffffu, s, off);
        zero += __shfl_down_sync(0xffffffffu, zero, off);
    }
    if ((threadIdx.x & 31) == 0) {
        atomicAdd(&sums[0], s);
        atomicAdd(&sums[1], (unsigned long long)zero);
    }
}
"""


def build_kernel() -> tuple[ctypes.CDLL, ctypes.c_void_p]:
    """Compile SOURCE with NVRTC for this device (the package's loader, ``_fused_cuda``) and load it with the driver
    API; returns (libcuda, function)."""
    libs, reason = _fused_cuda._load_libs()
    if libs is None:
        raise SystemExit(reason)
    nvrtc, cuda = libs
    major, minor = torch.cuda.get_device_capability()
    cubin = _fused_cuda._compile(nvrtc, f"sm_{major}{minor}", [], SOURCE.encode())
    torch.cuda.synchronize()  # the runtime has made its primary context current on this thread
    module, fn = ctypes.c_void_p(), ctypes.c_void_p()
    if cuda.cuModuleLoadData(ctypes.byref(module), cubin) or cuda.cuModuleGetFunction(
        ctypes.byref(fn), module, b"ulp_hist"
    ):
        raise SystemExit("loading the probe's cubin failed")
    return cuda, fn


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("CUDA only")
    dev = torch.device("cuda")
    shapes = workload_shapes(768, 12, 512)
    gen = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(s, generator=gen, device=dev) * 0.02 for s in shapes]
    afters = [w + torch.randn(s, generator=gen, device=dev) * 1e-4 for w, s in zip(ws, shapes, strict=True)]
    params = [w.clone() for w in ws]
    flat_b = torch.cat([w.reshape(-1) for w in ws])
    flat_w = torch.cat([a.reshape(-1) for a in afters])
    n = flat_b.numel() // 4 * 4
    cuda, fn = build_kernel()
    hist = torch.zeros(1024, dtype=torch.int64, device=dev)
    sums = torch.zeros(2, dtype=torch.int64, device=dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count

    def cuda_ulp(with_hist: int) -> None:
        ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (flat_b, flat_w)]
        args = [*ptrs, ctypes.c_longlong(n), ctypes.c_void_p(hist.data_ptr()), ctypes.c_void_p(sums.data_ptr()),
                ctypes.c_int(with_hist)]  # fmt: skip
        params_arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        if cuda.cuLaunchKernel(fn, sms * 8, 1, 1, 256, 1, 1, 0, stream, params_arr, None):
            raise SystemExit("cuLaunchKernel failed")

    fmts = [get_format("float8_e4m3fn")]
    fused = FusedPass(params, fmts, ("ulp",), backend="triton")
    torch._foreach_copy_(params, ws)
    fused.before([torch.zeros_like(w) for w in ws], None)
    torch._foreach_copy_(params, afters)

    def triton_ulp(with_hist: bool) -> None:
        _fused._HIST = with_hist
        fused.after()
        _fused._HIST = True

    # Check: the CUDA histogram against the package's (same elements but the last n % 4).
    fused.drain()
    fused.after()
    want = fused.drain()[0]["ulp"][""]["hist"][:1024].clone()
    want[0] = 0
    hist.zero_()
    sums.zero_()
    cuda_ulp(1)
    torch.cuda.synchronize()
    same = torch.equal(hist[1:], want[1:]) if n == flat_b.numel() else None
    moved = (flat_b != flat_w).sum()  # all finite here
    same = same and int(sums[1]) == n - int(moved)

    def timed(call, reps: int = 10, rounds: int = 7) -> float:
        out = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                call()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end) / reps)
        return statistics.median(out)

    cands = {
        "triton ULP, no histogram": lambda: triton_ulp(False),
        "triton ULP + tl.histogram (256-bucket window)": lambda: triton_ulp(True),
        "cuda ULP, no histogram": lambda: cuda_ulp(0),
        "cuda ULP + shared-memory atomics (1024 buckets)": lambda: cuda_ulp(1),
    }
    for call in cands.values():
        call()
    times = {k: timed(v) for k, v in cands.items()}
    print("# fine ULP histogram on the GPU")
    print("\n".join(header_lines(dev)))
    print(f"- {flat_b.numel() / 1e6:.1f} M float32 pairs; CUDA histogram == package histogram: {same}\n")
    print("| kernel | ms (queued, median) |")
    print("|---|--:|")
    for k, t in times.items():
        print(f"| {k} | {t:.3f} |")
    return 0 if same in (True, None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
