"""Start the four services as separate local processes and wait until they serve.

Used by `edgellm up`, the integration tests and the benchmarks, so all three run the
stack exactly the same way: `python -m edgellm serve <name> <flags>` per service, with
the resolved config passed on as flags (docker-compose runs the same `edgellm serve`).

A stack without --cluster-token-file makes a random cluster token in a 0600 file of its own
private directory (removed by `stop`) and hands that file to every service; `channel(name)` and
the helpers below carry it (and the TLS material), so tests and benchmarks pass the same doors.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgellm.config import Config, to_argv
from edgellm.rpc.security import OPEN, ClusterSecurity, write_cluster_token
from edgellm.v1 import monitor_pb2, monitor_pb2_grpc

# Start order: engines first (slowest to load), the monitor, then the public entry.
SERVICES = ("prefill", "decode", "monitor", "gateway")


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that was free a moment ago (tests and benchmarks run stacks side by side),
    never one this process handed out before: the OS may offer a port again until it is bound."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def free_port_argv() -> list[str]:
    """--<service>-port and --<service>-metrics-port flags with free ports for the four services,
    --gateway-http-port (the OpenAI-compatible HTTP API) and --prefill-tp-port (the prefill
    group's rendezvous, used with --prefill-tp)."""
    flags = [f"--{name}{kind}-port" for name in SERVICES for kind in ("", "-metrics")] + [
        "--gateway-http-port", "--prefill-tp-port"]
    return [arg for flag in flags for arg in (flag, str(free_port()))]


def service_port(name: str, config: Config) -> int:
    return getattr(config.network, f"{name}_port")


def service_command(name: str, config: Config) -> list[str]:
    return [sys.executable, "-m", "edgellm", "serve", name, *to_argv(config)]


def is_serving(address: str, timeout_s: float = 1.0, security: ClusterSecurity = OPEN) -> bool:
    with security.sync_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def route_table(monitor_address: str, timeout_s: float = 1.0,
                security: ClusterSecurity = OPEN) -> monitor_pb2.RouteTable:
    with security.sync_channel(monitor_address) as channel:
        return monitor_pb2_grpc.MonitorStub(channel).GetStatus(monitor_pb2.GetStatusRequest(), timeout=timeout_s)


@dataclass
class Stack:
    """The four services as child processes of this one."""

    config: Config
    log_dir: str | None = None  # None: children write to this process's stderr
    env: dict[str, str] | None = None
    # Per process: flags added to its command line (e.g. a decode service behind a link proxy
    # listens on another port than the one the others dial), and a command it runs under
    # (e.g. `ip netns exec NS` for a decode service on the far side of a shaped link).
    process_args: dict[str, list[str]] = field(default_factory=dict)
    process_prefix: dict[str, list[str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _logs: list[IO] = field(default_factory=list)
    _token_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.config.security.cluster_token_file:  # a cluster credential of its own, for this stack only
            self._token_dir = tempfile.mkdtemp(prefix="edgellm-cluster-")  # 0700
            path = os.path.join(self._token_dir, "cluster-token")
            write_cluster_token(path)
            self.config = dataclasses.replace(
                self.config, security=dataclasses.replace(self.config.security, cluster_token_file=path))
        self.security = ClusterSecurity.from_config(self.config.security)
        if self.config.parallel.decode_stage_addrs and len(self.decode_replicas) > 1:
            raise ValueError("--decode-stage-addrs names one decode unit's stages; with several decode services "
                             "leave it empty (stage k of each listens on its decode port + 100*k)")

    def channel(self, name: str, options: list | None = None) -> grpc.Channel:
        """A blocking channel to a service that carries the cluster credential (and TLS): for raw
        stubs in tests and benchmarks; the gateway's public port is plaintext, without it. Close it
        (or use it in a `with`)."""
        return self._security_of(name).sync_channel(self.address(name), options=options)

    def route_table(self, timeout_s: float = 1.0) -> monitor_pb2.RouteTable:
        """The monitor's current table (Monitor/GetStatus with the stack's credential)."""
        return route_table(self.address("monitor"), timeout_s, security=self.security)

    def _security_of(self, name: str) -> ClusterSecurity:
        return OPEN if name == "gateway" else self.security

    @property
    def decode_replicas(self) -> dict[str, int]:
        """Process name -> port of each decode service of a loopback test stack: "decode" for
        the first of --decode-addrs, then "decode2", ... (empty in colocated mode)."""
        addresses = self.config.network.decode_addresses
        return {("decode" if i == 0 else f"decode{i + 1}"): int(a.rsplit(":", 1)[1]) for i, a in enumerate(addresses)}

    @property
    def decode_stages(self) -> dict[str, tuple[str, int]]:
        """Process name -> (its decode unit, stage index) of each pipeline stage k >= 1
        (--decode-stages N > 1): "decode-stage1", ... for the unit "decode", "decode2-stage1", ..."""
        num_stages = self.config.parallel.decode_stages
        return {f"{unit}-stage{k}": (unit, k) for unit in self.decode_replicas for k in range(1, num_stages)}

    def address(self, name: str) -> str:
        """Where the others reach a service (a decode service: its --decode-addrs entry; a decode
        stage: its unit's stage_addresses entry)."""
        if name in self.decode_stages:
            unit, k = self.decode_stages[name]
            return self.config.parallel.stage_addresses(self.decode_replicas[unit])[k - 1]
        if name in self.decode_replicas:
            return self.config.network.decode_addresses[list(self.decode_replicas).index(name)]
        return f"127.0.0.1:{service_port(name, self.config)}"

    @property
    def tp_workers(self) -> dict[str, int]:
        """Process name -> rank of each tensor-parallel prefill worker ("prefill-rank1", ...): no
        gRPC of their own, rank 0 (the prefill service) drives them."""
        return {f"prefill-rank{r}": r for r in range(1, self.config.parallel.prefill_tp)}

    def _command(self, name: str) -> list[str]:
        if name in self.tp_workers:
            command = service_command("prefill", self.config) + [
                "--prefill-tp-rank", str(self.tp_workers[name]), "--prefill-metrics-port", "0"]
        elif name in self.decode_stages:
            unit, k = self.decode_stages[name]
            command = service_command("decode-stage", self.config) + [
                "--decode-port", str(self.decode_replicas[unit]), "--decode-stage", str(k), "--decode-metrics-port", "0"]
        elif name not in self.decode_replicas:
            command = service_command(name, self.config)
        else:
            command = service_command("decode", self.config) + ["--decode-port", str(self.decode_replicas[name])]
            if name != "decode":
                command += ["--decode-metrics-port", "0"]
        return self.process_prefix.get(name, []) + command + self.process_args.get(name, [])

    def start(self, name: str) -> subprocess.Popen:
        stderr = None
        if self.log_dir is not None:
            stderr = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
            self._logs.append(stderr)
        proc = subprocess.Popen(
            self._command(name),
            stdout=stderr,
            stderr=stderr,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,  # Ctrl-C reaches `up`, which then stops children in order
        )
        self.procs[name] = proc
        return proc

    @property
    def services(self) -> tuple[str, ...]:
        """The processes this stack runs: the four services, every decode service of --decode-addrs
        (none in colocated mode), each after its pipeline stages k >= 1 (--decode-stages)."""
        names: list[str] = []
        for s in SERVICES:
            if s == "decode":
                for unit in self.decode_replicas:
                    names += [name for name, (u, _) in self.decode_stages.items() if u == unit] + [unit]
            else:
                names += [s, *self.tp_workers] if s == "prefill" else [s]
        return tuple(names)

    def start_all(self) -> None:
        for name in self.services:
            self.start(name)

    def start_and_wait(self) -> None:
        """Start the stack's services and return once the monitor sees all of them healthy; stop everything on failure."""
        try:
            self.start_all()
            self.wait_serving(self.services)
            self.wait_all_healthy()  # every service healthy: NORMAL mode (COLOCATED without decode)
        except BaseException:
            self.stop()
            raise

    def wait_serving(self, names: tuple[str, ...] = SERVICES, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        for name in (n for n in names if n not in self.tp_workers):  # workers serve nothing: rank 0 waits for them
            while not is_serving(self.address(name), security=self._security_of(name)):
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}{self._log_hint(name)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not serving after {timeout_s}s{self._log_hint(name)}")
                time.sleep(0.2)

    def wait_mode(self, mode: int, timeout_s: float = 30.0) -> monitor_pb2.RouteTable:
        """Wait until the monitor's table is in `mode` with every configured service in it healthy or not."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                table = self.route_table()
                if table.mode == mode:
                    return table
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"monitor did not reach mode {monitor_pb2.RouteMode.Name(mode)}")
            time.sleep(0.1)

    def wait_all_healthy(self, timeout_s: float = 30.0) -> None:
        """Until the monitor sees every service healthy and the gateway routes by that table (it may
        still hold one from while the engines were starting, which would send requests degraded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                table = self.route_table()
                if table.services and all(s.healthy for s in table.services) and self._gateway_follows(table):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("monitor does not see every service healthy")
            time.sleep(0.1)

    def _gateway_follows(self, table: monitor_pb2.RouteTable) -> bool:
        """Whether the gateway's route table (its metrics page) has this table's version; True when
        the gateway is not running or serves no metrics."""
        port = self.config.network.gateway_metrics_port
        if "gateway" not in self.procs or not port:
            return True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                page = r.read().decode()
        except OSError:
            return False
        versions = [line.rsplit(" ", 1)[1] for line in page.splitlines() if line.startswith("edgellm_route_table_version ")]
        return bool(versions) and float(versions[0]) >= table.version

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a service (SIGKILL: dead; SIGSTOP: hung, its sockets stay open; SIGCONT)."""
        proc = self.procs[name]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=30)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every child (gateway first, so no new work arrives), then SIGKILL stragglers."""
        for name in reversed(self.services):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()
        if self._token_dir is not None:
            shutil.rmtree(self._token_dir, ignore_errors=True)

    def _log_hint(self, name: str) -> str:
        if self.log_dir is None:
            return ""
        path = os.path.join(self.log_dir, f"{name}.log")
        try:
            with open(path, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
        except OSError:
            return ""
        return f"; last log lines of {path}:\n{tail}"
