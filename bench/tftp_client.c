/* A small TFTP read client in C for bench/bench_tftp.py: the same protocol as
 * bench/tftp_client.py (RRQ with tsize, blksize and windowsize options, window ACKs, re-ACK of
 * the last in-order block on a gap or a timeout), but cheap per packet, so that in lock-step the
 * figure measures the servers rather than the client. Built by the bench with gcc into a
 * temporary directory; never committed as a binary.
 *
 *   tftp_client HOST PORT NAME BLKSIZE WINDOWSIZE OUTFILE
 *
 * Writes the file to OUTFILE and prints "<seconds> <bytes> <median us per block> <slow blocks>
 * <slow seconds>": seconds from the RRQ sent to the last ACK sent, the median time between two
 * in-order DATA packets (one clock read per block), which a few very slow round trips do not
 * move (on a VM whose idle vCPUs are sometimes woken milliseconds late, those few can be half of
 * the seconds, for any server), and that tail itself: how many gaps took over 1 ms and their
 * seconds in all.
 * With TFTP_CLIENT_GAPS=FILE in the environment it also writes every gap (seconds, native
 * doubles, in arrival order) to FILE, for diagnosis (when in the transfer the slow blocks come).
 * Exit 1 with a message on stderr on any failure (error packet, timeout, protocol violation).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *why, long block) {
    fprintf(stderr, "tftp_client: %s (block %ld)\n", why, block);
    exit(1);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* value of option `name` in an OACK body, or NULL */
static const char *option(const unsigned char *p, ssize_t n, const char *name) {
    const char *s = (const char *)p + 2, *end = (const char *)p + n;
    while (s < end) {
        const char *k = s, *v = k + strnlen(k, end - k) + 1;
        if (v >= end) return NULL;
        if (strcasecmp(k, name) == 0) return v;
        s = v + strnlen(v, end - v) + 1;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT NAME BLKSIZE WINDOWSIZE OUTFILE\n", argv[0]);
        return 2;
    }
    const char *name = argv[3];
    int want_bs = atoi(argv[4]), want_win = atoi(argv[5]);
    FILE *out = fopen(argv[6], "wb");
    if (!out) die("cannot open the output file", 0);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct timeval tv = {2, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in srv = {0}, from;
    srv.sin_family = AF_INET;
    srv.sin_port = htons(atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &srv.sin_addr) != 1) die("bad host address", 0);

    unsigned char req[600], ack[4] = {0, 4, 0, 0}, pkt[65536 + 4];
    size_t n = 0;
    req[n++] = 0; req[n++] = 1;
    n += sprintf((char *)req + n, "%s", name) + 1;
    n += sprintf((char *)req + n, "octet") + 1;
    n += sprintf((char *)req + n, "tsize") + 1;
    n += sprintf((char *)req + n, "0") + 1;
    if (want_bs != 512) {
        n += sprintf((char *)req + n, "blksize") + 1;
        n += sprintf((char *)req + n, "%d", want_bs) + 1;
    }
    if (want_win != 1) {
        n += sprintf((char *)req + n, "windowsize") + 1;
        n += sprintf((char *)req + n, "%d", want_win) + 1;
    }
    double t0 = now();
    if (sendto(s, req, n, 0, (struct sockaddr *)&srv, sizeof srv) < 0) die("sendto failed", 0);
    long bs = 512, win = 1, expect = 1, since_ack = 0, total = 0, tries = 0;
    double *gaps = NULL, last_data = 0;
    size_t ngaps = 0, cap = 0;
    int connected = 0;
    for (;;) {
        socklen_t fl = sizeof from;
        ssize_t got = connected ? recv(s, pkt, sizeof pkt, 0)
                                : recvfrom(s, pkt, sizeof pkt, 0, (struct sockaddr *)&from, &fl);
        if (got < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) die("recv failed", expect);
            if (++tries > 5) die("timed out", expect);
            if (connected) send(s, ack, 4, 0);
            else sendto(s, req, n, 0, (struct sockaddr *)&srv, sizeof srv);
            since_ack = 0;
            continue;
        }
        if (!connected) {  /* the server's transfer ID: talk to it alone from now on */
            if (connect(s, (struct sockaddr *)&from, fl) < 0) die("connect failed", 0);
            connected = 1;
        }
        if (got < 4) die("short packet", expect);
        int op = pkt[1];
        if (op == 5) {
            fprintf(stderr, "tftp_client: server error %d: %.200s\n", pkt[2] << 8 | pkt[3], (char *)pkt + 4);
            return 1;
        }
        if (op == 6) {  /* OACK */
            const char *v;
            if ((v = option(pkt, got, "blksize"))) bs = atol(v);
            if ((v = option(pkt, got, "windowsize"))) win = atol(v);
            ack[2] = ack[3] = 0;
            send(s, ack, 4, 0);
            continue;
        }
        if (op != 3) die("unexpected packet", expect);
        tries = 0;
        long block = pkt[2] << 8 | pkt[3];
        if (block != (expect & 0xFFFF)) {  /* a gap or a duplicate: ack what we have */
            if (since_ack) {
                ack[2] = ((expect - 1) >> 8) & 0xFF; ack[3] = (expect - 1) & 0xFF;
                send(s, ack, 4, 0);
                since_ack = 0;
            }
            continue;
        }
        double t = now();
        if (last_data > 0) {
            if (ngaps == cap && !(gaps = realloc(gaps, (cap = cap ? 2 * cap : 65536) * sizeof *gaps)))
                die("out of memory", expect);
            gaps[ngaps++] = t - last_data;
        }
        last_data = t;
        long len = got - 4;
        if (len && fwrite(pkt + 4, 1, len, out) != (size_t)len) die("write failed", expect);
        total += len;
        int final = len < bs;
        if (final || ++since_ack >= win) {
            ack[2] = (expect >> 8) & 0xFF; ack[3] = expect & 0xFF;
            send(s, ack, 4, 0);
            since_ack = 0;
        }
        if (final) break;
        expect++;
    }
    double dt = now() - t0;
    if (fclose(out) != 0) die("close failed", expect);
    const char *dump = getenv("TFTP_CLIENT_GAPS");
    if (dump && ngaps) {
        FILE *g = fopen(dump, "wb");
        if (!g || fwrite(gaps, sizeof *gaps, ngaps, g) != ngaps || fclose(g) != 0) die("cannot write the gaps", expect);
    }
    double median = 0, slow_s = 0;
    long slow = 0;
    for (size_t i = 0; i < ngaps; i++)
        if (gaps[i] > 1e-3) slow++, slow_s += gaps[i];
    if (ngaps) {
        qsort(gaps, ngaps, sizeof *gaps, cmp_double);
        median = gaps[ngaps / 2];
    }
    printf("%.6f %ld %.3f %ld %.6f\n", dt, total, median * 1e6, slow, slow_s);
    return 0;
}
