from edgellm.v1 import common_pb2, monitor_pb2
from services.monitor.registry import Registry

P, D = common_pb2.SERVICE_ROLE_PREFILL, common_pb2.SERVICE_ROLE_DECODE


def registry():
    return Registry([("p:1", P), ("d:1", D), ("d:2", D)], down_after=2, up_after=3)


def test_services_come_up_on_first_success_and_mode_follows_decode():
    r = registry()
    assert r.mode == monitor_pb2.ROUTE_MODE_DEGRADED  # nothing seen yet
    assert r.record("p:1", True) and r.record("d:1", True)
    assert r.mode == monitor_pb2.ROUTE_MODE_NORMAL
    assert r.table().decode_addresses == ["d:1"]


def test_down_after_consecutive_failures_up_after_consecutive_successes():
    r = registry()
    for a in ("p:1", "d:1"):
        r.record(a, True)
    v = r.version
    assert not r.record("d:1", False)  # one miss is not enough
    r.record("d:1", True)  # and a success resets the count
    assert not r.record("d:1", False)
    assert r.record("d:1", False)
    assert r.mode == monitor_pb2.ROUTE_MODE_DEGRADED and r.version == v + 1
    assert not r.record("d:1", True) and not r.record("d:1", True)  # hysteresis
    assert r.record("d:1", True)
    assert r.mode == monitor_pb2.ROUTE_MODE_NORMAL and r.version == v + 2


def test_one_decode_down_of_two_stays_normal():
    r = registry()
    for a in ("p:1", "d:1", "d:2"):
        r.record(a, True)
    r.record("d:1", False)
    r.record("d:1", False)
    assert r.mode == monitor_pb2.ROUTE_MODE_NORMAL
    assert r.table().decode_addresses == ["d:2"]
