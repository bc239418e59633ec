"""The fused pass's ``after`` kernel in CUDA C (``_fused_cuda.cu``), compiled at run time with NVRTC.

NVRTC ships with torch's CUDA wheels (``nvidia/*/lib/libnvrtc.so*``) and the driver (``libcuda.so.1``) with every
CUDA machine, so no nvcc is needed: the source is compiled for the device's architecture on first use (per launch
shape: formats per launch and families, as Triton compiles per constexpr), loaded into the context torch uses, and
launched on torch's current stream with the driver API through ctypes. Anything missing or failing on the way makes
:func:`kernel` return ``None`` (the reason in :func:`unavailable_reason`) and the pass keeps Triton's ``after``
kernel; the arithmetic and the partial rows are the same either way (``tests/test_fused.py`` runs both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import math
import os
import site
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_SOURCE = Path(__file__).with_name("_fused_cuda.cu")
THREADS = 256  # the source's THREADS
MAX_FORMATS = 4  # formats per launch (each one's accumulators cost registers)

_Row = tuple[int, int, int, float, float, int, float, float, float]  # a row of _fused._format_constants
_lock = threading.Lock()
_libs: tuple[ctypes.CDLL, ctypes.CDLL] | None = None
_reason: str | None = None
_tried = False
_kernels: dict[tuple[int, int, tuple[_Row, ...], bool, bool, bool], tuple[ctypes.c_void_p, int] | None] = {}


def _formats_define(fmts: Sequence[_Row]) -> str:
    """The source's FORMATS initialiser for rows of ``_fused._format_constants`` (as the C backend's set_format;
    floats in hexadecimal, so the constants are exact)."""
    rows = []
    for emin, eclamp, m, p2m, fmax, imax, *_ in fmts:
        sub_c_bits = (emin - m + 23 + 127) << 23  # 2**(EMIN - M + 23), a normal float32 for the supported formats
        (sub_c,) = struct.unpack("<f", struct.pack("<I", sub_c_bits))
        # round_index's magic-constant rounding needs 2**(e + 23 - M) finite for every e up to max's exponent
        magic = m <= 22 and math.frexp(fmax)[1] - 1 + 23 - m <= 127
        rows.append(
            f"{{{emin}, {eclamp}, {m}, {imax}, {str(magic).lower()}, {sub_c_bits:#x}u, {float(p2m).hex()}f, "
            f"{float(fmax).hex()}f, "
            f"{float(sub_c).hex()}f, {float(fmax).hex()}}}"
        )
    return "{" + ", ".join(rows) + "}"


def _find_nvrtc() -> str | None:
    """NVRTC beside torch: in torch's own lib folder or in the ``nvidia`` wheels torch depends on (``nvidia/cu13/lib``,
    ``nvidia/cuda_nvrtc/lib``), else wherever the dynamic loader finds it."""
    places = [os.path.join(os.path.dirname(torch.__file__), "lib")]
    places += [os.path.join(sp, "nvidia", "*", "lib") for sp in site.getsitepackages()]
    for place in places:
        for found in sorted(glob.glob(os.path.join(place, "libnvrtc.so*"))):
            if os.path.isfile(found):
                return found
    return ctypes.util.find_library("nvrtc")


def _load_libs() -> tuple[tuple[ctypes.CDLL, ctypes.CDLL] | None, str | None]:
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None, "no CUDA device"
    path = _find_nvrtc()
    if path is None:
        return None, "NVRTC (libnvrtc.so) not found beside torch"
    try:
        return (ctypes.CDLL(path), ctypes.CDLL("libcuda.so.1")), None
    except OSError as err:
        return None, f"loading NVRTC or the CUDA driver failed: {err}"


def _compile(nvrtc: ctypes.CDLL, arch: str, defines: list[str], source: bytes | None = None) -> bytes:
    """The cubin of ``source`` (``_fused_cuda.cu`` by default) for ``arch`` with ``defines`` (``NAME=VALUE``, written
    as ``#define`` lines ahead of the source: values may hold commas, which compiler options would split)."""
    prog = ctypes.c_void_p()
    head = "".join(f"#define {d.replace('=', ' ', 1)}\n" for d in defines)
    src = head.encode() + (_SOURCE.read_bytes() if source is None else source)
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"_fused_cuda.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        # No fused multiply-add: every product of a sum term is rounded as the reference rounds it.
        opts = [f"--gpu-architecture={arch}".encode(), b"--fmad=false"]
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if rc != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC: {log.value.decode(errors='replace')[-2000:]}")
        size = ctypes.c_size_t()
        if nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size)) != 0:
            raise RuntimeError("nvrtcGetCUBINSize failed")
        cubin = ctypes.create_string_buffer(size.value)
        if nvrtc.nvrtcGetCUBIN(prog, cubin) != 0:
            raise RuntimeError("nvrtcGetCUBIN failed")
        return cubin.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def kernel(
    device: torch.device, fmts: Sequence[_Row], do_ulp: bool, do_hist: bool, do_flips: bool, *, chunk: int
) -> tuple[ctypes.c_void_p, int] | None:
    """The compiled ``after_kernel`` for these formats (rows of ``_fused._format_constants``, at most
    :data:`MAX_FORMATS`) and families on ``device``, for the chunk table's ``chunk`` (elements per chunk, a multiple
    of 128), and its grid size (resident blocks on all SMs), or ``None`` where CUDA C cannot be compiled or loaded
    here."""
    global _libs, _reason, _tried
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, chunk, tuple(fmts), do_ulp, do_hist, do_flips)
    with _lock:
        if key in _kernels:
            return _kernels[key]
        if not _tried:
            _libs, _reason = _load_libs()
            _tried = True
        if _libs is None:
            return None
        nvrtc, cuda = _libs
        try:
            with torch.cuda.device(index):
                torch.cuda.synchronize()  # the runtime has made the device's primary context current here
                ctx = ctypes.c_void_p()
                if cuda.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or not ctx.value:
                    raise RuntimeError("no current CUDA context")
                major, minor = torch.cuda.get_device_capability(index)
                defines = [f"CHUNK={chunk}", f"NF={len(fmts)}", f"DO_ULP={int(do_ulp)}", f"DO_HIST={int(do_hist)}",
                           f"DO_FLIPS={int(do_flips)}"]  # fmt: skip
                defines += [f"FORMATS={_formats_define(fmts)}"] if fmts else []
                # A lane sums at most chunk / 32 grid-step counts of at most 2 IMAX each.
                defines += ["STEPS_T=unsigned"] if fmts and chunk // 32 * 2 * max(f[5] for f in fmts) < 2**32 else []
                cubin = _compile(nvrtc, f"sm_{major}{minor}", defines)
                module, fn = ctypes.c_void_p(), ctypes.c_void_p()
                if cuda.cuModuleLoadData(ctypes.byref(module), cubin) != 0:
                    raise RuntimeError("cuModuleLoadData failed")
                if cuda.cuModuleGetFunction(ctypes.byref(fn), module, b"after_kernel") != 0:
                    raise RuntimeError("cuModuleGetFunction failed")
                per_sm, no_dynamic_smem = ctypes.c_int(), ctypes.c_size_t(0)
                if cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(per_sm), fn, THREADS, no_dynamic_smem):
                    raise RuntimeError("cuOccupancyMaxActiveBlocksPerMultiprocessor failed")
                sms = torch.cuda.get_device_properties(index).multi_processor_count
        except (RuntimeError, OSError, AttributeError) as err:
            # This shape only: kernels compiled before keep running (passes that hold them keep their backend).
            _reason = f"the CUDA C after kernel is unavailable: {err}"
            _kernels[key] = None
            return None
        _kernels[key] = (fn, max(1, per_sm.value) * sms)
        return _kernels[key]


def launch(fn: ctypes.c_void_p, grid: int, tensors: Sequence[torch.Tensor], n_chunks: int, ncols: int) -> None:
    """Launch on torch's current stream: ``tensors`` are w_tab, snap_off, chunk_t, chunk_start, numel, snapshot,
    part, hist and the work counters (two int32 zeros, which the kernel leaves at zero), in the kernel's order."""
    assert _libs is not None
    args: list[Any] = [ctypes.c_void_p(t.data_ptr()) for t in tensors]
    args += [ctypes.c_longlong(n_chunks), ctypes.c_int(ncols)]
    params = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    device = tensors[0].device
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    blocks = min(grid, -(-n_chunks // (THREADS // 32)))  # a warp per chunk
    with torch.cuda.device(device):  # the function belongs to this device's context
        rc = _libs[1].cuLaunchKernel(fn, blocks, 1, 1, THREADS, 1, 1, 0, stream, params, None)
    if rc != 0:  # pragma: no cover - the arguments are checked by the caller
        raise RuntimeError(f"cuLaunchKernel of the CUDA C after kernel failed (CUresult {rc})")


def unavailable_reason() -> str | None:
    """Why :func:`kernel` returned ``None`` (``None`` when it has not been tried or succeeded)."""
    return _reason
