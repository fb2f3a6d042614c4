/* Event generators for probe benchmarks: each runs a tight loop of one kind of kernel event
 * and prints the loop's cost in nanoseconds per iteration (CLOCK_MONOTONIC).
 *
 *   events futex N SECONDS     N threads: FUTEX_WAIT_PRIVATE on a mismatched value (returns
 *                               EAGAIN at once): a wait-type futex op that never sleeps
 *   events switch SECONDS      two threads ping-pong over pipes: two context switches a round
 *   events send SECONDS        send()+recv() of 64 bytes over a loopback TCP connection
 *   events nop SECONDS         getppid(): a syscall no probe watches (for the syscalls:* cost)
 *   events spin SECONDS        a loop in user space, no syscalls: CPU ticks that land in user mode
 *
 *   events io SECONDS PATH      4 KiB O_DIRECT writes to PATH (one block request each)
 *
 * With SF_WAIT=1 in the environment it prints its pid and waits for a line on stdin first, so
 * a benchmark can set up probes for it. Output: one JSON line {"mode", "iterations",
 * "ns_per_iter"}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double seconds;
static atomic_long total;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void *futex_loop(void *arg) {
    (void)arg;
    uint32_t word = 0;
    long n = 0;
    uint64_t end = now_ns() + (uint64_t)(seconds * 1e9);
    while (1) {
        for (int i = 0; i < 1000; i++)
            syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 1, NULL, NULL, 0);
        n += 1000;
        if (now_ns() >= end) break;
    }
    atomic_fetch_add(&total, n);
    return NULL;
}

static int p1[2], p2[2];
static void *pong(void *arg) {
    (void)arg;
    char c;
    while (read(p1[0], &c, 1) == 1) {
        if (c == 'q') break;
        if (write(p2[1], &c, 1) != 1) break;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: events futex N SECONDS | switch SECONDS | send SECONDS | nop SECONDS "
                        "| spin SECONDS | io SECONDS PATH\n");
        return 2;
    }
    const char *mode = argv[1];
    long iters = 0;
    if (getenv("SF_WAIT")) {
        printf("%d\n", getpid());
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof(line), stdin)) return 1;
    }
    uint64_t t0, t1;
    if (!strcmp(mode, "futex")) {
        int n = atoi(argv[2]);
        seconds = atof(argv[3]);
        pthread_t th[64];
        t0 = now_ns();
        for (int i = 0; i < n && i < 64; i++) pthread_create(&th[i], NULL, futex_loop, NULL);
        for (int i = 0; i < n && i < 64; i++) pthread_join(th[i], NULL);
        t1 = now_ns();
        iters = atomic_load(&total);
        printf("{\"mode\": \"futex\", \"threads\": %d, \"iterations\": %ld, \"ns_per_iter\": %.2f, "
               "\"ops_per_s\": %.0f}\n", n, iters, (double)(t1 - t0) * n / iters,
               iters / ((t1 - t0) / 1e9));
        return 0;
    }
    seconds = atof(argv[2]);
    uint64_t end;
    if (!strcmp(mode, "switch")) {
        if (pipe(p1) || pipe(p2)) return 1;
        pthread_t th;
        pthread_create(&th, NULL, pong, NULL);
        char c = 'x';
        t0 = now_ns();
        end = t0 + (uint64_t)(seconds * 1e9);
        do {
            for (int i = 0; i < 200; i++) {
                if (write(p1[1], &c, 1) != 1 || read(p2[0], &c, 1) != 1) return 1;
            }
            iters += 200;
        } while (now_ns() < end);
        t1 = now_ns();
        c = 'q';
        if (write(p1[1], &c, 1) != 1) return 1;
        pthread_join(th, NULL);
    } else if (!strcmp(mode, "send")) {
        int srv = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof(a);
        bind(srv, (struct sockaddr *)&a, sizeof(a));
        listen(srv, 1);
        getsockname(srv, (struct sockaddr *)&a, &len);
        int cli = socket(AF_INET, SOCK_STREAM, 0);
        int one = 1;
        setsockopt(cli, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(cli, (struct sockaddr *)&a, sizeof(a))) return 1;
        int con = accept(srv, NULL, NULL);
        char buf[64] = {0};
        t0 = now_ns();
        end = t0 + (uint64_t)(seconds * 1e9);
        do {
            for (int i = 0; i < 200; i++) {
                if (send(cli, buf, sizeof(buf), 0) != sizeof(buf)) return 1;
                if (recv(con, buf, sizeof(buf), MSG_WAITALL) != sizeof(buf)) return 1;
            }
            iters += 200;
        } while (now_ns() < end);
        t1 = now_ns();
    } else if (!strcmp(mode, "io")) {
        int fd = open(argv[3], O_WRONLY | O_CREAT | O_DIRECT, 0600);
        if (fd < 0) return 1;
        void *buf;
        if (posix_memalign(&buf, 4096, 4096)) return 1;
        memset(buf, 1, 4096);
        t0 = now_ns();
        end = t0 + (uint64_t)(seconds * 1e9);
        do {
            for (int i = 0; i < 20; i++)
                if (pwrite(fd, buf, 4096, (off_t)(i % 16) * 4096) != 4096) return 1;
            iters += 20;
        } while (now_ns() < end);
        t1 = now_ns();
        close(fd);
        unlink(argv[3]);
    } else if (!strcmp(mode, "spin")) {
        volatile uint64_t x = 0;
        t0 = now_ns();
        end = t0 + (uint64_t)(seconds * 1e9);
        do {
            for (int i = 0; i < 100000; i++) x += i;
            iters += 100000;
        } while (now_ns() < end);
        t1 = now_ns();
    } else if (!strcmp(mode, "nop")) {
        t0 = now_ns();
        end = t0 + (uint64_t)(seconds * 1e9);
        do {
            for (int i = 0; i < 1000; i++) syscall(SYS_getppid);
            iters += 1000;
        } while (now_ns() < end);
        t1 = now_ns();
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    printf("{\"mode\": \"%s\", \"iterations\": %ld, \"ns_per_iter\": %.2f}\n", mode, iters,
           (double)(t1 - t0) / iters);
    return 0;
}
