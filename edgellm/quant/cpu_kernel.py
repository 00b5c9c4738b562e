"""Our INT4 CPU kernel (kernels/int4_cpu.c): built once per machine, loaded with ctypes.

Why a kernel of our own: torch's CPU int4 kernel takes a bf16 scale and zero per group, 5 bits
a weight at group 32, which puts the decode weights at 31-34 % of bf16; group 32 is what keeps
perplexity within bounds here (issue 4). The C kernel reads 8-bit group parameters (about 4.6
bits a weight) and streams its tiles in order. It is plain C: the compiler vectorises it for
the CPU it runs on (-march=native), so the same file serves x86 and the Jetsons' ARM cores.

The shared object is compiled on first use with the system C compiler into the cache
(`<cache>/kernels/`), keyed by the source, the compiler and the CPU's features, so a cache
shared between machines never hands one CPU code built for another. Without a compiler
`library()` returns None and Int4Linear uses torch's kernel (--int4-kernel auto).
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

SOURCE = pathlib.Path(__file__).with_name("kernels") / "int4_cpu.c"
TILE = 32  # output rows per tile (the C file's TILE)
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")

log = structlog.get_logger("edgellm.quant")

_p, _i64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {  # name: (argument types, return type)
    "edgellm_int4_matmul": ((_p, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _p, _p, _i64, _p, _p, _i64, _i64, _i64),
                            ctypes.c_int),
    "edgellm_int4_dequantize": ((_i64, _i64, _i64, _p, _p, _p, _p, _p, _p, _i64), None),
}


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
    """Compile the kernel into `target` (extra_flags: e.g. -mno-avx512f, for the test of the
    portable path). Raises subprocess.CalledProcessError with the compiler's output."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".so")
    os.close(fd)
    try:
        command = [cc, *CFLAGS, *extra_flags, "-o", tmp, str(SOURCE)]
        try:  # with OpenMP (threads over output tiles) where the compiler has it
            subprocess.run([*command, "-fopenmp"], check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)  # atomic: another process never loads a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: pathlib.Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel library, compiled now if this machine has none cached; None where it cannot
    be had (no compiler, or a failed build), logged once."""
    cc = compiler()
    if cc is None:
        log.warning("int4_kernel_unavailable", reason="no C compiler (cc, gcc or clang); using torch's int4 kernel")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            SOURCE.read_bytes() + version.encode() + " ".join(CFLAGS).encode() + _cpu_identity().encode()
        ).hexdigest()[:16]
        target = cache_dir() / "kernels" / f"int4_cpu-{key}.so"
        if not target.exists():
            with file_lock(target.with_name(f".{target.name}.lock")):
                if not target.exists():
                    build(cc, target)
        return load(target)
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:  # AttributeError: a symbol missing
        detail = getattr(exc, "stderr", "") or str(exc)
        log.warning("int4_kernel_unavailable", reason=f"build failed: {detail.strip()[:500]}")
        return None
