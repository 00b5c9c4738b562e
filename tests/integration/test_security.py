"""Closed doors on real processes: the cluster credential on every internal RPC, API keys at the
gateway, prefill's KV only to decode services of the route table, TLS/mTLS between services,
and no open internal RPCs beyond loopback.

One stack (cluster token made by launch.Stack, --api-keys-file) serves most tests; a second one
runs over mutual TLS with certificates this file generates.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgellm.client import Client, GenerationError
from edgellm.launch import free_port
from edgellm.rpc.security import CLUSTER_TOKEN_KEY
from edgellm.v1 import common_pb2, decode_pb2, decode_pb2_grpc, monitor_pb2, monitor_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tests.conftest import stack_config, start_stack

API_KEYS = ("key-one", "key-two")
SPEC = common_pb2.RequestSpec(request_id="sec-1", prompt_token_ids=list(range(100, 110)), max_new_tokens=2)


@pytest.fixture(scope="module")
def locked_stack(tiny_model_dir, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text("# the gateway's API keys\n\n" + "\n".join(f"  {k}  " for k in API_KEYS) + "\n")
    stack = start_stack(stack_config(tiny_model_dir, api_keys_file=str(keys_file)))
    yield stack
    stack.stop()
    shutil.rmtree(stack.log_dir, ignore_errors=True)


def internal_calls(stack) -> list[tuple[str, str, object]]:
    """(service, method, call(channel, metadata)) for every internal RPC."""
    kv = decode_pb2.KVChunk(request_id="sec-kv", is_last=True, num_prompt_tokens=1)
    local = common_pb2.GenerateLocalRequest(spec=SPEC)
    prefill = prefill_pb2.PrefillRequest(spec=SPEC, decode_address=stack.address("decode"))
    P, D, M = prefill_pb2_grpc.PrefillStub, decode_pb2_grpc.DecodeStub, monitor_pb2_grpc.MonitorStub
    return [
        ("prefill", "Prefill", lambda ch, md: P(ch).Prefill(prefill, timeout=10, metadata=md)),
        ("prefill", "GenerateLocal", lambda ch, md: list(P(ch).GenerateLocal(local, timeout=10, metadata=md))),
        ("prefill", "GetLoad", lambda ch, md: P(ch).GetLoad(common_pb2.GetLoadRequest(), timeout=10, metadata=md)),
        ("decode", "PushKV", lambda ch, md: D(ch).PushKV(iter([kv]), timeout=10, metadata=md)),
        ("decode", "Decode", lambda ch, md: list(D(ch).Decode(decode_pb2.DecodeRequest(spec=SPEC), timeout=10,
                                                              metadata=md))),
        ("decode", "GenerateLocal", lambda ch, md: list(D(ch).GenerateLocal(local, timeout=10, metadata=md))),
        ("decode", "GetLoad", lambda ch, md: D(ch).GetLoad(common_pb2.GetLoadRequest(), timeout=10, metadata=md)),
        ("monitor", "WatchRoutes", lambda ch, md: next(iter(M(ch).WatchRoutes(monitor_pb2.WatchRoutesRequest(),
                                                                               timeout=10, metadata=md)))),
        ("monitor", "GetStatus", lambda ch, md: M(ch).GetStatus(monitor_pb2.GetStatusRequest(), timeout=10,
                                                               metadata=md)),
    ]


@pytest.mark.parametrize("metadata", [None, ((CLUSTER_TOKEN_KEY, "not-the-token"),)], ids=["none", "wrong"])
def test_every_internal_rpc_needs_the_cluster_credential(locked_stack, metadata):
    for service, method, call in internal_calls(locked_stack):
        with grpc.insecure_channel(locked_stack.address(service)) as channel:
            with pytest.raises(grpc.RpcError) as e:
                call(channel, metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (service, method, e.value)
        assert "--cluster-token-file" in e.value.details(), (service, method)


def test_with_the_credential_internal_rpcs_answer(locked_stack):
    with locked_stack.channel("prefill") as channel:
        assert prefill_pb2_grpc.PrefillStub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=10).num_kv_blocks >= 0
    with locked_stack.channel("decode") as channel:
        decode_pb2_grpc.DecodeStub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=10)
    with locked_stack.channel("monitor") as channel:
        stub = monitor_pb2_grpc.MonitorStub(channel)
        assert stub.GetStatus(monitor_pb2.GetStatusRequest(), timeout=10).mode == monitor_pb2.ROUTE_MODE_NORMAL
        assert next(iter(stub.WatchRoutes(monitor_pb2.WatchRoutesRequest(), timeout=10))).version >= 1
    with locked_stack.channel("prefill") as channel:  # a real split request: prefill -> decode with the token
        reply = prefill_pb2_grpc.PrefillStub(channel).Prefill(
            prefill_pb2.PrefillRequest(spec=SPEC, decode_address=locked_stack.address("decode")), timeout=30)
    assert reply.kv.num_chunks >= 1


def test_health_and_reflection_stay_open(locked_stack):
    for name in ("gateway", "prefill", "decode", "monitor"):
        with grpc.insecure_channel(locked_stack.address(name)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
            listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = [s.name for r in listing for s in r.list_services_response.service]
            assert "grpc.health.v1.Health" in names, (name, names)


def test_prefill_sends_kv_only_to_decode_services_of_the_route_table(locked_stack):
    stranger = f"127.0.0.1:{free_port()}"
    with locked_stack.channel("prefill") as channel:
        with pytest.raises(grpc.RpcError) as e:
            prefill_pb2_grpc.PrefillStub(channel).Prefill(
                prefill_pb2.PrefillRequest(spec=SPEC, decode_address=stranger), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stranger in e.value.details()


@pytest.mark.parametrize("api_key", [None, "", "key-three", "key-one "], ids=["none", "empty", "wrong", "padded"])
def test_generate_needs_an_api_key(locked_stack, api_key, monkeypatch):
    monkeypatch.delenv("EDGELLM_API_KEY", raising=False)
    with Client(locked_stack.address("gateway"), timeout_s=30, api_key=api_key) as client:
        with pytest.raises(GenerationError) as e:
            client.generate_text(prompt="Let me in", max_tokens=2)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in e.value.details


@pytest.mark.parametrize("key", API_KEYS)
def test_generate_with_an_api_key_answers(locked_stack, key, monkeypatch):
    monkeypatch.delenv("EDGELLM_API_KEY", raising=False)
    with Client(locked_stack.address("gateway"), timeout_s=30, api_key=key) as client:
        assert client.generate_text(prompt="Let me in", max_tokens=2, temperature=0).completion_tokens >= 1
    monkeypatch.setenv("EDGELLM_API_KEY", key)  # the SDK's default
    with Client(locked_stack.address("gateway"), timeout_s=30) as client:
        assert client.generate_text(prompt="Let me in", max_tokens=2, temperature=0).completion_tokens >= 1


def test_cli_generate_sends_its_api_key(locked_stack):
    env = {k: v for k, v in os.environ.items() if k != "EDGELLM_API_KEY"}
    argv = [sys.executable, "-m", "edgellm", "generate", "Hi", "--max-tokens", "2", "--gateway",
            locked_stack.address("gateway"), "--timeout-s", "60"]
    refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
    ok = subprocess.run(argv + ["--api-key", API_KEYS[1]], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    ok = subprocess.run(argv, env=env | {"EDGELLM_API_KEY": API_KEYS[0]}, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr


def test_cli_status_reads_the_monitor_with_the_token_file(locked_stack):
    argv = [sys.executable, "-m", "edgellm", "status", "--monitor", locked_stack.address("monitor")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
    refused = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
    ok = subprocess.run(argv + ["--cluster-token-file", locked_stack.config.security.cluster_token_file], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "mode: normal" in ok.stdout, ok.stderr


@pytest.mark.parametrize("service", ["monitor", "prefill"])
def test_a_service_beyond_loopback_without_a_token_refuses_to_start(tiny_model_dir, service):
    argv = [sys.executable, "-m", "edgellm", "serve", service, "--model", tiny_model_dir, "--host", "0.0.0.0",
            f"--{service}-port", str(free_port()), f"--{service}-metrics-port", "0", "--cluster-token-file", ""]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--cluster-token-file" in result.stderr and "0.0.0.0" in result.stderr, result.stderr


# ---- TLS between services -------------------------------------------------------------------

def make_certificates(directory) -> dict[str, str]:
    """A CA and one certificate for 127.0.0.1/localhost that every service presents (server and client)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer_name, issuer_key, is_ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
        if not is_ca:
            builder = (builder
                       .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                                   x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                      critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgellm test CA")])
    ca = cert("edgellm test CA", ca_key, ca_name, ca_key, is_ca=True)
    service = cert("edgellm service", key, ca_name, ca_key, is_ca=False)
    pem = serialization.Encoding.PEM
    files = {
        "tls_ca": ca.public_bytes(pem),
        "tls_cert": service.public_bytes(pem),
        "tls_key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = str(directory / f"{name}.pem")
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths


def test_a_mutual_tls_stack_answers_and_refuses_plaintext(tiny_model_dir, tmp_path):
    tls = make_certificates(tmp_path)
    stack = start_stack(stack_config(tiny_model_dir, **tls))
    try:
        # Through the gateway: prefill -> decode KV, the monitor's checks and WatchRoutes all ran over mTLS.
        with Client(stack.address("gateway"), timeout_s=60) as client:
            assert client.generate_text(prompt="Over TLS", max_tokens=3, temperature=0).completion_tokens >= 1
        with stack.channel("decode") as channel:
            decode_pb2_grpc.DecodeStub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=10)
        with open(tls["tls_ca"], "rb") as f:
            server_only = grpc.ssl_channel_credentials(root_certificates=f.read())  # no client certificate
        for name in ("prefill", "decode", "monitor"):
            for channel in (grpc.insecure_channel(stack.address(name)),
                            grpc.secure_channel(stack.address(name), server_only)):
                with channel, pytest.raises(grpc.RpcError) as e:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (name, e.value)
    finally:
        stack.stop()
        shutil.rmtree(stack.log_dir, ignore_errors=True)
