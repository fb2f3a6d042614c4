"""The embedded store: an SQLite database (WAL) under --store with one gzipped pprof per process,
window and sample type, the spans and their breakdowns, and an index of which spans each profile
holds.

Crash safety: every write is one transaction; SQLite commits in WAL mode with synchronous=FULL
are durable once `commit` returns, so a kill -9 (or power loss) at any moment loses nothing that
was acknowledged. Retention (by age and total size) deletes whole profiles.

Queries merge the profiles of a time range (and label filters) into one Profile. A span query
reads only the profiles whose index says they hold the span.

Threading: one connection per thread (sqlite3 objects are not shared); writers serialise on
SQLite's own lock.
"""

from __future__ import annotations

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
from agent.errors import SpanflameError
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
                 max_bytes: int = 10 << 30, read_only: bool = False) -> None:
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
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self.writes = 0
        self.deleted = 0
        try:
            con = self._con()
            if read_only:
                con.execute("SELECT COUNT(*) FROM profiles").fetchone()
            else:
                con.executescript(SCHEMA)
                con.commit()
                self._backfill_series(con)
        except sqlite3.Error as exc:
            raise SpanflameError(f"cannot open store {self.db_path}: {exc}") from None

    def _backfill_series(self, con: sqlite3.Connection) -> None:
        """Stores written before the series table existed: build it once from the profiles."""
        if con.execute("SELECT 1 FROM series LIMIT 1").fetchone() is not None:
            return
        if con.execute("SELECT 1 FROM profiles LIMIT 1").fetchone() is None:
            return
        with self._write_lock:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT OR IGNORE INTO series SELECT service, type, pid, labels, "
                        "MIN(start_ns), MAX(end_ns) FROM profiles "
                        "GROUP BY service, type, pid, labels")
            con.execute("COMMIT")

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
            self._local.con = con
        return con

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
        with self._write_lock:
            con.execute("BEGIN IMMEDIATE")
            try:
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
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        self.writes += 1
        return pid_row

    def add_spans(self, rows: Sequence[dict]) -> None:
        """Insert or replace spans (dicts with SpanRecord fields, plus an optional breakdown)."""
        if not rows:
            return
        con = self._con()
        with self._write_lock:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany(
                    "INSERT OR REPLACE INTO spans(span_id, trace_id, parent_span_id, name, "
                    "service, pid, tid, start_ns, end_ns, duration_ns, status, kind, attributes, "
                    "breakdown) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(r["span_id"], r["trace_id"], r.get("parent_span_id", ""), r["name"],
                      r["service"], r.get("pid", 0), r.get("tid", 0), r["start_ns"], r["end_ns"],
                      r["end_ns"] - r["start_ns"], r.get("status", "unset"),
                      r.get("kind", "internal"), json.dumps(r.get("attributes", {})),
                      json.dumps(r["breakdown"]) if r.get("breakdown") is not None else None)
                     for r in rows])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

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
               type_name: str | None = None) -> Profile | None:
        """Decode and merge stored profiles, keeping samples whose labels match `sample_labels`."""
        merged = None
        for sp in found:
            data = self.blob(sp.id)
            if data is None:
                continue
            try:
                prof = pprof.decode(data)
            except SpanflameError as exc:  # a stored blob we cannot read: skip it, log once
                log.warning("stored profile %d unreadable: %s", sp.id, exc)
                continue
            if sample_labels:
                prof = prof.filtered(sample_labels)
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
            d["breakdown"] = json.loads(r[13]) if r[13] else None
            out.append(d)
        return out

    # -- retention ----------------------------------------------------------------------------
    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            p = Path(str(self.db_path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    def data_bytes(self) -> int:
        row = self._con().execute("SELECT COALESCE(SUM(size), 0) FROM profiles").fetchone()
        return int(row[0])

    def enforce_retention(self, now_ns: int | None = None) -> int:
        """Delete profiles and spans older than the retention, then the oldest profiles until
        the stored data fits `max_bytes`. Returns profiles deleted."""
        now_ns = now_ns or time.time_ns()
        cutoff = now_ns - int(self.retention_s * 1e9)
        con = self._con()
        deleted = 0
        with self._write_lock:
            ids = [r[0] for r in con.execute("SELECT id FROM profiles WHERE end_ns < ?", (cutoff,))]
            total = self.data_bytes()
            if total > self.max_bytes:
                acc = 0
                for pid_, size in con.execute("SELECT id, size FROM profiles WHERE end_ns >= ? "
                                              "ORDER BY start_ns", (cutoff,)):
                    if total - acc <= self.max_bytes:
                        break
                    ids.append(pid_)
                    acc += size
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                con.execute("BEGIN IMMEDIATE")
                con.execute(f"DELETE FROM profiles WHERE id IN ({marks})", chunk)
                con.execute(f"DELETE FROM blobs WHERE id IN ({marks})", chunk)
                con.execute(f"DELETE FROM profile_spans WHERE profile_id IN ({marks})", chunk)
                con.execute("COMMIT")
                deleted += len(chunk)
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM spans WHERE end_ns < ?", (cutoff,))
            con.execute("DELETE FROM series WHERE last_ns < ?", (cutoff,))
            con.execute("COMMIT")
        self.deleted += deleted
        if deleted:
            con.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return deleted
