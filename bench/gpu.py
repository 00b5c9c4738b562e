"""`python -m bench.gpu` (`make bench-gpu`): EdgeLLM's engine beside transformers, on one device, in one run.

Systems (--systems), each loaded alone on --device after the one before it is freed, on one checkpoint:
  edgellm-{int4awq,bf16}-{graphs,eager}  the decode engine, build_engine(config, "decode"), with
                                         --decode-weights int4-awq or bf16 and --cuda-graphs true or false
  edgellm-prefill-bf16                   the prefill engine, build_engine(config, "prefill"): prefill only
  hf-eager-bf16                          transformers `generate`, its dynamic cache, eager
  hf-static-compile-bf16                 transformers `generate` with cache_implementation="static", which
                                         compiles the decode step on CUDA (torch.compile, reduce-overhead)
Per system:
  TPOT ms      1 stream of --new-tokens greedy tokens: (last token - first token) / (tokens - 1)
  tok/s @ S    S streams at once, each --new-tokens tokens: all tokens / wall time (EdgeLLM: S concurrent
               engine.generate calls; transformers: one batched generate, prompts left-padded)
  prefill      one prompt of P tokens: P / wall time (EdgeLLM: engine.prefill; transformers: one
               forward with logits for the last position only); best of 3 after a warm-up
  peak MiB     torch.cuda.max_memory_allocated, reset before the system loads (CUDA only)
Every shape runs untimed first (twice for static+compile; torch.compile and graph capture happen there).
Streams ignore EOS so each runs its full length (EdgeLLM: the engine's EOS set emptied; transformers:
min_new_tokens). Prompts are seeded random token ids, 16..48 tokens, the same for both systems.
A system or measurement that fails (torch.compile, say) is recorded in its row and the run goes on;
--budget-s skips what would start after that many seconds. The JSON (--out) and its markdown table
(the same name, .md) are rewritten after every system: a run cut off by a time limit leaves what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import pathlib
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Awaitable, Callable

import torch

from bench.run import comma_list, git_commit
from edgellm import config as cfg
from edgellm.device import resolve_device
from edgellm.engine.sampling_params import SamplingParams
from edgellm.engine_builder import build_engine
from edgellm.model_store import prepare_default_model, resolve_model_dir

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# system -> (service, weights, CUDA graphs): the decode engine four ways, the prefill engine once
EDGELLM = {"edgellm-int4awq-graphs": ("decode", "int4-awq", True), "edgellm-int4awq-eager": ("decode", "int4-awq", False),
           "edgellm-bf16-graphs": ("decode", "bf16", True), "edgellm-bf16-eager": ("decode", "bf16", False),
           "edgellm-prefill-bf16": ("prefill", "bf16", False)}
HF = {"hf-eager-bf16": False, "hf-static-compile-bf16": True}  # system -> static cache + compile
SYSTEMS = [*EDGELLM, *HF]
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=2)
QUICK = {"streams": [1, 4], "new_tokens": 8, "prefill": [64, 256]}
NUM_PREFILL_REPEATS = 3


class Skipped(Exception):
    """A measurement not started: the time budget is spent."""


def build_random_smollm2(path: pathlib.Path, tokenizer_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A SmolLM2-135M-shaped Llama with seeded random weights (bf16) and SmolLM2's tokenizer, saved
    as an HF checkpoint: both systems load the same weights where the real model is absent."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # AWQ calibration tokenizes real text
    if len(tokenizer) > SMOLLM2_135M["vocab_size"]:
        raise ValueError(f"{tokenizer_dir}: {len(tokenizer)} tokens, more than SmolLM2's vocabulary")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def seeded_prompts(seed: int, count: int, lengths: tuple[int, int], vocab_size: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size - 100) for _ in range(rng.randint(*lengths))] for _ in range(count)]


# ---- measuring ----------------------------------------------------------------------------------
class Bench:
    """What every system is measured on, and the clock: shapes, prompts, the device, the budget."""

    def __init__(self, args: argparse.Namespace, vocab_size: int):
        self.device = resolve_device(args.device)
        self.streams, self.new_tokens, self.prefill_sizes = args.streams, args.new_tokens, args.prefill
        self.prompts = seeded_prompts(args.seed, max(self.streams), (16, 48), vocab_size)
        self.long_prompts = {n: seeded_prompts(args.seed + n, 1, (n, n), vocab_size)[0] for n in self.prefill_sizes}
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else float("inf")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check_budget(self) -> None:
        if time.monotonic() > self.deadline:
            raise Skipped("skipped: --budget-s spent")

    def reset_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None


def _record_failure(row: dict[str, Any], key: str, e: Exception) -> None:
    if not isinstance(e, Skipped):
        print(f"[{row['system']}] {key} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    row.setdefault("errors", {})[key] = str(e) if isinstance(e, Skipped) else f"{type(e).__name__}: {e}"


def measure(b: Bench, row: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """row[key] = fn(), or why not in row['errors'][key]: a failing system is a result, not a crash."""
    try:
        b.check_budget()
        row[key] = fn()
    except Exception as e:  # noqa: BLE001
        _record_failure(row, key, e)


async def measure_async(b: Bench, row: dict[str, Any], key: str, fn: Callable[[], Awaitable[Any]]) -> None:
    try:
        b.check_budget()
        row[key] = await fn()
    except Exception as e:  # noqa: BLE001
        _record_failure(row, key, e)


def stream_result(wall_s: float, num_tokens: list[int], times: list[float] | None = None) -> dict[str, Any]:
    """One level's figures from each stream's token count; times: when each token of a lone stream came."""
    out: dict[str, Any] = {"num_streams": len(num_tokens), "num_tokens": sum(num_tokens), "wall_s": wall_s,
                           "tokens_per_s": sum(num_tokens) / wall_s}
    if times is not None and len(times) > 1:
        out["tpot_ms"] = (times[-1] - times[0]) / (len(times) - 1) * 1e3
    return out


# ---- EdgeLLM --------------------------------------------------------------------------------------
def edgellm_config(args: argparse.Namespace, model_dir: pathlib.Path, weights: str, graphs: bool) -> cfg.Config:
    from transformers import AutoConfig

    a = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    bytes_per_token = 2 * a.num_hidden_layers * a.num_key_value_heads * head_dim * 2  # K and V, bf16
    num_tokens = max(max(args.streams) * (48 + args.new_tokens + 16), max(args.prefill) + 16)
    kv_mb = int(num_tokens * bytes_per_token * 1.25 / 2**20) + 8  # what the largest level needs, not 1 GiB
    argv = ["--model", str(model_dir), "--prefill-device", args.device, "--decode-device", args.device,
            "--decode-weights", weights, "--prefill-dtype", "bf16", "--cuda-graphs", str(graphs).lower(),
            "--kv-cache-mb", str(kv_mb), "--max-running", str(max(args.streams)),
            "--max-batch-tokens", str(max(2048, max(args.prefill)))]
    return cfg.parse(argv, env={})


async def edgellm_streams(engine: Any, prompts: list[list[int]], num_tokens: int) -> dict[str, Any]:
    async def one(i: int, prompt: list[int]) -> list[float]:
        times = []
        async for _token, _finish in engine.generate(f"bench-{i}-{time.monotonic_ns()}", prompt, SamplingParams(),
                                                     num_tokens):
            times.append(time.perf_counter())
        return times

    start = time.perf_counter()
    token_times = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    return stream_result(wall, [len(t) for t in token_times], token_times[0] if len(prompts) == 1 else None)


async def edgellm_prefill(engine: Any, prompt: list[int]) -> dict[str, Any]:
    walls, forwards = [], []
    for i in range(1 + NUM_PREFILL_REPEATS):  # the first is the warm-up
        start = time.perf_counter()
        r = await engine.prefill(f"prefill-{len(prompt)}-{i}", prompt, SamplingParams(), 1,
                                 on_layer_kv=lambda layer, k, v: None)
        walls.append(time.perf_counter() - start)
        forwards.append((r.forward_end_unix_ns - r.forward_start_unix_ns) / 1e6)
    wall = min(walls[1:])
    return {"prompt_tokens": len(prompt), "wall_s": wall, "tokens_per_s": len(prompt) / wall,
            "forward_ms": min(forwards[1:])}


def run_edgellm(b: Bench, args: argparse.Namespace, model_dir: pathlib.Path, system: str) -> dict[str, Any]:
    row: dict[str, Any] = {"system": system}
    service, weights, graphs = EDGELLM[system]
    if graphs and b.device.type != "cuda":
        return row | {"errors": {"system": "skipped: CUDA graphs need CUDA"}}
    b.reset_memory()
    start = time.monotonic()
    try:
        engine, _ = build_engine(edgellm_config(args, model_dir, weights, graphs), service)
    except Exception as e:  # noqa: BLE001
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return row | {"errors": {"system": f"{type(e).__name__}: {e}"}}
    row["load_s"] = time.monotonic() - start
    row["device"] = str(engine.info.device)
    engine.eos_token_ids = frozenset()  # fixed-length streams, as transformers' min_new_tokens

    async def body() -> None:
        if service == "prefill":
            for n, prompt in b.long_prompts.items():
                await measure_async(b, row, f"prefill_{n}", lambda: edgellm_prefill(engine, prompt))
            return
        for s in b.streams:
            async def level(s: int = s) -> dict[str, Any]:
                await edgellm_streams(engine, b.prompts[:s], min(8, b.new_tokens))  # warm-up
                return await edgellm_streams(engine, b.prompts[:s], b.new_tokens)
            await measure_async(b, row, f"streams_{s}", level)

    try:
        asyncio.run(body())
    finally:
        engine.stop()
        row["peak_mib"] = b.peak_mib()
    return row


# ---- transformers ---------------------------------------------------------------------------------
class _TokenClock:
    """A transformers streamer that notes when each generated token reaches the host (batch of 1)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:  # the first put is the prompt
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def hf_streams(b: Bench, model: Any, prompts: list[list[int]], num_tokens: int, static: bool) -> dict[str, Any]:
    pad_id = model.generation_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [S, W], left-padded
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    clock = _TokenClock() if len(prompts) == 1 else None
    kwargs: dict[str, Any] = dict(max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False,
                                  pad_token_id=pad_id, streamer=clock)
    if static:
        kwargs["cache_implementation"] = "static"
    b.sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(b.device), attention_mask=mask.to(b.device), **kwargs)
    b.sync()
    wall = time.perf_counter() - start
    num_new = out.shape[1] - width  # min_new_tokens: every row ran num_tokens
    if clock is not None and len(clock.times) != num_new:
        raise RuntimeError(f"the streamer saw {len(clock.times)} tokens, generate returned {num_new}")
    return stream_result(wall, [num_new] * len(prompts), clock.times if clock else None)


def hf_prefill(b: Bench, model: Any, prompt: list[int]) -> dict[str, Any]:
    ids = torch.tensor([prompt], device=b.device)  # [1, P]
    walls = []
    with torch.inference_mode():
        for _ in range(1 + NUM_PREFILL_REPEATS):  # the first is the warm-up
            b.sync()
            start = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            b.sync()
            walls.append(time.perf_counter() - start)
    wall = min(walls[1:])
    return {"prompt_tokens": len(prompt), "wall_s": wall, "tokens_per_s": len(prompt) / wall}


def run_hf(b: Bench, model_dir: pathlib.Path, system: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    row: dict[str, Any] = {"system": system, "device": str(b.device)}
    static = HF[system]
    b.reset_memory()
    start = time.monotonic()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(b.device).eval()
    except Exception as e:  # noqa: BLE001
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return row | {"errors": {"system": f"{type(e).__name__}: {e}"}}
    row["load_s"] = time.monotonic() - start
    if static and b.device.type != "cuda":  # transformers compiles the static-cache decode step on CUDA only
        from transformers import CompileConfig

        model.generation_config.compile_config = CompileConfig()
        model.generation_config.compile_config._compile_all_devices = True
    try:
        for s in b.streams:
            def level(s: int = s) -> dict[str, Any]:
                # the static path compiles per shape, and reduce-overhead's CUDA graphs record only on
                # a later call than the first: it warms up twice, on the timed shape itself
                for _ in range(2 if static else 1):
                    hf_streams(b, model, b.prompts[:s], b.new_tokens if static else min(8, b.new_tokens), static)
                return hf_streams(b, model, b.prompts[:s], b.new_tokens, static)
            measure(b, row, f"streams_{s}", level)
        if not static:  # generate's prefill is not compiled: the eager row's prefill stands for both
            for n, prompt in b.long_prompts.items():
                measure(b, row, f"prefill_{n}", lambda: hf_prefill(b, model, prompt))
    finally:
        row["peak_mib"] = b.peak_mib()
        if static:
            torch._dynamo.reset()  # frees the compiled graphs and their memory pools
    return row


# ---- the run --------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]], streams: list[int], prefill: list[int]) -> str:
    head = ["system", "TPOT ms @1", *(f"tok/s @{s}" for s in streams), *(f"prefill {n} tok/s" for n in prefill),
            "peak MiB", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["system"], fmt(r.get("streams_1", {}).get("tpot_ms"), 2),
                 *(fmt(r.get(f"streams_{s}", {}).get("tokens_per_s")) for s in streams),
                 *(fmt(r.get(f"prefill_{n}", {}).get("tokens_per_s"), 0) for n in prefill),
                 fmt(r.get("peak_mib"), 0), "; ".join(f"{k}: {v}"[:80] for k, v in r.get("errors", {}).items()).replace("|", "/") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(rows: list[dict[str, Any]], streams: list[int]) -> list[str]:
    """Issue 14's acceptance 2: the best EdgeLLM decode row against transformers' eager generate."""
    by = {r["system"]: r for r in rows}
    hf = by.get("hf-eager-bf16", {})
    edge = [r for r in rows if EDGELLM.get(r["system"], ("",))[0] == "decode"]
    lines = []
    hf_tpot = hf.get("streams_1", {}).get("tpot_ms")
    tpots = [(r["streams_1"]["tpot_ms"], r["system"]) for r in edge if r.get("streams_1", {}).get("tpot_ms")]
    if hf_tpot and tpots:
        best, name = min(tpots)
        lines.append(f"TPOT @1: {name} {best:.2f} ms vs hf eager {hf_tpot:.2f} ms = {hf_tpot / best:.1f}x "
                     f"(target >= 5x)")
    top = max(streams)
    hf_rate = hf.get(f"streams_{top}", {}).get("tokens_per_s")
    rates = [(r[f"streams_{top}"]["tokens_per_s"], r["system"]) for r in edge if f"streams_{top}" in r]
    if hf_rate and rates:
        best, name = max(rates)
        lines.append(f"tok/s @{top}: {name} {best:.0f} vs hf eager {hf_rate:.0f} = {best / hf_rate:.1f}x "
                     f"(target >= 3x at 64)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a slow smoke run)")
    p.add_argument("--model", default="", help="HF checkpoint directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--random-smollm2", action="store_true",
                   help="bench a SmolLM2-135M-shaped Llama with seeded random weights (a temp checkpoint)")
    p.add_argument("--tokenizer", type=pathlib.Path, help="with --random-smollm2: SmolLM2's tokenizer "
                   "(default: the embedded model's)")
    p.add_argument("--systems", type=comma_list(str), default=SYSTEMS, help=",".join(SYSTEMS))
    p.add_argument("--streams", type=comma_list(int), help="concurrent streams (default 1,8,32,64)")
    p.add_argument("--new-tokens", type=int, help="tokens per stream (default 128)")
    p.add_argument("--prefill", type=comma_list(int), help="prefill prompt sizes (default 512,2048)")
    p.add_argument("--quick", action="store_true", help=f"small sizes for a CPU smoke run: {QUICK}")
    p.add_argument("--budget-s", type=float, default=0.0, help="start nothing after this many seconds (0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "gpu.json")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"streams": [1, 8, 32, 64], "new_tokens": 128, "prefill": [512, 2048]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.systems:
        p.error("--systems names none")
    if unknown := set(args.systems) - set(SYSTEMS):
        p.error(f"unknown systems {sorted(unknown)}; known: {SYSTEMS}")
    if min([*args.streams, *args.prefill, args.new_tokens]) < 1:
        p.error("--streams, --prefill and --new-tokens must be >= 1")
    if args.random_smollm2 and args.model:
        p.error("--model and --random-smollm2 exclude each other")
    return args


def run_meta(args: argparse.Namespace, model: str, b: Bench) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else None
    return {
        "model": model, "random_weights": args.random_smollm2, "device": str(b.device), "gpu": gpu,
        "torch": torch.__version__, "cuda": torch.version.cuda, "streams": args.streams,
        "new_tokens": args.new_tokens, "prefill_tokens": args.prefill, "prompt_tokens": [16, 48],
        "platform": platform.platform(), "python": platform.python_version(), "git_commit": git_commit(),
        "command": " ".join(["python -m bench.gpu", *sys.argv[1:]]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.random_smollm2:
            tmp = pathlib.Path(tempfile.mkdtemp(prefix="random-smollm2-"))
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            model_dir = build_random_smollm2(tmp / "random-smollm2-135m", args.tokenizer or prepare_default_model(),
                                             args.seed)
        else:
            model_dir = resolve_model_dir(args.model)
        from transformers import AutoConfig

        b = Bench(args, AutoConfig.from_pretrained(model_dir).vocab_size)
        meta, rows = run_meta(args, model_dir.name, b), []
        start = time.monotonic()
        for system in args.systems:
            print(f"[{system}] ...", file=sys.stderr, flush=True)
            if time.monotonic() > b.deadline:  # loading it would only spend the time its rows cannot
                row = {"system": system, "errors": {"system": "skipped: --budget-s spent"}}
            else:
                row = run_hf(b, model_dir, system) if system in HF else run_edgellm(b, args, model_dir, system)
            print(f"[{system}] {json.dumps(row)}", file=sys.stderr, flush=True)
            rows.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
            report = "\n".join([table(rows, args.streams, args.prefill), "", *speedups(rows, args.streams)])
            args.out.with_suffix(".md").write_text(report + "\n")
    print(report)
    print(f"\nwrote {args.out} after {time.monotonic() - start:.0f} s", file=sys.stderr)
    failed = [r["system"] for r in rows if "system" in r.get("errors", {}) and "skipped" not in r["errors"]["system"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
