"""Unit tests for fleetbus.router.liveness with an injected fake clock."""

from __future__ import annotations

import pytest

from fleetbus.router.liveness import LivenessTable, Peer


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def table(clock):
    return LivenessTable(clock=clock)


def reg(table, slot="a", rid=b"rid-a", hb=1000, liveness=3, pid=11):
    return table.register(slot, rid, pid, "stub", hb, liveness)


def test_register_records_peer(table, clock):
    p = reg(table)
    assert isinstance(p, Peer)
    assert table.peers["a"] is p
    assert (p.slot, p.routing_id, p.pid, p.adapter, p.heartbeat_ms, p.liveness) == ("a", b"rid-a", 11, "stub", 1000, 3)
    assert p.last_seen == p.registered_at == clock.t
    assert p.stale is False
    assert p.expiry() == clock.t + 3.0
    assert table.age("a") == 0.0


def test_healthy_within_limit_stale_after(table, clock):
    reg(table, hb=1000, liveness=3)
    clock.advance(2.9)
    assert table.sweep() == []
    assert not table.peers["a"].stale
    clock.advance(0.1)  # exactly heartbeat_ms × liveness: still healthy (now <= last_seen + limit)
    assert table.sweep() == []
    assert not table.peers["a"].stale
    clock.advance(0.001)
    newly = table.sweep()
    assert [p.slot for p in newly] == ["a"]
    assert table.peers["a"].stale


def test_limit_uses_each_peers_own_interval(table, clock):
    reg(table, "fast", b"f", hb=100, liveness=2)   # 0.2 s
    reg(table, "slow", b"s", hb=2000, liveness=5)  # 10 s
    clock.advance(0.3)
    assert [p.slot for p in table.sweep()] == ["fast"]
    clock.advance(9.0)
    assert table.sweep() == []
    clock.advance(1.0)
    assert [p.slot for p in table.sweep()] == ["slow"]


def test_sweep_reports_a_peer_only_once(table, clock):
    reg(table)
    clock.advance(10)
    assert len(table.sweep()) == 1
    assert table.sweep() == []
    clock.advance(100)
    assert table.sweep() == []
    assert table.peers["a"].stale


def test_seen_clears_stale_and_refreshes(table, clock):
    reg(table)
    clock.advance(5)
    assert len(table.sweep()) == 1
    p = table.seen(b"rid-a")
    assert p is table.peers["a"]
    assert p.stale is False
    assert p.last_seen == clock.t
    assert table.age("a") == 0.0
    assert table.sweep() == []
    clock.advance(3.5)
    assert [x.slot for x in table.sweep()] == ["a"]  # can go stale again, and is reported again


def test_seen_keeps_peer_healthy(table, clock):
    reg(table)
    for _ in range(10):
        clock.advance(2.0)
        assert table.seen(b"rid-a") is not None
        assert table.sweep() == []


def test_seen_unknown_routing_id(table):
    reg(table)
    assert table.seen(b"nobody") is None


def test_age(table, clock):
    assert table.age("a") is None
    reg(table)
    clock.advance(1.25)
    assert table.age("a") == pytest.approx(1.25)


def test_reregister_replaces_old_routing_id(table, clock):
    old = reg(table, rid=b"old", pid=1)
    clock.advance(10)
    table.sweep()
    assert old.stale
    new = reg(table, rid=b"new", pid=2)
    assert table.peers["a"] is new
    assert new.pid == 2 and new.stale is False and new.last_seen == clock.t
    assert table.seen(b"old") is None
    assert table.seen(b"new") is new
    assert table.remove(b"old") is None
    assert table.peers["a"] is new
    assert len(table.peers) == 1


def test_reregister_same_routing_id(table):
    reg(table, rid=b"same", pid=1)
    p = reg(table, rid=b"same", pid=2)
    assert table.seen(b"same") is p
    assert table.remove(b"same") is p
    assert table.peers == {}


def test_remove(table):
    a = reg(table, "a", b"ra")
    reg(table, "b", b"rb")
    assert table.remove(b"ra") is a
    assert "a" not in table.peers and "b" in table.peers
    assert table.seen(b"ra") is None
    assert table.remove(b"ra") is None
    assert table.age("a") is None
    assert table.remove(b"unknown") is None


def test_removed_peer_is_not_swept(table, clock):
    reg(table)
    table.remove(b"rid-a")
    clock.advance(100)
    assert table.sweep() == []


def test_next_interval_shortest(table):
    assert table.next_interval(1000) == 1.0
    reg(table, "a", b"a", hb=700)
    assert table.next_interval(1000) == pytest.approx(0.7)
    reg(table, "b", b"b", hb=300)
    reg(table, "c", b"c", hb=5000)
    assert table.next_interval(1000) == pytest.approx(0.3)
    table.remove(b"b")
    assert table.next_interval(1000) == pytest.approx(0.7)


def test_next_interval_never_longer_than_default(table):
    reg(table, "a", b"a", hb=5000)
    assert table.next_interval(1000) == pytest.approx(1.0)
    assert table.next_interval(10_000) == pytest.approx(5.0)


def test_default_clock_is_monotonic():
    import time

    t = LivenessTable()
    assert t.clock is time.monotonic
