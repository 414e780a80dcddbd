//! Crash consistency, proven by replay (issue 14 item 2; SQLite's crash tests and the
//! ALICE paper are the model). The agent runs a workload under `strace`; every create,
//! write, truncate, rename, unlink and fsync it makes under the state directory is replayed
//! (crash_trace.rs, crash_model.rs) into crash states — for each point, everything so far
//! (a kill -9), only what was fsynced (a power cut), and the write at the point torn in
//! half — and the agent is started on each. It must come up; every request acknowledged
//! before the point must hold (usage counted exactly once, the license installed, the
//! freeze in force, the same device code); no state file may be unreadable
//! (quarantined) and a crash is not tampering. A damaged file must be reported, not
//! ignored: the log names it.
//!
//! Bounded: CI checks `KOOAGENT_CRASH_STATES` states (default 24) drawn with a printed
//! seed (`KOOAGENT_CRASH_SEED` replays a run); `KOOAGENT_CRASH_STATES=all` is the full
//! sweep (docs/operations.md, "Crash consistency").

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::crash_model::{crash_states, tree_of, CrashState, Kind, Tree};
use crate::crash_trace::{self, Op};
use crate::harness::{Conn, TestAgent, BIN};
use crate::license::Seller;

/// What one acknowledged request promised.
#[derive(Debug, Clone)]
enum Promise {
    Code(String),
    License,
    /// Usage of `cpu`, in 10^-9 units.
    Usage(u64),
    /// A batch of this many units on every bulk meter.
    Batch(u64),
    Frozen,
}

/// One connection whose request ids (1, 2, ...) are remembered with their promises.
struct Client {
    conn: Conn,
    id: u64,
    promises: Vec<(u64, Promise)>,
}

impl Client {
    fn call(&mut self, op: &str, params: Value, promise: Option<Promise>) -> Value {
        self.id += 1;
        if let Some(p) = promise {
            self.promises.push((self.id, p));
        }
        self.conn
            .call(op, params)
            .unwrap_or_else(|e| panic!("{op}: {e}"))
    }
}

/// strace does not pass a SIGTERM on to the agent: on a failure half-way, kill the agent
/// itself so strace (and the test) can end.
struct KillOnPanic(i32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: the agent this test started under strace.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// The agent strace (`pid`) started: its only child.
fn agent_pid(strace: u32) -> i32 {
    let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
        .unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("strace started the agent")
}

/// splitmix64: a seeded sampler without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bulk meters: a batch with one record on each writes one ledger entry per meter in one
/// group, so a few batches fill a segment and the ledger compacts (at a quarter of
/// `max_bytes`, 1 MiB here, the least it takes).
const BULK: usize = 100;

fn bulk_meter(i: usize) -> String {
    format!("bulk{i:03}")
}

fn config(seller: &Seller) -> String {
    let mut c = format!(
        "{}[usage]\nmax_bytes = 1048576\n[usage.meters.cpu]\ninstance_id = \"inst-cpu\"\n",
        seller.config()
    );
    for i in 0..BULK {
        c.push_str(&format!(
            "[usage.meters.{m}]\ninstance_id = \"inst-{m}-with-a-long-instance-identifier\"\n",
            m = bulk_meter(i)
        ));
    }
    c
}

fn units_text(u: u64) -> String {
    format!("{}.{:09}", u / 1_000_000_000, u % 1_000_000_000)
}

/// A `usage.status` amount in 10^-9 units; absent is none.
fn units_of(v: &Value) -> u64 {
    match v.as_str() {
        None => 0,
        Some(t) => kooagent::usage::decimal::parse(t)
            .map(|d| d.0 as u64)
            .unwrap_or(u64::MAX),
    }
}

fn now() -> i64 {
    kooagent::clock::Clock::now_secs(&kooagent::clock::SystemClock)
}

/// Runs the workload on a fresh state directory under strace: the trace, the promise of
/// every request by id, and the state directory's path.
fn traced_workload(seller: &Seller, a: &mut TestAgent) -> (String, Vec<(u64, Promise)>) {
    let trace = a.dir.path().join("strace.log");
    let log = std::fs::File::create(a.dir.path().join("agent.log")).unwrap();
    let child = Command::new("strace")
        .args(["-f", "-qq", "-y", "-xx", "-s", "4194304", "-e"])
        .arg(format!("trace={}", crash_trace::SYSCALLS))
        .arg("-o")
        .arg(&trace)
        .arg(BIN.path())
        .args(["run", "--config"])
        .arg(&a.config)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("strace runs (scripts/deps.sh installs it)");
    a.child = Some(child);
    a.wait_ready();
    let agent = agent_pid(a.child.as_ref().unwrap().id());
    let _guard = KillOnPanic(agent);
    let mut w = Client {
        conn: Conn::open(&a.socket),
        id: 0,
        promises: Vec::new(),
    };
    let code = w.call("device.code", json!({}), None)["code"]
        .as_str()
        .unwrap()
        .to_string();
    w.promises.push((w.id, Promise::Code(code.clone())));
    let lic = seller.bound(
        &code,
        "p",
        &[
            "--days",
            "30",
            "--id",
            "L-C",
            "--not-before",
            &crate::license::utc_in(-60),
            "--issued-at",
            &crate::license::utc_in(-3600),
        ],
    );
    w.call(
        "license.install",
        json!({"text": lic}),
        Some(Promise::License),
    );
    // Single records, then batches until the ledger compacts once (a snapshot segment
    // installed by rename, the old one deleted), then single records again. Every request
    // carries a distinct amount, so a record counted twice cannot pass for the one in
    // flight.
    let at = now() - 2 * 3600;
    let mut n = 0u64;
    let record = |w: &mut Client, n: &mut u64| {
        *n += 1;
        w.call(
            "usage.record",
            json!({"meter": "cpu", "value": units_text(*n), "at": at}),
            Some(Promise::Usage(*n)),
        );
    };
    for _ in 0..3 {
        record(&mut w, &mut n);
    }
    let mut k = 0u64;
    loop {
        k += 1;
        assert!(k < 200, "the ledger never compacted");
        let records: Vec<Value> = (0..BULK)
            .map(|i| json!({"meter": bulk_meter(i), "value": units_text(k), "at": at}))
            .collect();
        w.call(
            "usage.record_batch",
            json!({"records": records}),
            Some(Promise::Batch(k)),
        );
        let st = w.call("usage.status", json!({}), None);
        if st["ledger"]["rotations"].as_u64().unwrap_or(0) > 0 {
            break;
        }
    }
    for _ in 0..3 {
        record(&mut w, &mut n);
    }
    let token = crate::freeze::token(
        seller,
        "L-C",
        "freeze",
        1,
        &["--issued-at", &crate::license::utc_in(-1800)],
    );
    w.call(
        "token.apply",
        json!({"token": token}),
        Some(Promise::Frozen),
    );
    record(&mut w, &mut n);
    let Client {
        conn: c, promises, ..
    } = w;
    drop(c);
    // Stop the agent itself (strace passes its exit on); its shutdown writes are crash
    // points too.
    // SAFETY: the agent is our grandchild, started above.
    unsafe { libc::kill(agent, libc::SIGTERM) };
    let status = a.child.take().unwrap().wait().unwrap();
    assert!(
        status.success(),
        "agent under strace: {status}\n{}",
        a.log()
    );
    (std::fs::read_to_string(&trace).unwrap(), promises)
}

/// Writes `tree` as the state directory of `a` (directories 0700, files 0600).
fn materialize(tree: &Tree, state: &Path) {
    std::fs::create_dir_all(state).unwrap();
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (p, content) in tree {
        let full = state.join(p);
        match content {
            None => {
                std::fs::create_dir_all(&full).unwrap();
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o700)).unwrap();
            }
            Some(bytes) => {
                std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&full)
                    .unwrap();
                f.write_all(bytes).unwrap();
            }
        }
    }
}

/// Starts the agent on the prepared directory: Ok once it answers, Err(log) if it exits
/// or does not answer within 30 s.
fn start(a: &mut TestAgent) -> Result<(), String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.dir.path().join("agent.log"))
        .unwrap();
    let mut child: Child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&a.config)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while UnixStream::connect(&a.socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("the agent exited ({status}):\n{}", a.log()));
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the agent did not answer in 30 s:\n{}", a.log()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    a.child = Some(child);
    Ok(())
}

fn quarantined(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(quarantined(&p));
        } else if p.to_string_lossy().contains(".corrupt.") {
            out.push(p);
        }
    }
    out
}

/// Starts the agent on one crash state and checks every promise acknowledged before it.
fn check_state(
    seller: &Seller,
    s: &CrashState,
    tree: &Tree,
    promises: &[(u64, Promise)],
) -> Result<(), String> {
    let mut a = TestAgent::prepare(&config(seller));
    materialize(tree, &a.state);
    start(&mut a)?;
    let call = |op: &str, params: Value| {
        a.call(op, params)
            .map_err(|e| format!("{op}: {e}\n{}", a.log()))
    };
    let acked = |p: &dyn Fn(&Promise) -> bool| {
        promises
            .iter()
            .filter(|(id, pr)| s.acked.contains(id) && p(pr))
            .count()
            > 0
    };
    let mut why = Vec::new();
    // Usage: exactly what was acknowledged, or that plus the one record in flight.
    let usage_acked: u64 = promises
        .iter()
        .filter_map(|(id, p)| match p {
            Promise::Usage(u) if s.acked.contains(id) => Some(*u),
            _ => None,
        })
        .sum();
    let in_flight = promises
        .iter()
        .find_map(|(id, p)| match p {
            Promise::Usage(u) if !s.acked.contains(id) => Some(*u),
            _ => None,
        })
        .unwrap_or(0);
    let st = call("usage.status", json!({}))?;
    let total = units_of(&st["totals"]["cpu"]["value"]);
    if total != usage_acked && total != usage_acked + in_flight {
        why.push(format!(
            "usage: the ledger holds {} units of cpu; acknowledged {usage_acked}, the next in \
             flight {in_flight}",
            total
        ));
    }
    // Batches: all or nothing, on every bulk meter alike.
    let batches_acked: u64 = promises
        .iter()
        .filter_map(|(id, p)| match p {
            Promise::Batch(k) if s.acked.contains(id) => Some(*k),
            _ => None,
        })
        .sum();
    let batch_in_flight = promises
        .iter()
        .find_map(|(id, p)| match p {
            Promise::Batch(k) if !s.acked.contains(id) => Some(*k),
            _ => None,
        })
        .unwrap_or(0);
    let per_meter: Vec<u64> = (0..BULK)
        .map(|i| units_of(&st["totals"][bulk_meter(i)]["value"]))
        .collect();
    let first = per_meter[0];
    if (first != batches_acked && first != batches_acked + batch_in_flight)
        || per_meter.iter().any(|v| *v != first)
    {
        why.push(format!(
            "usage batches: acknowledged {batches_acked} units a meter, the next in flight \
             {batch_in_flight}; the bulk meters hold {per_meter:?}"
        ));
    }
    let torn = st["ledger"]["recovery"]["torn_entries"]
        .as_u64()
        .unwrap_or(0);
    if torn > 0 {
        why.push(format!(
            "usage: {torn} whole entries cut off as a torn tail: {st}"
        ));
    }
    // The device code an acknowledged answer gave.
    for (id, p) in promises {
        if let Promise::Code(code) = p {
            if s.acked.contains(id) {
                let now = call("device.code", json!({}))?;
                if now["code"] != json!(code) {
                    why.push(format!("device code {code} became {now}"));
                }
            }
        }
    }
    // The license, and the freeze.
    // No license at all is an error answer (`no_license`), fine before the install's ack.
    let v = a
        .call("license.check", json!({"product": "p"}))
        .unwrap_or_else(|e| json!({"state": e["code"], "allowed": false}));
    if acked(&|p| matches!(p, Promise::Frozen)) {
        if v["allowed"] != false {
            why.push(format!("the freeze was acknowledged, yet: {v}"));
        }
    } else if acked(&|p| matches!(p, Promise::License))
        && v["state"] != "valid"
        // The freeze may hold before its answer went out (the request in flight).
        && !(v["state"] == "frozen" && freeze_in_flight(promises, &s.acked))
    {
        why.push(format!("the license was acknowledged, yet: {v}"));
    }
    let f = call("freeze.status", json!({}))?;
    if f["tampered"] != false {
        why.push(format!("a crash taken for tampering: {f}"));
    }
    let q = quarantined(&a.state);
    if !q.is_empty() {
        why.push(format!("state files unreadable after the crash: {q:?}"));
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(format!("{}\nagent log:\n{}", why.join("\n"), a.log()))
    }
}

/// The warnings and errors of a start (the refusal, or the log's WARN and ERROR lines),
/// without times and with the directory's path replaced, to compare two starts.
fn complaints(seller: &Seller, tree: &Tree) -> Vec<String> {
    let mut a = TestAgent::prepare(&config(seller));
    materialize(tree, &a.state);
    let dir = a.dir.path().display().to_string();
    let log = match start(&mut a) {
        Err(log) => format!("ERROR refused to start: {log}"),
        Ok(()) => {
            // Whatever reads its file lazily has read it once these answer.
            for op in [
                "usage.status",
                "license.status",
                "freeze.status",
                "device.code",
            ] {
                let _ = a.call(op, json!({}));
            }
            a.log()
        }
    };
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
        .map(|l| {
            let l = l.split_once(' ').map_or(l, |(_, rest)| rest);
            // Evidence files are named after the time.
            l.replace(&dir, "<dir>")
                .split(|c: char| c.is_ascii_digit())
                .collect::<Vec<_>>()
                .join("")
        })
        .collect()
}

/// Whether the freeze token was the request in flight: everything before it answered.
fn freeze_in_flight(promises: &[(u64, Promise)], acked: &[u64]) -> bool {
    promises
        .iter()
        .take_while(|(_, p)| !matches!(p, Promise::Frozen))
        .all(|(id, _)| acked.contains(id))
}

/// Damages one file of a crash state (a byte in the middle flipped) and checks the agent
/// reports it: a warning or an error that the same state undamaged does not give, or a
/// refusal to start. `device.key` counts only once something is sealed under it. `identity.json` is left out: it is the record the device code is
/// compared with, rebuilt from the hardware at every start, not a source of it (see
/// docs/operations.md, "Crash consistency").
/// The ledger segment's number when `name` is one (`ledger-<seq>.log`).
fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("ledger-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn check_damage(seller: &Seller, tree: &Tree, rng: &mut Rng) -> Result<String, String> {
    // A crash between a compaction's rename and its unlink leaves the old segment beside
    // the new one; the new one's snapshot supersedes it and the agent deletes it unread.
    let newest_segment = tree
        .keys()
        .filter_map(|p| segment_seq(&p.file_name()?.to_string_lossy()))
        .max();
    let files: Vec<&PathBuf> = tree
        .iter()
        .filter(|(p, c)| {
            let name = p.file_name().unwrap().to_string_lossy();
            if segment_seq(&name).is_some_and(|seq| Some(seq) != newest_segment) {
                return false;
            }
            // The lock's content is not read; temporaries and evidence are not state.
            c.as_ref().is_some_and(|b| !b.is_empty())
                && !name.ends_with(".lock")
                && !name.contains(".tmp")
                && !name.contains(".torn.")
                && name != "identity.json"
                // A journal of actions already run: damage only makes them run once more,
                // and a flip inside one of its strings leaves valid JSON nothing can tell.
                && name != "freeze-actions.json"
                // A key nothing is sealed under yet: its damage changes nothing.
                && (name != "device.key"
                    || tree.contains_key(Path::new("lifecycle.json"))
                    || tree.contains_key(Path::new("licenses/.lifecycle.json")))
        })
        .map(|(p, _)| p)
        .collect();
    if files.is_empty() {
        return Ok("no file to damage".into());
    }
    let victim = files[rng.below(files.len())].clone();
    let mut damaged = tree.clone();
    let bytes = damaged.get_mut(&victim).unwrap().as_mut().unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    let before = complaints(seller, tree);
    let after = complaints(seller, &damaged);
    let new: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    match new.first() {
        Some(line) => Ok(format!(
            "{} damaged at byte {at}: reported ({line:.160})",
            victim.display()
        )),
        None => Err(format!(
            "{} damaged at byte {at} and nothing says so; warnings: {after:?}",
            victim.display()
        )),
    }
}

#[test]
fn every_crash_point_recovers_what_was_acknowledged() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("skipped: strace is not installed (scripts/deps.sh installs it)");
        return;
    }
    let seller = Seller::new();
    let mut a = TestAgent::prepare(&config(&seller));
    let t0 = Instant::now();
    let (trace, promises) = traced_workload(&seller, &mut a);
    println!(
        "crash: workload traced in {:.1} s ({} requests, trace {} KiB)",
        t0.elapsed().as_secs_f64(),
        promises.len(),
        trace.len() / 1024
    );
    if let Ok(keep) = std::env::var("KOOAGENT_CRASH_TRACE") {
        std::fs::write(keep, &trace).unwrap();
    }
    let (ops, unknown) = crash_trace::parse(&trace, &a.state).unwrap();
    assert!(
        unknown.is_empty(),
        "calls the model does not cover: {unknown:?}"
    );
    let renames = ops
        .iter()
        .filter(|o| matches!(o, Op::Rename { from, .. } if from.starts_with("usage")))
        .count();
    assert!(renames >= 2, "the trace shows no ledger compaction");
    let acks = ops.iter().filter(|o| matches!(o, Op::Ack { .. })).count();
    assert!(
        acks >= promises.len(),
        "{acks} acknowledgements traced of {}",
        promises.len()
    );
    let states = crash_states(&ops).unwrap();
    let want = std::env::var("KOOAGENT_CRASH_STATES").unwrap_or_else(|_| "24".into());
    let seed: u64 = std::env::var("KOOAGENT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut rng = Rng(seed);
    let picked: Vec<&CrashState> = if want == "all" {
        states.iter().collect()
    } else {
        let n: usize = want
            .parse()
            .expect("KOOAGENT_CRASH_STATES: a number or all");
        // Always the last state of each kind (everything acknowledged), then a sample.
        let mut idx: Vec<usize> = [Kind::Cached, Kind::Durable, Kind::Torn]
            .iter()
            .filter_map(|k| states.iter().rposition(|s| s.kind == *k))
            .collect();
        while idx.len() < n.min(states.len()) {
            let i = rng.below(states.len());
            if !idx.contains(&i) {
                idx.push(i);
            }
        }
        idx.sort_unstable();
        idx.into_iter().map(|i| &states[i]).collect()
    };
    println!(
        "crash: {} operations ({acks} acknowledgements), {} distinct crash states, checking {} \
         (KOOAGENT_CRASH_SEED={seed})",
        ops.len(),
        states.len(),
        picked.len()
    );
    let t0 = Instant::now();
    let mut failures = Vec::new();
    for s in &picked {
        let t1 = Instant::now();
        let tree = tree_of(&ops, s).unwrap();
        let built = t1.elapsed();
        if let Err(e) = check_state(&seller, s, &tree, &promises) {
            failures.push(format!(
                "crash after operation {} ({:?}, {} acknowledged; last op {:?}):\n{e}",
                s.point,
                s.kind,
                s.acked.len(),
                s.point.checked_sub(1).map(|i| short(&ops[i]))
            ));
            if failures.len() >= 3 {
                break;
            }
        }
        eprintln!(
            "crash: point {} {:?}: built in {:.2} s, checked in {:.2} s",
            s.point,
            s.kind,
            built.as_secs_f64(),
            (t1.elapsed() - built).as_secs_f64()
        );
    }
    // Damage: a few whole states (no torn write of their own), one file each.
    let whole: Vec<&&CrashState> = picked.iter().filter(|s| s.kind != Kind::Torn).collect();
    let damage = if want == "all" { whole.len() } else { 4 };
    for _ in 0..damage {
        let s = whole[rng.below(whole.len())];
        let tree = tree_of(&ops, s).unwrap();
        match check_damage(&seller, &tree, &mut rng) {
            Ok(line) => println!("crash: {line}"),
            Err(e) => failures.push(e),
        }
    }
    println!(
        "crash: {} states checked in {:.1} s, {} failed",
        picked.len(),
        t0.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "KOOAGENT_CRASH_SEED={seed}\n{}",
        failures.join("\n\n")
    );
}

fn short(op: &Op) -> String {
    match op {
        Op::Write { path, offset, data } => {
            format!("write {} at {offset}, {} bytes", path.display(), data.len())
        }
        other => format!("{other:?}"),
    }
}
