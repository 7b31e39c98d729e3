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
 * It connects to the host (CID 2) on PORT, writes OUT_BYTES of the pattern stream for
 * OUT_SEED in CHUNK-byte writes, then shuts its write side; at the same time it reads
 * IN_BYTES and checks them against the pattern for IN_SEED, then expects EOF.
 *
 * The pattern stream is domsock_guest::pattern's: state = splitmix64(seed) (0 replaced by
 * 0x9E3779B97F4A7C15), each step xorshift64 (13, 7, 17) emitting the new state as 8
 * little-endian bytes. The host checks what it receives with the Rust generator.
 *
 * Prints one line on success:
 *   DS-RESULT cmd=vsock-pattern mode=M sent=N received=N bad=0 ms=T
 * and on any failure a DS-ERROR line (any error a call returns, other than EAGAIN on a
 * non-blocking fd, is a failure: under the shim a device blackout must not show).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
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

static const char *mode;
static int fd = -1;
static uint64_t out_bytes, in_bytes, sent, received, bad;
static size_t chunk;
static struct pattern out_pat, in_pat;
static uint8_t *out_buf, *in_buf, *want_buf;
/* Bytes of out_buf generated but not yet accepted by the kernel. */
static size_t out_have, out_off;
static int shut_done, eof_seen;

static void fail(const char *what, int err)
{
    printf("DS-ERROR cmd=vsock-pattern mode=%s msg=%s-%s sent=%llu received=%llu\n", mode, what,
           err ? strerrorname_np(err) : "none", (unsigned long long)sent,
           (unsigned long long)received);
    fflush(stdout);
    exit(1);
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* One write of the next pattern bytes; returns 0 when the kernel would block. */
static int write_some(void)
{
    if (out_have == out_off) {
        uint64_t left = out_bytes - sent;
        out_have = left < chunk ? (size_t)left : chunk;
        out_off = 0;
        pattern_fill(&out_pat, out_buf, out_have);
    }
    ssize_t n = write(fd, out_buf + out_off, out_have - out_off);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        fail("write", errno);
    }
    out_off += (size_t)n;
    sent += (uint64_t)n;
    return 1;
}

static void shut_if_done(void)
{
    if (sent == out_bytes && !shut_done) {
        if (shutdown(fd, SHUT_WR) < 0)
            fail("shutdown", errno);
        shut_done = 1;
    }
}

/* One read, checked against the pattern; returns 0 when the kernel would block. */
static int read_some(void)
{
    ssize_t n = read(fd, in_buf, chunk);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        fail("read", errno);
    }
    if (n == 0) {
        if (received != in_bytes)
            fail("early-eof", 0);
        eof_seen = 1;
        return 0;
    }
    if (received + (uint64_t)n > in_bytes)
        fail("too-much-data", 0);
    pattern_fill(&in_pat, want_buf, (size_t)n);
    if (memcmp(in_buf, want_buf, (size_t)n) != 0) {
        for (ssize_t i = 0; i < n; i++)
            bad += in_buf[i] != want_buf[i];
    }
    received += (uint64_t)n;
    return 1;
}

static void *writer(void *arg)
{
    (void)arg;
    while (sent < out_bytes)
        write_some();
    shut_if_done();
    return NULL;
}

static int vsock_socket(int flags)
{
    int s = socket(AF_VSOCK, SOCK_STREAM | flags, 0);
    if (s < 0)
        fail("socket", errno);
    return s;
}

static struct sockaddr_vm host_addr(unsigned port)
{
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = VMADDR_CID_HOST;
    a.svm_port = port;
    return a;
}

static void run_blocking(unsigned port)
{
    fd = vsock_socket(0);
    struct sockaddr_vm a = host_addr(port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        fail("connect", errno);
    pthread_t t;
    if (pthread_create(&t, NULL, writer, NULL) != 0)
        fail("pthread_create", 0);
    while (!eof_seen)
        read_some();
    pthread_join(t, NULL);
}

/* Non-blocking connect: EINPROGRESS (or at once), writable, SO_ERROR 0. */
static void connect_nonblocking(unsigned port, int (*wait_writable)(void))
{
    fd = vsock_socket(SOCK_NONBLOCK);
    struct sockaddr_vm a = host_addr(port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        if (errno != EINPROGRESS)
            fail("connect", errno);
        if (!wait_writable())
            fail("connect-timeout", 0);
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            fail("getsockopt", errno);
        if (err != 0)
            fail("connect-so_error", err);
    }
}

static int poll_writable(void)
{
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int r = poll(&p, 1, WAIT_MS);
    if (r < 0)
        fail("poll", errno);
    return r > 0;
}

static void run_poll(unsigned port)
{
    connect_nonblocking(port, poll_writable);
    while (!eof_seen || sent < out_bytes) {
        struct pollfd p = {.fd = fd, .events = (short)(eof_seen ? 0 : POLLIN)};
        if (sent < out_bytes)
            p.events |= POLLOUT;
        int r = poll(&p, 1, WAIT_MS);
        if (r < 0)
            fail("poll", errno);
        if (r == 0)
            fail("poll-timeout", 0);
        if (p.revents & (POLLERR | POLLNVAL))
            fail("poll-error-event", 0);
        if (p.revents & POLLOUT)
            while (sent < out_bytes && write_some())
                ;
        shut_if_done();
        if (p.revents & (POLLIN | POLLHUP))
            while (!eof_seen && read_some())
                ;
    }
}

static int select_writable(void)
{
    fd_set w;
    FD_ZERO(&w);
    FD_SET(fd, &w);
    struct timeval tv = {.tv_sec = WAIT_MS / 1000};
    int r = select(fd + 1, NULL, &w, NULL, &tv);
    if (r < 0)
        fail("select", errno);
    return r > 0;
}

static void run_select(unsigned port)
{
    connect_nonblocking(port, select_writable);
    while (!eof_seen || sent < out_bytes) {
        fd_set r, w;
        FD_ZERO(&r);
        FD_ZERO(&w);
        if (!eof_seen)
            FD_SET(fd, &r);
        if (sent < out_bytes)
            FD_SET(fd, &w);
        struct timeval tv = {.tv_sec = WAIT_MS / 1000};
        int n = select(fd + 1, &r, &w, NULL, &tv);
        if (n < 0)
            fail("select", errno);
        if (n == 0)
            fail("select-timeout", 0);
        if (FD_ISSET(fd, &w))
            while (sent < out_bytes && write_some())
                ;
        shut_if_done();
        if (FD_ISSET(fd, &r))
            while (!eof_seen && read_some())
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
    fd = vsock_socket(SOCK_NONBLOCK);
    /* Registered before the connect: the registration must follow the fd. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.u64 = 0x5157};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        fail("epoll_ctl", errno);
    struct sockaddr_vm a = host_addr(port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        if (errno != EINPROGRESS)
            fail("connect", errno);
        if (!epoll_writable())
            fail("connect-timeout", 0);
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            fail("getsockopt", errno);
        if (err != 0)
            fail("connect-so_error", err);
    }
    /* Edge-triggered: drain both directions now, then after every event. */
    for (;;) {
        while (sent < out_bytes && write_some())
            ;
        shut_if_done();
        while (!eof_seen && read_some())
            ;
        if (eof_seen && sent == out_bytes)
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
    if (argc != 8) {
        fprintf(stderr, "usage: %s blocking|poll|select|epoll PORT OUT_BYTES OUT_SEED IN_BYTES IN_SEED CHUNK\n",
                argv[0]);
        return 2;
    }
    mode = argv[1];
    unsigned port = (unsigned)strtoul(argv[2], NULL, 10);
    out_bytes = strtoull(argv[3], NULL, 10);
    pattern_init(&out_pat, strtoull(argv[4], NULL, 10));
    in_bytes = strtoull(argv[5], NULL, 10);
    pattern_init(&in_pat, strtoull(argv[6], NULL, 10));
    chunk = (size_t)strtoul(argv[7], NULL, 10);
    if (chunk == 0)
        chunk = 65536;
    out_buf = malloc(chunk);
    in_buf = malloc(chunk);
    want_buf = malloc(chunk);
    if (!out_buf || !in_buf || !want_buf)
        fail("malloc", ENOMEM);

    double t0 = now_ms();
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
    if (close(fd) < 0)
        fail("close", errno);
    printf("DS-RESULT cmd=vsock-pattern mode=%s sent=%llu received=%llu bad=%llu ms=%.1f\n", mode,
           (unsigned long long)sent, (unsigned long long)received, (unsigned long long)bad, ms);
    fflush(stdout);
    return bad != 0;
}
