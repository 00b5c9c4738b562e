"""The gateway's door: every check on a GenerateInput that needs no tokenizer and no engine.

Runs first, before the request is logged, tokenized or queued, so a hostile request costs
the gateway no more than reading it: sampling values by the engine's own rules
(SamplingParams), and the sizes and counts of LimitsConfig. Each refusal is an
InvalidRequest naming the field and the limit; a size limit also counts in
edgellm_limit_hits_total{limit=<option>}.
"""

from __future__ import annotations

from edgellm import metrics
from edgellm.config import LimitsConfig
from edgellm.engine.sampling_params import SamplingParams
from services.gateway.errors import InvalidRequest
from services.gateway.request import GenerateInput

ROLES = ("system", "user", "assistant")


def _over(limit: str, message: str) -> InvalidRequest:
    metrics.LIMIT_HITS.labels(limit).inc()
    return InvalidRequest(message)


def check_input(inp: GenerateInput, limits: LimitsConfig) -> None:
    """Raise InvalidRequest unless inp is within the engine's sampling rules and the limits."""
    num_id_bytes = len(inp.request_id.encode())
    if num_id_bytes > limits.max_request_id_bytes:
        raise _over("max_request_id_bytes", f"request_id is {num_id_bytes} bytes; the limit is "
                    f"{limits.max_request_id_bytes} (max_request_id_bytes)")
    s = inp.sampling
    try:  # the engine's own rules, checked at the door
        SamplingParams(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    if inp.seed is not None and not 0 <= inp.seed < 2**64:
        raise InvalidRequest("seed must be in [0, 2^64)")
    if inp.max_tokens < 0:
        raise InvalidRequest("max_tokens must be >= 0")
    if bool(inp.prompt) == bool(inp.messages):
        raise InvalidRequest("give exactly one of prompt or messages")
    if len(inp.messages) > limits.max_messages:
        raise _over("max_messages", f"{len(inp.messages)} messages; the limit is {limits.max_messages} (max_messages)")
    if any(m.role not in ROLES for m in inp.messages):
        raise InvalidRequest("message roles must be system, user or assistant")
    num_prompt_bytes = len(inp.prompt.encode()) + sum(len(m.content.encode()) for m in inp.messages)
    if num_prompt_bytes > limits.max_prompt_bytes:
        raise _over("max_prompt_bytes", f"the prompt is {num_prompt_bytes} bytes; the limit is "
                    f"{limits.max_prompt_bytes} (max_prompt_bytes)")
    if len(inp.stop) > limits.max_stop_strings:
        raise _over("max_stop_strings", f"{len(inp.stop)} stop strings; the limit is {limits.max_stop_strings} "
                    "(max_stop_strings)")
    longest = max((len(x.encode()) for x in inp.stop), default=0)
    if longest > limits.max_stop_bytes:
        raise _over("max_stop_bytes", f"a stop string is {longest} bytes; the limit is {limits.max_stop_bytes} "
                    "(max_stop_bytes)")
