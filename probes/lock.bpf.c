/* lock: futex waits (wait-type operations only) and kernel lock contention of target threads.
 *
 * A wait of at least LOCK_EVENT_MIN_NS becomes one record (with its user stack: a few native
 * frames, since CPython has no frame pointers; the Python stack comes from py-spy). Shorter
 * waits add up in per-thread time buckets in the kernel. A futex inside the interpreter's
 * _PyRuntime (its address range per process is in `pyruntime`) is a GIL wait.
 *
 * futex cmd = op & 0x7f; waits: 0 WAIT, 6 LOCK_PI, 9 WAIT_BITSET, 11 WAIT_REQUEUE_PI,
 * 13 LOCK_PI2. lock:contention_begin nests: keep the outermost per thread and match its
 * address at contention_end.
 */
#ifndef LOCK_EVENT_MIN_NS
#define LOCK_EVENT_MIN_NS 200000ULL
#endif
#ifndef LOCK_RB_PAGES
#define LOCK_RB_PAGES 128
#endif

#define KIND_FUTEX 1
#define KIND_GIL 2
#define KIND_KLOCK 3

#ifndef WITH_SCHED
struct futex_wait {
    u64 start;
    u64 uaddr;
    u32 op;
    u32 pad;
};
BPF_TABLE("lru_hash", u32, struct futex_wait, futex_inflight, MAX_THREADS);
#endif

struct pyrt_range {
    u64 start;
    u64 end;
};

struct klock_wait {
    u64 start;
    u64 addr;
};

struct lock_event {
    u32 tgid;
    u32 tid;
    u64 start;
    u64 end;
    u64 addr;
    u32 kind;
    s32 ustack;
};

BPF_HASH(pyruntime, u32, struct pyrt_range, MAX_TARGETS);
BPF_TABLE("lru_hash", u32, struct klock_wait, klock_inflight, MAX_THREADS);
BPF_HASH(lock_buckets, struct bucket_key, struct bucket_val, MAX_BUCKETS);
BPF_STACK_TRACE(ustacks, STACK_ENTRIES);
BPF_RINGBUF_OUTPUT(lock_events, LOCK_RB_PAGES);

static __always_inline int futex_is_wait(int op)
{
    int cmd = op & 0x7f;
    return cmd == 0 || cmd == 6 || cmd == 9 || cmd == 11 || cmd == 13;
}

static __always_inline void lock_record(void *ctx, u32 tgid, u32 tid, u64 start, u64 end,
                                        u64 addr, u32 kind)
{
    u64 dur = end - start;
    if (dur >= LOCK_EVENT_MIN_NS) {
        count(C_LOCK_EVENTS);
        struct lock_event *e = lock_events.ringbuf_reserve(sizeof(struct lock_event));
        if (!e) {
            count(C_LOCK_RB_DROP);
            return;
        }
        e->tgid = tgid;
        e->tid = tid;
        e->start = start;
        e->end = end;
        e->addr = addr;
        e->kind = kind;
        e->ustack = -1;
#ifdef WITH_USTACKS
        if (kind != KIND_KLOCK) {
            e->ustack = ustacks.get_stackid(ctx, BPF_F_USER_STACK);
            if (e->ustack < 0)
                count(C_USTACK_ERR);
        }
#endif
        lock_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
        return;
    }
    count(C_LOCK_SHORT);
    struct bucket_key k = {};
    k.tgid = tgid;
    k.tid = tid;
    k.bucket = start / BUCKET_NS;
    k.kind = kind;
    struct bucket_val zero = {};
    struct bucket_val *v = lock_buckets.lookup_or_try_init(&k, &zero);
    if (!v) {
        count(C_BUCKET_MAP_FULL);
        return;
    }
    __sync_fetch_and_add(&v->value, dur);
    __sync_fetch_and_add(&v->count, 1);
}

TRACEPOINT_PROBE(syscalls, sys_enter_futex)
{
    if (!futex_is_wait(args->op))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    u32 tid = (u32)id;
    struct futex_wait w = {};
    w.start = bpf_ktime_get_ns();
    w.uaddr = (u64)args->uaddr;
    w.op = args->op;
    if (futex_inflight.update(&tid, &w) != 0)
        count(C_FUTEX_MAP_FULL);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_futex)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!is_target(tgid))
        return 0;
    u32 tid = (u32)id;
    struct futex_wait *w = futex_inflight.lookup(&tid);
    if (!w)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u32 kind = KIND_FUTEX;
    struct pyrt_range *r = pyruntime.lookup(&tgid);
    if (r && w->uaddr >= r->start && w->uaddr < r->end)
        kind = KIND_GIL;
    lock_record(args, tgid, tid, w->start, now, w->uaddr, kind);
    futex_inflight.delete(&tid);
    return 0;
}

#ifdef WITH_KLOCK
TRACEPOINT_PROBE(lock, contention_begin)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    u32 tid = (u32)id;
    if (klock_inflight.lookup(&tid))
        return 0;  /* nested: keep the outermost */
    struct klock_wait w = {};
    w.start = bpf_ktime_get_ns();
    w.addr = (u64)args->lock_addr;
    klock_inflight.update(&tid, &w);
    return 0;
}

TRACEPOINT_PROBE(lock, contention_end)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!is_target(tgid))
        return 0;
    u32 tid = (u32)id;
    struct klock_wait *w = klock_inflight.lookup(&tid);
    if (!w || w->addr != (u64)args->lock_addr)
        return 0;
    lock_record(args, tgid, tid, w->start, bpf_ktime_get_ns(), w->addr, KIND_KLOCK);
    klock_inflight.delete(&tid);
    return 0;
}
#endif
