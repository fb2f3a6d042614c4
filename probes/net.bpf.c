/* net: TCP bytes sent and received per target thread, connect latency, connection lifetimes
 * and retransmits.
 *
 * sock_send_length / sock_recv_length (Linux 6.4+) run in the calling thread: bytes add up in
 * per-thread time buckets in the kernel. Only connect() (SYN_SENT) runs in process context; the
 * rest of a connection's state changes and retransmits run in softirq, so a socket -> owner map
 * is filled at connect and at the first send or receive. Time blocked on the network comes from
 * the sched probe (off-CPU, reason net).
 */
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

static __always_inline void net_io(u64 sk, u32 family, u32 protocol, int ret, u32 kind)
{
    if (ret <= 0 || protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6))
        return;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!is_target(tgid))
        return;
    u64 now = bpf_ktime_get_ns();
    net_bucket(tgid, (u32)id, now, kind, (u64)ret);
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
