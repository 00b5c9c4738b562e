"""Typed, frozen configuration, built once at start-up from flags and EDGELLM_* variables.

Every option is declared once in OPTIONS: its flag (`--kv-max-chunk-bytes`), its
environment variable (`EDGELLM_KV_MAX_CHUNK_BYTES`), type, default and help.
Precedence: flag > environment > default. `edgellm up` hands the resolved values
to the services it starts with `to_argv`, which reads them back from the typed sections
themselves (there is no second copy to drift: a section changed with dataclasses.replace,
e.g. the CPU split of `edgellm up`, reaches the children as it is). Values discovered at
run time (KV capacity, model shapes) never go back in here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

DTYPES = ("fp32", "bf16", "fp16")
DECODE_WEIGHTS = ("int4-awq", "int4-rtn", *DTYPES)
INT4_KERNELS = ("auto", "c", "torch")
KV_TRANSFER_DTYPES = ("", "fp16", "bf16", "fp32", "int8")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Option:
    name: str  # snake_case; flag is --kebab-case, env var EDGELLM_UPPER_CASE
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: Sequence[str] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return "EDGELLM_" + self.name.upper()


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _addresses(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


OPTIONS: tuple[Option, ...] = (
    # model
    Option("model", str, "", "HF Llama-family checkpoint directory; empty = the embedded SmolLM2-135M-Instruct"),
    Option("prefill_dtype", str, "bf16", "prefill service precision: bf16 (default), fp32 (reference) or fp16", DTYPES),
    Option("decode_weights", str, "int4-awq", "decode service weights: int4-awq, int4-rtn, or dense fp32/bf16/fp16",
           DECODE_WEIGHTS),
    Option("int4_group_size", int, 32, "INT4 group size along the input (32, 64 or 128; a layer it does not divide uses the next smaller)"),
    Option("int4_outliers", int, 8, "input channels per layer input kept in bf16 beside the INT4 weights (int4-awq); 0 = none"),
    Option("int4_lm_head", _bool, True, "quantize the LM head too (a tied embedding is then read from it)"),
    Option("int4_checkpoint", str, "", "INT4 checkpoint file (from `edgellm prepare-model`); empty = the cache, made on first start"),
    Option("int4_kernel", str, "auto", "INT4 CPU kernel: c (ours, 8-bit group parameters; built with the system C compiler), "
           "torch (torch's, bf16 group parameters: more memory), auto = c where it builds", INT4_KERNELS),
    # placement (each service reads its own)
    Option("prefill_threads", int, 0, "torch threads of the prefill engine; 0 = one per CPU it may use"),
    Option("decode_threads", int, 0, "torch threads of the decode engine; 0 = one per CPU it may use"),
    Option("prefill_cpus", str, "", "CPUs the prefill service is pinned to, e.g. '0' or '0-1,3'; empty = any"),
    Option("decode_cpus", str, "", "CPUs the decode service is pinned to; empty = any"),
    Option("gateway_cpus", str, "", "CPUs the gateway is pinned to; empty = any"),
    Option("monitor_cpus", str, "", "CPUs the monitor is pinned to; empty = any"),
    # engine
    Option("kv_cache_mb", int, 1024, "memory for the paged KV cache of an engine (prefill in degraded mode, decode)"),
    Option("kv_block_size", int, 16, "tokens per KV block"),
    Option("max_batch_tokens", int, 2048, "prompt tokens packed into one prefill forward pass"),
    Option("max_running", int, 64, "sequences in one decode batch"),
    Option("max_consecutive_prefills", int, 4, "prefill batches in a row before running sequences get a decode step"),
    # network
    Option("host", str, "127.0.0.1", "interface the service listens on"),
    Option("gateway_port", int, 50051, "gateway gRPC port"),
    Option("prefill_port", int, 50052, "prefill gRPC port"),
    Option("decode_port", int, 50053, "decode gRPC port"),
    Option("monitor_port", int, 50054, "monitor gRPC port"),
    Option("prefill_addrs", _addresses, (), "comma-separated prefill services; empty = 127.0.0.1:<prefill-port>"),
    Option("decode_addrs", _addresses, (), "comma-separated decode services; empty = 127.0.0.1:<decode-port>"),
    Option("gateway_metrics_port", int, 9101, "gateway Prometheus metrics port (HTTP); 0 = off"),
    Option("prefill_metrics_port", int, 9102, "prefill Prometheus metrics port (HTTP); 0 = off"),
    Option("decode_metrics_port", int, 9103, "decode Prometheus metrics port (HTTP); 0 = off"),
    Option("monitor_metrics_port", int, 9104, "monitor Prometheus metrics port (HTTP); 0 = off"),
    Option("monitor_addr", str, "", "monitor service; empty = 127.0.0.1:<monitor-port>"),
    Option("colocated", _bool, False, "baseline: no decode service, the prefill service runs both phases"),
    # KV transfer
    Option("kv_layers_per_chunk", int, 1, "decoder layers per KV chunk"),
    Option("kv_max_chunk_bytes", int, 1 << 20, "largest KV chunk payload; long prompts are split by token range"),
    Option("kv_max_inflight_mb", float, 32.0, "KV of one request handed to its stream but not yet taken by gRPC "
           "(flow control); when full, the prefill forward pass waits: a slow decode side slows prefill down "
           "instead of growing its memory"),
    Option("kv_backup_mb", float, 256.0, "prefill: keep each prompt's KV this service computed (up to this many MiB, "
           "oldest dropped first) so a degraded-mode takeover recomputes only the streamed tokens; 0 = off"),
    Option("kv_backup_ttl_s", float, 60.0, "prefill: how long a prompt's KV is kept for a takeover"),
    Option("kv_wait_timeout_s", float, 30.0, "how long decode waits for a request's KV, and prefill for its "
           "acknowledgement after the forward pass, before failing it"),
    Option("kv_transfer_dtype", str, "", "KV on the wire: empty = the prefill's dtype, fp16, bf16, fp32, or int8 "
           "(per-token scales, about half of fp16's bytes)", KV_TRANSFER_DTYPES),
    Option("kv_link_mbps", float, 0.0, "benchmarks: pace KV streams like a link of this many Mbit/s; 0 = as fast as "
           "the network goes"),
    Option("kv_send_after_prefill", _bool, False, "benchmarks: send the KV only after the forward pass (the baseline "
           "layer-wise streaming is measured against)"),
    Option("kv_fault_injection", _bool, False, "tests only: damage the KV stream of requests whose id starts with "
           "kv-fault-<drop|duplicate|reorder|corrupt|cut>- (see edgellm/transfer/faults.py)"),
    # monitor
    Option("health_interval_s", float, 0.2, "time between health checks of each service"),
    Option("health_timeout_s", float, 0.3, "deadline of one health check"),
    Option("down_after", int, 2, "consecutive failed checks that mark a service down"),
    Option("up_after", int, 2, "consecutive good checks that mark a service up again"),
    # gateway
    Option("default_max_tokens", int, 256, "max_tokens when a request leaves it 0"),
    Option("max_queued_requests", int, 256, "requests waiting in the gateway's prefill pool; more get RESOURCE_EXHAUSTED"),
    Option("max_inflight_prefills", int, 8, "requests at prefill services at once (what one prefill batch can take)"),
    Option("request_timeout_s", float, 0.0, "per-request deadline at the gateway; 0 = only the client's deadline"),
    Option("route_wait_s", float, 30.0, "how long a request waits for a route when no prefill or decode service is "
           "healthy (start-up, a failover gap) before UNAVAILABLE; its own deadline may end the wait sooner"),
    Option("migrate", _bool, True, "move a request whose service fails (stream error or the monitor's verdict) to "
           "another one, after the tokens already sent; false ends it with UNAVAILABLE (tests' negative twins)"),
    # process
    Option("log_level", str, "info", "log level", LOG_LEVELS),
)


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

    def __post_init__(self) -> None:
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
        for name in ("gateway_port", "prefill_port", "decode_port", "monitor_port", "gateway_metrics_port",
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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
        for name in ("default_max_tokens", "max_inflight_prefills"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_queued_requests < 0 or self.request_timeout_s < 0 or self.route_wait_s < 0:
            raise ValueError("max_queued_requests, request_timeout_s and route_wait_s must be >= 0")


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    placement: PlacementConfig
    engine: EngineConfig
    network: NetworkConfig
    transfer: TransferConfig
    monitor: MonitorConfig
    gateway: GatewayConfig
    log_level: str = "info"

    def value(self, name: str) -> Any:
        """The value of option `name`, read from the section that holds it."""
        section = _SECTION_OF.get(name)
        return getattr(self if section is None else getattr(self, section), name)


_SECTIONS = {
    "model": ModelConfig,
    "placement": PlacementConfig,
    "engine": EngineConfig,
    "network": NetworkConfig,
    "transfer": TransferConfig,
    "monitor": MonitorConfig,
    "gateway": GatewayConfig,
}
# option name -> the Config field (section) that holds it; top-level fields map to None
_SECTION_OF = {f.name: section for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every option on `parser`; defaults are filled in by `from_namespace`."""
    group = parser.add_argument_group("EdgeLLM options (each also as EDGELLM_<NAME>)")
    for opt in OPTIONS:
        group.add_argument(opt.flag, dest=opt.name, default=None, help=f"{opt.help} [{opt.env_var}]")


def _resolve(opt: Option, given: str | None, env: dict[str, str]) -> Any:
    raw = given if given is not None else env.get(opt.env_var)
    if raw is None:
        return opt.default
    try:
        value = opt.type(raw)
    except ValueError as e:
        raise ValueError(f"{opt.flag}/{opt.env_var}: cannot parse {raw!r}: {e}") from None
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"{opt.flag}/{opt.env_var} must be one of {list(opt.choices)}, got {raw!r}")
    return value


def from_namespace(ns: argparse.Namespace, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    values = {opt.name: _resolve(opt, getattr(ns, opt.name, None), env) for opt in OPTIONS}
    sections = {}
    for section, cls in _SECTIONS.items():
        names = [f.name for f in dataclasses.fields(cls)]
        sections[section] = cls(**{n: values[n] for n in names})
    if values["log_level"] not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}")
    return Config(**sections, log_level=values["log_level"])


def parse(argv: Sequence[str] | None = None, env: dict[str, str] | None = None, prog: str | None = None) -> Config:
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    return from_namespace(parser.parse_args(argv), env)


def to_argv(config: Config) -> list[str]:
    """The flags that reproduce `config` in another process (used by `edgellm up`)."""
    argv: list[str] = []
    for opt in OPTIONS:
        value = config.value(opt.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        argv += [opt.flag, str(value)]
    return argv
