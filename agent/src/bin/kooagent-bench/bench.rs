//! `kooagent-bench` (its own binary, src/bin/kooagent-bench.rs, so none of this ships in
//! `kooagent`): starts a private agent on a temporary directory and prints a table of
//! what it measured: round trips per second and latency percentiles per operation and
//! client count, time from exec to a connectable socket, idle RSS and idle CPU. When
//! `redis-server` is installed it is measured in the same run (PING over a Unix socket)
//! and the table shows our throughput as a ratio of it, so noisy machines still compare.

use std::io::Write;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as TokioBufReader};

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Seconds per measurement
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Concurrent client counts to measure
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub clients: Vec<usize>,
    /// Times the agent is started to measure exec → ready
    #[arg(long, default_value_t = 5)]
    pub starts: usize,
    /// Alternated rounds (ours, then Redis) for the rows compared with Redis; the table
    /// shows the medians
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip the Redis reference even when redis-server is installed
    #[arg(long)]
    pub no_redis: bool,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// Idle connections held to measure their memory (0: skip)
    #[arg(long, default_value_t = crate::bench_conns::IDLE_CONNECTIONS)]
    pub idle_connections: usize,
    /// Measure only the idle connections' memory
    #[arg(long)]
    pub connections_only: bool,
    /// Measure only the cached license check (agent/src/bench_cached.rs)
    #[arg(long)]
    pub cached: bool,
    /// Freezes/unfreezes timed to the cached answer flipping (with --cached)
    #[arg(long, default_value_t = 200)]
    pub changes: usize,
    /// Measure only these scenarios (labels as in the table, comma-separated; the
    /// pipelined and batch rows are skipped then): for comparing builds quickly
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// One operation to measure: a name for the table, the request's op and params.
pub struct Scenario {
    pub label: &'static str,
    pub op: &'static str,
    pub params: &'static str,
}

/// Operations measured over the socket. Later capabilities add their lines here.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        label: "ping",
        op: "ping",
        params: "{}",
    },
    Scenario {
        label: "device.code",
        op: "device.code",
        params: "{}",
    },
    // Answered only once the record is fsynced: group commit is what makes this scale.
    Scenario {
        label: "usage.record (durable)",
        op: "usage.record",
        params: r#"{"meter":"bench","value":"1.25"}"#,
    },
    Scenario {
        label: "license.check",
        op: "license.check",
        params: "{\"product\":\"bench\"}",
    },
    // A product sold by authorization code: answered by the authcode service (queried
    // today already, so the rows measure the lookup, not the network).
    Scenario {
        label: "license.check (authorization code)",
        op: "license.check",
        params: "{\"product\":\"bench-code\"}",
    },
    Scenario {
        label: "license.check + feature",
        op: "license.check",
        params: "{\"product\":\"bench\",\"feature\":\"f1\"}",
    },
];

/// Label of the Redis reference rows.
const REDIS: &str = "redis PING (reference)";

/// Records per `usage.record_batch` request in the batch measurement.
pub const BATCH: usize = 1000;

/// Label of the `usage.record_batch` rows.
const BATCH_LABEL: &str = "usage.record_batch of 1000";

/// Requests kept in flight on the one connection of the pipelined `usage.record` row.
pub const PIPELINE_DEPTH: usize = 32;
/// Label of that row.
const PIPELINED: &str = "usage.record (durable), pipelined 32 deep";

/// What a row or measure should reach (issue 18), printed beside the figure so a run says
/// at a glance whether it did.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub enum Target {
    /// Throughput at least this ratio of Redis PING with the same client count.
    VsRedis(f64),
    /// At least this many requests per second.
    PerSec(f64),
}

impl Target {
    /// The target of a row, by its scenario and client count.
    pub fn of(scenario: &str, clients: usize) -> Option<Target> {
        match (scenario, clients) {
            ("ping" | "license.check", 1) => Some(Target::VsRedis(1.2)),
            ("ping" | "license.check", 32) => Some(Target::VsRedis(1.5)),
            (PIPELINED, 1) => Some(Target::PerSec(30_000.0)),
            _ => None,
        }
    }

    /// Whether `row` reaches it; None when the figure is missing (no Redis reference).
    pub fn met(&self, row: &Row) -> Option<bool> {
        match *self {
            Target::VsRedis(x) => row.vs_redis.map(|r| r >= x),
            Target::PerSec(x) => Some(row.per_sec >= x),
        }
    }

    fn describe(&self, met: Option<bool>) -> String {
        let goal = match self {
            Target::VsRedis(x) => format!("≥ {x:.1}× redis"),
            Target::PerSec(x) => format!("≥ {x:.0}/s"),
        };
        format!("{goal} {}", verdict(met))
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "(met)",
        Some(false) => "(MISSED)",
        None => "(not measured)",
    }
}

/// Idle RSS the agent must stay under (MiB).
pub const IDLE_RSS_TARGET_MIB: f64 = 6.0;

/// The product the bench's license is for.
const BENCH_PRODUCT: &str = "bench";

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub clients: usize,
    pub requests: u64,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Our throughput divided by Redis's PING with the same client count, when measured.
    pub vs_redis: Option<f64>,
    /// The server's CPU time (user + system) per request, in µs: what a request costs,
    /// less disturbed by other load on the machine than requests/s.
    pub server_cpu_us: Option<f64>,
    /// This bench's own CPU time (its client loop, one thread) per request over the same
    /// window, in µs: client and server share the machine's CPUs, so the two together
    /// bound what any server can reach under this client (see [`Ceiling`]).
    pub client_cpu_us: Option<f64>,
    /// The row's target, if it has one ([`Target::of`]), and whether it was met.
    pub target: Option<Target>,
    pub target_met: Option<bool>,
    /// Durable rows: usage records per ledger commit (one fdatasync) over the row, the
    /// group size group commit reached.
    pub records_per_commit: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub ready_ms_median: f64,
    pub ready_ms_max: f64,
    pub idle_rss_kib: u64,
    pub idle_cpu_ticks: u64,
    pub idle_seconds: f64,
    /// Durable usage records per second with `usage.record_batch` of [`BATCH`], per client count.
    pub batch_records_per_sec: Vec<(usize, f64)>,
    /// The agent's peak RSS over the whole run (VmHWM).
    pub peak_rss_kib: u64,
    /// One append + fdatasync in the bench directory: the floor under a durable answer.
    pub fdatasync_us_median: f64,
    /// Parse + ed25519 verification of one license, in-process (median).
    pub license_verify_us: f64,
    /// Verify + durable write (fsync) into a licenses directory, in-process (median).
    pub license_install_inproc_us: f64,
    /// `license.install` over the socket: verify, fsync, verdicts rebuilt (median).
    pub license_install_socket_us: f64,
    /// RSS before, with and after many idle connections.
    pub idle_connections: Option<crate::bench_conns::ConnMemory>,
    /// Load average (1 minute) when the run started and when it ended: a loaded machine
    /// moves every figure (compare ratios and rows of one run).
    pub load_start: Option<f64>,
    pub load_end: Option<f64>,
    pub cpus: usize,
    /// What the CPU costs measured allow each row compared with Redis (and Redis itself).
    pub ceilings: Vec<Ceiling>,
}

/// The most requests/s a row's CPU costs allow on this machine with this client: client
/// and server run on the same CPUs, so with at least as many requests in flight as CPUs
/// they keep at most every CPU busy, and each request costs the client's CPU plus the
/// server's. Only such rows get a ceiling: with fewer clients than CPUs the two CPU clocks
/// overlap in time (each side's clock includes kernel work done while the other already
/// runs, e.g. waking it), so their sum is no bound (a quiet run measured 42,000 pings/s at
/// 1 client where the sum said 33,000). A server cheaper than Redis still
/// cannot pass this ceiling; a target above it is out of reach with this client on this
/// machine, whatever the server does.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub scenario: String,
    pub clients: usize,
    /// CPUs the load can keep busy: min(CPUs, clients).
    pub cpus_used: f64,
    pub client_cpu_us: f64,
    pub server_cpu_us: f64,
    /// cpus_used × 1e6 / (client + server CPU per request).
    pub max_per_sec: f64,
    /// max_per_sec over Redis's measured PING rate at the same client count.
    pub max_vs_redis: f64,
    /// Client + server CPU per request the row's target needs (None: no target).
    pub target_needs_us: Option<f64>,
}

impl Ceiling {
    fn of(row: &Row, redis: &Row, cpus: usize) -> Option<Ceiling> {
        let (client, server) = (row.client_cpu_us?, row.server_cpu_us?);
        let cpus_used = cpus.min(row.clients).max(1) as f64;
        let max_per_sec = cpus_used * 1e6 / (client + server);
        let target_needs_us = match row.target {
            Some(Target::VsRedis(x)) => Some(cpus_used * 1e6 / (x * redis.per_sec)),
            _ => None,
        };
        Some(Ceiling {
            scenario: row.scenario.clone(),
            clients: row.clients,
            cpus_used,
            client_cpu_us: client,
            server_cpu_us: server,
            max_per_sec,
            max_vs_redis: max_per_sec / redis.per_sec,
            target_needs_us,
        })
    }
}

/// The 1-minute load average (/proc/loadavg), if readable.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn fmt_load(l: Option<f64>) -> String {
    l.map_or_else(|| "?".into(), |l| format!("{l:.2}"))
}

/// CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Commits (fdatasyncs) of the agent's usage ledger so far (`usage.status`).
fn ledger_commits(socket: &Path) -> Option<u64> {
    let mut c = crate::client::Client::connect(socket).ok()?;
    let v = c.call("usage.status", serde_json::json!({})).ok()?;
    v["ledger"]["commits"].as_u64()
}

/// Runs `measure` (a durable usage row of `records` records per request) and notes on its
/// row how many records each ledger commit carried.
fn with_commits(
    socket: &Path,
    records: usize,
    measure: impl FnOnce() -> Result<Row>,
) -> Result<Row> {
    let before = ledger_commits(socket);
    let mut row = measure()?;
    if let (Some(a), Some(b)) = (before, ledger_commits(socket)) {
        if b > a {
            row.records_per_commit = Some((row.requests * records as u64) as f64 / (b - a) as f64);
        }
    }
    Ok(row)
}

pub(crate) struct Agent {
    pub(crate) child: Child,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        kooagent::sys::terminate(self.child.id());
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, trust: &str) -> Result<PathBuf> {
    write_config_with(dir, trust, "")
}

/// The bench's config with `socket_extra` lines in its `[socket]` section.
pub(crate) fn write_config_with(dir: &Path, trust: &str, socket_extra: &str) -> Result<PathBuf> {
    let cfg = dir.join("agent.toml");
    let text = format!(
        "[agent]\nstate_dir = \"{}\"\nlog_level = \"warn\"\npidfile = \"{}\"\n[socket]\npath = \"{}\"\n{socket_extra}[identity]\nmetadata = false\n\
         [license]\ntrusted_keys = [\"{trust}\"]\n[usage.meters.bench]\ninstance_id = \"bench-instance\"\n",
        dir.join("state").display(),
        dir.join("agent.pid").display(),
        dir.join("agent.sock").display()
    );
    std::fs::write(&cfg, text)?;
    seed_authcode(&dir.join("state"))?;
    Ok(cfg)
}

/// An activated code for product `bench-code`, queried today (no network during the bench).
fn seed_authcode(state: &Path) -> Result<()> {
    use crate::clock::Clock;
    let now = crate::clock::SystemClock.now_secs();
    let rec = crate::authcode::logic::CodeRecord {
        code: "BENCH-CODE".into(),
        product: "bench-code".into(),
        product_id: None,
        order_id: None,
        amount: None,
        activated_at: now,
        status: "ALIVE".into(),
        expire_time: Some(now + 365 * 86_400),
        last_ok_at: now,
        expired_seen_at: None,
        last_query_at: Some(now),
        last_error: None,
    };
    crate::store::ensure_dir(state, 0o700)?;
    let body = serde_json::json!({"version": 1, "codes": [rec]});
    crate::store::atomic_write(
        &state.join("authcodes.json"),
        body.to_string().as_bytes(),
        0o600,
    )?;
    Ok(())
}

/// Starts the agent and returns it with the time from exec to a successful connect.
pub(crate) fn start_agent(exe: &Path, config: &Path, socket: &Path) -> Result<(Agent, Duration)> {
    let _ = std::fs::remove_file(socket);
    let t0 = Instant::now();
    let child = Command::new(exe)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .spawn()
        .context("starting the agent")?;
    let mut agent = Agent {
        child,
        socket: socket.to_path_buf(),
    };
    loop {
        if StdUnixStream::connect(socket).is_ok() {
            return Ok((agent, t0.elapsed()));
        }
        if let Some(status) = agent.child.try_wait()? {
            bail!("the agent exited during start: {status}");
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the agent did not open its socket within 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Runs one load (a [`drive`]) to its end and makes its row, with the CPU the server
/// (`server_pid`) spent per request over the same window.
fn measured_row(
    rt: &tokio::runtime::Runtime,
    label: &str,
    clients: usize,
    server_pid: u32,
    load: impl std::future::Future<Output = Result<(u64, Vec<u32>, f64)>>,
) -> Result<Row> {
    let me = std::process::id();
    let before = kooagent::sys::process_cpu_us(server_pid);
    let client_before = kooagent::sys::process_cpu_us(me);
    let (n, lat, el) = rt.block_on(load)?;
    let client_after = kooagent::sys::process_cpu_us(me);
    let after = kooagent::sys::process_cpu_us(server_pid);
    let mut r = row(label, clients, n, lat, el);
    let per_request = |(a, b): (f64, f64)| (b - a) / n.max(1) as f64;
    r.server_cpu_us = before.zip(after).map(per_request);
    r.client_cpu_us = client_before.zip(client_after).map(per_request);
    Ok(r)
}

pub(crate) fn proc_stat(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok((rss, ticks))
}

/// Drives `clients` connections, each sending `request` and waiting for its answer, for
/// `seconds`. Returns (requests, per-request latencies in ns).
async fn drive(
    socket: PathBuf,
    request: Vec<u8>,
    clients: usize,
    seconds: f64,
    expect: &'static str,
) -> Result<(u64, Vec<u32>, f64)> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..clients {
        let socket = socket.clone();
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::UnixStream::connect(&socket).await?;
            let (rd, mut wr) = stream.into_split();
            let mut rd = TokioBufReader::new(rd);
            let mut line = Vec::with_capacity(512);
            let mut lat = Vec::with_capacity(1 << 16);
            while Instant::now() < deadline {
                let t = Instant::now();
                wr.write_all(&request).await?;
                line.clear();
                rd.read_until(b'\n', &mut line).await?;
                lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                if !line.windows(expect.len()).any(|w| w == expect.as_bytes()) {
                    anyhow::bail!("unexpected answer: {}", String::from_utf8_lossy(&line));
                }
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((all.len() as u64, all, elapsed))
}

/// One connection keeping `depth` requests in flight for `seconds`: whenever answers
/// arrive, as many new requests go out in one write (a client pipelining `depth` deep).
/// Latency runs from a request's write to its answer.
async fn drive_pipelined(
    socket: PathBuf,
    request: Vec<u8>,
    depth: usize,
    seconds: f64,
    expect: &'static str,
) -> Result<(u64, Vec<u32>, f64)> {
    let stream = tokio::net::UnixStream::connect(&socket).await?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = TokioBufReader::new(rd);
    let mut line = Vec::with_capacity(512);
    let mut lat = Vec::with_capacity(1 << 16);
    let mut in_flight = std::collections::VecDeque::with_capacity(depth);
    let mut batch = Vec::with_capacity(request.len() * depth);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    loop {
        if Instant::now() < deadline && in_flight.len() < depth {
            batch.clear();
            let now = Instant::now();
            while in_flight.len() < depth {
                batch.extend_from_slice(&request);
                in_flight.push_back(now);
            }
            wr.write_all(&batch).await?;
        }
        let Some(sent) = in_flight.pop_front() else {
            break;
        };
        line.clear();
        rd.read_until(b'\n', &mut line).await?;
        lat.push(sent.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        if !line.windows(expect.len()).any(|w| w == expect.as_bytes()) {
            bail!("unexpected answer: {}", String::from_utf8_lossy(&line));
        }
        // Take every answer already here before refilling, so refills are batches.
        while rd.buffer().contains(&b'\n') {
            let sent = in_flight
                .pop_front()
                .context("more answers than requests")?;
            line.clear();
            rd.read_until(b'\n', &mut line).await?;
            lat.push(sent.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            if !line.windows(expect.len()).any(|w| w == expect.as_bytes()) {
                bail!("unexpected answer: {}", String::from_utf8_lossy(&line));
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((lat.len() as u64, lat, elapsed))
}

/// The round with the median throughput.
fn median_row(mut rounds: Vec<Row>) -> Row {
    rounds.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    let i = rounds.len() / 2;
    rounds.swap_remove(i)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn row(label: &str, clients: usize, n: u64, mut lat: Vec<u32>, elapsed: f64) -> Row {
    lat.sort_unstable();
    Row {
        scenario: label.into(),
        clients,
        requests: n,
        per_sec: n as f64 / elapsed,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        vs_redis: None,
        server_cpu_us: None,
        client_cpu_us: None,
        target: None,
        target_met: None,
        records_per_commit: None,
    }
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// Redis answering PING on a Unix socket, driven by our own client loop so both are
/// driven identically. It is measured right after our `ping` row of the same client count
/// (same moment, same background load on a shared machine), and every row's "vs redis"
/// divides by that measurement.
struct Redis {
    child: Child,
    sock: PathBuf,
}

impl Redis {
    fn start(dir: &Path) -> Result<Option<Redis>> {
        let Some(server) = which("redis-server") else {
            return Ok(None);
        };
        let sock = dir.join("redis.sock");
        let mut child = Command::new(server)
            .args([
                "--port",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--unixsocket",
            ])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let t0 = Instant::now();
        while StdUnixStream::connect(&sock).is_err() {
            if t0.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                bail!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Some(Redis { child, sock }))
    }

    fn measure(&self, rt: &tokio::runtime::Runtime, clients: usize, seconds: f64) -> Result<Row> {
        let load = drive(
            self.sock.clone(),
            b"PING\r\n".to_vec(),
            clients,
            seconds,
            "PONG",
        );
        measured_row(rt, REDIS, clients, self.child.id(), load)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Measures the agent binary `exe`.
pub fn run(args: BenchArgs, exe: &Path) -> Result<()> {
    if args.cached {
        return crate::bench_cached::run(&args, exe);
    }
    let exe = exe.to_path_buf();
    let load_start = load_average();
    let dir = tempdir()?;
    let seller_key = kooagent_edge::keyfile::generate()?;
    let trust = crate::license::keys::entry_for(&seller_key.verifying_key());
    let idle_connections = match args.idle_connections {
        0 => None,
        n => Some(crate::bench_conns::measure(
            &exe,
            &dir.join("conns"),
            &trust,
            n,
        )?),
    };
    if args.connections_only {
        let _ = std::fs::remove_dir_all(&dir);
        let m = idle_connections.context("--connections-only needs --idle-connections > 0")?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&m)?);
        } else {
            crate::bench_conns::print_table(&m, &mut std::io::stdout())?;
        }
        return Ok(());
    }
    let config = write_config(
        &dir,
        &crate::license::keys::entry_for(&seller_key.verifying_key()),
    )?;
    let socket = dir.join("agent.sock");

    // exec → ready, several starts.
    let mut ready = Vec::new();
    for _ in 0..args.starts.max(1).saturating_sub(1) {
        let (agent, t) = start_agent(&exe, &config, &socket)?;
        ready.push(t);
        drop(agent);
    }
    let (agent, t) = start_agent(&exe, &config, &socket)?;
    ready.push(t);
    ready.sort();
    let pid = agent.child.id();

    // Idle: let start-up work (identity) finish, then watch CPU ticks over a quiet window.
    let device_code = {
        let mut c = crate::client::Client::connect(&agent.socket)?;
        let v = c.call("device.code", serde_json::json!({}))?;
        let code = v["code"].as_str().context("no device code")?.to_string();
        // The license the license.check rows ask about.
        let text = bench_license(&seller_key, &code, "bench-1", 0)?;
        c.call("license.install", serde_json::json!({"text": text}))?;
        code
    };
    std::thread::sleep(Duration::from_millis(300));
    let idle_seconds = 3.0;
    let (rss, ticks0) = proc_stat(pid)?;
    std::thread::sleep(Duration::from_secs_f64(idle_seconds));
    let (_, ticks1) = proc_stat(pid)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let redis = if args.no_redis {
        None
    } else {
        Redis::start(&dir).unwrap_or_else(|e| {
            eprintln!("redis reference skipped: {e}");
            None
        })
    };
    let mut reference = Vec::new();
    let mut rows = Vec::new();
    let wanted = |label: &str| args.only.is_empty() || args.only.iter().any(|o| o == label);
    for s in SCENARIOS.iter().filter(|s| wanted(s.label)) {
        let mut req = format!(
            "{{\"v\":1,\"id\":1,\"op\":\"{}\",\"params\":{}}}",
            s.op, s.params
        )
        .into_bytes();
        req.push(b'\n');
        for &c in &args.clients {
            // Rows with a target against Redis alternate with Redis for several rounds
            // (same moments, same background load) and keep the medians.
            let compared = redis.is_some() && (s.op == "ping" || Target::of(s.label, c).is_some());
            let rounds = if compared { args.rounds.max(1) } else { 1 };
            let mut ours = Vec::new();
            let mut ratios = Vec::new();
            for _ in 0..rounds {
                let load = drive(socket.clone(), req.clone(), c, args.seconds, "\"ok\":true");
                let row = if s.op == "usage.record" {
                    with_commits(&socket, 1, || measured_row(&rt, s.label, c, pid, load))?
                } else {
                    measured_row(&rt, s.label, c, pid, load)?
                };
                if let (true, Some(redis)) = (compared, &redis) {
                    let base = redis.measure(&rt, c, args.seconds)?;
                    ratios.push(row.per_sec / base.per_sec);
                    reference.push(base);
                }
                ours.push(row);
            }
            let mut row = median_row(ours);
            row.vs_redis = median(ratios);
            rows.push(row);
        }
    }
    drop(redis);
    if wanted(PIPELINED) {
        let req = b"{\"v\":1,\"id\":1,\"op\":\"usage.record\",\"params\":{\"meter\":\"bench\",\"value\":\"1.25\"}}\n";
        let load = drive_pipelined(
            socket.clone(),
            req.to_vec(),
            PIPELINE_DEPTH,
            args.seconds,
            "\"ok\":true",
        );
        rows.push(with_commits(&socket, 1, || {
            measured_row(&rt, PIPELINED, 1, pid, load)
        })?);
    }
    let mut batch_records_per_sec = Vec::new();
    if wanted(BATCH_LABEL) {
        let one = r#"{"meter":"bench","value":"0.5"}"#;
        let list = vec![one; BATCH].join(",");
        let mut req = format!(
            "{{\"v\":1,\"id\":1,\"op\":\"usage.record_batch\",\"params\":{{\"records\":[{list}]}}}}"
        )
        .into_bytes();
        req.push(b'\n');
        for &c in &args.clients {
            let load = drive(socket.clone(), req.clone(), c, args.seconds, "\"ok\":true");
            let r = with_commits(&socket, BATCH, || {
                measured_row(&rt, BATCH_LABEL, c, pid, load)
            })?;
            batch_records_per_sec.push((c, r.per_sec * BATCH as f64));
            rows.push(r);
        }
    }
    let peak_rss_kib = peak_rss(pid).unwrap_or(0);
    let license_install_socket_us = install_over_socket(&agent.socket, &seller_key, &device_code)?;
    drop(agent);
    let fdatasync_us_median = fdatasync_latency(&dir).unwrap_or(f64::NAN);
    let (license_verify_us, license_install_inproc_us) =
        license_in_process(&dir, &seller_key, &device_code)?;
    // One reference row per client count: the median of its rounds.
    let mut by_clients: Vec<Row> = Vec::new();
    for &c in &args.clients {
        let rounds: Vec<Row> = reference
            .iter()
            .filter(|b| b.clients == c)
            .cloned()
            .collect();
        if !rounds.is_empty() {
            by_clients.push(median_row(rounds));
        }
    }
    for r in rows.iter_mut().filter(|r| r.vs_redis.is_none()) {
        if let Some(base) = by_clients.iter().find(|b| b.clients == r.clients) {
            r.vs_redis = Some(r.per_sec / base.per_sec);
        }
    }
    rows.extend(by_clients);
    for r in rows.iter_mut() {
        r.target = Target::of(&r.scenario, r.clients);
        r.target_met = r.target.and_then(|t| t.met(r));
    }
    let ceilings = rows
        .iter()
        .filter(|r| {
            r.target.is_some_and(|t| matches!(t, Target::VsRedis(_))) || r.scenario == REDIS
        })
        .filter(|r| r.clients >= cpus())
        .filter_map(|r| {
            let redis = rows
                .iter()
                .find(|b| b.scenario == REDIS && b.clients == r.clients)?;
            Ceiling::of(r, redis, cpus())
        })
        .collect();
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let report = Report {
        rows,
        ready_ms_median: ms(&ready[ready.len() / 2]),
        ready_ms_max: ms(ready.last().expect("at least one start")),
        idle_rss_kib: rss,
        idle_cpu_ticks: ticks1.saturating_sub(ticks0),
        idle_seconds,
        batch_records_per_sec,
        peak_rss_kib,
        fdatasync_us_median,
        license_verify_us,
        license_install_inproc_us,
        license_install_socket_us,
        idle_connections,
        load_start,
        load_end: load_average(),
        cpus: cpus(),
        ceilings,
    };
    let _ = std::fs::remove_dir_all(&dir);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, &mut std::io::stdout())?;
    }
    Ok(())
}

pub fn print_table(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "| scenario | clients | requests | req/s | p50 µs | p99 µs | vs redis | server CPU µs/req | \
         client CPU µs/req | target |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")?;
    for row in &r.rows {
        writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} |",
            row.scenario,
            row.clients,
            row.requests,
            row.per_sec,
            row.p50_us,
            row.p99_us,
            row.vs_redis
                .map(|x| format!("{x:.2}×"))
                .unwrap_or_else(|| "-".into()),
            row.server_cpu_us
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
            row.client_cpu_us
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
            row.target
                .map(|t| t.describe(row.target_met))
                .unwrap_or_default()
        )?;
    }
    print_ceilings(r, out)?;
    writeln!(out)?;
    writeln!(out, "| measure | value | target |")?;
    writeln!(out, "|---|---:|---|")?;
    writeln!(
        out,
        "| exec → socket ready (median) | {:.1} ms | |",
        r.ready_ms_median
    )?;
    writeln!(
        out,
        "| exec → socket ready (max) | {:.1} ms | |",
        r.ready_ms_max
    )?;
    let rss_mib = r.idle_rss_kib as f64 / 1024.0;
    writeln!(
        out,
        "| idle RSS | {rss_mib:.2} MiB | ≤ {IDLE_RSS_TARGET_MIB:.0} MiB {} |",
        verdict(Some(rss_mib <= IDLE_RSS_TARGET_MIB))
    )?;
    writeln!(
        out,
        "| idle CPU over {:.0} s | {} ticks | 0 ticks {} |",
        r.idle_seconds,
        r.idle_cpu_ticks,
        verdict(Some(r.idle_cpu_ticks == 0))
    )?;
    for (clients, rate) in &r.batch_records_per_sec {
        writeln!(
            out,
            "| usage.record_batch of 1000, {clients} client(s) | {rate:.0} records/s | |"
        )?;
    }
    writeln!(
        out,
        "| peak RSS over the run | {:.2} MiB | |",
        r.peak_rss_kib as f64 / 1024.0
    )?;
    writeln!(
        out,
        "| fdatasync in the bench directory (median) | {:.0} µs | |",
        r.fdatasync_us_median
    )?;
    for row in r.rows.iter() {
        if let Some(g) = row.records_per_commit {
            writeln!(
                out,
                "| {}, {} client(s): records per fdatasync (group size) | {g:.1} | |",
                row.scenario, row.clients
            )?;
        }
    }
    if r.fdatasync_us_median > 0.0 {
        writeln!(
            out,
            "| most durable records/s from one connection {PIPELINE_DEPTH} deep at that fdatasync \
             ({PIPELINE_DEPTH} / fdatasync) | {:.0} | ≥ 30000 needs fdatasync ≤ {:.0} µs |",
            PIPELINE_DEPTH as f64 * 1e6 / r.fdatasync_us_median,
            PIPELINE_DEPTH as f64 * 1e6 / 30_000.0
        )?;
    }
    writeln!(
        out,
        "| load average (1 min) at start / end | {} / {} | {} CPU(s) |",
        fmt_load(r.load_start),
        fmt_load(r.load_end),
        r.cpus
    )?;
    writeln!(
        out,
        "| license verify, in-process (median) | {:.1} µs | |",
        r.license_verify_us
    )?;
    writeln!(
        out,
        "| license verify + install (fsync), in-process (median) | {:.1} µs | |",
        r.license_install_inproc_us
    )?;
    writeln!(
        out,
        "| license.install over the socket (median) | {:.1} µs | |",
        r.license_install_socket_us
    )?;
    if let Some(m) = &r.idle_connections {
        writeln!(out)?;
        crate::bench_conns::print_table(m, out)?;
    }
    Ok(())
}

/// The ceiling lines: what client + server CPU per request allow on this machine.
fn print_ceilings(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    if r.ceilings.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(
        out,
        "| ceiling (clients ≥ CPUs): CPUs × 1e6 / (client + server CPU per request) | clients | \
         CPUs used | client + server µs/req | most req/s | most vs redis | target needs \
         client + server ≤ |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---|")?;
    for c in &r.ceilings {
        let needs = match c.target_needs_us {
            Some(us) => format!(
                "{us:.2} µs/req ({})",
                if c.client_cpu_us + c.server_cpu_us <= us {
                    "within reach"
                } else if c.client_cpu_us >= us {
                    "the client alone costs more: out of reach with this client"
                } else {
                    "server must be cheaper"
                }
            ),
            None => String::new(),
        };
        writeln!(
            out,
            "| {} | {} | {:.0} | {:.2} + {:.2} | {:.0} | {:.2}× | {needs} |",
            c.scenario,
            c.clients,
            c.cpus_used,
            c.client_cpu_us,
            c.server_cpu_us,
            c.max_per_sec,
            c.max_vs_redis
        )?;
    }
    Ok(())
}

fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0))
}

/// Median time of a small append + fdatasync in `dir`: no durable answer can be faster,
/// so records/s per client is bounded by its inverse.
fn fdatasync_latency(dir: &Path) -> Result<f64> {
    let path = dir.join("fdatasync-probe");
    let mut f = std::fs::File::create(&path)?;
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        f.write_all(&[0u8; 128])?;
        f.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = std::fs::remove_file(&path);
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// A license for the bench product, bound to `code`; `age` seconds old (distinct ages
/// make distinct licenses).
pub(crate) fn bench_license(
    key: &ed25519_dalek::SigningKey,
    code: &str,
    id: &str,
    age: i64,
) -> Result<String> {
    use kooagent_core::license::issue::{issue, IssueRequest, Term};
    let now = crate::clock::Clock::now_secs(&crate::clock::SystemClock);
    let req = IssueRequest {
        id: Some(id.to_string()),
        product: BENCH_PRODUCT.into(),
        instance: "bench-instance".into(),
        devices: vec![code.to_string()],
        unbound: false,
        issued_at: now - 3600 - age,
        not_before: None,
        term: Term::Days(30),
        grace_secs: 86_400,
        features: vec!["f1".into(), "f2".into()],
        limits: [("cores".to_string(), 8u64)].into_iter().collect(),
        meta: Default::default(),
    };
    Ok(issue(&req, key)?)
}

fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2)
        .map(|d| d.as_secs_f64() * 1e6)
        .unwrap_or(0.0)
}

/// Median time of `license.install` of a new license (a new id each time, removed again
/// untimed, so the agent keeps a realistic handful of licenses) on one connection.
fn install_over_socket(socket: &Path, key: &ed25519_dalek::SigningKey, code: &str) -> Result<f64> {
    let texts: Vec<String> = (0..200)
        .map(|i| bench_license(key, code, &format!("bench-install-{i}"), i))
        .collect::<Result<_>>()?;
    let mut c = crate::client::Client::connect(socket)?;
    let mut times = Vec::with_capacity(texts.len());
    for t in texts {
        let t0 = Instant::now();
        let v = c.call("license.install", serde_json::json!({"text": t}))?;
        times.push(t0.elapsed());
        c.call(
            "license.remove",
            serde_json::json!({"license_id": v["license_id"]}),
        )?;
    }
    Ok(median_us(times))
}

/// In-process: (parse + verify, parse + verify + durable install), medians in µs.
fn license_in_process(
    dir: &Path,
    key: &ed25519_dalek::SigningKey,
    code: &str,
) -> Result<(f64, f64)> {
    use crate::license::{format, keys::TrustedKeys, store::LicenseStore};
    let keys = TrustedKeys::from_keys([key.verifying_key()], &[]);
    let text = bench_license(key, code, "bench-verify", 0)?;
    let mut verify = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t0 = Instant::now();
        let p = format::parse(text.as_bytes())?;
        let ok = keys.check(&p) == crate::license::keys::Integrity::Verified;
        verify.push(t0.elapsed());
        anyhow::ensure!(ok, "the bench license does not verify");
    }
    let texts: Vec<String> = (0..200)
        .map(|i| bench_license(key, code, &format!("bench-store-{i}"), i))
        .collect::<Result<_>>()?;
    let mut store = LicenseStore::new(dir.join("inproc-licenses"), vec![]);
    store.load_all(&keys, 0)?;
    let mut install = Vec::with_capacity(texts.len());
    for t in texts {
        let t0 = Instant::now();
        let id = store.install(t.as_bytes(), &keys, None)?.id().to_string();
        install.push(t0.elapsed());
        store.remove(&id)?;
    }
    Ok((median_us(verify), median_us(install)))
}

pub(crate) fn tempdir() -> Result<PathBuf> {
    // Short path: Unix socket paths are limited to 107 bytes.
    let base = std::env::temp_dir().join(format!("kooagent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(base)
}
