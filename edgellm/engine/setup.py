"""Build a ready EngineLoop from the model section of the config (shared by prefill and decode)."""

from __future__ import annotations

from edgellm.config import ModelConfig
from edgellm.engine.loop import EngineLoop
from edgellm.engine.weights import LoadedModel, load_model


def build_engine(cfg: ModelConfig) -> tuple[EngineLoop, LoadedModel]:
    loaded = load_model(cfg.model, cfg.dtype)
    engine = EngineLoop(loaded.model, loaded.eos_token_ids, num_threads=cfg.threads)
    engine.start()  # returns after the engine thread's warm-up
    return engine, loaded
