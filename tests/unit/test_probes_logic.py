"""Pure logic of the probe layer: planning, wait reasons, stack lookup, exact CPU, attribution."""

from agent.model import Frame, Profile, SAMPLE_TYPES
from agent.timeline import Slice, ThreadTimeline
from agent.reasons import classify, is_sync_wait
from agent.recordprofile import add_records, kernel_python_stack
from agent.waits import UNSAMPLED, RunsCpu, StackIndex, add_probe_samples, run_pieces
from probes import registry
from probes.records import Bucket, IoRequest, NetBytes, ProbeData, Run, Sample, ShortWaits

MS = 1_000_000
K = lambda *names: tuple(Frame(n, "[kernel]") for n in names)


def test_plan_compiles_sched_first_and_picks_fallbacks():
    have = {("sched", "sched_switch"), ("sched", "sched_process_exit"), ("task", "task_newtask"),
            ("block", "block_bio_queue"), ("block", "block_rq_complete")}
    p = registry.plan(["cpu", "lock", "io", "net"], exists=lambda c, e: (c, e) in have)
    # The lock probe needs no tracepoint of its own (no syscalls:* either: those cost every
    # system call of the host): the sched probe reads the futex from the blocked thread.
    assert p.probes == ["cpu", "lock", "io"]
    assert p.sources == ["sched.bpf.c", "cpu.bpf.c", "io.bpf.c"]
    assert "HAVE_BLOCK_IO_START" not in p.defines
    assert "sock:sock_send_length" in p.off["net"] and p.off["net"].endswith("missing")
    have |= {("block", "block_io_start")}
    p = registry.plan(["lock", "io"], exists=lambda c, e: (c, e) in have)
    assert "HAVE_BLOCK_IO_START" in p.defines


def test_plan_without_sched_switch_turns_everything_off():
    p = registry.plan(["offcpu", "lock"], exists=lambda c, e: e != "sched_switch")
    assert p.probes == [] and set(p.off) == {"offcpu", "lock"}
    assert all("sched:sched_switch" in why for why in p.off.values())


def test_deny_list(monkeypatch):
    monkeypatch.setenv("SPANFLAME_DENY_TRACEPOINTS", "sock:sock_send_length, tcp:tcp_probe")
    assert registry.denied_tracepoints() == {"sock:sock_send_length", "tcp:tcp_probe"}


def run(state=1, kstack=(), futex=0, start=0, end=10, off_end=20, py=()):
    return Run(1, 2, start * MS, end * MS, off_end * MS, 0, state, kstack, futex, py)


def P(*names, file="/usr/lib/python3.11/threading.py"):
    return tuple(Frame(n, file, 1) for n in names)


def test_the_syscall_a_thread_blocked_in_says_why():
    sel = Run(1, 2, 0, 10, 20, 0, 1, K("do_select", "core_sys_select"), 0, (), 270, 0)
    assert classify(sel, None) == "sleep"          # 3.10's time.sleep: select() of nothing
    assert classify(sel._replace(arg0=5), None) == "net"
    assert classify(run()._replace(syscall=74), None) == "io"            # fsync
    assert classify(run()._replace(syscall=230), None) == "sleep"        # clock_nanosleep


def test_classify_reasons():
    assert classify(run(state=0x100), None) == "runqueue"
    assert classify(run(futex=0x1000), (0x1000, 0x2000)) == "gil"
    assert classify(run(futex=0x3000), (0x1000, 0x2000)) == "lock"
    assert classify(run(kstack=K("futex_do_wait", "__futex_wait")), None) == "lock"
    assert classify(run(kstack=K("io_schedule", "folio_wait_bit")), None) == "io"
    assert classify(run(kstack=K("wait_for_completion", "jbd2_log_wait_commit")), None) == "io"
    assert classify(run(kstack=K("sk_wait_data", "tcp_recvmsg_locked")), None) == "net"
    assert classify(run(kstack=K("do_epoll_wait")), None) == "net"
    assert classify(run(kstack=K("do_nanosleep", "hrtimer_nanosleep")), None) == "sleep"
    assert classify(run(state=2, kstack=K("something_else")), None) == "io"
    assert classify(run(kstack=K("pipe_read")), None) == "other"


def test_a_thread_waiting_to_be_signalled_is_not_lock_contention():
    idle = P("Condition.wait", "Event.wait") + P("worker", file="/srv/app.py")
    queue = P("Condition.wait") + P("Queue.get", file="/usr/lib/python3.11/queue.py")
    joiner = P("Thread._wait_for_tstate_lock", "Thread.join")
    contended = P("Repo.save", file="/srv/app.py")
    assert classify(run(futex=0x3000, py=idle), (0x1000, 0x2000)) == "sync"
    assert classify(run(futex=0x3000, py=queue), None) == "sync"
    assert classify(run(kstack=K("futex_do_wait"), py=joiner), None) == "sync"
    assert classify(run(futex=0x3000, py=contended), None) == "lock"
    # The GIL stays the GIL, whatever the thread was doing when it asked for it.
    assert classify(run(futex=0x1800, py=idle), (0x1000, 0x2000)) == "gil"
    # A user function that happens to be called `wait` is not threading's.
    assert not is_sync_wait(P("Condition.wait", file="/srv/mylib/threading_utils.py"))


def tl(*slices, tid=2, name="t"):
    return ThreadTimeline(pid=1, tid=tid, name=name,
                          slices=[Slice(a * MS, b * MS, tuple(Frame(n, "/a.py", 1) for n in st))
                                  for a, b, st in slices])


def test_stack_during_a_wait_prefers_a_stack_seen_inside_it():
    t = tl((0, 10, ["before"]), (10, 30, ["waiting"]), (30, 40, ["after"]))
    i = StackIndex(t)
    assert i.during(5 * MS, 25 * MS)[0].name == "waiting"   # first seen inside the wait
    assert i.during(12 * MS, 25 * MS)[0].name == "waiting"  # seen before it, not contradicted
    assert i.at(35 * MS)[0].name == "after"


def test_runs_cpu_is_exact_and_runs_get_the_stacks_seen_inside_them():
    data = ProbeData(runs=[
        Run(1, 2, 0, 10 * MS, 30 * MS, 0, 1, (), 0),       # on CPU 0-10, waits 10-30
        Run(1, 2, 30 * MS, 40 * MS, 50 * MS, 0, 1, (), 0),  # on CPU 30-40
    ], open_runs={2: (1, 50 * MS, None, 0)})                # on CPU again from 50 to the end
    cpu = RunsCpu(data, pid=1, start_ns=0, end_ns=60 * MS)
    assert cpu.oncpu_ns(2, 0, 60 * MS) == 30 * MS
    assert cpu.activity(2, 5 * MS) == 1.0 and cpu.activity(2, 20 * MS) == 0.0
    # py-spy saw "compute" at 2 (on CPU), "recv" at 12 (waiting), "parse" at 36 (in the run that
    # started at 30); nothing during the run from 50.
    t = tl((2, 12, ["compute"]), (12, 36, ["recv"]), (36, 60, ["parse"]))
    pieces = list(run_pieces(t, cpu))
    got = [(p.stack[0].name, p.start_ns // MS, p.end_ns // MS) for p in pieces]
    # The run from 30 resumes in recv; the switch to parse is put halfway to where it was seen.
    assert got == [("compute", 2, 10), ("recv", 30, 33), ("parse", 33, 40), ("parse", 50, 60)]
    # An exact switch time (a span boundary) is used as it is.
    got = [(p.stack[0].name, p.start_ns // MS, p.end_ns // MS)
           for p in run_pieces(t, cpu, exact={36 * MS})]
    assert got[1:3] == [("recv", 30, 36), ("parse", 36, 40)]
    by: dict = {}
    for p in pieces:
        by[p.stack[0].name] = by.get(p.stack[0].name, 0) + cpu.oncpu_ns(2, p.start_ns, p.end_ns)
    assert by == {"compute": 8 * MS, "recv": 3 * MS, "parse": 17 * MS}


def test_add_probe_samples_attributes_and_clips():
    prof = Profile([SAMPLE_TYPES[n] for n in ("samples", "off_cpu", "lock_wait", "gil_wait",
                                               "io_wait", "io", "net_send")])
    t = tl((0, 100, ["handler", "main"]))
    data = ProbeData(
        runs=[Run(1, 2, 0, 10 * MS, 30 * MS, 0, 2, K("io_schedule"), 0),
              Run(1, 2, 30 * MS, 90 * MS, 150 * MS, 0, 1, K("sk_wait_data"), 0)],
        short_waits=[ShortWaits(1, 2, 40 * MS, 50 * MS, 10 * MS, 20, 1, K("futex_do_wait"),
                                0x10, ()),
                     ShortWaits(1, 2, 60 * MS, 65 * MS, 5 * MS, 5, 1, K("futex_do_wait"),
                                0x99, ())],
        io=[IoRequest(1, 2, 5 * MS, 9 * MS, 4096, "8:0", "write", "WS"),
            IoRequest(1, 2, 6 * MS, 9 * MS, 1 << 20, "8:0", "discard", "DS"),
            IoRequest(1, 2, 500 * MS, 501 * MS, 4096, "8:0", "write", "W")],
        net_bytes=[NetBytes(1, 2, 95 * MS, 105 * MS, "send", 1000, ())],
        gil_ranges={1: (0x10, 0x20)})
    s = add_probe_samples(prof, 1, {2: t}, data, window=(0, 100 * MS))
    assert prof.total("off_cpu") == 20 * MS + 10 * MS + 15 * MS  # the net wait is clipped
    assert prof.total("io_wait") == 20 * MS
    assert prof.total("gil_wait") == 10 * MS and prof.total("lock_wait") == 5 * MS
    assert prof.total("io") == 4096                         # no discard, nothing outside
    assert prof.total("net_send") == 500                    # half of it is in the window
    stacks = {s[0].name: s for s, _l, v in prof.iter_type("gil_wait")}
    assert [f.name for f in stacks["[GIL wait]"]] == ["[GIL wait]", "futex_do_wait", "handler",
                                                      "main"]
    reasons = {dict(l)["reason"] for s, l, v in prof.iter_type("off_cpu")}
    assert reasons == {"io", "net", "gil", "lock"}
    assert s.io_bytes == 4096 and s.gil_ns == 10 * MS


def test_kernel_records_carry_their_own_stacks():
    """With the kernel walker, every record has the Python stack of its moment: CPU samples
    add CPU there, each wait goes on the stack it blocked in, short waits too."""
    prof = Profile([SAMPLE_TYPES[n] for n in ("samples", "cpu", "off_cpu", "lock_wait", "wall")])
    handler, save = P("handler", file="/srv/app.py"), P("Repo.save", "handler", file="/srv/app.py")
    data = ProbeData(
        samples=[Sample(1, 2, 1 * MS, 10 * MS, (), handler), Sample(1, 2, 11 * MS, 10 * MS, (),
                                                                    handler),
                 Sample(1, 2, 200 * MS, 10 * MS, (), handler)],   # outside the window
        runs=[Run(1, 2, 0, 20 * MS, 50 * MS, 0, 1, K("futex_do_wait"), 0x99, save)],
        short_waits=[ShortWaits(1, 2, 60 * MS, 70 * MS, 3 * MS, 9, 1, K("futex_do_wait"), 0x99,
                                save)])
    s = add_records(prof, 1, data, python_stack=kernel_python_stack, window=(0, 100 * MS))
    cpu = {tuple(f.name for f in st): v for st, _l, v in prof.iter_type("cpu")}
    assert cpu == {("handler",): 20 * MS} and s.cpu_ns == 20 * MS
    lock = {tuple(f.name for f in st): v for st, _l, v in prof.iter_type("lock_wait")}
    assert lock == {("[lock wait]", "futex_do_wait", "Repo.save", "handler"): 33 * MS}
    assert prof.total("wall") == 20 * MS + 33 * MS


def test_a_waits_stack_is_what_py_spy_saw_for_most_of_it_and_never_from_before_its_span():
    before, waiting, after = ((Frame("prepare"),), (Frame("wait_on_lock"),), (Frame("next"),))
    tl = ThreadTimeline(1, 2, "t", [Slice(0, 110, before), Slice(110, 300, waiting),
                                    Slice(300, 400, after)])
    idx = StackIndex(tl)
    # py-spy stamped the change late: the wait (100, 290] shows `prepare` for 10 ns only.
    assert idx.during(100, 290) == waiting
    # No change seen during the wait: the stack covering its start.
    assert idx.during(120, 280) == waiting
    # That stack was seen before the wait's span began (the span starts at 250): stale. The
    # first stack py-spy saw after the wait, inside the span, is used instead.
    assert idx.during(260, 280, span=(250, 350)) == after
    # Nothing seen inside the span at all: every stack we have predates the span and is some
    # other code's, so the wait says its Python stack was not sampled instead of guessing.
    assert idx.during(260, 280, span=(250, 290)) == UNSAMPLED
    # Without a span, the stack covering its start, as before.
    assert idx.during(260, 280) == waiting
