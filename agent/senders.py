"""Which processes the sender of an OTLP request may name in its spans.

A span that names a process (`spanflame.pid`, or the resource's `process.pid`) is linked to that
process's samples and renames its service, so a span may only name a process the agent can tie
to the sender of the request, from the request's TCP peer address:

1. **The sender's socket** is the TCP socket whose local address is the peer address. A loopback
   peer is in the agent's own network namespace; any other peer is looked up in every network
   namespace of the machine (`/proc/PID/net/tcp{,6}` of one process per namespace) and must be
   found in exactly one.
2. **A network namespace other than the host's** (a pod, a container): the sender may name every
   process in that namespace (the containers of a pod share it).
3. **The host's network namespace** (host processes, hostNetwork pods): the socket's owner (the
   process holding `socket:[inode]` under /proc/*/fd, cached per socket) may name itself, its
   descendants running as its user and, when it runs in a PID namespace of its own (a
   container), every process in that PID namespace.
4. **Otherwise** (the address was translated on the way, another machine, a collector in
   another pod) the sender is unknown and may name no process.

Process ids are host ids (after PID-namespace translation, agent/pidns.py), as /proc shows them.
`SenderCheck.check` keeps every span but takes pid, tid and task off those that name a process
their sender may not name (they stay listed, linked to no samples), counts them and logs once
per sender. It reads /proc: call it off the event loop. Thread-safe.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: How often the list of network namespaces (one process each) may be rebuilt, in seconds.
RESCAN_S = 1.0
#: At most this many /proc/*/fd scans (finding a host socket's owner) per second: each costs
#: a few ms to tens of ms; a flood of new connections must not turn into a flood of scans.
OWNER_SCANS_PER_S = 20
_TCP_LISTEN = "0A"
_CACHE_MAX = 4096
#: A connection's sender and its verdicts per named pid are kept this long, in seconds (an
#: exporter's keep-alive connection sends batch after batch: /proc is read once per connection
#: and period, not per batch).
VERDICT_TTL_S = 5.0


@dataclass(frozen=True)
class Sender:
    """Who sent a request: its network namespace and, on the host's network, its process."""

    netns: int               # inode of the sender's network namespace
    pid: int = 0             # the socket's owner, on the host's network only
    uid: int = -1            # its user
    pidns: int = 0           # its PID namespace, when not the host's (a container)

    def __str__(self) -> str:
        if self.pid:
            return f"PID {self.pid}"
        return f"network namespace {self.netns}"


def _ns(pid: int | str, kind: str, proc: str = "/proc") -> int:
    try:
        return os.stat(f"{proc}/{pid}/ns/{kind}").st_ino
    except OSError:
        return 0


def _peer_ip(peer) -> tuple[ipaddress._BaseAddress, int] | None:
    """(address, port) of a Starlette `request.client`, a (host, port) tuple or None."""
    if peer is None:
        return None
    try:
        host, port = peer[0], int(peer[1])
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except (ValueError, TypeError, IndexError):
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


def _local_keys(ip, port: int) -> list[tuple[str, str]]:
    """How /proc/net/tcp{,6} print a socket bound to (ip, port): (file, local_address)."""
    def words(raw: bytes) -> str:
        return "".join(f"{w:08X}" for w in struct.unpack(f"={len(raw) // 4}I", raw))
    if ip.version == 4:
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
        return [("tcp", f"{words(ip.packed)}:{port:04X}"),
                ("tcp6", f"{words(mapped.packed)}:{port:04X}")]
    return [("tcp6", f"{words(ip.packed)}:{port:04X}")]


def find_socket(rep: int | str, keys: list[tuple[str, str]],
                proc: str = "/proc") -> tuple[int, int] | None:
    """(inode, uid) of the non-listening TCP socket with one of these local addresses, in the
    network namespace of process `rep`; None if there is none."""
    for name, local in keys:
        try:
            with open(f"{proc}/{rep}/net/{name}") as f:
                next(f, None)
                for line in f:
                    if local not in line:
                        continue
                    fields = line.split()
                    if len(fields) > 9 and fields[1] == local and fields[3] != _TCP_LISTEN \
                            and fields[9] != "0":
                        return int(fields[9]), int(fields[7])
        except (OSError, ValueError):
            continue
    return None


class SenderCheck:
    """Ties OTLP requests to their senders and checks the processes their spans name.

    `metrics` (agent.metrics.Metrics) gets two counters: spans whose process ids were refused,
    and requests whose sender could not be identified.
    """

    def __init__(self, metrics=None, proc: str = "/proc") -> None:
        self.proc = proc
        self.own_netns = _ns("self", "net", proc)
        # /proc/1/ns may be unreadable even to root (seen here): then our own is the host's.
        self.host_netns = _ns(1, "net", proc) or self.own_netns
        # Process ids are in our PID namespace (what /proc shows us and pidns.to_host maps to):
        # a sender in that one is a "host" process, not a container.
        self.host_pidns = _ns("self", "pid", proc)
        self._lock = threading.Lock()
        self._owners: dict[int, int] = {}        # socket inode -> owner pid
        self._verdicts: dict = {}                # peer -> (when, Sender, {pid: may name})
        self._where: dict[str, int] = {}         # peer ip -> netns inode it was last found in
        self._reps: dict[int, int] = {}          # netns inode -> one pid in it
        self._reps_at = -RESCAN_S
        self._scans: list[float] = []
        self._warned: set[str] = set()
        self.refused = 0
        self.unknown = 0
        self._m_refused = self._m_unknown = None
        if metrics is not None:
            from prometheus_client import Counter
            self._m_refused = Counter(
                "spanflame_otlp_span_pids_refused",
                "spans kept without process ids: they named a process their sender may not name",
                registry=metrics.registry)
            self._m_unknown = Counter(
                "spanflame_otlp_senders_unknown",
                "OTLP requests whose sender could not be tied to a process or network namespace",
                registry=metrics.registry)

    # -- who sent it --------------------------------------------------------------------------

    def sender(self, peer) -> Sender | None:
        """The sender of a request from TCP peer `peer`, None if it cannot be told."""
        addr = _peer_ip(peer)
        if addr is None:
            return None
        ip, port = addr
        keys = _local_keys(ip, port)
        with self._lock:
            if ip.is_loopback:
                found = find_socket("self", keys, self.proc)
                netns = self.own_netns
            else:
                netns, found = self._search(str(ip), keys)
            if found is None:
                return None
            inode, uid = found
            if netns != self.host_netns:
                return Sender(netns=netns)
            owner = self._owner(inode, uid)
            if not owner:
                return None
            pidns = _ns(owner, "pid", self.proc)
            return Sender(netns=netns, pid=owner, uid=self._uid(owner),
                          pidns=pidns if pidns and pidns != self.host_pidns else 0)

    def _search(self, ip: str, keys) -> tuple[int, tuple[int, int] | None]:
        """The one network namespace holding a socket with these local addresses."""
        ns = self._where.get(ip)
        rep = self._reps.get(ns) if ns else None
        if rep is not None:
            found = find_socket(rep, keys, self.proc)
            if found is not None and _ns(rep, "net", self.proc) == ns:
                return ns, found
        self._rescan()
        hits = [(ns, f) for ns, rep in self._reps.items()
                if (f := find_socket(rep, keys, self.proc)) is not None]
        if len(hits) != 1:
            return 0, None  # nowhere, or ambiguous
        if len(self._where) >= _CACHE_MAX:
            self._where.clear()
        self._where[ip] = hits[0][0]
        return hits[0]

    def _rescan(self) -> None:
        now = time.monotonic()
        if now - self._reps_at < RESCAN_S:
            return
        self._reps_at = now
        reps: dict[int, int] = {}
        for name in os.listdir(self.proc):
            if name.isdigit():
                ns = _ns(name, "net", self.proc)
                if ns and ns not in reps:
                    reps[ns] = int(name)
        self._reps = reps

    def _owner(self, inode: int, uid: int) -> int:
        """The process holding socket `inode` (its user's processes first); 0 if none."""
        pid = self._owners.get(inode)
        if pid is not None:
            return pid
        now = time.monotonic()
        self._scans = [t for t in self._scans if now - t < 1.0]
        if len(self._scans) >= OWNER_SCANS_PER_S:
            return 0
        self._scans.append(now)
        target = f"socket:[{inode}]"
        pids = [int(n) for n in os.listdir(self.proc) if n.isdigit()]
        pids.sort(key=lambda p: self._uid(p) != uid)
        for p in pids:
            fd_dir = f"{self.proc}/{p}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"{fd_dir}/{fd}") == target:
                        if len(self._owners) >= _CACHE_MAX:
                            self._owners.clear()
                        self._owners[inode] = p
                        return p
                except OSError:
                    continue
        return 0

    def _uid(self, pid: int) -> int:
        try:
            return os.stat(f"{self.proc}/{pid}").st_uid
        except OSError:
            return -1

    def _ppid(self, pid: int) -> int:
        try:
            with open(f"{self.proc}/{pid}/stat", "rb") as f:
                return int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    # -- what it may name -----------------------------------------------------------------

    def may_name(self, sender: Sender | None, pid: int) -> bool:
        """True when `sender` may name host process `pid` (see the module's rules)."""
        if sender is None or pid <= 0:
            return False
        if not sender.pid:
            return _ns(pid, "net", self.proc) == sender.netns
        if pid == sender.pid:
            return True
        if sender.pidns and _ns(pid, "pid", self.proc) == sender.pidns:
            return True
        if self._uid(pid) != sender.uid:
            return False
        p = pid
        for _ in range(64):  # is the sender an ancestor?
            p = self._ppid(p)
            if p == sender.pid:
                return True
            if p <= 1:
                return False
        return False

    def allowed_pids(self, peer) -> set[int]:
        """Every process the sender of a request from `peer` may name now (a full /proc scan:
        for tools and tests; `check` tests only the processes spans name)."""
        s = self.sender(peer)
        if s is None:
            return set()
        return {int(n) for n in os.listdir(self.proc) if n.isdigit() and self.may_name(s, int(n))}

    def check(self, peer, spans: list) -> list:
        """`spans` (SpanRecords) of a request from `peer`, with pid, tid and task taken off each
        span that names a process its sender may not name."""
        named = {s.pid for s in spans if s.pid}
        if not named:
            return spans
        now = time.monotonic()
        key = (peer[0], peer[1]) if peer else None
        with self._lock:
            hit = self._verdicts.get(key)
            if hit is None or now - hit[0] > VERDICT_TTL_S:
                hit = None
        if hit is None:
            sender = self.sender(peer)
            hit = (now, sender, {})
            with self._lock:
                if len(self._verdicts) >= _CACHE_MAX:
                    self._verdicts.clear()
                self._verdicts[key] = hit
        _at, sender, verdicts = hit
        if sender is None:
            self.unknown += 1
            if self._m_unknown is not None:
                self._m_unknown.inc()
        for pid in named - verdicts.keys():
            verdicts[pid] = self.may_name(sender, pid)
        ok = {pid for pid in named if verdicts[pid]}
        if ok == named:
            return spans
        out = []
        refused = 0
        for s in spans:
            if s.pid and s.pid not in ok:
                s = dataclasses.replace(s, pid=0, tid=0, task=0)
                refused += 1
            out.append(s)
        self.refused += refused
        if self._m_refused is not None:
            self._m_refused.inc(refused)
        self._warn(peer, sender, named - ok)
        return out

    def _warn(self, peer, sender: Sender | None, pids: set[int]) -> None:
        who = str(sender) if sender is not None else f"unknown ({peer[0] if peer else '?'})"
        with self._lock:
            if who in self._warned:
                return
            if len(self._warned) >= 256:
                self._warned.clear()
            self._warned.add(who)
        log.warning("OTLP spans from %s name processes it may not name (%s): kept without "
                    "process ids (counted in spanflame_otlp_span_pids_refused_total)",
                    "sender " + who, ", ".join(map(str, sorted(pids)[:5])))
