"""The gateway's request pipeline, free of any transport: GenerateInput in, events out.

Lifecycle of a request:
  validate (limits.py: sampling, sizes and counts, before any work) -> the caller's request
  and token budgets (rate_limit.py) -> tokenize on the pipeline's tokenizer thread, never on
  the event loop (prompt as is, or messages through the chat template) -> prefill pool
  (pools.py: bounded queue, deadline; the prompt's tokens are charged to the caller once it
  has its slot, its completion tokens when it ends, however it ends) -> tokens (migration.py: route, run on
  the engine services, move on failure) -> text deltas (text.py: incremental
  detokenization, stop strings) -> one Finished event with finish_reason, usage and timings,
  and the request's metrics.
A request that cannot be served raises a GatewayError (errors.py) before or between events;
a front end maps it to its own status. A consumer that stops iterating (a client that
cancels, or a stop string) closes the token stream, which cancels the upstream calls and
frees the request's KV blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import time
import uuid
from typing import Any, AsyncIterator

import structlog

from edgellm import metrics
from edgellm.config import GatewayConfig, LimitsConfig
from edgellm.config import parse as parse_config
from edgellm.logs import bind_request
from services.gateway.chat import ChatTokenizer
from services.gateway.errors import GatewayError, InvalidRequest, RateLimited
from services.gateway.limits import check_input
from services.gateway.migration import Migrator
from services.gateway.pools import Pools
from services.gateway.rate_limit import RateLimiter
from services.gateway.request import (
    ANONYMOUS, Caller, Event, Finished, GenerateInput, Request, TextDelta, Timings, Usage,
)
from services.gateway.text import TextStream

log = structlog.get_logger(__name__)


class Pipeline:
    """Runs requests through pools and migrator; one per gateway process, shared by its front ends."""

    def __init__(self, tokenizer: Any, max_context: int, pools: Pools, migrator: Migrator, cfg: GatewayConfig,
                 limits: LimitsConfig | None = None) -> None:
        """limits: the request size bounds (None: the defaults of the options)."""
        self.tokenizer = tokenizer
        self.chat = ChatTokenizer(tokenizer)
        self.max_context = max_context
        self.pools = pools
        self.migrator = migrator
        self.cfg = cfg
        self.limits = limits or parse_config([], env={}).limits
        self.limiter = RateLimiter(cfg.rate_limit_rpm, cfg.rate_limit_tpm)
        # One thread tokenizes every prompt: a large one never blocks the event loop, and the
        # (not thread-safe) tokenizers are never used by two threads at once for encoding.
        self._tokenize_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    async def generate(self, inp: GenerateInput, timeout_s: float | None = None,
                       caller: Caller = ANONYMOUS) -> AsyncIterator[Event]:
        """TextDelta events, then one Finished. timeout_s: the client's time left (None: none);
        the gateway's --request-timeout-s bounds it too. caller: whose budgets it uses.
        Raises GatewayError (RateLimited over a budget)."""
        received = time.monotonic()
        check_input(inp, self.limits)  # before the label is logged: it is bounded there
        try:
            self.limiter.admit(caller.id)
        except RateLimited as e:
            metrics.RATE_LIMITED.labels(caller.key_label, e.limit).inc()
            raise
        metrics.KEY_REQUESTS.labels(caller.key_label).inc()
        request_id = inp.request_id or uuid.uuid4().hex
        bind_request(request_id)
        req = await self._accept(inp, request_id, timeout_s)
        try:
            await self.pools.enter_prefill(req.timeout())
        except GatewayError as e:  # ResourceExhausted, DeadlineExceeded
            log.warning("request_refused", error=type(e).__name__, reason=e.message)
            raise
        log.info("request_accepted", upstream_id=req.upstream_id, num_prompt_tokens=len(req.prompt_token_ids),
                 max_new_tokens=req.max_new_tokens)
        self._charge(caller, "prompt", len(req.prompt_token_ids))
        first_token_at: float | None = None
        try:
            text = TextStream(self.tokenizer, list(inp.stop))
            finish = "length"
            # Closing the token stream (a stop string, or the consumer went away) cancels the upstream call.
            async with contextlib.aclosing(self.migrator.tokens(req)) as tokens:
                async for token, token_finish in tokens:
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                    req.generated.append(token)
                    delta = text.add(token)
                    if text.stopped:
                        finish = "stop"
                    elif token_finish is not None:
                        finish = token_finish
                        delta += text.flush()
                    yield TextDelta(req.request_id, delta, [token])
                    if text.stopped or token_finish is not None:
                        break
        finally:
            if req.decode_pool is None:
                self.pools.leave_prefill()
            else:
                self.pools.leave_decode(req.decode_pool)
            self._charge(caller, "completion", len(req.generated))
        yield self._finished(req, finish, received, first_token_at)

    async def _accept(self, inp: GenerateInput, request_id: str, timeout_s: float | None) -> Request:
        """The request as the gateway tracks it (input already checked); raises InvalidRequest."""
        if inp.messages and not self.tokenizer.chat_template:
            raise InvalidRequest("this model has no chat template: send prompt instead")
        loop = asyncio.get_running_loop()
        prompt_ids = await loop.run_in_executor(self._tokenize_thread, self._tokenize, inp)
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise InvalidRequest(
                f"prompt is {len(prompt_ids)} tokens; the model's context is {self.max_context} tokens")
        room = self.max_context - len(prompt_ids)
        if inp.max_tokens > room:  # OpenAI style: an explicit max_tokens that cannot fit is an error
            raise InvalidRequest(
                f"max_tokens is {inp.max_tokens}, but the model's context of {self.max_context} tokens leaves "
                f"{room} after the prompt's {len(prompt_ids)}")
        limits = [t for t in (timeout_s, self.cfg.request_timeout_s or None) if t is not None]
        return Request(
            request_id=request_id,
            upstream_id=uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            sampling=inp.sampling,
            seed=inp.seed if inp.seed is not None else random.getrandbits(63),
            # The server default is capped silently: generation also ends at the context's end
            # (finish_reason "length").
            max_new_tokens=min(inp.max_tokens or self.cfg.default_max_tokens, room),
            deadline=time.monotonic() + min(limits) if limits else None,
        )

    def _charge(self, caller: Caller, kind: str, num_tokens: int) -> None:
        self.limiter.charge(caller.id, num_tokens)
        metrics.KEY_TOKENS.labels(caller.key_label, kind).inc(num_tokens)

    def _tokenize(self, inp: GenerateInput) -> list[int]:
        """On the tokenizer thread."""
        if inp.prompt:
            return list(self.tokenizer(inp.prompt)["input_ids"])
        return self.chat.token_ids([(m.role, m.content) for m in inp.messages])

    def _finished(self, req: Request, finish: str, received: float, first_token_at: float | None) -> Finished:
        """The last event, and the request's metrics."""
        num_prompt, num_generated = len(req.prompt_token_ids), len(req.generated)
        done = time.monotonic()
        ttft = (first_token_at - received) * 1000 if first_token_at else 0.0
        tpot = (done - first_token_at) * 1000 / (num_generated - 1) if first_token_at and num_generated > 1 else 0.0
        log.info("request_finished", finish_reason=finish, completion_tokens=num_generated, ttft_ms=round(ttft, 1))
        metrics.REQUESTS.labels(finish).inc()
        metrics.PROMPT_TOKENS.inc(num_prompt)
        metrics.GENERATED_TOKENS.inc(num_generated)
        metrics.TTFT.observe(ttft / 1000)
        if num_generated > 1:
            metrics.TPOT.observe(tpot / 1000)
        return Finished(req.request_id, finish, Usage(num_prompt, num_generated), Timings(ttft, tpot))
