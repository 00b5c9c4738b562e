"""Our INT4 CPU kernel (edgellm/native/int4_cpu.c, in the library edgellm/native builds once per
machine), loaded with ctypes.

Why a kernel of our own: torch's CPU int4 kernel takes a bf16 scale and zero per group, 5 bits
a weight at group 32, which puts the decode weights at 31-34 % of bf16; group 32 is what keeps
perplexity within bounds here (issue 4). The C kernel reads 8-bit group parameters (about 4.6
bits a weight) and streams its tiles in order. It is plain C: the compiler vectorises it for
the CPU it runs on (-march=native), so the same file serves x86 and the Jetsons' ARM cores.
Without a compiler `library()` returns None and Int4Linear uses torch's kernel
(--int4-kernel auto).
"""

from __future__ import annotations

import ctypes
import functools
import pathlib

from edgellm import native

TILE = 32  # output rows per tile (the C file's TILE)

_p, _i64 = ctypes.c_void_p, ctypes.c_int64
SIGNATURES: native.Signatures = {
    "edgellm_int4_matmul": ((_p, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _p, _p, _i64, _p, _p, _i64, _i64, _i64),
                            ctypes.c_int),
    "edgellm_int4_dequantize": ((_i64, _i64, _i64, _p, _p, _p, _p, _p, _p, _i64), None),
}

compiler = native.compiler


def build(cc: str, target: pathlib.Path, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile the library holding the kernel into `target` (extra_flags: e.g. -mno-avx512f, for
    the test of the portable path)."""
    native.build(cc, target, extra_flags)


def load(path: pathlib.Path) -> ctypes.CDLL:
    return native.bind(ctypes.CDLL(str(path)), SIGNATURES)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel library, compiled now if this machine has none cached; None where it cannot
    be had (no compiler, or a failed build), logged once as native_kernels_unavailable."""
    lib = native.library()
    return None if lib is None else native.bind(lib, SIGNATURES)
