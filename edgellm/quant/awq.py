"""Activation-aware INT4 quantization (AWQ) with clipping search and FP16 outlier channels.

AWQ (Lin et al., 2023): a few input channels carry large activations, and the weights they
multiply matter most. Scaling those weight columns up by s (and the activations down by s,
folded into the preceding RMSNorm or linear layer, so the full-precision model is unchanged)
gives them finer INT4 steps. s = mean|x| ** alpha, with alpha searched per layer input.

Why our own search instead of a library (see README): AutoAWQ is archived and failed on CPU;
llm-compressor's AWQModifier took 105 s and landed at perplexity x1.13; torchao's prototype
took over 3 minutes. The search here is exact and cheap: for a linear layer the output error
over the calibration tokens X is ||X dW^T||^2 = trace(dW H dW^T) with H = X^T X, so every
candidate costs one [N, K] x [K, K] product, independent of the number of calibration tokens.
The same identity, restricted to each group's diagonal block of H, scores per-group clipping
ranges. Outlier channels (MixQ) are picked by activation energy (diag H) and excluded from the
error: the side matmul in Int4Linear corrects them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from edgellm.engine.kv_cache import ForwardBatch
from edgellm.engine.model import LlamaModel
from edgellm.quant.int4 import (
    QuantizedWeight,
    dequantize,
    fit_group_size,
    group_range,
    param_exponents,
    quantize_groups,
)

SCALE_GRID = 20  # alpha in 0, 1/20, ..., 19/20 (alpha = 0 is plain round-to-nearest)
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))  # shrink each group's range by up to 45 %


@dataclass
class InputStats:
    """What calibration learns about one linear-layer input: H = X^T X and mean |x| per channel."""

    hessian: torch.Tensor  # [K, K] fp64
    abs_sum: torch.Tensor  # [K] fp64
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.hessian += (x.t() @ x).double()
        self.abs_sum += x.abs().sum(0).double()
        self.count += x.shape[0]

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()


# The inputs that linear layers share: (site name, module whose input it is, linears reading it).
SITES = (
    ("attn_in", "self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o_in", "self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp_in", "mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("down_in", "mlp.down_proj", ("mlp.down_proj",)),
)


@torch.inference_mode()
def collect_stats(
    model: LlamaModel, windows: list[list[int]], progress: Callable[[Iterable], Iterable] = iter
) -> dict[str, InputStats]:
    """Run the full-precision model over the calibration windows; return stats keyed by the
    module whose input they describe ("layers.3.mlp.down_proj", ..., "lm_head")."""
    stats: dict[str, InputStats] = {}
    hooks = []
    names = [f"layers.{i}.{module}" for i in range(model.arch.num_layers) for _, module, _ in SITES] + ["lm_head"]
    for name in names:
        module = model.get_submodule(name)
        k = module.in_features
        stats[name] = InputStats(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
        hooks.append(module.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0])))
    try:
        for ids in progress(windows):
            batch = ForwardBatch(
                token_ids=torch.tensor(ids), positions=torch.arange(len(ids)), is_prefill=True, cu_seqlens=[0, len(ids)]
            )
            model(batch, None, all_logits=True)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def outlier_channels(stats: InputStats, count: int) -> torch.Tensor | None:
    if count <= 0:
        return None
    energy = stats.hessian.diagonal()
    return torch.topk(energy, min(count, energy.numel())).indices.sort().values


def _fake_quant(
    weight: torch.Tensor, group_size: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize and dequantize (over [lo, hi] per group when given, else the group's range)."""
    g = fit_group_size(weight.shape[1], group_size)  # 576-wide inputs take 64 when 128 is asked
    return dequantize(*quantize_groups(weight, g, lo, hi), g)


def _without(weight: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
    """The weight with the outlier columns zeroed: they do not stretch their groups' ranges."""
    if channels is None:
        return weight
    weight = weight.clone()
    weight[:, channels] = 0
    return weight


def _masked_hessian(stats: InputStats, channels: torch.Tensor | None) -> torch.Tensor:
    h = stats.hessian.float() / max(stats.count, 1)
    if channels is not None:  # their error is corrected exactly, so it does not count
        h = h.clone()
        h[channels, :] = 0
        h[:, channels] = 0
    return h


def search_scale(
    weights: list[torch.Tensor], stats: InputStats, group_size: int, channels: torch.Tensor | None, tie=None
) -> torch.Tensor:
    """The per-input-channel scale s minimising sum_W trace(dW H dW^T), dW = Q(W s)/s - W.

    `tie` maps a [K] vector of mean activations onto the channels that must share a scale
    (grouped-query attention: one value row feeds several heads' o_proj columns).
    """
    h = _masked_hessian(stats, channels)
    mean_abs = stats.mean_abs if tie is None else tie(stats.mean_abs)
    best, best_err = torch.ones_like(mean_abs), float("inf")
    for step in range(SCALE_GRID):
        s = mean_abs.pow(step / SCALE_GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            delta = _fake_quant(_without(w * s, channels), group_size) / s - w
            if channels is not None:
                delta[:, channels] = 0
            err += float(((delta @ h) * delta).sum())
        if err < best_err:
            best, best_err = s, err
    return best


def quantize_weight(
    weight: torch.Tensor, stats: InputStats | None, group_size: int, channels: torch.Tensor | None, clip: bool
) -> QuantizedWeight:
    """INT4 codes for one (already scaled) weight, with per-group clipping chosen on the block
    diagonal of H, and the exact residual of the outlier columns."""
    n, k = weight.shape
    g = fit_group_size(k, group_size)
    w = _without(weight.float(), channels)
    lo, hi = group_range(w, g)
    exponents = param_exponents(lo, hi)  # clipping only narrows ranges: every candidate fits
    if clip and stats is not None:
        h = _masked_hessian(stats, channels)
        blocks = h.view(k // g, g, k // g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, g, g]
        best_err = torch.full(lo.shape, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for ratio in CLIP_RATIOS:
            candidate = dequantize(*quantize_groups(w, g, lo * ratio, hi * ratio, exponents), g)
            delta = (candidate - w).view(n, k // g, g).transpose(0, 1)  # [G, N, g]
            err = ((delta @ blocks) * delta).sum(-1).t()  # [N, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = (torch.where(better, lo * ratio, best_lo), torch.where(better, hi * ratio, best_hi))
        lo, hi = best_lo, best_hi
    codes, scales, zeros = quantize_groups(w, g, lo, hi, exponents)
    residual = None
    if channels is not None:
        residual = (weight.float() - dequantize(codes, scales, zeros, g))[:, channels]
    return QuantizedWeight(codes, scales, zeros, channels, residual)


def _gqa_tie(num_heads: int, num_kv_heads: int, head_dim: int):
    """o_proj input channel (head h, dim d) is value channel (h // rep, d): share their scale."""
    rep = num_heads // num_kv_heads

    def tie(per_o_channel: torch.Tensor) -> torch.Tensor:
        per_value = per_o_channel.view(num_kv_heads, rep, head_dim).mean(1, keepdim=True)
        return per_value.expand(num_kv_heads, rep, head_dim).reshape(-1)

    return tie


@torch.inference_mode()
def awq_quantize(
    model: LlamaModel,
    stats: dict[str, InputStats],
    group_size: int,
    num_outliers: int,
    quantize_lm_head: bool,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict[str, QuantizedWeight]:
    """Fold AWQ scales into `model` (in place; its full-precision output is unchanged), then
    quantize every linear layer. Returns the INT4 weights by module name."""
    a = model.arch
    quantized: dict[str, QuantizedWeight] = {}
    for i in progress(range(a.num_layers)):
        layer = model.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        channels = {site: outlier_channels(stats[f"layers.{i}.{module}"], num_outliers) for site, module, _ in SITES}

        def scale_for(site: str, module: str, readers: tuple[str, ...], tie=None, i=i, layer=layer, channels=channels):
            ws = [layer.get_submodule(r).weight.float() for r in readers]
            return search_scale(ws, stats[f"layers.{i}.{module}"], group_size, channels[site], tie)

        # Each scale is folded into what produces the input, so the fp model computes the same.
        s = scale_for("attn_in", *SITES[0][1:])
        layer.input_layernorm.weight.div_(s)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight.mul_(s)
        _rescale_stats(stats[f"layers.{i}.self_attn.q_proj"], s)

        s = scale_for("o_in", *SITES[1][1:], tie=_gqa_tie(a.num_heads, a.num_kv_heads, a.head_dim))
        attn.v_proj.weight.div_(s.view(a.num_kv_heads, -1, a.head_dim)[:, 0].reshape(-1, 1))
        attn.o_proj.weight.mul_(s)
        _rescale_stats(stats[f"layers.{i}.self_attn.o_proj"], s)

        s = scale_for("mlp_in", *SITES[2][1:])
        layer.post_attention_layernorm.weight.div_(s)
        mlp.gate_proj.weight.mul_(s)
        mlp.up_proj.weight.mul_(s)
        _rescale_stats(stats[f"layers.{i}.mlp.gate_proj"], s)

        s = scale_for("down_in", *SITES[3][1:])
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s)
        _rescale_stats(stats[f"layers.{i}.mlp.down_proj"], s)

        for site, module, readers in SITES:
            for reader in readers:
                quantized[f"layers.{i}.{reader}"] = quantize_weight(
                    layer.get_submodule(reader).weight,
                    stats[f"layers.{i}.{module}"],
                    group_size,
                    channels[site],
                    clip=True,
                )
    if quantize_lm_head:
        # Not scaled: the LM head is tied to the embedding table in SmolLM2. Clipping and outliers only.
        head = stats["lm_head"]
        quantized["lm_head"] = quantize_weight(
            model.lm_head.weight, head, group_size, outlier_channels(head, num_outliers), clip=True
        )
    return quantized


def _rescale_stats(stats: InputStats, s: torch.Tensor) -> None:
    """The input is now x / s: H becomes H / (s s^T) and mean|x| becomes mean|x| / s."""
    s64 = s.double()
    stats.hessian /= s64[:, None] * s64[None, :]
    stats.abs_sum /= s64


def rtn_quantize(model: LlamaModel, group_size: int, quantize_lm_head: bool) -> dict[str, QuantizedWeight]:
    """Plain round-to-nearest (no calibration): the baseline AWQ is measured against."""
    names = [f"layers.{i}.{r}" for i in range(model.arch.num_layers) for _, _, readers in SITES for r in readers]
    names += ["lm_head"] if quantize_lm_head else []
    return {n: quantize_weight(model.get_submodule(n).weight, None, group_size, None, clip=False) for n in names}
