/* The cached license check in C: answers from memory, kept fresh by a background thread
 * that follows the agent's `watch` stream (docs/integration.md, "Cached checks").
 *
 * Build (from the repository root, after `cargo build --release -p kooagent-ffi`):
 *   cc -Wall -Wextra -o cached examples/c/cached.c -Iclient-ffi/include \
 *      target/release/libkooagent_ffi.a -lpthread -ldl -lm
 * Run:
 *   ./cached PRODUCT [FEATURE]
 * then one command per line on stdin, one line of output each:
 *   check      the cached answer and, for comparison, the socket's (kooagent_check)
 *   until 0|1  polls the cached answer every millisecond until `allowed` is that value
 *              (at most 15 s), then prints it
 *   fork       a child process finds the inherited handle refused (KOOAGENT_STATUS_ERR_FORKED)
 *              and opens its own
 *   quit
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "kooagent.h"

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void print(const char *what, KooagentStatus st, const KooagentCheck *c, int live) {
    if (st != KOOAGENT_STATUS_OK)
        printf("%s status: %d live: %d error: %s\n", what, st, live, kooagent_last_error());
    else
        printf("%s status: 0 live: %d state: %d allowed: %d days_left: %lld license: %s\n", what,
               live, c->state, c->allowed, (long long)c->days_left, c->license_id);
}

/* Waits for the cached client's stream to be up (at most 15 s). */
static int wait_live(KooagentCachedClient *cache) {
    for (int i = 0; i < 15000 && !kooagent_cached_is_live(cache); i++)
        sleep_ms(1);
    return kooagent_cached_is_live(cache);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PRODUCT [FEATURE]\n", argv[0]);
        return 2;
    }
    const char *product = argv[1];
    const char *feature = argc > 2 && argv[2][0] ? argv[2] : NULL;
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* NULL: $KOOAGENT_SOCKET, /run/kooagent/agent.sock, or the per-user socket. */
    KooagentCachedClient *cache = kooagent_cached_open(NULL);
    KooagentClient *plain = kooagent_open(NULL);
    if (!cache || !plain) {
        fprintf(stderr, "cannot create a client\n");
        return 2;
    }
    printf("live: %d\n", wait_live(cache));

    char line[64];
    KooagentCheck c;
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "check", 5) == 0) {
            KooagentStatus st = kooagent_cached_check(cache, product, feature, &c);
            print("cached", st, &c, kooagent_cached_is_live(cache));
            st = kooagent_check(plain, product, feature, &c);
            print("socket", st, &c, 0);
        } else if (strncmp(line, "until ", 6) == 0) {
            int want = atoi(line + 6);
            KooagentStatus st = KOOAGENT_STATUS_OK;
            for (int i = 0; i < 15000; i++) {
                st = kooagent_cached_check(cache, product, feature, &c);
                if (st == KOOAGENT_STATUS_OK && c.allowed == want)
                    break;
                sleep_ms(1);
            }
            print("cached", st, &c, kooagent_cached_is_live(cache));
        } else if (strncmp(line, "fork", 4) == 0) {
            pid_t pid = fork();
            if (pid == 0) {
                /* The parent's handle: its thread stayed in the parent. */
                KooagentStatus st = kooagent_cached_check(cache, product, feature, &c);
                kooagent_cached_close(cache);
                KooagentCachedClient *own = kooagent_cached_open(NULL);
                int live = wait_live(own);
                KooagentStatus st2 = kooagent_cached_check(own, product, feature, &c);
                printf("child inherited: %d own live: %d own status: %d allowed: %d\n", st, live,
                       st2, c.allowed);
                kooagent_cached_close(own);
                _exit(0);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            printf("parent live: %d child exit: %d\n", kooagent_cached_is_live(cache),
                   WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        }
    }
    kooagent_cached_close(cache);
    kooagent_close(plain);
    return 0;
}
