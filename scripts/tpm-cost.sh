#!/usr/bin/env bash
# The cost of a TPM 2.0 NV monotonic counter (issue 14 item 11, docs/threat-model.md "TPM 2.0
# anchor"): starts a software TPM (Debian `swtpm`) on a Unix socket in a temporary
# directory, defines an owner-authorised NV counter and times TPM2_NV_Increment and
# TPM2_NV_Read spoken as raw TPM2 commands (what the agent would send to /dev/tpmrm0: no
# TSS library). Not part of CI. Needs: apt-get install swtpm; python3.
set -euo pipefail
command -v swtpm >/dev/null || { echo "swtpm is not installed (apt-get install swtpm)" >&2; exit 1; }
dir=$(mktemp -d)
mkdir "$dir/state"
swtpm socket --tpm2 --tpmstate dir="$dir/state" \
    --server type=unixio,path="$dir/tpm.sock" --ctrl type=unixio,path="$dir/tpm.sock.ctrl" \
    --flags not-need-init,startup-clear &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 50); do [ -S "$dir/tpm.sock" ] && break; sleep 0.1; done
python3 - "$dir/tpm.sock" "${N:-500}" <<'PY'
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); n = int(sys.argv[2])
IDX, OWNER, RS_PW = 0x01800100, 0x40000001, 0x40000009
PW = struct.pack(">IHBH", RS_PW, 0, 0, 0)          # empty-password session
def cmd(cc, handles, params=b"", sessions=True):
    body = b"".join(struct.pack(">I", h) for h in handles)
    if sessions: body += struct.pack(">I", len(PW)) + PW
    body += params
    s.sendall(struct.pack(">HII", 0x8002 if sessions else 0x8001, 10 + len(body), cc) + body)
    tag, size, rc = struct.unpack(">HII", s.recv(10))
    rest = b""
    while len(rest) < size - 10: rest += s.recv(size - 10 - len(rest))
    if rc: sys.exit(f"TPM command {cc:#x} failed: {rc:#x}")
    return rest
# TPM2_NV_DefineSpace: 8-byte counter, owner read/write (TPM_NT_COUNTER = 1 << 4).
attrs = (1 << 4) | (1 << 1) | (1 << 17)
pub = struct.pack(">IHIHH", IDX, 0x000B, attrs, 0, 8)
cmd(0x12A, [OWNER], struct.pack(">H", 0) + struct.pack(">H", len(pub)) + pub)
read = lambda: struct.unpack(">Q", cmd(0x14E, [OWNER, IDX], struct.pack(">HH", 8, 0))[6:14])[0]
cmd(0x134, [OWNER, IDX])                            # a counter reads only once incremented
v0 = read(); t = time.perf_counter()
for _ in range(n): cmd(0x134, [OWNER, IDX])
inc = (time.perf_counter() - t) / n; t = time.perf_counter()
for _ in range(n): read()
rd = (time.perf_counter() - t) / n
print(f"swtpm NV counter: {v0} -> {read()}; TPM2_NV_Increment {inc*1e3:.3f} ms, "
      f"TPM2_NV_Read {rd*1e3:.3f} ms (mean of {n})")
PY
