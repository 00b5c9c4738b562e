"""A compact Llama-family decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP) in plain torch.

Parameter names follow Hugging Face's LlamaForCausalLM without the `model.` prefix,
so a transformers state dict loads with a key rename only (see weights.py).
The forward pass works on one sequence at a time against its SequenceKV and can
hand each layer's freshly computed K/V to a callback: that is how prefill streams
the KV cache to decode while the later layers are still computing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.engine.kv_cache import SequenceKV

# Called after layer i with that layer's K and V for the new tokens: [kv_heads, S, head_dim].
LayerKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class LlamaArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: Any) -> "LlamaArch":
        """From a transformers LlamaConfig (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", None) or getattr(cfg, "rope_theta", None) or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation, then cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(arch: LlamaArch) -> torch.Tensor:
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float64) / arch.head_dim))
    if arch.rope_scaling is not None:  # Llama 3.x frequency-dependent scaling
        s = arch.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [heads, S, D]; cos/sin: [S, D] (rotate-half convention, as in HF Llama)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_proj = nn.Linear(arch.hidden_size, arch.num_heads * arch.head_dim, bias=False)
        self.k_proj = nn.Linear(arch.hidden_size, arch.num_kv_heads * arch.head_dim, bias=False)
        self.v_proj = nn.Linear(arch.hidden_size, arch.num_kv_heads * arch.head_dim, bias=False)
        self.o_proj = nn.Linear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: SequenceKV, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_new = x.shape[0]  # x: [S, hidden]
        q = self.q_proj(x).view(num_new, self.num_heads, self.head_dim).transpose(0, 1)  # [H, S, D]
        k = self.k_proj(x).view(num_new, self.num_kv_heads, self.head_dim).transpose(0, 1)  # [Hkv, S, D]
        v = self.v_proj(x).view(num_new, self.num_kv_heads, self.head_dim).transpose(0, 1)  # [Hkv, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        num_cached = kv.num_tokens
        keys, values = kv.append(layer, k, v)  # [Hkv, cached + S, D]
        if num_new == 1:
            mask = None  # one new token attends to everything before it
        else:
            # Causal over the new tokens, full over the cached prefix: query i sees keys <= cached + i.
            q_pos = torch.arange(num_new).unsqueeze(1) + num_cached
            mask = torch.arange(num_cached + num_new).unsqueeze(0) <= q_pos  # [S, cached + S]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # [H, S, D]
        return self.o_proj(out.transpose(0, 1).reshape(num_new, -1)), k, v


class MLP(nn.Module):
    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        self.self_attn = Attention(arch)
        self.mlp = MLP(arch)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)

    def new_kv(self, capacity: int = 0) -> SequenceKV:
        a = self.arch
        return SequenceKV(a.num_layers, a.num_kv_heads, a.head_dim, self.embed_tokens.weight.dtype, capacity)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        kv: SequenceKV,
        on_layer_kv: LayerKVHook | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run the new tokens of one sequence, appending their K/V to `kv`.

        token_ids: [S] int64, the tokens after the kv.num_tokens already cached.
        Returns fp32 logits, [S, vocab] if all_logits else [vocab] for the last token.
        """
        start = kv.num_tokens
        positions = torch.arange(start, start + token_ids.shape[0], dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)  # [S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed_tokens.weight.dtype
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

        h = self.embed_tokens(token_ids)  # [S, hidden]
        for i, layer in enumerate(self.layers):
            attn_out, k, v = layer.self_attn(layer.input_layernorm(h), cos, sin, kv, i)
            if on_layer_kv is not None:
                on_layer_kv(i, k, v)
            h = h + attn_out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        kv.commit(token_ids.shape[0])
        h = self.norm(h if all_logits else h[-1:])
        logits = self.lm_head(h).float()
        return logits if all_logits else logits[0]
