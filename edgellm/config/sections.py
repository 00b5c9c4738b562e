"""The typed, frozen sections of the configuration, each validated in __post_init__."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from edgellm.config.options import DECODE_WEIGHTS, DTYPES, INT4_KERNELS, KV_TRANSFER_DTYPES

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-2,5' -> (0, 1, 2, 5)."""
    cpus: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return tuple(cpus)


@dataclass(frozen=True)
class ModelConfig:
    model: str
    prefill_dtype: str
    decode_weights: str
    int4_group_size: int
    int4_outliers: int
    int4_lm_head: bool
    int4_checkpoint: str
    int4_kernel: str

    def __post_init__(self) -> None:
        if self.int4_group_size not in (32, 64, 128):
            raise ValueError("int4_group_size must be 32, 64 or 128")
        if self.int4_outliers < 0:
            raise ValueError("int4_outliers must be >= 0")
        if self.prefill_dtype not in DTYPES:
            raise ValueError(f"prefill_dtype must be one of {DTYPES}, got {self.prefill_dtype!r}")
        if self.int4_kernel not in INT4_KERNELS:
            raise ValueError(f"int4_kernel must be one of {INT4_KERNELS}, got {self.int4_kernel!r}")
        if self.decode_weights not in DECODE_WEIGHTS:
            raise ValueError(f"decode_weights must be one of {DECODE_WEIGHTS}, got {self.decode_weights!r}")

    def dtype_for(self, service: str) -> str:
        """The activation (and KV cache) precision of an engine service. INT4 decode computes
        in bf16: torch's CPU int4 kernel takes bf16 activations, and with ours (which computes
        in fp32 inside) fp32 activations measured no faster while doubling the KV cache."""
        if service == "prefill":
            return self.prefill_dtype
        return self.decode_weights if self.decode_weights in DTYPES else "bf16"

    @property
    def int4(self) -> bool:
        return self.decode_weights.startswith("int4-")


@dataclass(frozen=True)
class PlacementConfig:
    """Which CPUs each service may use, and how many torch threads each engine runs.
    On one machine this stands in for separate devices (e.g. prefill on core 0, decode on core 1)."""

    prefill_threads: int
    decode_threads: int
    prefill_cpus: str
    decode_cpus: str
    gateway_cpus: str
    monitor_cpus: str
    prefill_device: str
    decode_device: str
    cuda_graphs: bool

    def __post_init__(self) -> None:
        for service in ("prefill", "decode"):
            if not DEVICE_PATTERN.fullmatch(getattr(self, f"{service}_device")):
                raise ValueError(f"{service}_device must be auto, cpu, cuda or cuda:N, "
                                 f"got {getattr(self, f'{service}_device')!r}")
        if self.prefill_threads < 0 or self.decode_threads < 0:
            raise ValueError("prefill_threads and decode_threads must be >= 0")
        for service in ("prefill", "decode", "gateway", "monitor"):
            try:
                parse_cpu_list(getattr(self, f"{service}_cpus"))
            except ValueError:
                raise ValueError(f"{service}_cpus must look like '0' or '0-1,3'") from None

    def cpus(self, service: str) -> tuple[int, ...]:
        return parse_cpu_list(getattr(self, f"{service}_cpus"))

    def threads(self, service: str) -> int:
        return getattr(self, f"{service}_threads")

    def device(self, service: str) -> str:
        """The device spec of an engine service ('auto', 'cpu', 'cuda', 'cuda:N')."""
        return getattr(self, f"{service}_device")


@dataclass(frozen=True)
class ParallelConfig:
    """How each phase spreads over devices: tensor-parallel prefill ranks, pipeline-parallel
    decode stages."""

    prefill_tp: int
    prefill_tp_rank: int
    prefill_tp_port: int
    prefill_tp_addr: str
    prefill_tp_timeout_s: float
    decode_stages: int
    decode_stage: int
    decode_stage_addrs: tuple[str, ...]
    decode_stage_timeout_s: float

    def __post_init__(self) -> None:
        if self.prefill_tp < 1 or not 0 <= self.prefill_tp_rank < self.prefill_tp:
            raise ValueError("prefill_tp must be >= 1 and prefill_tp_rank in [0, prefill_tp)")
        if self.decode_stages < 1 or not 0 <= self.decode_stage < self.decode_stages:
            raise ValueError("decode_stages must be >= 1 and decode_stage in [0, decode_stages)")
        if self.decode_stage_addrs and len(self.decode_stage_addrs) != self.decode_stages - 1:
            raise ValueError(f"decode_stage_addrs names {len(self.decode_stage_addrs)} stages; "
                             f"decode_stages={self.decode_stages} needs {self.decode_stages - 1}")
        if self.prefill_tp_timeout_s <= 0 or self.decode_stage_timeout_s <= 0:
            raise ValueError("prefill_tp_timeout_s and decode_stage_timeout_s must be > 0")

    @property
    def tp_address(self) -> str:
        """Where the prefill group meets: rank 0's TCPStore."""
        return self.prefill_tp_addr or f"127.0.0.1:{self.prefill_tp_port}"

    def stage_addresses(self, decode_port: int) -> tuple[str, ...]:
        """gRPC addresses of decode stages 1 .. decode_stages-1."""
        if self.decode_stage_addrs:
            return self.decode_stage_addrs
        return tuple(f"127.0.0.1:{decode_port + 100 * k}" for k in range(1, self.decode_stages))


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_mb: int
    kv_block_size: int
    max_batch_tokens: int
    max_running: int
    max_consecutive_prefills: int

    def __post_init__(self) -> None:
        for name in ("kv_cache_mb", "kv_block_size", "max_batch_tokens", "max_running", "max_consecutive_prefills"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True)
class NetworkConfig:
    host: str
    gateway_port: int
    gateway_http_port: int
    prefill_port: int
    decode_port: int
    monitor_port: int
    gateway_metrics_port: int
    prefill_metrics_port: int
    decode_metrics_port: int
    monitor_metrics_port: int
    prefill_addrs: tuple[str, ...]
    decode_addrs: tuple[str, ...]
    monitor_addr: str
    colocated: bool

    def __post_init__(self) -> None:
        for name in ("gateway_port", "gateway_http_port", "prefill_port", "decode_port", "monitor_port", "gateway_metrics_port",
                     "prefill_metrics_port", "decode_metrics_port", "monitor_metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ValueError(f"{name} must be a TCP port, got {port}")

    @property
    def prefill_addresses(self) -> tuple[str, ...]:
        return self.prefill_addrs or (f"127.0.0.1:{self.prefill_port}",)

    @property
    def decode_addresses(self) -> tuple[str, ...]:
        if self.colocated:
            return ()
        return self.decode_addrs or (f"127.0.0.1:{self.decode_port}",)

    @property
    def monitor_address(self) -> str:
        return self.monitor_addr or f"127.0.0.1:{self.monitor_port}"


@dataclass(frozen=True)
class TransferConfig:
    kv_layers_per_chunk: int
    kv_max_chunk_bytes: int
    kv_max_inflight_mb: float
    kv_backup_mb: float
    kv_backup_ttl_s: float
    kv_wait_timeout_s: float
    kv_transfer_dtype: str
    kv_link_mbps: float
    kv_send_after_prefill: bool
    kv_fault_injection: bool

    def __post_init__(self) -> None:
        if self.kv_layers_per_chunk < 1:
            raise ValueError("kv_layers_per_chunk must be >= 1")
        if not 1024 <= self.kv_max_chunk_bytes <= 3 << 20:
            # gRPC's default message limit is 4 MiB; a chunk carries K and V plus headers.
            raise ValueError("kv_max_chunk_bytes must be between 1 KiB and 3 MiB")
        if self.kv_wait_timeout_s <= 0:
            raise ValueError("kv_wait_timeout_s must be > 0")
        if self.kv_max_inflight_mb <= 0:
            raise ValueError("kv_max_inflight_mb must be > 0")
        if self.kv_backup_mb < 0 or self.kv_backup_ttl_s <= 0:
            raise ValueError("kv_backup_mb must be >= 0 and kv_backup_ttl_s > 0")
        if self.kv_link_mbps < 0:
            raise ValueError("kv_link_mbps must be >= 0")
        if self.kv_transfer_dtype not in KV_TRANSFER_DTYPES:
            raise ValueError(f"kv_transfer_dtype must be one of {KV_TRANSFER_DTYPES}")


@dataclass(frozen=True)
class MonitorConfig:
    health_interval_s: float
    health_timeout_s: float
    down_after: int
    up_after: int
    stream_ping_after_ms: int
    stream_ping_timeout_ms: int

    def __post_init__(self) -> None:
        if self.stream_ping_after_ms < 0 or self.stream_ping_timeout_ms < 1:
            raise ValueError("stream_ping_after_ms must be >= 0 and stream_ping_timeout_ms >= 1")
        if self.health_interval_s <= 0 or self.health_timeout_s <= 0:
            raise ValueError("health_interval_s and health_timeout_s must be > 0")
        if self.down_after < 1 or self.up_after < 1:
            raise ValueError("down_after and up_after must be >= 1")


@dataclass(frozen=True)
class GatewayConfig:
    default_max_tokens: int
    max_queued_requests: int
    max_inflight_prefills: int
    request_timeout_s: float
    route_wait_s: float
    migrate: bool
    rate_limit_rpm: int
    rate_limit_tpm: int
    backup_follow_tokens: int

    def __post_init__(self) -> None:
        if self.backup_follow_tokens < 0:
            raise ValueError("backup_follow_tokens must be >= 0 (0 = off)")
        for name in ("default_max_tokens", "max_inflight_prefills"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.rate_limit_rpm < 0 or self.rate_limit_tpm < 0:
            raise ValueError("rate_limit_rpm and rate_limit_tpm must be >= 0 (0 = off)")
        if self.max_queued_requests < 0 or self.request_timeout_s < 0 or self.route_wait_s < 0:
            raise ValueError("max_queued_requests, request_timeout_s and route_wait_s must be >= 0")


@dataclass(frozen=True)
class SecurityConfig:
    """Credentials and TLS. Files are read at start-up by edgellm/rpc/security.py, never stored here."""

    cluster_token_file: str
    api_keys_file: str
    tls_cert: str
    tls_key: str
    tls_ca: str

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("tls_ca needs tls_cert and tls_key (mutual TLS: every service presents one)")


@dataclass(frozen=True)
class LimitsConfig:
    """Every bound on what a caller can make a service hold or do."""

    max_request_id_bytes: int
    max_prompt_bytes: int
    max_messages: int
    max_stop_strings: int
    max_stop_bytes: int
    max_concurrent_rpcs: int
    max_decode_streams: int
    max_waiting_sequences: int
    max_staged_kv_mb: float
    max_kv_streams: int
    max_route_watchers: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be >= 1")


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    placement: PlacementConfig
    parallel: ParallelConfig
    engine: EngineConfig
    network: NetworkConfig
    transfer: TransferConfig
    monitor: MonitorConfig
    gateway: GatewayConfig
    security: SecurityConfig
    limits: LimitsConfig
    log_level: str = "info"

    def value(self, name: str) -> Any:
        """The value of option `name`, read from the section that holds it."""
        section = _SECTION_OF.get(name)
        return getattr(self if section is None else getattr(self, section), name)


_SECTIONS = {
    "model": ModelConfig,
    "placement": PlacementConfig,
    "parallel": ParallelConfig,
    "engine": EngineConfig,
    "network": NetworkConfig,
    "transfer": TransferConfig,
    "monitor": MonitorConfig,
    "gateway": GatewayConfig,
    "security": SecurityConfig,
    "limits": LimitsConfig,
}
# option name -> the Config field (section) that holds it; top-level fields map to None
_SECTION_OF = {f.name: section for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
