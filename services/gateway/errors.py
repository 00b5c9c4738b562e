"""How a request fails, in the pipeline's own words.

The request pipeline (pipeline.py and what it calls) raises only these; each front end maps
them to its status codes (servicer.py: gRPC; http.py: HTTP), so no transport's error type
reaches into the pipeline. The message is meant for the client as is.
"""

from __future__ import annotations

import grpc


class GatewayError(Exception):
    """A request that ends with an error, not with text; `message` is for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(GatewayError):
    """The request itself is wrong (sampling out of range, no prompt, too long): do not retry it."""


class ResourceExhausted(GatewayError):
    """The gateway is full (its prefill queue): retry later."""


class RateLimited(GatewayError):
    """The caller is over its request or token budget (rate_limit.py). `limit` names the option
    (rate_limit_rpm, rate_limit_tpm); `headers` are the facts for the client: retry-after and
    x-ratelimit-* (HTTP headers, gRPC trailing metadata)."""

    def __init__(self, message: str, limit: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.limit, self.headers = limit, headers


class Unavailable(GatewayError):
    """No service could run the request (none healthy within the route wait, or a failed
    service with migration off): retry later."""


class DeadlineExceeded(GatewayError):
    """The request's deadline passed before it could run."""


class UpstreamError(GatewayError):
    """A prefill or decode service ended the request with a status migration cannot fix
    (it refused the request, or the request ran out of time there): passed on as it came."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"generation failed upstream: {details}")
        self.code, self.details = code, details
