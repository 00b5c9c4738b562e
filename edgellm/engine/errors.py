"""Why the engine refused or failed a request: services map these to gRPC statuses
(rpc/convert.py), and whether the gateway retries elsewhere follows from which one it is."""

from __future__ import annotations


class EngineError(RuntimeError):
    """The engine could not run a request. Raised as is when a whole step failed (a batched
    forward pass): the request may succeed on another engine."""


class NeverFits(EngineError):
    """The request is larger than this engine's whole KV cache: it never fits, here or on an
    engine of the same size; do not retry it."""


class EngineBusy(EngineError):
    """The engine's queue is full now (max_waiting_sequences): another engine may take it."""


class SequenceFailed(EngineError):
    """This request alone failed inside a step (its sampling); the rest of its batch went on."""
