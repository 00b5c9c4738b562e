"""Fault tolerance through real processes: 16 greedy streams in flight, then a decode service is
killed (-9), hung (SIGSTOP) or cut off (its network link goes down: a veth pair into its own
network namespace where root allows, else a TCP proxy stops moving bytes), or the monitor dies. With the
prefill service down before requests arrive, the decode service prefills too. Every stream must end
with the same tokens as a run with no fault.

Each failure test has a negative twin (`--migrate false`) that must lose streams, so a pass
proves the migration and not luck. Every run counts requests in and results out: each stream
ends with its text or a clear status, never a hang (the client's deadline would show it).
"""

import contextlib
import shutil
import signal
import time

import grpc
import pytest

from bench import shaped_link
from bench.shaped_link import ShapedLink
from bench.streams import FaultRun, run_with_fault_sync
from edgellm.client import Client
from edgellm.launch import free_port
from edgellm.linkproxy import LinkProxy
from edgellm.v1 import monitor_pb2
from tests.conftest import count_in_log, log_events, metric, scrape, stack_config, start_stack

PROMPTS = [f"Story {i}: the river ran past the mill and" for i in range(16)]
MAX_TOKENS = 120
MIGRATE = pytest.mark.parametrize("migrate", [True, False], ids=["migrate", "twin-no-migration"])


def gateway_metrics(stack) -> str:
    return scrape(stack.config.network.gateway_metrics_port)


@pytest.fixture(scope="module")
def expected(tiny_stack) -> list[list[int]]:
    """Every prompt's tokens from a run with no fault (the shared stack: same model and precision)."""
    run = run_with_fault_sync(tiny_stack.address("gateway"), PROMPTS, MAX_TOKENS, timeout_s=120)
    assert all(r.completed and len(r.token_ids) > 20 for r in run.streams)
    return [r.token_ids for r in run.streams]


def check_outcome(run: FaultRun, expected: list[list[int]], migrate: bool) -> None:
    """Requests in = results out; with migration every stream equals the no-fault run, without it
    the streams on the failed service end with UNAVAILABLE."""
    assert len(run.streams) == len(PROMPTS)
    for r in run.streams:
        assert r.completed or r.error is not None, f"stream of {r.prompt!r} ended with neither text nor status"
    if migrate:
        failed = [(r.prompt, r.error, r.details) for r in run.streams if not r.completed]
        assert not failed, failed
        assert [r.token_ids for r in run.streams] == expected
    else:
        failed = [r for r in run.streams if not r.completed]
        assert failed, "with migration off the fault must cost streams (else this test proves nothing)"
        assert {r.error for r in failed} == {grpc.StatusCode.UNAVAILABLE}
        for r in failed:  # what a failed stream did get is a prefix of the right answer, nothing else
            expected_tokens = expected[PROMPTS.index(r.prompt)]
            assert r.token_ids == expected_tokens[: len(r.token_ids)]


def stop(stack) -> None:
    stack.stop()
    shutil.rmtree(stack.log_dir, ignore_errors=True)




@MIGRATE
def test_kill9_of_the_only_decode_service(tiny_model_dir, expected, migrate):
    stack = start_stack(stack_config(tiny_model_dir, migrate=str(migrate).lower(), backup_follow_tokens=8))
    try:
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS, MAX_TOKENS, fault=lambda: stack.kill("decode"),
                                  after_tokens=40)
        check_outcome(run, expected, migrate)
        if migrate:  # each stream went on in degraded mode, on the prefill service
            m = gateway_metrics(stack)
            assert metric(m, "edgellm_migrations_total", 'to="prefill"') >= len(PROMPTS)
            assert metric(m, "edgellm_degraded_requests_total", 'engine="prefill"') >= len(PROMPTS)
            assert metric(m, "edgellm_failures_detected_total") >= 1
            # the prefill service kept each prompt's KV, extended while the streams ran
            # (--backup-follow-tokens 8): the takeovers recomputed a few streamed tokens, not all 40+
            prefill = scrape(stack.config.network.prefill_metrics_port)
            assert metric(prefill, "edgellm_kv_backup_hits") >= len(PROMPTS)
            assert metric(prefill, "edgellm_kv_backup_extensions") >= len(PROMPTS)
            takeovers = log_events(stack, "prefill", "takeover")
            recomputed = [t["num_tokens"] - t["num_kept_tokens"] for t in takeovers]
            assert len(takeovers) >= len(PROMPTS) and sum(recomputed) / len(recomputed) < 20, recomputed
    finally:
        stop(stack)


@MIGRATE
def test_sigstop_hung_decode_is_detected_and_sigcont_brings_it_back(tiny_model_dir, expected, migrate):
    stack = start_stack(stack_config(tiny_model_dir, migrate=str(migrate).lower()))
    try:
        run = run_with_fault_sync(
            stack.address("gateway"), PROMPTS, MAX_TOKENS, fault=lambda: stack.kill("decode", signal.SIGSTOP)
        )
        # A hung process keeps its sockets open: found by the gateway's probe or the monitor's verdict.
        check_outcome(run, expected, migrate)
        assert metric(gateway_metrics(stack), "edgellm_failures_detected_total") >= 1
        if not migrate:  # found by the gateway's probe or the monitor's checks, whichever came first
            assert all(("marked" in r.details and "down" in r.details) or "stopped answering" in r.details
                       for r in run.streams if r.error)

        stack.kill("decode", signal.SIGCONT)
        table = stack.wait_mode(monitor_pb2.ROUTE_MODE_NORMAL, timeout_s=30)
        assert stack.address("decode") in table.decode_addresses
        served_before = count_in_log(stack, "decode", "kv_received")
        deadline = time.monotonic() + 10  # the gateway follows the monitor's table
        with Client(stack.address("gateway"), timeout_s=60) as client:
            while count_in_log(stack, "decode", "kv_received") == served_before:
                assert time.monotonic() < deadline, "the resumed decode service got no new request"
                assert client.generate_text(prompt=PROMPTS[0], max_tokens=8).token_ids == expected[0][:8]
    finally:
        stop(stack)


@MIGRATE
def test_with_two_decode_services_killing_one_moves_its_streams_to_the_other(tiny_model_dir, expected, migrate):
    decode_addrs = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    stack = start_stack(stack_config(tiny_model_dir, decode_addrs=decode_addrs, migrate=str(migrate).lower()))
    try:
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS, MAX_TOKENS, fault=lambda: stack.kill("decode2"))
        check_outcome(run, expected, migrate)
        m = gateway_metrics(stack)
        assert metric(m, "edgellm_degraded_requests_total") == 0  # never degraded: the other decode took over
        if migrate:
            assert metric(m, "edgellm_migrations_total", 'to="decode"') >= 1
            # the prefill service reused each moved prompt's kept KV: it computed only the streamed tokens
            assert metric(scrape(stack.config.network.prefill_metrics_port), "edgellm_kv_backup_hits") >= 1
            # decode2's port is closed now: new requests go to the live one, none fail
            with Client(stack.address("gateway"), timeout_s=60) as client:
                for i in range(4):
                    assert client.generate_text(prompt=PROMPTS[i], max_tokens=8).token_ids == expected[i][:8]
            assert metric(gateway_metrics(stack), "edgellm_degraded_requests_total") == 0
    finally:
        stop(stack)


@contextlib.contextmanager
def decode_behind_a_link(tiny_model_dir, migrate):
    """A stack whose decode service is reached over a link the test can cut: a veth pair into the
    decode service's own network namespace where this machine allows it (root, iproute2), else a
    TCP proxy (edgellm.linkproxy). Yields the stack, cut() and restore()."""
    flags = {"migrate": str(migrate).lower()}
    if shaped_link.available():
        with ShapedLink(rate_mbps=1000) as link:
            config = stack_config(tiny_model_dir, decode_addrs=f"{link.decode_host}:{free_port()}", **flags)
            stack = start_stack(config, process_prefix={"decode": link.prefix},
                                process_args={"decode": ["--host", link.decode_host]})
            try:
                yield stack, link.cut, link.restore
            finally:
                link.restore()
                stop(stack)
        return
    decode_port = free_port()
    proxy = LinkProxy(f"127.0.0.1:{decode_port}").start_in_thread()
    config = stack_config(tiny_model_dir, decode_addrs=proxy.address, **flags)
    stack = start_stack(config, process_args={"decode": ["--decode-port", str(decode_port)]})
    try:
        yield stack, proxy.cut, proxy.restore
    finally:
        proxy.restore()
        stop(stack)


@MIGRATE
def test_a_cut_link_to_decode_is_detected_and_its_streams_move(tiny_model_dir, expected, migrate):
    """The link to the decode service goes silent (no reset): a pulled cable, a dead WiFi link."""
    with decode_behind_a_link(tiny_model_dir, migrate) as (stack, cut, restore):
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS, MAX_TOKENS, fault=cut)
        check_outcome(run, expected, migrate)
        assert metric(gateway_metrics(stack), "edgellm_failures_detected_total") >= 1
        restore()
        stack.wait_mode(monitor_pb2.ROUTE_MODE_NORMAL, timeout_s=30)


def test_monitor_death_interrupts_nothing_and_a_restarted_monitor_resyncs(tiny_model_dir, expected):
    stack = start_stack(stack_config(tiny_model_dir))
    try:
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS, MAX_TOKENS, fault=lambda: stack.kill("monitor"))
        assert [r.token_ids for r in run.streams] == expected  # streams went on with the last table
        with Client(stack.address("gateway"), timeout_s=60) as client:  # and new requests are served
            assert client.generate_text(prompt=PROMPTS[1], max_tokens=8).token_ids == expected[1][:8]
        assert metric(gateway_metrics(stack), "edgellm_route_mode") == monitor_pb2.ROUTE_MODE_NORMAL

        stack.start("monitor")
        stack.wait_mode(monitor_pb2.ROUTE_MODE_NORMAL, timeout_s=30)
        stack.kill("decode")  # live route updates again: the gateway's table follows the new monitor
        deadline = time.monotonic() + 10
        while metric(gateway_metrics(stack), "edgellm_route_mode") != monitor_pb2.ROUTE_MODE_DEGRADED:
            assert time.monotonic() < deadline, "the gateway did not get the restarted monitor's table"
            time.sleep(0.1)
        with Client(stack.address("gateway"), timeout_s=60) as client:
            assert client.generate_text(prompt=PROMPTS[2], max_tokens=8).token_ids == expected[2][:8]
    finally:
        stop(stack)


def test_with_no_prefill_service_the_decode_service_prefills(tiny_model_dir, expected):
    stack = start_stack(stack_config(tiny_model_dir))
    try:
        stack.kill("prefill")
        stack.wait_mode(monitor_pb2.ROUTE_MODE_NO_PREFILL, timeout_s=10)
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS[:4], MAX_TOKENS)
        assert [r.token_ids for r in run.streams] == expected[:4]
        assert count_in_log(stack, "decode", "local_generate") >= 4
        assert metric(gateway_metrics(stack), "edgellm_degraded_requests_total", 'engine="decode"') >= 4

        stack.start("prefill")
        stack.wait_mode(monitor_pb2.ROUTE_MODE_NORMAL, timeout_s=60)
    finally:
        stop(stack)
