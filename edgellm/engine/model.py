"""A compact Llama-family decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP) in plain torch.

Parameter names follow Hugging Face's LlamaForCausalLM without the `model.` prefix,
so a transformers state dict loads with a key rename only (see weights.py).
The forward pass runs a packed batch (ForwardBatch): several whole prompts (prefill,
variable-length attention, no padding) or one new token for each of many sequences
(decode, attention over the paged KV cache). It can hand each layer's freshly computed
K/V to a callback: that is how prefill streams the KV cache to decode while the later
layers are still computing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgellm.engine import cpu_ops
from edgellm.engine.kv_cache import ContextView, ForwardBatch, PagedKVCache

# Called after layer i with that layer's K and V for the batch's new tokens: [T, kv_heads, head_dim].
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
        # Normalise in fp32 like the reference implementation, then cast back (torch's fused
        # rms_norm: one op instead of five, the same arithmetic).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


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
    # x: [T, heads, D]; cos/sin: [T, 1, D] (rotate-half convention, as in HF Llama)
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
        self.qkv_proj: nn.Module | None = None  # q, k, v fused into one layer (INT4 decode), else None

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q and k with RoPE applied, and v, each [T, heads, D]."""
        num_tokens, h, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            # one kernel call instead of three (they read the same input), and one RoPE over the
            # q and k heads side by side
            qkv = self.qkv_proj(x).view(num_tokens, h + 2 * hkv, d)
            qk = apply_rope(qkv[:, : h + hkv], cos, sin)
            return qk[:, :h], qk[:, h:], qkv[:, h + hkv :]
        q = apply_rope(self.q_proj(x).view(num_tokens, h, d), cos, sin)
        k = apply_rope(self.k_proj(x).view(num_tokens, hkv, d), cos, sin)
        return q, k, self.v_proj(x).view(num_tokens, hkv, d)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        batch: ForwardBatch,
        cache: PagedKVCache | None,
        layer: int,
        context: ContextView | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tokens = x.shape[0]  # x: [T, hidden], all sequences' new tokens packed
        q, k, v = self.rotated_qkv(x, cos, sin)  # [T, H, D], [T, Hkv, D], [T, Hkv, D]
        if cache is not None and batch.slot_mapping is not None:
            rows = batch.store_rows
            cache.store(layer, batch.slot_mapping, k if rows is None else k[rows], v if rows is None else v[rows])
        if batch.is_prefill:
            prefixes = [None if p is None else (p[0][layer], p[1][layer])
                        for p in batch.prefix_kv or [None] * (len(batch.cu_seqlens) - 1)]
            out = self._prefill_attention(q, k, v, batch.cu_seqlens, prefixes)
        else:
            assert cache is not None and context is not None, "decode reads the paged cache"
            out = self._decode_attention(q, cache, layer, context)
        return self.o_proj(out.reshape(num_tokens, -1)), k, v

    def _prefill_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], prefixes: list
    ) -> torch.Tensor:
        # Variable-length: each packed sequence attends causally to itself only (and to its cached
        # prefix, when it has one: K, V [C, Hkv, D]). A loop over sequences (not tokens); the
        # projections and MLP ran on the packed batch without padding.
        out = torch.empty_like(q)
        for (start, end), prefix in zip(zip(cu_seqlens[:-1], cu_seqlens[1:]), prefixes):
            ks, vs = k[start:end], v[start:end]
            mask, causal = None, True
            if prefix is not None:  # new token i sees the whole prefix and new tokens 0..i
                num_prefix, num_new = prefix[0].shape[0], end - start
                ks, vs = torch.cat((prefix[0].to(ks.dtype), ks)), torch.cat((prefix[1].to(vs.dtype), vs))
                positions = torch.arange(num_prefix + num_new, device=q.device)
                mask = positions[None, :] <= positions[num_prefix:, None]
                causal = False
            # [1, heads, L, D]: with a batch dimension SDPA takes its fused CPU kernel (6x faster at 1.5k tokens)
            qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[start:end], ks, vs))
            out[start:end] = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, is_causal=causal, enable_gqa=True
            )[0].transpose(0, 1)
        return out

    def _decode_attention(self, q: torch.Tensor, cache: PagedKVCache, layer: int, context: ContextView) -> torch.Tensor:
        # One new token per sequence attends to its whole context, read from the paged cache
        # through the block tables in one gather; padding beyond each context is masked out.
        keys, values = cache.gather(layer, context.slots)  # [B, Hkv, L, D]
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=context.mask, enable_gqa=True
        )  # [B, H, 1, D]
        return out.squeeze(2)


class MLP(nn.Module):
    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up fused into one layer (INT4 decode), else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


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
        # Decode steps on the CPU take cpu_ops' fused ops where they apply (False: always the
        # plain torch path, the reference the tests compare them with).
        self.fused_cpu_decode = True
        # cpu_ops.DecodeLayers when a decode step's whole layer loop can run in one C call (INT4
        # projections on our kernel), False when not, None until the first fused decode step asks
        self._c_decode_layers: cpu_ops.DecodeLayers | bool | None = None
        # A later pipeline stage (parallel/stages.py) keeps only its layers: without embed_tokens
        # its forward pass starts from the previous stage's hidden states, without lm_head it
        # returns its own. `norm` stays on every stage: its dtype is the activation dtype.
        self.embed_tokens: nn.Module | None
        self.lm_head: nn.Module | None

    def weight_bytes(self) -> int:
        return weight_bytes(self)

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        cache: PagedKVCache | None,
        on_layer_kv: LayerKVHook | None = None,
        all_logits: bool = False,
        hidden: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Run one packed batch: prefill (several whole prompts) or decode (one token per sequence).

        New K/V go to the cache at batch.slot_mapping (when given) and to on_layer_kv as each
        layer finishes. Returns fp32 logits: one row per sequence (its last token), or one row
        per token with all_logits.
        Pipeline stages: hidden ([T, hidden_size], the previous stage's output) replaces the
        embedding; with head=False, or without an LM head, the hidden states after this model's
        layers come back, [T, hidden_size] (logits() finishes them).
        """
        freqs = torch.outer(batch.positions.float(), self.inv_freq)  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D], broadcast over heads
        dtype = self.norm.weight.dtype  # the activation dtype (the embedding may be INT4)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

        if self._takes_fused_decode(batch, cache, dtype):
            h = self.embed_tokens(batch.token_ids) if hidden is None else hidden.clone()  # [T, hidden], updated in place
            return self._fused_decode(h.to(dtype).contiguous(), cos[:, 0].contiguous(), sin[:, 0].contiguous(), batch, cache,
                                      on_layer_kv, head)
        context = None
        if not batch.is_prefill and cache is not None:
            context = cache.context_view(batch.block_tables, batch.context_lens, batch.max_context_len, dtype)
        h = self.embed_tokens(batch.token_ids) if hidden is None else hidden  # [T, hidden]
        for i, layer in enumerate(self.layers):
            attn_out, k, v = layer.self_attn(layer.input_layernorm(h), cos, sin, batch, cache, i, context)
            if on_layer_kv is not None:
                on_layer_kv(i, k, v)
            h = h + attn_out
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if not head or self.lm_head is None:
            return h
        return self.logits(h, batch, all_logits)

    def _takes_fused_decode(self, batch: ForwardBatch, cache: PagedKVCache | None, dtype: torch.dtype) -> bool:
        a = self.arch
        return (self.fused_cpu_decode and not batch.is_prefill and cache is not None and batch.store_rows is None
                and len(self.layers) > 0 and all(layer.self_attn.qkv_proj is not None for layer in self.layers)
                and cache.k[0].dtype == dtype
                and cpu_ops.usable(cache.device, dtype, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim))

    def _fused_decode(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                      cache: PagedKVCache, on_layer_kv: LayerKVHook | None, head: bool) -> torch.Tensor:
        """forward's layer loop for a CPU decode step, on cpu_ops' fused ops: the same arithmetic
        (h [B, hidden] the residual stream, updated in place; cos, sin [B, D])."""
        a, eps = self.arch, self.arch.rms_norm_eps
        num_tokens, h_q, h_kv = h.shape[0], a.num_heads, a.num_kv_heads
        if self._c_decode_layers is None:  # first decode step: can the whole loop run in C?
            self._c_decode_layers = cpu_ops.DecodeLayers(self) if cpu_ops.DecodeLayers.applies(self) else False
        if self._c_decode_layers and on_layer_kv is None and num_tokens <= self._c_decode_layers.max_rows:
            x = self._c_decode_layers.run(h, cos, sin, batch.slot_mapping, batch.block_tables, batch.context_lens,
                                          cache)
            return h if not head or self.lm_head is None else self.lm_head(x).float()
        x = cpu_ops.add_rms_norm(None, h, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = attn.qkv_proj(x).view(num_tokens, h_q + 2 * h_kv, a.head_dim).contiguous()
            cpu_ops.rope_store(qkv, cos, sin, h_q, h_kv, batch.slot_mapping, cache.k[i], cache.v[i])
            if on_layer_kv is not None:
                on_layer_kv(i, qkv[:, h_q : h_q + h_kv], qkv[:, h_q + h_kv :])
            out = cpu_ops.paged_attention(qkv, h_q, cache.k[i], cache.v[i], batch.block_tables, batch.context_lens,
                                          cache.block_size)  # [B, H, D]
            x = cpu_ops.add_rms_norm(attn.o_proj(out.view(num_tokens, -1)), h, layer.post_attention_layernorm.weight, eps)
            # the next layer's input norm (after the last layer: the final norm) with the residual add
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x = cpu_ops.add_rms_norm(layer.mlp(x), h, norm.weight, eps)
        if not head or self.lm_head is None:
            return h
        return self.lm_head(x).float()

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, batch: ForwardBatch, all_logits: bool = False) -> torch.Tensor:
        """The final norm and LM head over the last layer's hidden states h [T, hidden]: fp32 logits,
        one row per sequence (its last token), or one per token with all_logits."""
        if not all_logits and batch.is_prefill:
            h = h[torch.tensor(batch.cu_seqlens[1:], device=h.device) - 1]  # each sequence's last token
        return self.lm_head(self.norm(h)).float()


def weight_bytes(module: nn.Module) -> int:
    """Memory a module's weights take: each parameter once (a tied LM head shares the embedding's
    tensor), plus what modules holding packed weights in buffers (INT4 layers) report."""
    packed = sum(m.weight_bytes() for m in module.modules()
                 if m is not module and not isinstance(m, LlamaModel) and hasattr(m, "weight_bytes"))
    tensors = {p.data_ptr(): p.numel() * p.element_size() for p in module.parameters()}
    return packed + sum(tensors.values())
