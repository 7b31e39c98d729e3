/*
 * vsock-pattern: a plain AF_VSOCK guest program for the shim's VM tests
 * (tests/tests/vm.rs, shim_*). It knows nothing of domsock: only socket, connect, read,
 * write, shutdown, close and poll / select / epoll, as any C program would use them.
 *
 * Usage: vsock-pattern MODE PORT OUT_BYTES OUT_SEED IN_BYTES IN_SEED CHUNK
 *   MODE   blocking  blocking connect; a writer thread and a reading main thread
 *          poll      non-blocking connect (EINPROGRESS, poll for POLLOUT, SO_ERROR), then
 *                    one thread multiplexing reads and writes with poll
 *          select    the same with select
 *          epoll     the same with edge-triggered epoll
 *          accept    bind PORT, listen, poll the listening fd for POLLIN, accept4 with
 *                    SOCK_NONBLOCK|SOCK_CLOEXEC (both checked on the new fd), then the poll
 *                    loop; with CONNS (8th argument) it accepts that many connections in
 *                    turn, the k-th with seeds OUT_SEED+k and IN_SEED+k, those after the
 *                    first carrying LATER_BYTES (9th argument) each way
 *          dual      two connections at once, each blocking with a writer and a reader
 *                    thread: the host on PORT (seeds OUT_SEED, IN_SEED) and CID2:PORT2
 *                    (8th and 9th arguments; seeds OUT_SEED+1, IN_SEED+1)
 *          seqpacket a SOCK_SEQPACKET connection to the host on PORT: a sender thread sends
 *                    OUT_BYTES rounds of messages of the sizes in SEQ_SIZES (pattern
 *                    OUT_SEED) with MSG_EOR, at most 3 ahead of the echoes, then shuts its
 *                    write side; the main thread
 *                    reads the host's echo of each and checks it whole (length, no
 *                    MSG_TRUNC, bytes), then expects EOF; IN_* unused
 * Stream modes connect to the host (CID 2) on PORT, write OUT_BYTES of the pattern stream for
 * OUT_SEED in CHUNK-byte writes, then shut their write side; at the same time they read
 * IN_BYTES and check them against the pattern for IN_SEED, then expect EOF.
 *
 * The pattern stream is domsock_guest::pattern's: state = splitmix64(seed) (0 replaced by
 * 0x9E3779B97F4A7C15), each step xorshift64 (13, 7, 17) emitting the new state as 8
 * little-endian bytes. The host checks what it receives with the Rust generator.
 *
 * Prints one line per connection on success:
 *   DS-RESULT cmd=vsock-pattern mode=M peer=CID:PORT sent=N received=N bad=0 ms=T
 * (seqpacket: sent/received count messages, ok= the echoes that matched)
 * and on any failure a DS-ERROR line (any error a call returns, other than EAGAIN on a
 * non-blocking fd, is a failure: under the shim a device blackout must not show).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

/* How long one wait for readiness may take before the program gives up. */
#define WAIT_MS 120000

struct pattern {
    uint64_t state;
    uint8_t word[8];
    int used;
};

static uint64_t splitmix64(uint64_t seed)
{
    uint64_t z = seed + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void pattern_init(struct pattern *p, uint64_t seed)
{
    p->state = splitmix64(seed);
    if (p->state == 0)
        p->state = 0x9E3779B97F4A7C15ULL;
    p->used = 8;
}

static uint64_t pattern_next(struct pattern *p)
{
    uint64_t x = p->state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p->state = x;
    return x;
}

static void pattern_fill(struct pattern *p, uint8_t *buf, size_t n)
{
    size_t i = 0;
    while (i < n && p->used < 8)
        buf[i++] = p->word[p->used++];
    for (; n - i >= 8; i += 8) {
        uint64_t x = pattern_next(p);
        for (int b = 0; b < 8; b++)
            buf[i + b] = (uint8_t)(x >> (8 * b));
    }
    if (i < n) {
        uint64_t x = pattern_next(p);
        for (int b = 0; b < 8; b++)
            p->word[b] = (uint8_t)(x >> (8 * b));
        p->used = 0;
        while (i < n)
            buf[i++] = p->word[p->used++];
    }
}

/* One connection's state (the `dual` mode has two). */
struct conn {
    int fd;
    unsigned cid, port;
    uint64_t out_bytes, in_bytes, sent, received, bad;
    struct pattern out_pat, in_pat;
    uint8_t *out_buf, *in_buf, *want_buf;
    /* Bytes of out_buf generated but not yet accepted by the kernel. */
    size_t out_have, out_off;
    int shut_done, eof_seen;
};

static const char *mode;
static size_t chunk;
/* The connection the single-connection modes use. */
static struct conn main_conn = {.fd = -1};
static struct conn *cur = &main_conn;

static void fail_conn(struct conn *c, const char *what, int err)
{
    printf("DS-ERROR cmd=vsock-pattern mode=%s peer=%u:%u msg=%s-%s sent=%llu received=%llu\n",
           mode, c->cid, c->port, what, err ? strerrorname_np(err) : "none",
           (unsigned long long)c->sent, (unsigned long long)c->received);
    fflush(stdout);
    exit(1);
}

static void fail(const char *what, int err)
{
    fail_conn(cur, what, err);
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* One write of the next pattern bytes; returns 0 when the kernel would block. */
static int conn_write_some(struct conn *c)
{
    if (c->out_have == c->out_off) {
        uint64_t left = c->out_bytes - c->sent;
        c->out_have = left < chunk ? (size_t)left : chunk;
        c->out_off = 0;
        pattern_fill(&c->out_pat, c->out_buf, c->out_have);
    }
    ssize_t n = write(c->fd, c->out_buf + c->out_off, c->out_have - c->out_off);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        fail_conn(c, "write", errno);
    }
    c->out_off += (size_t)n;
    c->sent += (uint64_t)n;
    return 1;
}

static void conn_shut_if_done(struct conn *c)
{
    if (c->sent == c->out_bytes && !c->shut_done) {
        if (shutdown(c->fd, SHUT_WR) < 0)
            fail_conn(c, "shutdown", errno);
        c->shut_done = 1;
    }
}

/* One read, checked against the pattern; returns 0 when the kernel would block. */
static int conn_read_some(struct conn *c)
{
    ssize_t n = read(c->fd, c->in_buf, chunk);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        fail_conn(c, "read", errno);
    }
    if (n == 0) {
        if (c->received != c->in_bytes)
            fail_conn(c, "early-eof", 0);
        c->eof_seen = 1;
        return 0;
    }
    if (c->received + (uint64_t)n > c->in_bytes)
        fail_conn(c, "too-much-data", 0);
    pattern_fill(&c->in_pat, c->want_buf, (size_t)n);
    if (memcmp(c->in_buf, c->want_buf, (size_t)n) != 0) {
        for (ssize_t i = 0; i < n; i++)
            c->bad += c->in_buf[i] != c->want_buf[i];
    }
    c->received += (uint64_t)n;
    return 1;
}

static int write_some(void) { return conn_write_some(cur); }
static void shut_if_done(void) { conn_shut_if_done(cur); }
static int read_some(void) { return conn_read_some(cur); }

static void *conn_writer(void *arg)
{
    struct conn *c = arg;
    while (c->sent < c->out_bytes)
        conn_write_some(c);
    conn_shut_if_done(c);
    return NULL;
}

static void *conn_reader(void *arg)
{
    struct conn *c = arg;
    while (!c->eof_seen)
        conn_read_some(c);
    return NULL;
}

static void *writer(void *arg)
{
    (void)arg;
    return conn_writer(cur);
}

static void conn_init(struct conn *c, unsigned cid, unsigned port, uint64_t out_n,
                      uint64_t out_seed, uint64_t in_n, uint64_t in_seed)
{
    memset(c, 0, sizeof *c);
    c->fd = -1;
    c->cid = cid;
    c->port = port;
    c->out_bytes = out_n;
    c->in_bytes = in_n;
    pattern_init(&c->out_pat, out_seed);
    pattern_init(&c->in_pat, in_seed);
    c->out_buf = malloc(chunk);
    c->in_buf = malloc(chunk);
    c->want_buf = malloc(chunk);
    if (!c->out_buf || !c->in_buf || !c->want_buf)
        fail_conn(c, "malloc", ENOMEM);
}

static void conn_report(struct conn *c, double ms)
{
    printf("DS-RESULT cmd=vsock-pattern mode=%s peer=%u:%u sent=%llu received=%llu bad=%llu "
           "ms=%.1f\n",
           mode, c->cid, c->port, (unsigned long long)c->sent, (unsigned long long)c->received,
           (unsigned long long)c->bad, ms);
    fflush(stdout);
}

static int vsock_socket(int flags)
{
    int s = socket(AF_VSOCK, SOCK_STREAM | flags, 0);
    if (s < 0)
        fail("socket", errno);
    return s;
}

static struct sockaddr_vm vsock_addr(unsigned cid, unsigned port)
{
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = cid;
    a.svm_port = port;
    return a;
}

static struct sockaddr_vm host_addr(unsigned port)
{
    return vsock_addr(VMADDR_CID_HOST, port);
}

static void run_blocking(unsigned port)
{
    cur->fd = vsock_socket(0);
    struct sockaddr_vm a = host_addr(port);
    if (connect(cur->fd, (struct sockaddr *)&a, sizeof a) < 0)
        fail("connect", errno);
    pthread_t t;
    if (pthread_create(&t, NULL, writer, NULL) != 0)
        fail("pthread_create", 0);
    while (!cur->eof_seen)
        read_some();
    pthread_join(t, NULL);
}

/* Non-blocking connect: EINPROGRESS (or at once), writable, SO_ERROR 0. */
static void connect_nonblocking(unsigned port, int (*wait_writable)(void))
{
    cur->fd = vsock_socket(SOCK_NONBLOCK);
    struct sockaddr_vm a = host_addr(port);
    if (connect(cur->fd, (struct sockaddr *)&a, sizeof a) < 0) {
        if (errno != EINPROGRESS)
            fail("connect", errno);
        if (!wait_writable())
            fail("connect-timeout", 0);
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(cur->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            fail("getsockopt", errno);
        if (err != 0)
            fail("connect-so_error", err);
    }
}

static int poll_writable(void)
{
    struct pollfd p = {.fd = cur->fd, .events = POLLOUT};
    int r = poll(&p, 1, WAIT_MS);
    if (r < 0)
        fail("poll", errno);
    return r > 0;
}

/* Reads and writes the non-blocking `cur->fd` with poll until both directions are done. */
static void poll_loop(void)
{
    while (!cur->eof_seen || cur->sent < cur->out_bytes) {
        struct pollfd p = {.fd = cur->fd, .events = (short)(cur->eof_seen ? 0 : POLLIN)};
        if (cur->sent < cur->out_bytes)
            p.events |= POLLOUT;
        int r = poll(&p, 1, WAIT_MS);
        if (r < 0)
            fail("poll", errno);
        if (r == 0)
            fail("poll-timeout", 0);
        if (p.revents & (POLLERR | POLLNVAL))
            fail("poll-error-event", 0);
        if (p.revents & POLLOUT)
            while (cur->sent < cur->out_bytes && write_some())
                ;
        shut_if_done();
        if (p.revents & (POLLIN | POLLHUP))
            while (!cur->eof_seen && read_some())
                ;
    }
}

static void run_poll(unsigned port)
{
    connect_nonblocking(port, poll_writable);
    poll_loop();
}

/* Listens on PORT and serves `conns` host connections in turn (see the usage). */
static void run_accept(unsigned port, unsigned conns, uint64_t later_bytes, uint64_t out_seed,
                       uint64_t in_seed, double t0)
{
    int l = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (l < 0)
        fail("socket", errno);
    struct sockaddr_vm a = vsock_addr(VMADDR_CID_ANY, port);
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0)
        fail("bind", errno);
    if (listen(l, 4) < 0)
        fail("listen", errno);
    printf("DS-READY port=%u type=stream\n", port);
    fflush(stdout);
    for (unsigned k = 0; k < conns; k++) {
        uint64_t out_n = k ? later_bytes : cur->out_bytes, in_n = k ? later_bytes : cur->in_bytes;
        conn_init(cur, VMADDR_CID_HOST, port, out_n, out_seed + k, in_n, in_seed + k);
        struct pollfd p = {.fd = l, .events = POLLIN};
        int r = poll(&p, 1, WAIT_MS);
        if (r < 0)
            fail("poll-listener", errno);
        if (r == 0)
            fail("accept-timeout", 0);
        if (p.revents != POLLIN)
            fail("poll-listener-events", 0);
        struct sockaddr_vm peer;
        socklen_t len = sizeof peer;
        cur->fd = accept4(l, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cur->fd < 0)
            fail("accept4", errno);
        cur->cid = peer.svm_cid;
        int fl = fcntl(cur->fd, F_GETFL);
        int fdfl = fcntl(cur->fd, F_GETFD);
        if (fl < 0 || !(fl & O_NONBLOCK))
            fail("accept4-nonblock", fl < 0 ? errno : 0);
        if (fdfl < 0 || !(fdfl & FD_CLOEXEC))
            fail("accept4-cloexec", fdfl < 0 ? errno : 0);
        poll_loop();
        if (close(cur->fd) < 0)
            fail("close", errno);
        conn_report(cur, now_ms() - t0);
    }
    if (close(l) < 0)
        fail("close-listener", errno);
}

/* Two blocking connections at once (see the usage). */
static void run_dual(unsigned port, unsigned cid2, unsigned port2, uint64_t out_seed,
                     uint64_t in_seed, double t0)
{
    static struct conn two[2];
    uint64_t out_n = cur->out_bytes, in_n = cur->in_bytes;
    conn_init(&two[0], VMADDR_CID_HOST, port, out_n, out_seed, in_n, in_seed);
    conn_init(&two[1], cid2, port2, out_n, out_seed + 1, in_n, in_seed + 1);
    pthread_t t[4];
    for (int i = 0; i < 2; i++) {
        struct conn *c = &two[i];
        c->fd = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (c->fd < 0)
            fail_conn(c, "socket", errno);
        struct sockaddr_vm a = vsock_addr(c->cid, c->port);
        if (connect(c->fd, (struct sockaddr *)&a, sizeof a) < 0)
            fail_conn(c, "connect", errno);
    }
    for (int i = 0; i < 2; i++) {
        if (pthread_create(&t[2 * i], NULL, conn_writer, &two[i]) != 0 ||
            pthread_create(&t[2 * i + 1], NULL, conn_reader, &two[i]) != 0)
            fail_conn(&two[i], "pthread_create", 0);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    double ms = now_ms() - t0;
    for (int i = 0; i < 2; i++) {
        if (close(two[i].fd) < 0)
            fail_conn(&two[i], "close", errno);
        conn_report(&two[i], ms);
    }
}

/* Message sizes of the seqpacket mode (the VM tests' SEQ_SIZES). */
static const size_t SEQ_SIZES[] = {1, 2, 3, 7, 64, 4095, 4096, 4097, 32768, 65535, 65536};
#define SEQ_MAX 65536

/* The seqpacket mode's sender: every message of `seq_rounds` rounds of SEQ_SIZES, then
 * SHUT_WR; the main thread reads the echoes meanwhile, at most SEQ_IN_FLIGHT messages
 * behind (more in flight stalls domsockd's seqpacket session; README, "Not covered yet"). */
#define SEQ_IN_FLIGHT 3
static uint64_t seq_rounds;

static void *seq_sender(void *arg)
{
    (void)arg;
    uint8_t *msg = malloc(SEQ_MAX);
    if (!msg)
        fail("malloc", ENOMEM);
    size_t nsizes = sizeof SEQ_SIZES / sizeof SEQ_SIZES[0];
    for (uint64_t r = 0; r < seq_rounds; r++) {
        for (size_t i = 0; i < nsizes; i++) {
            size_t len = SEQ_SIZES[i];
            pattern_fill(&cur->out_pat, msg, len);
            while (__atomic_load_n(&cur->sent, __ATOMIC_RELAXED) >=
                   __atomic_load_n(&cur->received, __ATOMIC_ACQUIRE) + SEQ_IN_FLIGHT)
                usleep(50);
            ssize_t n = send(cur->fd, msg, len, MSG_EOR);
            if (n < 0)
                fail("send", errno);
            if ((size_t)n != len)
                fail("send-short", 0);
            __atomic_add_fetch(&cur->sent, 1, __ATOMIC_RELAXED);
        }
    }
    if (shutdown(cur->fd, SHUT_WR) < 0)
        fail("shutdown", errno);
    free(msg);
    return NULL;
}

/* A seqpacket connection to the host: `rounds` rounds of SEQ_SIZES sent by one thread,
 * each echoed by the host and checked by this one against the same pattern stream. */
static void run_seqpacket(unsigned port, uint64_t rounds, uint64_t seed, uint64_t *ok)
{
    cur->fd = socket(AF_VSOCK, SOCK_SEQPACKET, 0);
    if (cur->fd < 0)
        fail("socket", errno);
    struct sockaddr_vm a = host_addr(port);
    if (connect(cur->fd, (struct sockaddr *)&a, sizeof a) < 0)
        fail("connect", errno);
    uint8_t *want = malloc(SEQ_MAX), *echo = malloc(SEQ_MAX + 1);
    if (!want || !echo)
        fail("malloc", ENOMEM);
    struct pattern check;
    pattern_init(&check, seed);
    seq_rounds = rounds;
    pthread_t t;
    if (pthread_create(&t, NULL, seq_sender, NULL) != 0)
        fail("pthread_create", 0);
    size_t nsizes = sizeof SEQ_SIZES / sizeof SEQ_SIZES[0];
    for (uint64_t r = 0; r < rounds; r++) {
        for (size_t i = 0; i < nsizes; i++) {
            size_t len = SEQ_SIZES[i];
            pattern_fill(&check, want, len);
            struct iovec iov = {.iov_base = echo, .iov_len = SEQ_MAX + 1};
            struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
            ssize_t n = recvmsg(cur->fd, &mh, 0);
            if (n < 0)
                fail("recvmsg", errno);
            if (n == 0)
                fail("early-eof", 0);
            __atomic_add_fetch(&cur->received, 1, __ATOMIC_RELEASE);
            if (mh.msg_flags & MSG_TRUNC)
                fail("truncated", 0);
            if ((size_t)n != len) {
                printf("DS-ERROR cmd=vsock-pattern mode=seqpacket msg=echo-%llu-of-%zu-is-%zd\n",
                       (unsigned long long)cur->received, len, n);
                fflush(stdout);
                exit(1);
            }
            if (memcmp(want, echo, len) != 0)
                cur->bad++;
            else
                (*ok)++;
        }
    }
    pthread_join(t, NULL);
    /* The host ends the echo when it reads our EOF: then a read returns 0. */
    ssize_t n = recv(cur->fd, echo, SEQ_MAX + 1, 0);
    if (n != 0)
        fail("no-eof", n < 0 ? errno : 0);
    free(want);
    free(echo);
}

static int select_writable(void)
{
    fd_set w;
    FD_ZERO(&w);
    FD_SET(cur->fd, &w);
    struct timeval tv = {.tv_sec = WAIT_MS / 1000};
    int r = select(cur->fd + 1, NULL, &w, NULL, &tv);
    if (r < 0)
        fail("select", errno);
    return r > 0;
}

static void run_select(unsigned port)
{
    connect_nonblocking(port, select_writable);
    while (!cur->eof_seen || cur->sent < cur->out_bytes) {
        fd_set r, w;
        FD_ZERO(&r);
        FD_ZERO(&w);
        if (!cur->eof_seen)
            FD_SET(cur->fd, &r);
        if (cur->sent < cur->out_bytes)
            FD_SET(cur->fd, &w);
        struct timeval tv = {.tv_sec = WAIT_MS / 1000};
        int n = select(cur->fd + 1, &r, &w, NULL, &tv);
        if (n < 0)
            fail("select", errno);
        if (n == 0)
            fail("select-timeout", 0);
        if (FD_ISSET(cur->fd, &w))
            while (cur->sent < cur->out_bytes && write_some())
                ;
        shut_if_done();
        if (FD_ISSET(cur->fd, &r))
            while (!cur->eof_seen && read_some())
                ;
    }
}

static int ep = -1;

static int epoll_writable(void)
{
    struct epoll_event ev;
    int r = epoll_wait(ep, &ev, 1, WAIT_MS);
    if (r < 0)
        fail("epoll_wait", errno);
    if (r > 0 && (ev.events & EPOLLERR))
        fail("epoll-error-event", 0);
    return r > 0;
}

static void run_epoll(unsigned port)
{
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        fail("epoll_create1", errno);
    cur->fd = vsock_socket(SOCK_NONBLOCK);
    /* Registered before the connect: the registration must follow the cur->fd. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.u64 = 0x5157};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, cur->fd, &ev) < 0)
        fail("epoll_ctl", errno);
    struct sockaddr_vm a = host_addr(port);
    if (connect(cur->fd, (struct sockaddr *)&a, sizeof a) < 0) {
        if (errno != EINPROGRESS)
            fail("connect", errno);
        if (!epoll_writable())
            fail("connect-timeout", 0);
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(cur->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            fail("getsockopt", errno);
        if (err != 0)
            fail("connect-so_error", err);
    }
    /* Edge-triggered: drain both directions now, then after every event. */
    for (;;) {
        while (cur->sent < cur->out_bytes && write_some())
            ;
        shut_if_done();
        while (!cur->eof_seen && read_some())
            ;
        if (cur->eof_seen && cur->sent == cur->out_bytes)
            break;
        struct epoll_event got;
        int r = epoll_wait(ep, &got, 1, WAIT_MS);
        if (r < 0)
            fail("epoll_wait", errno);
        if (r == 0)
            fail("epoll-timeout", 0);
        if (got.data.u64 != 0x5157)
            fail("epoll-data", 0);
        if (got.events & EPOLLERR)
            fail("epoll-error-event", 0);
    }
}

int main(int argc, char **argv)
{
    if (argc < 8 || argc > 10) {
        fprintf(stderr, "usage: %s blocking|poll|select|epoll|accept|dual|seqpacket PORT OUT_BYTES "
                        "OUT_SEED IN_BYTES IN_SEED CHUNK [CONNS [LATER_BYTES] | CID2 PORT2]\n",
                argv[0]);
        return 2;
    }
    mode = argv[1];
    unsigned port = (unsigned)strtoul(argv[2], NULL, 10);
    uint64_t out_seed = strtoull(argv[4], NULL, 10), in_seed = strtoull(argv[6], NULL, 10);
    chunk = (size_t)strtoul(argv[7], NULL, 10);
    if (chunk == 0)
        chunk = 65536;
    conn_init(cur, VMADDR_CID_HOST, port, strtoull(argv[3], NULL, 10), out_seed,
              strtoull(argv[5], NULL, 10), in_seed);

    double t0 = now_ms();
    if (strcmp(mode, "accept") == 0) {
        run_accept(port, argc > 8 ? (unsigned)strtoul(argv[8], NULL, 10) : 1,
                   argc > 9 ? strtoull(argv[9], NULL, 10) : cur->out_bytes, out_seed, in_seed, t0);
        return 0;
    }
    if (strcmp(mode, "dual") == 0) {
        if (argc != 10)
            fail("dual-needs-cid2-port2", EINVAL);
        run_dual(port, (unsigned)strtoul(argv[8], NULL, 10),
                 (unsigned)strtoul(argv[9], NULL, 10), out_seed, in_seed, t0);
        return 0;
    }
    if (strcmp(mode, "seqpacket") == 0) {
        uint64_t ok = 0;
        run_seqpacket(port, cur->out_bytes, out_seed, &ok);
        double ms = now_ms() - t0;
        if (close(cur->fd) < 0)
            fail("close", errno);
        printf("DS-RESULT cmd=vsock-pattern mode=seqpacket peer=2:%u sent=%llu received=%llu "
               "ok=%llu bad=%llu ms=%.1f\n",
               port, (unsigned long long)cur->sent, (unsigned long long)cur->received,
               (unsigned long long)ok, (unsigned long long)cur->bad, ms);
        fflush(stdout);
        return cur->bad != 0;
    }
    if (strcmp(mode, "blocking") == 0)
        run_blocking(port);
    else if (strcmp(mode, "poll") == 0)
        run_poll(port);
    else if (strcmp(mode, "select") == 0)
        run_select(port);
    else if (strcmp(mode, "epoll") == 0)
        run_epoll(port);
    else
        fail("unknown-mode", EINVAL);
    double ms = now_ms() - t0;
    if (close(cur->fd) < 0)
        fail("close", errno);
    conn_report(cur, ms);
    return cur->bad != 0;
}
