"""Our C code, one shared library: the INT4 kernel (int4_cpu.c, for quant/), the decode step's
fused ops (decode_cpu.c, for engine/), the whole layer loop of a decode step on them
(decode_step.c) and the thread pool they use (pool.c). Callers bind their
functions' ctypes signatures themselves (quant/cpu_kernel.py, engine/cpu_ops.py).

The library is compiled on first use with the system C compiler into the cache
(`<cache>/kernels/`), keyed by the sources, the compiler and the CPU's features, so a cache
shared between machines never hands one CPU code built for another. Without a compiler, or when
the build fails, `library()` returns None (logged once, `native_kernels_unavailable`) and the
callers keep their torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import structlog

from edgellm.model_store import cache_dir, file_lock

DIR = pathlib.Path(__file__).parent
SOURCES = tuple(DIR / name for name in ("pool.c", "int4_cpu.c", "decode_cpu.c", "decode_step.c"))
HEADERS = (DIR / "pool.h", DIR / "native.h")
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11", "-pthread")
# name: (argument types, return type)
Signatures = dict[str, tuple[tuple[type, ...], type | None]]

log = structlog.get_logger("edgellm.native")


def _cpu_identity() -> str:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    flags = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name", "CPU part")):
                flags += line
    except OSError:
        pass
    return f"{platform.machine()}:{flags}"


def compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(cc: str, target: pathlib.Path, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile the library into `target` (extra_flags: e.g. -mno-avx512f, for the tests of the
    portable paths). Raises subprocess.CalledProcessError with the compiler's output."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".so")
    os.close(fd)
    try:
        command = [cc, *CFLAGS, *extra_flags, f"-I{DIR}", "-o", tmp, *map(str, SOURCES), "-lm"]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)  # atomic: another process never loads a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def bind(lib: ctypes.CDLL, signatures: Signatures) -> ctypes.CDLL:
    """Set the ctypes signatures of lib's functions (AttributeError: one is missing)."""
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The library, built now if this machine has none cached; None where it cannot be had."""
    cc = compiler()
    if cc is None:
        log.warning("native_kernels_unavailable", reason="no C compiler (cc, gcc or clang); using torch's kernels")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        code = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
        key = hashlib.sha256(
            code + version.encode() + " ".join(CFLAGS).encode() + _cpu_identity().encode()
        ).hexdigest()[:16]
        target = cache_dir() / "kernels" / f"edgellm_native-{key}.so"
        if not target.exists():
            with file_lock(target.with_name(f".{target.name}.lock")):
                if not target.exists():
                    build(cc, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        log.warning("native_kernels_unavailable", reason=f"build failed: {detail.strip()[:500]}")
        return None
