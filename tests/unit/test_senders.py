"""agent/senders.py over a fake /proc: which processes an OTLP sender may name, by network
namespace (a pod), PID namespace (a container on the host network), ancestry and user.

Namespaces are told apart by inode, as in /proc/PID/ns/*: here, hard links to one file per
namespace. The real thing (a client in an unshare'd PID namespace) is
tests/integration/test_senders.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.senders import SenderCheck, _local_keys, _peer_ip
from agent.spans import SpanRecord

HOST_NET, POD_NET, HOST_PID, CTR_PID = "net-host", "net-pod", "pid-host", "pid-ctr"


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ns = root.parent / "ns"
        self.ns.mkdir()
        for name in (HOST_NET, POD_NET, HOST_PID, CTR_PID):
            (self.ns / name).write_text(name)
        self.tcp: dict[str, list[str]] = {}

    def process(self, pid, *, net=HOST_NET, pidns=HOST_PID, ppid=1, sockets=(), uid=None):
        d = self.root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "fd").mkdir()
        (d / "net").mkdir()
        os.link(self.ns / net, d / "ns" / "net")
        os.link(self.ns / pidns, d / "ns" / "pid")
        (d / "stat").write_text(f"{pid} (python) S {ppid} 1 1 0 -1\n")
        for i, inode in enumerate(sockets):
            os.symlink(f"socket:[{inode}]", d / "fd" / str(i + 3))
        self.tcp.setdefault(net, [])
        if uid is not None:
            os.chown(d, uid, uid)
        self._write_tcp()

    def socket(self, net, ip, port, inode, uid=0):
        from ipaddress import ip_address
        [(_name, local)] = _local_keys(ip_address(ip), port)[:1]
        self.tcp.setdefault(net, []).append(
            f"   0: {local} 0100007F:1092 01 00000000:00000000 00:00000000 00000000 "
            f"{uid:5d}        0 {inode} 1 0000000000000000 20 4 30 10 -1")
        self._write_tcp()

    def _write_tcp(self):
        for d in self.root.iterdir():
            if not d.name.isdigit() and d.name != "self":
                continue
            net = next(n for n in (HOST_NET, POD_NET)
                       if os.stat(d / "ns" / "net").st_ino == os.stat(self.ns / n).st_ino)
            head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt" \
                   "   uid  timeout inode\n"
            (d / "net" / "tcp").write_text(head + "\n".join(self.tcp.get(net, [])) + "\n")
            (d / "net" / "tcp6").write_text(head)


@pytest.fixture()
def proc(tmp_path):
    p = FakeProc(tmp_path / "proc")
    p.root.mkdir()
    p.process(1)                                   # host init
    p.process(100)                                 # the agent
    os.symlink("100", p.root / "self")
    return p


def span(pid: int, tid: int = 0) -> SpanRecord:
    return SpanRecord(trace_id="0af7651916cd43dd8448eb211c80319c", span_id=f"{pid:016x}",
                      parent_span_id="", name="s", service="svc", pid=pid, tid=tid or pid,
                      start_ns=1, end_ns=2, status="unset", kind="internal")


def test_a_pod_may_name_the_processes_of_its_network_namespace_only(proc):
    proc.process(200, net=POD_NET, sockets=[5001])     # the sender, in a pod
    proc.process(201, net=POD_NET, ppid=200)           # its sidecar: same pod
    proc.process(300)                                  # a host process
    proc.socket(POD_NET, "10.1.2.3", 40000, 5001)
    check = SenderCheck(proc=str(proc.root))
    peer = ("10.1.2.3", 40000)
    assert check.allowed_pids(peer) == {200, 201}
    out = check.check(peer, [span(200), span(201), span(300)])
    assert [(s.pid, s.tid) for s in out] == [(200, 200), (201, 201), (0, 0)]
    assert check.refused == 1


def test_a_host_process_may_name_itself_and_its_descendants_not_its_siblings(proc):
    proc.process(400, sockets=[6001])
    proc.process(401, ppid=400)
    proc.process(402, ppid=401)                        # a grandchild
    proc.process(500)                                  # unrelated
    proc.socket(HOST_NET, "127.0.0.1", 41000, 6001)
    check = SenderCheck(proc=str(proc.root))
    assert check.allowed_pids(("127.0.0.1", 41000)) >= {400, 401, 402}
    assert 500 not in check.allowed_pids(("127.0.0.1", 41000))
    assert 1 not in check.allowed_pids(("127.0.0.1", 41000))


def test_a_container_on_the_host_network_may_name_its_pid_namespace(proc):
    proc.process(600, pidns=CTR_PID, sockets=[7001])
    proc.process(601, pidns=CTR_PID, ppid=1)           # same container, not a descendant
    proc.process(700)                                  # the host's
    proc.socket(HOST_NET, "127.0.0.1", 42000, 7001)
    check = SenderCheck(proc=str(proc.root))
    allowed = check.allowed_pids(("127.0.0.1", 42000))
    assert {600, 601} <= allowed and 700 not in allowed


def test_an_unknown_or_ambiguous_sender_names_nothing(proc):
    proc.process(800, net=POD_NET)
    check = SenderCheck(proc=str(proc.root))
    assert check.sender(("10.9.9.9", 1234)) is None    # in no namespace
    assert check.sender(None) is None and check.sender(("not an ip", 1)) is None
    out = check.check(("10.9.9.9", 1234), [span(800)])
    assert out[0].pid == 0 and check.unknown == 1


def test_spans_without_process_ids_are_untouched(proc):
    check = SenderCheck(proc=str(proc.root))
    spans = [span(0)]
    assert check.check(("10.9.9.9", 1), spans) is spans


def test_peer_addresses():
    assert _peer_ip(("::ffff:10.0.0.1", 5))[0].version == 4
    assert _peer_ip(("fe80::1%eth0", 5))[1] == 5
