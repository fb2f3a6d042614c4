"""OTLP/HTTP span ingest: spans per second and the receiver's CPU per span.

Client processes post pre-built protobuf ExportTraceServiceRequests (512 spans each, as the
OTel SDK's BatchSpanProcessor sends them: six attributes, the hookup's pid and tid among them,
every span id unique) over keep-alive connections for --seconds. The server runs in its own
process, so its CPU is measured alone (/proc), and only acknowledged (200) spans count.

- `--target receiver` (default): the agent's OTLP path on its own: OtlpReceiver, SpanStore and,
  where the code has it, the SpanWriter that commits each batch to a store before its 200 (what
  `spanflame run` wires); a checkout without it keeps spans in memory only.
- `--target agent`: the whole `spanflame run` (py-spy sampler, no eBPF, no process matched).

It also prints the CPU cost of each step in one process, without HTTP (`steps_cpu_us_per_span`).

    python -m bench.otlp_ingest [--seconds 10] [--clients 2] [--target receiver|agent]

The server imports `agent` from PYTHONPATH, so the same command measures another checkout:
`PYTHONPATH=/path/to/old/checkout python bench/otlp_ingest.py`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 512


def make_body(seed: int, n: int = BATCH) -> bytes:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    rng = random.Random(seed)
    req = trace_service_pb2.ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for k, v in (("service.name", "shop"), ("process.pid", 4242),
                 ("telemetry.sdk.language", "python")):
        kv = rs.resource.attributes.add()
        kv.key = k
        if isinstance(v, int):
            kv.value.int_value = v
        else:
            kv.value.string_value = v
    ss = rs.scope_spans.add()
    ss.scope.name = "opentelemetry.instrumentation.flask"
    t = time.time_ns() - 5_000_000_000
    for i in range(n):
        sp = ss.spans.add(trace_id=rng.getrandbits(128).to_bytes(16, "big"),
                          span_id=rng.getrandbits(64).to_bytes(8, "big"),
                          parent_span_id=rng.getrandbits(64).to_bytes(8, "big"),
                          name="GET /api/items/{id}", kind=2,
                          start_time_unix_nano=t + i * 100_000,
                          end_time_unix_nano=t + i * 100_000 + 5_000_000)
        for k, v in (("spanflame.pid", 4242), ("spanflame.tid", 4300 + i % 8),
                     ("http.method", "GET"), ("http.route", "/api/items/{id}"),
                     ("http.status_code", 200), ("net.peer.ip", "10.0.0.7")):
            kv = sp.attributes.add()
            kv.key = k
            if isinstance(v, int):
                kv.value.int_value = v
            else:
                kv.value.string_value = v
    return req.SerializeToString()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- server ----------------------------------------------------------------------------------
def serve(port: int, store_dir: str) -> None:
    """The OTLP path as the agent wires it, on 127.0.0.1:port, until SIGTERM."""
    from starlette.applications import Starlette

    from agent.httpserver import ServerThread
    from agent.otlp_receiver import OtlpReceiver
    from agent.spans import SpanStore

    spans = SpanStore()
    try:
        from agent.spanwriter import SpanWriter
        from agent.store import Store
    except ImportError:  # a checkout without the durable inbox: spans in memory only
        rx = OtlpReceiver(spans)
        writer = None
    else:
        store = Store(store_dir)
        writer = SpanWriter(store, spans).start()
        rx = OtlpReceiver(spans, sink=writer.submit)
    srv = ServerThread(Starlette(routes=rx.routes()), "127.0.0.1", port, name="otlp").start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM})
    srv.close()
    if writer is not None:
        writer.close()


def _env() -> dict:
    """The server imports the same `agent` as this process."""
    import agent

    return {**os.environ, "PYTHONPATH": str(Path(agent.__file__).resolve().parent.parent)}


def start_receiver(tmp: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(port),
                             "--store", tmp], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "ready"
    return proc, f"http://127.0.0.1:{port}/v1/traces"


def start_agent(tmp: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port, oport = free_port(), free_port()
    exe = Path(sys.executable).parent / "spanflame"
    proc = subprocess.Popen([str(exe), "run", "--store", f"{tmp}/store", "--listen",
                             f"127.0.0.1:{port}", "--otlp-listen", f"127.0.0.1:{oport}",
                             "--sampler", "py-spy", "--probes", "cpu",
                             "--include", "^no-such-process$"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{oport}/v1/traces"
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("agent did not start")


# -- clients ---------------------------------------------------------------------------------
def client(url: str, seed: int, bodies: int, ready, go, stop_at, out) -> None:
    import httpx

    data = [make_body(seed * 100_003 + i) for i in range(bodies)]
    ready.put(seed)
    go.wait()
    stop_at = stop_at.value
    ok = err = 0
    rejected: dict[int, int] = {}
    with httpx.Client(timeout=30, headers={"content-type": "application/x-protobuf"}) as c:
        i = 0
        while time.time() < stop_at and i < len(data):
            try:
                r = c.post(url, content=data[i])
            except httpx.HTTPError:
                err += 1
                continue
            if r.status_code == 200:
                ok += 1
                i += 1
            else:
                rejected[r.status_code] = rejected.get(r.status_code, 0) + 1
                time.sleep(0.05)
    out.put({"ok_requests": ok, "errors": err, "rejected": rejected, "ran_out": i >= len(data)})


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def over_http(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="spanflame-bench-otlp-")
    proc, url = (start_agent if args.target == "agent" else start_receiver)(tmp)
    try:
        q: mp.Queue = mp.Queue()
        ready: mp.Queue = mp.Queue()
        go = mp.Event()
        stop_at = mp.Value("d", 0.0)
        # Distinct bodies (every span id unique) for the whole run at up to --max-rate spans/s,
        # built before the clock starts.
        per_client = int(args.seconds * args.max_rate / BATCH / args.clients) + 20
        ps = [mp.Process(target=client, args=(url, i + 1, per_client, ready, go, stop_at, q))
              for i in range(args.clients)]
        for p in ps:
            p.start()
        for _ in ps:
            ready.get(timeout=600)
        stop_at.value = time.time() + args.seconds
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        go.set()
        time.sleep(max(0.0, stop_at.value - time.time()))
        c1, t1 = cpu_s(proc.pid), time.monotonic()
        results = [q.get(timeout=120) for _ in ps]
        for p in ps:
            p.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    spans = sum(r["ok_requests"] for r in results) * BATCH
    wall, cpu = t1 - t0, c1 - c0
    return {"target": args.target, "clients": args.clients, "seconds": round(wall, 1),
            "acknowledged_spans": spans, "spans_per_s": round(spans / wall),
            "server_cpu_cores": round(cpu / wall, 2),
            "cpu_us_per_span": round(cpu / max(1, spans) * 1e6, 2),
            "spans_per_cpu_s": round(spans / max(cpu, 1e-9)),
            "rejected": [r["rejected"] for r in results],
            "clients_ran_out": any(r["ran_out"] for r in results)}


# -- steps in one process --------------------------------------------------------------------
def steps(n_bodies: int = 60) -> dict:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    from agent.spans import SpanStore, from_otlp

    bodies = [make_body(10_000 + i) for i in range(n_bodies)]
    n = n_bodies * BATCH
    t0 = time.process_time()
    reqs = [trace_service_pb2.ExportTraceServiceRequest.FromString(b) for b in bodies]
    t1 = time.process_time()
    batches = [from_otlp(r)[0] for r in reqs]
    t2 = time.process_time()
    store = SpanStore()
    for b in batches:
        store.add(b)
    t3 = time.process_time()
    out = {"parse": (t1 - t0), "to_span_records": (t2 - t1), "span_store_add": (t3 - t2)}
    try:
        from agent.spanwriter import span_row
        from agent.store import Store
    except ImportError:
        pass
    else:
        t3 = time.process_time()
        rows = [[span_row(s) for s in b] for b in batches]
        t4 = time.process_time()
        with tempfile.TemporaryDirectory() as d:
            st = Store(d)
            t5 = time.process_time()
            for r in rows:
                st.insert_spans(r)
            t6 = time.process_time()
            st.close()
        out.update({"span_rows": t4 - t3, "store_commit (one per batch)": t6 - t5})
    return {k: round(v / n * 1e6, 2) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--max-rate", type=int, default=60_000,
                    help="spans/s the prepared bodies last for (default 60000)")
    ap.add_argument("--target", choices=["receiver", "agent"], default="receiver")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.store)
        return {}
    summary = {"benchmark": "otlp_ingest", "steps_cpu_us_per_span": steps(), **over_http(args)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
