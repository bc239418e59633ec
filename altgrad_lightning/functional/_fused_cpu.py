"""The CPU backend of :class:`~altgrad_lightning.functional._fused.FusedPass`: ``_fused_cpu.c``, compiled once.

The C file is C99 with GCC/Clang vector extensions (no Python or torch headers), so it builds in about a second
with the system C compiler (``$CC``, else ``cc``), tuned to this machine (``-march=native``, retried without it),
and is loaded with :mod:`ctypes`, whose calls release the GIL. Its threads come from the OpenMP runtime torch has
loaded (found in ``/proc/self/maps`` and linked by path, so the loader reuses it): torch's OpenMP workers spin for
a while after each of torch's parallel regions, and threads of our own would share the cores with them (measured:
27-31 ms against 19 ms per step of the CPU workload's pass). Without such a runtime it uses pthreads. The library
is cached under
``$ALTGRAD_LIGHTNING_CACHE`` (default ``$XDG_CACHE_HOME/altgrad_lightning``, else ``~/.cache/altgrad_lightning``)
by a hash of the source, the compiler and this CPU (in the temporary folder where that cannot be written), and
written by an atomic rename, so processes started together (DDP ranks, test workers) never load a half-written
file. Without a working compiler :func:`load` returns ``None``
with the reason in :func:`unavailable_reason`, and the callback takes the reference path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["load", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("_fused_cpu.c")
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
_OMP_NAME = re.compile(r"lib(g|i|)omp[^/]*\.(so|dylib)(\.[0-9]+)*")
_BASE_FLAGS = ["-std=gnu99", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno"]
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


def _cache_dirs() -> list[Path]:
    """Where the library is cached: the configured folder, then one of this user's in the temporary folder (for a
    home that cannot be written)."""
    explicit = os.environ.get("ALTGRAD_LIGHTNING_CACHE")
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return [Path(explicit) if explicit else Path(root) / "altgrad_lightning",
            Path(tempfile.gettempdir()) / f"altgrad_lightning-{user}"]  # fmt: skip


def _openmp_runtime() -> str | None:
    """The OpenMP runtime loaded in this process (torch's), or ``None`` (no ``/proc``, or torch without OpenMP)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if line.rstrip().endswith((".so", ".so.1", ".so.5"))}
    except OSError:
        return None
    found = sorted(p for p in paths if _OMP_NAME.fullmatch(os.path.basename(p)))
    return found[0] if found else None


def _commands(cc: str, flags: list[str], omp: str | None, out: str) -> list[list[str]]:
    """The compiler commands of one build: with ``omp``, compile with ``-fopenmp`` and link that runtime by path
    (not ``-fopenmp`` at the link, which would add the system's libgomp beside torch's)."""
    if omp is None:
        return [[cc, *flags, *_BASE_FLAGS, "-o", out, str(_SOURCE)]]
    obj = out + ".o"
    return [
        [cc, *flags, *_BASE_FLAGS, "-fopenmp", "-DALTGRAD_OPENMP", "-c", "-o", obj, str(_SOURCE)],
        [cc, "-shared", "-pthread", "-o", out, obj, omp, f"-Wl,-rpath,{os.path.dirname(omp)}"],
    ]


def _compile(cc: str, omp: str | None, target: Path) -> str | None:
    """Build the library at ``target`` (with OpenMP, then without; with ``-march=native``, then without); ``None``
    on success, else what the compiler said."""
    errors = []
    target.parent.mkdir(parents=True, exist_ok=True)
    for runtime in dict.fromkeys([omp, None]):
        for flags in _FLAG_SETS:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                for cmd in _commands(cc, flags, runtime, tmp):
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                    if done.returncode != 0:
                        errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-500:]}")
                        break
                else:
                    os.replace(tmp, target)  # atomic: a concurrent process sees no file or the whole new one
                    return None
            except (OSError, subprocess.SubprocessError) as err:
                return f"{cc}: {err}"
            finally:
                for leftover in (tmp, tmp + ".o"):
                    if os.path.exists(leftover):
                        os.unlink(leftover)
    return "; ".join(errors)


def load() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or ``None`` when it cannot be built or loaded."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    _tried = True
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _reason = "no C compiler found (set $CC, or install gcc or clang)"
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        _reason = f"the C compiler {cc!r} does not run: {err}"
        return None
    omp = _openmp_runtime()
    key = hashlib.sha256(
        "\n".join([_SOURCE.read_text(), cc, version, repr(_FLAG_SETS), repr(_BASE_FLAGS), _cpu_id(), str(omp)]).encode()
    ).hexdigest()[:24]
    errors = []
    for folder in _cache_dirs():
        target = folder / f"fused_cpu_{key}.so"
        try:
            if not target.exists():
                error = _compile(cc, omp, target)
                if error is not None:  # the compiler's verdict: no other folder changes it
                    _reason = f"compiling the CPU pass failed: {error}"
                    return None
            lib = ctypes.CDLL(str(target))
            break
        except OSError as err:  # a folder that cannot be written, or a file that does not load: the next folder
            errors.append(f"{target}: {err}")
    else:
        _reason = "building or loading the CPU pass failed: " + "; ".join(errors)
        return None
    fn = lib.altgrad_fused_pass
    p = ctypes.c_void_p
    fn.argtypes = [p] * 10 + [ctypes.c_float, p, p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_int]  # fmt: skip
    fn.restype = ctypes.c_int
    q = lib.altgrad_quantize
    q.argtypes = [p, p, ctypes.c_int64, ctypes.c_float, p, ctypes.c_int, ctypes.c_int]
    q.restype = ctypes.c_int
    _lib = lib
    return lib


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when it has not been tried or succeeded)."""
    return _reason
