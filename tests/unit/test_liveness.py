"""The gateway's probe (services/gateway/liveness.py) against a real gRPC server behind a TCP
proxy: a live service is left alone, a cut link (no reset, no close) is found within the probe's
quiet time + deadline."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from edgellm.linkproxy import LinkProxy
from edgellm.rpc.channels import ChannelPool
from services.gateway.liveness import LivenessProber


@pytest.fixture
async def proxied_server():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    proxy = LinkProxy(f"127.0.0.1:{port}")
    await proxy.start()
    yield proxy
    proxy.restore()
    await server.stop(0)


async def test_a_live_service_is_probed_and_left_alone_and_a_cut_link_is_found_fast(proxied_server):
    channels = ChannelPool()
    # a deadline wider than the default: server and prober share this test's event loop
    prober = LivenessProber(channels, after_ms=50, timeout_ms=400)
    address = proxied_server.address
    signal = prober.dead_signal(address)
    try:
        with prober.watch(address):  # a call in flight that reads nothing: only the probes talk
            await asyncio.sleep(1.0)
            assert not signal.is_set()  # a probe after every 50 ms of quiet, each answered
            cut_at = time.monotonic()
            proxied_server.cut()
            await asyncio.wait_for(signal.wait(), timeout=5)
            found_s = time.monotonic() - cut_at
        assert found_s < 1.5, found_s  # 50 ms quiet + 400 ms deadline, with slack for a loaded machine
        assert prober.dead_signal(address) is not signal  # later calls get a fresh signal
    finally:
        await channels.close()


async def test_no_probe_runs_without_a_call_in_flight(proxied_server):
    channels = ChannelPool()
    prober = LivenessProber(channels, after_ms=20, timeout_ms=100)
    address = proxied_server.address
    try:
        proxied_server.cut()  # nobody would answer, but nothing is asked of the service
        await asyncio.sleep(0.3)
        assert not prober.dead_signal(address).is_set() and not prober._probes
        with prober.watch(address):
            await asyncio.wait_for(prober.dead_signal(address).wait(), timeout=5)
        await asyncio.sleep(0.05)
        assert not prober._probes  # the probe task ends with the last call
    finally:
        await channels.close()
