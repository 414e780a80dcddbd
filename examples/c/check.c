/* The seller's software asking KooAgent whether it may run, in C.
 *
 * Build (from the repository root, after `cargo build --release -p kooagent-ffi`):
 *   cc -Wall -Wextra -o check examples/c/check.c -Iclient-ffi/include \
 *      target/release/libkooagent_ffi.a -lpthread -ldl -lm
 * Run:
 *   ./check PRODUCT [FEATURE [METER VALUE]]
 * Exit status: 0 allowed, 1 refused (license state printed), 2 agent unreachable/error.
 */
#include <stdio.h>
#include <stdlib.h>
#include "kooagent.h"

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PRODUCT [FEATURE [METER VALUE]]\n", argv[0]);
        return 2;
    }
    const char *product = argv[1];
    const char *feature = argc > 2 && argv[2][0] ? argv[2] : NULL;

    /* NULL: $KOOAGENT_SOCKET, /run/kooagent/agent.sock, or the per-user socket. */
    KooagentClient *agent = kooagent_open(NULL);
    if (!agent) {
        fprintf(stderr, "cannot create a client\n");
        return 2;
    }

    char code[32];
    if (kooagent_device_code(agent, code, sizeof code) == KOOAGENT_STATUS_OK)
        printf("device code: %s\n", code);

    KooagentCheck check;
    KooagentStatus st = kooagent_check(agent, product, feature, &check);
    if (st != KOOAGENT_STATUS_OK) {
        fprintf(stderr, "check failed (%d): %s\n", st, kooagent_last_error());
        kooagent_close(agent);
        return 2;
    }
    printf("state: %d allowed: %d days_left: %lld license: %s\n", check.state, check.allowed,
           (long long)check.days_left, check.license_id);

    if (check.allowed && argc > 4) {
        st = kooagent_record_usage(agent, argv[3], argv[4]);
        if (st != KOOAGENT_STATUS_OK) {
            fprintf(stderr, "usage not recorded (%d): %s\n", st, kooagent_last_error());
            kooagent_close(agent);
            return 2;
        }
        printf("recorded %s %s\n", argv[3], argv[4]);
    }
    kooagent_close(agent);
    return check.allowed ? 0 : 1;
}
