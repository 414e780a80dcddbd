#!/bin/sh
# The seller's start script asking KooAgent whether the software may run, with socat.
#   examples/shell/check.sh PRODUCT [FEATURE]
# Exit status: 0 allowed, 1 refused, 2 agent unreachable/error.
set -u
SOCK=${KOOAGENT_SOCKET:-/run/kooagent/agent.sock}
PRODUCT=$1
FEATURE=${2:-}
if [ -n "$FEATURE" ]; then
    PARAMS="{\"product\":\"$PRODUCT\",\"feature\":\"$FEATURE\"}"
else
    PARAMS="{\"product\":\"$PRODUCT\"}"
fi
ANSWER=$(printf '{"v":1,"id":1,"op":"license.check","params":%s}\n' "$PARAMS" \
    | socat -t 5 - UNIX-CONNECT:"$SOCK") || { echo "agent unreachable at $SOCK" >&2; exit 2; }
case $ANSWER in
    *'"code":"no_license"'*) echo "refused: no license installed for $PRODUCT"; exit 1 ;;
    *'"ok":false'*) echo "agent error: $ANSWER" >&2; exit 2 ;;
    *'"allowed":true'*) echo "allowed: $ANSWER"; exit 0 ;;
    *) echo "refused: $ANSWER"; exit 1 ;;
esac
