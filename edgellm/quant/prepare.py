"""Make the decode service's INT4 checkpoint once, cache it, and load a model from it.

`prepare_int4` runs calibration (AWQ) or plain rounding (RTN) on the full-precision model and
writes the portable checkpoint to the cache, keyed by the source model's fingerprint and the
settings; `make setup` (`edgellm prepare-model`) does it ahead of time, or the decode service
does it on its first start. `load_int4_model` builds the decode model from that file alone:
the full-precision weights are never loaded by the decode service, so its memory holds only
the INT4 weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import pathlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from edgellm.engine.model import LlamaArch, LlamaModel, rope_inv_freq
from edgellm.engine.weights import LoadedModel, load_model, read_eos_ids
from edgellm.model_store import cache_dir, file_lock, resolve_model_dir
from edgellm.quant import checkpoint
from edgellm.quant.apply import apply_int4
from edgellm.quant.awq import awq_quantize, collect_stats, rtn_quantize

CALIBRATION_TEXT = pathlib.Path(__file__).with_name("calibration.txt")
CALIBRATION_WINDOW = 512


@dataclass(frozen=True)
class Int4Settings:
    method: str  # "awq" (calibrated) or "rtn" (round-to-nearest)
    group_size: int
    outliers: int  # input channels per layer input kept in bf16 (MixQ); AWQ only
    lm_head: bool  # quantize the LM head (and read a tied embedding from it)

    @classmethod
    def from_weights(cls, weights: str, group_size: int, outliers: int, lm_head: bool) -> Int4Settings | None:
        """From --decode-weights and the --int4-* options; None for dense weights."""
        if not weights.startswith("int4-"):
            return None
        method = weights.removeprefix("int4-")
        return cls(method, group_size, outliers if method == "awq" else 0, lm_head)

    @property
    def label(self) -> str:
        outliers = f"+{self.outliers} outliers" if self.outliers else ""  # e.g. "int4-awq g32+8 outliers"
        return f"int4-{self.method} g{self.group_size}{outliers}{'' if self.lm_head else ' (bf16 lm_head)'}"

    def metadata(self) -> dict[str, str]:
        meta = {
            "method": self.method,
            "group_size": str(self.group_size),
            "outliers": str(self.outliers),
            "lm_head": str(self.lm_head).lower(),
        }
        if self.method == "awq":
            meta["calibration_sha256"] = hashlib.sha256(CALIBRATION_TEXT.read_bytes()).hexdigest()[:16]
        return meta


def checkpoint_path(model_dir: pathlib.Path, settings: Int4Settings) -> pathlib.Path:
    name = f"{settings.method}-g{settings.group_size}-o{settings.outliers}{'' if settings.lm_head else '-densehead'}"
    folder = cache_dir() / "int4" / f"{model_dir.name}-{checkpoint.model_fingerprint(model_dir)}"
    return folder / f"{name}-v{checkpoint.FORMAT_VERSION}.safetensors"  # a new format never meets an old file


def calibration_windows(model_dir: pathlib.Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(CALIBRATION_TEXT.read_text())["input_ids"]
    return [ids[i : i + CALIBRATION_WINDOW] for i in range(0, len(ids), CALIBRATION_WINDOW) if len(ids) - i > 16]


def _progress(show: bool, desc: str) -> Callable[[Iterable], Iterable]:
    if not show:
        return iter
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, unit="step", leave=True)


def build_checkpoint(
    model: str, settings: Int4Settings, path: pathlib.Path, progress: bool = False
) -> None:
    """Quantize the full-precision model and write the checkpoint."""
    loaded = load_model(model, "fp32")
    fp = loaded.model
    if settings.method == "awq":
        stats = collect_stats(fp, calibration_windows(loaded.path), _progress(progress, "calibration"))
        quantized = awq_quantize(
            fp, stats, settings.group_size, settings.outliers, settings.lm_head, _progress(progress, "AWQ search")
        )
    elif settings.method == "rtn":
        quantized = rtn_quantize(fp, settings.group_size, settings.lm_head)
    else:
        raise ValueError(f"unknown INT4 method {settings.method!r} (awq or rtn)")
    quantized_modules = set(quantized)
    tied_into_head = fp.arch.tie_word_embeddings and "lm_head" in quantized_modules
    dense = {}
    for name, param in fp.named_parameters():
        module = name.rpartition(".")[0]
        if module in quantized_modules or (name == "embed_tokens.weight" and tied_into_head):
            continue
        if name == "lm_head.weight" and fp.arch.tie_word_embeddings:
            continue  # tied: stored once, as the embedding
        dense[name] = param.data
    meta = {
        **settings.metadata(),
        "source_model": checkpoint.model_fingerprint(loaded.path),
        "source_name": loaded.path.name,
    }
    checkpoint.save(path, quantized, dense, meta)


def prepare_int4(model: str, settings: Int4Settings, progress: bool = False) -> pathlib.Path:
    """The cached checkpoint for (model, settings), made now if missing. Safe to run from
    several processes at once (a file lock; the file appears atomically)."""
    model_dir = resolve_model_dir(model)
    path = checkpoint_path(model_dir, settings)
    if not path.exists():
        with file_lock(path.with_name(f".{path.name}.lock")):
            if not path.exists():
                build_checkpoint(model, settings, path, progress)
    return path


def _prepare_on_worker_thread(model: str, settings: Int4Settings, num_threads: int) -> pathlib.Path:
    """Calibrate on a short-lived thread with its own torch threads: the caller (a service's
    event-loop thread) must stay single-threaded (see placement.engine_threads)."""
    result: list[pathlib.Path | Exception] = []

    def work() -> None:
        torch.set_num_threads(num_threads)
        try:
            result.append(prepare_int4(model, settings))
        except Exception as exc:  # re-raised on the caller's thread
            result.append(exc)

    worker = threading.Thread(target=work, name="int4-prepare")
    worker.start()
    worker.join()
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def load_int4_model(
    model: str, settings: Int4Settings, path: str = "", num_threads: int = 1, kernel: str = "auto",
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """The decode model with INT4 weights (bf16 activations) on `kernel` (quant/linear.py) and
    `device`, built from the checkpoint at `path` (default: the cache, made now if missing, with
    num_threads). A corrupt or mismatched file raises checkpoint.CheckpointError."""
    from transformers import AutoConfig

    model_dir = resolve_model_dir(model)
    file = pathlib.Path(path) if path else _prepare_on_worker_thread(model, settings, num_threads)
    expect = {**settings.metadata(), "source_model": checkpoint.model_fingerprint(model_dir)}
    quantized, dense, _ = checkpoint.load(file, expect)
    hf_config = AutoConfig.from_pretrained(model_dir)
    arch = LlamaArch.from_hf(hf_config)
    with torch.device("meta"):
        llama = LlamaModel(arch)
    if arch.tie_word_embeddings and "embed_tokens.weight" in dense:
        dense["lm_head.weight"] = dense["embed_tokens.weight"]
    llama.load_state_dict(dense, strict=False, assign=True)
    llama.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)
    apply_int4(llama, quantized, torch.bfloat16, kernel, device)
    llama.to(device)  # what stays dense (norms, an untied embedding); the INT4 layers are there already
    missing = [n for n, p in llama.named_parameters() if p.is_meta]
    if missing:
        raise checkpoint.CheckpointError(f"quantized checkpoint {file} lacks weights for {missing[:5]}")
    llama.eval()
    _return_freed_memory()
    return LoadedModel(llama, model_dir, read_eos_ids(model_dir, hf_config), hf_config)


def _return_freed_memory() -> None:
    """Unpacking and packing the codes frees ~140 MB that glibc keeps in its heap; hand it back
    to the OS so the decode service's resident memory reflects its INT4 weights (measured:
    650 -> 510 MB RSS for the default model)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
