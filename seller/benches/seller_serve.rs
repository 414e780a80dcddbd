//! Load measurement of `kooagent-seller serve` (the release binary, SQLite, TLS on
//! loopback): 1,000 concurrent `getLicense` orders, each for its own instance and device.
//! Prints a table: duplicates (must be 0), and latency percentiles.
//!
//! `cargo bench -p kooagent-seller --bench seller_serve` (optionally `-- N` for N orders).
//! With `KOOAGENT_BENCH_PG_URL` set (e.g. what scripts/pg-test.sh exports), the servers
//! store in PostgreSQL, `KOOAGENT_BENCH_PROCESSES` of them (default 1) on one database,
//! the orders spread over them round-robin; the CPU columns then add up every server
//! process, and a "db µs" column gives PostgreSQL's own (its processes' CPU clocks).
//!
//! Two rounds: "warm" opens and handshakes every connection first, then sends all
//! requests at once (the request latency the marketplace sees on a kept-alive
//! connection); "cold" opens N fresh TLS connections at once and includes the handshake.
//! `KOOAGENT_BENCH_MARKS=1` prints each timed window in CLOCK_MONOTONIC seconds, for
//! `perf record -k CLOCK_MONOTONIC ...` and `perf report --time START,END`.
//!
//! Besides latencies, each row gives the CPU time (user + system) per order of the server
//! process and of the bench client (their CPU clocks: utime + stime) over the round's timed
//! window: on a machine shared with other work these move far less than p99 does, and
//! with all orders arriving at once p99 ≈ (server + client µs/order) × N / CPUs.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const KEY: &str = "bench-interconnection-key";
const PATH: &str = "/kg/bench";

fn private(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn device_code(n: usize) -> String {
    let a = "0123456789ABCDEFGHJKMNPQRSTVWXYZ".as_bytes();
    let p = format!(
        "{}{}{}{}",
        a[n % 32] as char,
        a[(n / 32) % 32] as char,
        a[(n / 1024) % 32] as char,
        'Q'
    );
    a.iter()
        .map(|c| format!("{p}-EFGH-JKMN-PQRS-TVW{}", *c as char))
        .find(|c| kooagent_core::device_code::parse_code(c).is_ok())
        .expect("one check symbol fits")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn request(n: usize, round: &str) -> Vec<u8> {
    let now = now_ms() / 1000;
    let body = serde_json::json!({
        "activity": "getLicense", "instanceId": format!("{round}-inst-{n}"),
        "eventId": format!("{round}-event-{n}"),
        "effectiveTime": kooagent_core::clock::format_rfc3339(now),
        "expireTime": kooagent_core::clock::format_rfc3339(now + 365 * 86_400),
        "deviceFingerprint": device_code(n),
    })
    .to_string();
    let ts = now_ms().to_string();
    let nonce = format!("{round}-nonce-{n}");
    let sig = kooagent_seller::server::auth::request_signature(
        KEY.as_bytes(),
        &nonce,
        &ts,
        body.as_bytes(),
    );
    format!(
        "POST {PATH}?signature={sig}&timestamp={ts}&nonce={nonce} HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads one HTTP/1.1 response with Content-Length; returns the body.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("content-length");
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            return buf[end + 4..end + 4 + len].to_vec();
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before an answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct Round {
    latencies: Vec<Duration>,
    wall: Duration,
    bodies: Vec<String>,
    /// CPU time (µs) the server and the client used from the start signal to the last
    /// answer: in the warm round the requests alone, in the cold round handshakes too.
    server_cpu_us: f64,
    client_cpu_us: f64,
    /// PostgreSQL's processes (0 with SQLite, which runs inside the server).
    db_cpu_us: f64,
}

async fn round(
    n: usize,
    ports: &[u16],
    connector: TlsConnector,
    name: &'static str,
    warm: bool,
    server_pids: &[u32],
    pg: bool,
) -> Round {
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (connector, barrier) = (connector.clone(), barrier.clone());
        let req = request(i, name);
        let port = ports[i % ports.len()];
        tasks.push(tokio::spawn(async move {
            let connect = || async {
                let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                connector.connect(name, tcp).await.unwrap()
            };
            let (t0, mut s) = if warm {
                let s = connect().await;
                barrier.wait().await;
                (Instant::now(), s)
            } else {
                barrier.wait().await;
                let t0 = Instant::now();
                (t0, connect().await)
            };
            s.write_all(&req).await.unwrap();
            let body = read_response(&mut s).await;
            // Warm: the connection stays open, as a kept-alive one does; it is closed
            // after the timed window. Cold: one connection per order, closed in it.
            let kept = warm.then_some(s);
            (t0.elapsed(), String::from_utf8(body).unwrap(), kept)
        }));
    }
    barrier.wait().await;
    let t0 = Instant::now();
    // PostgreSQL's processes are found by a scan of /proc, which costs the client CPU
    // inside the window: only when there are any.
    let db_cpu = || if pg { db_cpu_us() } else { 0.0 };
    let (server0, client0, db0) = (servers_cpu_us(server_pids), self_cpu_us(), db_cpu());
    let mut latencies = Vec::new();
    let mut bodies = Vec::new();
    let mut kept = Vec::new();
    for t in tasks {
        let (l, b, s) = t.await.unwrap();
        latencies.push(l);
        bodies.push(b);
        kept.push(s);
    }
    let wall = t0.elapsed();
    if std::env::var_os("KOOAGENT_BENCH_MARKS").is_some() {
        // For `perf record -k CLOCK_MONOTONIC` then `perf report --time START,END`.
        eprintln!(
            "{name} window (CLOCK_MONOTONIC s): {:.6},{:.6}",
            monotonic_s() - wall.as_secs_f64(),
            monotonic_s()
        );
    }
    let (server_cpu_us, client_cpu_us, db_cpu_us) = (
        servers_cpu_us(server_pids) - server0,
        self_cpu_us() - client0,
        db_cpu() - db0,
    );
    if warm {
        // Let the server finish closing them before the next round.
        drop(kept);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latencies.sort();
    Round {
        latencies,
        wall,
        bodies,
        server_cpu_us,
        client_cpu_us,
        db_cpu_us,
    }
}

fn servers_cpu_us(pids: &[u32]) -> f64 {
    pids.iter().map(|p| proc_cpu_us(*p)).sum()
}

/// CPU time of every process named `postgres` on this machine (the bench's database;
/// connections are opened before the timed windows, so none come or go inside them).
fn db_cpu_us() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(common::process_cpu_us)
        .sum()
}

/// CPU time (user + system, all threads) of process `pid` so far, in µs.
fn proc_cpu_us(pid: u32) -> f64 {
    common::process_cpu_us(pid).expect("the process's CPU clock")
}

/// CPU time (user + system) of this process, the bench client, so far, in µs (what
/// getrusage(RUSAGE_SELF) adds up, at nanosecond resolution).
fn self_cpu_us() -> f64 {
    proc_cpu_us(std::process::id())
}

/// A `/proc/PID/status` size (`VmRSS:`, `VmHWM:`) of the servers, added up, in MiB.
fn resident_mib(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum::<u64>()
        / 1024
}

/// The 1-minute load average (`/proc/loadavg`), "?" where there is none.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Median and largest time (ms) of 20 appends of 4 KiB, each followed by fsync, in `dir`:
/// the wait one SQLite commit (WAL, synchronous=FULL) has at least.
fn fsync_ms(dir: &Path) -> (f64, f64) {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let mut t: Vec<f64> = (0..20)
        .map(|_| {
            f.write_all(&[0u8; 4096]).unwrap();
            let t0 = Instant::now();
            f.sync_all().unwrap();
            t0.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    drop(f);
    std::fs::remove_file(&path).unwrap();
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[t.len() - 1])
}

fn monotonic_s() -> f64 {
    // SAFETY: clock_gettime fills a local struct.
    let t = unsafe {
        let mut t: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t);
        t
    };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    // A thousand connections on each side: lift the soft descriptor limit to the hard one
    // (the server inherits it).
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
    let pg = std::env::var("KOOAGENT_BENCH_PG_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let processes: usize = std::env::var("KOOAGENT_BENCH_PROCESSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let schema = format!("bench_{}_{}", std::process::id(), now_ms());
    let storage = match &pg {
        Some(url) => format!("database_url = \"{url}\"\ndatabase_schema = \"{schema}\"\n"),
        None => String::new(),
    };
    let dir = tempfile::Builder::new()
        .prefix("kb")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let key = kooagent_edge::keyfile::generate().unwrap();
    private(
        &d.join("seller.key"),
        &kooagent_edge::keyfile::private_pem(&key),
    );
    private(&d.join("ik"), KEY);
    let tls_key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&tls_key)
        .unwrap();
    std::fs::write(d.join("tls.crt"), cert.pem()).unwrap();
    private(&d.join("tls.key"), &tls_key.serialize_pem());
    std::fs::write(
        d.join("s.toml"),
        format!(
            "[seller_server]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{d}/tls.crt\"\nkey_file = \"{d}/tls.key\"\n\
             signing_key_file = \"{d}/seller.key\"\ninterconnection_key_file = \"{d}/ik\"\n\
             state_dir = \"{d}/state\"\n{storage}\
             # Every connection comes from 127.0.0.1 (the marketplace's stand-in).\n\
             max_connections_per_address = 0\n[[seller_server.products]]\npath = \"{PATH}\"\nproduct = \"bench\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    let (server, serve) = common::server();
    let mut children = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..processes {
        let mut child = Command::new(&server)
            .args(["--log-level", "warn"])
            .args(serve)
            .arg("--config")
            .arg(d.join("s.toml"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        ports.push(
            line.trim()
                .rsplit(':')
                .next()
                .unwrap()
                .parse::<u16>()
                .expect("listening line"),
        );
        children.push(child);
    }
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();

    let connector = common::tls_connector(cert.der());
    // The server's allocator settings (kooagent_seller::server::heap) for the client too,
    // its heap warmed as a worker's is: it allocates per order as the server does, on
    // the same two CPUs, and the first touch of its pages is no cost of the server's.
    kooagent_seller::server::heap::keep_freed_memory();
    kooagent_seller::server::heap::warm_this_thread(kooagent_seller::server::heap::WORKER_HEAP);
    // One thread for the client: it shares the two CPUs with the server, and a
    // multi-threaded runtime's work stealing and cross-thread wake-ups cost it CPU the
    // marketplace's many separate clients would not put on this machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let store = match &pg {
        Some(_) => format!("PostgreSQL, {processes} server process(es)"),
        None => "SQLite (WAL, synchronous=FULL)".to_string(),
    };
    println!("seller serve: {n} concurrent getLicense orders, {store}, TLS on loopback, {cpus} CPUs shared by client, server and database");
    println!("client: one tokio current_thread runtime (one OS thread), glibc heap kept (server::heap); warm: one kept-alive TLS connection per order, cold: a fresh one per order");
    // What the machine gives besides our code: p99 follows the other processes' load
    // (the CPUs) and the disk's fsync latency (each group commit waits for one), the CPU
    // columns much less. Printed so that every table carries its conditions.
    let (fsync_median, fsync_max) = fsync_ms(d);
    println!(
        "machine: load average {} before the rounds; fsync of a 4 KiB append on the state directory's file system: median {fsync_median:.1} ms, max {fsync_max:.1} ms (of 20)",
        load_average()
    );
    println!(
        "{:<8} {:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10} {:>10} {:>10}",
        "round",
        "ok",
        "dups",
        "p50 ms",
        "p99 ms",
        "max ms",
        "wall ms",
        "orders/s",
        "server µs",
        "client µs",
        "db µs"
    );
    println!(
        "server memory before the rounds: resident {} MiB",
        resident_mib(&pids, "VmRSS:")
    );
    let mut all_texts = std::collections::HashSet::new();
    let mut total_ok = 0;
    for (name, warm) in [("warm", true), ("cold", false)] {
        let r = rt.block_on(round(
            n,
            &ports,
            connector.clone(),
            name,
            warm,
            &pids,
            pg.is_some(),
        ));
        let (server_cpu, client_cpu) = (r.server_cpu_us / n as f64, r.client_cpu_us / n as f64);
        let mut ok = 0;
        let mut dups = 0;
        for b in &r.bodies {
            let v: serde_json::Value = serde_json::from_str(b).unwrap();
            if v["resultCode"] == "000000" {
                ok += 1;
                if !all_texts.insert(v["license"].as_str().unwrap().to_string()) {
                    dups += 1;
                }
            } else {
                eprintln!("refused: {b}");
            }
        }
        total_ok += ok;
        println!(
            "{:<8} {:>6} {:>5} {:>8.1} {:>8.1} {:>8.1} {:>8.0} {:>9.0} {:>10.0} {:>10.0} {:>10.0}",
            name,
            ok,
            dups,
            pct(&r.latencies, 0.50),
            pct(&r.latencies, 0.99),
            pct(&r.latencies, 1.0),
            r.wall.as_secs_f64() * 1000.0,
            n as f64 / r.wall.as_secs_f64(),
            server_cpu,
            client_cpu,
            r.db_cpu_us / n as f64
        );
    }
    println!(
        "server memory after the rounds: resident {} MiB, peak {} MiB",
        resident_mib(&pids, "VmRSS:"),
        resident_mib(&pids, "VmHWM:")
    );
    for mut child in children {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    // What the database holds: one license per order, no more.
    const COUNTS: &str = "SELECT (SELECT COUNT(*) FROM licenses), \
        (SELECT COUNT(DISTINCT license_id) FROM licenses), (SELECT COUNT(*) FROM events)";
    let (rows, ids, events): (i64, i64, i64) = match &pg {
        Some(url) => {
            let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
            c.batch_execute(&format!("SET search_path TO {schema}"))
                .unwrap();
            let r = c.query_one(COUNTS, &[]).unwrap();
            let out = (r.get(0), r.get(1), r.get(2));
            c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .unwrap();
            out
        }
        None => rusqlite::Connection::open(d.join("state/seller.db"))
            .unwrap()
            .query_row(COUNTS, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap(),
    };
    println!(
        "database: {rows} licenses, {ids} distinct license ids, {events} events; answered {total_ok}; load average after: {}",
        load_average()
    );
    assert_eq!(
        (rows, ids, events),
        (total_ok as i64, total_ok as i64, total_ok as i64)
    );
}
