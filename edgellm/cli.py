"""`edgellm`: run the stack, one service, a generation, or look at the cluster.

  edgellm up                       the four services as local processes (Ctrl-C stops them)
  edgellm serve NAME [options]     one service: gateway | prefill | decode | monitor, or
                                   decode-stage (stage K >= 1 of a --decode-stages N unit)
  edgellm generate PROMPT          stream an answer (chat message; --raw for a plain prompt)
  edgellm status                   each service's health and the routing mode
  edgellm health HOST:PORT         exit 0 if the service reports SERVING (container health checks)
  edgellm prepare-model [options]  convert the default model into the local cache, and make the
                                   decode service's INT4 checkpoint (--decode-weights int4-*)
  edgellm perplexity --text FILE   perplexity of a text through the decode service's layers (JSON)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from edgellm import config as cfg

SERVICE_NAMES = ("gateway", "prefill", "decode", "monitor", "decode-stage")
MODULES = {"decode-stage": "decode.stage"}  # serve names that are not a services/ package


def _up(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgellm up", description="Start the four services locally.")
    cfg.add_arguments(parser)
    config = cfg.from_namespace(parser.parse_args(argv))
    from edgellm.launch import Stack, service_port
    from edgellm.placement import cpu_list, split_engine_cpus

    config = split_engine_cpus(config, tuple(sorted(os.sched_getaffinity(0))))
    # Convert (and quantize) once here, with a progress bar, not inside three services at once.
    _prepare(config, progress=True)
    stack = Stack(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        stack.start_and_wait()
        # Printed only now: every service is healthy and the gateway routes by the monitor's table.
        print("EdgeLLM is up:", flush=True)
        everywhere = os.sched_getaffinity(0)
        for name in stack.services:
            cpus = os.sched_getaffinity(stack.procs[name].pid)  # what the kernel enforces, not what we asked
            where = f"  (CPUs {cpu_list(tuple(sorted(cpus)))})" if cpus != everywhere else ""
            if name in stack.tp_workers:  # no gRPC of its own: it meets rank 0 at the rendezvous
                address = f"rank {stack.tp_workers[name]} of {config.parallel.prefill_tp} via {config.parallel.tp_address}"
            elif name in stack.decode_stages:
                address = stack.address(name)
            else:
                address = f"{config.network.host}:{service_port(name, config)}"
            print(f"  {name:<8} {address}{where}", flush=True)
        # The token is made per run unless given; `edgellm status` needs it to read the monitor.
        print(f"Cluster token: {stack.config.security.cluster_token_file}   (edgellm status --cluster-token-file "
              "PATH, or EDGELLM_CLUSTER_TOKEN_FILE)", flush=True)
        if config.network.gateway_http_port:
            print(f"  OpenAI-compatible HTTP API: http://{config.network.host}:{config.network.gateway_http_port}/v1",
                  flush=True)
        print("Try: edgellm generate 'What is the capital of France?'   (Ctrl-C stops all)", flush=True)
        while not stop.is_set():
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    print(f"warning: {name} exited with code {proc.returncode}", file=sys.stderr, flush=True)
                    stack.procs.pop(name)
                    break
            stop.wait(0.5)
    except (RuntimeError, TimeoutError) as e:
        print(f"edgellm up: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
    return 0


def _serve(argv: list[str]) -> int:
    if not argv or argv[0] not in SERVICE_NAMES:
        print(f"usage: edgellm serve {{{','.join(SERVICE_NAMES)}}} [options]", file=sys.stderr)
        return 2
    # Replace this process: the service is then the container's / supervisor's direct child.
    module = MODULES.get(argv[0], argv[0])
    os.execv(sys.executable, [sys.executable, "-m", f"services.{module}", *argv[1:]])
    return 0  # not reached


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgellm generate")
    parser.add_argument("prompt")
    parser.add_argument("--max-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--raw", action="store_true", help="send as a raw prompt, not as a chat message")
    parser.add_argument("--gateway", default=os.environ.get("EDGELLM_GATEWAY", "127.0.0.1:50051"))
    parser.add_argument("--api-key", default=os.environ.get("EDGELLM_API_KEY") or None,
                        help="sent as `authorization: Bearer KEY` (a gateway with --api-keys-file) [EDGELLM_API_KEY]")
    parser.add_argument("--stats", action="store_true", help="print usage and timings to stderr")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="deadline of the whole generation; a gateway still starting is waited for within it")
    args = parser.parse_args(argv)
    from edgellm.client import Client, GenerationError

    prompt_args = {"prompt": args.prompt} if args.raw else {"messages": [{"role": "user", "content": args.prompt}]}
    with Client(args.gateway, timeout_s=args.timeout_s, wait_for_ready=True, api_key=args.api_key) as client:
        try:
            for delta in client.generate(
                **prompt_args,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop,
            ):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                if delta.finish_reason:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    if args.stats:
                        print(
                            f"[{delta.finish_reason}] prompt={delta.prompt_tokens} completion={delta.completion_tokens}"
                            f" ttft={delta.ttft_ms:.0f}ms tpot={delta.tpot_ms:.1f}ms",
                            file=sys.stderr,
                        )
        except GenerationError as e:
            print(f"\nedgellm generate: {e}", file=sys.stderr)
            return 1
    return 0


def _status(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgellm status")
    parser.add_argument("--monitor", default=os.environ.get("EDGELLM_MONITOR_ADDR") or "127.0.0.1:50054")
    parser.add_argument("--cluster-token-file", default=None,
                        help="the cluster credential the monitor asks for (printed by `edgellm up`) "
                             "[EDGELLM_CLUSTER_TOKEN_FILE]; TLS from EDGELLM_TLS_CERT/KEY/CA")
    args = parser.parse_args(argv)
    import grpc

    from edgellm.launch import is_serving, route_table
    from edgellm.v1 import common_pb2, monitor_pb2

    try:
        security = _client_security(args.cluster_token_file)
        table = route_table(args.monitor, security=security)
    except grpc.RpcError as e:
        print(f"edgellm status: monitor at {args.monitor} unreachable: {e.code().name} {e.details() or ''}",
              file=sys.stderr)
        return 1
    except ValueError as e:  # a credential or TLS file that cannot be used
        print(f"edgellm status: {e}", file=sys.stderr)
        return 1
    mode = monitor_pb2.RouteMode.Name(table.mode).removeprefix("ROUTE_MODE_").lower()
    print(f"mode: {mode}   (route table version {table.version})")
    print(f"  {'monitor':<8} {args.monitor:<22} healthy")
    for s in table.services:
        role = common_pb2.ServiceRole.Name(s.role).removeprefix("SERVICE_ROLE_").lower()
        load = ""
        if s.HasField("load"):
            l = s.load
            load = (f"  {l.weights} ({l.weight_bytes / 2**20:.0f} MiB) on {l.device or '?'} x{l.num_threads}"
                    f"  running={l.num_running} waiting={l.num_waiting}"
                    f" free_kv_blocks={l.num_free_kv_blocks}/{l.num_kv_blocks}")
        print(f"  {role:<8} {s.address:<22} {'healthy' if s.healthy else 'DOWN':<8}{load}")
        for k, stage in enumerate(s.load.stages if s.HasField("load") else ()):  # a pipeline-parallel decode unit
            print(f"    stage {k:<3} {stage.address:<22} {'healthy' if stage.healthy else 'DOWN':<8}"
                  f"  layers {stage.layer_start}-{stage.layer_end - 1} ({stage.weight_bytes / 2**20:.0f} MiB"
                  f" on {stage.device or '?'})")
    gateway = os.environ.get("EDGELLM_GATEWAY", "127.0.0.1:50051")
    print(f"  {'gateway':<8} {gateway:<22} {'healthy' if is_serving(gateway) else 'DOWN'}")
    return 0


def _health(argv: list[str]) -> int:
    from edgellm.launch import is_serving

    if len(argv) != 1:
        print("usage: edgellm health HOST:PORT", file=sys.stderr)
        return 2
    # Health needs no credential, but a service listening with TLS needs a TLS client (EDGELLM_TLS_*).
    return 0 if is_serving(argv[0], timeout_s=2.0, security=_client_security(None, with_token=False)) else 1


def _client_security(token_file: str | None, with_token: bool = True):
    """The cluster credential and TLS material of a command run beside the services: from
    `token_file`, else the EDGELLM_* variables the services read."""
    import dataclasses

    from edgellm.rpc.security import ClusterSecurity

    security = cfg.parse([], prog="edgellm").security
    if token_file is not None or not with_token:
        security = dataclasses.replace(security, cluster_token_file=token_file or "")
    return ClusterSecurity.from_config(security)


def _prepare_model(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgellm prepare-model", description="Convert and quantize ahead of time.")
    cfg.add_arguments(parser)
    config = cfg.from_namespace(parser.parse_args(argv))
    print(_prepare(config, progress=True))
    return 0


def _prepare(config: cfg.Config, progress: bool) -> str:
    """Convert the default model (once), and make the decode INT4 checkpoint (once, with a
    progress bar) and the INT4 kernel (once per machine) so the services find them in the cache."""
    from edgellm.engine_builder import int4_settings
    from edgellm.model_store import resolve_model_dir
    from edgellm.quant.linear import resolve_kernel
    from edgellm.quant.prepare import prepare_int4

    model_dir = resolve_model_dir(config.model.model)
    settings = int4_settings(config.model)
    if settings is not None:
        resolve_kernel(config.model.int4_kernel)
    if settings is None or config.model.int4_checkpoint:
        return str(model_dir)
    return str(prepare_int4(config.model.model, settings, progress=progress))


def _perplexity(argv: list[str]) -> int:
    from edgellm.perplexity import main as perplexity_main

    return perplexity_main(argv)


COMMANDS = {
    "up": _up,
    "serve": _serve,
    "generate": _generate,
    "status": _status,
    "health": _health,
    "prepare-model": _prepare_model,
    "perplexity": _perplexity,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    sys.exit(COMMANDS[argv[0]](argv[1:]))
