/* sched: on-CPU runs and off-CPU waits of target threads, from sched:sched_switch.
 *
 * For each target thread we keep the start of its current on-CPU "run". A thread that leaves
 * the CPU and comes back within OFFCPU_MIN_NS stays in the same run (the gap is added to
 * short_off); a longer absence ends the run and emits one record describing the run and the
 * off-CPU wait that followed it. Events per thread are thus bounded by 1 / OFFCPU_MIN_NS, and
 * user space gets both exact CPU time (run minus short_off) and every wait >= OFFCPU_MIN_NS.
 * The kernel stack is taken only when a target thread blocks, and records go to a ring buffer
 * without waking user space, which drains it on a timer.
 *
 * prev_state: 0 or >= 0x100 (TASK_REPORT_MAX, "R+") means the thread was preempted or yielded
 * while runnable; 1 is interruptible sleep (S), 2 uninterruptible (D).
 */
#ifndef OFFCPU_MIN_NS
#define OFFCPU_MIN_NS 1000000ULL
#endif
#ifndef SCHED_RB_PAGES
#define SCHED_RB_PAGES 256
#endif

#define TS_NEW 1  /* created by sched_wakeup_new: its first run starts when it first runs */

/* User space seeds an entry for every thread of a new target (its state read from /proc), so
 * run_start is 0 only for threads it could not see. */
struct tstate {
    u64 run_start;      /* 0: unknown */
    u64 off_start;      /* 0: on CPU */
    u64 short_off;
    u64 futex_uaddr;    /* futex the thread was waiting on when it left the CPU */
    u32 tgid;
    u32 state;
    s32 kstack;
    u32 flags;
};

struct sched_event {
    u32 tgid;
    u32 tid;
    u64 run_start;
    u64 run_end;        /* the thread left the CPU (or exited) */
    u64 off_end;        /* it came back; 0 if it exited */
    u64 short_off;
    u64 futex_uaddr;
    u32 state;
    s32 kstack;
};

BPF_TABLE("lru_hash", u32, struct tstate, tstates, MAX_THREADS);
BPF_STACK_TRACE(kstacks, STACK_ENTRIES);
BPF_RINGBUF_OUTPUT(sched_events, SCHED_RB_PAGES);

#ifdef WITH_LOCK
/* Owned by lock.bpf.c; declared here so that a thread's off-CPU wait knows its futex. */
struct futex_wait {
    u64 start;
    u64 uaddr;
    u32 op;
    u32 pad;
};
BPF_TABLE("lru_hash", u32, struct futex_wait, futex_inflight, MAX_THREADS);
#endif

static __always_inline void emit_run(u32 tid, struct tstate *s, u64 run_end, u64 off_end)
{
    struct sched_event *e = sched_events.ringbuf_reserve(sizeof(struct sched_event));
    if (!e) {
        count(C_SCHED_RB_DROP);
        return;
    }
    e->tgid = s->tgid;
    e->tid = tid;
    e->run_start = s->run_start;
    e->run_end = run_end;
    e->off_end = off_end;
    e->short_off = s->short_off;
    e->futex_uaddr = s->futex_uaddr;
    e->state = s->state;
    e->kstack = s->kstack;
    sched_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 prev = args->prev_pid;
    u32 next = args->next_pid;

    /* The task leaving the CPU is the current one. An exiting task (reported state X or Z) was
     * already accounted for at sched_process_exit. */
    long prev_state = args->prev_state;
    if (prev != 0 && !(prev_state & 0x30)) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        if (is_target(tgid)) {
            struct tstate zero = {};
            zero.tgid = tgid;
            zero.kstack = -1;
            struct tstate *s = tstates.lookup_or_try_init(&prev, &zero);
            if (!s) {
                count(C_THREAD_MAP_FULL);
            } else {
                s->flags = 0;
                long st = prev_state;
                s->off_start = now;
                s->state = (u32)st;
                s->futex_uaddr = 0;
                s->kstack = -1;
                if (st > 0 && st < 0x100) {
#ifdef WITH_STACKS
                    s->kstack = kstacks.get_stackid(args, 0);
                    if (s->kstack < 0)
                        count(C_KSTACK_ERR);
#endif
#ifdef WITH_LOCK
                    struct futex_wait *w = futex_inflight.lookup(&prev);
                    if (w)
                        s->futex_uaddr = w->uaddr;
#endif
                }
            }
        }
    }

    if (next != 0) {
        struct tstate *s = tstates.lookup(&next);
        if (s && (s->flags & TS_NEW)) {
            s->run_start = now;
            s->flags = 0;
        } else if (s && s->off_start) {
            u64 gap = now - s->off_start;
            if (gap >= OFFCPU_MIN_NS) {
                emit_run(next, s, s->off_start, now);
                s->run_start = now;
                s->short_off = 0;
            } else {
                s->short_off += gap;
            }
            s->off_start = 0;
        }
    }
    return 0;
}

/* A new thread (or child process) of a target: runs in the parent, which knows the tgid. */
TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!is_target(tgid))
        return 0;
    u32 tid = args->pid;
    struct tstate z = {};
    z.tgid = tgid;
    z.kstack = -1;
    z.flags = TS_NEW;
    if (tstates.update(&tid, &z) != 0)
        count(C_THREAD_MAP_FULL);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct tstate *s = tstates.lookup(&tid);
    if (s) {
        emit_run(tid, s, bpf_ktime_get_ns(), 0);
        tstates.delete(&tid);
    }
    return 0;
}
