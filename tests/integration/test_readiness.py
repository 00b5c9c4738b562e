"""Gateway readiness through real processes: while the engines load, the gateway reports
NOT_SERVING and a request sent then waits for a route instead of failing; once the monitor
sees an engine healthy the request is answered and the gateway reports SERVING; when every
engine is gone it reports NOT_SERVING again.

The engines are made to start late for real: their processes wait for a gate file, which the
test opens once it has seen the gateway's first health answer and sent its request, so the
order (gateway answering before any engine is up) holds on any machine.
"""

import concurrent.futures
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgellm.client import Client
from edgellm.launch import Stack
from edgellm.v1 import gateway_pb2
from tests.conftest import stack_config

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str, service: str = "") -> int | None:
    """The gateway's health status, or None while it does not answer yet."""
    with grpc.insecure_channel(address) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=0.5).status
        except grpc.RpcError:
            return None


def http_health(stack: Stack, timeout_s: float = 10) -> int:
    """The status of the HTTP API's GET /health (waiting for it to listen: it starts just after gRPC)."""
    url = f"http://127.0.0.1:{stack.config.network.gateway_http_port}/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            assert time.monotonic() < deadline, "the gateway's HTTP API does not listen"
            time.sleep(0.05)


def wait_health(stack: Stack, want: set[int | None], timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while (status := health(stack.address("gateway"))) not in want:
        for name in ("gateway", "monitor"):
            assert stack.procs[name].poll() is None, f"{name} exited with code {stack.procs[name].returncode}"
        assert time.monotonic() < deadline, f"gateway health still {status} after {timeout_s}s"
        time.sleep(0.05)
    return status


def test_gateway_is_not_serving_while_engines_load_and_an_early_request_waits(tiny_model_dir):
    log_dir = tempfile.mkdtemp(prefix="edgellm-stack-")
    gate = os.path.join(log_dir, "engines-may-start")
    wait_for_gate = ["sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.1; done; exec "$@"', gate]
    # The request may wait its whole deadline for a route (the default --route-wait-s, 30 s, is
    # about what the engines take to load on a busy two-core machine).
    stack = Stack(stack_config(tiny_model_dir, route_wait_s="90"), log_dir=log_dir,
                  process_prefix={"prefill": wait_for_gate, "decode": wait_for_gate})
    gateway = stack.address("gateway")
    try:
        stack.start_all()
        first = wait_health(stack, {SERVING, NOT_SERVING}, timeout_s=120)
        assert first == NOT_SERVING, "the gateway must not report SERVING before any engine is up"
        assert health(gateway, gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name) == NOT_SERVING
        assert http_health(stack) == 503  # the HTTP API follows the same rule

        with Client(gateway, timeout_s=90) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.generate_text, prompt="The sea is", max_tokens=8)
            time.sleep(1.0)
            assert not answer.done(), "a request sent with no route must wait for one, not fail"
            assert health(gateway) == NOT_SERVING
            open(gate, "w").close()  # the engines start loading now
            result = answer.result(timeout=120)
        assert result.text and result.completion_tokens > 0
        assert wait_health(stack, {SERVING}, timeout_s=30) == SERVING
        assert http_health(stack) == 200

        stack.kill("prefill")
        stack.kill("decode")  # no engine left: no route
        assert wait_health(stack, {NOT_SERVING}, timeout_s=10) == NOT_SERVING
        assert http_health(stack) == 503
    finally:
        stack.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
