"""The engine's step loop: one thread that owns the model, fed from asyncio.

A request enters through submit() (the async prefill()/generate() call it): its Sequence,
its output callback and its tensors wait in an inbox. At the start of the next step the
engine thread moves them in: the Sequence to the scheduler, the callback to this loop's
table and the tensors (staged K/V, kept prefix K/V, layer-KV hook) to the runner, both
keyed by the sequence's seq_id. Each step is then schedule -> run -> postprocess:
  schedule     Scheduler picks a packed prefill batch or a decode step (scheduler.py)
  run          ModelRunner builds the tensors and runs the model (runner.py)
  postprocess  sampled tokens go onto their sequences, finished ones leave (postprocess.py);
               the loop hands each token to its callback
Sequences join the running batch between steps and leave the moment they finish
(EOS, max_new_tokens, end of context, cancel, a failed step, or a failure of their own:
a sequence whose sampling raises ends alone with an error, the rest of its batch goes on;
only a failed batched forward pass fails every sequence of the step); then the loop drops their
callback and the runner their tensors. The model never runs on the event loop;
tokens come back through loop.call_soon_threadsafe into per-request asyncio queues.
All heavy torch compute of a process happens on this one thread, with num_threads
threads; the event loop's thread stays single-threaded (see placement.engine_threads).
Services see the engine through `info` (fixed) and `stats()` (a snapshot), never its parts.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterable

import structlog
import torch

from edgellm.device import device_label
from edgellm.engine.block_manager import BlockManager
from edgellm.engine.errors import EngineBusy, EngineError, NeverFits, SequenceFailed
from edgellm.engine.info import EngineInfo, EngineLimits, EngineStats
from edgellm.engine.kv_cache import PagedKVCache
from edgellm.engine.model import LayerKVHook, LlamaModel
from edgellm.engine.postprocess import FINISH_LENGTH, FINISH_STOP, postprocess
from edgellm.engine.runner import KV, Forward, ModelRunner, OnAdmitKV
from edgellm.engine.sampling_params import SamplingParams
from edgellm.engine.scheduler import Scheduler, SchedulerOutput
from edgellm.engine.sequence import Kind, Sequence, Status
from edgellm.engine.weights import DTYPE_NAMES

log = structlog.get_logger(__name__)

__all__ = ["FINISH_LENGTH", "FINISH_STOP", "EngineLoop", "PrefillResult"]

# (token, finish_reason) for each sampled token; (None, "error") if the engine failed.
Emit = Callable[[int | None, str | None], None]


@dataclass
class PrefillResult:
    first_token_id: int
    finish_reason: str | None  # set when the first token already ends the request
    num_prompt_tokens: int
    forward_start_unix_ns: int
    forward_end_unix_ns: int


@dataclass(frozen=True)
class _Submission:
    seq: Sequence
    emit: Emit
    on_layer_kv: LayerKVHook | None
    staged_kv: KV | None
    prefix_kv: KV | None


class EngineLoop:
    def __init__(
        self,
        model: LlamaModel,
        eos_token_ids: frozenset[int],
        limits: EngineLimits,
        num_threads: int = 0,
        weights_label: str = "",
        cuda_graphs: bool = True,
        forward: Forward | None = None,
        on_admit_kv: OnAdmitKV | None = None,
    ):
        """The engine runs on the device the model's weights are on. weights_label: what
        `edgellm status` shows (default: the weights' dtype name). cuda_graphs: on CUDA, replay
        decode steps as graphs (cuda_graphs.py). forward, on_admit_kv: a pipeline-parallel
        decode unit's stage 0 (parallel/pipeline.py): the model holds only stage 0's layers, the
        cache only theirs, and `forward` carries each batch through the other stages."""
        self.eos_token_ids = eos_token_ids
        self.num_threads = num_threads  # torch threads of the engine thread; 0 = leave as is
        a = model.arch
        dtype, device = model.norm.weight.dtype, model.norm.weight.device
        self.blocks = BlockManager(limits.num_blocks, limits.block_size)
        self.cache = PagedKVCache(len(model.layers), limits.num_blocks, limits.block_size, a.num_kv_heads, a.head_dim, dtype,
                                  device)
        self.runner = ModelRunner(model, self.cache, self.blocks, limits.max_running, cuda_graphs, forward, on_admit_kv)
        self.scheduler = Scheduler(self.blocks, limits.max_batch_tokens, limits.max_running, limits.max_consecutive_prefills)
        self.info = EngineInfo(
            device=device_label(device),
            num_threads=num_threads or torch.get_num_threads(),
            dtype=DTYPE_NAMES[dtype],
            weights_label=weights_label or DTYPE_NAMES[dtype],
            weight_bytes=model.weight_bytes(),
            num_layers=a.num_layers,
            num_kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            vocab_size=a.vocab_size,
            max_context=a.max_position_embeddings,
            num_kv_blocks=limits.num_blocks,
            kv_block_size=limits.block_size,
            max_running=limits.max_running,
            max_waiting=limits.max_waiting,
        )
        self.num_steps = 0
        self.num_preemptions = 0
        self.max_decode_batch = 0
        self._seq_ids = itertools.count()
        self._emits: dict[int, Emit] = {}  # seq_id -> output callback; engine thread only
        self._inbox: collections.deque[_Submission] = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self.takeover_gather_s = limits.takeover_gather_s
        self._last_takeover_at = 0.0  # time.monotonic() of the newest takeover submitted
        self._warm = threading.Event()
        self._step_error = ""  # why the last failed step failed (its sequences' EngineError says it)
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

    @property
    def has_work(self) -> bool:
        """Submitted sequences not finished yet (for callers that drive step() themselves)."""
        return bool(self._inbox) or self.scheduler.has_work

    def stats(self) -> EngineStats:
        """A snapshot of the engine's load; safe to call from any thread."""
        return EngineStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_free_kv_blocks=self.blocks.num_free_blocks,
            num_steps=self.num_steps,
            num_preemptions=self.num_preemptions,
            max_decode_batch=self.max_decode_batch,
        )

    # ---- submitting work (any thread) ------------------------------------------------------
    def new_sequence(
        self, request_id: str, kind: Kind, token_ids: list[int], sampling: SamplingParams, max_new_tokens: int,
        num_generated: int = 0,
    ) -> Sequence:
        """A Sequence with an engine-unique seq_id; token_ids ends with its num_generated tokens."""
        return Sequence(next(self._seq_ids), request_id, kind, list(token_ids), len(token_ids) - num_generated,
                        sampling, max_new_tokens, num_generated=num_generated)

    def submit(
        self,
        seq: Sequence,
        emit: Emit,
        on_layer_kv: LayerKVHook | None = None,
        staged_kv: KV | None = None,
        prefix_kv: KV | None = None,
    ) -> None:
        """Queue seq for the engine thread. emit(token, finish_reason) then runs on the engine
        thread for each sampled token, emit(None, "error") if a step fails or this sequence
        alone fails (then seq.error says why); set seq.cancelled
        to stop it. staged_kv (FROM_KV, required there): the prompt's K/V from a prefill
        service, [L, Hkv, P, D] each. prefix_kv (LOCAL, PREFILL_ONLY): K/V of the first C tokens kept
        from an earlier prefill here, ignored if it covers every token to prefill. on_layer_kv: where
        each layer's K/V of the prefill goes."""
        if (seq.kind is Kind.FROM_KV) != (staged_kv is not None):
            raise ValueError("staged_kv is required for a FROM_KV sequence, and only there")
        num_prefix = 0 if prefix_kv is None else prefix_kv[0].shape[2]
        if seq.kind is Kind.FROM_KV or num_prefix >= seq.num_tokens:
            prefix_kv, num_prefix = None, 0  # a prefix covering every token to prefill would leave none to run
        seq.has_staged_kv = staged_kv is not None
        seq.num_prefix_tokens = num_prefix
        with self._wake:
            self._inbox.append(_Submission(seq, emit, on_layer_kv, staged_kv, prefix_kv))
            if seq.is_takeover:
                self._last_takeover_at = time.monotonic()
            self._wake.notify()

    def check_fits(self, num_tokens: int) -> None:
        """Raise NeverFits if a sequence of num_tokens could never fit in the KV cache."""
        needed = self.blocks.num_blocks_for(num_tokens)
        if needed > self.blocks.num_blocks:
            raise NeverFits(
                f"request needs {needed} KV blocks ({num_tokens} tokens); "
                f"this engine's cache has {self.blocks.num_blocks}"
            )

    def check_room(self) -> None:
        """Raise EngineBusy if the queue already holds info.max_waiting sequences (services call
        this at their door, before accepting a request)."""
        if self.num_waiting >= self.info.max_waiting:
            raise EngineBusy(f"engine queue is full: {self.num_waiting} sequences waiting "
                             f"(max_waiting_sequences={self.info.max_waiting})")

    # ---- asyncio-facing API ----------------------------------------------------------------
    async def prefill(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        on_layer_kv: LayerKVHook,
        num_generated: int = 0,
        prefix_kv: KV | None = None,
    ) -> PrefillResult:
        """Prefill only: the K/V of every token computed goes to on_layer_kv layer by layer;
        returns the token sampled next (index num_generated: token_ids ends with the tokens a
        failed decode service already produced, when this is a takeover). With prefix_kv (K/V
        of the first C tokens, kept from an earlier prefill here) only the tokens after them are
        computed, and on_layer_kv gets theirs alone."""
        seq = self.new_sequence(request_id, Kind.PREFILL_ONLY, token_ids, sampling, max_new_tokens, num_generated)
        async for token, finish in self._stream(seq, on_layer_kv=on_layer_kv, prefix_kv=prefix_kv):
            return PrefillResult(token, finish, len(token_ids), seq.forward_start_unix_ns, seq.forward_end_unix_ns)
        raise EngineError(f"prefill of {request_id} produced no token")

    def generate(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        max_new_tokens: int,
        num_generated: int = 0,
        staged_kv: KV | None = None,
        prefix_kv: KV | None = None,
    ) -> AsyncIterator[tuple[int, str | None]]:
        """Yield (token_id, finish_reason) for token index num_generated onwards.

        token_ids ends with the num_generated tokens already produced elsewhere. With
        staged_kv (the prompt's K/V from a prefill service, [L, Hkv, P, D] each) no prefill
        runs here. With prefix_kv (K/V of the first C tokens, kept from an earlier prefill
        here) the prefill computes only the tokens after them. Leaving the iteration early
        (client gone) frees the sequence's blocks.
        """
        kind = Kind.FROM_KV if staged_kv is not None else Kind.LOCAL
        seq = self.new_sequence(request_id, kind, token_ids, sampling, max_new_tokens, num_generated)
        return self._stream(seq, staged_kv=staged_kv, prefix_kv=prefix_kv)

    async def _stream(
        self, seq: Sequence, on_layer_kv: LayerKVHook | None = None, staged_kv: KV | None = None,
        prefix_kv: KV | None = None,
    ) -> AsyncIterator[tuple[int, str | None]]:
        if seq.kind is not Kind.PREFILL_ONLY:
            self.check_fits(seq.num_prompt_tokens + seq.max_new_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        self.submit(seq, lambda token, finish: loop.call_soon_threadsafe(queue.put_nowait, (token, finish)),
                    on_layer_kv, staged_kv, prefix_kv)
        try:
            while True:
                token, finish = await queue.get()
                if token is None:
                    if seq.error is not None:
                        raise SequenceFailed(f"{seq.request_id}: {seq.error}")
                    raise EngineError(f"an engine step failed while running {seq.request_id}: {self._step_error}")
                yield token, finish
                if finish is not None:
                    return
        finally:
            seq.cancelled = True  # no-op once finished; otherwise the next step frees its blocks
            with self._wake:
                self._wake.notify()

    # ---- engine thread ---------------------------------------------------------------------
    def _warm_up(self) -> None:
        """A short prefill and a decode step, so the first request does not pay for torch's
        lazy initialisation (kernel selection, allocator growth): ~1.5 s on the CPU here."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        n = max(1, min(16, self.blocks.num_blocks * self.blocks.block_size - 1))
        seq = self.new_sequence("warm-up", Kind.LOCAL, [0] * n, SamplingParams(), 2)
        seq.block_table = self.blocks.allocate(n + 1)
        self.runner.prefill([seq])
        seq.num_cached_tokens = n
        seq.token_ids.append(0)
        seq.num_generated = 1
        self.runner.decode([seq])
        self.blocks.free(seq.block_table)

    def _run(self) -> None:
        try:
            self._warm_up()
        except Exception:  # noqa: BLE001 - a cold engine still serves; a broken one fails its steps
            log.exception("engine_warm_up_failed")
        finally:
            self._warm.set()
        while True:
            with self._wake:
                while not self._stopped and not self._inbox and not self._has_runnable_work():
                    self._wake.wait(timeout=0.05)
                if self._stopped:
                    return
                self._gather_takeovers()
            if self.step().is_empty:  # waiting for blocks or a cancellation: nothing to compute yet
                with self._wake:
                    self._wake.wait(timeout=0.05)

    def _gather_takeovers(self) -> None:
        """When a decode service fails, the gateway moves each of its streams here as it sees that
        stream's path fail: they arrive within milliseconds of each other. Wait until they stop
        coming (takeover_gather_s without one, 4x that at most) so that one packed prefill takes
        them all, instead of the first running alone while the rest queue behind its pass.
        Called on the engine thread with self._wake held; returns at once without a takeover."""
        if not any(sub.seq.is_takeover for sub in self._inbox):
            return
        give_up_at = time.monotonic() + 4 * self.takeover_gather_s
        while not self._stopped:
            until = min(self._last_takeover_at + self.takeover_gather_s, give_up_at)
            now = time.monotonic()
            if now >= until:
                return
            self._wake.wait(until - now)

    def step(self) -> SchedulerOutput:
        """One engine iteration: take new sequences, schedule, run, postprocess.
        Runs on the engine thread (tests call it directly on an engine that was not started)."""
        with self._wake:
            while self._inbox:
                self._take(self._inbox.popleft())
        out = self.scheduler.schedule()
        self._release(out.finished_seq_ids)
        if out.is_empty:
            return out
        self.num_steps += 1
        self.num_preemptions += len(out.preempted)
        self.max_decode_batch = max(self.max_decode_batch, len(out.decodes))
        ran = out.prefills + out.decodes + out.admitted_from_kv
        started = time.perf_counter()
        try:
            result = self.runner.execute(out)
            log.debug("engine_step", num_prefills=len(out.prefills), num_decodes=len(out.decodes),
                      num_admitted=len(out.admitted_from_kv),
                      num_computed_tokens=sum(s.num_tokens - s.num_prefix_tokens for s in out.prefills),
                      ms=round(1e3 * (time.perf_counter() - started), 1))
            for o in postprocess(self.scheduler, out, result, self.eos_token_ids, self.info.max_context):
                self._emits[o.seq.seq_id](o.token_id, o.finish_reason)
        except Exception as e:
            log.exception("engine_step_failed")
            self._step_error = f"{type(e).__name__}: {e}"
            for seq in ran:
                if seq.status is not Status.FINISHED:
                    self._emits[seq.seq_id](None, "error")
                self.scheduler.finish(seq)
        self._release(seq.seq_id for seq in ran if seq.status is Status.FINISHED)
        return out

    def _take(self, sub: _Submission) -> None:
        seq_id = sub.seq.seq_id
        self._emits[seq_id] = sub.emit
        if sub.on_layer_kv is not None:
            self.runner.set_layer_hook(seq_id, sub.on_layer_kv)
        if sub.staged_kv is not None:
            self.runner.stage_kv(seq_id, *sub.staged_kv)
        if sub.prefix_kv is not None:
            self.runner.set_prefix(seq_id, *sub.prefix_kv)
        self.scheduler.add(sub.seq)

    def _release(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            self._emits.pop(seq_id, None)
            self.runner.release(seq_id)

    def _has_runnable_work(self) -> bool:
        s = self.scheduler
        return bool(s.running) or any(q.cancelled or q.needs_prefill or q.has_staged_kv for q in s.waiting)
