"""The `spanflame` command line. It parses, wires and prints; the library below never does."""

from __future__ import annotations

import contextlib
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             invoke_without_command=True,
             epilog="""\b
Examples:
  spanflame attach 4242 -d 30 -o app.html    profile a running process for 30 s
  spanflame render app.pb.gz -o app.html     a pprof file to a flame graph
  spanflame record -- python app.py          profile a command until it exits
  spanflame dump 4242                        every thread's Python stack, once
  spanflame run                              the node agent, UI on http://127.0.0.1:4040
  spanflame doctor                           what this machine lets spanflame do
""")
@click.version_option(__version__, prog_name="spanflame")
@click.option("-v", "--verbose", is_flag=True, help="Log what the agent does (to stderr).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """spanflame: why was this span slow, on CPU and off it."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(0)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- attach ---------------------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  spanflame attach 4242                       10 s of CPU, written to spanflame-4242-<time>.pb.gz
  spanflame attach 4242 -d 30 -o app.html     a flame graph to open in a browser
  spanflame attach 4242 --probes all          CPU plus off-CPU, lock, GIL, IO and network waits
  spanflame attach 4242 -s                    a gunicorn master and its workers, by pid
  spanflame attach 4242 --otlp-listen 127.0.0.1:4318 --spans-output spans.json
                                              each span's time split into its causes
""")
@click.argument("pid", type=int)
@click.option("-d", "--duration", type=float, default=10.0, show_default=True, metavar="SECONDS",
              help="How long to record; stops early (and still writes) when the target exits.")
@click.option("-r", "--rate", type=int, default=100, show_default=True, metavar="HZ",
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
                   "other, unaccounted, not observed) and dominant cause as "
                   "JSON.")
@click.option("--insecure-no-auth", is_flag=True,
              help="Allow --otlp-listen beyond loopback (attach has no token: anyone reaching "
                   "it can send spans).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON on stdout (what was written, samples, stack "
                   "source, waits, top functions by sample type, the slowest spans).")
@click.option("-s", "--subprocesses", is_flag=True,
              help="Profile the process's Python descendants too, as they start (gunicorn, "
                   "uwsgi, celery, multiprocessing workers); samples carry their pid. Needs "
                   "the kernel stack walker.")
def attach(pid: int, duration: float, rate: int, sampler: str, output: str | None, probes: str,
           offcpu_threshold: float, otlp_listen: str | None, span_wait: float,
           gil_only: bool, spans_output: str | None, insecure_no_auth: bool,
           subprocesses: bool = False, as_json: bool = False) -> None:
    """Profile the running Python process PID."""
    _profile(pid, None, duration, rate, sampler, output, probes, offcpu_threshold, otlp_listen,
             span_wait, gil_only, spans_output, insecure_no_auth, subprocesses, as_json)


def _profile(pid: int, command: list[str] | None, duration: float, rate: int, sampler: str,
             output: str | None, probes: str, offcpu_threshold: float, otlp_listen: str | None,
             span_wait: float, gil_only: bool, spans_output: str | None,
             insecure_no_auth: bool = False, subprocesses: bool = False,
             as_json: bool = False) -> None:
    """attach (pid) or record (command): the options, the progress, the output, the summary."""
    import subprocess

    from agent.attach import AttachOptions, attach as run_attach, parse_probes
    from agent.output import check_writable, write_profile

    if otlp_listen:
        from agent.httpguard import check_exposure
        from agent.httpserver import parse_listen
        check_exposure([parse_listen(otlp_listen)], None, insecure_no_auth, can_have_token=False)

    options = AttachOptions(pid=pid, duration_s=duration, rate_hz=rate,
                            probes=parse_probes(probes),
                            offcpu_threshold_ns=round(offcpu_threshold * 1e6),
                            otlp_listen=otlp_listen, span_wait_s=span_wait, gil_only=gil_only,
                            sampler=sampler, subprocesses=subprocesses)
    if output is None:
        name = pid if command is None else Path(command[0]).name.removesuffix(".py")
        output = f"spanflame-{name}-{time.strftime('%Y%m%dT%H%M%S')}.pb.gz"
    to_stdout = output == "-"  # pprof on stdout, for a pipe; everything else to stderr
    if to_stdout and as_json:
        raise UsageError("-o - and --json both want stdout: give -o a file")
    if to_stdout and sys.stdout.isatty():
        raise UsageError("-o - writes a binary pprof: redirect stdout to a file or a pipe")
    if not to_stdout:
        check_writable(output)
    if spans_output:
        if not otlp_listen:
            raise UsageError("--spans-output needs --otlp-listen")
        from agent.output import check_writable_json
        check_writable_json(spans_output)

    child: list = []

    def spawn() -> int:
        try:
            # with -o - or --json, stdout is ours: the command's output goes to stderr
            child.append(subprocess.Popen(command,
                                          stdout=sys.stderr if to_stdout or as_json else None))
        except OSError as exc:
            raise UsageError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
        return child[0].pid

    progress = None
    bar = None
    started = [False]
    what = f"PID {pid}" if command is None else " ".join(command)[:60]

    def announce(_frac: float) -> None:
        # With spans coming in, say when samples start: the app's spans before that are
        # received but have no samples.
        if not started[0]:
            started[0] = True
            click.echo(f"spanflame: recording {what}", err=True)

    if command is not None or not sys.stderr.isatty():
        progress = announce if (otlp_listen or command is not None) else None
    else:
        bar = click.progressbar(length=1000, label=f"profiling {what}", file=sys.stderr,
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
        result = run_attach(options, progress=progress, on_listen=on_listen,
                            on_wait=lambda msg: click.echo(f"\nspanflame: {msg}", err=True),
                            spawn=spawn if command is not None else None)
    except BaseException:
        if child and child[0].poll() is None:  # a command we started must not outlive us
            child[0].terminate()
        raise
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if child:
        pid = child[0].pid
        # A recorded command is expected to exit: that ends the recording, nothing is partial.
        result.notes = [n for n in result.notes if not n.startswith("target exited after")]
    title = _title(pid) if not command else " ".join(command)[:200]
    if to_stdout:
        from agent.output import render
        data = render(result.profile, "pprof", title=title, subtitle=_subtitle(result))
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        size = len(data)
    else:
        size = write_profile(result.profile, output, title=title, subtitle=_subtitle(result))
    if spans_output:
        from agent.output import write_atomic
        doc = {"pid": pid, "spans": [b.to_dict() for b in result.span_breakdowns]}
        write_atomic(spans_output, json.dumps(doc, indent=1).encode())
    rc = child[0].poll() if child else None
    if as_json:
        doc = _summary_json(result, output, size)
        if child:
            doc["command"] = {"pid": pid, "exit_status": rc}
        click.echo(json.dumps(doc, indent=1))
        return
    with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
        _summary(result, "stdout" if to_stdout else output, size)
        if child:
            if rc is None:
                click.echo(f"  {what}: still running after the recording (PID {pid})")
            else:
                click.echo(f"  {what}: exited with status {rc}")


def _record(command: tuple[str, ...], duration: float | None, rate: int, sampler: str,
            output: str | None, probes: str, offcpu_threshold: float, otlp_listen: str | None,
            span_wait: float, gil_only: bool, spans_output: str | None,
            insecure_no_auth: bool = False, subprocesses: bool = False,
            as_json: bool = False) -> None:
    """Start COMMAND and profile it until it exits (or for --duration)."""
    if not command:
        raise UsageError("record needs a command to run: spanflame record -- python app.py")
    _profile(0, list(command), duration or 366 * 86400.0, rate, sampler, output, probes,
             offcpu_threshold, otlp_listen, span_wait, gil_only, spans_output, insecure_no_auth,
             subprocesses, as_json)


def _record_command() -> click.Command:
    """`record` takes attach's options, a command instead of a PID, and records until the
    command exits unless --duration says otherwise."""
    params = []
    for p in attach.params:
        if p.name == "pid":
            continue
        if p.name == "duration":
            p = click.Option(["-d", "--duration"], type=float, default=None, metavar="SECONDS",
                             help="Stop recording after this long (the command keeps running); "
                                  "default: until the command exits.")
        params.append(p)
    params.append(click.Argument(["command"], nargs=-1, required=True, metavar="-- COMMAND..."))
    return click.Command(
        "record", callback=_record, params=params,
        help="Start COMMAND and profile it until it exits, like py-spy record. The probes are "
             "loaded before the command starts, so its first second is recorded too.",
        epilog="""\b
Examples:
  spanflame record -- python app.py --port 8000       until it exits
  spanflame record -o run.html --probes all -- python batch.py
  spanflame record -d 30 -- gunicorn app:app         the first 30 s
  spanflame record -s -- python train.py             with its multiprocessing workers
""", context_settings={"help_option_names": ["-h", "--help"]})


cli.add_command(_record_command())


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
    click.echo(f"  open it: {_next_step(output)}")
    samples = p.total("samples") if p.has_type("samples") else 0
    errors = (f", {result.sample_errors} of them unreadable (the target was changing its stack"
              " as it was read; not counted)") if result.sample_errors else ""
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


def _summary_json(result, output: str, size: int) -> dict:
    """The summary of attach/record --json."""
    from dataclasses import asdict

    from flamegraph.calltree import top_functions
    from probes.session import is_loss
    p = result.profile
    top = {}
    for t in [t.name for t in p.sample_types if t.name != "samples"]:
        total = p.total(t)
        if total:
            fns = top_functions(((_python_part(s), v) for s, _l, v in p.iter_type(t)), 10)
            top[t] = {"total": total, "unit": p.sample_types[p.index(t)].unit,
                      "functions": [{"function": f.name, "file": f.filename, "line": f.line,
                                     "share": round(f.self_value / total, 4)}
                                    for f in fns if f.self_value]}
    w = result.waits
    return {
        "output": output, "bytes": size, "elapsed_s": round(result.elapsed_s, 3),
        "samples": p.total("samples") if p.has_type("samples") else 0,
        "samples_taken": result.samples_taken, "sample_errors": result.sample_errors,
        "threads": result.threads, "sampler": result.sampler,
        "sampler_reason": result.sampler_reason, "source": result.source,
        "notes": list(result.notes), "probes_on": list(result.probes_on),
        "probes_off": dict(result.probes_off),
        "waits": asdict(w) if w is not None else None,
        "lost": {k: v for k, v in result.counters.items() if v and is_loss(k)},
        "top": top,
        "spans": None if not result.otlp_url else {
            "received": result.spans_received, "unlinkable": result.spans_unlinkable,
            "linked": len(result.span_breakdowns),
            "slowest": [{"name": b.name, "span_id": b.span_id, "duration_ns": b.duration_ns,
                         "cause": b.cause}
                        for b in sorted(result.span_breakdowns,
                                        key=lambda b: -b.duration_ns)[:20]]},
    }


def _next_step(output: str) -> str:
    """How to look at what was just written, by its format."""
    if output == "stdout":
        return "the pprof went to stdout (e.g. spanflame attach PID -o - > app.pb.gz)"
    from agent.output import output_format
    fmt = output_format(output)
    if fmt == "html":
        return f"in a browser (file://{os.path.abspath(output)})"
    if fmt == "speedscope":
        return f"drop {output} on https://www.speedscope.app (it stays in your browser)"
    if fmt.startswith("pprof"):
        base = output.removesuffix(".gz").removesuffix(".pb")
        return (f"spanflame render {output} -o {base}.html (a flame graph), "
                f"or go tool pprof -http=: {output}")
    return f"flamegraph.pl {output} > {output}.svg, or any folded-stacks viewer"


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


@cli.command(epilog="""\b
Examples:
  spanflame run                                 every Python process here; UI on 127.0.0.1:4040
  spanflame run --include 'gunicorn|celery'     only processes whose command line matches
  SPANFLAME_RATE=49 spanflame run --probes cpu,lock
  spanflame run --listen 0.0.0.0:4040 --auth-token "$TOKEN"   reachable from other hosts
""")
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
              envvar="SPANFLAME_RETENTION_SIZE",
              help="Keep the store's database (profiles and spans) under this size; the oldest "
              "data goes first and the file shrinks.")
@click.option("--cpu-budget", type=float, default=1.0, show_default=True,
              envvar="SPANFLAME_CPU_BUDGET", metavar="PERCENT",
              help="Agent CPU (itself and py-spy) per 10 profiled processes, in % of one core.")
@click.option("--node", default=None, envvar="SPANFLAME_NODE", metavar="NAME",
              help="This node's name in every profile's labels (default: the host name; the "
                   "DaemonSet sets it from spec.nodeName).")
@click.option("--span-wait", type=float, default=30.0, show_default=True,
              envvar="SPANFLAME_SPAN_WAIT", metavar="SECONDS",
              help="Longest a window waits for its spans before it is written.")
def run(store: str, listen: str, otlp_listen: str, rate: int, sampler: str, window: float,
        probes: str,
        include: str | None, exclude: str | None, export_pyroscope: str | None,
        export_pyroscope_tenant, export_pyroscope_user, export_pyroscope_password,
        export_pyroscope_token, otlp_forward: str | None, auth_token: str | None,
        allowed_hosts: str | None, insecure_no_auth: bool, retention_hours: float,
        retention_size: str, cpu_budget: float, node: str | None, span_wait: float) -> None:
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
        cpu_budget=cpu_budget / 100, span_wait_s=span_wait, sampler=sampler,
        **({"node": node} if node else {}))
    agent = Agent(opts).start()
    click.echo(f"spanflame: agent on {agent.url} (UI and API), OTLP on {agent.otlp_url}/v1/traces, "
               f"store {store}", err=True)
    if agent.probes_off:
        for name, why in agent.probes_off.items():
            click.echo(f"spanflame: note: probe {name} off: {why}", err=True)
    stop = [False]

    def on_signal(signum, frame) -> None:
        if stop[0]:  # a second Ctrl-C: the user wants out now; stored windows are safe
            os.write(2, b"spanflame: quitting now; the last window is not written\n")
            os._exit(130)
        stop[0] = True
        os.write(2, b"spanflame: stopping: writing the last windows "
                    b"(Ctrl-C again to quit at once)\n")
        agent._stop.set()

    _signal.signal(_signal.SIGTERM, on_signal)
    _signal.signal(_signal.SIGINT, on_signal)
    try:
        agent.wait()
    finally:
        t0 = time.monotonic()
        agent._stop.clear()
        agent.close()
        if stop[0]:
            click.echo(f"spanflame: stopped in {time.monotonic() - t0:.1f} s", err=True)


@cli.command(epilog="""\b
Examples:
  spanflame serve --store /var/lib/spanflame    browse what `run` stored, without profiling
""")
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


@cli.command(epilog="""\b
Examples:
  spanflame render app.pb.gz -o app.html                   a flame graph
  spanflame render app.pb.gz -o lock.html --type lock_wait  where threads waited on locks
  spanflame render app.pb.gz -o w.txt --tag thread_name=worker-1
""")
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
        kept = profile.filtered(filters)
        if not len(kept) and len(profile):
            keys = sorted({k for (_s, labels) in profile.samples for k, _v in labels})
            raise InputError(f"no sample of {input_path} matches "
                             + " ".join(f"--tag {t}" for t in tags)
                             + "; its labels are: " + (", ".join(keys) or "none"))
        profile = kept
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


# -- dump -----------------------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  spanflame dump 4242           each thread's stack and what it is doing (running, lock, IO...)
  spanflame dump 4242 --json    the same as JSON, for scripts
""")
@click.argument("pid", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the threads as JSON.")
def dump(pid: int, as_json: bool) -> None:
    """Print every thread's current Python stack once, like py-spy dump, with what each
    thread is doing (running, waiting on a lock, the GIL, another thread, IO, the network,
    sleeping)."""
    from agent.dump import dump as run_dump, format_text

    d = run_dump(pid)
    if as_json:
        click.echo(json.dumps(d.to_json(), indent=1))
    else:
        click.echo(format_text(d))


# -- doctor ---------------------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  spanflame doctor            what works here, with a fix for each failing line
  spanflame doctor --json
""")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json: bool) -> None:
    """Check what this machine lets spanflame do, with a fix for each failing line."""
    from agent.doctor import FAIL, as_json as to_json, run_checks, stack_source, summary

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
        click.echo("")
        for line in summary(checks):
            click.echo(f"  {line}")
    if any(c.status == FAIL for c in checks):
        sys.exit(1)


def _show_envvars(group: click.Group) -> None:
    """Every option that an environment variable can set says so in --help."""
    for cmd in group.commands.values():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.envvar:
                p.show_envvar = True


_show_envvars(cli)


def main() -> None:
    """Console entry point: every SpanflameError becomes one line on stderr and an exit code."""
    try:
        rv = cli.main(standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.UsageError as exc:
        # Keep click's usage line and its "Try ... -h" hint: that is where to look next.
        if exc.ctx is not None:
            click.echo(exc.ctx.get_usage(), err=True)
        click.echo(f"spanflame: error: {exc.format_message()}", err=True)
        if exc.ctx is not None:
            click.echo(f"Try '{exc.ctx.command_path} -h' for help.", err=True)
        sys.exit(exc.exit_code)
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
