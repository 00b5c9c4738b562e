"""`python -m bench.precision` (`make bench-precision`): what each decode precision costs and changes.

Every model here is built exactly as the decode service builds it (edgellm.perplexity.decode_model
over a config parsed from flags alone, `env={}`), so int4-awq is the INT4 the service runs.
Five sections, chosen with --sections (default: all):

  ppl     perplexity on held-out prose: the first --num-tokens tokens of
          ../shared/eval/persuasion.txt in non-overlapping windows of --window tokens, the same
          windows for every row: fp32, bf16, and at each group size 32/64/128 int4-rtn,
          int4-awq without outliers and int4-awq with 8 outlier channels (the default), plus
          int4-awq g64 with a bf16 LM head (layers 576 wide use 64 when 128 is asked: see
          quant/int4.py). Also the decode weights' size (vs the bf16 model)
          and the time to build the INT4 checkpoint ("cached" when it already was; checkpoints
          live in the user's cache directory, see edgellm/quant/prepare.py).
  step    one engine decode step, in-process, on a fresh thread with one torch thread (as the
          pinned decode service runs): 60-token prompts, batch 1, 8
          and 32, for fp32, bf16, int4-awq (default settings, our C kernel), the same int4-awq
          weights on torch's int4 kernel (--int4-kernel torch), and int4-rtn g64.
  greedy  greedy agreement with fp32: --num-prompts prompts of 60 tokens taken at evenly spaced
          offsets of ../shared/eval/northangerabbey.txt (not the perplexity text), all batched
          through one engine; 32 greedy tokens each (EOS ignored). Reported: the fraction of
          prompts whose 32 tokens equal fp32's, and the mean common prefix / 32.
  hybrid  the same metric when the prompt's KV and first token come from one model (prefill)
          and the decode steps run on another, over that KV, as the two services do (a
          PREFILL_ONLY engine hands its per-layer K/V to a FROM_KV engine, whose cache casts it
          to its own dtype): bf16 -> int4-awq (the deployed default), int4-awq throughout,
          bf16 throughout, and fp32 throughout as a control (must agree 100%).
  services decode through the real four-service stack (bench/stacks.py, "disaggregated":
          prefill, gateway and monitor on CPU 0, decode on CPU 1, one torch thread each),
          started once per decode weight format (fp32, bf16, int4-awq with default settings),
          always with --prefill-dtype fp32 so that only decode differs. After one unmeasured
          warm-up request: a closed loop (bench/load.py) at concurrency 1 (4 requests) and 32
          (64 requests), each request a chat prompt asking for a long answer with max_tokens
          64 (the API has no ignore-EOS, so the prompts are chosen to run to the limit; the
          mean output length is reported). Reported per format: client TPOT p50 at c=1,
          aggregate output tokens/s and TPOT p50 at c=32 (bench/report.py), the decode
          service's weight label and weight bytes from the monitor's route table, and its RSS
          (VmRSS of the decode process) after start-up and after the load. Then issue 4's
          acceptance 2: INT4 vs fp32 TPOT at batch 1 (>= 2x faster), INT4 vs bf16 tok/s at
          32 streams (>= 0.9x), INT4 vs bf16 weight bytes (<= 30%).

Perplexity, greedy and hybrid run with --threads torch threads (default: every CPU this
process may use). Prints one markdown table per section and writes them, with the command
line and the date, to --out (default bench/results/precision.json).

Reproduce:  make bench-precision   (or: .venv/bin/python -m bench.precision)
Smoke run:  .venv/bin/python -m bench.precision --quick   (512 tokens, 5 prompts, perplexity rows at group 64 only,
            batches 1 and 8; services: 2 requests at c=1 and 8 at c=8)
"""

from __future__ import annotations

import argparse
import asyncio
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

import grpc
import torch

from bench.load import Batch, closed_loop, run_request
from bench.report import Slo, summarize
from bench.stacks import started_stack
from bench.workload import BenchRequest
from edgellm import config as cfg
from edgellm import logs
from edgellm.client import AsyncClient
from edgellm.engine.info import EngineLimits
from edgellm.engine.loop import EngineLoop
from edgellm.engine.model import LayerKVHook, LlamaModel
from edgellm.engine.sampling import SamplingParams
from edgellm.engine.sequence import Kind
from edgellm.model_store import resolve_model_dir
from edgellm.launch import Stack
from edgellm.perplexity import decode_model, mean_nll
from edgellm.quant.prepare import Int4Settings, checkpoint_path, prepare_int4
from edgellm.v1 import common_pb2, monitor_pb2

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EVAL_DIR = REPO_ROOT.parent / "shared" / "eval"
PPL_TEXT = EVAL_DIR / "persuasion.txt"
PROMPT_TEXT = EVAL_DIR / "northangerabbey.txt"
SECTIONS = ("ppl", "step", "greedy", "hybrid", "services")

PROMPT_TOKENS = 60  # greedy / hybrid prompt length
NEW_TOKENS = 32  # greedy tokens compared per prompt
STEP_PROMPT_TOKENS = 60  # decode-step prompts
STEP_WARMUP = 3  # untimed decode steps before the timed ones
BLOCK_SIZE = 16

# Services section: the disaggregated stack once per decode weight format, prefill always fp32.
SERVICE_STACK = "disaggregated"
SERVICE_WEIGHTS = ("fp32", "bf16", "int4-awq")
SERVICE_PREFILL_DTYPE = "fp32"
SERVICE_MAX_TOKENS = 64
SERVICE_LEVELS = ((1, 4), (32, 64))  # (concurrency, requests)
SERVICE_LEVELS_QUICK = ((1, 2), (8, 8))
SERVICE_REQUEST_TIMEOUT_S = 300.0
# Chat prompts that ask for long answers: the API has no ignore-EOS, and greedy decoding of these
# runs to max_tokens, so every format decodes (about) the same number of tokens per request.
SERVICE_PROMPTS = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail, step by step, how a steam engine works.",
    "Describe, in several paragraphs, a walk through a busy market on a summer morning.",
    "Write a detailed essay about the history of the printing press.",
    "Give a long, step-by-step guide to planting and caring for a vegetable garden.",
    "Write a long letter to a friend describing your last holiday by the sea.",
    "Explain in detail why regular exercise is good for both the body and the mind.",
    "Describe the four seasons in a small mountain village, one paragraph for each.",
)


# ---- configurations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One decode-model configuration: --decode-weights and the --int4-* options (None: the
    config's default, so an unqualified int4-awq is what the service runs by default)."""

    weights: str  # fp32, bf16, int4-rtn, int4-awq
    group_size: int | None = None
    outliers: int | None = None
    lm_head: bool | None = None
    kernel: str | None = None  # --int4-kernel

    def config(self, model: str = "") -> cfg.ModelConfig:
        argv = ["--model", model, "--decode-weights", self.weights]
        for flag, value in (("--int4-group-size", self.group_size), ("--int4-outliers", self.outliers),
                            ("--int4-lm-head", self.lm_head), ("--int4-kernel", self.kernel)):
            argv += [] if value is None else [flag, str(value).lower()]
        return cfg.parse(argv, env={}).model

    @property
    def int4(self) -> Int4Settings | None:
        c = self.config()
        return Int4Settings.from_weights(c.decode_weights, c.int4_group_size, c.int4_outliers, c.int4_lm_head)

    @property
    def label(self) -> str:
        kernel = f" ({self.kernel} kernel)" if self.kernel else ""
        return (self.int4.label if self.int4 else self.weights) + kernel


FP32, BF16 = Variant("fp32"), Variant("bf16")
AWQ, RTN_G64 = Variant("int4-awq"), Variant("int4-rtn", 64)  # AWQ: the service's default settings
AWQ_TORCH_KERNEL = Variant("int4-awq", kernel="torch")  # the same weights on torch's int4 kernel


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
    while engine.has_work:
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
        engine.submit(engine.new_sequence(f"p{i}", Kind.LOCAL, prompt, SamplingParams(), num_new),
                      collector(outputs[i]))
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
        engine.submit(engine.new_sequence(f"p{i}", Kind.PREFILL_ONLY, prompt, SamplingParams(), num_new),
                      collector(firsts[i]), on_layer_kv=kv_recorder(layers[i]))
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
        engine.submit(engine.new_sequence(f"p{i}", Kind.FROM_KV, [*prompt, first], SamplingParams(), num_new,
                                          num_generated=1), collector(outputs[i]), staged_kv=kv)
    run_to_completion(engine)
    return outputs


def decode_step_ms(model: LlamaModel, batch: int, num_steps: int) -> float:
    """Mean wall time of one engine decode step with `batch` running sequences."""
    engine = new_engine(model, batch, STEP_PROMPT_TOKENS + STEP_WARMUP + num_steps + 1)
    for i in range(batch):
        prompt = list(range(100 + i, 100 + i + STEP_PROMPT_TOKENS))
        engine.submit(engine.new_sequence(str(i), Kind.LOCAL, prompt, SamplingParams(), 10_000), lambda *_: None)
    while engine.stats().num_waiting:  # every prompt prefilled (room for all: nothing waits for blocks)
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
    for variant in (FP32, BF16, AWQ, AWQ_TORCH_KERNEL, RTN_G64):
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


def service_requests(num_requests: int) -> list[BenchRequest]:
    return [BenchRequest(SERVICE_PROMPTS[i % len(SERVICE_PROMPTS)], SERVICE_MAX_TOKENS) for i in range(num_requests)]


def decode_state(stack: Stack, timeout_s: float = 15.0) -> monitor_pb2.ServiceState:
    """The decode service's entry in the monitor's route table, once a heartbeat has carried its load."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            table = stack.route_table()
        except grpc.RpcError:
            table = None
        for state in table.services if table else ():
            if state.role == common_pb2.SERVICE_ROLE_DECODE and state.load.weight_bytes:
                return state
        if time.monotonic() > deadline:
            raise TimeoutError("the monitor's route table has no decode service with a load")
        time.sleep(0.2)


def rss_mib(pid: int) -> dict[str, float]:
    """A process's resident memory in MiB: VmRSS (now), VmHWM (peak), and RSS split into anonymous
    memory (heap, tensors) and file pages (shared libraries, mmapped checkpoints)."""
    names = {"VmRSS": "rss_mib", "VmHWM": "hwm_mib", "RssAnon": "rss_anon_mib", "RssFile": "rss_file_mib"}
    fields = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in names:
            fields[names[key]] = int(value.split()[0]) / 1024  # kB
    return fields


async def service_load(address: str, levels: tuple[tuple[int, int], ...]) -> list[tuple[int, Batch]]:
    """One warm-up request, then a closed loop at each (concurrency, requests) level."""
    async with AsyncClient(address, timeout_s=SERVICE_REQUEST_TIMEOUT_S) as client:
        if error := (await run_request(client, service_requests(1)[0])).error:
            raise RuntimeError(f"warm-up request failed: {error}")
        return [(c, await closed_loop(client, service_requests(n), c)) for c, n in levels]


def service_row(weights: str, levels: tuple[tuple[int, int], ...], model_flags: tuple[str, ...] = ()) -> dict[str, Any]:
    flags = (*model_flags, "--prefill-dtype", SERVICE_PREFILL_DTYPE, "--decode-weights", weights)
    print(f"[services] {weights}: starting the {SERVICE_STACK} stack ...", file=sys.stderr, flush=True)
    row: dict[str, Any] = {"decode_weights": weights, "prefill_dtype": SERVICE_PREFILL_DTYPE}
    try:
        started = time.monotonic()
        with started_stack(SERVICE_STACK, flags) as (stack, description):
            row["startup_s"] = time.monotonic() - started
            state = decode_state(stack)
            decode_pid = stack.procs["decode"].pid
            idle = rss_mib(decode_pid)
            batches = asyncio.run(service_load(stack.address("gateway"), levels))
            loaded = rss_mib(decode_pid)
            row.update({
                "label": state.load.weights, "dtype": state.load.dtype, "weight_bytes": state.load.weight_bytes,
                "decode_rss_mib_idle": idle["rss_mib"], "decode_rss_mib_loaded": loaded["rss_mib"],
                "decode_hwm_mib": loaded["hwm_mib"], "decode_memory_mib": {"idle": idle, "loaded": loaded},
                "stack": description,
                "levels": [{"concurrency": c, **summarize(batch, Slo(math.inf, math.inf))} for c, batch in batches],
            })
    except (RuntimeError, TimeoutError, OSError) as e:  # did not start, warm-up failed, decode exited
        row["error"] = str(e)
        print(f"[services] {weights} failed: {e}", file=sys.stderr, flush=True)
        return row
    for level in row["levels"]:
        print(f"[services] {weights} c={level['concurrency']}: {level['num_requests']} requests, "
              f"{level['num_errors']} errors, {level['output_tokens_per_s']:.1f} tok/s, "
              f"TPOT p50 {_opt(level['tpot_ms_p50'], '{:.1f}')} ms, "
              f"{_opt(level['completion_tokens_mean'], '{:.1f}')} tokens/request", file=sys.stderr, flush=True)
    return row


def services_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    model_flags = ("--model", args.model) if args.model else ()
    rows = [service_row(weights, args.service_levels, model_flags) for weights in args.service_weights]
    bf16 = next((r for r in rows if r["decode_weights"] == "bf16" and "weight_bytes" in r), None)
    for row in rows:
        if bf16 and "weight_bytes" in row:
            row["weight_bytes_vs_bf16"] = row["weight_bytes"] / bf16["weight_bytes"]
    return rows


def service_failures(rows: list[dict[str, Any]]) -> int:
    """Formats whose stack failed plus requests that failed."""
    return sum(1 for r in rows if "error" in r) + sum(lv["num_errors"] for r in rows for lv in r.get("levels", ()))


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


def _level(row: dict[str, Any], which: int, key: str, fmt: str = "{:.1f}") -> str:
    levels = row.get("levels")
    return _opt(levels[which][key], fmt) if levels else "-"


def _service_level(rows: list[dict[str, Any]], weights: str, which: int) -> dict[str, Any] | None:
    row = next((r for r in rows if r["decode_weights"] == weights and r.get("levels")), None)
    return row["levels"][which] if row else None


def service_acceptance(rows: list[dict[str, Any]], low: int, high: int) -> list[str]:
    """Issue 4, acceptance 2, from the services rows (a ratio is '-' when a row is missing)."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    fp32_lo, int4_lo = _service_level(rows, "fp32", 0), _service_level(rows, "int4-awq", 0)
    if fp32_lo and int4_lo and fp32_lo["tpot_ms_p50"] and int4_lo["tpot_ms_p50"]:
        speedup = fp32_lo["tpot_ms_p50"] / int4_lo["tpot_ms_p50"]
        lines.append(f"- TPOT at c={low}: int4-awq {int4_lo['tpot_ms_p50']:.1f} ms vs fp32 {fp32_lo['tpot_ms_p50']:.1f} ms "
                     f"= {speedup:.2f}x faster (target >= 2x: {verdict(speedup >= 2)})")
    else:
        lines.append(f"- TPOT at c={low}: int4-awq vs fp32 -")
    bf16_hi, int4_hi = _service_level(rows, "bf16", -1), _service_level(rows, "int4-awq", -1)
    note = "" if high == 32 else f" [acceptance asks c=32; this run's highest level is c={high}]"
    if bf16_hi and int4_hi and bf16_hi["output_tokens_per_s"]:
        ratio = int4_hi["output_tokens_per_s"] / bf16_hi["output_tokens_per_s"]
        lines.append(f"- output tok/s at c={high}: int4-awq {int4_hi['output_tokens_per_s']:.1f} vs bf16 "
                     f"{bf16_hi['output_tokens_per_s']:.1f} = {ratio:.2f}x (target >= 0.9x: {verdict(ratio >= 0.9)}){note}")
    else:
        lines.append(f"- output tok/s at c={high}: int4-awq vs bf16 -{note}")
    int4 = next((r for r in rows if r["decode_weights"] == "int4-awq" and "weight_bytes_vs_bf16" in r), None)
    if int4:
        ratio = int4["weight_bytes_vs_bf16"]
        lines.append(f"- decode weight bytes: int4-awq ({int4['label']}) {int4['weight_bytes'] / 2**20:.1f} MiB = "
                     f"{ratio:.1%} of bf16 (target <= 30%: {verdict(ratio <= 0.30)})")
    else:
        lines.append("- decode weight bytes: int4-awq vs bf16 -")
    return lines


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
    if "services" in results:
        (low, n_low), (high, n_high) = meta["service_levels"][0], meta["service_levels"][-1]
        rows = results["services"]
        table = markdown(
            f"Decode through the services ({SERVICE_STACK} stack, prefill {SERVICE_PREFILL_DTYPE}, decode on one pinned "
            f"core; closed loop, {n_low} requests at c={low} and {n_high} at c={high}, max_tokens {SERVICE_MAX_TOKENS})",
            [("decode weights", lambda r: r["decode_weights"]),
             ("label (load.weights)", lambda r: r.get("label") or f"failed: {r['error'].splitlines()[0][:80]}"),
             (f"TPOT c={low} p50 ms", lambda r: _level(r, 0, "tpot_ms_p50")),
             (f"tok/s c={high}", lambda r: _level(r, -1, "output_tokens_per_s")),
             (f"TPOT c={high} p50 ms", lambda r: _level(r, -1, "tpot_ms_p50")),
             ("weight MiB", lambda r: _opt(r.get("weight_bytes") and r["weight_bytes"] / 2**20, "{:.1f}")),
             ("weight vs bf16", lambda r: _opt(r.get("weight_bytes_vs_bf16"), "{:.3f}")),
             ("decode RSS MiB idle / loaded", lambda r: f"{r['decode_rss_mib_idle']:.0f} / {r['decode_rss_mib_loaded']:.0f}"
              if "decode_rss_mib_idle" in r else "-"),
             (f"tokens/request c={low} / c={high}", lambda r: f"{_level(r, 0, 'completion_tokens_mean')} / "
              f"{_level(r, -1, 'completion_tokens_mean')}"),
             ("failed requests", lambda r: str(sum(lv["num_errors"] for lv in r.get("levels", ()))))],
            rows)
        out.append(table + "\n\nIssue 4, acceptance 2:\n" + "\n".join(service_acceptance(rows, low, high)))
    return "\n\n".join(out)


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [item(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="passed as --model to the config; empty = the embedded model")
    p.add_argument("--sections", type=comma_list(str), default=list(SECTIONS), help=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 512 tokens, 5 prompts, group 64, batches 1,8; services 2 requests at c=1, 8 at c=8")
    p.add_argument("--num-tokens", type=int, help="perplexity tokens (default 4096; --quick 512)")
    p.add_argument("--window", type=int, default=512, help="perplexity window")
    p.add_argument("--num-prompts", type=int, help="greedy/hybrid prompts (default 50; --quick 5)")
    p.add_argument("--steps", type=int, help="timed decode steps per batch size (default 10; --quick 5)")
    p.add_argument("--group-sizes", type=comma_list(int), help="perplexity group sizes (default 32,64,128; --quick 64)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for ppl/greedy/hybrid; 0 = every CPU")
    p.add_argument("--service-weights", type=comma_list(str), default=list(SERVICE_WEIGHTS),
                   help="decode weight formats of the services section (default: " + ",".join(SERVICE_WEIGHTS) + ")")
    p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "precision.json")
    args = p.parse_args(argv)
    if unknown := set(args.sections) - set(SECTIONS):
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.num_tokens = args.num_tokens or (512 if args.quick else 4096)
    args.num_prompts = args.num_prompts or (5 if args.quick else 50)
    args.steps = args.steps or (5 if args.quick else 10)
    args.group_sizes = tuple(args.group_sizes or ((64,) if args.quick else (32, 64, 128)))
    args.batches = [1, 8] if args.quick else [1, 8, 32]
    args.service_levels = SERVICE_LEVELS_QUICK if args.quick else SERVICE_LEVELS
    if unknown := set(args.service_weights) - set(cfg.DECODE_WEIGHTS):
        p.error(f"unknown --service-weights {sorted(unknown)}; choose from {','.join(cfg.DECODE_WEIGHTS)}")
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
        "service_stack": SERVICE_STACK, "service_weights": args.service_weights,
        "service_prefill_dtype": SERVICE_PREFILL_DTYPE, "service_max_tokens": SERVICE_MAX_TOKENS,
        "service_levels": [list(level) for level in args.service_levels],
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logs.configure("bench")  # info: the engine's per-step debug line is not printed (nor paid for)
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
    if "services" in args.sections:
        results["services"] = services_section(args)
    meta["seconds"] = round(time.monotonic() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, **results}, indent=2) + "\n")
    print(tables(results, meta))
    print(f"\nwrote {args.out} after {meta['seconds']:.0f} s", file=sys.stderr)
    if failures := service_failures(results.get("services", [])):
        print(f"services: {failures} failed stacks or requests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
