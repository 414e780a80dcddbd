#!/usr/bin/env python3
"""A small seller application on KooAgent: licensed, metered, freezable. Standard library only.

    python3 examples/python/seller_app.py PRODUCT [METER]

It checks its license at start and serves while the license allows it: here "serving" is
one unit of work per SELLER_APP_INTERVAL seconds (default 1), each recorded as usage of
METER (default "requests") with `usage.record`. It watches the agent (`watch`): a freeze
or a release stops serving at once, an unfreeze or a renewal resumes it, without polling.
One line per change: "serving (...)" or "not serving: STATE (...)". Exit 2 when the agent
cannot be reached; SIGTERM stops it.
"""
import json
import os
import select
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check import Agent  # noqa: E402  (the request/answer client of check.py)


def watch_stream(path):
    """A dedicated connection carrying the `watch` stream (the protocol's rule)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rwb")
    f.write(json.dumps({"v": 1, "id": 1, "op": "watch", "params": {}}).encode() + b"\n")
    f.flush()
    return s, f


def check(agent, product):
    try:
        return agent.call("license.check", product=product)
    except RuntimeError as e:
        if str(e).startswith("no_license:"):
            return {"state": "no_license", "allowed": False, "reason": "no license installed"}
        raise


def main(argv):
    if len(argv) < 2:
        print("usage: seller_app.py PRODUCT [METER]", file=sys.stderr)
        return 2
    product = argv[1]
    meter = argv[2] if len(argv) > 2 else "requests"
    interval = float(os.environ.get("SELLER_APP_INTERVAL", "1"))
    agent = Agent()
    serving = None

    def decide(verdict):
        nonlocal serving
        allowed = bool(verdict.get("allowed"))
        if allowed != serving:
            serving = allowed
            if allowed:
                print("serving (license %s, state %s)" % (verdict.get("license_id"), verdict["state"]), flush=True)
            else:
                print("not serving: %s (%s)" % (verdict["state"], verdict.get("reason", "")), flush=True)

    try:
        sock, stream = watch_stream(agent.path)
        decide(check(agent, product))
        recorded = 0
        while True:
            ready, _, _ = select.select([sock], [], [], interval)
            if ready:
                line = stream.readline()
                if not line:
                    print("agent went away", file=sys.stderr)
                    return 2
                msg = json.loads(line)
                if not msg.get("ok"):
                    print("watch refused:", msg.get("error"), file=sys.stderr)
                    return 2
                # The event itself says what changed: license.check may answer a moment
                # later than the event arrives.
                ev = msg.get("event", {})
                if ev.get("product") == product:
                    decide({
                        "allowed": ev.get("state") in ("active", "grace"),
                        "state": ev.get("state"),
                        "license_id": ev.get("license_id"),
                        "reason": ev.get("reason", ""),
                    })
            elif serving:
                agent.call("usage.record", meter=meter, value="1")
                recorded += 1
                if recorded == 1:
                    print("recording usage of %s" % meter, flush=True)
    except (OSError, RuntimeError) as e:
        print("agent error:", e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
