"""The CPU backend of :class:`~altgrad_lightning.functional._fused.FusedPass`: ``_fused_cpu.c``, compiled once.

The C file is C99 with GCC/Clang vector extensions (no Python or torch headers), so it builds in a few seconds
with the system C compiler (``$CC``, which may carry arguments, else ``cc``), tuned to this machine
(``-march=native``, retried without it), and is loaded with :mod:`ctypes`, whose calls release the GIL.

Threads: the library runs on the OpenMP runtime torch has loaded (found in ``/proc/self/maps``, linked by path so
that the loader reuses it): torch's OpenMP workers spin for a while after each of torch's parallel regions, and
threads of our own would share the cores with them (``benchmarks/NOTES.md``, session 6: 20 ms against 30 ms per
step of the CPU workload's pass). A build is only kept if it loads (``clang -fopenmp`` against GCC's libgomp links
but does not load, for one), else the next is tried, down to plain pthreads.

Cache: ``$ALTGRAD_LIGHTNING_CACHE``, default ``$XDG_CACHE_HOME/altgrad_lightning`` or
``~/.cache/altgrad_lightning``; where that cannot be written, a private folder of this user's in the temporary
folder (created with mode 0700, and used only if this user owns it and nobody else may write it: another user could
otherwise plant a library there). The file name is a hash of the source, the compiler, this CPU and the OpenMP
runtime; the file is written by an atomic rename, so processes started together (DDP ranks, test workers) never
load a half-written one. Without a working compiler :func:`load` returns ``None`` with the reason in
:func:`unavailable_reason`, and the callers take the reference path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["describe", "load", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("_fused_cpu.c")
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
_OMP_NAME = re.compile(r"lib(g|i|)omp[^/]*\.(so|dylib)(\.[0-9]+)*")
_BASE_FLAGS = ["-std=gnu99", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def _cpu_id() -> str:
    """What the compiled code depends on besides its source: the machine, and on Linux the CPU's model and flags."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            parts += sorted({line.strip() for line in f if line.startswith(("model name", "flags", "Features"))})
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _private_dir(path: Path) -> bool:
    """Create ``path`` with mode 0700 if missing; True if it is a real folder of this user's that nobody else may
    write."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return False
    mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()
    return stat.S_ISDIR(info.st_mode) and mine and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _cache_dirs() -> list[Path]:
    """Where the library may be cached: the configured folder, then this user's private one in the temporary folder
    (for a home that cannot be written), if it is safe (:func:`_private_dir`)."""
    explicit = os.environ.get("ALTGRAD_LIGHTNING_CACHE")
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs = [Path(explicit) if explicit else Path(root) / "altgrad_lightning"]
    user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    private = Path(tempfile.gettempdir()) / f"altgrad_lightning-{user}"
    return dirs + [private] if _private_dir(private) else dirs


def _openmp_runtime() -> str | None:
    """The OpenMP runtime loaded in this process, torch's first (one in torch's folder, else a libgomp), or ``None``
    (no ``/proc``, or no OpenMP runtime loaded)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    found = [p for p in paths if _OMP_NAME.fullmatch(os.path.basename(p))]
    if not found:
        return None
    try:
        import torch

        torch_dir = os.path.dirname(torch.__file__)
    except ImportError:  # pragma: no cover - the package needs torch
        torch_dir = "\0"
    return min(found, key=lambda p: (not p.startswith(torch_dir), "libgomp" not in p, p))


def _compiler() -> list[str]:
    """The C compiler command: ``$CC`` (which may carry arguments, e.g. "ccache gcc"), else ``cc``, ``gcc`` or
    ``clang`` from the PATH; empty if there is none."""
    cc_env = os.environ.get("CC")
    if cc_env:
        return shlex.split(cc_env)
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else []


def _commands(cc: list[str], flags: list[str], omp: str | None, out: str, source: Path) -> list[list[str]]:
    """The compiler commands of one build of ``source``: with ``omp``, compile with ``-fopenmp`` and link that
    runtime by path (not ``-fopenmp`` at the link, which would add the system's libgomp beside torch's)."""
    if omp is None:
        return [[*cc, *flags, *_BASE_FLAGS, "-o", out, str(source)]]
    obj = out + ".o"
    return [
        [*cc, *flags, *_BASE_FLAGS, "-fopenmp", "-DALTGRAD_OPENMP", "-c", "-o", obj, str(source)],
        [*cc, "-shared", "-pthread", "-o", out, obj, omp, f"-Wl,-rpath,{os.path.dirname(omp)}"],
    ]


def _build(
    cc: list[str], omp: str | None, target: Path, source: Path = _SOURCE
) -> tuple[ctypes.CDLL | None, list[str]]:
    """Build ``source`` into the library at ``target`` and load it: with OpenMP, then without; with
    ``-march=native``, then without.
    The first build that compiles and loads is renamed into place (atomically) and returned, with the errors of the
    ones before it. Raises OSError when ``target``'s folder cannot be written."""
    errors: list[str] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    for runtime in dict.fromkeys([omp, None]):
        for flags in _FLAG_SETS:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                for cmd in _commands(cc, flags, runtime, tmp, source):
                    try:
                        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                    except (OSError, subprocess.SubprocessError) as err:
                        errors.append(f"{shlex.join(cmd)}: {err}")
                        break
                    if done.returncode != 0:
                        errors.append(f"{shlex.join(cmd)}: {done.stderr.strip()[-500:]}")
                        break
                else:
                    try:
                        lib = ctypes.CDLL(tmp)
                    except OSError as err:  # links but does not load (e.g. an OpenMP ABI the runtime lacks)
                        errors.append(f"loading the build of {shlex.join(cmd)}: {err}")
                        continue
                    os.replace(tmp, target)  # atomic: a concurrent process sees no file or the whole new one
                    return lib, errors
            finally:
                for leftover in (tmp, tmp + ".o"):
                    if os.path.exists(leftover):
                        os.unlink(leftover)
    return None, errors


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p = ctypes.c_void_p
    fn = lib.altgrad_fused_pass
    fn.argtypes = [p] * 10 + [ctypes.c_float, p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_int]  # fmt: skip
    fn.restype = ctypes.c_int
    q = lib.altgrad_quantize
    q.argtypes = [p, p, ctypes.c_int64, ctypes.c_float, p, ctypes.c_int, ctypes.c_int]
    q.restype = ctypes.c_int
    info = getattr(lib, "altgrad_build_info", None)  # missing in sources before 2026-11-27 (cpu_pass.py --ab)
    if info is not None:
        info.argtypes = []
        info.restype = ctypes.c_int
    return lib


def describe(lib: ctypes.CDLL) -> str:
    """What a build of the CPU pass runs, e.g. ``"8 lanes, AVX-512 intrinsics"`` (for benchmark headers)."""
    info = getattr(lib, "altgrad_build_info", None)
    if info is None:
        return "a build without altgrad_build_info"
    bits = info()
    return f"{bits & 255} lanes" + (", AVX-512 intrinsics" if bits & 256 else ", generic vector code")


def load() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or ``None`` when it cannot be built or loaded (the reason in
    :func:`unavailable_reason`). Thread-safe: a second caller waits for the first one's build."""
    global _lib, _reason, _tried
    with _lock:
        if not _tried:
            _lib, _reason = _load()
            _tried = True
        return _lib


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    cc = _compiler()
    if not cc:
        return None, "no C compiler found (set $CC, or install gcc or clang)"
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"the C compiler {shlex.join(cc)!r} does not run: {err}"
    omp = _openmp_runtime()
    parts = [_SOURCE.read_text(), shlex.join(cc), version, repr(_FLAG_SETS), repr(_BASE_FLAGS), _cpu_id(), str(omp)]
    name = f"fused_cpu_{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:24]}.so"
    problems = []
    for folder in _cache_dirs():
        target = folder / name
        if target.exists():
            try:
                return _declare(ctypes.CDLL(str(target))), None
            except OSError as err:  # a cached file that does not load: build it again below
                problems.append(f"{target}: {err}")
        try:
            lib, errors = _build(cc, omp, target)
        except OSError as err:  # a folder that cannot be written: the next folder
            problems.append(f"{target.parent}: {err}")
            continue
        if lib is not None:
            return _declare(lib), None
        return None, "compiling the CPU pass failed: " + "; ".join(errors)  # no other folder changes the verdict
    return None, "building or loading the CPU pass failed: " + "; ".join(problems)


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when it has not been tried or succeeded)."""
    return _reason
