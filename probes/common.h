/* Shared by every spanflame probe; compiled once with all selected probes as one module.
 *
 * Target filter: `targets` holds the tgids we profile. A 64 Ki-entry array indexed by
 * tgid & 0xffff is checked first: an array lookup is far cheaper than a hash lookup, and most
 * events on a host come from processes we do not profile. The agent's own tgid never matches.
 */
/* no kernel headers beyond what bcc itself includes: each costs compile time */

#ifndef MAX_TARGETS
#define MAX_TARGETS 1024
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 16384
#endif
#ifndef STACK_ENTRIES
#define STACK_ENTRIES 4096
#endif
#ifndef BUCKET_NS
#define BUCKET_NS 10000000ULL
#endif
#ifndef MAX_BUCKETS
#define MAX_BUCKETS 16384
#endif
#ifndef AGENT_TGID
#define AGENT_TGID 0
#endif

/* Indices into `counters`: drops and errors, reported in summaries and /metrics
 * (probes/session.py: COUNTER_NAMES, same order). */
enum sf_counter {
    C_EVENTS_DROP = 0,      /* the events ring buffer was full */
    C_NET_RB_DROP,
    C_KSTACK_ERR,
    C_THREAD_UNTRACKED,     /* a target thread with no state (created before it could be seen) */
    C_THREAD_MAP_FULL,
    C_FUTEX_MAP_FULL,
    C_BUCKET_MAP_FULL,
    C_SOCK_MAP_FULL,
    C_WAITS,                /* waits at or above the off-CPU threshold, each its own record */
    C_SHORT_WAITS,          /* shorter blocked waits, added up per thread and stack */
    C_SAMPLES,
    C_SYSCALL_UNKNOWN,      /* a blocked thread's syscall registers could not be found */
    C_NCOUNTERS
};

BPF_HASH(targets, u32, u8, MAX_TARGETS);
BPF_ARRAY(target_bits, u8, 65536);
BPF_PERCPU_ARRAY(counters, u64, C_NCOUNTERS);

/* The cheap first half of is_target: 0 for almost every process that is not a target. */
static __always_inline int target_bit(u32 tgid)
{
    if (tgid == AGENT_TGID || tgid == 0)
        return 0;
    u32 idx = tgid & 0xffff;
    u8 *bit = target_bits.lookup(&idx);
    return bit && *bit;
}

static __always_inline int is_target(u32 tgid)
{
    return target_bit(tgid) && targets.lookup(&tgid) != NULL;
}

static __always_inline void count(int idx)
{
    u64 *v = counters.lookup(&idx);
    if (v)
        (*v)++;
}

/* Time buckets for in-kernel aggregation of frequent, short events. */
struct bucket_key {
    u32 tgid;
    u32 tid;
    u64 bucket;   /* monotonic ns / BUCKET_NS */
    u32 kind;     /* probe-specific */
    u32 pad;
};

struct bucket_val {
    u64 value;    /* ns or bytes */
    u64 count;
};
