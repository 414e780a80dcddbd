/* A small seller application on KooAgent, in C: licensed, metered, freezable.
 *
 * Build (from the repository root, after `cargo build --release -p kooagent-ffi`):
 *   cc -Wall -Wextra -o seller_app examples/c/seller_app.c -Iclient-ffi/include \
 *      target/release/libkooagent_ffi.a -lpthread -ldl -lm
 * Run:
 *   ./seller_app PRODUCT [METER]
 *
 * It checks its license at start and serves while the license allows it: here "serving"
 * is one unit of work per $SELLER_APP_INTERVAL seconds (default 1), each recorded as usage
 * of METER (default "requests"). A thread watches the agent (kooagent_watch): a freeze or
 * a release stops serving at once, an unfreeze or a renewal resumes it, without polling.
 * One line per change: "serving (...)" or "not serving: STATE". Exit 2 when the agent
 * cannot be reached.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "kooagent.h"

static const char *product;
static atomic_int serving = -1; /* -1: not decided yet */
static atomic_int watch_failed = 0;
static pthread_mutex_t decide_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *state_name(KooagentState s) {
    static const char *names[] = {"unknown", "valid", "grace", "expired", "not_yet_valid",
                                  "wrong_device", "bad_signature", "untrusted_key",
                                  "clock_rollback", "frozen", "no_license"};
    return (unsigned)s < sizeof names / sizeof names[0] ? names[s] : "unknown";
}

/* Asks the agent at start (license.check) and prints the verdict. */
static int decide(KooagentClient *agent) {
    KooagentCheck check;
    KooagentStatus st = kooagent_check(agent, product, NULL, &check);
    if (st != KOOAGENT_STATUS_OK) {
        fprintf(stderr, "check failed (%d): %s\n", st, kooagent_last_error());
        return -1;
    }
    pthread_mutex_lock(&decide_lock);
    if (check.allowed != atomic_load(&serving)) {
        atomic_store(&serving, check.allowed);
        if (check.allowed)
            printf("serving (license %s, state %s)\n", check.license_id, state_name(check.state));
        else
            printf("not serving: %s\n", state_name(check.state));
        fflush(stdout);
    }
    pthread_mutex_unlock(&decide_lock);
    return 0;
}

/* The value of string field `name` in a flat JSON event, or NULL (enough for the agent's
 * events, whose strings hold no escaped quotes; a real application uses its JSON parser). */
static const char *field(const char *json, const char *name, char *out, size_t len) {
    char key[64];
    snprintf(key, sizeof key, "\"%s\":\"", name);
    const char *p = strstr(json, key);
    if (!p)
        return NULL;
    p += strlen(key);
    const char *end = strchr(p, '"');
    if (!end || (size_t)(end - p) >= len)
        return NULL;
    memcpy(out, p, end - p);
    out[end - p] = 0;
    return out;
}

/* The event itself says what changed (license.check may answer a moment later). */
static int on_event(const char *event_json, void *userdata) {
    (void)userdata;
    char prod[128], state[32], id[128];
    if (!field(event_json, "product", prod, sizeof prod) || strcmp(prod, product) != 0)
        return 0;
    if (!field(event_json, "state", state, sizeof state))
        return 0;
    if (!field(event_json, "license_id", id, sizeof id))
        id[0] = 0;
    int allowed = strcmp(state, "active") == 0 || strcmp(state, "grace") == 0;
    pthread_mutex_lock(&decide_lock);
    if (allowed != atomic_load(&serving)) {
        atomic_store(&serving, allowed);
        if (allowed)
            printf("serving (license %s, state %s)\n", id, state);
        else
            printf("not serving: %s\n", state);
        fflush(stdout);
    }
    pthread_mutex_unlock(&decide_lock);
    return 0;
}

static void *watcher(void *arg) {
    (void)arg;
    KooagentStatus st = kooagent_watch(NULL, NULL, on_event, NULL);
    if (st != KOOAGENT_STATUS_OK)
        fprintf(stderr, "watch failed (%d): %s\n", st, kooagent_last_error());
    atomic_store(&watch_failed, 1);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PRODUCT [METER]\n", argv[0]);
        return 2;
    }
    product = argv[1];
    const char *meter = argc > 2 ? argv[2] : "requests";
    const char *iv = getenv("SELLER_APP_INTERVAL");
    double interval = iv ? atof(iv) : 1.0;
    struct timespec pause = {(time_t)interval, (long)((interval - (time_t)interval) * 1e9)};

    KooagentClient *agent = kooagent_open(NULL);
    if (!agent || decide(agent) != 0)
        return 2;
    pthread_t t;
    if (pthread_create(&t, NULL, watcher, NULL) != 0)
        return 2;
    long recorded = 0;
    while (!atomic_load(&watch_failed)) {
        nanosleep(&pause, NULL);
        if (atomic_load(&serving) != 1)
            continue;
        KooagentStatus st = kooagent_record_usage(agent, meter, "1");
        if (st != KOOAGENT_STATUS_OK) {
            fprintf(stderr, "usage not recorded (%d): %s\n", st, kooagent_last_error());
            return 2;
        }
        if (++recorded == 1) {
            printf("recording usage of %s\n", meter);
            fflush(stdout);
        }
    }
    kooagent_close(agent);
    return 2;
}
