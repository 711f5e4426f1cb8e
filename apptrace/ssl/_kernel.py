"""The TLS family's BPF C, and the record layouts it shares with the decoder.

One uprobe per TLS data function saves (connection object, buffer, ``_ex``
length pointer) per thread, with a nesting depth: a TLS function that calls
another hooked one (``gnutls_record_send`` → ``gnutls_record_send2``) is one
call. One uretprobe for all of them reads the byte count, advances the
connection direction's running offset, and copies the bytes out in records
of at most :data:`CHUNK` bytes through ``bpf_loop``: a 16 MiB ``SSL_write`` is
1024 records, nothing is truncated. A record the ring has no room for is
counted (records and bytes), and its offset range becomes a gap in the
stream userspace reassembles.

Connections are keyed by (pid, TLS object pointer): ``SSL*``, the GnuTLS
session, NSS's ``PRFileDesc*``. Their socket comes from the hooks that set
it (``SSL_set_fd``, ``gnutls_transport_set_int2``) or from the read/write
system call made inside the TLS call (syscall tracepoints give the fd, the
``sock_{send,recv}_length`` tracepoints the ``struct sock``); addresses come
from ``inet_sock_set_state`` for sockets created while tracing, else from
``/proc`` in userspace. No kprobes are needed.

bcc cannot emit ``bpf_loop``'s callback (a static subprogram), so the
callback is compiled as a function of its own and linked to the caller at
load time (:mod:`apptrace.ssl._loader`); it reads its context pointer (R2)
with one inline-asm move, checked at load time.
"""

from __future__ import annotations

import struct

__all__ = ["CHUNK", "FUNCS", "Func", "render", "DATA", "CONN", "CLOSE", "STAT_NAMES",
           "LOOP_PLACEHOLDER"]

CHUNK = 16384            # data bytes per ring record at most
LOOP_PLACEHOLDER = 0x5EED5EED5EED5EED  # bpf_loop's callback before linking

# Record kinds (first byte of every record).
DATA, CONN, CLOSE = 1, 2, 3
# Data record flags.
F_PEEK, F_FAULT, F_SKIP, F_FIRST, F_LAST = 1, 2, 4, 8, 16

LIB_OPENSSL, LIB_GNUTLS, LIB_NSS = 0, 1, 2
LIB_NAMES = ("openssl", "gnutls", "nss")


class Func:
    """One hooked data function: its id in records, library, direction, kind."""

    def __init__(self, fid: int, name: str, lib: int, write: bool, ex: bool = False,
                 peek: bool = False) -> None:
        self.id = fid
        self.name = name
        self.lib = lib
        self.write = write
        self.ex = ex
        self.peek = peek


FUNCS: tuple[Func, ...] = (
    Func(0, "SSL_read", LIB_OPENSSL, False),
    Func(1, "SSL_read_ex", LIB_OPENSSL, False, ex=True),
    Func(2, "SSL_peek", LIB_OPENSSL, False, peek=True),
    Func(3, "SSL_peek_ex", LIB_OPENSSL, False, ex=True, peek=True),
    Func(4, "SSL_write", LIB_OPENSSL, True),
    Func(5, "SSL_write_ex", LIB_OPENSSL, True, ex=True),
    Func(6, "gnutls_record_recv", LIB_GNUTLS, False),
    Func(7, "gnutls_record_recv_seq", LIB_GNUTLS, False),
    Func(8, "gnutls_record_send", LIB_GNUTLS, True),
    Func(9, "gnutls_record_send2", LIB_GNUTLS, True),
    Func(10, "gnutls_record_send_range", LIB_GNUTLS, True),
    Func(11, "PR_Read", LIB_NSS, False),
    Func(12, "PR_Recv", LIB_NSS, False),
    Func(13, "PR_Write", LIB_NSS, True),
    Func(14, "PR_Send", LIB_NSS, True),
)

# Per-CPU counters, in slot order.
STAT_NAMES = ("calls", "bytes", "records", "lost_records", "lost_bytes", "fault_bytes",
              "skipped_bytes", "lost_conn_records", "lost_close_records", "nested_calls",
              "failed_calls", "ex_len_faults")

# struct data_hdr: kind func flags lib pid tid len ts conn off call_len call_off span comm
DATA_HDR = struct.Struct("<BBBBIIIQQQQQQ16s")
# struct conn_rec: kind lib family why pid tid fd ts conn sk lport rport pad laddr raddr comm
CONN_REC = struct.Struct("<BBBBIIiQQQHHI16s16s16s")
# struct close_rec: kind lib pad pad pid tid pad ts conn off_read off_write
CLOSE_REC = struct.Struct("<BBBBIIIQQQQ")

_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

_C = r"""
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#define CHUNK @CHUNK@
#define K_DATA 1
#define K_CONN 2
#define K_CLOSE 3
#define FL_PEEK 1
#define FL_FAULT 2
#define FL_SKIP 4
#define FL_FIRST 8
#define FL_LAST 16
/* The reader polls on a timer: no wake-up (an irq_work on the traced CPU) per record. */
#define SUBMIT_FLAGS BPF_RB_NO_WAKEUP

#define WRITE_MASK @WRITE_MASK@
#define EX_MASK @EX_MASK@
#define PEEK_MASK @PEEK_MASK@
#define NSS_MASK @NSS_MASK@
#define GNUTLS_MASK @GNUTLS_MASK@

struct call_t {
    u64 conn;
    u64 buf;
    u64 lenp;
    u64 sp;
    u64 ra;
    u64 sk;
    s32 fd;
    s32 pending_fd;
    u32 depth;
    u8 func;
    u8 pad[3];
};

struct conn_key {
    u32 pid;
    u32 pad;
    u64 ptr;
};

struct conn_t {
    u64 off[2];
    u64 sk;
    s32 fd;
    u8 announced;
    u8 lib;
    u16 pad;
};

struct sock_t {
    u16 family;
    u16 lport;
    u16 rport;
    u16 pad;
    u8 laddr[16];
    u8 raddr[16];
};

struct data_hdr {
    u8 kind;
    u8 func;
    u8 flags;
    u8 lib;
    u32 pid;
    u32 tid;
    u32 len;
    u64 ts;
    u64 conn;
    u64 off;
    u64 call_len;
    u64 call_off;
    u64 span;
    char comm[16];
};

struct conn_rec {
    u8 kind;
    u8 lib;
    u8 family;
    u8 why;
    u32 pid;
    u32 tid;
    s32 fd;
    u64 ts;
    u64 conn;
    u64 sk;
    u16 lport;
    u16 rport;
    u32 pad;
    u8 laddr[16];
    u8 raddr[16];
    char comm[16];
};

struct close_rec {
    u8 kind;
    u8 lib;
    u8 pad0;
    u8 pad1;
    u32 pid;
    u32 tid;
    u32 pad2;
    u64 ts;
    u64 conn;
    u64 off_read;
    u64 off_write;
};

struct loop_t {
    u64 buf;
    u64 n;
    u64 call_len;
    u64 off;
    u64 conn;
    u64 ts;
    u32 pid;
    u32 tid;
    u8 func;
    u8 flags;
    u8 lib;
    u8 pad[5];
    char comm[16];
};

struct tp_sys_enter {
    u64 common;
    s32 nr;
    s32 pad;
    u64 arg0;
};

struct tp_sock_len {
    u64 common;
    u64 sk;
};

struct tp_sk_state {
    u64 common;
    u64 skaddr;
    s32 oldstate;
    s32 newstate;
    u16 sport;
    u16 dport;
    u16 family;
    u16 protocol;
    u8 saddr[4];
    u8 daddr[4];
    u8 saddr_v6[16];
    u8 daddr_v6[16];
};

BPF_RINGBUF_OUTPUT(ssl_rb, @PAGES@);
/* LRU: a call that never returned must not fill the table */
BPF_TABLE("lru_hash", u64, struct call_t, ssl_calls, 16384);
BPF_TABLE("lru_hash", struct conn_key, struct conn_t, ssl_conns, 65536);
BPF_TABLE("lru_hash", u64, struct sock_t, ssl_socks, 65536);
BPF_HASH(ssl_nss_methods, struct conn_key, u8, 1024);
BPF_PERCPU_ARRAY(ssl_stats, u64, @NSTATS@);
BPF_ARRAY(ssl_cfg, u64, 4);

static __always_inline void count(int slot, u64 v)
{
    u64 *p = ssl_stats.lookup(&slot);
    if (p)
        *p += v;
}

static __always_inline int is_tls_nss(u32 pid, u64 fd)
{
    struct conn_key k = {};
    u64 methods = 0;
    if (bpf_probe_read_user(&methods, sizeof(methods), (void *)fd))
        return 0;
    k.pid = pid;
    k.ptr = methods;
    return ssl_nss_methods.lookup(&k) != 0;
}

static __always_inline int on_enter(struct pt_regs *ctx, u32 func)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 sp = PT_REGS_SP(ctx);
    u64 ra = 0;
    bpf_probe_read_user(&ra, sizeof(ra), (void *)sp);
    struct call_t *c = ssl_calls.lookup(&id);
    /* Called from inside a TLS call we already hold: one call. A deeper stack
       is a nested call; the same stack pointer with another return address is
       a tail call (gnutls_record_send jumps to gnutls_record_send2: its return
       address is already the uretprobe trampoline). The same stack pointer and
       return address is a new call after one whose return we never saw. */
    if (c && c->depth > 0 && (sp < c->sp || (sp == c->sp && ra != c->ra))) {
        c->depth++;
        count(9, 1);
        return 0;
    }
    u64 conn = PT_REGS_PARM1(ctx);
    if ((NSS_MASK >> func) & 1) {
        if (!is_tls_nss(id >> 32, conn))
            return 0;
    }
    struct call_t n = {};
    n.conn = conn;
    n.buf = PT_REGS_PARM2(ctx);
    n.lenp = ((EX_MASK >> func) & 1) ? PT_REGS_PARM4(ctx) : 0;
    n.sp = sp;
    n.ra = ra;
    n.fd = -1;
    n.pending_fd = -1;
    n.depth = 1;
    n.func = func;
    ssl_calls.update(&id, &n);
    return 0;
}

@ENTRIES@

/* bpf_loop callback: one record of at most CHUNK bytes, number `index`. */
int ssl_chunk(void *index)
{
    struct loop_t *lc;
    asm volatile("%0 = r2" : "=r"(lc));
    u32 i = (u32)(unsigned long)index;
    u64 pos = (u64)i * CHUNK;
    if (pos >= lc->n)
        return 1;
    u64 len = lc->n - pos;
    if (len > CHUNK)
        len = CHUNK;
    struct data_hdr *h;
@LADDER@
    if (!h) {
        count(3, 1);
        count(4, len);
        return 0;
    }
    h->kind = K_DATA;
    h->func = lc->func;
    h->flags = lc->flags | (pos == 0 ? FL_FIRST : 0) | (pos + len >= lc->call_len ? FL_LAST : 0);
    h->lib = lc->lib;
    h->pid = lc->pid;
    h->tid = lc->tid;
    h->len = len;
    h->ts = lc->ts;
    h->conn = lc->conn;
    h->off = lc->off + pos;
    h->call_len = lc->call_len;
    h->call_off = pos;
    h->span = len;
    __builtin_memcpy(h->comm, lc->comm, 16);
    if (bpf_probe_read_user((void *)(h + 1), len, (void *)(lc->buf + pos))) {
        h->flags |= FL_FAULT;
        h->len = 0;
        count(5, len);
    }
    ssl_rb.ringbuf_submit(h, SUBMIT_FLAGS);
    count(2, 1);
    return 0;
}

static __always_inline void emit_conn(struct conn_t *cn, u64 conn, u64 id, u8 why)
{
    struct conn_rec *r = ssl_rb.ringbuf_reserve(sizeof(struct conn_rec));
    if (!r) {
        count(7, 1);
        cn->announced = 0;
        return;
    }
    __builtin_memset(r, 0, sizeof(*r));
    r->kind = K_CONN;
    r->lib = cn->lib;
    r->why = why;
    r->pid = id >> 32;
    r->tid = (u32)id;
    r->fd = cn->fd;
    r->ts = bpf_ktime_get_ns();
    r->conn = conn;
    r->sk = cn->sk;
    if (cn->sk) {
        u64 sk = cn->sk;
        struct sock_t *s = ssl_socks.lookup(&sk);
        if (s) {
            r->family = s->family;
            r->lport = s->lport;
            r->rport = s->rport;
            __builtin_memcpy(r->laddr, s->laddr, 16);
            __builtin_memcpy(r->raddr, s->raddr, 16);
        }
    }
    bpf_get_current_comm(r->comm, sizeof(r->comm));
    ssl_rb.ringbuf_submit(r, SUBMIT_FLAGS);
}

static __always_inline void emit_close(struct conn_t *cn, u64 conn, u64 id)
{
    struct close_rec *r = ssl_rb.ringbuf_reserve(sizeof(struct close_rec));
    if (!r) {
        count(8, 1);
        return;
    }
    r->kind = K_CLOSE;
    r->lib = cn->lib;
    r->pad0 = 0;
    r->pad1 = 0;
    r->pid = id >> 32;
    r->tid = (u32)id;
    r->pad2 = 0;
    r->ts = bpf_ktime_get_ns();
    r->conn = conn;
    r->off_read = cn->off[0];
    r->off_write = cn->off[1];
    ssl_rb.ringbuf_submit(r, SUBMIT_FLAGS);
}

int ssl_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct call_t *cp = ssl_calls.lookup(&id);
    if (!cp)
        return 0;
    if (cp->depth > 1) {
        cp->depth--;
        return 0;
    }
    struct call_t c = *cp;
    ssl_calls.delete(&id);
    u32 func = c.func;
    s64 rc = PT_REGS_RC(ctx);
    s64 n;
    if ((EX_MASK >> func) & 1) {
        if ((int)rc != 1) {
            count(10, 1);
            return 0;
        }
        u64 v = 0;
        if (bpf_probe_read_user(&v, sizeof(v), (void *)c.lenp)) {
            count(11, 1);
            return 0;
        }
        n = (s64)v;
    } else if ((GNUTLS_MASK >> func) & 1) {
        n = rc;
    } else {
        n = (int)rc;
    }
    if (n <= 0) {
        count(10, 1);
        return 0;
    }
    u8 lib = ((GNUTLS_MASK >> func) & 1) ? 1 : (((NSS_MASK >> func) & 1) ? 2 : 0);
    u32 dir = (WRITE_MASK >> func) & 1;
    u32 peek = (PEEK_MASK >> func) & 1;
    count(0, 1);
    count(1, n);

    struct conn_key k = {};
    k.pid = id >> 32;
    k.ptr = c.conn;
    struct conn_t *cn = ssl_conns.lookup(&k);
    if (!cn) {
        struct conn_t fresh = {};
        fresh.fd = -1;
        fresh.lib = lib;
        ssl_conns.update(&k, &fresh);
        cn = ssl_conns.lookup(&k);
        if (!cn)
            return 0;
    }
    u8 why = 0;
    if (!cn->announced)
        why = 1;
    if (c.fd >= 0 && cn->fd != c.fd) {
        cn->fd = c.fd;
        why = why ? why : 2;
    }
    if (c.sk && cn->sk != c.sk) {
        cn->sk = c.sk;
        why = why ? why : 3;
    }
    cn->lib = lib;
    if (why) {
        cn->announced = 1;
        emit_conn(cn, c.conn, id, why);
    }

    struct loop_t lc = {};
    lc.buf = c.buf;
    lc.call_len = n;
    lc.conn = c.conn;
    lc.ts = bpf_ktime_get_ns();
    lc.pid = id >> 32;
    lc.tid = (u32)id;
    lc.func = func;
    lc.lib = lib;
    lc.flags = peek ? FL_PEEK : 0;
    bpf_get_current_comm(lc.comm, sizeof(lc.comm));
    if (peek) {
        lc.off = cn->off[0];
    } else {
        lc.off = cn->off[dir];
        cn->off[dir] = lc.off + n;
    }
    u64 cap = n;
    int zero = 0;
    u64 *max = ssl_cfg.lookup(&zero);
    if (max && *max && cap > *max)
        cap = *max;
    lc.n = cap;
    u32 chunks = (cap + CHUNK - 1) / CHUNK;
    bpf_loop(chunks, (void *)@PLACEHOLDER@ULL, &lc, 0);
    if (cap < (u64)n) {
        struct data_hdr *h = ssl_rb.ringbuf_reserve(sizeof(struct data_hdr));
        count(6, n - cap);
        if (!h)
            return 0;
        __builtin_memset(h, 0, sizeof(*h));
        h->kind = K_DATA;
        h->func = func;
        h->flags = lc.flags | FL_SKIP | FL_LAST;
        h->lib = lib;
        h->pid = lc.pid;
        h->tid = lc.tid;
        h->ts = lc.ts;
        h->conn = c.conn;
        h->off = lc.off + cap;
        h->call_len = n;
        h->call_off = cap;
        h->span = n - cap;
        __builtin_memcpy(h->comm, lc.comm, 16);
        ssl_rb.ringbuf_submit(h, SUBMIT_FLAGS);
    }
    return 0;
}

/* A new socket for a TLS object (SSL_set_fd, gnutls_transport_set_int2...):
   a TLS object used again for another connection starts a new one. */
static __always_inline int set_socket(u64 conn, s32 fd)
{
    u64 id = bpf_get_current_pid_tgid();
    struct conn_key k = {};
    k.pid = id >> 32;
    k.ptr = conn;
    struct conn_t *cn = ssl_conns.lookup(&k);
    if (cn && (cn->off[0] || cn->off[1])) {
        emit_close(cn, conn, id);
        ssl_conns.delete(&k);
        cn = 0;
    }
    if (!cn) {
        struct conn_t fresh = {};
        fresh.fd = fd;
        ssl_conns.update(&k, &fresh);
    } else if (fd >= 0) {
        cn->fd = fd;
    }
    return 0;
}

int ssl_ctl_set_fd(struct pt_regs *ctx)
{
    return set_socket(PT_REGS_PARM1(ctx), (s32)PT_REGS_PARM2(ctx));
}

int ssl_ctl_set_ptr(struct pt_regs *ctx)
{
    u64 p = PT_REGS_PARM2(ctx);
    return set_socket(PT_REGS_PARM1(ctx), p < 0x100000 ? (s32)p : -1);
}

int ssl_ctl_set_bio(struct pt_regs *ctx)
{
    return set_socket(PT_REGS_PARM1(ctx), -1);
}

static __always_inline int conn_gone(u64 ptr)
{
    u64 id = bpf_get_current_pid_tgid();
    struct conn_key k = {};
    k.pid = id >> 32;
    k.ptr = ptr;
    struct conn_t *cn = ssl_conns.lookup(&k);
    if (!cn)
        return 0;
    emit_close(cn, ptr, id);
    ssl_conns.delete(&k);
    return 0;
}

int ssl_ctl_free(struct pt_regs *ctx)
{
    return conn_gone(PT_REGS_PARM1(ctx));
}

int ssl_ctl_nss_close(struct pt_regs *ctx)
{
    u64 fd = PT_REGS_PARM1(ctx);
    if (!is_tls_nss(bpf_get_current_pid_tgid() >> 32, fd))
        return 0;
    return conn_gone(fd);
}

/* SSL_ImportFD returns the descriptor whose methods are NSS's TLS layer. */
int ssl_ctl_nss_import(struct pt_regs *ctx)
{
    u64 fd = PT_REGS_RC(ctx);
    u64 methods = 0;
    if (!fd || bpf_probe_read_user(&methods, sizeof(methods), (void *)fd))
        return 0;
    struct conn_key k = {};
    k.pid = bpf_get_current_pid_tgid() >> 32;
    k.ptr = methods;
    u8 one = 1;
    ssl_nss_methods.update(&k, &one);
    return 0;
}

/* Tracepoints: the socket used inside a TLS call. */
int ssl_tp_sys_enter(struct tp_sys_enter *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct call_t *c = ssl_calls.lookup(&id);
    if (c)
        c->pending_fd = (s32)ctx->arg0;
    return 0;
}

int ssl_tp_sock_len(struct tp_sock_len *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct call_t *c = ssl_calls.lookup(&id);
    if (c && !c->sk) {
        c->sk = ctx->sk;
        c->fd = c->pending_fd;
    }
    return 0;
}

int ssl_tp_sk_state(struct tp_sk_state *ctx)
{
    if (ctx->protocol != 6)
        return 0;
    u64 sk = ctx->skaddr;
    if (ctx->newstate == 7) {
        ssl_socks.delete(&sk);
        return 0;
    }
    if (ctx->newstate > 3)
        return 0;
    struct sock_t s = {};
    s.family = ctx->family;
    s.lport = ctx->sport;
    s.rport = ctx->dport;
    if (ctx->family == 10) {
        __builtin_memcpy(s.laddr, ctx->saddr_v6, 16);
        __builtin_memcpy(s.raddr, ctx->daddr_v6, 16);
    } else {
        __builtin_memcpy(s.laddr, ctx->saddr, 4);
        __builtin_memcpy(s.raddr, ctx->daddr, 4);
    }
    ssl_socks.update(&sk, &s);
    return 0;
}
"""


def _mask(pred: object) -> str:
    bits = 0
    for f in FUNCS:
        if pred(f):  # type: ignore[operator]
            bits |= 1 << f.id
    return f"{bits:#x}"


def _ladder() -> str:
    lines = ["    if (len == CHUNK)",
             "        h = ssl_rb.ringbuf_reserve(sizeof(struct data_hdr) + CHUNK);"]
    for size in _SIZES:
        lines.append(f"    else if (len <= {size})")
        lines.append(f"        h = ssl_rb.ringbuf_reserve(sizeof(struct data_hdr) + {size});")
    lines.append("    else")
    lines.append("        h = ssl_rb.ringbuf_reserve(sizeof(struct data_hdr) + CHUNK);")
    return "\n".join(lines)


def render(ring_pages: int) -> str:
    """The C text for a ring of ``ring_pages`` pages (a power of two)."""
    entries = "\n".join(f"int ssl_enter_{f.id}(struct pt_regs *ctx)"
                        f" {{ return on_enter(ctx, {f.id}); }}" for f in FUNCS)
    # With uprobe_multi links one program serves every data function: the
    # function's id is the attach cookie.
    entries += ("\nint ssl_enter(struct pt_regs *ctx)"
                " { return on_enter(ctx, (u32)bpf_get_attach_cookie(ctx) & 15); }")
    text = _C
    for key, value in (("@CHUNK@", str(CHUNK)), ("@PAGES@", str(ring_pages)),
                       ("@NSTATS@", str(len(STAT_NAMES))),
                       ("@WRITE_MASK@", _mask(lambda f: f.write)),
                       ("@EX_MASK@", _mask(lambda f: f.ex)),
                       ("@PEEK_MASK@", _mask(lambda f: f.peek)),
                       ("@NSS_MASK@", _mask(lambda f: f.lib == LIB_NSS)),
                       ("@GNUTLS_MASK@", _mask(lambda f: f.lib == LIB_GNUTLS)),
                       ("@ENTRIES@", entries), ("@LADDER@", _ladder()),
                       ("@PLACEHOLDER@", f"{LOOP_PLACEHOLDER:#x}")):
        text = text.replace(key, value)
    return text


def default_programs() -> list[str]:
    """The C a default capture compiles (32 MiB ring): for ``apptrace prepare``."""
    return [render(32 * 1024 * 1024 // 4096)]
