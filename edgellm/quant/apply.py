"""Put INT4 weights into a LlamaModel: every quantized linear becomes an Int4Linear, and a tied
embedding table reads its rows from the INT4 LM head instead of keeping a second copy.

Layers that read the same input (q/k/v; gate/up) are fused into one Int4Linear: at decode
batch sizes each kernel call costs about as much in overhead as in arithmetic, so three calls
and three outlier side-matmuls become one.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.engine.model import LlamaModel
from edgellm.quant.int4 import QuantizedWeight
from edgellm.quant.linear import Int4Embedding, Int4Linear, resolve_kernel


def apply_int4(
    model: LlamaModel, quantized: dict[str, QuantizedWeight], dtype: torch.dtype, kernel: str = "auto",
    device: torch.device | str = "cpu",
) -> LlamaModel:
    """Swap the quantized layers in (in place), on `kernel` ("auto", "c" or "torch", see
    quant/linear.py; on a CUDA device always torch's CUDA kernel), and cast what stays dense
    (norms, an untied embedding, an unquantized LM head) to `dtype`, the decode service's
    activation dtype. The INT4 layers are built on `device`; the caller moves the rest."""
    quantized = dict(quantized)
    kernel = resolve_kernel(kernel, device)
    for i, layer in enumerate(model.layers):
        attn, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        fuse(quantized, layer.self_attn, "qkv_proj", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], kernel,
             device)
        fuse(quantized, layer.mlp, "gate_up_proj", [f"{mlp}.gate_proj", f"{mlp}.up_proj"], kernel, device)
    for name, weight in quantized.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, Int4Linear(weight, kernel, device))
    if model.arch.tie_word_embeddings and isinstance(model.lm_head, Int4Linear):
        model.embed_tokens = Int4Embedding(model.lm_head, dtype)
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            setattr(module, pname, nn.Parameter(param.data.to(dtype), requires_grad=False))
    if model.arch.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.embed_tokens.weight  # the cast above untied them: one copy
    return model


def fuse(
    quantized: dict[str, QuantizedWeight], parent: nn.Module, fused_attr: str, names: list[str], kernel: str,
    device: torch.device | str = "cpu",
) -> None:
    """Stack layers' INT4 weights along the output dimension into parent.<fused_attr> and drop
    the separate layers. Skipped unless all are quantized alike (group size, outlier channels)."""
    parts = [quantized.get(n) for n in names]
    if any(p is None for p in parts) or len({p.group_size for p in parts}) != 1:
        return
    channels = [p.outlier_channels for p in parts]
    if any(c is None for c in channels) != all(c is None for c in channels):
        return
    if channels[0] is not None and not all(torch.equal(c, channels[0]) for c in channels):
        return
    fused = QuantizedWeight(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scales for p in parts]),
        torch.cat([p.zeros for p in parts]),
        channels[0],
        None if channels[0] is None else torch.cat([p.outlier_residual for p in parts]),
    )
    setattr(parent, fused_attr, Int4Linear(fused, kernel, device))
    for name in names:
        delattr(parent, name.rpartition(".")[2])
        del quantized[name]
