/* The CPython stack of the current thread, read in the kernel.
 *
 * Included by the programs that need a Python stack at the moment they run: the CPU sampler
 * (perf_event), the sched probe (the moment a thread blocks) and the IO and network probes.
 *
 * Per target process, user space (probes/pyprocess.py) fills `py_procs` with where the
 * interpreter keeps things: the offset from a thread's fsbase to its glibc TSD slot of
 * autoTSSkey (it holds the thread's PyThreadState* even while the thread waits with the GIL
 * released), the interpreter and PyCode_Type addresses that validate what we read, and the field
 * offsets of its version. One program serves 3.10-3.13: offsets are data, not code.
 *
 * A frame is (code object address, instruction, check): `instr` is 3.10's f_lasti, or for 3.11+
 * the byte distance from the code object to the frame's instruction pointer; `check` is a hash
 * of four code fields, so that user space notices a code address reused by another code object.
 * Reading those fields costs one user-memory read per frame, so checks are cached per CPU
 * (direct-mapped, by address) for CODE_CACHE_NS: a code object freed and replaced at the same
 * address within that time could keep its predecessor's check.
 *
 * Frame memory (3.11+): ordinary call frames sit next to each other in the thread's data stack
 * chunk, so the innermost PY_WINDOW bytes of the current chunk are copied with one user-memory
 * read and frames found there are read from the copy; the rest (generator and coroutine frames,
 * older chunks, 3.10's heap frames) one read each. Each user read costs ~85 ns here, the first
 * of a program several times that.
 *
 * Everything read from the target is untrusted: pointers are checked (non-null, user range,
 * reads succeed), the type of every code object is checked, and the walk is bounded.
 */
#ifndef PY_MAX_FRAMES
#define PY_MAX_FRAMES 128           /* power of two */
#endif
#ifndef FSBASE_OFF
#define FSBASE_OFF 0                /* offsetof(task_struct, thread.fsbase), from BTF */
#endif
#ifndef PY_WINDOW
#define PY_WINDOW 16384             /* power of two: bytes of frame memory copied in one read */
#endif
#ifndef CODE_CACHE_SLOTS
#define CODE_CACHE_SLOTS 1024       /* power of two */
#endif
#ifndef PY_PROC_CACHE_NS
#define PY_PROC_CACHE_NS 1000000000ULL
#endif
#ifndef CODE_CACHE_NS
#define CODE_CACHE_NS 1000000000ULL
#endif

#define PY_FLAG_310 1               /* PyFrameObject chain (f_back), f_lasti an int */
#define PY_OWNER_GENERATOR 1        /* 3.11+: a frame embedded in a generator or coroutine */
#define PY_OWNER_CSTACK 3           /* 3.12+: a shim/entry frame owned by the C stack */
#define PY_CO_COROUTINE 0x80
#define PY_NO_OFFSET 0xffff
#define PY_USER_MAX 0x00007fffffffffffULL

/* Errors a walk reports in py_stack_hdr.err (user space counts them by name). */
#define PYE_OK 0
#define PYE_NO_PROC 1               /* the process has no py_procs entry */
#define PYE_FSBASE 2                /* task->thread.fsbase unreadable or null */
#define PYE_NO_TSTATE 3             /* no PyThreadState in the TSD slot: a native thread */
#define PYE_TSTATE 4                /* the tstate is unreadable or belongs to another interpreter */
#define PYE_FRAME 5                 /* a frame pointer unreadable */
#define PYE_CODE 6                  /* a code object unreadable or not a code object */
#define PYE_INSTR 7                 /* an instruction pointer outside its code object */

struct py_proc {
    u64 tss_off;
    u64 interp;
    u64 code_type;
    u32 version;
    u32 flags;
    u16 ts_interp;
    u16 ts_frame;
    u16 cf_current;
    u16 ts_chunk;
    u16 ts_top;
    u16 f_code;
    u16 f_previous;
    u16 f_instr;
    u16 f_owner;
    u16 co_argcount;
    u16 co_kwonlyargcount;
    u16 co_flags;
    u16 co_firstlineno;
    u16 gen_frame;      /* 3.11+: offsetof(PyGenObject, gi_iframe); 3.10: offsetof(frame, f_gen) */
    u16 pad1;
    u16 pad2;
};

struct py_frame {
    u64 code;
    u32 instr;
    u32 check;
};

struct py_stack_hdr {
    u16 depth;                      /* frames recorded, innermost first */
    u8 truncated;                   /* more frames than PY_MAX_FRAMES: the outermost are cut */
    u8 err;                         /* PYE_*: why the walk stopped early (frames kept) */
    u32 hash;                       /* of the frames, to tell stacks apart cheaply */
    u64 task;                       /* the outermost coroutine on the stack (an asyncio task's
                                     * coroutine: id(task.get_coro()) in Python), or 0 */
};

struct code_cache_entry {
    u64 code;
    u64 stamp;
    u32 check;
    u32 flags;
};

/* Per-CPU, not on the BPF stack: fields are read at offsets known only at run time, which the
 * verifier accepts for map values with masked offsets.
 *
 * `win` holds, from byte 128, a copy of the innermost PY_WINDOW bytes of the thread's current
 * data stack chunk (3.11+: ordinary call frames sit next to each other there), taken with one
 * user-memory read, so that the walk reads those frames from the copy; its first 128 bytes take
 * the first bytes of a frame read on its own (3.10 needs 104: f_lasti is at 96; 3.11+ frames
 * outside the copy, such as generators' frames, which live in their generator objects). */
struct py_scratch {
    u8 win[128 + PY_WINDOW + 128];
    u8 code[128];                   /* a code object's first bytes (ob_type .. co_firstlineno) */
    u8 ts[512];                     /* the PyThreadState's first bytes, up to datastack_top */
    /* The walk's state lives here rather than on the BPF stack: the verifier then treats it as
     * unknown scalars and prunes iterations, instead of tracking every (iteration, depth) pair
     * and giving up ("program too large") well before PY_MAX_FRAMES. */
    u64 cur;
    u64 hash;
    struct py_proc pp;              /* py_procs[pp_tgid], copied at pp_stamp */
    u64 pp_stamp;
    u32 pp_tgid;
    u32 pad;
    u64 wlo;                        /* the copy in `win` holds user memory [wlo, whi) */
    u64 whi;
    u32 n;
    u32 off;                        /* where in `win` the frame being read starts */
    /* per frame: the coroutine/generator that owns it (3.11+: the frame address of a frame
     * owned by a generator; 3.10: f_gen), or 0 */
    u64 gen[PY_MAX_FRAMES];         /* bit 0: the frame was entered from C (3.12+) */
    u64 entry_task;
};

BPF_HASH(py_procs, u32, struct py_proc, MAX_TARGETS);
BPF_PERCPU_ARRAY(py_scratch, struct py_scratch, 2);   /* [SCRATCH_IRQ], [SCRATCH_TASK] */
BPF_PERCPU_ARRAY(py_code_cache, struct code_cache_entry, CODE_CACHE_SLOTS);

static __always_inline u64 py_u64(const u8 *buf, u32 off)
{
    return *(const u64 *)(buf + (off & 0x78));
}

static __always_inline u32 py_u32(const u8 *buf, u32 off)
{
    return *(const u32 *)(buf + (off & 0x7c));
}

static __always_inline u64 py_ts_u64(const u8 *ts, u32 off)
{
    return *(const u64 *)(ts + (off & 0x1f8));
}

static __always_inline int py_user_ptr(u64 p)
{
    return p >= 4096 && p <= PY_USER_MAX;
}

/* The check of a code object (see probes/pyprocess.py: code_check), cached per CPU. Returns
 * 0 and sets *check, or -1 when the object is unreadable or not a code object. */
static __always_inline int py_code_check(struct py_proc *pp, struct py_scratch *s, u64 code,
                                         u64 now, u32 *check, u32 *flags_out)
{
#ifndef NO_CODE_CACHE
    u32 slot = (u32)((code >> 4) ^ (code >> 14)) & (CODE_CACHE_SLOTS - 1);
    struct code_cache_entry *c = py_code_cache.lookup(&slot);
    if (c && c->code == code && now - c->stamp < CODE_CACHE_NS) {
        *check = c->check;
        *flags_out = c->flags;
        return 0;
    }
#endif
    /* ob_type sits at 8; every field we need lies within the first 80 bytes. */
    if (bpf_probe_read_user(s->code, 80, (void *)code))
        return -1;
    if (py_u64(s->code, 8) != pp->code_type)
        return -1;
    u32 first = py_u32(s->code, pp->co_firstlineno);
    u32 argc = py_u32(s->code, pp->co_argcount);
    u32 kwonly = py_u32(s->code, pp->co_kwonlyargcount);
    u32 flags = py_u32(s->code, pp->co_flags);
    u32 h = first * 2654435761U + argc * 40503U + kwonly * 97U + flags;
    *check = h;
    *flags_out = flags;
#ifndef NO_CODE_CACHE
    if (c) {
        c->code = code;
        c->stamp = now;
        c->check = h;
        c->flags = flags;
    }
#endif
    return 0;
}

/* The current thread's innermost frame, or 0 with hdr->err set. */
static __always_inline u64 py_first_frame(struct py_proc *pp, struct py_scratch *s,
                                          struct py_stack_hdr *hdr)
{
    u64 task = (u64)bpf_get_current_task();
    u64 fsbase = 0;
    if (bpf_probe_read_kernel(&fsbase, sizeof(fsbase), (void *)(task + FSBASE_OFF)) ||
        !py_user_ptr(fsbase)) {
        hdr->err = PYE_FSBASE;
        return 0;
    }
    u64 tstate = 0;
    if (bpf_probe_read_user(&tstate, sizeof(tstate), (void *)(fsbase + pp->tss_off))) {
        hdr->err = PYE_FSBASE;
        return 0;
    }
    if (!tstate) {
        hdr->err = PYE_NO_TSTATE;
        return 0;
    }
    /* One read covers the fields we need: interp, the frame (or cframe) and, 3.11+, the data
     * stack's current chunk and top (datastack_top follows datastack_chunk). */
    u32 tsz = pp->ts_chunk != PY_NO_OFFSET ? pp->ts_chunk + 16 : 96;
    if (!py_user_ptr(tstate) ||
        bpf_probe_read_user(s->ts, ((tsz - 1) & (sizeof(s->ts) - 1)) + 1, (void *)tstate) ||
        py_ts_u64(s->ts, pp->ts_interp) != pp->interp) {
        hdr->err = PYE_TSTATE;
        return 0;
    }
    u64 frame = py_ts_u64(s->ts, pp->ts_frame);
    if (pp->cf_current != PY_NO_OFFSET && frame) {
        u64 cframe = frame;
        frame = 0;
        if (!py_user_ptr(cframe) ||
            bpf_probe_read_user(&frame, sizeof(frame), (void *)(cframe + pp->cf_current))) {
            hdr->err = PYE_TSTATE;
            return 0;
        }
    }
    if (frame && !py_user_ptr(frame)) {
        hdr->err = PYE_FRAME;
        return 0;
    }
    if (frame && pp->ts_chunk != PY_NO_OFFSET) {
        /* The innermost frames, in one read: [top - PY_WINDOW, top) of the current chunk. A
         * failed read only costs the walk its shortcut. */
        u64 chunk = py_ts_u64(s->ts, pp->ts_chunk);
        u64 top = py_ts_u64(s->ts, pp->ts_chunk + 8);
        u64 lo = chunk + 24;   /* _PyStackChunk: previous, size, top, then data */
        if (py_user_ptr(chunk) && top > lo && top <= PY_USER_MAX && top - lo < (1ULL << 30)) {
            u64 len = top - lo < PY_WINDOW ? top - lo : PY_WINDOW;
            if (!bpf_probe_read_user(s->win + 128, ((len - 1) & (PY_WINDOW - 1)) + 1,
                                     (void *)(top - len))) {
                s->wlo = top - len;
                s->whi = top;
            }
        }
    }
    return frame;
}

/* Walk the current thread's Python stack into hdr + frames (PY_MAX_FRAMES entries), using
 * scratch space `which` (SCRATCH_IRQ or SCRATCH_TASK, as for records). Returns the number of
 * frames. On a failure midway the frames read so far are kept and hdr->err says why. */
static __always_inline u32 py_walk(u32 tgid, u32 which, struct py_stack_hdr *hdr,
                                   struct py_frame *frames)
{
    hdr->depth = 0;
    hdr->truncated = 0;
    hdr->err = PYE_OK;
    hdr->hash = 0;
    hdr->task = 0;
    struct py_scratch *s = py_scratch.lookup(&which);
    if (!s)
        return 0;
    /* The process's configuration, copied into this CPU's scratch for PY_PROC_CACHE_NS: a hash
     * lookup on cold caches costs more than the copy. Entries never change in place; a pid
     * removed and taken by another target within that time would meet its predecessor's
     * interpreter address, fail the tstate check (one stack lost) and drop the copy. */
    u64 now = bpf_ktime_get_ns();
    if (s->pp_tgid != tgid || now - s->pp_stamp >= PY_PROC_CACHE_NS) {
        struct py_proc *src = py_procs.lookup(&tgid);
        if (!src) {
            hdr->err = PYE_NO_PROC;
            return 0;
        }
        __builtin_memcpy(&s->pp, src, sizeof(s->pp));
        s->pp_tgid = tgid;
        s->pp_stamp = now;
    }
    struct py_proc *pp = &s->pp;
    s->wlo = 0;
    s->whi = 0;
    s->cur = py_first_frame(pp, s, hdr);
    if (hdr->err == PYE_TSTATE)
        s->pp_tgid = 0;   /* maybe another process at a reused pid: look it up next time */
    s->n = 0;
    s->hash = 0xcbf29ce484222325ULL;
    u32 i;
    for (i = 0; i < 2 * PY_MAX_FRAMES; i++) {
        u64 frame = s->cur;
        if (!frame)
            break;
        /* Reloaded each time (volatile): a version known in a register would split the
         * verifier's states at every test of it, and they would never merge again. */
        u32 is310 = *(volatile u32 *)&pp->flags & PY_FLAG_310;
        u32 n = s->n;
        if (n >= PY_MAX_FRAMES) {
            hdr->truncated = 1;
            break;
        }
        /* From the copy of the chunk when the frame's first 80 bytes are in it, else read on
         * its own into win[0, 128). Where to read goes through the scratch map, so both cases
         * leave the verifier one state (two would double every later instruction it checks). */
        if (frame >= s->wlo && frame + 80 <= s->whi) {
            s->off = 128 + (u32)(frame - s->wlo);
        } else {
            s->off = 0;
            if (bpf_probe_read_user(s->win, 80 + 24 * is310, (void *)frame)) {
                hdr->err = PYE_FRAME;
                break;
            }
        }
        u32 off = *(volatile u32 *)&s->off;
        if (off > PY_WINDOW + 64) {
            hdr->err = PYE_FRAME;
            break;
        }
        const u8 *fb = s->win + off;
        u64 code = py_u64(fb, pp->f_code);
        u64 prev = py_u64(fb, pp->f_previous);
        if (prev && !py_user_ptr(prev)) {
            hdr->err = PYE_FRAME;
            break;
        }
        s->cur = prev;
        u32 instr;
        u64 gen = 0;
        if (is310) {
            instr = py_u32(fb, pp->f_instr);
            gen = py_u64(fb, pp->gen_frame);
        } else {
            u8 owner = fb[pp->f_owner & 0x7f];
            if (owner == PY_OWNER_CSTACK) {
                /* 3.12+: the frame recorded just before was entered from C; for a coroutine,
                 * that is a task's step (Task.__step sends into it), eager or not */
                if (n)
                    s->gen[(n - 1) & (PY_MAX_FRAMES - 1)] |= 1;
                continue;
            }
            if (owner == PY_OWNER_GENERATOR)
                gen = frame;
            u64 ip = py_u64(fb, pp->f_instr);
            if (ip < code || ip - code > (1U << 24)) {
                hdr->err = PYE_INSTR;
                break;
            }
            instr = (u32)(ip - code);
        }
        if (!py_user_ptr(code)) {
            hdr->err = PYE_CODE;
            break;
        }
        struct py_frame *f = &frames[n & (PY_MAX_FRAMES - 1)];
        f->code = code;
        f->instr = instr;
        f->check = 0;
        s->gen[n & (PY_MAX_FRAMES - 1)] = gen;
        s->hash = (s->hash ^ code ^ ((u64)instr << 40)) * 0x100000001b3ULL;
        s->n = n + 1;
    }
    /* Code checks in a loop of their own: inside the walk, the cache's hit and miss paths
     * multiply with the walk's own branches and the verifier gives up ("too large"). */
    s->entry_task = 0;
    for (i = 0; i < PY_MAX_FRAMES; i++) {
        if (i >= s->n)
            break;
        struct py_frame *f = &frames[i & (PY_MAX_FRAMES - 1)];
        u32 check = 0, flags = 0;
        if (py_code_check(pp, s, f->code, now, &check, &flags)) {
            s->n = i;           /* keep the frames before the first bad code object */
            hdr->err = PYE_CODE;
            break;
        }
        f->check = check;
        /* The running task's coroutine: the innermost coroutine frame entered from C (3.12+:
         * an eagerly started task runs inside the frames of the code that created it), else
         * the outermost coroutine frame (asyncio's Task.__step is C code that sends into it).
         * Its object's address is what Python calls id(). */
        u64 gen = s->gen[i & (PY_MAX_FRAMES - 1)];
        if (gen && (flags & PY_CO_COROUTINE) && !s->entry_task) {
            u64 coro = (pp->flags & PY_FLAG_310) ? gen : (gen & ~1ULL) - pp->gen_frame;
            if (gen & 1)
                s->entry_task = coro;
            else
                hdr->task = coro;
        }
    }
    if (s->entry_task)
        hdr->task = s->entry_task;
    u32 n = s->n;
    if (s->cur && !hdr->err)
        hdr->truncated = 1;   /* frames left: too deep, or too many shim frames in between */
    u64 h = s->hash;
    hdr->depth = n;
    hdr->hash = (u32)(h ^ (h >> 32));
    return n;
}
