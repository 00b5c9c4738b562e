"""Put INT4 weights into a LlamaModel: every quantized linear becomes an Int4Linear, and a tied
embedding table reads its rows from the INT4 LM head instead of keeping a second copy."""

from __future__ import annotations

import torch
from torch import nn

from edgellm.engine.model import LlamaModel
from edgellm.quant.int4 import Int4Embedding, Int4Linear, QuantizedWeight


def apply_int4(model: LlamaModel, quantized: dict[str, QuantizedWeight], dtype: torch.dtype) -> LlamaModel:
    """Swap the quantized layers in (in place) and cast what stays dense (norms, an untied
    embedding, an unquantized LM head) to `dtype`, the decode service's activation dtype."""
    for name, weight in quantized.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(
            model.get_submodule(parent_name) if parent_name else model,
            attr,
            Int4Linear(weight),
        )
    if model.arch.tie_word_embeddings and isinstance(model.lm_head, Int4Linear):
        model.embed_tokens = Int4Embedding(model.lm_head, dtype)
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            setattr(module, pname, nn.Parameter(param.data.to(dtype), requires_grad=False))
    if model.arch.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.embed_tokens.weight  # the cast above untied them: one copy
    return model
