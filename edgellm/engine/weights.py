"""Loading a Hugging Face Llama-family checkpoint into the engine's LlamaModel.

Where checkpoints live (the cache, the embedded default model) is model_store.py.
"""

from __future__ import annotations

import contextlib
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from edgellm.engine.model import LlamaArch, LlamaModel, rope_inv_freq
from edgellm.model_store import resolve_model_dir

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


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
