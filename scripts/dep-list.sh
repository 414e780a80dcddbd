#!/usr/bin/env bash
# The committed dependency lists (deps/*.txt): every crate each shipped artifact builds from,
# with its version, from `cargo tree` on the locked tree (normal and build dependencies, the
# host target). A new, removed or bumped crate changes a list, so it shows in review.
#
#   bash scripts/dep-list.sh           # rewrites deps/*.txt
#   bash scripts/dep-list.sh --check   # fails when a list differs from the tree (scripts/test.sh)
#
# It also holds kooagent-core to its rule: no I/O crates (docs/architecture.md).
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
[ "${1:-}" = "--check" ] && check=1

list() { # file, cargo tree arguments...
    local file=$1
    shift
    {
        echo "# cargo tree $* (bash scripts/dep-list.sh rewrites this file)"
        "${CARGO:-cargo}" tree --locked -e normal,build --prefix none --format '{p}' "$@" |
            sed -E 's/ \([^)]*\)//g' | sort -u
    } >"$tmp/$file"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
list kooagent.txt -p kooagent
list kooagent-seller.txt -p kooagent-seller
list kooagent-core.txt -p kooagent-core
list kooagent-edge.txt -p kooagent-edge
list kooagent-ffi.txt -p kooagent-ffi
list kooagent-install.txt -p kooagent-install

# Values in, values out: these crates do I/O (or are the raw system interface).
if grep -E '^(tokio|ureq|hyper|libc|rustix|getrandom|mio|socket2|rusqlite|postgres) ' "$tmp/kooagent-core.txt"; then
    echo "dep-list: kooagent-core depends on an I/O crate (above); it must not" >&2
    exit 1
fi

if [ $check = 1 ]; then
    if ! diff -ru deps "$tmp" --exclude=README.md; then
        echo "dep-list: the dependency lists in deps/ differ from the tree (diff above);" >&2
        echo "          run bash scripts/dep-list.sh and commit deps/ with the change" >&2
        exit 1
    fi
    echo "dep-list: deps/ matches the tree"
else
    cp "$tmp"/*.txt deps/
    echo "dep-list: wrote $(ls "$tmp" | wc -l) lists to deps/"
fi
