"""Our C files (the INT4 kernel, the decode step's fused ops): compiled once per machine, loaded
with ctypes.

A shared object is compiled on first use with the system C compiler into the cache
(`<cache>/kernels/`), keyed by the source, the compiler and the CPU's features, so a cache
shared between machines never hands one CPU code built for another. Without a compiler, or when
the build fails, `library()` returns None (logged once per file) and the callers keep their
plain-torch paths.
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

CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")
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


def build(cc: str, source: pathlib.Path, target: pathlib.Path, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile `source` into `target` (extra_flags: e.g. -mno-avx512f, for the tests of portable
    paths). Raises subprocess.CalledProcessError with the compiler's output."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".so")
    os.close(fd)
    try:
        command = [cc, *CFLAGS, *extra_flags, "-o", tmp, str(source), "-lm"]
        try:  # with OpenMP (threads over independent work items) where the compiler has it
            subprocess.run([*command, "-fopenmp"], check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)  # atomic: another process never loads a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: pathlib.Path, signatures: Signatures) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@functools.cache
def _library(source: pathlib.Path, signatures: tuple[tuple[str, tuple[tuple[type, ...], type | None]], ...],
             event: str) -> ctypes.CDLL | None:
    name = source.stem
    cc = compiler()
    if cc is None:
        log.warning(event, reason="no C compiler (cc, gcc or clang); using the torch path")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            source.read_bytes() + version.encode() + " ".join(CFLAGS).encode() + _cpu_identity().encode()
        ).hexdigest()[:16]
        target = cache_dir() / "kernels" / f"{name}-{key}.so"
        if not target.exists():
            with file_lock(target.with_name(f".{target.name}.lock")):
                if not target.exists():
                    build(cc, source, target)
        return load(target, dict(signatures))
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:  # AttributeError: a symbol missing
        detail = getattr(exc, "stderr", "") or str(exc)
        log.warning(event, reason=f"build failed: {detail.strip()[:500]}")
        return None


def library(source: pathlib.Path, signatures: Signatures, event: str) -> ctypes.CDLL | None:
    """The compiled `source` with its functions' ctypes signatures set, built now if this
    machine has none cached; None where it cannot be had (logged once, as `event`)."""
    return _library(source, tuple(signatures.items()), event)
