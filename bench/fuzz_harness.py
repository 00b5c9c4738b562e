"""Sending fuzzed input to a real stack and judging what comes back (bench/fuzz.py, tests/integration/test_fuzz.py).

The properties, checked for every input:
  clear status   the call ends OK (a Generate stream with finish_reason "stop" or "length") or with a
                 status other than UNKNOWN/INTERNAL that says why (non-empty details); never a hang
                 (each call has a deadline: DEADLINE_EXCEEDED counts as a hang);
and once, at the end (or whenever asked):
  no dead service     every process of the stack is alive and the monitor sees every service healthy;
  undisturbed         GoodTraffic, a thread that keeps sending well-formed greedy requests while the
                      fuzzing runs, got each time exactly the tokens of that request's solo run.

Internal calls (PushKV, Decode) go through `internal_channel`, the one place that knows how an
internal caller presents the cluster credential.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
from typing import Any

import grpc

from bench.fuzz_inputs import GOOD_REQUEST_IDS, KVCase
from edgellm.launch import Stack, route_table
from edgellm.v1 import decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc

GENERATE_TIMEOUT_S = 20.0
PUSH_KV_TIMEOUT_S = 15.0
DECODE_TIMEOUT_S = 20.0
UNCLEAR_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


@dataclasses.dataclass(frozen=True)
class Outcome:
    api: str  # "Generate", "PushKV", "Decode"
    code: str  # grpc.StatusCode name
    details: str
    seconds: float
    problem: str = ""  # why this outcome breaks the clear-status property; "" when it does not

    def __str__(self) -> str:
        return f"{self.api}: {self.code} {self.details[:300]!r} ({self.seconds:.2f}s){' -- ' + self.problem if self.problem else ''}"


def judge(api: str, code: grpc.StatusCode, details: str, seconds: float, finish_reason: str | None = None) -> Outcome:
    problem = ""
    if code in UNCLEAR_CODES:
        problem = f"{code.name} is not a clear status"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        problem = "hang: no answer before the client's deadline"
    elif code != grpc.StatusCode.OK and not details.strip():
        problem = f"{code.name} without details"
    elif api == "Generate" and code == grpc.StatusCode.OK and finish_reason not in ("stop", "length"):
        problem = f"OK stream ended with finish_reason {finish_reason!r}"
    return Outcome(api, code.name, details or "", seconds, problem)


def internal_channel(stack: Stack, name: str) -> grpc.Channel:
    """A channel to an internal service that presents the cluster credential, as prefill and the
    gateway do (launch.Stack.channel, issue 13); a plain channel on a stack without one."""
    if hasattr(stack, "channel"):
        return stack.channel(name, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(stack.address(name), options=CHANNEL_OPTIONS)


def monitor_table(stack: Stack) -> Any:
    if hasattr(stack, "route_table"):
        return stack.route_table(timeout_s=5.0)
    return route_table(stack.address("monitor"), timeout_s=5.0)


class FuzzTarget:
    """Sync stubs to one stack's gateway and decode service."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self._gateway_channel = grpc.insecure_channel(stack.address("gateway"), options=CHANNEL_OPTIONS)
        self._decode_channel = internal_channel(stack, "decode")
        self.gateway = gateway_pb2_grpc.GatewayStub(self._gateway_channel)
        self.decode = decode_pb2_grpc.DecodeStub(self._decode_channel)
        self._num_streams = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._gateway_channel.close()
        self._decode_channel.close()

    def generate(self, request: gateway_pb2.GenerateRequest, timeout_s: float = GENERATE_TIMEOUT_S) -> Outcome:
        start = time.monotonic()
        finish_reason = None
        try:
            for reply in self.gateway.Generate(request, timeout=timeout_s):
                finish_reason = reply.finish_reason or finish_reason
        except grpc.RpcError as e:
            return judge("Generate", e.code(), e.details() or "", time.monotonic() - start)
        return judge("Generate", grpc.StatusCode.OK, "", time.monotonic() - start, finish_reason)

    def push_kv(self, case: KVCase) -> list[Outcome]:
        """PushKV the case's chunks; if that succeeds and the case has one, the Decode call that claims the KV."""
        if case.fresh_id:
            with self._lock:
                self._num_streams += 1
                case = case.with_request_id(f"{case.request_id}-{self._num_streams}")
        start = time.monotonic()
        try:
            self.decode.PushKV(iter(case.chunks), timeout=PUSH_KV_TIMEOUT_S)
        except grpc.RpcError as e:
            return [judge("PushKV", e.code(), e.details() or "", time.monotonic() - start)]
        outcomes = [judge("PushKV", grpc.StatusCode.OK, "", time.monotonic() - start)]
        if case.decode is not None:
            start = time.monotonic()
            try:
                for _ in self.decode.Decode(case.decode, timeout=DECODE_TIMEOUT_S):
                    pass
            except grpc.RpcError as e:
                outcomes.append(judge("Decode", e.code(), e.details() or "", time.monotonic() - start))
            else:
                outcomes.append(judge("Decode", grpc.StatusCode.OK, "", time.monotonic() - start))
        return outcomes


def stack_problems(stack: Stack) -> list[str]:
    """Dead processes, and services the monitor does not see healthy (empty: all is well)."""
    problems = [f"{name} exited with code {p.returncode}" for name, p in stack.procs.items() if p.poll() is not None]
    try:
        table = monitor_table(stack)
    except grpc.RpcError as e:
        return problems + [f"monitor GetStatus failed: {e.code().name} {e.details()}"]
    problems += [f"{s.name or s.address} is not healthy in the monitor's table" for s in table.services if not s.healthy]
    return problems


def wait_healthy(stack: Stack, timeout_s: float = 5.0) -> list[str]:
    """stack_problems, after giving a service the monitor just marked down (e.g. a slow health check
    on two busy cores) up to timeout_s to come back."""
    deadline = time.monotonic() + timeout_s
    while (problems := stack_problems(stack)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return problems


# Well-formed greedy requests whose answers must not change while hostile input flows.
GOOD_REQUESTS = (
    gateway_pb2.GenerateRequest(prompt="The harbour master counted the boats at dawn", max_tokens=12, request_id=GOOD_REQUEST_IDS[0]),
    gateway_pb2.GenerateRequest(messages=[gateway_pb2.ChatMessage(role="user", content="Name three rivers.")],
                                max_tokens=12, request_id=GOOD_REQUEST_IDS[1]),
    gateway_pb2.GenerateRequest(prompt="1, 2, 3,", max_tokens=8, stop=["9"], request_id=GOOD_REQUEST_IDS[2]),
)


def run_good(stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GenerateRequest) -> list[int]:
    return [t for reply in stub.Generate(request, timeout=60.0) for t in reply.token_ids]


class GoodTraffic:
    """A background loop of well-formed greedy requests, each compared with its solo run."""

    def __init__(self, stack: Stack) -> None:
        self._channel = grpc.insecure_channel(stack.address("gateway"))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self.references = [run_good(self._stub, r) for r in GOOD_REQUESTS]  # solo: nothing else runs yet
        self.num_runs = 0
        self.disturbed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="good-traffic", daemon=True)

    def start(self) -> "GoodTraffic":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop (idempotent); the counts stay readable."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=90)
        self._channel.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for request, reference in zip(GOOD_REQUESTS, self.references, strict=True):
                try:
                    tokens = run_good(self._stub, request)
                except grpc.RpcError as e:
                    self.disturbed.append(f"{request.request_id}: {e.code().name} {e.details()!r}")
                else:
                    if tokens != reference:
                        self.disturbed.append(f"{request.request_id}: tokens {tokens} != solo {reference}")
                self.num_runs += 1


class Tally:
    """Outcome counts by API and status, and the inputs that broke a property (the first few of each kind)."""

    def __init__(self, max_examples_per_problem: int = 5) -> None:
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.num_inputs: collections.Counter[str] = collections.Counter()
        self.failures: list[dict[str, Any]] = []
        self.reasons: collections.Counter[str] = collections.Counter()  # "API CODE: details, digits as #"
        self._per_problem: collections.Counter[tuple[str, str]] = collections.Counter()
        self._max = max_examples_per_problem

    def add(self, input_api: str, outcomes: list[Outcome], describe: str) -> None:
        self.num_inputs[input_api] += 1
        for o in outcomes:
            self.counts[o.api][o.code] += 1
            if o.code != "OK":
                self.reasons[f"{o.api} {o.code}: {re.sub(r'[0-9]+', '#', o.details[:90])}"] += 1
            if o.problem:
                key = (o.api, o.problem.split(":")[0] + o.details[:60])
                self._per_problem[key] += 1
                if self._per_problem[key] <= self._max:
                    self.failures.append({"api": o.api, "code": o.code, "details": o.details[:500], "problem": o.problem,
                                          "input": describe[:1500]})

    @property
    def num_problems(self) -> int:
        """Outcomes that broke the clear-status property."""
        return sum(self._per_problem.values())

    def count(self, *codes: str) -> int:
        return sum(by_code.get(code, 0) for by_code in self.counts.values() for code in codes)


def describe_request(request: gateway_pb2.GenerateRequest) -> str:
    """A GenerateRequest in a line, long strings cut (a 1 MB prompt is shown by its head and length)."""

    def short(s: str) -> str:
        return repr(s) if len(s) <= 60 else f"{s[:40]!r}...({len(s)} chars)"

    parts = []
    if request.prompt:
        parts.append(f"prompt={short(request.prompt)}")
    if request.messages:
        shown = ", ".join(f"{short(m.role)}:{short(m.content)}" for m in request.messages[:4])
        parts.append(f"messages[{len(request.messages)}]=[{shown}]")
    parts.append(f"max_tokens={request.max_tokens} temperature={request.temperature!r} top_p={request.top_p!r} "
                 f"top_k={request.top_k}")
    if request.HasField("seed"):
        parts.append(f"seed={request.seed}")
    if request.stop:
        parts.append(f"stop[{len(request.stop)}]=[{', '.join(short(s) for s in request.stop[:4])}]")
    parts.append(f"request_id={short(request.request_id)}")
    return " ".join(parts)
