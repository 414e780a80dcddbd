#!/bin/sh
# Soak: kill -9 the agent CYCLES times during mixed usage ingest (single records and
# batches, 8 clients) against the usage-data stand-in of tests/e2e, then check that nothing
# acknowledged is missing, that the stand-in received exactly what the ledger holds, and
# count metering_sn received more than once. Prints one summary line; exits non-zero on a
# loss.
#   scripts/soak.sh            # 200 cycles (the long run; docs/operations.md has its result)
#   CYCLES=10 scripts/soak.sh  # the bounded run CI makes (scripts/test.sh)
set -eu
cd "$(dirname "$0")/.."
CYCLES=${CYCLES:-200}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
KOOAGENT_SOAK_CYCLES=$CYCLES cargo test -p kooagent --all-features --test e2e \
    usage::soak_kill9_cycles_during_mixed_ingest_lose_nothing_acknowledged -- --exact --nocapture \
    >"$log" 2>&1 || rc=$?
grep -E "^soak:|panicked|acked|test result" "$log" || cat "$log"
exit $rc
