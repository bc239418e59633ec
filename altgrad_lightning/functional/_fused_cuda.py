"""The fused pass's kernels in CUDA C (``_fused_cuda.cu``), compiled at run time with NVRTC.

NVRTC ships with torch's CUDA wheels (``nvidia/*/lib/libnvrtc.so*``) and the driver (``libcuda.so.1``) with every
CUDA machine, so no nvcc is needed: the source is compiled for the device's architecture on first use (per launch
shape: formats per launch and families, as Triton compiles per constexpr), loaded into the context torch uses, and
launched on torch's current stream with the driver API through ctypes. Anything missing or failing on the way makes
:func:`kernel` return ``None`` (the reason in :func:`unavailable_reason`) and the pass keeps Triton's kernels;
the arithmetic and the partial rows are the same either way (``tests/test_fused.py`` runs both). Launches go
through :class:`Call`, whose host time is a fraction of Triton's launcher's (benchmarks/NOTES.md, session 9).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import site
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

_SOURCE = Path(__file__).with_name("_fused_cuda.cu")
THREADS = 256  # the source's THREADS
MAX_FORMATS = 8  # formats per launch (each one's accumulators cost registers; the source's static_assert)
MAX_FORMATS_BEFORE = 4  # ... of the before kernel, whose accumulators fill the registers from the fifth format
TABLE_LEN = 480  # the source's TABLE_LEN: pointers per set_table launch (its arguments stay under 4 KiB)

FormatRow = tuple[int, int, int, float, float, int, float, float, float, int]  # a row of _fused._format_constants
_lock = threading.Lock()
_libs: tuple[ctypes.CDLL, ctypes.CDLL] | None = None
_reason: str | None = None
_tried = False


class Compiled(NamedTuple):
    """One build of the source: its kernels, and each one's grid (resident blocks of 256 threads on all SMs)."""

    before: ctypes.c_void_p
    after: ctypes.c_void_p
    reduce: ctypes.c_void_p
    set_table: ctypes.c_void_p
    before_grid: int
    after_grid: int


class Families(NamedTuple):
    """What a build computes: ``before`` (stiffness, grid alignment, writes the snapshot) and ``after`` (ULP with
    or without its histogram, flips); the source's DO_* defines."""

    stiff: bool = False
    grid: bool = False
    snap: bool = False
    ulp: bool = False
    hist: bool = False
    flips: bool = False


_kernels: dict[tuple[int, int, tuple[FormatRow, ...], Families], Compiled | None] = {}


def _formats_define(fmts: Sequence[FormatRow]) -> str:
    """The source's FORMATS initialiser for rows of ``_fused._format_constants`` (as the C backend's set_format;
    floats in hexadecimal, so the constants are exact)."""
    rows = []
    for emin, eclamp, m, p2m, fmax, imax, *_, magic in fmts:
        sub_c_bits = (emin - m + 23 + 127) << 23  # 2**(EMIN - M + 23), a normal float32 for the supported formats
        (sub_c,) = struct.unpack("<f", struct.pack("<I", sub_c_bits))
        rows.append(
            f"{{{emin}, {eclamp}, {m}, {imax}, {'true' if magic else 'false'}, {sub_c_bits:#x}u, {float(p2m).hex()}f, "
            f"{float(fmax).hex()}f, {float(sub_c).hex()}f, {float(fmax).hex()}}}"
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


def kernel(device: torch.device, fmts: Sequence[FormatRow], families: Families, *, chunk: int) -> Compiled | None:
    """The source compiled for these formats (rows of ``_fused._format_constants``, at most :data:`MAX_FORMATS`)
    and families on ``device``, for the chunk table's ``chunk`` (elements per chunk, a multiple of 128): its
    ``before_kernel``, ``after_kernel``, ``reduce_rows`` and ``set_table`` (the last two need no format: any build
    serves), or ``None`` where CUDA C cannot be compiled or loaded here."""
    global _libs, _reason, _tried
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, chunk, tuple(fmts), families)
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
                defines = [f"CHUNK={chunk}", f"NF={len(fmts)}"]
                defines += [f"DO_{name.upper()}={int(on)}" for name, on in families._asdict().items()]
                defines += [f"FORMATS={_formats_define(fmts)}"] if fmts else []
                # A lane sums at most chunk / 32 grid-step counts of at most 2 IMAX each.
                defines += ["STEPS_T=unsigned"] if fmts and chunk // 32 * 2 * max(f[5] for f in fmts) < 2**32 else []
                cubin = _compile(nvrtc, f"sm_{major}{minor}", defines)
                module = ctypes.c_void_p()
                if cuda.cuModuleLoadData(ctypes.byref(module), cubin) != 0:
                    raise RuntimeError("cuModuleLoadData failed")
                fns, grids = [], []
                for name in (b"before_kernel", b"after_kernel", b"reduce_rows", b"set_table"):
                    fn, per_sm, no_dynamic_smem = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_size_t(0)
                    if cuda.cuModuleGetFunction(ctypes.byref(fn), module, name) != 0:
                        raise RuntimeError(f"cuModuleGetFunction({name.decode()}) failed")
                    if cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                        ctypes.byref(per_sm), fn, THREADS, no_dynamic_smem
                    ):
                        raise RuntimeError("cuOccupancyMaxActiveBlocksPerMultiprocessor failed")
                    fns.append(fn)
                    grids.append(max(1, per_sm.value) * torch.cuda.get_device_properties(index).multi_processor_count)
        except (RuntimeError, OSError, AttributeError) as err:
            # This shape only: kernels compiled before keep running (passes that hold them keep their backend).
            _reason = f"the CUDA C kernels are unavailable: {err}"
            _kernels[key] = None
            return None
        _kernels[key] = Compiled(fns[0], fns[1], fns[2], fns[3], grids[0], grids[1])
        return _kernels[key]


class Call:
    """One kernel's launch on torch's current stream with its arguments packed once: ``args`` (tensors, passed as
    their data pointers, and ctypes values, in the kernel's order) must keep their storage for as long as the call
    is used; with ``last``, a last pointer argument (``taken`` of after_kernel, ``gscale`` of before_kernel) is set
    on each call. The host time of a launch is then the driver's (~10 µs), where packing the arguments and entering
    the device's context cost ~50 µs per launch on the GPU machines (benchmarks/NOTES.md, session 9)."""

    def __init__(
        self, fn: ctypes.c_void_p, blocks: int, args: Sequence[Any], device: torch.device, *, last: bool = True
    ) -> None:
        assert _libs is not None and device.index is not None
        self._fn, self._blocks, self._index = fn, blocks, device.index
        self._last = ctypes.c_void_p(None)
        values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
        values += [self._last] if last else []
        self._values = values  # the ctypes objects the packed pointers point into
        pointers = [ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values]
        self._params = (ctypes.c_void_p * len(values))(*pointers)

    def __call__(self, last: torch.Tensor | None = None) -> None:
        """Launch, with ``last`` (a tensor on the device, or ``None`` for a null pointer) as the last pointer
        argument where the call has one."""
        assert _libs is not None
        self._last.value = None if last is None else last.data_ptr()
        stream = ctypes.c_void_p(_raw_stream(self._index))
        # The function belongs to its device's context: entered only where another device is current (~6 µs).
        current = torch.cuda.current_device() == self._index
        with contextlib.nullcontext() if current else torch.cuda.device(self._index):
            rc = _libs[1].cuLaunchKernel(self._fn, self._blocks, 1, 1, THREADS, 1, 1, 0, stream, self._params, None)
        if rc != 0:  # pragma: no cover - the arguments are checked by the caller
            raise RuntimeError(f"cuLaunchKernel of a CUDA C kernel of the fused pass failed (CUresult {rc})")


def _raw_stream(index: int) -> int:
    """torch's current stream on device ``index`` as a ``CUstream`` (the private binding Triton's launcher uses:
    ~1 µs, where ``torch.cuda.current_stream`` builds a Stream object)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return int(raw(index)) if raw is not None else torch.cuda.current_stream(index).cuda_stream


def unavailable_reason() -> str | None:
    """Why :func:`kernel` returned ``None`` (``None`` when it has not been tried or succeeded)."""
    return _reason
