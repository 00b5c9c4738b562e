"""The engine's step loop: one thread that owns the model, fed from asyncio.

Each step is schedule -> run -> postprocess:
  schedule     Scheduler picks a packed prefill batch or a decode step (scheduler.py)
  run          ModelRunner builds the tensors and runs the model (runner.py)
  postprocess  sampled tokens go to their requests; finished sequences free their blocks
Sequences join the running batch between steps and leave the moment they finish
(EOS, max_new_tokens, end of context, cancel). The model never runs on the event loop;
tokens come back through loop.call_soon_threadsafe into per-request asyncio queues.
All heavy torch compute of a process happens on this one thread, with num_threads
threads; the event loop's thread stays single-threaded (see setup.engine_threads).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass
from typing import AsyncIterator

import structlog
import torch

from edgellm.engine.block_manager import BlockManager
from edgellm.engine.kv_cache import PagedKVCache
from edgellm.engine.model import LayerKVHook, LlamaModel
from edgellm.engine.runner import ModelRunner
from edgellm.engine.sampling import SamplingParams
from edgellm.engine.scheduler import Scheduler, SchedulerOutput
from edgellm.engine.sequence import Kind, Sequence, Status
from edgellm.engine.weights import DTYPE_NAMES

log = structlog.get_logger(__name__)

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass(frozen=True)
class EngineLimits:
    num_blocks: int
    block_size: int = 16
    max_batch_tokens: int = 2048  # prefill tokens packed into one forward
    max_running: int = 64  # sequences in the decode batch
    max_consecutive_prefills: int = 4  # then a decode step runs, so decoding never starves


@dataclass
class PrefillResult:
    first_token_id: int
    finish_reason: str | None  # set when the first token already ends the request
    num_prompt_tokens: int
    forward_start_unix_ns: int
    forward_end_unix_ns: int


class EngineError(RuntimeError):
    pass


class EngineLoop:
    def __init__(self, model: LlamaModel, eos_token_ids: frozenset[int], limits: EngineLimits, num_threads: int = 0):
        self.model = model
        self.eos_token_ids = eos_token_ids
        self.limits = limits
        self.num_threads = num_threads  # torch threads of the engine thread; 0 = leave as is
        self.max_context = model.arch.max_position_embeddings
        a = model.arch
        dtype = model.norm.weight.dtype
        self.blocks = BlockManager(limits.num_blocks, limits.block_size)
        self.cache = PagedKVCache(a.num_layers, limits.num_blocks, limits.block_size, a.num_kv_heads, a.head_dim, dtype)
        self.runner = ModelRunner(model, self.cache, self.blocks)
        self.scheduler = Scheduler(self.blocks, limits.max_batch_tokens, limits.max_running, limits.max_consecutive_prefills)
        self.num_steps = 0
        self.num_preemptions = 0
        self.max_decode_batch = 0  # largest decode step so far (evidence of batching)
        self.weights_label = DTYPE_NAMES[dtype]  # build_engine names INT4 weights
        self.weight_bytes = model.weight_bytes()
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._warm = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; return once it has warmed up."""
        self._thread.start()
        self._warm.wait()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=5)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    # ---- asyncio-facing API ----------------------------------------------------------------
    async def prefill(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        on_layer_kv: LayerKVHook,
        num_generated: int = 0,
    ) -> PrefillResult:
        """Prefill only: the K/V of every token goes to on_layer_kv layer by layer; returns the
        token sampled next (index num_generated: token_ids ends with the tokens a failed decode
        service already produced, when this is a takeover)."""
        seq = Sequence(request_id, Kind.PREFILL_ONLY, list(token_ids), len(token_ids) - num_generated, sampling,
                       max_new_tokens, emit=lambda *_: None, num_generated=num_generated, on_layer_kv=on_layer_kv)
        async for token, finish in self._stream(seq):
            return PrefillResult(token, finish, len(token_ids), seq.forward_start_unix_ns, seq.forward_end_unix_ns)
        raise EngineError(f"prefill of {request_id} produced no token")

    def generate(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        num_generated: int = 0,
        staged_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> AsyncIterator[tuple[int, str | None]]:
        """Yield (token_id, finish_reason) for token index num_generated onwards.

        token_ids ends with the num_generated tokens already produced elsewhere. With
        staged_kv (the prompt's K/V from a prefill service, [L, Hkv, P, D] each) no prefill
        runs here. With prefix_kv (K/V of the first C tokens, kept from an earlier prefill
        here) the prefill computes only the tokens after them. Leaving the iteration early
        (client gone) frees the sequence's blocks.
        """
        num_prompt = len(token_ids) - num_generated
        kind = Kind.FROM_KV if staged_kv is not None else Kind.LOCAL
        seq = Sequence(request_id, kind, list(token_ids), num_prompt, sampling, max_new_tokens,
                       emit=lambda *_: None, num_generated=num_generated, staged_kv=staged_kv)
        if prefix_kv is not None and kind is Kind.LOCAL and prefix_kv[0].shape[2] < len(seq.prefill_token_ids):
            seq.prefix_kv = prefix_kv  # (a prefix covering every token to prefill would leave none to run)
        return self._stream(seq)

    def check_fits(self, num_tokens: int) -> None:
        """Raise EngineError if a sequence of num_tokens could never fit in the KV cache."""
        needed = self.blocks.num_blocks_for(num_tokens)
        if needed > self.blocks.num_blocks:
            raise EngineError(
                f"request needs {needed} KV blocks ({num_tokens} tokens); this engine's cache has {self.blocks.num_blocks}"
            )

    async def _stream(self, seq: Sequence) -> AsyncIterator[tuple[int, str | None]]:
        if seq.kind is not Kind.PREFILL_ONLY:
            self.check_fits(seq.num_prompt_tokens + seq.max_new_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        seq.emit = lambda token, finish: loop.call_soon_threadsafe(queue.put_nowait, (token, finish))
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify()
        try:
            while True:
                token, finish = await queue.get()
                if token is None:
                    raise EngineError(f"engine failed while running {seq.request_id}")
                yield token, finish
                if finish is not None:
                    return
        finally:
            seq.cancelled = True  # no-op once finished; otherwise the next step frees its blocks
            with self._wake:
                self._wake.notify()

    def finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        if token_id in self.eos_token_ids:
            return FINISH_STOP
        if seq.num_generated >= seq.max_new_tokens or seq.num_tokens >= self.max_context:
            return FINISH_LENGTH
        return None

    # ---- engine thread ---------------------------------------------------------------------
    def _warm_up(self) -> None:
        """A short prefill and a decode step, so the first request does not pay for torch's
        lazy initialisation (kernel selection, allocator growth): ~1.5 s on the CPU here."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        n = max(1, min(16, self.blocks.num_blocks * self.blocks.block_size - 1))
        seq = Sequence("warm-up", Kind.LOCAL, [0] * n, n, SamplingParams(), 2, emit=lambda *_: None)
        seq.block_table = self.blocks.allocate(n + 1)
        self.runner.prefill([seq])
        seq.token_ids.append(0)
        seq.num_generated = 1
        self.runner.decode([seq])
        self.blocks.free(seq.block_table)

    def _run(self) -> None:
        try:
            self._warm_up()
        finally:
            self._warm.set()
        while True:
            with self._wake:
                while not self._stopped and not self._inbox and not self._has_runnable_work():
                    self._wake.wait(timeout=0.05)
                if self._stopped:
                    return
            if self.step().is_empty:  # waiting for blocks or a cancellation: nothing to compute yet
                with self._wake:
                    self._wake.wait(timeout=0.05)

    def step(self) -> SchedulerOutput:
        """One engine iteration: take new sequences, schedule, run, postprocess.
        Runs on the engine thread (tests call it directly on an engine that was not started)."""
        with self._wake:
            while self._inbox:
                self.scheduler.add(self._inbox.popleft())
        out = self.scheduler.schedule()
        if out.is_empty:
            return out
        self.num_steps += 1
        self.num_preemptions += len(out.preempted)
        self.max_decode_batch = max(self.max_decode_batch, len(out.decodes))
        try:
            self._run_step(out)
        except Exception:
            log.exception("engine_step_failed")
            for seq in out.prefills + out.decodes + out.admitted_from_kv:
                seq.emit(None, "error")
                self.scheduler.finish(seq)
        return out

    def _has_runnable_work(self) -> bool:
        s = self.scheduler
        return bool(s.running) or any(q.cancelled or q.needs_prefill or q.staged_kv is not None for q in s.waiting)

    def _run_step(self, out: SchedulerOutput) -> None:
        for seq in out.admitted_from_kv:
            if seq.status is Status.RUNNING:  # not preempted again in this same schedule
                self.runner.load_staged(seq)
        if out.prefills:
            firsts = self.runner.prefill(out.prefills)
            for seq, token in zip(out.prefills, firsts):
                if token is None:  # a recompute: KV rebuilt, its next input token is already known
                    self.scheduler.start_running(seq)
                    continue
                self._append(seq, token)
                if seq.kind is Kind.PREFILL_ONLY:
                    seq.status = Status.FINISHED
                elif seq.status is not Status.FINISHED:
                    self.scheduler.start_running(seq)
        elif out.decodes:
            for seq, token in zip(out.decodes, self.runner.decode(out.decodes)):
                self._append(seq, token)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.token_ids.append(token)
        seq.num_generated += 1
        finish = self.finish_reason(seq, token)
        seq.emit(token, finish)
        if finish is not None and seq.kind is not Kind.PREFILL_ONLY:
            self.scheduler.finish(seq)
