/* io: block requests created by target threads, with bytes, latency, direction and device.
 *
 * The submitting thread is known where the request is created, in its own context:
 * block:block_io_start (Linux 6.5+). Completion runs in whatever task is current (idle, kworkers,
 * other threads), so requests are matched by (dev, sector); classic block tracepoints carry no
 * request pointer. Older kernels: block_bio_queue (submitter context) with block_rq_complete.
 * Only target requests enter the in-flight map; one record per completed request.
 */
#ifndef IO_RB_PAGES
#define IO_RB_PAGES 128
#endif
#ifndef MAX_IO
#define MAX_IO 8192
#endif

struct io_key {
    u64 sector;
    u32 dev;
    u32 pad;
};

struct io_start {
    u64 ts;
    u32 tgid;
    u32 tid;
    u32 bytes;
    char rwbs[8];
};

struct io_event {
    u32 tgid;
    u32 tid;
    u64 start;
    u64 end;
    u32 bytes;
    u32 dev;
    char rwbs[8];
};

BPF_TABLE("lru_hash", struct io_key, struct io_start, io_inflight, MAX_IO);
BPF_RINGBUF_OUTPUT(io_events, IO_RB_PAGES);

static __always_inline void io_submit(u32 dev, u64 sector, u32 bytes, const char *rwbs)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!is_target(id >> 32))
        return;
    struct io_key k = {};
    k.sector = sector;
    k.dev = dev;
    struct io_start v = {};
    v.ts = bpf_ktime_get_ns();
    v.tgid = id >> 32;
    v.tid = (u32)id;
    v.bytes = bytes;
    bpf_probe_read_kernel(&v.rwbs, sizeof(v.rwbs), rwbs);
    if (io_inflight.update(&k, &v) != 0)
        count(C_IO_MAP_FULL);
}

static __always_inline void io_complete(u32 dev, u64 sector)
{
    struct io_key k = {};
    k.sector = sector;
    k.dev = dev;
    struct io_start *v = io_inflight.lookup(&k);
    if (!v)
        return;
    struct io_event *e = io_events.ringbuf_reserve(sizeof(struct io_event));
    if (!e) {
        count(C_IO_RB_DROP);
        io_inflight.delete(&k);
        return;
    }
    e->tgid = v->tgid;
    e->tid = v->tid;
    e->start = v->ts;
    e->end = bpf_ktime_get_ns();
    e->bytes = v->bytes;
    e->dev = dev;
    __builtin_memcpy(&e->rwbs, &v->rwbs, sizeof(e->rwbs));
    io_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    io_inflight.delete(&k);
}

#ifdef HAVE_BLOCK_IO_START
TRACEPOINT_PROBE(block, block_io_start)
{
    io_submit(args->dev, args->sector, args->bytes, args->rwbs);
    return 0;
}

TRACEPOINT_PROBE(block, block_io_done)
{
    io_complete(args->dev, args->sector);
    return 0;
}
#else
TRACEPOINT_PROBE(block, block_bio_queue)
{
    io_submit(args->dev, args->sector, args->nr_sector * 512, args->rwbs);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    io_complete(args->dev, args->sector);
    return 0;
}
#endif
