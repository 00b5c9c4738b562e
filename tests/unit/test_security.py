"""edgellm/rpc/security.py: files, the loopback rule, the interceptors on a real in-process
grpc.aio server, and prefill's decode allowlist (services/prefill/routes.py)."""

from __future__ import annotations

import asyncio
import os
import stat

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgellm import config as cfg
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.security import (
    CLUSTER_TOKEN_KEY, OPEN, ClusterSecurity, SecurityError, aio_channel, api_key_interceptor, cluster_interceptor,
    is_loopback, parse_api_keys, read_api_keys, read_cluster_token, write_cluster_token,
)
from edgellm.v1 import common_pb2, monitor_pb2, monitor_pb2_grpc
from services.prefill.routes import DecodeRoutes


def test_api_keys_file_one_key_a_line_without_blanks_and_comments(tmp_path):
    assert parse_api_keys("# keys\n\n  alpha  \nbeta\n# gamma\n\t\n") == {"alpha", "beta"}
    path = tmp_path / "keys"
    path.write_text("alpha\n")
    assert read_api_keys(str(path)) == {"alpha"}
    assert read_api_keys("") == frozenset()  # no file: the door is open
    path.write_text("# only a comment\n\n")
    with pytest.raises(SecurityError, match="--api-keys-file .* holds no key"):
        read_api_keys(str(path))
    with pytest.raises(SecurityError, match="--api-keys-file"):
        read_api_keys(str(tmp_path / "missing"))


def test_cluster_token_file(tmp_path):
    path = str(tmp_path / "token")
    token = write_cluster_token(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_cluster_token(path) == token and len(token) >= 32
    assert read_cluster_token("") == ""
    for bad, message in (("", "is empty"), ("\n  \n", "is empty"), ("two words", "one line")):
        with open(path, "w") as f:
            f.write(bad)
        with pytest.raises(SecurityError, match=message):
            read_cluster_token(path)
    with pytest.raises(SecurityError, match="--cluster-token-file"):
        read_cluster_token(str(tmp_path / "missing"))


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.4", False), ("prefill", False), ("", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) == loopback


def test_open_internal_rpcs_only_on_loopback():
    OPEN.check_listen("decode", "127.0.0.1")
    with pytest.raises(SecurityError, match="--cluster-token-file") as e:
        OPEN.check_listen("decode", "0.0.0.0")
    assert "decode" in str(e.value) and "0.0.0.0" in str(e.value)
    ClusterSecurity(token="t").check_listen("decode", "0.0.0.0")


def test_for_service_reads_the_files_and_spares_the_gateway(tmp_path):
    path = str(tmp_path / "token")
    token = write_cluster_token(path)
    config = cfg.parse(["--host", "0.0.0.0", "--cluster-token-file", path], env={})
    assert ClusterSecurity.for_service(config, "monitor").metadata == ((CLUSTER_TOKEN_KEY, token),)
    open_config = cfg.parse(["--host", "0.0.0.0"], env={})
    with pytest.raises(SecurityError, match="--cluster-token-file"):
        ClusterSecurity.for_service(open_config, "prefill")
    assert ClusterSecurity.for_service(open_config, "gateway") == OPEN  # no internal RPCs of its own


def test_interceptor_rules():
    door = cluster_interceptor("s3cret")
    assert door.allows("/edgellm.v1.Decode/PushKV", [(CLUSTER_TOKEN_KEY, "s3cret")])
    assert not door.allows("/edgellm.v1.Decode/PushKV", [(CLUSTER_TOKEN_KEY, "s3cre")])
    assert not door.allows("/edgellm.v1.Decode/PushKV", [])
    assert not door.allows("/edgellm.v1.Decode/PushKV", None)
    assert door.allows("/grpc.health.v1.Health/Check", None)
    assert door.allows("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None)
    keys = api_key_interceptor({"k1", "k2"})
    assert keys.allows("/edgellm.v1.Gateway/Generate", [("authorization", "Bearer k2")])
    assert not keys.allows("/edgellm.v1.Gateway/Generate", [("authorization", "k2")])
    assert not keys.allows("/edgellm.v1.Gateway/Generate", [("authorization", "Bearer k3")])
    assert not keys.allows("/edgellm.v1.Gateway/Generate", [(CLUSTER_TOKEN_KEY, "k1")])


class FakeMonitor(monitor_pb2_grpc.MonitorServicer):
    async def WatchRoutes(self, request, context):
        for version in (1, 2):
            yield monitor_pb2.RouteTable(version=version)

    async def GetStatus(self, request, context):
        return monitor_pb2.RouteTable(version=7)


async def start_server(interceptors):
    server = grpc.aio.server(interceptors=interceptors)
    monitor_pb2_grpc.add_MonitorServicer_to_server(FakeMonitor(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_cluster_credential_on_a_real_server():
    server, address = await start_server([cluster_interceptor("s3cret")])
    try:
        for channel in (grpc.aio.insecure_channel(address), ClusterSecurity(token="wrong").channel(address)):
            async with channel:
                stub = monitor_pb2_grpc.MonitorStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GetStatus(monitor_pb2.GetStatusRequest())
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    [t async for t in stub.WatchRoutes(monitor_pb2.WatchRoutesRequest())]
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "--cluster-token-file" in e.value.details()
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING  # probes need no credential
        pool = ChannelPool(ClusterSecurity(token="s3cret"))  # every call of every kind carries it
        stub = monitor_pb2_grpc.MonitorStub(pool.get(address))
        assert (await stub.GetStatus(monitor_pb2.GetStatusRequest())).version == 7
        assert [t.version async for t in stub.WatchRoutes(monitor_pb2.WatchRoutesRequest())] == [1, 2]
        await pool.close()
    finally:
        await server.stop(None)


async def test_api_keys_on_a_real_server():
    server, address = await start_server([api_key_interceptor({"k1"})])
    try:
        for metadata, ok in ((None, False), ((("authorization", "Bearer nope"),), False),
                             ((("authorization", "Bearer k1"),), True)):
            async with aio_channel(address, metadata or ()) as channel:
                call = monitor_pb2_grpc.MonitorStub(channel).GetStatus(monitor_pb2.GetStatusRequest())
                if ok:
                    assert (await call).version == 7
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)


def table(*decodes: str, healthy: bool = True) -> monitor_pb2.RouteTable:
    services = [monitor_pb2.ServiceState(address="p:1", role=common_pb2.SERVICE_ROLE_PREFILL, healthy=True)]
    services += [monitor_pb2.ServiceState(address=a, role=common_pb2.SERVICE_ROLE_DECODE, healthy=healthy)
                 for a in decodes]
    return monitor_pb2.RouteTable(services=services)


async def test_prefill_admits_only_decode_services_of_the_table():
    routes = DecodeRoutes(first_table_wait_s=0.05)
    assert not await routes.admits("d:1")  # no table yet (after a short wait)
    waiting = asyncio.create_task(DecodeRoutes.admits(routes, "d:1"))
    assert routes.apply(table("d:1", "d:2"))
    assert await waiting
    assert await routes.admits("d:2")
    assert not await routes.admits("p:1")  # a prefill service is no decode service
    assert not await routes.admits("evil:666")
    assert not routes.apply(table("d:1", "d:2", healthy=False))  # down, still a decode service of the table
    assert await routes.admits("d:1")
    assert routes.apply(table("d:2"))
    assert not await routes.admits("d:1")


async def test_channel_pool_admits_and_forgets():
    routes = DecodeRoutes(first_table_wait_s=0.05)
    pool = ChannelPool(admit=routes.admits)
    routes.apply(table("127.0.0.1:1", "127.0.0.1:2"))
    assert await pool.admits("127.0.0.1:1") and not await pool.admits("127.0.0.1:3")
    assert await ChannelPool().admits("anywhere:1")  # no policy: a pool for addresses the service chose itself
    first = pool.get("127.0.0.1:1")
    pool.get("127.0.0.1:2")
    pool.forget({"127.0.0.1:2"})
    assert pool.get("127.0.0.1:1") is not first  # closed and dropped: a new one if it comes back
    await pool.close()
