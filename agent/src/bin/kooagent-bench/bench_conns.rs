//! `kooagent-bench`'s connection-memory measurement: a private agent's RSS before, with
//! many idle connections (each has made one request, then sits idle) and after they close,
//! beside the targets of issue 14 (≤ 4 KiB per idle connection; back within 2 MiB).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// The connection count the bench holds by default (`socket.max_connections`'s default).
pub const IDLE_CONNECTIONS: usize = 16_384;
/// Target: what one idle connection may cost.
pub const TARGET_PER_CONN_BYTES: f64 = 4096.0;
/// Target: how far above its baseline the RSS may stay once the connections are gone.
pub const TARGET_AFTER_KIB: u64 = 2048;

#[derive(Debug, Serialize)]
pub struct ConnMemory {
    pub connections: usize,
    pub baseline_rss_kib: u64,
    pub with_connections_rss_kib: u64,
    pub after_close_rss_kib: u64,
    pub per_connection_bytes: f64,
}

fn rss_kib(pid: u32) -> Result<u64> {
    Ok(crate::bench::proc_stat(pid)?.0)
}

/// RSS once it has stopped moving (trimming runs on its own thread after the last close).
fn settled_rss_kib(pid: u32) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = rss_kib(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss_kib(pid)?;
        if now == last || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

fn ping(reader: &mut BufReader<UnixStream>) -> Result<()> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.contains("\"ok\":true") {
        bail!("unexpected answer: {line}");
    }
    Ok(())
}

const PING: &[u8] = b"{\"v\":1,\"id\":1,\"op\":\"ping\"}\n";

/// Starts an agent in `dir` allowing `n` connections from one uid, and measures.
pub fn measure(exe: &Path, dir: &Path, trust: &str, n: usize) -> Result<ConnMemory> {
    let nofile = kooagent::sys::raise_fd_limit();
    if (nofile as usize) < n + 64 {
        bail!(
            "{n} idle connections need a descriptor limit above {} (ulimit -Hn is {nofile}); \
             pass --idle-connections with fewer",
            n + 64
        );
    }
    std::fs::create_dir_all(dir)?;
    let config = crate::bench::write_config_with(
        dir,
        trust,
        &format!("max_connections = {n}\nmax_connections_per_uid = {n}\n"),
    )?;
    let socket = dir.join("agent.sock");
    let (agent, _) = crate::bench::start_agent(exe, &config, &socket)?;
    let pid = agent.child.id();
    {
        let s = UnixStream::connect(&socket)?;
        (&s).write_all(PING)?;
        ping(&mut BufReader::new(s))?;
    }
    let baseline = settled_rss_kib(pid)?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let s = UnixStream::connect(&socket).with_context(|| format!("connection {i}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        (&s).write_all(PING)?;
        conns.push(BufReader::new(s));
    }
    // Every connection answered: each has been accepted and has served a request.
    for c in &mut conns {
        ping(c)?;
    }
    let with = settled_rss_kib(pid)?;
    drop(conns);
    let after = settled_rss_kib(pid)?;
    drop(agent);
    Ok(ConnMemory {
        connections: n,
        baseline_rss_kib: baseline,
        with_connections_rss_kib: with,
        after_close_rss_kib: after,
        per_connection_bytes: with.saturating_sub(baseline) as f64 * 1024.0 / n as f64,
    })
}

pub fn print_table(m: &ConnMemory, out: &mut impl Write) -> std::io::Result<()> {
    let mib = |k: u64| k as f64 / 1024.0;
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    writeln!(out, "| idle connections | measured | target | |")?;
    writeln!(out, "|---|---:|---:|---|")?;
    writeln!(
        out,
        "| RSS baseline | {:.2} MiB | | |",
        mib(m.baseline_rss_kib)
    )?;
    writeln!(
        out,
        "| RSS with {} idle connections | {:.2} MiB | ≤ {:.2} MiB | {} |",
        m.connections,
        mib(m.with_connections_rss_kib),
        mib(m.baseline_rss_kib) + m.connections as f64 * TARGET_PER_CONN_BYTES / (1 << 20) as f64,
        verdict(m.per_connection_bytes <= TARGET_PER_CONN_BYTES)
    )?;
    writeln!(
        out,
        "| per idle connection | {:.0} bytes | ≤ {:.0} bytes | {} |",
        m.per_connection_bytes,
        TARGET_PER_CONN_BYTES,
        verdict(m.per_connection_bytes <= TARGET_PER_CONN_BYTES)
    )?;
    writeln!(
        out,
        "| RSS after they close | {:.2} MiB | ≤ {:.2} MiB | {} |",
        mib(m.after_close_rss_kib),
        mib(m.baseline_rss_kib + TARGET_AFTER_KIB),
        verdict(m.after_close_rss_kib <= m.baseline_rss_kib + TARGET_AFTER_KIB)
    )?;
    Ok(())
}
