"""The `spanflame` command line. It parses, wires and prints; the library below never does."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from agent import __version__
from agent.errors import InputError, SpanflameError, UsageError


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"spanflame: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spanflame")
@click.option("-v", "--verbose", is_flag=True, help="Log what the agent does (to stderr).")
def cli(verbose: bool) -> None:
    """spanflame: why was this span slow, on CPU and off it."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- attach ---------------------------------------------------------------------------------

@cli.command()
@click.argument("pid", type=int)
@click.option("--duration", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="How long to record; stops early (and still writes) when the target exits.")
@click.option("--rate", type=int, default=100, show_default=True, metavar="HZ",
              help="CPU samples per second (per CPU for the kernel walker; py-spy's rate).")
@click.option("--sampler", type=click.Choice(["auto", "bpf", "py-spy"]), default="auto",
              show_default=True, envvar="SPANFLAME_SAMPLER", show_envvar=True,
              help="Where Python stacks come from: bpf (read in the kernel at every sample and "
                   "every wait), py-spy, or auto (bpf where BPF is allowed and the interpreter "
                   "is supported, else py-spy, saying why).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Output file; the format follows the extension: .pb.gz/.pb (pprof), .html "
                   "(flame graph), .json (speedscope), .txt/.folded (folded stacks). "
                   "Default: spanflame-<pid>-<time>.pb.gz")
@click.option("--probes", default="cpu", show_default=True, metavar="LIST",
              help="Comma-separated: cpu, wall (idle threads included), and the eBPF probes "
                   "offcpu, lock, io, net; or all (cpu and every eBPF probe).")
@click.option("--offcpu-threshold", type=float, default=1.0, show_default=True, metavar="MS",
              help="Shortest off-CPU wait the eBPF probes report, in milliseconds.")
@click.option("--otlp-listen", default=None, metavar="HOST:PORT",
              help="Receive the app's spans over OTLP/HTTP here during the attach and label every "
                   "sample with its span (e.g. 127.0.0.1:4318).")
@click.option("--span-wait", type=float, default=6.0, show_default=True, metavar="SECONDS",
              help="With --otlp-listen: after recording, wait for late spans until none arrived "
                   "for this long (at most 30 s).")
@click.option("--gil", "gil_only", is_flag=True,
              help="Sample only the thread holding the GIL (py-spy --gil): much cheaper for "
                   "processes with many threads; waiting threads are seen only as they last ran.")
@click.option("--spans-output", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="With --otlp-listen: write each span's time breakdown (CPU, lock, IO, net, "
                   "other, unaccounted) and dominant cause as JSON.")
@click.option("--insecure-no-auth", is_flag=True,
              help="Allow --otlp-listen beyond loopback (attach has no token: anyone reaching "
                   "it can send spans).")
def attach(pid: int, duration: float, rate: int, sampler: str, output: str | None, probes: str,
           offcpu_threshold: float, otlp_listen: str | None, span_wait: float,
           gil_only: bool, spans_output: str | None, insecure_no_auth: bool) -> None:
    """Profile the running Python process PID."""
    from agent.attach import AttachOptions, attach as run_attach, parse_probes
    from agent.output import check_writable, write_profile

    if otlp_listen:
        from agent.httpguard import check_exposure
        from agent.httpserver import parse_listen
        check_exposure([parse_listen(otlp_listen)], None, insecure_no_auth)

    options = AttachOptions(pid=pid, duration_s=duration, rate_hz=rate,
                            probes=parse_probes(probes),
                            offcpu_threshold_ns=round(offcpu_threshold * 1e6),
                            otlp_listen=otlp_listen, span_wait_s=span_wait, gil_only=gil_only,
                            sampler=sampler)
    if output is None:
        output = f"spanflame-{pid}-{time.strftime('%Y%m%dT%H%M%S')}.pb.gz"
    check_writable(output)
    if spans_output:
        if not otlp_listen:
            raise UsageError("--spans-output needs --otlp-listen")
        from agent.output import check_writable_json
        check_writable_json(spans_output)

    progress = None
    bar = None
    started = [False]

    def announce(_frac: float) -> None:
        # With spans coming in, say when samples start: the app's spans before that are
        # received but have no samples.
        if not started[0]:
            started[0] = True
            click.echo(f"spanflame: recording PID {pid}", err=True)

    if not sys.stderr.isatty():
        progress = announce if otlp_listen else None
    else:
        bar = click.progressbar(length=1000, label=f"profiling PID {pid}", file=sys.stderr,
                                show_eta=True, width=30)
        bar.__enter__()
        done = [0]

        def progress(frac: float) -> None:
            step = int(frac * 1000) - done[0]
            if step > 0:
                bar.update(step)
                done[0] += step
    def on_listen(url: str) -> None:
        click.echo(f"spanflame: receiving spans at {url}/v1/traces", err=True)

    try:
        result = run_attach(options, progress=progress, on_listen=on_listen)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    size = write_profile(result.profile, output, title=_title(pid),
                         subtitle=_subtitle(result))
    if spans_output:
        from agent.output import write_atomic
        doc = {"pid": pid, "spans": [b.to_dict() for b in result.span_breakdowns]}
        write_atomic(spans_output, json.dumps(doc, indent=1).encode())
    _summary(result, output, size)


def _title(pid: int) -> str:
    try:
        import psutil
        cmd = " ".join(psutil.Process(pid).cmdline())[:200]
    except Exception:  # the target may be gone by now; the title is cosmetic
        cmd = ""
    return f"PID {pid}" + (f": {cmd}" if cmd else "")


def _subtitle(result) -> str:
    p = result.profile
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.time_ns / 1e9))
    return (f"{when}, {result.elapsed_s:.1f} s at {1e9 / p.period:.0f} Hz, "
            f"{result.threads} threads, spanflame {__version__}")


def _summary(result, output: str, size: int) -> None:
    from flamegraph.calltree import top_functions

    p = result.profile
    for note in result.notes:
        click.echo(f"spanflame: note: {note}", err=True)
    click.echo(f"wrote {output} ({_human_bytes(size)})")
    samples = p.total("samples") if p.has_type("samples") else 0
    errors = f", {result.sample_errors} errors" if result.sample_errors else ""
    click.echo(f"  {result.elapsed_s:.1f} s, {samples} samples, {result.threads} threads "
               f"({result.samples_taken} taken by {result.sampler}{errors})")
    click.echo(f"  stacks: {result.source}"
               + (f" (not the kernel walker: {result.sampler_reason})"
                  if result.sampler != "bpf" and result.sampler_reason else ""))
    if result.probes_on:
        click.echo(f"  probes: {', '.join(result.probes_on)} loaded in {result.probe_load_s:.2f} s; "
                   f"kernel headers: {result.kernel_headers}")
    w = result.waits
    if w is not None:
        parts = [f"{r} {ns / 1e6:.0f} ms" for r, ns in w.off_cpu_ns.items() if ns]
        if "offcpu" in result.probes_on or parts:
            click.echo("  off-CPU: " + (", ".join(parts) or "none above the threshold"))
        if "lock" in result.probes_on:
            click.echo(f"  lock waits {w.lock_ns / 1e6:.0f} ms, GIL waits {w.gil_ns / 1e6:.0f} ms")
        if "io" in result.probes_on:
            click.echo(f"  block IO: {w.io_requests} requests, {_human_bytes(w.io_bytes)}")
        if "net" in result.probes_on:
            conn = ""
            if w.connects:
                c = sorted(w.connects)
                conn = (f", {len(c)} connects (median {c[len(c) // 2] / 1e6:.2f} ms, "
                        f"max {c[-1] / 1e6:.2f} ms)")
            click.echo(f"  TCP: sent {_human_bytes(w.net_send)}, received "
                       f"{_human_bytes(w.net_recv)}, {w.retransmits} retransmits{conn}")
        from probes.session import is_loss
        lost = {k: v for k, v in result.counters.items() if v and is_loss(k)}
        if lost:
            click.echo("  lost or unreadable: "
                       + ", ".join(f"{k} {v}" for k, v in sorted(lost.items())))
    if result.otlp_url:
        _span_summary(result)
    for t in [t.name for t in p.sample_types if t.name != "samples"]:
        total = p.total(t)
        if not total:
            continue
        # Wait samples end in marker, kernel and native frames: rank the innermost Python frame.
        top = top_functions(((_python_part(s), v) for s, _l, v in p.iter_type(t)), 5)
        top = [f for f in top if f.self_value]
        if not top:
            continue
        unit = p.sample_types[p.index(t)].unit
        click.echo(f"  top Python functions by {t} ({_human_value(total, unit)} in all):")
        for f in top:
            where = f"{Path(f.filename).name}:{f.line}" if f.filename else ""
            click.echo(f"    {100 * f.self_value / total:5.1f}%  {f.name}  {where}")


def _span_summary(result) -> None:
    b = result.span_breakdowns
    click.echo(f"  spans: {result.spans_received} received, {len(b)} of this process linked"
               + (f", {result.spans_unlinkable} without thread ids (add SpanflameSpanProcessor)"
                  if result.spans_unlinkable else ""))
    for s in sorted(b, key=lambda s: -s.duration_ns)[:5]:
        click.echo(f"    {s.duration_ns / 1e6:8.1f} ms  {s.name}  {s.span_id}  {s.cause}")


def _python_part(stack):
    """The stack from its innermost Python frame up (markers, kernel and native frames off)."""
    for i, f in enumerate(stack):
        if f.filename and not f.filename.startswith("["):
            return stack[i:]
    return ()


def _human_value(v: int, unit: str) -> str:
    if unit == "nanoseconds":
        return f"{v / 1e9:.2f} s" if v >= 1e9 else f"{v / 1e6:.1f} ms"
    if unit == "bytes":
        return _human_bytes(v)
    return str(v)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# -- run ------------------------------------------------------------------------------------

def _default_store() -> str:
    if os.geteuid() == 0:
        return "/var/lib/spanflame"
    return os.path.join(os.path.expanduser("~"), ".local", "share", "spanflame")


def _auth_token(given: str | None) -> str | None:
    """--auth-token, checked: an empty SPANFLAME_AUTH_TOKEN (which click reads as unset) or an
    empty flag is an error, never "auth off"."""
    from agent.httpguard import check_token

    if given is None and "SPANFLAME_AUTH_TOKEN" in os.environ:
        given = os.environ["SPANFLAME_AUTH_TOKEN"]
    return check_token(given)


def _size(text: str) -> int:
    t = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except ValueError:
        raise UsageError(f"invalid size {text!r}: use e.g. 10GiB, 500MiB") from None


@cli.command()
@click.option("--store", default=_default_store, show_default="/var/lib/spanflame as root, "
              "else ~/.local/share/spanflame", envvar="SPANFLAME_STORE", metavar="DIR",
              help="Directory of the embedded store.")
@click.option("--listen", default="127.0.0.1:4040", show_default=True, envvar="SPANFLAME_LISTEN",
              metavar="HOST:PORT", help="Web UI, HTTP API and Pyroscope-compatible ingest.")
@click.option("--otlp-listen", default="127.0.0.1:4318", show_default=True,
              envvar="SPANFLAME_OTLP_LISTEN", metavar="HOST:PORT", help="OTLP/HTTP traces.")
@click.option("--rate", type=int, default=19, show_default=True, envvar="SPANFLAME_RATE",
              metavar="HZ", help="CPU samples per second: per CPU for the kernel walker (held); "
                                 "per process for py-spy (the CPU budget may lower it, with a "
                                 "warning).")
@click.option("--sampler", type=click.Choice(["auto", "bpf", "py-spy"]), default="auto",
              show_default=True, envvar="SPANFLAME_SAMPLER",
              help="Where Python stacks come from: bpf (read in the kernel at every sample and "
                   "wait), py-spy, or auto (bpf per process where it can, else py-spy).")
@click.option("--window", type=float, default=10.0, show_default=True, envvar="SPANFLAME_WINDOW",
              metavar="SECONDS", help="Length of one profile window.")
@click.option("--probes", default="all", show_default=True, envvar="SPANFLAME_PROBES",
              metavar="LIST", help="cpu and the eBPF probes offcpu, lock, io, net; or all.")
@click.option("--include", default=None, envvar="SPANFLAME_INCLUDE", metavar="REGEX",
              help="Profile only processes whose name or command line matches.")
@click.option("--exclude", default=None, envvar="SPANFLAME_EXCLUDE", metavar="REGEX",
              help="Never profile processes whose name or command line matches.")
@click.option("--export-pyroscope", default=None, envvar="SPANFLAME_EXPORT_PYROSCOPE",
              metavar="URL", help="Also push every profile to this Grafana Pyroscope.")
@click.option("--export-pyroscope-tenant", default=None,
              envvar="SPANFLAME_EXPORT_PYROSCOPE_TENANT", metavar="ID", help="X-Scope-OrgID.")
@click.option("--export-pyroscope-user", default=None, envvar="SPANFLAME_EXPORT_PYROSCOPE_USER",
              help="Basic auth user.")
@click.option("--export-pyroscope-password", default=None,
              envvar="SPANFLAME_EXPORT_PYROSCOPE_PASSWORD", help="Basic auth password.")
@click.option("--export-pyroscope-token", default=None, envvar="SPANFLAME_EXPORT_PYROSCOPE_TOKEN",
              help="Bearer token.")
@click.option("--otlp-forward", default=None, envvar="SPANFLAME_OTLP_FORWARD", metavar="URL",
              help="Forward received spans unchanged to this OTLP/HTTP endpoint.")
@click.option("--auth-token", default=None, envvar="SPANFLAME_AUTH_TOKEN",
              help="Require this bearer token for the UI, API and ingest (required to listen "
                   "beyond loopback).")
@click.option("--allowed-hosts", default=None, envvar="SPANFLAME_ALLOWED_HOSTS", metavar="LIST",
              help="Host header names accepted besides loopback names, IP addresses and this "
                   "machine's name: comma-separated, '.suffix' for a domain (DNS rebinding).")
@click.option("--insecure-no-auth", is_flag=True, envvar="SPANFLAME_INSECURE_NO_AUTH",
              help="Listen beyond loopback without a token (anyone reaching it can read and "
                   "write).")
@click.option("--retention-hours", type=float, default=72.0, show_default=True,
              envvar="SPANFLAME_RETENTION_HOURS", help="Delete profiles older than this.")
@click.option("--retention-size", default="10GiB", show_default=True,
              envvar="SPANFLAME_RETENTION_SIZE", help="Keep the stored profiles under this size.")
@click.option("--cpu-budget", type=float, default=1.0, show_default=True,
              envvar="SPANFLAME_CPU_BUDGET", metavar="PERCENT",
              help="Agent CPU (itself and py-spy) per 10 profiled processes, in % of one core.")
@click.option("--span-wait", type=float, default=30.0, show_default=True,
              envvar="SPANFLAME_SPAN_WAIT", metavar="SECONDS",
              help="Longest a window waits for its spans before it is written.")
def run(store: str, listen: str, otlp_listen: str, rate: int, sampler: str, window: float,
        probes: str,
        include: str | None, exclude: str | None, export_pyroscope: str | None,
        export_pyroscope_tenant, export_pyroscope_user, export_pyroscope_password,
        export_pyroscope_token, otlp_forward: str | None, auth_token: str | None,
        allowed_hosts: str | None, insecure_no_auth: bool, retention_hours: float, retention_size: str, cpu_budget: float, span_wait: float) -> None:
    """Profile every Python process on this machine, continuously; serve the UI and API."""
    import signal as _signal

    from agent.attach import parse_probes
    from agent.httpguard import parse_allowed_hosts
    from agent.run import Agent, RunOptions

    if not 1 <= rate <= 1000:
        raise UsageError("--rate must be between 1 and 1000 Hz")
    if not 1 <= window <= 600:
        raise UsageError("--window must be between 1 and 600 seconds")
    opts = RunOptions(
        store=store, listen=listen, otlp_listen=otlp_listen, rate_hz=rate, window_s=window,
        probes=parse_probes(probes), include=include, exclude=exclude,
        export_pyroscope=export_pyroscope, export_tenant=export_pyroscope_tenant,
        export_user=export_pyroscope_user, export_password=export_pyroscope_password,
        export_token=export_pyroscope_token, otlp_forward=otlp_forward,
        auth_token=_auth_token(auth_token), allowed_hosts=parse_allowed_hosts(allowed_hosts),
        insecure_no_auth=insecure_no_auth,
        retention_hours=retention_hours, retention_bytes=_size(retention_size),
        cpu_budget=cpu_budget / 100, span_wait_s=span_wait, sampler=sampler)
    agent = Agent(opts).start()
    click.echo(f"spanflame: agent on {agent.url} (UI and API), OTLP on {agent.otlp_url}/v1/traces, "
               f"store {store}", err=True)
    if agent.probes_off:
        for name, why in agent.probes_off.items():
            click.echo(f"spanflame: note: probe {name} off: {why}", err=True)
    stop = [False]

    def on_signal(signum, frame) -> None:
        stop[0] = True
        agent._stop.set()

    _signal.signal(_signal.SIGTERM, on_signal)
    _signal.signal(_signal.SIGINT, on_signal)
    try:
        agent.wait()
    finally:
        agent._stop.clear()
        agent.close()


@cli.command()
@click.option("--store", required=True, envvar="SPANFLAME_STORE", metavar="DIR",
              help="Directory of an existing store (what `spanflame run --store` wrote).")
@click.option("--listen", default="127.0.0.1:4040", show_default=True, envvar="SPANFLAME_LISTEN",
              metavar="HOST:PORT", help="Web UI and HTTP API.")
@click.option("--auth-token", default=None, envvar="SPANFLAME_AUTH_TOKEN",
              help="Require this bearer token for the UI's data and the API (required to listen "
                   "beyond loopback).")
@click.option("--allowed-hosts", default=None, envvar="SPANFLAME_ALLOWED_HOSTS", metavar="LIST",
              help="Host header names accepted besides loopback names, IP addresses and this "
                   "machine's name: comma-separated, '.suffix' for a domain.")
@click.option("--insecure-no-auth", is_flag=True, envvar="SPANFLAME_INSECURE_NO_AUTH",
              help="Listen beyond loopback without a token.")
def serve(store: str, listen: str, auth_token: str | None, allowed_hosts: str | None,
          insecure_no_auth: bool) -> None:
    """Serve the UI and API over an existing store, read-only (no profiling, no ingest)."""
    import signal as _signal
    import threading as _threading

    from agent.httpguard import parse_allowed_hosts
    from agent.ui import ReadOnlyAgent

    from agent.httpguard import check_exposure
    from agent.httpserver import parse_listen

    token = _auth_token(auth_token)
    check_exposure([parse_listen(listen)], token, insecure_no_auth)  # before opening the store
    agent = ReadOnlyAgent(store, listen=listen, auth_token=token,
                          allowed_hosts=parse_allowed_hosts(allowed_hosts),
                          insecure_no_auth=insecure_no_auth).start()
    click.echo(f"spanflame: serving {store} read-only on {agent.url}", err=True)
    done = _threading.Event()
    _signal.signal(_signal.SIGTERM, lambda *a: done.set())
    _signal.signal(_signal.SIGINT, lambda *a: done.set())
    try:
        while not done.wait(1.0):
            if not agent.alive():
                raise SpanflameError("the HTTP server stopped")
    finally:
        agent.close()


# -- render ---------------------------------------------------------------------------------

#: Largest input `render` reads, in bytes.
MAX_INPUT_BYTES = 1 << 30


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="OUTPUT",
              help="Output file: .html, .json (speedscope), .txt/.folded, .pb.gz/.pb.")
@click.option("--type", "type_name", default=None, metavar="SAMPLE_TYPE",
              help="Sample type to show (e.g. cpu, wall, lock_wait); default: the profile's own.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
              help="Keep only samples with this label (repeatable), e.g. --tag thread_name=worker.")
def render(input_path: str, output: str, type_name: str | None, tags: tuple[str, ...]) -> None:
    """Convert a pprof profile to a flame graph, speedscope or folded stacks."""
    from agent import pprof
    from agent.output import check_writable, output_format, write_profile

    filters = {}
    for t in tags:
        key, sep, value = t.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag {t!r} is not KEY=VALUE")
        filters[key] = value
    check_writable(output)
    try:
        size = os.path.getsize(input_path)
        if size > MAX_INPUT_BYTES:
            raise InputError(f"{input_path} is larger than {MAX_INPUT_BYTES} bytes")
        with open(input_path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read {input_path}: {exc.strerror or exc}") from None
    try:
        profile = pprof.decode(data)
    except SpanflameError as exc:
        raise InputError(f"{input_path}: {exc}") from None
    if type_name and not profile.has_type(type_name):
        raise UsageError(f"{input_path} has no sample type {type_name!r}; it has: "
                         + ", ".join(t.name for t in profile.sample_types))
    if filters:
        profile = profile.filtered(filters)
    if type_name and output_format(output).startswith("pprof"):
        keep = [t for t in profile.sample_types if t.name in (type_name, "samples")]
        narrowed = type(profile)(keep, period_type=profile.period_type, period=profile.period,
                                 time_ns=profile.time_ns, duration_ns=profile.duration_ns,
                                 default_sample_type=type_name)
        idx = [profile.index(t.name) for t in keep]
        for (stack, labels), vec in profile.samples.items():
            narrowed.add_vector(stack, labels, [vec[i] for i in idx])
        profile = narrowed
    size = write_profile(profile, output, type_name=type_name, title=Path(input_path).name)
    click.echo(f"wrote {output} ({_human_bytes(size)}, {len(profile)} samples)")


# -- doctor ---------------------------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json: bool) -> None:
    """Check what this machine lets spanflame do, with a fix for each failing line."""
    from agent.doctor import FAIL, as_json as to_json, run_checks, stack_source

    checks = run_checks()
    if as_json:
        click.echo(json.dumps(to_json(checks), indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[c.status]
            click.echo(f"{mark}  {c.name:<{width}}  {c.detail}")
            if c.hint and c.status != "ok":
                click.echo(f"      {'':<{width}}  hint: {c.hint}")
        click.echo(stack_source(checks))
    if any(c.status == FAIL for c in checks):
        sys.exit(1)


def main() -> None:
    """Console entry point: every SpanflameError becomes one line on stderr and an exit code."""
    try:
        rv = cli.main(standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except SpanflameError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as exc:  # last resort: one line, never a traceback, unless asked for
        if os.environ.get("SPANFLAME_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (set SPANFLAME_DEBUG=1 for details)")


if __name__ == "__main__":
    main()
