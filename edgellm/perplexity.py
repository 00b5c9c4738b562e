"""`edgellm perplexity`: perplexity of any text through the decode service's own layers.

Like llama.cpp's `llama-perplexity`: the text is tokenized, cut into non-overlapping windows
of --window tokens (each scored from its start, so every precision sees the same windows),
and the mean next-token negative log-likelihood is reported as JSON
{"ppl": ..., "nll": ..., "tokens": ...}. The model is built exactly as the decode service
builds it (engine_builder's loaders), so int4-awq here is the INT4 the service runs.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

from edgellm import config as cfg
from edgellm.engine.kv_cache import ForwardBatch
from edgellm.engine.model import LlamaModel
from edgellm.engine_builder import load_service_model


def decode_model(model_cfg: cfg.ModelConfig, num_threads: int = 0) -> LlamaModel:
    """The model the decode service would run for this configuration."""
    return load_service_model(model_cfg, "decode", num_threads or torch.get_num_threads(), torch.device("cpu")).model


def windows(token_ids: list[int], window: int) -> list[list[int]]:
    return [token_ids[i : i + window] for i in range(0, len(token_ids), window) if len(token_ids) - i >= 2]


@torch.inference_mode()
def mean_nll(model: LlamaModel, token_ids: list[int], window: int) -> tuple[float, int]:
    """Mean next-token NLL over the windows, and the number of tokens scored."""
    total, count = 0.0, 0
    for ids in windows(token_ids, window):
        ids_t = torch.tensor(ids)
        batch = ForwardBatch(
            token_ids=ids_t, positions=torch.arange(len(ids)), is_prefill=True, cu_seqlens=[0, len(ids)]
        )
        logits = model(batch, None, all_logits=True)
        total += F.cross_entropy(logits[:-1], ids_t[1:], reduction="sum").item()
        count += len(ids) - 1
    return total / count, count


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgellm perplexity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=pathlib.Path, required=True, help="a UTF-8 text file")
    parser.add_argument("--weights", choices=cfg.DECODE_WEIGHTS, default=None, help="overrides --decode-weights")
    parser.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens; 0 = all")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (at most the model's context)")
    cfg.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.weights:
        args.decode_weights = args.weights
    config = cfg.from_namespace(args)
    if not args.text.is_file():
        print(f"edgellm perplexity: {args.text}: no such file", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from edgellm.model_store import resolve_model_dir

    model = decode_model(config.model)
    if args.window < 2 or args.window > model.arch.max_position_embeddings:
        print(f"edgellm perplexity: --window must be in 2..{model.arch.max_position_embeddings}", file=sys.stderr)
        return 2
    token_ids = AutoTokenizer.from_pretrained(resolve_model_dir(config.model.model))(args.text.read_text())["input_ids"]
    if args.max_tokens:
        token_ids = token_ids[: args.max_tokens]
    if len(token_ids) < 2:
        print("edgellm perplexity: the text has fewer than 2 tokens", file=sys.stderr)
        return 2
    start = time.monotonic()
    nll, count = mean_nll(model, token_ids, args.window)
    print(
        json.dumps(
            {
                "ppl": math.exp(nll),
                "nll": nll,
                "tokens": count,
                "weights": config.model.decode_weights,
                "window": args.window,
                "seconds": round(time.monotonic() - start, 1),
            }
        )
    )
    return 0
