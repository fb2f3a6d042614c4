/* net: TCP bytes sent and received per target thread with the Python stack that moved them,
 * connect latency, connection lifetimes and retransmits.
 *
 * sock_send_length / sock_recv_length (Linux 6.4+) run in the calling thread. Bytes add up per
 * thread; once NET_SAMPLE_BYTES have added up, or NET_SAMPLE_NS after the first of them, the
 * Python stack of the call that crossed the line is read and one EV_NET record carries the
 * bytes: a thread that moves data from one place is exact, one that moves it from several is
 * sampled in proportion, and a busy socket costs one stack walk per NET_SAMPLE_BYTES, not per
 * call. Only connect() (SYN_SENT) runs in process context; the rest of a connection's state
 * changes and retransmits run in softirq, so a socket -> owner map is filled at connect and at
 * the first send or receive. Time blocked on the network comes from the sched probe.
 */
#ifndef NET_SAMPLE_BYTES
#define NET_SAMPLE_BYTES 65536
#endif
#ifndef NET_SAMPLE_NS
#define NET_SAMPLE_NS 100000000ULL
#endif
#ifndef NET_RB_PAGES
#define NET_RB_PAGES 64
#endif
#ifndef MAX_SOCKS
#define MAX_SOCKS 16384
#endif

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define MSG_PEEK 2
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_CLOSE 7

#define NET_SEND 1
#define NET_RECV 2
#define NET_RETRANS 3

#define NET_EV_CONNECT 1
#define NET_EV_CLOSE 2

struct sock_owner {
    u64 since;      /* connect() start, or first time seen */
    u64 established;
    u32 tgid;
    u32 tid;
    u16 dport;
    u16 pad[3];
};

struct net_event {
    u32 tgid;
    u32 tid;
    u64 start;
    u64 end;
    u32 kind;
    u16 dport;
    u16 family;
    u8 daddr[16];
};

BPF_TABLE("lru_hash", u64, struct sock_owner, sock_owners, MAX_SOCKS);
BPF_HASH(net_buckets, struct bucket_key, struct bucket_val, MAX_BUCKETS);
BPF_RINGBUF_OUTPUT(net_events, NET_RB_PAGES);

static __always_inline void net_bucket(u32 tgid, u32 tid, u64 now, u32 kind, u64 value)
{
    struct bucket_key k = {};
    k.tgid = tgid;
    k.tid = tid;
    k.bucket = now / BUCKET_NS;
    k.kind = kind;
    struct bucket_val zero = {};
    struct bucket_val *v = net_buckets.lookup_or_try_init(&k, &zero);
    if (!v) {
        count(C_BUCKET_MAP_FULL);
        return;
    }
    __sync_fetch_and_add(&v->value, value);
    __sync_fetch_and_add(&v->count, 1);
}

static __always_inline void net_bytes(u32 tgid, u32 tid, u64 now, u32 kind, u64 bytes)
{
    struct tstate *s = tstates.lookup(&tid);
    if (!s) {
        count(C_THREAD_UNTRACKED);
        return;
    }
    u32 k = kind == NET_SEND ? 0 : 1;
    if (!s->net_bytes[0] && !s->net_bytes[1])
        s->net_first = now;
    s->net_bytes[k] += bytes;
    if (s->net_bytes[k] < NET_SAMPLE_BYTES && now - s->net_first < NET_SAMPLE_NS)
        return;
    struct sf_record *r = record_buf(SCRATCH_TASK);
    if (!r)
        return;
    py_walk(tgid, SCRATCH_TASK, &r->ev.py, r->frames);
    r->ev.syscall = 0xffff;
    r->ev.tgid = tgid;
    r->ev.tid = tid;
    r->ev.kstack = -1;
    r->ev.aux = 0;
    r->ev.run_start = 0;
    r->ev.short_off = 0;
    r->ev.count = 1;
    r->ev.kind = EV_NET;
    r->ev.t0 = s->net_first;
    r->ev.t1 = now;
    /* Both directions go out: the stack that moved the last bytes is the best we know. */
    for (u32 d = 0; d < 2; d++) {
        if (!s->net_bytes[d])
            continue;
        r->ev.value = s->net_bytes[d];
        r->ev.state = d + 1;
        emit(r);
        s->net_bytes[d] = 0;
    }
}

static __always_inline void net_io(u64 sk, u32 family, u32 protocol, int ret, u32 kind)
{
    if (ret <= 0 || protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6))
        return;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!is_target(tgid))
        return;
    u64 now = bpf_ktime_get_ns();
    net_bytes(tgid, (u32)id, now, kind, (u64)ret);
    struct sock_owner *o = sock_owners.lookup(&sk);
    if (!o) {
        struct sock_owner n = {};
        n.since = now;
        n.established = now;
        n.tgid = tgid;
        n.tid = (u32)id;
        if (sock_owners.update(&sk, &n) != 0)
            count(C_SOCK_MAP_FULL);
    }
}

TRACEPOINT_PROBE(sock, sock_send_length)
{
    net_io((u64)args->sk, args->family, args->protocol, args->ret, NET_SEND);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    if (args->flags & MSG_PEEK)
        return 0;
    net_io((u64)args->sk, args->family, args->protocol, args->ret, NET_RECV);
    return 0;
}

static __always_inline void net_emit(struct sock_owner *o, u64 start, u64 end, u32 kind,
                                     u16 family, const u8 *daddr, u32 alen)
{
    struct net_event *e = net_events.ringbuf_reserve(sizeof(struct net_event));
    if (!e) {
        count(C_NET_RB_DROP);
        return;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->tgid = o->tgid;
    e->tid = o->tid;
    e->start = start;
    e->end = end;
    e->kind = kind;
    e->dport = o->dport;
    e->family = family;
    if (alen == 4)
        bpf_probe_read_kernel(&e->daddr, 4, daddr);
    else
        bpf_probe_read_kernel(&e->daddr, 16, daddr);
    net_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != IPPROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    u64 now = bpf_ktime_get_ns();
    int ns = args->newstate;
    u32 alen = args->family == AF_INET ? 4 : 16;
    const u8 *daddr = args->family == AF_INET ? args->daddr : args->daddr_v6;
    if (ns == TCP_SYN_SENT) {
        u64 id = bpf_get_current_pid_tgid();
        if (!is_target(id >> 32))
            return 0;
        struct sock_owner n = {};
        n.since = now;
        n.tgid = id >> 32;
        n.tid = (u32)id;
        n.dport = args->dport;
        if (sock_owners.update(&sk, &n) != 0)
            count(C_SOCK_MAP_FULL);
        return 0;
    }
    struct sock_owner *o = sock_owners.lookup(&sk);
    if (!o)
        return 0;
    if (ns == TCP_ESTABLISHED && args->oldstate == TCP_SYN_SENT) {
        o->established = now;
        net_emit(o, o->since, now, NET_EV_CONNECT, args->family, daddr, alen);
    } else if (ns == TCP_CLOSE) {
        if (!o->dport)
            o->dport = args->dport;
        net_emit(o, o->established ? o->established : o->since, now, NET_EV_CLOSE,
                 args->family, daddr, alen);
        sock_owners.delete(&sk);
    }
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    u64 sk = (u64)args->skaddr;
    struct sock_owner *o = sock_owners.lookup(&sk);
    if (!o)
        return 0;
    net_bucket(o->tgid, o->tid, bpf_ktime_get_ns(), NET_RETRANS, 1);
    return 0;
}
