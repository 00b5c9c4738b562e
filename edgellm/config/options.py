"""Every option of EdgeLLM, declared once: its flag (`--kv-max-chunk-bytes`), environment
variable (`EDGELLM_KV_MAX_CHUNK_BYTES`), type, default and help. The typed sections
(sections.py) hold the values; each option's name is a field of exactly one section."""

from __future__ import annotations

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
    Option("prefill_device", str, "auto", "device of the prefill engine: auto (CUDA when torch sees a usable GPU, "
           "else the CPU), cpu, cuda or cuda:N; CUDA where there is none fails at start"),
    Option("decode_device", str, "auto", "device of the decode engine: auto, cpu, cuda or cuda:N (degraded-mode "
           "decoding on the prefill service runs on --prefill-device)"),
    Option("cuda_graphs", _bool, True, "CUDA: replay the decode step as CUDA graphs per batch-size bucket "
           "(eager for prefill and batches past the largest bucket); false = always eager"),
    # parallelism (issue 15): one phase across several devices
    Option("prefill_tp", int, 1, "tensor-parallel ranks of the prefill service (one process per device; rank 0 "
           "serves gRPC, the others are workers it drives); uneven head counts are fine"),
    Option("prefill_tp_rank", int, 0, "this process's rank in the prefill group (workers: 1 .. prefill_tp-1)"),
    Option("prefill_tp_port", int, 50062, "rank 0's rendezvous port (torch.distributed TCPStore) for the group"),
    Option("prefill_tp_addr", str, "", "workers: rank 0's rendezvous host:port; empty = 127.0.0.1:<prefill-tp-port>"),
    Option("prefill_tp_timeout_s", float, 5.0, "a collective that waits this long on a rank fails: the group is "
           "aborted, prefill reports itself down and re-forms when every rank is back"),
    Option("decode_stages", int, 1, "pipeline-parallel stages of the decode service (one process per device, each "
           "owning a contiguous range of layers; stage 0 serves gRPC and schedules)"),
    Option("decode_stage", int, 0, "this process's stage index (stage processes: 1 .. decode_stages-1)"),
    Option("decode_stage_addrs", _addresses, (), "stages 1 .. decode_stages-1 (host:port each); empty = "
           "127.0.0.1:<decode-port + 100*k> for stage k"),
    Option("decode_stage_timeout_s", float, 5.0, "stage 0: a stage that returns nothing for this long in a step is "
           "down: the decode unit reports itself down and its requests move on"),
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
    Option("gateway_http_port", int, 8000, "gateway OpenAI-compatible HTTP API port (/v1/chat/completions, "
           "/v1/completions, /v1/models, /health) on --host; 0 = off"),
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
    Option("stream_ping_after_ms", int, 50, "gateway: once nothing has come for this long from an engine service "
           "with calls in flight, probe it (a health Check on the same connection, answered by its event loop, so a "
           "busy but live service answers); 0 = no probes (the monitor still finds a hung service)"),
    Option("stream_ping_timeout_ms", int, 200, "gateway: a probe unanswered this long moves every call in flight "
           "there, so a hung or cut-off engine, whose TCP connection stays open, is found; raise it on links whose "
           "round trip under load nears it (a congested WiFi)"),
    # gateway
    Option("default_max_tokens", int, 256, "max_tokens when a request leaves it 0"),
    Option("max_queued_requests", int, 256, "requests waiting in the gateway's prefill pool; more get RESOURCE_EXHAUSTED"),
    Option("max_inflight_prefills", int, 8, "requests at prefill services at once (what one prefill batch can take)"),
    Option("request_timeout_s", float, 0.0, "per-request deadline at the gateway; 0 = only the client's deadline"),
    Option("route_wait_s", float, 30.0, "how long a request waits for a route when no prefill or decode service is "
           "healthy (start-up, a failover gap) before UNAVAILABLE; its own deadline may end the wait sooner"),
    Option("migrate", _bool, True, "move a request whose service fails (stream error or the monitor's verdict) to "
           "another one, after the tokens already sent; false ends it with UNAVAILABLE (tests' negative twins)"),
    Option("rate_limit_rpm", int, 0, "gateway: requests per minute per API key (per client address without "
           "--api-keys-file), HTTP and gRPC together; over it: HTTP 429 / RESOURCE_EXHAUSTED; 0 = off"),
    Option("rate_limit_tpm", int, 0, "gateway: prompt + completion tokens per minute per API key (per client "
           "address without --api-keys-file); a request is admitted while any budget is left; 0 = off"),
    Option("backup_follow_tokens", int, 8, "gateway: every this many streamed tokens, while no prompt waits for "
           "prefill, ask the request's prefill service to extend its kept KV with them (ExtendBackup), so a "
           "takeover after a decode failure recomputes at most this many tokens; 0 = off (a takeover recomputes "
           "every streamed token)"),
    # security (issue 13): closed doors between services and at the public entry
    Option("cluster_token_file", str, "", "file holding the cluster credential every internal RPC must carry "
           "(`edgellm up` makes one); empty = internal RPCs are open, which a service allows only on loopback"),
    Option("api_keys_file", str, "", "gateway: file with one API key per line; when set, Generate needs metadata "
           "`authorization: Bearer <key>`. Set it whenever the gateway listens beyond loopback"),
    Option("tls_cert", str, "", "PEM certificate this service presents (TLS between devices); empty = plaintext"),
    Option("tls_key", str, "", "PEM private key of --tls-cert"),
    Option("tls_ca", str, "", "PEM CA that signs the other services' certificates: servers then require client "
           "certificates signed by it (mTLS) and clients verify servers against it"),
    # limits (issue 13): every queue, string and stream is bounded; a request over a bound gets a clear status
    Option("max_request_id_bytes", int, 128, "longest client request_id (a label: echoed and logged)"),
    Option("max_prompt_bytes", int, 256 << 10, "largest prompt (or sum of chat message contents), checked before "
           "tokenizing"),
    Option("max_messages", int, 256, "most chat messages in one request"),
    Option("max_stop_strings", int, 16, "most stop strings in one request"),
    Option("max_stop_bytes", int, 256, "longest stop string"),
    Option("max_concurrent_rpcs", int, 1024, "RPCs one server runs at once; more get RESOURCE_EXHAUSTED"),
    Option("max_decode_streams", int, 1024, "gateway: requests streaming from decode pools at once"),
    Option("max_waiting_sequences", int, 1024, "engine: sequences queued and not yet running; more get "
           "RESOURCE_EXHAUSTED (the gateway then tries elsewhere)"),
    Option("max_staged_kv_mb", float, 512.0, "decode: KV received but not yet claimed by its Decode call"),
    Option("max_kv_streams", int, 64, "decode: PushKV streams at once"),
    Option("max_route_watchers", int, 64, "monitor: WatchRoutes streams at once"),
    # process
    Option("log_level", str, "info", "log level", LOG_LEVELS),
)
