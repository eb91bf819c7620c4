/* A tool that is inside six nested signal handlers across a checkpoint (tests/checkpoint/test_restore_tracking.py).

The test stops it, queues SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2 and SIGALRM, and checkpoints it. A restore then
delivers all six before CRIU's SIGSTOP (each numbered below SIGSTOP): the kernel writes six nested frames on the
stack before the restored tree is armed for dirty tracking. Once resumed, the innermost handler (SIGALRM's, the last
frame set up) writes "inside" and waits for "leave" while the test checkpoints it again; the frames above it are not
written meanwhile. After a restore from that checkpoint, the handlers return one by one through their frames.

Each handler checks that the context the kernel saved for it (its ucontext and the start of its FPU state) is the
same when it returns as when it began: "badframe" otherwise. 16 MiB of patterned memory is checked at the end. Exits
0 when all six handlers ran and returned and all of it held, else 3 (or dies, from a frame that was lost). */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define WORDS ((16u << 20) / 8)
#define MIX 0x9E3779B97F4A7C15ull

static const int SIGNALS[] = {SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM};
static volatile sig_atomic_t entered, left, depth;

static int exists(const char *name) { return access(name, F_OK) == 0; }

static void touch(const char *name) {
    FILE *f = fopen(name, "w");
    if (f)
        fclose(f);
}

static void nap(void) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

static uint64_t digest(const unsigned char *lo, const unsigned char *hi) {
    uint64_t h = 1469598103934665603ull;
    for (const unsigned char *p = lo; p < hi; p++)
        h = (h ^ *p) * 1099511628211ull;
    return h;
}

static void handler(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = ctx;
    const unsigned char *lo = (const unsigned char *)uc;
    const unsigned char *hi = (const unsigned char *)uc->uc_mcontext.fpregs + 512; /* the FXSAVE part */
    uint64_t at_entry = digest(lo, hi);
    (void)sig;
    (void)info;
    entered++;
    if (depth++ == 0) {
        touch("inside");
        while (!exists("leave"))
            nap();
    }
    if (digest(lo, hi) != at_entry)
        touch("badframe");
    depth--;
    left++;
}

int main(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    for (unsigned i = 0; i < sizeof SIGNALS / sizeof SIGNALS[0]; i++)
        sigaction(SIGNALS[i], &sa, NULL);
    uint64_t *mem = malloc(WORDS * 8);
    if (!mem)
        return 2;
    for (uint64_t i = 0; i < WORDS; i++)
        mem[i] = i * MIX;
    touch("ready");
    while (!exists("stop"))
        nap();
    uint64_t bad = 0;
    for (uint64_t i = 0; i < WORDS; i++)
        bad += mem[i] != i * MIX;
    printf("entered=%d left=%d bad_words=%llu badframe=%d\n", (int)entered, (int)left, (unsigned long long)bad,
           exists("badframe"));
    return entered == 6 && left == 6 && bad == 0 && !exists("badframe") ? 0 : 3;
}
