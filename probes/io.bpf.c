/* io: block requests created by target threads: bytes, direction, device, and the Python stack
 * that caused them.
 *
 * The submitting thread is current where the request is created: block:block_io_start
 * (Linux 6.5+), else block_bio_queue. Buffered writeback is submitted by kernel workers and does
 * not count here; O_DIRECT writes, reads and fsync-driven writeback do. Time blocked on IO comes
 * from the sched probe (off-CPU waits with their kernel stacks).
 */
static __always_inline void io_submit(void *ctx, u32 dev, u32 bytes, const char *rwbs)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!is_target(tgid))
        return;
    struct sf_record *r = record_buf(SCRATCH_TASK);
    if (!r)
        return;
    r->ev.kind = EV_IO;
    r->ev.syscall = 0xffff;
    r->ev.tgid = tgid;
    r->ev.tid = (u32)id;
    r->ev.kstack = -1;
    r->ev.t0 = bpf_ktime_get_ns();
    r->ev.t1 = r->ev.t0;
    r->ev.value = bytes;
    r->ev.aux = 0;
    bpf_probe_read_kernel(&r->ev.aux, 8, rwbs);
    r->ev.run_start = 0;
    r->ev.short_off = 0;
    r->ev.state = dev;
    r->ev.count = 1;
    py_walk(tgid, SCRATCH_TASK, &r->ev.py, r->frames);
    emit(r);
}

#ifdef HAVE_BLOCK_IO_START
TRACEPOINT_PROBE(block, block_io_start)
{
    io_submit(args, args->dev, args->bytes, args->rwbs);
    return 0;
}
#else
TRACEPOINT_PROBE(block, block_bio_queue)
{
    io_submit(args, args->dev, args->nr_sector * 512, args->rwbs);
    return 0;
}
#endif
