"""The engine's step loop: one thread that owns the model, fed from asyncio.

Lifecycle of work:
  prefill(tokens)  -> PrefillJob queued -> run whole prompt (per-layer KV hook) -> first token
  generate(seq)    -> Sequence joins the running set -> one token per step -> leaves on
                      EOS / max_new_tokens / context end / cancel
Policy: a waiting prefill runs before the next decode step (time to first token first).
The model never runs on the event loop; results come back through
loop.call_soon_threadsafe into per-request asyncio queues and futures.
All torch compute of a process happens on this one thread, warm-up included: a second
thread that has run parallel torch ops keeps its own OpenMP team, and two teams on two
cores made every decode step 2x slower (32 -> 70 ms/token measured here).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import structlog
import torch

from edgellm.engine.kv_cache import SequenceKV
from edgellm.engine.model import LayerKVHook, LlamaModel
from edgellm.engine.sampling import SamplingParams, sample

log = structlog.get_logger(__name__)

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass
class PrefillResult:
    first_token_id: int
    finish_reason: str | None  # set when the first token already ends the request
    kv: SequenceKV
    forward_start_unix_ns: int
    forward_end_unix_ns: int


@dataclass
class PrefillJob:
    token_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    first_index: int  # sampling index of the token this prefill produces (> 0 when resuming)
    on_layer_kv: LayerKVHook | None
    done: Callable[[PrefillResult | BaseException], None]


@dataclass
class Sequence:
    """A request in the decode phase. Its last sampled token is not yet in the KV."""

    request_id: str
    kv: SequenceKV
    last_token_id: int
    num_generated: int  # tokens sampled so far, the first one included
    sampling: SamplingParams
    max_new_tokens: int
    emit: Callable[[int | None, str | None], None]  # (token, finish_reason); (None, "error") on failure
    cancelled: bool = field(default=False)


class EngineLoop:
    def __init__(self, model: LlamaModel, eos_token_ids: frozenset[int], num_threads: int = 0) -> None:
        self.model = model
        self.num_threads = num_threads  # torch intra-op threads; 0 = torch's default
        self.eos_token_ids = eos_token_ids
        self.max_context = model.arch.max_position_embeddings
        self._prefills: collections.deque[PrefillJob] = collections.deque()
        self._incoming: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
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
        return len(self._running)

    # ---- asyncio-facing API ----------------------------------------------------------------
    async def prefill(
        self,
        token_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        on_layer_kv: LayerKVHook | None = None,
        first_index: int = 0,
    ) -> PrefillResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[PrefillResult] = loop.create_future()

        def done(result: PrefillResult | BaseException) -> None:
            def settle() -> None:
                if future.done():
                    return
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

            loop.call_soon_threadsafe(settle)

        self._submit(self._prefills, PrefillJob(token_ids, sampling, max_new_tokens, first_index, on_layer_kv, done))
        return await future

    async def generate(
        self,
        request_id: str,
        kv: SequenceKV,
        last_token_id: int,
        num_generated: int,
        sampling: SamplingParams,
        max_new_tokens: int,
    ) -> AsyncIterator[tuple[int, str | None]]:
        """Yield (token_id, finish_reason) for tokens num_generated, num_generated+1, ...

        Leaving the iteration early (client gone, error) removes the sequence from the batch.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()

        def emit(token: int | None, finish: str | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (token, finish))

        seq = Sequence(request_id, kv, last_token_id, num_generated, sampling, max_new_tokens, emit)
        self._submit(self._incoming, seq)
        try:
            while True:
                token, finish = await queue.get()
                if token is None:
                    raise RuntimeError(f"engine failed while decoding {request_id}")
                yield token, finish
                if finish is not None:
                    return
        finally:
            seq.cancelled = True  # read by the engine thread at its next step

    def finish_reason(self, token_id: int, num_generated: int, max_new_tokens: int, num_tokens: int) -> str | None:
        if token_id in self.eos_token_ids:
            return FINISH_STOP
        if num_generated >= max_new_tokens or num_tokens >= self.max_context:
            return FINISH_LENGTH
        return None

    # ---- engine thread ---------------------------------------------------------------------
    def _submit(self, queue: collections.deque, item: object) -> None:
        with self._wake:
            queue.append(item)
            self._wake.notify()

    def _warm_up(self) -> None:
        """A short prefill and a decode step, so the first request does not pay for torch's
        lazy initialisation (kernel selection, allocator growth): ~1.5 s on the CPU here."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        kv = self.model.new_kv()
        self.model(torch.zeros(16, dtype=torch.long), kv)
        self.model(torch.zeros(1, dtype=torch.long), kv)

    def _run(self) -> None:
        try:
            self._warm_up()
        finally:
            self._warm.set()
        while True:
            with self._wake:
                while not (self._stopped or self._prefills or self._incoming or self._running):
                    self._wake.wait()
                if self._stopped:
                    return
                job = self._prefills.popleft() if self._prefills else None
                while self._incoming:
                    self._running.append(self._incoming.popleft())
            if job is not None:
                self._run_prefill(job)
            else:
                self._decode_step()

    def _run_prefill(self, job: PrefillJob) -> None:
        try:
            kv = self.model.new_kv(capacity=len(job.token_ids) + min(job.max_new_tokens, 256))
            start = time.time_ns()
            logits = self.model(torch.tensor(job.token_ids, dtype=torch.long), kv, on_layer_kv=job.on_layer_kv)
            end = time.time_ns()
            first = sample(logits, job.sampling, index=job.first_index)
            finish = self.finish_reason(first, job.first_index + 1, job.max_new_tokens, kv.num_tokens + 1)
            job.done(PrefillResult(first, finish, kv, start, end))
        except Exception as e:  # reported to the waiting request, the loop carries on
            log.exception("prefill_failed")
            job.done(e)

    def _decode_step(self) -> None:
        # Iteration-level: every running sequence advances one token, then the set is revised.
        still_running = []
        for seq in self._running:
            if seq.cancelled:
                continue
            try:
                logits = self.model(torch.tensor([seq.last_token_id], dtype=torch.long), seq.kv)
                token = sample(logits, seq.sampling, index=seq.num_generated)
            except Exception:
                log.exception("decode_step_failed", request_id=seq.request_id)
                seq.emit(None, "error")
                continue
            seq.num_generated += 1
            seq.last_token_id = token
            finish = self.finish_reason(token, seq.num_generated, seq.max_new_tokens, seq.kv.num_tokens + 1)
            seq.emit(token, finish)
            if finish is None:
                still_running.append(seq)
        self._running = still_running
