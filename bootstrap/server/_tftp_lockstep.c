/* One whole lock-step TFTP transfer (RFC 1350, window of one block) in C, with the GIL released:
 * the native twin of TftpServer._send_lockstep / _recover in tftp_server.py, which stays as the
 * fallback when this module is not built (`lockstep_impl` there picks one).
 *
 * Why native: in lock-step the server's work between an ACK and the next DATA is the transfer's
 * speed. On a VM where the client and the server are woken on different vCPUs, every block costs
 * a VM exit, and the interpreter's loop then runs on cold caches: 4-6 us of user time per block
 * for two calls into C under the GIL, against 0.5-1 us for the same loop in C (docs/boot-server.md).
 *
 * The rules are the Python loop's, block for block (tests/unit/test_tftp_*.py run both):
 * - the first receive of an ACK reads at most FAST_READ bytes (as the Python loop does), the
 *   later ones RECV_MAX; the socket is connected and blocking, SO_RCVTIMEO (set by the caller
 *   to the transfer timeout) bounds the first wait, poll() the later ones, against a deadline of
 *   one timeout after the last send that ignored datagrams do not move;
 * - a timeout resends the block (at most `retries` in a row, then "timeout"); a duplicate ACK of
 *   the block before ("I lost yours") resends it early, at most `max_dup` times per block; every
 *   resend draws on `budget` (spent: "budget"); anything else (stray or old ACKs, ACKs of the
 *   wrong length, other opcodes, malformed datagrams) is ignored;
 * - an ERROR from the client ends the transfer ("error"): a well-formed one, or one the first
 *   receive cut at FAST_READ bytes (a long message);
 * - ECONNREFUSED on a receive (ICMP port unreachable) is "refused"; any other failing syscall is
 *   "oserror" with its errno, which the caller raises as OSError, as the Python loop would.
 * The transfer ends at `size` (what tsize announced) or earlier if the file shrank: the first
 * short block is the last one. The caller keeps the file and the socket open for the call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FAST_READ (512 - 33)
#define RECV_MAX 2048
#define CHUNK (64 * 1024)
#define MAX_BLKSIZE 65464

enum { R_DONE, R_ERROR, R_TIMEOUT, R_BUDGET, R_REFUSED, R_OSERROR };
static const char *const REASONS[] = {"done", "error", "timeout", "budget", "refused", "oserror"};

typedef struct {
    int fd;                   /* the file, or -1 for `content` */
    const unsigned char *content;
    uint64_t size;            /* bytes to send at most (the size at open) */
    unsigned char *chunk;     /* file bytes [c_off, c_off + c_len) */
    uint64_t c_off, c_len;
    int c_last;               /* the chunk reaches the end of what there is to send */
} source;

typedef struct {
    int reason, err;          /* err: errno for R_OSERROR, the client's code for R_ERROR */
    long resends;
    unsigned char msg[RECV_MAX];
    size_t msg_len;
} outcome;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Block `n`'s data (n >= 1) into `out`; its length (< bs: the last block), or -1 with errno. */
static long block_data(source *s, uint64_t n, long bs, unsigned char *out) {
    uint64_t off = (n - 1) * (uint64_t)bs;
    if (s->fd < 0) {
        uint64_t len = off >= s->size ? 0 : s->size - off;
        if (len > (uint64_t)bs) len = bs;
        memcpy(out, s->content + off, len);
        return (long)len;
    }
    if (off < s->c_off || (off + bs > s->c_off + s->c_len && !s->c_last)) {
        uint64_t cap = CHUNK - CHUNK % bs, want = off >= s->size ? 0 : s->size - off, got = 0;
        if (cap < (uint64_t)bs) cap = bs;
        if (want > cap) want = cap;
        while (got < want) {
            ssize_t r = pread(s->fd, s->chunk + got, want - got, (off_t)(off + got));
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) return -1;
            if (r == 0) break;  /* the file shrank since it was opened: it ends here */
            got += r;
        }
        s->c_off = off, s->c_len = got;
        s->c_last = got < cap;  /* short of a whole chunk: the end (size reached, or EOF) */
    }
    uint64_t end = s->c_off + s->c_len, len = off >= end ? 0 : end - off;
    if (len > (uint64_t)bs) len = bs;
    memcpy(out, s->chunk + (off - s->c_off), len);
    return (long)len;
}

/* What a datagram of `n` bytes is: the ACK's block number (>= 0), -1 (ignored) or -2 (an ERROR
 * from the client: the transfer ends, `o` says which). `cut_at`: the read's size when it was the
 * first, short receive (an ERROR that filled it was cut and still counts), else 0. */
static long classify(const unsigned char *b, ssize_t n, ssize_t cut_at, outcome *o) {
    if (n == 4 && b[0] == 0 && b[1] == 4) return b[2] << 8 | b[3];
    if (n >= 2 && b[0] == 0 && b[1] == 5) {
        int whole = n >= 5 && b[n - 1] == 0 && memchr(b + 4, 0, n - 5) == NULL;
        if (whole || (cut_at && n == cut_at)) {
            o->reason = R_ERROR;
            o->err = b[2] << 8 | b[3];
            o->msg_len = whole ? (size_t)(n - 5) : (size_t)(n - 4 < 80 ? n - 4 : 80);
            memcpy(o->msg, b + 4, o->msg_len);
            return -2;
        }
    }
    return -1;
}

/* The next datagram before `deadline` (monotonic seconds): its length, -1 once the deadline has
 * passed, -2 on an error (`o` set). */
static ssize_t recv_until(int sock, unsigned char *buf, double deadline, outcome *o) {
    for (;;) {
        double left = deadline - now();
        if (left <= 0) return -1;
        struct pollfd p = {sock, POLLIN, 0};
        struct timespec ts = {(time_t)left, (long)((left - (time_t)left) * 1e9)};
        int r = ppoll(&p, 1, &ts, NULL);
        if (r < 0 && errno != EINTR) {
            o->reason = R_OSERROR, o->err = errno;
            return -2;
        }
        if (r <= 0) continue;
        ssize_t n = recv(sock, buf, RECV_MAX, MSG_DONTWAIT);
        if (n >= 0) return n;
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
        o->reason = errno == ECONNREFUSED ? R_REFUSED : R_OSERROR, o->err = errno;
        return -2;
    }
}

static int send_all(int sock, const unsigned char *pkt, size_t len, outcome *o) {
    for (;;) {
        if (send(sock, pkt, len, 0) >= 0) return 0;
        if (errno == EINTR) continue;
        o->reason = R_OSERROR, o->err = errno;
        return -1;
    }
}

/* After the first receive for the block in `pkt` (`got` bytes in `buf`, -1: it timed out) was
 * not its ACK: wait, resend by the rules, until the ACK arrives (0) or the transfer ends (-1). */
static int recover(int sock, const unsigned char *pkt, size_t len, unsigned char *buf, ssize_t got,
                   double deadline, double timeout, long retries, long max_dup, long *budget, outcome *o) {
    long want = pkt[2] << 8 | pkt[3], prev = (want - 1) & 0xFFFF, timeouts = 0, dups = 0;
    long acked = got >= 0 ? classify(buf, got, FAST_READ, o) : (now() < deadline ? -1 : -3);
    for (;;) {
        int dup_ok = dups < max_dup;
        while (acked != want && acked != -3 && !(acked == prev && dup_ok)) {
            if (acked == -2) return -1;
            ssize_t n = recv_until(sock, buf, deadline, o);
            if (n == -2) return -1;
            acked = n == -1 ? -3 : classify(buf, n, 0, o);
        }
        if (acked == want) return 0;
        if (acked == -3) {  /* the deadline passed */
            if (++timeouts > retries) {
                o->reason = R_TIMEOUT;
                return -1;
            }
        } else {
            dups++;  /* the client lost this block: resend it early */
        }
        if (--*budget < 0) {
            o->reason = R_BUDGET;
            return -1;
        }
        o->resends++;
        if (send_all(sock, pkt, len, o)) return -1;
        deadline = now() + timeout;
        acked = -1;
    }
}

static int transfer(int sock, source *s, long bs, double timeout, long retries, long max_dup, long budget,
                    uint64_t *sent, outcome *o) {
    unsigned char *cur = PyMem_RawMalloc(4 + bs), *nxt = PyMem_RawMalloc(4 + bs), buf[RECV_MAX];
    int rc = -1;
    if (!cur || !nxt) {
        o->reason = R_OSERROR, o->err = ENOMEM;
        goto out;
    }
    uint64_t n = 1;
    long len = block_data(s, n, bs, cur + 4);
    if (len < 0) {
        o->reason = R_OSERROR, o->err = errno;
        goto out;
    }
    for (;;) {
        cur[0] = 0, cur[1] = 3, cur[2] = (n >> 8) & 0xFF, cur[3] = n & 0xFF;
        if (send_all(sock, cur, 4 + len, o)) goto out;
        double deadline = now() + timeout;
        long next_len = 0;
        if (len == bs) {  /* the next block, while the client works on this one */
            next_len = block_data(s, n + 1, bs, nxt + 4);
            if (next_len < 0) {
                o->reason = R_OSERROR, o->err = errno;
                goto out;
            }
        }
        ssize_t got;
        while ((got = recv(sock, buf, FAST_READ, 0)) < 0 && errno == EINTR) {}
        if (got < 0 && errno == ECONNREFUSED) {
            o->reason = R_REFUSED, o->err = errno;
            goto out;
        }
        if (got < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            o->reason = R_OSERROR, o->err = errno;
            goto out;
        }
        if (!(got == 4 && buf[0] == 0 && buf[1] == 4 && buf[2] == cur[2] && buf[3] == cur[3])
            && recover(sock, cur, 4 + len, buf, got, deadline, timeout, retries, max_dup, &budget, o))
            goto out;
        *sent += len;
        if (len < bs) break;
        unsigned char *t = cur;
        cur = nxt, nxt = t, len = next_len, n++;
    }
    o->reason = R_DONE;
    rc = 0;
out:
    PyMem_RawFree(cur);
    PyMem_RawFree(nxt);
    return rc;
}

PyDoc_STRVAR(send_doc,
"send(sock_fd, file_fd, content, size, blksize, timeout, retries, budget, max_dup)\n"
"-> (reason, sent, resends, code, message)\n\n"
"One lock-step transfer, block 1 to the end, with the GIL released. The file is `file_fd`\n"
"(read with pread) or, when it is -1, the bytes-like `content`; `size` bytes at most. The\n"
"socket is connected and blocking, its SO_RCVTIMEO the transfer `timeout`. `reason`: 'done',\n"
"'error' (the client's ERROR: `code`, `message` bytes), 'timeout' (more than `retries` in a\n"
"row), 'budget' (more resends than `budget`), 'refused' (ICMP port unreachable) or 'oserror'\n"
"(`code` is the errno). `sent`: data bytes acknowledged; `resends`: blocks sent again.");

static PyObject *lockstep_send(PyObject *self, PyObject *args) {
    (void)self;
    int sock, fd;
    Py_buffer content;
    unsigned long long size;
    long bs, retries, budget, max_dup;
    double timeout;
    if (!PyArg_ParseTuple(args, "iiy*Kldlll:send", &sock, &fd, &content, &size, &bs, &timeout, &retries, &budget,
                          &max_dup))
        return NULL;
    if (bs < 8 || bs > MAX_BLKSIZE || timeout <= 0 || (fd < 0 && size > (unsigned long long)content.len)) {
        PyBuffer_Release(&content);
        PyErr_SetString(PyExc_ValueError, "send: blksize outside 8..65464, timeout <= 0 or size beyond content");
        return NULL;
    }
    source s = {fd, content.buf, size, NULL, 0, 0, 0};
    outcome *o = PyMem_RawCalloc(1, sizeof *o);
    if (fd >= 0) s.chunk = PyMem_RawMalloc(CHUNK > bs ? CHUNK : bs);
    if (!o || (fd >= 0 && !s.chunk)) {
        PyMem_RawFree(o);
        PyMem_RawFree(s.chunk);
        PyBuffer_Release(&content);
        return PyErr_NoMemory();
    }
    uint64_t sent = 0;
    Py_BEGIN_ALLOW_THREADS
    transfer(sock, &s, bs, timeout, retries, max_dup, budget, &sent, o);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(s.chunk);
    PyBuffer_Release(&content);
    PyObject *r = Py_BuildValue("(sKliy#)", REASONS[o->reason], (unsigned long long)sent, o->resends, o->err,
                                (const char *)o->msg, (Py_ssize_t)o->msg_len);
    PyMem_RawFree(o);
    return r;
}

static PyMethodDef methods[] = {
    {"send", lockstep_send, METH_VARARGS, send_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tftp_lockstep",
    "The lock-step TFTP transfer loop in C (see bootstrap/server/tftp_server.py, lockstep_impl).", -1, methods,
};

PyMODINIT_FUNC PyInit__tftp_lockstep(void) { return PyModule_Create(&module); }
