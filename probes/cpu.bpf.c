/* cpu: a perf_event program on the software cpu-clock event of every CPU, SAMPLE_PERIOD_NS
 * apart: when a target thread is on the CPU, one EV_SAMPLE record with its Python stack (and
 * its kernel stack when the sample hit kernel code).
 *
 * A thread found running here has come back from any wait it was in: the wait is closed now
 * (sched.bpf.c: came_back), so a thread that runs for a long time without leaving the CPU does
 * not hold its last wait open. Like sched_switch, this runs in interrupt context: per-thread
 * state is only looked up and written in place.
 */
#define PT_REGS_CS_IDX 17            /* x86-64 struct pt_regs, in u64s: r15 ... ip, cs */

#ifndef SAMPLE_PERIOD_NS
#define SAMPLE_PERIOD_NS 10000000ULL
#endif

int on_cpu_sample(void *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u32 tgid = id >> 32;
    if (tid == 0 || !target_bit(tgid))
        return 0;
    /* A thread with state is a target's (state exists only for those): no `targets` lookup. */
    struct tstate *s = tstates.lookup(&tid);
    if (s && s->tgid != tgid)
        s = NULL;
    if (!s && !is_target(tgid))
        return 0;
    count(C_SAMPLES);
    u64 now = bpf_ktime_get_ns();
    if (s && s->off_start) {
        u32 cpu = bpf_get_smp_processor_id();
        u64 *last = cpu_last.lookup(&cpu);
        if (last && *last)
            came_back(tid, s, tstacks.lookup(&tid), *last);
    }
    struct sf_record *r = record_buf(SCRATCH_IRQ);
    if (!r)
        return 0;
    r->ev.kind = EV_SAMPLE;
    r->ev.syscall = 0xffff;
    r->ev.tgid = tgid;
    r->ev.tid = tid;
    r->ev.t0 = now;
    r->ev.t1 = now;
    r->ev.value = SAMPLE_PERIOD_NS;
    r->ev.aux = 0;
    r->ev.run_start = 0;
    r->ev.short_off = 0;
    r->ev.state = 0;
    r->ev.count = 1;
    /* A tick that interrupted user code has no kernel stack to report, and get_stackid costs
     * 0.4-2.3 us per call here (docs/benchmarks.md): take it only for kernel-mode ticks (the
     * saved code segment's privilege level is not 3). */
    r->ev.kstack = -1;
    if ((((u64 *)ctx)[PT_REGS_CS_IDX] & 3) != 3)
        r->ev.kstack = kstacks.get_stackid(ctx, 0);
    py_walk(tgid, SCRATCH_IRQ, &r->ev.py, r->frames);
    emit(r);
    return 0;
}
