"""`edgellm up` as a user runs it: a real `python -m edgellm up` process and the services it starts.

It must place the two engines on the disjoint CPU sets it prints (read back from the kernel, not
from our config), and a request sent the moment it starts must be answered: the client waits for
the gateway to listen, the gateway waits for a route while the engines load.
"""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from edgellm.client import Client
from edgellm.launch import free_port_argv, route_table
from edgellm.rpc.security import ClusterSecurity, write_cluster_token
from edgellm.v1 import common_pb2

ROLES = {common_pb2.SERVICE_ROLE_PREFILL: "prefill", common_pb2.SERVICE_ROLE_DECODE: "decode"}


def child_services(parent_pid: int) -> dict[str, int]:
    """Service name -> PID of each process `parent_pid` started (`edgellm serve NAME` execs
    `python -m services.NAME`)."""
    found = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # the process went away while we read it
        if ppid == parent_pid and b"-m" in cmdline:
            module = cmdline[cmdline.index(b"-m") + 1].decode()
            found[module.removeprefix("services.")] = int(stat.parent.name)
    return found


def read_ready_lines(stdout, lines: list[str], ready: threading.Event) -> None:
    for line in stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Try:"):
            ready.set()


def printed_cpus(lines: list[str]) -> dict[str, set[int]]:
    """From lines like '  prefill  127.0.0.1:4321  (CPUs 0)'."""
    cpus = {}
    for line in lines:
        words = line.split()
        if len(words) >= 4 and words[2] == "(CPUs":
            cpus[words[0]] = {int(c) for c in words[3].rstrip(")").split(",")}
    return cpus


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the CPU split needs at least 2 CPUs")
def test_up_places_the_engines_where_it_says_and_answers_a_request_sent_at_once(tiny_model_dir, tmp_path):
    ports = free_port_argv()
    gateway = "127.0.0.1:" + ports[ports.index("--gateway-port") + 1]
    monitor = "127.0.0.1:" + ports[ports.index("--monitor-port") + 1]
    token_file = str(tmp_path / "cluster-token")  # given, so this test can read the monitor too
    security = ClusterSecurity(token=write_cluster_token(token_file))
    with open(tmp_path / "up.log", "wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "edgellm", "up", "--model", tiny_model_dir, "--prefill-dtype", "fp32",
             "--decode-weights", "fp32", "--cluster-token-file", token_file, *ports],
            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
        )
    children: dict[str, int] = {}
    try:
        lines: list[str] = []
        ready = threading.Event()
        threading.Thread(target=read_ready_lines, args=(up.stdout, lines, ready), daemon=True).start()
        # Sent at once, long before the engines have loaded.
        with Client(gateway, timeout_s=90, wait_for_ready=True) as client:
            answer = client.generate_text(prompt="Hello there", max_tokens=4, temperature=0)
        assert answer.completion_tokens >= 1 and answer.finish_reason in ("stop", "length")

        assert ready.wait(60), f"`edgellm up` printed no ready line: {lines}"
        children = child_services(up.pid)
        assert set(children) == {"prefill", "decode", "monitor", "gateway"}, children
        cpus = printed_cpus(lines)
        assert set(cpus) == {"prefill", "decode"}, lines
        assert not cpus["prefill"] & cpus["decode"], cpus
        assert cpus["prefill"] | cpus["decode"] <= os.sched_getaffinity(0)
        for name in ("prefill", "decode"):
            assert os.sched_getaffinity(children[name]) == cpus[name], (name, lines)
        # Each engine runs one torch thread per CPU it was given (its engine face reports it).
        loads = {ROLES[s.role]: s.load for s in route_table(monitor, security=security).services}
        for name in ("prefill", "decode"):
            assert loads[name].num_threads == len(cpus[name]), (name, loads[name])
    finally:
        children = children or child_services(up.pid)
        up.send_signal(signal.SIGTERM)  # `up` stops its services in order
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        deadline = time.monotonic() + 10
        for pid in children.values():  # only what this test started, by PID
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
