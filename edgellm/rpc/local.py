"""GenerateLocal, shared by both engine services: prefill and decode one request on this engine.

The prefill service runs it in degraded mode (no healthy decode service), the decode service
when no prefill service is healthy; either also resumes a request whose path failed, after
the tokens the client already has.
"""

from __future__ import annotations

from typing import AsyncIterator

import grpc
import structlog
import torch

from edgellm.engine.loop import EngineLoop
from edgellm.logs import bind_request
from edgellm.rpc.convert import check_spec, token_deltas
from edgellm.v1 import common_pb2

log = structlog.get_logger(__name__)


async def generate_local(
    engine: EngineLoop,
    request: common_pb2.GenerateLocalRequest,
    context: grpc.aio.ServicerContext,
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> AsyncIterator[common_pb2.TokenDelta]:
    """prefix_kv: the K/V of the request's first tokens, kept here from its prefill (hot backup)."""
    spec = request.spec
    bind_request(spec.request_id)
    sampling = await check_spec(context, spec, engine)
    log.info("local_generate", num_prompt_tokens=len(spec.prompt_token_ids), num_generated=spec.num_generated,
             kept_kv_tokens=0 if prefix_kv is None else prefix_kv[0].shape[2])
    tokens = engine.generate(
        spec.request_id,
        list(spec.prompt_token_ids),
        sampling,
        spec.max_new_tokens,
        spec.num_generated,
        prefix_kv=prefix_kv,
    )
    async for delta in token_deltas(spec.request_id, tokens, context):
        yield delta
