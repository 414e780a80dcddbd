/* Reacting to freeze / unfreeze at once instead of polling: kooagent_watch streams every
 * state change of every license (the current state first).
 *
 * Build like check.c; run: ./watch N   (prints N events as JSON lines, then exits 0)
 */
#include <stdio.h>
#include <stdlib.h>
#include "kooagent.h"

static int on_event(const char *event_json, void *userdata) {
    int *left = userdata;
    printf("%s\n", event_json);
    fflush(stdout);
    return --*left <= 0; /* non-zero stops watching */
}

int main(int argc, char **argv) {
    int left = argc > 1 ? atoi(argv[1]) : 1;
    KooagentStatus st = kooagent_watch(NULL, NULL, on_event, &left);
    if (st != KOOAGENT_STATUS_OK) {
        fprintf(stderr, "watch failed (%d): %s\n", st, kooagent_last_error());
        return 2;
    }
    return 0;
}
