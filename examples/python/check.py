#!/usr/bin/env python3
"""The seller's software asking KooAgent whether it may run: Python, standard library only.

    python3 examples/python/check.py PRODUCT [FEATURE [METER VALUE]]

Exit status: 0 allowed, 1 refused (the license state is printed), 2 agent unreachable/error.
"""
import json
import os
import socket
import sys


class Agent:
    """One connection to the agent; reconnects once if the agent restarted."""

    def __init__(self, path=None):
        self.path = path or os.environ.get("KOOAGENT_SOCKET") or "/run/kooagent/agent.sock"
        self.next_id = 1
        self.file = None

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(self.path)
        self.file = s.makefile("rwb")

    def call(self, op, **params):
        read_only = op in ("ping", "agent.status", "device.code", "license.check", "license.status")
        for attempt in (1, 2):
            if self.file is None:
                self._connect()
            request_id, self.next_id = self.next_id, self.next_id + 1
            line = json.dumps({"v": 1, "id": request_id, "op": op, "params": params})
            try:
                self.file.write(line.encode() + b"\n")
                self.file.flush()
                answer = self.file.readline()
                if not answer:
                    raise ConnectionError("agent closed the connection")
            except (OSError, ConnectionError):
                self.file = None
                if attempt == 2 or not read_only:
                    raise
                continue
            answer = json.loads(answer)
            if answer["ok"]:
                return answer["result"]
            raise RuntimeError("%s: %s" % (answer["error"]["code"], answer["error"]["message"]))


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    product = argv[1]
    feature = argv[2] if len(argv) > 2 and argv[2] else None
    agent = Agent()
    try:
        print("device code:", agent.call("device.code")["code"])
        params = {"product": product}
        if feature:
            params["feature"] = feature
        try:
            check = agent.call("license.check", **params)
        except RuntimeError as e:
            if not str(e).startswith("no_license:"):
                raise
            check = {"state": "no_license", "allowed": False}
    except (OSError, RuntimeError) as e:
        print("agent error:", e, file=sys.stderr)
        return 2
    print("state:", check["state"], "allowed:", check.get("allowed"), "days_left:", check.get("days_left"))
    if check.get("allowed") and len(argv) > 4:
        try:
            agent.call("usage.record", meter=argv[3], value=argv[4])
        except (OSError, RuntimeError) as e:
            print("usage not recorded:", e, file=sys.stderr)
            return 2
        print("recorded", argv[3], argv[4])
    return 0 if check.get("allowed") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
