/* sched: on-CPU runs and off-CPU waits of target threads, each wait with the Python stack the
 * thread blocked in, from the sched_switch raw tracepoint; and the CPU sampler that closes
 * waits of threads that have been running since (cpu.bpf.c) shares this state.
 *
 * At sched_switch the current task is the one leaving the CPU, so its user memory is readable:
 * its Python stack is read then (pystack.h) and kept in the thread's slot until the wait ends.
 * A thread's run begins at the previous switch on its CPU (`cpu_last`), so nothing needs the
 * next task's task_struct: the wait that ended when a thread came back is closed when it next
 * leaves the CPU, or at the next CPU sample that finds it running.
 *
 * A wait of at least OFFCPU_MIN_NS becomes one EV_WAIT record (with the run before it). Shorter
 * blocked waits are added up per thread while the thread keeps blocking in the same place (same
 * Python stack, kernel stack and futex): one EV_WAIT_AGG record per stretch, flushed when the
 * place changes, AGG_FLUSH_NS have added up, or AGG_SPAN_NS have passed. Shorter preemptions
 * only shorten the run's CPU time (short_off).
 *
 * A blocking switch takes the kernel stack once per place (KSTACK_REUSE_NS): the same Python
 * stack, syscall, first argument and state reuse the stack id taken last time (get_stackid is
 * the dearest step of a switch on cold caches).
 *
 * This hook runs with the runqueue lock held: it only looks up per-thread state (created in
 * process context: by task_newtask for new threads, by user space for existing ones) and writes
 * into it, into per-CPU arrays and into the ring buffer. It never inserts into or deletes from a
 * hash map (a hash update under the runqueue lock can deadlock with paravirt spinlocks).
 */
#ifndef OFFCPU_MIN_NS
#define OFFCPU_MIN_NS 1000000ULL
#endif
#ifndef AGG_FLUSH_NS
#define AGG_FLUSH_NS 10000000ULL
#endif
#ifndef AGG_SPAN_NS
#define AGG_SPAN_NS 100000000ULL
#endif
#ifndef KSTACK_REUSE_NS
#define KSTACK_REUSE_NS 1000000000ULL
#endif
#ifndef MAX_CPUS
#define MAX_CPUS 1024
#endif
#define CLONE_THREAD 0x00010000

/* Reported states (as the sched_switch tracepoint prints them): 1 S, 2 D, 0x100 preempted. */
#define ST_PREEMPTED 0x100
/* Raw task states. */
#define RAW_INTERRUPTIBLE 0x1
#define RAW_UNINTERRUPTIBLE 0x2
#define RAW_DEAD 0x80

struct tstate {
    u64 run_start;      /* 0: not known yet */
    u64 off_start;      /* 0: on CPU (or never seen leaving it) */
    u64 short_off;
    u64 futex_uaddr;    /* first argument of the syscall it blocked in (a futex's address) */
    u32 syscall;        /* the syscall it blocked in, NO_SYSCALL if unknown */
    u32 tgid;
    u32 state;
    s32 kstack;
    u32 agg_count;      /* short blocked waits added up since agg_first, all in one place: */
    u64 agg_ns;
    u64 agg_first;
    u64 agg_last;
    u64 agg_futex;      /* ... this futex, */
    s32 agg_kstack;     /* ... kernel stack, */
    u32 agg_state;      /* ... task state */
    u32 agg_hash;       /* ... and the Python stack in the slot (its hash) */
    u32 agg_syscall;
    u64 net_first;      /* when the bytes in net_bytes began to add up */
    u64 net_bytes[2];   /* TCP bytes sent, received since the last EV_NET record */
    u64 kc_stamp;       /* the kernel stack last taken at a blocking switch (kc_kstack), when, */
    u64 kc_arg0;        /* ... and where: the syscall's first argument, */
    u32 kc_syscall;     /* ... the syscall, */
    u32 kc_hash;        /* ... the Python stack (hash, depth) */
    u16 kc_depth;
    u16 kc_state;       /* ... and the task state */
    s32 kc_kstack;
};

BPF_ARRAY(cpu_last, u64, MAX_CPUS);
BPF_HASH(tstates, u32, struct tstate, MAX_THREADS);
/* The Python stack each thread last blocked (or was preempted) in; allocated per thread. */
BPF_F_TABLE("hash", u32, struct sf_record, tstacks, MAX_THREADS, BPF_F_NO_PREALLOC);

#ifndef TASK_STACK_OFF
#define TASK_STACK_OFF 0            /* offsetof(task_struct, stack), from BTF */
#endif
#define PT_REGS_SIZE 168            /* x86-64 struct pt_regs */
#define PT_REGS_SI 104              /* si, di, orig_ax, ip, cs, flags, sp, ss follow */
#define USER_CS 0x33
#define USER_DS 0x2b
#define NR_FUTEX 202
#define NO_SYSCALL 0xffff

/* The system call a blocking thread is in, from the user registers the kernel saved at the top
 * of its stack: the number and its first argument (for futex, the address waited on; for
 * select, the number of descriptors). No syscall tracepoint: attaching one costs every system
 * call of the host. The top is THREAD_SIZE above `stack`, less FRED's padding: the candidates
 * are tried in turn and a frame counts only if it has user-mode code and stack segments. */
static __always_inline void blocking_syscall(u32 *nr, u64 *arg0)
{
    *nr = NO_SYSCALL;
    *arg0 = 0;
#if TASK_STACK_OFF == 0
    return;   /* no BTF: the offset of task_struct.stack is unknown */
#endif
    u64 task = (u64)bpf_get_current_task();
    u64 stack = 0;
    if (bpf_probe_read_kernel(&stack, sizeof(stack), (void *)(task + TASK_STACK_OFF)) || !stack)
        return;
    u64 regs[8];   /* si, di, orig_ax, ip, cs, flags, sp, ss */
    u64 tops[4] = {16384, 16384 - 16, 32768, 32768 - 16};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u64 at = stack + tops[i] - PT_REGS_SIZE + PT_REGS_SI;
        if (bpf_probe_read_kernel(regs, sizeof(regs), (void *)at))
            continue;
        if (regs[4] == USER_CS && regs[7] == USER_DS && regs[2] < 1024) {
            *nr = (u32)regs[2];
            *arg0 = regs[1];
            return;
        }
    }
    count(C_SYSCALL_UNKNOWN);
}

static __always_inline void fill(struct sf_record *r, u16 kind, struct tstate *s, u32 tid)
{
    r->ev.kind = kind;
    r->ev.tgid = s->tgid;
    r->ev.tid = tid;
}

static __always_inline void flush_agg(u32 tid, struct tstate *s, struct sf_record *slot)
{
    if (!s->agg_count)
        return;
    fill(slot, EV_WAIT_AGG, s, tid);
    slot->ev.t0 = s->agg_first;
    slot->ev.t1 = s->agg_last;
    slot->ev.value = s->agg_ns;
    slot->ev.count = s->agg_count;
    slot->ev.run_start = 0;
    slot->ev.short_off = 0;
    slot->ev.kstack = s->agg_kstack;
    slot->ev.aux = s->agg_futex;
    slot->ev.state = s->agg_state;
    slot->ev.syscall = s->agg_syscall;
    emit(slot);
    s->agg_count = 0;
    s->agg_ns = 0;
}

/* The thread came back on CPU at `on_at` after leaving it at s->off_start: close that wait. */
static __always_inline void came_back(u32 tid, struct tstate *s, struct sf_record *slot,
                                      u64 on_at)
{
    if (!s->off_start) {
        if (!s->run_start)
            s->run_start = on_at;
        return;
    }
    u64 gap = on_at > s->off_start ? on_at - s->off_start : 0;
    if (gap >= OFFCPU_MIN_NS) {
        count(C_WAITS);
        if (slot) {
            fill(slot, EV_WAIT, s, tid);
            slot->ev.t0 = s->off_start;
            slot->ev.t1 = on_at;
            slot->ev.value = gap;
            slot->ev.count = 1;
            slot->ev.run_start = s->run_start;
            slot->ev.short_off = s->short_off;
            emit(slot);
        }
        s->run_start = on_at;
        s->short_off = 0;
    } else {
        s->short_off += gap;
        if (slot && (s->state == 1 || s->state == 2)) {
            count(C_SHORT_WAITS);
            if (!s->agg_count) {
                s->agg_first = s->off_start;
                s->agg_kstack = s->kstack;
                s->agg_futex = s->futex_uaddr;
                s->agg_state = s->state;
                s->agg_hash = slot->ev.py.hash;
                s->agg_syscall = s->syscall;
            }
            s->agg_count++;
            s->agg_ns += gap;
            s->agg_last = on_at;
            if (s->agg_ns >= AGG_FLUSH_NS || on_at - s->agg_first >= AGG_SPAN_NS)
                flush_agg(tid, s, slot);
        }
    }
    s->off_start = 0;
}

RAW_TRACEPOINT_PROBE(sched_switch)
{
    /* args: bool preempt, struct task_struct *prev, struct task_struct *next, u32 prev_state */
    u64 now = bpf_ktime_get_ns();
    u32 cpu = bpf_get_smp_processor_id();
    u64 *last = cpu_last.lookup(&cpu);
    if (!last)
        return 0;
    u64 on_at = *last ? *last : now;
    *last = now;

    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u32 tgid = id >> 32;
    if (tid == 0 || !target_bit(tgid))
        return 0;
    u32 raw_state = (u32)ctx->args[3];
    if (raw_state & RAW_DEAD)
        return 0;  /* exiting: accounted for at sched_process_exit */
    /* A thread with state is a target's (state exists only for those, and goes when its
     * process stops being one): the `targets` lookup is needed only without it. */
    struct tstate *s = tstates.lookup(&tid);
    if (!s || s->tgid != tgid) {
        if (is_target(tgid))
            count(C_THREAD_UNTRACKED);
        return 0;
    }
    struct sf_record *slot = tstacks.lookup(&tid);
    came_back(tid, s, slot, on_at);

    /* Now it leaves the CPU. */
    u32 st = 0;
    if (ctx->args[0])
        st = ST_PREEMPTED;
    else if (raw_state & RAW_UNINTERRUPTIBLE)
        st = 2;
    else if (raw_state & RAW_INTERRUPTIBLE)
        st = 1;
    s->off_start = now;
    s->state = st;
    s->futex_uaddr = 0;
    s->syscall = NO_SYSCALL;
    s->kstack = -1;
    int blocked = st == 1 || st == 2;
    if (blocked) {
        u32 nr;
        u64 arg0;
        blocking_syscall(&nr, &arg0);
        s->syscall = nr;
        s->futex_uaddr = arg0;
    }
    struct sf_record *r = slot ? record_buf(SCRATCH_IRQ) : NULL;
    u32 depth = 0;
    if (r)
        depth = py_walk(tgid, SCRATCH_IRQ, &r->ev.py, r->frames);
    if (blocked) {
        /* The kernel stack, once per place: a thread blocking again with the same Python stack,
         * syscall, first argument (futex address, descriptor) and state within KSTACK_REUSE_NS
         * takes the same kernel path, and get_stackid is the dearest part of a switch. Without
         * a Python stack, the place is unknown: always taken. */
        u32 h = r ? r->ev.py.hash : 0;
        if (depth && s->kc_kstack >= 0 && s->kc_hash == h && s->kc_depth == depth &&
            s->kc_syscall == s->syscall && s->kc_arg0 == s->futex_uaddr && s->kc_state == st &&
            now - s->kc_stamp < KSTACK_REUSE_NS) {
            s->kstack = s->kc_kstack;
        } else {
            s->kstack = kstacks.get_stackid(ctx, 0);
            if (s->kstack < 0)
                count(C_KSTACK_ERR);
            s->kc_kstack = depth ? s->kstack : -1;
            s->kc_hash = h;
            s->kc_depth = depth;
            s->kc_syscall = s->syscall;
            s->kc_arg0 = s->futex_uaddr;
            s->kc_state = st;
            s->kc_stamp = now;
        }
    }
    if (!r)
        return 0;
    int same_stack = r->ev.py.hash == slot->ev.py.hash && depth == slot->ev.py.depth &&
                     r->ev.py.err == slot->ev.py.err;
    /* Short waits add up while the thread blocks in one place (Python stack, futex, state; the
     * kernel stack id is left out: the scheduler's own frames at its top vary from one block
     * to the next on the same path, and the first wait's kernel stack stands for the rest). A
     * switch while runnable (preempted, or woken before it got off the CPU: state 0) adds
     * nothing and ends the stretch only if it moves the stack. */
    int same_place = same_stack && (st == ST_PREEMPTED || st == 0 ||
                                    (s->futex_uaddr == s->agg_futex && st == s->agg_state &&
                                     s->syscall == s->agg_syscall));
    if (s->agg_count && !same_place)
        flush_agg(tid, s, slot);
    if (!same_stack) {
        slot->ev.py = r->ev.py;
        if (depth)
            bpf_probe_read_kernel(slot->frames, ((depth * sizeof(struct py_frame) - 1) &
                                                 (PY_MAX_FRAMES * sizeof(struct py_frame) - 1)) + 1,
                                  r->frames);
    }
    slot->ev.kstack = s->kstack;
    slot->ev.aux = s->futex_uaddr;
    slot->ev.state = st;
    slot->ev.syscall = s->syscall;
    return 0;
}

/* A new thread of a target process: its state exists before it first runs (process context,
 * where inserting into hash maps is safe). */
TRACEPOINT_PROBE(task, task_newtask)
{
    if (!(args->clone_flags & CLONE_THREAD))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!is_target(tgid))
        return 0;
    u32 tid = args->pid;
    struct tstate zero = {};
    zero.tgid = tgid;
    zero.kstack = -1;
    if (tstates.update(&tid, &zero)) {
        count(C_THREAD_MAP_FULL);
        return 0;
    }
    struct sf_record *r = record_buf(SCRATCH_TASK);
    if (!r)
        return 0;
    __builtin_memset(&r->ev, 0, sizeof(r->ev));
    r->ev.kstack = -1;
    r->ev.py.hash = 0x5f5f5f5f;  /* no stack yet: matches nothing */
    if (tstacks.update(&tid, r))
        count(C_THREAD_MAP_FULL);
    r->ev.kind = EV_THREAD;
    r->ev.tgid = tgid;
    r->ev.tid = tid;
    r->ev.t0 = bpf_ktime_get_ns();
    emit(r);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct tstate *s = tstates.lookup(&tid);
    if (!s)
        return 0;
    u32 cpu = bpf_get_smp_processor_id();
    u64 *last = cpu_last.lookup(&cpu);
    u64 now = bpf_ktime_get_ns();
    struct sf_record *slot = tstacks.lookup(&tid);
    came_back(tid, s, slot, last && *last ? *last : now);
    if (slot)
        flush_agg(tid, s, slot);
    struct sf_record *r = record_buf(SCRATCH_TASK);
    if (r) {
        __builtin_memset(&r->ev, 0, sizeof(r->ev));
        fill(r, EV_EXIT, s, tid);
        r->ev.kstack = -1;
        r->ev.t0 = now;
        r->ev.run_start = s->run_start;
        r->ev.short_off = s->short_off;
        emit(r);
    }
    tstates.delete(&tid);
    tstacks.delete(&tid);
    return 0;
}
