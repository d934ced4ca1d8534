/* What one wake-up costs on this machine: a byte goes to a thread asleep in poll() and
 * comes back, after the sender has slept `idle_us` (so both threads start the round trip
 * asleep, as a forwarding loop does between pings). Two wake-ups per round trip.
 *
 *     wake CPU_A CPU_B IDLE_US ROUNDS   ->  "median_us min_us"
 *
 * Built and run by bench/ping_hops.py; C, not Python, so that the number is the kernel's
 * and the machine's, not the interpreter's. */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int to_peer[2], to_main[2];

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void *peer(void *arg)
{
    char c;
    pin(*(int *)arg);
    for (;;) {
        struct pollfd p = {to_peer[0], POLLIN, 0};
        poll(&p, 1, -1);
        if (read(to_peer[0], &c, 1) != 1)
            return NULL;
        if (write(to_main[1], &c, 1) != 1)
            return NULL;
    }
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: wake CPU_A CPU_B IDLE_US ROUNDS\n");
        return 2;
    }
    int cpu_a = atoi(argv[1]), cpu_b = atoi(argv[2]), idle = atoi(argv[3]);
    int rounds = atoi(argv[4]);
    double *took = calloc(rounds > 0 ? rounds : 1, sizeof *took);
    pthread_t t;
    char c = 'x';
    if (rounds <= 0 || !took || pipe(to_peer) || pipe(to_main) ||
        pthread_create(&t, NULL, peer, &cpu_b)) {
        perror("wake");
        return 1;
    }
    pin(cpu_a);
    for (int i = 0; i < rounds; i++) {
        usleep(idle);
        double t0 = now_us();
        struct pollfd p = {to_main[0], POLLIN, 0};
        if (write(to_peer[1], &c, 1) != 1 || poll(&p, 1, -1) != 1 ||
            read(to_main[0], &c, 1) != 1) {
            perror("wake");
            return 1;
        }
        took[i] = now_us() - t0;
    }
    qsort(took, rounds, sizeof *took, cmp);
    printf("%.1f %.1f\n", took[rounds / 2], took[0]);
    return 0;
}
