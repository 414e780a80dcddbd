#!/usr/bin/env bash
# A throw-away PostgreSQL for the seller server's storage tests. Source it:
#
#     . scripts/pg-test.sh      # installs Debian's postgresql if missing, starts a cluster
#     cargo test ...            # the tests see KOOAGENT_TEST_PG_URL and run on PostgreSQL too
#
# The cluster listens on a Unix socket only (no TCP port), under $KOOAGENT_PG_DIR
# (default /tmp/kooagent-pg), trusts local connections, and runs without fsync: test data
# only. Running it again reuses a running cluster. Stop it with
# `runuser -u postgres -- "$PGBIN/pg_ctl" -D "$KOOAGENT_PG_DIR/data" stop`.
# Needs root (apt-get, and initdb must run as the postgres user).

kooagent_pg_setup() {
    set -e
    local dir="${KOOAGENT_PG_DIR:-/tmp/kooagent-pg}"
    if ! ls -d /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
        echo "== installing postgresql (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    export PGBIN
    mkdir -p "$dir"
    chown postgres: "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        runuser -u postgres -- "$PGBIN/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
    fi
    if ! runuser -u postgres -- "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
            -o "-k $dir -c listen_addresses='' -c fsync=off -c max_connections=200" start >/dev/null
    fi
    if ! runuser -u postgres -- "$PGBIN/psql" -h "$dir" -U postgres -Atqc \
        "SELECT 1 FROM pg_database WHERE datname = 'kooagent_test'" | grep -q 1; then
        runuser -u postgres -- "$PGBIN/createdb" -h "$dir" -U postgres kooagent_test
    fi
    export KOOAGENT_TEST_PG_URL="host=$dir user=postgres dbname=kooagent_test"
    echo "== PostgreSQL for tests: KOOAGENT_TEST_PG_URL=\"$KOOAGENT_TEST_PG_URL\""
    set +e
}

kooagent_pg_setup
