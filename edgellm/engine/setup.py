"""Build a ready EngineLoop from the model section of the config (shared by prefill and decode)."""

from __future__ import annotations

import torch

from edgellm.config import ModelConfig
from edgellm.engine.loop import EngineLoop
from edgellm.engine.model import LlamaModel
from edgellm.engine.weights import LoadedModel, load_model


def build_engine(cfg: ModelConfig) -> tuple[EngineLoop, LoadedModel]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_model(cfg.model, cfg.dtype)
    warm_up(loaded.model)
    engine = EngineLoop(loaded.model, loaded.eos_token_ids)
    engine.start()
    return engine, loaded


def warm_up(model: LlamaModel) -> None:
    """Run a short prefill and a decode step once, so the first request does not pay for
    torch's lazy initialisation (kernel selection, allocator growth): ~1.5 s on the CPU here."""
    kv = model.new_kv()
    model(torch.zeros(16, dtype=torch.long), kv)
    model(torch.zeros(1, dtype=torch.long), kv)
