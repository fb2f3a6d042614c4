/* The one record every probe sends to user space: a CPU sample, a wait, a block request, some
 * network bytes, each with the Python stack of the thread at that moment.
 *
 * Records go to one ring buffer, written without waking user space (a wakeup costs ~7 us here),
 * which drains it on a timer. A record is the fixed header followed by `py.depth` frames.
 * probes/events.py decodes them; keep the two in step.
 */
#ifndef EVENTS_RB_PAGES
#define EVENTS_RB_PAGES 512
#endif

#define EV_SAMPLE 1                 /* on CPU at t0; value = the sampling period (ns) */
#define EV_WAIT 2                   /* off CPU from t0 to t1, and the run before it */
#define EV_WAIT_AGG 3               /* `count` short blocked waits between t0 and t1, one stack */
#define EV_EXIT 4                   /* the thread exited at t0, ending the run since run_start */
#define EV_IO 5                     /* a block request of `value` bytes; aux = rwbs, state = dev */
#define EV_NET 6                    /* `value` TCP bytes since the last record; state 1 send 2 recv */
#define EV_THREAD 7                 /* a new thread (tid) of a target process */

struct sf_event {
    u16 kind;
    u16 syscall;                    /* EV_WAIT/EV_WAIT_AGG: the syscall it blocked in (0xffff:
                                     * unknown) */
    u32 tgid;
    u32 tid;
    s32 kstack;                     /* kernel stack id in `kstacks`, or negative */
    u64 t0;                         /* CLOCK_MONOTONIC ns */
    u64 t1;
    u64 value;
    u64 aux;                        /* EV_WAIT/EV_WAIT_AGG: that syscall's first argument (for
                                     * futex: the address waited on); EV_IO: rwbs */
    u64 run_start;                  /* EV_WAIT/EV_EXIT: the on-CPU run that ended at t0 */
    u64 short_off;                  /* absences shorter than OFFCPU_MIN_NS inside that run */
    u32 state;                      /* EV_WAIT: 1 sleeping, 2 uninterruptible, 0x100 preempted */
    u32 count;
    struct py_stack_hdr py;
};

struct sf_record {
    struct sf_event ev;
    struct py_frame frames[PY_MAX_FRAMES];
};

BPF_RINGBUF_OUTPUT(events, EVENTS_RB_PAGES);
BPF_STACK_TRACE(kstacks, STACK_ENTRIES);

/* Per-CPU record buffers: [SCRATCH_IRQ] for programs that run with interrupts off or in
 * interrupt context (sched_switch, the CPU sampler), [SCRATCH_TASK] for tracepoints in process
 * context (block, sock), which an interrupt could otherwise catch half-written. */
#define SCRATCH_IRQ 0
#define SCRATCH_TASK 1
BPF_PERCPU_ARRAY(records, struct sf_record, 2);

static __always_inline u32 record_len(u32 depth)
{
    if (!depth)
        return sizeof(struct sf_event);
    return sizeof(struct sf_event) + ((((depth * sizeof(struct py_frame)) - 1) &
                                       (PY_MAX_FRAMES * sizeof(struct py_frame) - 1)) + 1);
}

static __always_inline void emit(struct sf_record *r)
{
    if (events.ringbuf_output(r, record_len(r->ev.py.depth), BPF_RB_NO_WAKEUP))
        count(C_EVENTS_DROP);
}

static __always_inline struct sf_record *record_buf(u32 which)
{
    return records.lookup(&which);
}
