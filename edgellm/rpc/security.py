"""Closed doors: the cluster credential between services, API keys at the gateway, and TLS.

What each door asks for:
- Internal RPCs (Prefill, Decode, Monitor) need metadata `x-edgellm-cluster-token: <token>`, the
  one line of `--cluster-token-file`; `edgellm up` (and `launch.Stack`) writes a random one to a
  0600 file and hands the same file to every service it starts. A service given no token file
  runs its internal RPCs open, which it allows only when it listens on loopback.
- The gateway's public RPCs, and its HTTP API, need `authorization: Bearer <key>` when
  `--api-keys-file` is set (one key per line; blank lines and `# comments` ignored). Metrics and
  rate limits name a key by `key_fingerprint`, never by the key.
- grpc.health.v1 and server reflection stay open on every server (probes, grpcurl).
- `--tls-cert/--tls-key`: servers listen with TLS and clients present that pair too;
  `--tls-ca`: servers require client certificates it signed, clients verify servers with it.

Files are read once, at start-up (`ClusterSecurity.from_config`); a wrong one fails the start
with a message naming the flag. Tokens and keys are compared with hmac.compare_digest.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable

import grpc
import structlog

from edgellm.config import Config, SecurityConfig

log = structlog.get_logger(__name__)

CLUSTER_TOKEN_KEY = "x-edgellm-cluster-token"
AUTHORIZATION_KEY = "authorization"
# Method prefixes that need no credential anywhere: health probes and reflection (grpcurl).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                        "/grpc.reflection.v1.ServerReflection/")


class SecurityError(ValueError):
    """A credential or TLS file that cannot be used; the message names the flag."""


def _read(path: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SecurityError(f"{flag} {path}: {e.strerror}") from None


def read_cluster_token(path: str) -> str:
    """The token in `path` (surrounding whitespace dropped); "" when no file is configured."""
    if not path:
        return ""
    token = _read(path, "--cluster-token-file").strip()
    if not token:
        raise SecurityError(f"--cluster-token-file {path} is empty")
    if any(c.isspace() for c in token) or not token.isprintable():
        raise SecurityError(f"--cluster-token-file {path}: the token must be one line of printable characters")
    return token


def parse_api_keys(text: str) -> frozenset[str]:
    """One key per line; blank lines and lines starting with '#' are ignored."""
    keys = (line.strip() for line in text.splitlines())
    return frozenset(k for k in keys if k and not k.startswith("#"))


def read_api_keys(path: str) -> frozenset[str]:
    """The keys in `path`; empty when no file is configured. A file without any key is an error."""
    if not path:
        return frozenset()
    keys = parse_api_keys(_read(path, "--api-keys-file"))
    if not keys:
        raise SecurityError(f"--api-keys-file {path} holds no key")
    return keys


def key_fingerprint(key: str) -> str:
    """A short, stable name for an API key in metrics and logs (never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer_key(value: str) -> str:
    """The key of an `authorization: Bearer <key>` value ("" when it is not one)."""
    return value[len("Bearer "):] if value.startswith("Bearer ") else ""


def write_cluster_token(path: str) -> str:
    """Write a new random token to `path`, readable by its owner only (0600); return it."""
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def is_loopback(host: str) -> bool:
    """Whether a listen address reaches this machine only ("0.0.0.0", "::" and names do not)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def contains(candidates: Collection[str], given: str) -> bool:
    """Constant-time membership of `given` (each candidate compared with hmac.compare_digest)."""
    found = False
    for c in candidates:
        found |= hmac.compare_digest(c.encode(), given.encode())
    return found


def metadata_value(metadata: Iterable[tuple[str, Any]] | None, key: str) -> str:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return ""


_HANDLER_KINDS = {  # (request_streaming, response_streaming) -> how to make a handler of that kind
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `code` without reading it."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class CredentialInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health and reflection must carry one of `accepted` under metadata `key`
    (after `prefix`); otherwise it ends with UNAUTHENTICATED before reaching the servicer."""

    def __init__(self, key: str, accepted: Collection[str], prefix: str, what: str) -> None:
        self.key, self.accepted, self.prefix, self.what = key, accepted, prefix, what

    def allows(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> bool:
        if method.startswith(OPEN_METHOD_PREFIXES):
            return True
        value = metadata_value(metadata, self.key)
        return value.startswith(self.prefix) and contains(self.accepted, value[len(self.prefix):])

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or self.allows(handler_call_details.method, handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, f"{handler_call_details.method} needs {self.what}")


def cluster_interceptor(token: str) -> CredentialInterceptor:
    return CredentialInterceptor(CLUSTER_TOKEN_KEY, (token,), "",
                                 f"the cluster credential (metadata {CLUSTER_TOKEN_KEY}, see --cluster-token-file)")


def api_key_interceptor(keys: Collection[str]) -> CredentialInterceptor:
    return CredentialInterceptor(AUTHORIZATION_KEY, keys, "Bearer ",
                                 "an API key (metadata `authorization: Bearer <key>`)")


class _AddMetadata:
    """Client side: adds fixed metadata (the cluster token, an API key) to every call of a channel.
    One object per call kind: grpc.aio files an interceptor under the first kind it matches only."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    @classmethod
    def every_kind(cls, metadata: tuple[tuple[str, str], ...]) -> list[grpc.aio.ClientInterceptor]:
        return [kind(metadata) for kind in (_AddToUnaryUnary, _AddToUnaryStream, _AddToStreamUnary,
                                            _AddToStreamStream)]


class _AddToUnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AddToUnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AddToStreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AddToStreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AddMetadataSync(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                       grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The blocking twin of _AddMetadata (grpc.intercept_channel)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details):
        return _SyncDetails(details.method, details.timeout, (*(details.metadata or ()), *self.metadata),
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


def aio_channel(address: str, metadata: tuple[tuple[str, str], ...] = (),
                credentials: grpc.ChannelCredentials | None = None,
                options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel that sends `metadata` with every call, over TLS when `credentials` is given."""
    interceptors = _AddMetadata.every_kind(metadata) if metadata else None
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def sync_channel(address: str, metadata: tuple[tuple[str, str], ...] = (),
                 credentials: grpc.ChannelCredentials | None = None,
                 options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """The blocking twin of aio_channel."""
    if credentials is not None:
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _AddMetadataSync(metadata)) if metadata else channel


def _read_bytes(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SecurityError(f"{flag} {path}: {e.strerror}") from None


@dataclass(frozen=True)
class ClusterSecurity:
    """What one process of the cluster holds: the token, and its TLS material when configured.
    Servers use `server_interceptors`/`add_port`; every internal channel comes from `channel`."""

    token: str = ""
    cert: bytes = b""
    key: bytes = b""
    ca: bytes = b""

    @classmethod
    def from_config(cls, security: SecurityConfig) -> "ClusterSecurity":
        tls = security.tls_cert and security.tls_key
        return cls(
            token=read_cluster_token(security.cluster_token_file),
            cert=_read_bytes(security.tls_cert, "--tls-cert") if tls else b"",
            key=_read_bytes(security.tls_key, "--tls-key") if tls else b"",
            ca=_read_bytes(security.tls_ca, "--tls-ca") if security.tls_ca else b"",
        )

    @classmethod
    def for_service(cls, config: Config, service: str) -> "ClusterSecurity":
        """What `service` runs with; an engine service or the monitor refuses to listen beyond
        loopback with its internal RPCs open (the gateway has none: its door is the API keys)."""
        security = cls.from_config(config.security)
        if service != "gateway":
            security.check_listen(service, config.network.host)
        return security

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata that opens internal RPCs (empty when the cluster runs open)."""
        return ((CLUSTER_TOKEN_KEY, self.token),) if self.token else ()

    @property
    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.cert and not self.ca:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca or None, private_key=self.key or None,
                                            certificate_chain=self.cert or None)

    def check_listen(self, service: str, host: str) -> None:
        """Refuse to run internal RPCs open anywhere but on loopback."""
        if not self.token and not is_loopback(host):
            raise SecurityError(
                f"{service} listens on {host} without a cluster credential: set --cluster-token-file "
                "(EDGELLM_CLUSTER_TOKEN_FILE) to a file holding the cluster's token, or listen on 127.0.0.1")

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [cluster_interceptor(self.token)] if self.token else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on `address`: TLS when a certificate is configured (client certificates required
        with a CA), plaintext otherwise."""
        if not self.cert:
            return server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca or None, require_client_auth=bool(self.ca))
        return server.add_secure_port(address, credentials)

    def channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        """An internal grpc.aio channel: the token on every call, TLS when configured."""
        return aio_channel(address, self.metadata, self.channel_credentials, options)

    def sync_channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        """The blocking twin of `channel` (launch helpers, `edgellm status`, tests)."""
        return sync_channel(address, self.metadata, self.channel_credentials, options)


OPEN = ClusterSecurity()  # a loopback cluster without credentials, plaintext
