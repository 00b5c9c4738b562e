"""The portable INT4 checkpoint: one safetensors file, made once, checked on every load.

Per quantized layer NAME: NAME.qweight (uint8 [N, K/2], two 4-bit codes a byte, even k in the
low nibble), the group parameters as grid codes (quant/int4.py): NAME.scale_codes (uint8
[N, K/g]), NAME.zero_codes (int8 [N, K/g]), NAME.scale_exp and NAME.zero_exp (int8 [N]), so
W = (q - 8) * scale_code * 2**scale_exp + zero_code * 2**zero_exp; and with outlier channels
NAME.outlier_channels (int64 [k]) and NAME.outlier_residual (bf16 [N, k]).
Everything else the decode model needs (RMSNorm weights with the AWQ scales folded in, an
untied embedding) is stored dense under its own name. Nothing here is specific to the CPU
kernel: the kernel packing happens at load time, so the file can be made on one machine
(the Orin) and copied to others (the Nanos).

The metadata names the source model (a fingerprint of its config and weight files), the
settings, and a SHA-256 over all tensor bytes: a corrupted file, or one made for another
model or other settings, is rejected with a message saying which, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edgellm.quant.int4 import QuantizedWeight, pack_nibbles, unpack_nibbles

FORMAT = "edgellm-int4"
FORMAT_VERSION = "2"


class CheckpointError(ValueError):
    """A quantized checkpoint that must not be used (corrupt, or made for something else)."""


def model_fingerprint(model_dir: pathlib.Path) -> str:
    """Identify a checkpoint directory cheaply: config.json, and each weight file's name, size,
    first and last MiB (hashing every byte of a large model would slow every start)."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    weight_files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    for path in weight_files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(2**20))
            f.seek(max(0, size - 2**20))
            digest.update(f.read(2**20))
    return digest.hexdigest()[:16]


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save(
    path: pathlib.Path, quantized: dict[str, QuantizedWeight], dense: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, q in quantized.items():
        tensors[f"{name}.qweight"] = pack_nibbles(q.codes).contiguous()
        param_codes = q.param_codes()
        for part, tensor in zip(("scale_codes", "zero_codes", "scale_exp", "zero_exp"), param_codes):
            tensors[f"{name}.{part}"] = tensor.contiguous()
        if q.outlier_channels is not None:
            tensors[f"{name}.outlier_channels"] = (
                q.outlier_channels.long().clone()
            )  # shared by q/k/v: safetensors wants one owner
            tensors[f"{name}.outlier_residual"] = q.outlier_residual.bfloat16().contiguous()
    for name, t in dense.items():
        tensors[name] = t.detach().contiguous()
    metadata = {
        **meta,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "quantized": json.dumps(sorted(quantized)),
        "sha256": _tensor_digest(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)  # atomic: a half-written checkpoint is never seen


def load(
    path: pathlib.Path, expect: dict[str, str]
) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict[str, str]]:
    """Read and verify a checkpoint: `expect` holds metadata values it must match (the source
    model's fingerprint, method, group size...). Raises CheckpointError saying what is wrong."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"quantized checkpoint {path} is unreadable ({exc}); delete it to rebuild") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an {FORMAT} v{FORMAT_VERSION} checkpoint (format={meta.get('format')!r})")
    if _tensor_digest(tensors) != meta.get("sha256"):
        raise CheckpointError(
            f"quantized checkpoint {path} is corrupted (tensor checksum mismatch); delete it to rebuild"
        )
    for key, want in expect.items():
        if meta.get(key) != want:
            raise CheckpointError(
                f"quantized checkpoint {path} was made with {key}={meta.get(key)!r}, but this service needs {key}={want!r}"
            )
    quantized: dict[str, QuantizedWeight] = {}
    for name in json.loads(meta["quantized"]):
        parts = ("qweight", "scale_codes", "zero_codes", "scale_exp", "zero_exp")
        if missing := [f"{name}.{part}" for part in parts if f"{name}.{part}" not in tensors]:
            raise CheckpointError(f"quantized checkpoint {path} lacks {missing[0]}; delete it to rebuild")
        packed, scale_codes, zero_codes, scale_exp, zero_exp = (tensors.pop(f"{name}.{part}") for part in parts)
        scales = scale_codes.float() * torch.exp2(scale_exp.float())[:, None]
        zeros = zero_codes.float() * torch.exp2(zero_exp.float())[:, None]
        channels = tensors.pop(f"{name}.outlier_channels", None)
        residual = tensors.pop(f"{name}.outlier_residual", None)
        quantized[name] = QuantizedWeight(unpack_nibbles(packed), scales, zeros, channels, residual)
    return quantized, tensors, meta
