"""`python -m bench.precision` (`make bench-precision`): what each decode precision costs and changes.

Every model here is built exactly as the decode service builds it (edgellm.perplexity.decode_model
over a config parsed from flags alone, `env={}`), so int4-awq is the INT4 the service runs.
Four sections, chosen with --sections (default: all):

  ppl     perplexity on held-out prose: the first --num-tokens tokens of
          ../shared/eval/persuasion.txt in non-overlapping windows of --window tokens, the same
          windows for every row: fp32, bf16, and at each group size 32/64/128 int4-rtn,
          int4-awq without outliers and int4-awq with 8 outlier channels (the default), plus
          int4-awq g64 with a bf16 LM head (layers 576 wide use 64 when 128 is asked: see
          quant/int4.py). Also the decode weights' size (vs the bf16 model)
          and the time to build the INT4 checkpoint ("cached" when it already was; checkpoints
          live in the user's cache directory, see edgellm/quant/prepare.py).
  step    one engine decode step, in-process, on a fresh thread with one torch thread (as the
          pinned decode service runs; see bench/decode_step.py): 60-token prompts, batch 1, 8
          and 32, for fp32, bf16, int4-awq (default settings) and int4-rtn g64.
  greedy  greedy agreement with fp32: --num-prompts prompts of 60 tokens taken at evenly spaced
          offsets of ../shared/eval/northangerabbey.txt (not the perplexity text), all batched
          through one engine; 32 greedy tokens each (EOS ignored). Reported: the fraction of
          prompts whose 32 tokens equal fp32's, and the mean common prefix / 32.
  hybrid  the same metric when the prompt's KV and first token come from one model (prefill)
          and the decode steps run on another, over that KV, as the two services do (a
          PREFILL_ONLY engine hands its per-layer K/V to a FROM_KV engine, whose cache casts it
          to its own dtype): bf16 -> int4-awq (the deployed default), int4-awq throughout,
          bf16 throughout, and fp32 throughout as a control (must agree 100%).

Perplexity, greedy and hybrid run with --threads torch threads (default: every CPU this
process may use). Prints one markdown table per section and writes them, with the command
line and the date, to --out (default bench/results/precision.json).

Reproduce:  make bench-precision   (or: .venv/bin/python -m bench.precision)
Smoke run:  .venv/bin/python -m bench.precision --quick   (512 tokens, 5 prompts, perplexity rows at group 64 only, batches 1 and 8)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from edgellm import config as cfg
from edgellm.engine.loop import EngineLimits, EngineLoop
from edgellm.engine.model import LayerKVHook, LlamaModel
from edgellm.engine.sampling import SamplingParams
from edgellm.engine.sequence import Kind, Sequence
from edgellm.engine.weights import resolve_model_dir
from edgellm.perplexity import decode_model, mean_nll
from edgellm.quant.prepare import Int4Settings, checkpoint_path, prepare_int4

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EVAL_DIR = REPO_ROOT.parent / "shared" / "eval"
PPL_TEXT = EVAL_DIR / "persuasion.txt"
PROMPT_TEXT = EVAL_DIR / "northangerabbey.txt"
SECTIONS = ("ppl", "step", "greedy", "hybrid")

# Greedy / hybrid prompt length. Not a multiple of the KV block size on purpose: a staged (FROM_KV)
# prompt that fills its last block exactly crashes the engine's first decode step (the scheduler
# gives it no block for the next token), so 64 would fail the hybrid section.
PROMPT_TOKENS = 60
NEW_TOKENS = 32  # greedy tokens compared per prompt
STEP_PROMPT_TOKENS = 60  # decode-step prompts, as bench/decode_step.py
STEP_WARMUP = 3  # untimed decode steps before the timed ones
BLOCK_SIZE = 16


# ---- configurations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One decode-model configuration: --decode-weights and the --int4-* options (None: the
    config's default, so an unqualified int4-awq is what the service runs by default)."""

    weights: str  # fp32, bf16, int4-rtn, int4-awq
    group_size: int | None = None
    outliers: int | None = None
    lm_head: bool | None = None

    def config(self, model: str = "") -> cfg.ModelConfig:
        argv = ["--model", model, "--decode-weights", self.weights]
        for flag, value in (("--int4-group-size", self.group_size), ("--int4-outliers", self.outliers),
                            ("--int4-lm-head", self.lm_head)):
            argv += [] if value is None else [flag, str(value).lower()]
        return cfg.parse(argv, env={}).model

    @property
    def int4(self) -> Int4Settings | None:
        c = self.config()
        return Int4Settings.from_weights(c.decode_weights, c.int4_group_size, c.int4_outliers, c.int4_lm_head)

    @property
    def label(self) -> str:
        return self.int4.label if self.int4 else self.weights


FP32, BF16 = Variant("fp32"), Variant("bf16")
AWQ, RTN_G64 = Variant("int4-awq"), Variant("int4-rtn", 64)  # AWQ: the service's default settings


def ppl_variants(group_sizes: tuple[int, ...]) -> list[Variant]:
    rows = [FP32, BF16]
    for g in group_sizes:
        rows += [Variant("int4-rtn", g), Variant("int4-awq", g, outliers=0), Variant("int4-awq", g, outliers=8)]
    return rows + [Variant("int4-awq", 64, outliers=8, lm_head=False)]  # the LM head (and tied embedding) in bf16


HYBRIDS = (  # (prefill model, decode model)
    (FP32, FP32),  # control: the KV handoff itself must not change anything
    (BF16, AWQ),  # the deployed default
    (AWQ, AWQ),
    (BF16, BF16),
)


# ---- models -------------------------------------------------------------------------------------
def ensure_checkpoint(variant: Variant, model: str) -> float | None:
    """Build the variant's INT4 checkpoint if it is not cached; the seconds it took, or None
    (dense weights, or already cached)."""
    settings = variant.int4
    if settings is None or checkpoint_path(resolve_model_dir(model), settings).exists():
        return None
    print(f"building the {settings.label} checkpoint ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    prepare_int4(model, settings)
    return time.monotonic() - start


def load(variant: Variant, model: str) -> LlamaModel:
    ensure_checkpoint(variant, model)  # on this thread, with its torch threads
    return decode_model(variant.config(model))


class ModelCache:
    """Models loaded on first use and kept (greedy and hybrid use each several times)."""

    def __init__(self, model: str) -> None:
        self.model, self._loaded = model, {}

    def __call__(self, variant: Variant) -> LlamaModel:
        if variant not in self._loaded:
            self._loaded[variant] = load(variant, self.model)
        return self._loaded[variant]


def tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(model))


def tokenize(model: str, path: pathlib.Path) -> list[int]:
    return tokenizer(model)(path.read_text(), verbose=False)["input_ids"]


# ---- engine helpers -----------------------------------------------------------------------------
def new_engine(model: LlamaModel, num_seqs: int, tokens_per_seq: int) -> EngineLoop:
    """An engine (not started: we call step() on this thread) with room for every sequence, so
    nothing is preempted. No EOS ids: every sequence runs to max_new_tokens."""
    blocks = num_seqs * (-(-(tokens_per_seq + 1) // BLOCK_SIZE)) + 1
    return EngineLoop(model, frozenset(), EngineLimits(num_blocks=blocks, block_size=BLOCK_SIZE,
                                                      max_running=max(64, num_seqs)))


def run_to_completion(engine: EngineLoop) -> None:
    while engine.scheduler.has_work:
        if engine.step().is_empty:
            raise RuntimeError("engine made no progress (out of KV blocks?)")


def collector(tokens: list[int]) -> Callable[[int | None, str | None], None]:
    def emit(token: int | None, finish: str | None) -> None:
        if token is None:
            raise RuntimeError(f"engine step failed ({finish})")
        tokens.append(token)

    return emit


def generate(model: LlamaModel, prompts: list[list[int]], num_new: int) -> list[list[int]]:
    """Greedy tokens for every prompt, prefill and decode on one engine (all prompts batched)."""
    engine = new_engine(model, len(prompts), max(map(len, prompts)) + num_new)
    outputs: list[list[int]] = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        engine.scheduler.add(Sequence(f"p{i}", Kind.LOCAL, list(prompt), len(prompt), SamplingParams(), num_new,
                                      collector(outputs[i])))
    run_to_completion(engine)
    return outputs


StagedKV = tuple[torch.Tensor, torch.Tensor]  # K, V: [layers, kv_heads, prompt tokens, head_dim]


def kv_recorder(store: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> LayerKVHook:
    def on_layer_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        store[layer] = (k.clone(), v.clone())  # [Hkv, P, D]: copies, not views of the packed batch

    return on_layer_kv


def prefill_only(model: LlamaModel, prompts: list[list[int]], num_new: int) -> list[tuple[int, StagedKV]]:
    """What a prefill service hands over: each prompt's first token and its K/V, layer by layer."""
    engine = new_engine(model, 1, 1)  # PREFILL_ONLY keeps no KV here
    firsts: list[list[int]] = [[] for _ in prompts]
    layers: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in prompts]
    for i, prompt in enumerate(prompts):
        engine.scheduler.add(Sequence(f"p{i}", Kind.PREFILL_ONLY, list(prompt), len(prompt), SamplingParams(),
                                      num_new, collector(firsts[i]), on_layer_kv=kv_recorder(layers[i])))
    run_to_completion(engine)
    staged = []
    for first, kv in zip(firsts, layers):
        ks, vs = zip(*(kv[layer] for layer in range(model.arch.num_layers)))
        staged.append((first[0], (torch.stack(ks), torch.stack(vs))))
    return staged


def decode_from_kv(model: LlamaModel, prompts: list[list[int]], staged: list[tuple[int, StagedKV]],
                   num_new: int) -> list[list[int]]:
    """What a decode service makes of it: the first token, then decode steps over the staged KV."""
    engine = new_engine(model, len(prompts), max(map(len, prompts)) + num_new)
    outputs = [[first] for first, _ in staged]
    for i, (prompt, (first, kv)) in enumerate(zip(prompts, staged)):
        engine.scheduler.add(Sequence(f"p{i}", Kind.FROM_KV, [*prompt, first], len(prompt), SamplingParams(), num_new,
                                      collector(outputs[i]), num_generated=1, staged_kv=kv))
    run_to_completion(engine)
    return outputs


def decode_step_ms(model: LlamaModel, batch: int, num_steps: int) -> float:
    """Mean wall time of one engine decode step with `batch` running sequences."""
    engine = new_engine(model, batch, STEP_PROMPT_TOKENS + STEP_WARMUP + num_steps + 1)
    for i in range(batch):
        prompt = list(range(100 + i, 100 + i + STEP_PROMPT_TOKENS))
        engine.scheduler.add(Sequence(str(i), Kind.LOCAL, prompt, len(prompt), SamplingParams(), 10_000,
                                      lambda *_: None))
    while any(s.needs_prefill for s in engine.scheduler.waiting):
        engine.step()
    for _ in range(STEP_WARMUP):
        engine.step()
    start = time.perf_counter()
    for _ in range(num_steps):
        out = engine.step()
        assert len(out.decodes) == batch and not out.preempted, "a timed step was not a full decode step"
    return (time.perf_counter() - start) / num_steps * 1000


def on_fresh_thread(work: Callable[..., Any], *work_args: Any, num_threads: int = 1) -> Any:
    """work(*work_args) on a new thread with its own `num_threads` torch threads, as the engine
    thread runs; this thread drops to one torch thread meanwhile so the two teams never compete."""
    result: list[Any] = []
    previous = torch.get_num_threads()

    def run() -> None:
        torch.set_num_threads(num_threads)
        try:
            result.append(work(*work_args))
        except Exception as exc:  # noqa: BLE001 (re-raised on the caller's thread)
            result.append(exc)

    torch.set_num_threads(1)
    worker = threading.Thread(target=run, name="bench-engine")
    worker.start()
    worker.join()
    torch.set_num_threads(previous)
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


# ---- metrics --------------------------------------------------------------------------------------
def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict[str, float]:
    prefixes = [common_prefix(r, c) for r, c in zip(reference, candidate, strict=True)]
    return {
        "exact_match": sum(p == len(r) for p, r in zip(prefixes, reference)) / len(reference),
        "mean_prefix_fraction": sum(p / len(r) for p, r in zip(prefixes, reference)) / len(reference),
    }


def greedy_prompts(model: str, num_prompts: int) -> list[list[int]]:
    """num_prompts windows of PROMPT_TOKENS tokens at evenly spaced offsets through the book."""
    ids = tokenize(model, PROMPT_TEXT)
    stride = (len(ids) - PROMPT_TOKENS) // num_prompts
    return [ids[i * stride : i * stride + PROMPT_TOKENS] for i in range(num_prompts)]


# ---- sections -------------------------------------------------------------------------------------
def ppl_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    tokens = tokenize(args.model, PPL_TEXT)[: args.num_tokens]
    rows = []
    for variant in ppl_variants(args.group_sizes):
        quantize_s = ensure_checkpoint(variant, args.model)
        model = decode_model(variant.config(args.model))
        start = time.monotonic()
        nll, count = mean_nll(model, tokens, args.window)
        settings = variant.int4
        rows.append({
            "variant": variant.label, "weights": variant.weights,
            "group_size": settings.group_size if settings else None,
            "outliers": settings.outliers if settings else None,
            "lm_head_int4": settings.lm_head if settings else None,
            "nll": nll, "perplexity": math.exp(nll), "tokens_scored": count,
            "weight_bytes": model.weight_bytes(),
            "quantize_s": quantize_s, "checkpoint": "built" if quantize_s is not None else ("cached" if settings else None),
            "eval_s": time.monotonic() - start,
        })
        print(f"[ppl] {variant.label}: {math.exp(nll):.2f}", file=sys.stderr, flush=True)
        del model
    fp32 = next(r for r in rows if r["weights"] == "fp32")
    bf16 = next(r for r in rows if r["weights"] == "bf16")
    for row in rows:
        row["perplexity_vs_fp32"] = row["perplexity"] / fp32["perplexity"]
        row["weight_bytes_vs_bf16"] = row["weight_bytes"] / bf16["weight_bytes"]
    return rows


def step_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for variant in (FP32, BF16, AWQ, RTN_G64):
        model = load(variant, args.model)
        times = [on_fresh_thread(decode_step_ms, model, batch, args.steps) for batch in args.batches]
        for batch, ms in zip(args.batches, times):
            rows.append({"variant": variant.label, "batch": batch, "step_ms": ms, "tokens_per_s": batch * 1000 / ms})
        print(f"[step] {variant.label}: {', '.join(f'{ms:.1f}' for ms in times)} ms", file=sys.stderr, flush=True)
        del model
    return rows


def greedy_section(args: argparse.Namespace, models: ModelCache, prompts: list[list[int]],
                   reference: list[list[int]]) -> list[dict[str, Any]]:
    rows = []
    for variant in (BF16, RTN_G64, AWQ):
        outputs = generate(models(variant), prompts, NEW_TOKENS)
        rows.append({"variant": variant.label, "num_prompts": len(prompts), **agreement(reference, outputs)})
        print(f"[greedy] {variant.label}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def hybrid_section(args: argparse.Namespace, models: ModelCache, prompts: list[list[int]],
                   reference: list[list[int]]) -> list[dict[str, Any]]:
    rows = []
    handed_over: dict[Variant, list[tuple[int, StagedKV]]] = {}
    for prefill, decode in HYBRIDS:
        if prefill not in handed_over:
            handed_over[prefill] = prefill_only(models(prefill), prompts, NEW_TOKENS)
        outputs = decode_from_kv(models(decode), prompts, handed_over[prefill], NEW_TOKENS)
        rows.append({"prefill": prefill.label, "decode": decode.label, "num_prompts": len(prompts),
                     **agreement(reference, outputs)})
        print(f"[hybrid] {prefill.label} -> {decode.label}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# ---- output -------------------------------------------------------------------------------------
def markdown(title: str, columns: list[tuple[str, Callable[[dict[str, Any]], str]]], rows: list[dict[str, Any]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


def _opt(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _quant_time(row: dict[str, Any]) -> str:
    if row["checkpoint"] == "built":
        return f"{row['quantize_s']:.1f} s"
    return row["checkpoint"] or "-"


def tables(results: dict[str, Any], meta: dict[str, Any]) -> str:
    out = []
    if "ppl" in results:
        out.append(markdown(
            f"Perplexity: {meta['ppl_tokens']} tokens of {PPL_TEXT.name}, windows of {meta['window']}",
            [("variant", lambda r: r["variant"]), ("group", lambda r: _opt(r["group_size"])),
             ("outliers", lambda r: _opt(r["outliers"])),
             ("int4 lm_head", lambda r: _opt(r["lm_head_int4"], "{}").replace("True", "yes").replace("False", "no")),
             ("mean NLL", lambda r: f"{r['nll']:.4f}"), ("perplexity", lambda r: f"{r['perplexity']:.2f}"),
             ("vs fp32", lambda r: f"x{r['perplexity_vs_fp32']:.3f}"),
             ("weights MiB", lambda r: f"{r['weight_bytes'] / 2**20:.1f}"),
             ("vs bf16 bytes", lambda r: f"{r['weight_bytes_vs_bf16']:.3f}"), ("quantize", _quant_time)],
            results["ppl"]))
    if "step" in results:
        out.append(markdown(
            f"Decode step, in-process, one torch thread ({STEP_PROMPT_TOKENS}-token prompts, mean of {meta['steps']} steps)",
            [("variant", lambda r: r["variant"]), ("batch", lambda r: str(r["batch"])),
             ("ms / step", lambda r: f"{r['step_ms']:.1f}"), ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}")],
            results["step"]))
    agree = [("exact match", lambda r: f"{r['exact_match']:.2f}"),
             ("mean prefix / 32", lambda r: f"{r['mean_prefix_fraction']:.3f}")]
    prompts = f"{meta.get('num_prompts')} prompts of {PROMPT_TOKENS} tokens from {PROMPT_TEXT.name}, {NEW_TOKENS} tokens"
    if "greedy" in results:
        out.append(markdown(f"Greedy agreement with fp32 ({prompts})", [("variant", lambda r: r["variant"]), *agree],
                            results["greedy"]))
    if "hybrid" in results:
        out.append(markdown(f"Prefill -> decode handoff, agreement with fp32 ({prompts})",
                            [("prefill", lambda r: r["prefill"]), ("decode", lambda r: r["decode"]), *agree],
                            results["hybrid"]))
    return "\n\n".join(out)


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [item(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="passed as --model to the config; empty = the embedded model")
    p.add_argument("--sections", type=comma_list(str), default=list(SECTIONS), help=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true", help="smoke run: 512 tokens, 5 prompts, group 64, batches 1,8")
    p.add_argument("--num-tokens", type=int, help="perplexity tokens (default 4096; --quick 512)")
    p.add_argument("--window", type=int, default=512, help="perplexity window")
    p.add_argument("--num-prompts", type=int, help="greedy/hybrid prompts (default 50; --quick 5)")
    p.add_argument("--steps", type=int, help="timed decode steps per batch size (default 10; --quick 5)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for ppl/greedy/hybrid; 0 = every CPU")
    p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "precision.json")
    args = p.parse_args(argv)
    if unknown := set(args.sections) - set(SECTIONS):
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.num_tokens = args.num_tokens or (512 if args.quick else 4096)
    args.num_prompts = args.num_prompts or (5 if args.quick else 50)
    args.steps = args.steps or (5 if args.quick else 10)
    args.group_sizes = (64,) if args.quick else (32, 64, 128)
    args.batches = [1, 8] if args.quick else [1, 8, 32]
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if args.num_tokens < 2 or args.num_prompts < 1 or args.steps < 1 or args.window < 2:
        p.error("--num-tokens and --window must be >= 2, --num-prompts and --steps >= 1")
    return args


def run_meta(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    return {
        "command": shlex.join([os.path.basename(sys.executable), "-m", "bench.precision", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": resolve_model_dir(args.model).name,
        "sections": args.sections,
        "quick": args.quick,
        "ppl_text": PPL_TEXT.name, "ppl_tokens": args.num_tokens, "window": args.window,
        "prompt_text": PROMPT_TEXT.name, "num_prompts": args.num_prompts, "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "steps": args.steps, "step_batches": args.batches, "step_threads": 1,
        "threads": args.threads,
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = run_meta(args, argv)
    results: dict[str, Any] = {}
    start = time.monotonic()
    if "ppl" in args.sections:
        results["ppl"] = ppl_section(args)
    if "step" in args.sections:
        results["step"] = step_section(args)
    if {"greedy", "hybrid"} & set(args.sections):
        models = ModelCache(args.model)
        prompts = greedy_prompts(args.model, args.num_prompts)
        reference = generate(models(FP32), prompts, NEW_TOKENS)
        if "greedy" in args.sections:
            results["greedy"] = greedy_section(args, models, prompts, reference)
        if "hybrid" in args.sections:
            results["hybrid"] = hybrid_section(args, models, prompts, reference)
    meta["seconds"] = round(time.monotonic() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    print(tables(results, meta))
    print(f"\nwrote {args.out} after {meta['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
