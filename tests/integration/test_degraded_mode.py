"""Acceptance: kill the decode process -> degraded within 2 s, requests still answered; restart -> normal."""

import shutil
import subprocess
import sys
import time

import pytest

from edgellm.client import Client
from edgellm.v1 import monitor_pb2
from tests.conftest import stack_config, start_stack

PROMPT = {"prompt": "The river", "max_tokens": 16}


@pytest.fixture()
def stack(tiny_model_dir):
    s = start_stack(stack_config(tiny_model_dir))
    yield s
    s.stop()
    shutil.rmtree(s.log_dir, ignore_errors=True)


def cli_status(stack) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "edgellm", "status", "--monitor", stack.address("monitor"),
         "--cluster-token-file", stack.config.security.cluster_token_file],
        capture_output=True,
        text=True,
        timeout=60,
        env={"EDGELLM_GATEWAY": stack.address("gateway")},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def decode_log(stack) -> str:
    with open(f"{stack.log_dir}/decode.log") as f:
        return f.read()


def test_decode_death_degrades_and_recovery_restores(stack):
    client = Client(stack.address("gateway"), timeout_s=60)
    normal = client.generate_text(**PROMPT)
    assert normal.completion_tokens > 0
    assert decode_log(stack).count("kv_received") == 1  # served disaggregated

    killed_at = time.monotonic()
    stack.kill("decode")  # SIGKILL
    # A request sent before the monitor has noticed still gets its full answer.
    assert client.generate_text(**PROMPT).token_ids == normal.token_ids
    while stack.route_table().mode != monitor_pb2.ROUTE_MODE_DEGRADED:
        assert time.monotonic() - killed_at < 2.0, "monitor did not switch to degraded mode within 2 s"
        time.sleep(0.05)
    status = cli_status(stack)
    assert "mode: degraded" in status and "DOWN" in status

    degraded = client.generate_text(**PROMPT)  # prefill service decodes itself
    assert degraded.token_ids == normal.token_ids

    stack.start("decode")
    table = stack.wait_mode(monitor_pb2.ROUTE_MODE_NORMAL, timeout_s=60)
    assert stack.address("decode") in table.decode_addresses
    assert "mode: normal" in cli_status(stack)
    deadline = time.monotonic() + 5  # the gateway's table follows the monitor's stream
    while "kv_received" not in decode_log(stack).split('"event": "serving"')[-1]:
        assert time.monotonic() < deadline, "requests did not go back to the decode service"
        assert client.generate_text(**PROMPT).token_ids == normal.token_ids
    client.close()

    stack.stop()  # SIGTERM: every service drains and exits cleanly
    assert {name: p.returncode for name, p in stack.procs.items()} == dict.fromkeys(stack.procs, 0)
