/* lock: which futex a target thread waits on, so that the sched probe can tell a GIL wait (a
 * futex inside the interpreter's _PyRuntime, told apart in user space by address) from a lock
 * wait, with the Python stack the thread blocked in.
 *
 * futex cmd = op & 0x7f; waits: 0 WAIT, 6 LOCK_PI, 9 WAIT_BITSET, 11 WAIT_REQUEUE_PI,
 * 13 LOCK_PI2. Entries live from syscall entry to exit, in process context.
 */
#ifndef WITH_SCHED
struct futex_wait {
    u64 start;
    u64 uaddr;
};
BPF_TABLE("lru_hash", u32, struct futex_wait, futex_inflight, MAX_THREADS);
#endif

static __always_inline int futex_is_wait(int op)
{
    int cmd = op & 0x7f;
    return cmd == 0 || cmd == 6 || cmd == 9 || cmd == 11 || cmd == 13;
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
    if (futex_inflight.update(&tid, &w) != 0)
        count(C_FUTEX_MAP_FULL);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_futex)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return 0;
    u32 tid = (u32)id;
    futex_inflight.delete(&tid);
    return 0;
}
