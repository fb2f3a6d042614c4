"""The embedded store: an SQLite database (WAL) under --store with one gzipped pprof per process,
window and sample type, the spans and their breakdowns, and an index of which spans each profile
holds.

Crash safety: every write is one transaction; SQLite commits in WAL mode with synchronous=FULL
are durable once `commit` returns, so a kill -9 (or power loss) at any moment loses nothing that
was acknowledged. A write that finds the disk full raises `StoreFull` (naming the database and
the free space; `full` says why until a write succeeds again) and changes nothing.

Retention: by age, then by size: `max_bytes` bounds the database file (pages in use), the oldest
profiles (then spans) go first, and the freed pages are given back to the filesystem
(auto_vacuum=INCREMENTAL, then a truncating WAL checkpoint), so the file shrinks.

Queries merge the profiles of a time range (and label filters) into one Profile. A span query
reads only the profiles whose index says they hold the span.

Threading: one connection per thread (sqlite3 objects are not shared); writers serialise on
SQLite's own lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from agent import pprof
from agent.errors import SpanflameError, StoreFull
from agent.model import Profile

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    id INTEGER PRIMARY KEY,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    type TEXT NOT NULL,
    service TEXT NOT NULL,
    pid INTEGER NOT NULL DEFAULT 0,
    labels TEXT NOT NULL,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    total INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS profiles_time ON profiles(type, start_ns);
CREATE INDEX IF NOT EXISTS profiles_service ON profiles(service, type, start_ns);
CREATE TABLE IF NOT EXISTS blobs (
    id INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS profile_spans (
    span_id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    profile_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS profile_spans_span ON profile_spans(span_id);
CREATE INDEX IF NOT EXISTS profile_spans_trace ON profile_spans(trace_id);
CREATE INDEX IF NOT EXISTS profile_spans_profile ON profile_spans(profile_id);
CREATE TABLE IF NOT EXISTS spans (
    span_id TEXT PRIMARY KEY,
    trace_id TEXT NOT NULL,
    parent_span_id TEXT NOT NULL,
    name TEXT NOT NULL,
    service TEXT NOT NULL,
    pid INTEGER NOT NULL,
    tid INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    duration_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    kind TEXT NOT NULL,
    attributes TEXT NOT NULL,
    breakdown TEXT
);
CREATE TABLE IF NOT EXISTS series (
    service TEXT NOT NULL,
    type TEXT NOT NULL,
    pid INTEGER NOT NULL,
    labels TEXT NOT NULL,
    first_ns INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    PRIMARY KEY (service, type, pid, labels)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spans_trace ON spans(trace_id);
CREATE INDEX IF NOT EXISTS spans_time ON spans(start_ns);
CREATE INDEX IF NOT EXISTS spans_duration ON spans(service, duration_ns);
CREATE INDEX IF NOT EXISTS spans_longest ON spans(duration_ns);
CREATE INDEX IF NOT EXISTS spans_end ON spans(end_ns);
CREATE INDEX IF NOT EXISTS spans_name ON spans(name, start_ns);
"""

#: Series label keys kept in the index (queries filter on them without decoding).
INDEX_LABELS = ("service_name", "pid", "node", "container_id", "namespace", "pod", "container")


def _span_subquery(span_id, trace_id, span_ids) -> tuple[str, list]:
    """Profile ids holding these spans (or this trace), from the span index."""
    where, args = [], []
    if span_ids:
        ids = list(span_ids)[:500]
        where.append(f"span_id IN ({','.join('?' * len(ids))})")
        args += ids
    if span_id:
        where.append("span_id = ?")
        args.append(span_id)
    if trace_id:
        where.append("trace_id = ?")
        args.append(trace_id)
    return "SELECT profile_id FROM profile_spans WHERE " + " AND ".join(where), args


_SEP = (",", ":")
#: a span's breakdown repeats these fields of its row: stored once, in the row
_ROW_KEYS = ("trace_id", "span_id", "parent_span_id", "name", "service", "pid", "tid",
             "start_ns", "duration_ns", "status")
#: its parts: stored only when not zero
_ZERO_KEYS = ("cpu_ns", "lock_ns", "gil_ns", "sync_ns", "await_ns", "io_ns", "net_ns", "other_ns",
              "children_ns", "unaccounted_ns", "unobserved_ns", "samples")


def _pack_breakdown(bd: dict, row: dict) -> str:
    """A breakdown as stored: without what its row holds and without zero parts (a third of
    its size; spans are most of a store's bytes). `_unpack_breakdown` gives it back whole."""
    if not all(k in bd for k in _ROW_KEYS):  # not a span's breakdown: kept as it is
        return json.dumps(bd, separators=_SEP)
    row = {**row, "duration_ns": row["end_ns"] - row["start_ns"]}
    out = {k: v for k, v in bd.items()
           if not (k in _ROW_KEYS and row.get(k) == v) and not (k in _ZERO_KEYS and v == 0)
           and not (k == "top" and not v)}
    out["_packed"] = 1
    return json.dumps(out, separators=_SEP)


def _unpack_breakdown(bd: dict, row: dict) -> dict:
    if not isinstance(bd, dict) or not bd.pop("_packed", 0):  # stored whole (older stores)
        return bd
    for k in _ROW_KEYS:
        bd.setdefault(k, row.get(k))
    for k in _ZERO_KEYS:
        bd.setdefault(k, 0)
    bd.setdefault("top", {})
    return bd


@dataclass(frozen=True)
class StoredProfile:
    id: int
    start_ns: int
    end_ns: int
    type: str
    service: str
    pid: int
    labels: dict
    source: str
    size: int


class Store:
    def __init__(self, path: str | os.PathLike, *, retention_s: float = 72 * 3600,
                 max_bytes: int = 10 << 30, read_only: bool = False,
                 reserve_bytes: int = 2 << 20) -> None:
        self.dir = Path(path)
        self.read_only = read_only
        self.db_path = self.dir / "spanflame.db"
        if read_only:
            if not self.db_path.is_file():
                raise SpanflameError(f"no spanflame store in {self.dir} (no spanflame.db)")
        else:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SpanflameError(f"cannot use store {self.dir}: {exc.strerror or exc}") from None
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        #: disk held in spanflame.reserve, given up so that retention can delete on a full disk
        self.reserve_bytes = reserve_bytes
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.writes = 0
        self.deleted = 0
        self.compacted = 0
        self.spans_thinned = 0
        self._thinned_until: int | None = None
        self._kept_traces: set[str] = set()
        #: why the last write failed for a full disk (None once a write succeeds)
        self.full: str | None = None
        self.full_errors = 0
        #: called with the StoreFull of each write refused for a full disk (metrics, health)
        self.on_full = None
        self._full_logged = self._full_at = 0.0
        try:
            con = self._con()
            if read_only:
                con.execute("SELECT COUNT(*) FROM profiles").fetchone()
            else:
                self._use_incremental_vacuum(con)
                con.executescript(SCHEMA)
                con.commit()
                self._backfill_series(con)
                self._take_reserve()
        except sqlite3.Error as exc:
            raise SpanflameError(f"cannot open store {self.db_path}: {exc}") from None

    def _use_incremental_vacuum(self, con: sqlite3.Connection) -> None:
        """Pages freed by retention go back to the filesystem (PRAGMA incremental_vacuum) only
        with auto_vacuum=INCREMENTAL: set before the first table, or by one VACUUM for a store
        written before."""
        if con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return
        con.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None:
            log.info("store %s: converting to incremental vacuum (one VACUUM)", self.db_path)
        try:  # (an empty database too: WAL mode has already written its first page)
            con.execute("VACUUM")
        except sqlite3.Error as exc:  # e.g. no room for the copy: retention still deletes
            log.warning("store %s: VACUUM failed (%s); freed space is reused but the file "
                        "will not shrink", self.db_path, exc)

    def _backfill_series(self, con: sqlite3.Connection) -> None:
        """Stores written before the series table existed: build it once from the profiles."""
        if con.execute("SELECT 1 FROM series LIMIT 1").fetchone() is not None:
            return
        if con.execute("SELECT 1 FROM profiles LIMIT 1").fetchone() is None:
            return
        with self._txn(con):
            con.execute("INSERT OR IGNORE INTO series SELECT service, type, pid, labels, "
                        "MIN(start_ns), MAX(end_ns) FROM profiles "
                        "GROUP BY service, type, pid, labels")

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None and self.read_only:
            # Read-only: never creates, migrates or writes anything (a running agent may own it).
            uri = f"file:{self.db_path}?mode=ro"
            con = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None,
                                  check_same_thread=True)
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        if con is None:
            con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None,
                                  check_same_thread=True)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=OFF")
            con.execute("PRAGMA busy_timeout=30000")
            # The WAL is truncated back to this after checkpoints (it counts in the file size).
            con.execute("PRAGMA journal_size_limit=4194304")
            self._local.con = con
        return con

    @contextlib.contextmanager
    def _txn(self, con: sqlite3.Connection):
        """One write transaction, under the write lock. On any error it is rolled back if SQLite
        has not already done so (a failed COMMIT on a full disk has: a second ROLLBACK would
        replace the real error with "cannot rollback - no transaction is active"); a full disk
        becomes StoreFull."""
        with self._write_lock:
            try:
                con.execute("BEGIN IMMEDIATE")
                yield con
                con.execute("COMMIT")
            except BaseException as exc:
                if con.in_transaction:
                    try:
                        con.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(exc, sqlite3.Error) and _is_full(exc):
                    raise self._full(exc) from None
                raise
        if self.full is not None and time.monotonic() - self._full_at > 60:
            self.full = None  # (a small write may pass on a disk still full: not at once)

    def _full(self, exc: sqlite3.Error) -> StoreFull:
        try:
            st = os.statvfs(self.dir)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = None
        err = StoreFull(str(self.db_path), free)
        self.full = str(err)
        self.full_errors += 1
        now = self._full_at = time.monotonic()
        if now - self._full_logged > 60:  # once a minute while it lasts
            self._full_logged = now
            log.error("%s (on the filesystem of %s; SQLite: %s): writes are refused until "
                      "space is freed or retention deletes enough", err, self.dir, exc)
        if self.on_full is not None:
            self.on_full(err)
        return err

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # -- writing ------------------------------------------------------------------------------
    def add_profile(self, profile: Profile, *, type_name: str, service: str, pid: int = 0,
                    labels: dict | None = None, source: str = "agent",
                    spans: Iterable[tuple[str, str]] = ()) -> int:
        """Store `profile` (gzipped pprof) as the `type_name` profile of a series; `spans` are the
        (span_id, trace_id) pairs its samples carry. Returns the profile id once durable."""
        data = pprof.encode(profile)
        return self.add_raw(data, start_ns=profile.time_ns,
                            end_ns=profile.time_ns + profile.duration_ns, type_name=type_name,
                            service=service, pid=pid, labels=labels or {}, source=source,
                            spans=spans, total=profile.total(type_name)
                            if profile.has_type(type_name) else 0)

    def add_raw(self, data: bytes, *, start_ns: int, end_ns: int, type_name: str, service: str,
                pid: int, labels: dict, source: str, spans: Iterable[tuple[str, str]] = (),
                total: int = 0) -> int:
        con = self._con()
        with self._txn(con):
            lab = json.dumps(labels, sort_keys=True)
            cur = con.execute(
                "INSERT INTO profiles(start_ns, end_ns, type, service, pid, labels, source, "
                "size, total) VALUES (?,?,?,?,?,?,?,?,?)",
                (start_ns, end_ns, type_name, service, pid, lab, source, len(data), total))
            con.execute(
                "INSERT INTO series VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "first_ns = MIN(first_ns, excluded.first_ns), "
                "last_ns = MAX(last_ns, excluded.last_ns)",
                (service, type_name, pid, lab, start_ns, end_ns))
            pid_row = cur.lastrowid
            con.execute("INSERT INTO blobs(id, data) VALUES (?, ?)", (pid_row, data))
            con.executemany("INSERT INTO profile_spans(span_id, trace_id, profile_id) "
                            "VALUES (?,?,?)", [(s, t, pid_row) for s, t in spans])
        self.writes += 1
        return pid_row

    def add_spans(self, rows: Sequence[dict]) -> None:
        """Insert or replace spans (dicts with SpanRecord fields, plus an optional breakdown)."""
        if not rows:
            return
        con = self._con()
        with self._txn(con):
            con.executemany(
                "INSERT OR REPLACE INTO spans(span_id, trace_id, parent_span_id, name, "
                "service, pid, tid, start_ns, end_ns, duration_ns, status, kind, attributes, "
                "breakdown) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(r["span_id"], r["trace_id"], r.get("parent_span_id", ""), r["name"],
                  r["service"], r.get("pid", 0), r.get("tid", 0), r["start_ns"], r["end_ns"],
                  r["end_ns"] - r["start_ns"], r.get("status", "unset"),
                  r.get("kind", "internal"), json.dumps(r.get("attributes", {}), separators=_SEP),
                  _pack_breakdown(r["breakdown"], r) if r.get("breakdown") is not None else None)
                 for r in rows])

    def insert_spans(self, rows: Sequence[tuple]) -> None:
        """New spans as `spans` rows (agent/spanwriter.py span_row), in one transaction; a span
        already stored (resent, or with its breakdown written since) is kept as it is."""
        if not rows:
            return
        con = self._con()
        with self._txn(con):
            con.executemany("INSERT OR IGNORE INTO spans(span_id, trace_id, parent_span_id, "
                            "name, service, pid, tid, start_ns, end_ns, duration_ns, status, "
                            "kind, attributes, breakdown) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            rows)

    # -- reading ------------------------------------------------------------------------------
    def find(self, *, start_ns: int, end_ns: int, type_name: str, service: str | None = None,
             pid: int | None = None, labels: dict | None = None,
             span_id: str | None = None, trace_id: str | None = None,
             span_ids: Sequence[str] | None = None,
             limit: int = 100_000) -> list[StoredProfile]:
        """Profiles of `type_name` overlapping [start_ns, end_ns) that match every filter."""
        q = ["SELECT p.id, p.start_ns, p.end_ns, p.type, p.service, p.pid, p.labels, p.source, "
             "p.size FROM profiles p"]
        args: list = []
        where = ["p.type = ?", "p.start_ns < ?", "p.end_ns > ?"]
        args += [type_name, end_ns, start_ns]
        if span_id or trace_id or span_ids:
            # Through the span index first: a span is in a handful of profiles, a type and a
            # time range can be in hundreds of thousands. (A unary + keeps SQLite off the
            # type/time and service indexes here.)
            where = ["+p.type = ?", "+p.start_ns < ?", "p.end_ns > ?"]
            sub, sargs = _span_subquery(span_id, trace_id, span_ids)
            where.append(f"p.id IN ({sub})")
            args += sargs
        if service is not None:
            where.append("+p.service = ?" if (span_id or trace_id or span_ids) else "p.service = ?")
            args.append(service)
        if pid is not None:
            where.append("p.pid = ?")
            args.append(pid)
        q.append("WHERE " + " AND ".join(where))
        q.append("GROUP BY p.id ORDER BY p.start_ns LIMIT ?")
        args.append(limit)
        rows = self._con().execute(" ".join(q), args).fetchall()
        out = []
        for r in rows:
            lab = json.loads(r[6])
            if labels and any(str(lab.get(k)) != str(v) for k, v in labels.items()):
                continue
            out.append(StoredProfile(r[0], r[1], r[2], r[3], r[4], r[5], lab, r[7], r[8]))
        return out

    def blob(self, profile_id: int) -> bytes | None:
        row = self._con().execute("SELECT data FROM blobs WHERE id = ?", (profile_id,)).fetchone()
        return row[0] if row else None

    def merged(self, found: Sequence[StoredProfile], *, sample_labels: dict | None = None,
               type_name: str | None = None, tags: dict | None = None) -> Profile | None:
        """Decode and merge stored profiles, keeping samples whose labels match `sample_labels`.

        `tags` are filters outside the index (e.g. a pushed `env`): a profile whose series
        labels have the key must match it there, else its samples must carry it."""
        merged = None
        for sp in found:
            sample_filter = sample_labels
            if tags:
                if any(k in sp.labels and str(sp.labels[k]) != str(v) for k, v in tags.items()):
                    continue
                rest = {k: v for k, v in tags.items() if k not in sp.labels}
                sample_filter = {**(sample_labels or {}), **rest} or None
            data = self.blob(sp.id)
            if data is None:
                continue
            try:
                prof = pprof.decode(data)
            except SpanflameError as exc:  # a stored blob we cannot read: skip it, log once
                log.warning("stored profile %d unreadable: %s", sp.id, exc)
                continue
            if sample_filter:
                prof = prof.filtered(sample_filter)
            if merged is None:
                merged = prof
            else:
                merged.merge(prof)
        if merged is not None and type_name:
            merged.default_sample_type = type_name
        return merged

    def services(self, start_ns: int = 0, end_ns: int = 1 << 62) -> list[dict]:
        """Services with data in the range: their sample types, pids, Kubernetes pods and each
        pid's stack source (`sources`: pid -> "bpf" | "py-spy").

        From the series table (one row per series, kept on every write), not a scan of the
        profiles; stores without it (opened read-only, written by an older agent) are scanned.
        """
        con = self._con()
        try:
            rows = con.execute(
                "SELECT service, type, pid, labels, first_ns, last_ns FROM series "
                "WHERE first_ns < ? AND last_ns > ?", (end_ns, start_ns)).fetchall()
        except sqlite3.OperationalError:
            rows = con.execute(
                "SELECT service, type, pid, labels, MIN(start_ns), MAX(end_ns) FROM profiles "
                "WHERE start_ns < ? AND end_ns > ? GROUP BY service, type, pid, labels",
                (end_ns, start_ns)).fetchall()
        out: dict[str, dict] = {}
        for service, t, pid, labels, lo, hi in rows:
            d = out.setdefault(service, {"service": service, "types": set(), "pids": set(),
                                         "pods": set(), "sources": {}, "from_ns": lo,
                                         "until_ns": hi})
            d["types"].add(t)
            if pid:
                d["pids"].add(int(pid))
            try:
                lab = json.loads(labels)
            except ValueError:
                lab = {}
            if lab.get("pod"):
                d["pods"].add(f"{lab.get('namespace', '')}/{lab['pod']}")
            if pid and lab.get("stack_source"):
                d["sources"][str(int(pid))] = str(lab["stack_source"])
            d["from_ns"] = min(d["from_ns"], lo)
            d["until_ns"] = max(d["until_ns"], hi)
        return [{**d, "types": sorted(d["types"]), "pids": sorted(d["pids"]),
                 "pods": sorted(d["pods"])} for _k, d in sorted(out.items())]

    def types(self, start_ns: int, end_ns: int, *, service: str | None = None,
              pid: int | None = None, span_ids: Sequence[str] | None = None,
              trace_id: str | None = None) -> list[str]:
        """The sample types stored for the range (and service, pid, spans or trace)."""
        q = "SELECT DISTINCT p.type FROM profiles p"
        where, args = ["p.start_ns < ?", "p.end_ns > ?"], [end_ns, start_ns]
        if span_ids or trace_id:
            where[0] = "+p.start_ns < ?"
            sub, sargs = _span_subquery(None, trace_id, span_ids)
            where.append(f"p.id IN ({sub})")
            args += sargs
        if service is not None:
            where.append("p.service = ?")
            args.append(service)
        if pid is not None:
            where.append("p.pid = ?")
            args.append(pid)
        rows = self._con().execute(q + " WHERE " + " AND ".join(where), args).fetchall()
        return sorted(r[0] for r in rows)

    def first_start(self, *, start_ns: int, end_ns: int, type_name: str,
                    service: str | None = None, pid: int | None = None) -> int | None:
        """When the first profile of the type in [start_ns, end_ns) starts; None if none."""
        q = "SELECT MIN(start_ns) FROM profiles WHERE type = ? AND start_ns >= ? AND start_ns < ?"
        args: list = [type_name, start_ns, end_ns]
        if service is not None:
            q += " AND service = ?"
            args.append(service)
        if pid is not None:
            q += " AND pid = ?"
            args.append(pid)
        row = self._con().execute(q, args).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def timeline(self, *, start_ns: int, end_ns: int, type_name: str, buckets: int = 60,
                 service: str | None = None, pid: int | None = None) -> list[list[int]]:
        """[bucket start ns, total value] over the range: activity over time without decoding."""
        width = max(1, (end_ns - start_ns) // buckets)
        # TOTAL, not SUM: a float sum never raises SQLite's integer overflow
        q = ("SELECT (start_ns - ?) / ?, TOTAL(total) FROM profiles WHERE type = ? AND "
             "start_ns >= ? AND start_ns < ?")
        args: list = [start_ns, width, type_name, start_ns, end_ns]
        if service is not None:
            q += " AND service = ?"
            args.append(service)
        if pid is not None:
            q += " AND pid = ?"
            args.append(pid)
        q += " GROUP BY 1 ORDER BY 1"
        got = {int(b): int(min(v or 0, 2.0**63 - 1024))
               for b, v in self._con().execute(q, args).fetchall()}
        return [[start_ns + i * width, got.get(i, 0)] for i in range(buckets)]

    def span(self, span_id: str) -> dict | None:
        rows = self._spans("WHERE span_id = ?", (span_id,))
        return rows[0] if rows else None

    def trace(self, trace_id: str) -> list[dict]:
        return self._spans("WHERE trace_id = ? ORDER BY start_ns", (trace_id,))

    def slow_spans(self, *, start_ns: int, end_ns: int, service: str | None = None,
                   name: str | None = None, min_duration_ns: int = 0,
                   limit: int = 100) -> list[dict]:
        if end_ns - start_ns > 3600 * 10**9:
            # Over long ranges, walk spans longest first and stop at `limit` (spans_longest)
            # rather than sort every span of the range; over short ones, take the spans ending
            # in it (spans_end) and sort those. (Unary + and `+ 0` keep SQLite off the other.)
            where = ["+start_ns < ?", "+end_ns > ?", "duration_ns >= ?"]
            order = "duration_ns DESC"
        else:
            where = ["+start_ns < ?", "end_ns > ?", "+duration_ns >= ?"]
            order = "duration_ns + 0 DESC"
        args: list = [end_ns, start_ns, min_duration_ns]
        if service:
            where.append("service = ?")
            args.append(service)
        if name:
            where.append("name = ?")
            args.append(name)
        args.append(limit)
        return self._spans("WHERE " + " AND ".join(where) + f" ORDER BY {order} LIMIT ?", args)

    def recent_spans(self, since_ns: int, limit: int = 200_000) -> list[dict]:
        """Spans that ended after `since_ns`, oldest first (to hold again after a restart)."""
        return self._spans("WHERE end_ns > ? ORDER BY end_ns LIMIT ?", (since_ns, limit))

    def spans_near(self, name: str, service: str, t_ns: int, start_ns: int, end_ns: int,
                   limit: int = 20) -> list[dict]:
        """Spans of this name and service in the range, nearest to t_ns first."""
        return self._spans("WHERE name = ? AND start_ns >= ? AND start_ns < ? AND service = ? "
                           "ORDER BY ABS(start_ns - ?) LIMIT ?",
                           (name, start_ns, end_ns, service, t_ns, limit))

    def _spans(self, where: str, args) -> list[dict]:
        rows = self._con().execute(
            "SELECT span_id, trace_id, parent_span_id, name, service, pid, tid, start_ns, end_ns, "
            "duration_ns, status, kind, attributes, breakdown FROM spans " + where, args).fetchall()
        keys = ("span_id", "trace_id", "parent_span_id", "name", "service", "pid", "tid",
                "start_ns", "end_ns", "duration_ns", "status", "kind")
        out = []
        for r in rows:
            d = dict(zip(keys, r[:12]))
            d["attributes"] = json.loads(r[12])
            d["breakdown"] = _unpack_breakdown(json.loads(r[13]), d) if r[13] else None
            out.append(d)
        return out

    # -- retention ----------------------------------------------------------------------------
    def size_bytes(self) -> int:
        """The files on disk: the database and its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            p = Path(str(self.db_path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    def disk_bytes(self) -> int:
        """What the store takes on disk, as `du -sb` of its directory counts it: every file in
        it (the database, its WAL and shared memory, the disk-full reserve)."""
        total = 0
        for root, _dirs, files in os.walk(self.dir):
            for name in files:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:  # a WAL checkpointed away meanwhile
                    pass
        return total

    def used_bytes(self) -> int:
        """Bytes of the database's pages in use (the file less its free pages)."""
        con = self._con()
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        size = con.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * size

    def data_bytes(self) -> int:
        row = self._con().execute("SELECT COALESCE(SUM(size), 0) FROM profiles").fetchone()
        return int(row[0])

    def enforce_retention(self, now_ns: int | None = None) -> int:
        """Delete profiles and spans older than the retention, then the oldest data (profiles or
        spans) until the database's pages in use fit `max_bytes`; give the freed pages back to
        the filesystem. Returns profiles deleted.

        Deleting writes too (the WAL): on a disk that is full, the reserve file is given up
        first so that retention can run, and taken again once there is room."""
        try:
            return self._enforce_retention(now_ns)
        except StoreFull:
            if not self._release_reserve():
                raise
            return self._enforce_retention(now_ns)
        finally:
            self._take_reserve()

    def _reserve_path(self) -> Path:
        return self.dir / "spanflame.reserve"

    def _take_reserve(self) -> None:
        """Hold `reserve_bytes` of the disk in a file, to be given up when the disk is full."""
        path = self._reserve_path()
        if self.read_only or not self.reserve_bytes or path.exists():
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
        except OSError:  # no room yet: try again after the next retention
            with contextlib.suppress(OSError):
                path.unlink()

    def _release_reserve(self) -> bool:
        try:
            self._reserve_path().unlink()
        except OSError:
            return False
        log.warning("store %s: disk full, gave up the %d-byte reserve so that retention can "
                    "delete", self.dir, self.reserve_bytes)
        return True

    def _enforce_retention(self, now_ns: int | None) -> int:
        now_ns = now_ns or time.time_ns()
        cutoff = now_ns - int(self.retention_s * 1e9)
        con = self._con()
        ids = [r[0] for r in con.execute("SELECT id FROM profiles WHERE end_ns < ?", (cutoff,))]
        deleted = self._delete_profiles(con, ids)
        with self._txn(con):
            con.execute("DELETE FROM spans WHERE end_ns < ?", (cutoff,))
            con.execute("DELETE FROM series WHERE last_ns < ?", (cutoff,))
        for _round in range(64):
            excess = self.used_bytes() - self.max_bytes
            if excess <= 0:
                break
            # Oldest data first, profiles or spans. A profile's pages are about its blob plus
            # its rows, a span's about 400 bytes with its indexes: delete about the excess,
            # then measure again.
            oldest_p = con.execute("SELECT MIN(start_ns) FROM profiles").fetchone()[0]
            oldest_s = con.execute("SELECT MIN(end_ns) FROM spans").fetchone()[0]
            if oldest_p is None and oldest_s is None:
                break
            if oldest_s is not None and (oldest_p is None or oldest_s < oldest_p):
                bound = oldest_p if oldest_p is not None else 1 << 63
                with self._txn(con):
                    con.execute("DELETE FROM spans WHERE span_id IN (SELECT span_id FROM spans "
                                "WHERE end_ns <= ? ORDER BY end_ns LIMIT ?)",
                                (bound, max(16, excess // 400)))
                continue
            ids, acc = [], 0
            for pid_, size, start in con.execute(
                    "SELECT id, size, start_ns FROM profiles ORDER BY start_ns"):
                if ids and oldest_s is not None and start > oldest_s:
                    break
                ids.append(pid_)
                acc += size + 200
                if acc >= excess:
                    break
            deleted += self._delete_profiles(con, ids)
        self.deleted += deleted
        self._give_back(con)
        if deleted:
            self.full = None
        return deleted

    def compact(self, before_ns: int, bucket_s: float = 60.0, max_groups: int = 200) -> int:
        """Merge the agent's window profiles that ended before `before_ns` into one profile per
        series and `bucket_s` (aligned), the span links moving with them: half the bytes of
        10 s windows (measured: bench/store_growth.py), and fewer rows to scan. At most
        `max_groups` merges per call (the caller comes back). Returns profiles merged away."""
        bucket = int(bucket_s * 1e9)
        con = self._con()
        rows = con.execute(
            "SELECT id, start_ns, end_ns, type, service, pid, labels, source FROM profiles "
            "WHERE source = 'agent' AND end_ns < ? AND end_ns - start_ns < ? "
            "ORDER BY start_ns LIMIT ?", (before_ns, bucket, 50 * max_groups)).fetchall()
        groups: dict[tuple, list] = {}
        for r in rows:
            if r[1] // bucket != (r[2] - 1) // bucket:
                continue  # straddles two buckets: left as it is
            groups.setdefault((r[3], r[4], r[5], r[6], r[1] // bucket), []).append(r)
        merged_away = 0
        for (type_name, service, pid, labels, _b), members in list(groups.items())[:max_groups]:
            if len(members) < 2:
                continue
            ids = [m[0] for m in members]
            prof = None
            for m in members:
                blob = self.blob(m[0])
                if blob is None:
                    continue
                try:
                    p = pprof.decode(blob)
                except Exception:  # stored by us, so not expected; kept as it is
                    log.warning("store %s: profile %d unreadable, not compacted", self.dir, m[0])
                    prof = None
                    break
                if prof is None:
                    prof = p
                else:
                    prof.merge(p)
            if prof is None:
                continue
            prof.time_ns = min(m[1] for m in members)
            prof.duration_ns = max(m[2] for m in members) - prof.time_ns
            data = pprof.encode(prof)
            marks = ",".join("?" * len(ids))
            with self._txn(con):
                cur = con.execute(
                    "INSERT INTO profiles(start_ns, end_ns, type, service, pid, labels, source, "
                    "size, total) VALUES (?,?,?,?,?,?,?,?,?)",
                    (prof.time_ns, prof.time_ns + prof.duration_ns, type_name, service, pid,
                     labels, "agent", len(data),
                     prof.total(type_name) if prof.has_type(type_name) else 0))
                new = cur.lastrowid
                con.execute("INSERT INTO blobs(id, data) VALUES (?, ?)", (new, data))
                con.execute("INSERT INTO profile_spans(span_id, trace_id, profile_id) "
                            f"SELECT DISTINCT span_id, trace_id, ? FROM profile_spans "
                            f"WHERE profile_id IN ({marks})", [new, *ids])
                con.execute(f"DELETE FROM profiles WHERE id IN ({marks})", ids)
                con.execute(f"DELETE FROM blobs WHERE id IN ({marks})", ids)
                con.execute(f"DELETE FROM profile_spans WHERE profile_id IN ({marks})", ids)
            merged_away += len(ids) - 1
        self.compacted += merged_away
        return merged_away

    def thin_spans(self, before_ns: int, keep: int = 10, slice_s: float = 600.0) -> int:
        """Spans that started before `before_ns` keep only what the slow-span views and traces
        need: per service, span name and minute the `keep` slowest, every error, and every span
        of their traces. One `slice_s` slice per call, oldest first (the caller comes back).
        Spans are most of a store's bytes (an app sending 7 spans/s: 417 MB a day); this keeps
        about 1 in 40 of such an app's. Returns spans deleted."""
        con = self._con()
        if self._thinned_until is None:
            row = con.execute("SELECT MIN(start_ns) FROM spans").fetchone()
            if row is None or row[0] is None:
                return 0
            self._thinned_until = int(row[0])
        lo = self._thinned_until
        hi = min(before_ns, lo + int(slice_s * 1e9))
        if hi <= lo:
            return 0
        rows = con.execute("SELECT span_id, trace_id, service, name, start_ns, duration_ns, "
                           "status FROM spans WHERE start_ns >= ? AND start_ns < ?",
                           (lo, hi)).fetchall()
        buckets: dict[tuple, list] = {}
        traces = set(self._kept_traces)
        for r in rows:
            if r[6] == "error":
                traces.add(r[1])
            buckets.setdefault((r[2], r[3], r[4] // 60_000_000_000), []).append(r)
        for group in buckets.values():
            group.sort(key=lambda r: -r[5])
            traces.update(r[1] for r in group[:keep])
        gone = [r[0] for r in rows if r[1] not in traces]
        self._delete_where_in(con, gone, "spans", "span_id", "profile_spans", "span_id")
        # a trace crossing into the next slice keeps its spans there too
        self._kept_traces = {r[1] for r in rows if r[1] in traces and r[4] >= hi - 60 * 10**9}
        self._thinned_until = hi
        self.spans_thinned += len(gone)
        return len(gone)

    def _delete_profiles(self, con: sqlite3.Connection, ids: list[int]) -> int:
        self._delete_where_in(con, ids, "profiles", "id", "blobs", "id",
                              "profile_spans", "profile_id")
        return len(ids)

    def _delete_where_in(self, con: sqlite3.Connection, keys: list, *table_columns: str) -> None:
        """DELETE FROM table WHERE column IN keys, for each (table, column) pair given, 500 keys
        to a transaction."""
        pairs = list(zip(table_columns[::2], table_columns[1::2]))
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            marks = ",".join("?" * len(chunk))
            with self._txn(con):
                for table, column in pairs:
                    con.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", chunk)

    def _give_back(self, con: sqlite3.Connection) -> None:
        """Free pages back to the filesystem, and the WAL truncated (both count on disk)."""
        try:
            if con.execute("PRAGMA freelist_count").fetchone()[0]:
                with self._write_lock:  # executescript steps it to the end (execute: 1 page)
                    con.executescript("PRAGMA incremental_vacuum;")
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:  # a reader holds the WAL, or the disk is full: next time
            log.debug("store %s: giving space back failed: %s", self.db_path, exc)


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == getattr(sqlite3, "SQLITE_FULL", 13) or "disk is full" in str(exc)
