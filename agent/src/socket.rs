//! The local Unix socket server: binds safely (refuses a live second agent, replaces a
//! stale socket file), then serves newline-delimited JSON with one task per connection.
//! A wakeup of a connection is one read of what has arrived and one write of every answer
//! to it; buffers are borrowed from a per-thread pool (`socket_buffers`) only while bytes
//! are being served, so an idle connection costs a parked task and no buffer, never a
//! thread or a poll loop. Connections idle longer than
//! `socket.idle_timeout_secs` are closed (`watch` streams excepted), and one uid may hold at
//! most `socket.max_connections_per_uid` of them.

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::agent::Agent;
use crate::ops::{Call, Dispatcher, Peer, Reply};
use crate::protocol::{self, codes, OpError, MAX_LINE};
use crate::socket_buffers;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another agent is already listening on {0}; stop it first (or set socket.path)")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("socket group {group:?} (socket.group): {message}")]
    Group { group: String, message: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BindError + 'a {
    move |source| BindError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A bound listening socket plus what is needed to clean it up.
pub struct Bound {
    pub listener: std::os::unix::net::UnixListener,
    pub path: PathBuf,
    inode: u64,
}

impl Bound {
    /// Removes the socket file if it is still the one we created.
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.ino() == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds `path` with `mode`, giving `group` access. `group_required`: fail when the group
/// does not exist (it was configured explicitly) instead of keeping the default group.
pub fn bind(path: &Path, mode: u32, group: &str, group_required: bool) -> Result<Bound, BindError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                log::info!(
                    "replacing stale socket {} left by an earlier run",
                    path.display()
                );
                std::fs::remove_file(path).map_err(io_err("remove stale socket", path))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("probe existing socket", path)(e)),
        },
        Ok(_) => return Err(BindError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", path)(e)),
    }
    // Bind under a tight umask, set mode and group, and only then listen: a client can
    // never connect while the socket still has the wrong mode or group.
    let old = crate::sys::set_umask(0o177);
    let bound = bind_unlistened(path);
    crate::sys::set_umask(old);
    let fd = bound.map_err(io_err("bind", path))?;
    let cleanup = |e: BindError| {
        let _ = std::fs::remove_file(path);
        e
    };
    if group.is_empty() {
        // `socket.group = ""`: no group change (a developer's host has no kooagent group).
    } else if let Some(gid) = lookup_group(group).map_err(|m| {
        cleanup(BindError::Group {
            group: group.into(),
            message: m,
        })
    })? {
        if let Err(e) = chown_group(path, gid) {
            if group_required {
                return Err(cleanup(BindError::Group {
                    group: group.into(),
                    message: format!("cannot give it the socket: {e}"),
                }));
            }
            log::debug!("socket group {group} not applied: {e}");
        }
    } else if group_required {
        return Err(cleanup(BindError::Group {
            group: group.into(),
            message: format!(
                "no such group (create it: groupadd {group}; or set socket.group = \"\" to \
                 keep the agent's own group, e.g. when trying the agent on a workstation)"
            ),
        }));
    } else {
        log::debug!("socket group {group} does not exist; keeping the process's group");
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| cleanup(io_err("set mode of", path)(e)))?;
    if let Err(e) = crate::sys::listen(&fd, 1024) {
        return Err(cleanup(io_err("listen on", path)(e)));
    }
    let listener = std::os::unix::net::UnixListener::from(fd);
    let inode = std::fs::symlink_metadata(path)
        .map_err(|e| cleanup(io_err("inspect", path)(e)))?
        .ino();
    Ok(Bound {
        listener,
        path: path.to_path_buf(),
        inode,
    })
}

/// socket(2) + bind(2) without listen(2).
fn bind_unlistened(path: &Path) -> io::Result<OwnedFd> {
    crate::sys::unix_socket_bound(path)
}

/// A group name, or a numeric gid (used as is: it needs no /etc/group entry to own a file).
fn lookup_group(name: &str) -> Result<Option<u32>, String> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
        return name
            .parse::<u32>()
            .map(Some)
            .map_err(|_| "numeric gid out of range".to_string());
    }
    crate::sys::group_id(name)
}

fn chown_group(path: &Path, gid: u32) -> io::Result<()> {
    // Under the systemd unit the process already runs with this group, and the unit's
    // syscall filter refuses chown: only call it when there is something to change.
    if std::fs::symlink_metadata(path)?.gid() == gid {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, None, Some(gid))
}

/// Descriptors kept out of the connection budget: the ledger, state files, the log, inotify
/// and timer descriptors, upstream HTTPS connections, the runtime's own.
pub const FD_RESERVE: usize = 64;

/// How many connections fit under the descriptor limit `nofile`, at most `configured`.
pub fn connection_cap(configured: usize, nofile: u64) -> usize {
    let fit = usize::try_from(nofile)
        .unwrap_or(usize::MAX)
        .saturating_sub(FD_RESERVE);
    configured.min(fit).max(1)
}

/// One descriptor held back so that a connection can still be accepted, told `busy` and
/// closed when the process is out of descriptors: otherwise it would wait in the backlog
/// (its client hanging in `connect`) and the listener would stay readable, spinning.
struct Spare(Option<std::fs::File>);

impl Spare {
    fn new() -> Spare {
        Spare(std::fs::File::open("/dev/null").ok())
    }

    /// Frees the spare descriptor, refuses one waiting connection with `busy`, takes the
    /// descriptor back. Whether a connection was refused.
    fn refuse_one(&mut self, listener: &UnixListener) -> bool {
        self.0 = None;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let refused = match listener.poll_accept(&mut cx) {
            std::task::Poll::Ready(Ok((stream, _))) => {
                let _ = stream.try_write(&busy_line());
                true
            }
            _ => false,
        };
        self.0 = std::fs::File::open("/dev/null").ok();
        refused
    }
}

fn busy_line() -> Vec<u8> {
    let mut out = Vec::new();
    let err = OpError::new(codes::BUSY, "too many connections; retry later");
    protocol::write_err(&mut out, &serde_json::Value::Null, &err);
    out
}

/// What bounds the connections [`serve`] accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// All connections together (already fitted under the descriptor limit).
    pub max_connections: usize,
    /// Connections one uid may hold at once.
    pub per_uid: usize,
    /// A connection with no request for this long is closed; None: never.
    pub idle_timeout: Option<Duration>,
}

/// Serves connections until `shutdown` turns true, then waits (bounded) for in-flight
/// requests to finish.
pub async fn serve(
    listener: UnixListener,
    agent: Arc<Agent>,
    dispatcher: Arc<Dispatcher>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_uid = Arc::new(crate::socket_limits::PerUid::new(limits.per_uid));
    let live = agent.connections.clone();
    let mut spare = Spare::new();
    // Out-of-descriptor refusals since the last warning: one line a minute, not one per client.
    let mut refused_for_fds = 0u64;
    let mut last_warning: Option<std::time::Instant> = None;
    // Each connection holds a clone; when all are gone, `recv` returns None.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) if crate::sys::is_out_of_descriptors(&e) => {
                if spare.refuse_one(&listener) {
                    refused_for_fds += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    log::warn!(
                        "out of file descriptors ({e}): {refused_for_fds} connection(s) \
                         answered `busy`; raise LimitNOFILE or lower socket.max_connections"
                    );
                    refused_for_fds = 0;
                    last_warning = Some(std::time::Instant::now());
                }
                continue;
            }
            Err(e) => {
                // Other transient failures: back off briefly instead of spinning.
                log::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream, busy_line()));
            continue;
        };
        let peer = peer_of(&stream);
        let Some(uid_slot) = per_uid.try_take(peer.uid) else {
            log::debug!("uid {} is at its connection cap; answered `busy`", peer.uid);
            tokio::spawn(refuse_busy(stream, busy_uid_line(peer.uid, limits.per_uid)));
            continue;
        };
        let agent = agent.clone();
        let dispatcher = dispatcher.clone();
        let shutdown = shutdown.clone();
        let alive = alive_tx.clone();
        let open = live.opened();
        let idle_timeout = limits.idle_timeout;
        tokio::spawn(async move {
            if let Err(e) =
                connection(stream, peer, agent, dispatcher, idle_timeout, shutdown).await
            {
                log::debug!("connection ended: {e}");
            }
            drop(uid_slot);
            drop(permit);
            drop(open);
            drop(alive);
        });
    }
    drop(alive_tx);
    let _ = tokio::time::timeout(Duration::from_millis(900), alive_rx.recv()).await;
}

async fn refuse_busy(mut stream: UnixStream, line: Vec<u8>) {
    let _ = stream.write_all(&line).await;
}

fn busy_uid_line(uid: u32, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let err = OpError::new(
        codes::BUSY,
        format!(
            "too many connections from uid {uid} (at most {cap}, socket.max_connections_per_uid); \
             retry later"
        ),
    );
    protocol::write_err(&mut out, &serde_json::Value::Null, &err);
    out
}

/// The connecting process's credentials (SO_PEERCRED), or nobody's when unavailable.
fn peer_of(stream: &UnixStream) -> Peer {
    match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(e) => {
            log::debug!("peer credentials unavailable: {e}");
            Peer {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            }
        }
    }
}

/// A connection and the bytes read from it but not yet served: the rest of a pipelined
/// burst while one of its requests is being served, or a request that has not fully
/// arrived. Holds no buffer while everything read has been served (an idle connection
/// costs its task and nothing more); while it has one, the buffer comes from
/// [`socket_buffers`] and goes back there.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    pos: usize,
    /// The line being received is longer than MAX_LINE: its bytes are dropped up to its
    /// newline, which is answered with `line_too_long`.
    discarding: bool,
}

/// Most calls served as one group (see [`gather`]); bounds the answers held back.
const MAX_GROUP: usize = 256;
/// Most bytes buffered while looking for more calls to add to a group.
const GATHER_BYTES: usize = 16 * 1024;
/// Answers held before they are written even though requests remain buffered.
const MAX_HELD_ANSWERS: usize = 64 * 1024;

/// A complete request line in [`Conn::buf`] (without its newline), or one too long.
enum Next {
    Line(std::ops::Range<usize>),
    TooLong,
}

impl Conn {
    fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            pos: 0,
            discarding: false,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// The next complete line buffered, without consuming it.
    fn peek(&self) -> Option<(Next, usize)> {
        let i = memchr_newline(self.buffered())?;
        let end = self.pos + i + 1;
        if self.discarding || i > MAX_LINE {
            return Some((Next::TooLong, end));
        }
        Some((Next::Line(self.pos..self.pos + i), end))
    }

    /// The next complete line buffered, consumed.
    fn next_line(&mut self) -> Option<Next> {
        let (next, end) = self.peek()?;
        self.pos = end;
        self.discarding = false;
        Some(next)
    }

    /// After the complete lines are served: gives the buffer back when nothing is left,
    /// else keeps only the partial line (dropped, and remembered as too long, past
    /// MAX_LINE).
    fn settle(&mut self) {
        let rest = self.buf.len() - self.pos;
        if rest > MAX_LINE || (self.discarding && rest > 0) {
            self.discarding = true;
            self.buf.truncate(self.pos);
        }
        if self.pos == self.buf.len() {
            socket_buffers::give(std::mem::take(&mut self.buf));
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// One read(2) of what has arrived, appended to what is buffered. Ok(0): end of stream.
    fn read(&mut self) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf = socket_buffers::take();
        }
        // A line spanning many chunks grows the buffer geometrically, not a chunk at a time.
        let want = socket_buffers::CHUNK.max(self.buf.len());
        if self.buf.capacity() - self.buf.len() < socket_buffers::CHUNK / 2 {
            self.buf.reserve(want);
        }
        read_some(&self.stream, &mut self.buf)
    }

    /// Reads what has already arrived, without waiting, after what is buffered. Whether
    /// anything was added (false at end of stream, on an error, which the next read
    /// reports, and once `GATHER_BYTES` are buffered).
    fn try_more(&mut self) -> bool {
        if self.discarding || self.buffered().len() >= GATHER_BYTES {
            return false;
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        matches!(self.read(), Ok(n) if n > 0)
    }
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

/// One read(2) into the spare capacity of `buf`, when the socket may be readable. A read
/// that does not fill it has taken every byte there was, so it also marks the socket not
/// readable: the next wait parks at once rather than first paying a read that only says
/// EAGAIN (one syscall in four per request). Bytes that arrive later raise a new readiness
/// event (the reactor is edge-triggered, and clears only the readiness it saw), so none is
/// missed.
fn read_some(stream: &UnixStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let want = buf.capacity() - buf.len();
    let mut short = None;
    let r = stream.try_io(tokio::io::Interest::READABLE, || {
        let n = rustix::io::read(stream, rustix::buffer::spare_capacity(&mut *buf))
            .map_err(io::Error::from)?;
        if n > 0 && n < want {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, short) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

/// Writes all of `data`: at once when the socket takes it (the usual case), else as it
/// drains.
async fn write_all(stream: &UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One request of a group: its id, and its call or why it could not be parsed.
type Slot = (protocol::Id, Result<Call, OpError>);

/// Takes the calls of `op` that follow `first` on the connection and have already arrived
/// (buffered, or readable without waiting), up to the first request of another operation,
/// which stays buffered to be served after them, in order. A line that does not parse is
/// part of the group: it gets its error in its place and changes nothing.
fn gather(conn: &mut Conn, op: &str, first: Slot, peer: Peer) -> Vec<Slot> {
    let mut group = vec![first];
    while group.len() < MAX_GROUP {
        let Some((next, end)) = conn.peek() else {
            if conn.try_more() {
                continue;
            }
            break;
        };
        let Next::Line(range) = next else { break };
        let line = &conn.buf[range];
        if line.iter().all(u8::is_ascii_whitespace) {
            conn.pos = end;
            continue;
        }
        match protocol::parse_request(line) {
            Ok(req) if req.op == op => {
                group.push((
                    req.id,
                    Ok(Call {
                        params: req.params,
                        peer,
                    }),
                ));
            }
            Ok(_) => break,
            Err((id, err)) => group.push((id, Err(err))),
        }
        conn.pos = end;
    }
    group
}

/// Serves a group from [`gather`]: its calls together, its answers in order into `out`.
async fn serve_group(
    out: &mut Vec<u8>,
    group: Vec<Slot>,
    op: &str,
    agent: Arc<Agent>,
    dispatcher: &Dispatcher,
) {
    let mut ids = Vec::with_capacity(group.len());
    let mut calls = Vec::with_capacity(group.len());
    for (id, call) in group {
        ids.push((id, call.as_ref().err().cloned()));
        if let Ok(c) = call {
            calls.push(c);
        }
    }
    let mut answers = dispatcher
        .dispatch_group(agent, op, calls)
        .await
        .into_iter();
    for (id, failed) in ids {
        let answer = match failed {
            Some(e) => Err(e),
            None => answers.next().unwrap_or_else(|| {
                Err(OpError::internal("the group handler gave too few answers"))
            }),
        };
        write_answer(out, &id, answer);
    }
}

/// Writes one answer of a group (no group operation streams).
fn write_answer(out: &mut Vec<u8>, id: &protocol::Id, answer: crate::ops::OpResult) {
    match answer {
        Ok(Reply::Value(v)) => protocol::write_ok(out, id, &v),
        Ok(Reply::Json(text)) => protocol::write_ok_json(out, id, &text),
        Ok(Reply::Stream(_)) => protocol::write_err(
            out,
            id,
            &OpError::internal("a stream cannot be answered in a group"),
        ),
        Err(e) => protocol::write_err(out, id, &e),
    }
}

fn write_too_long(out: &mut Vec<u8>) {
    let err = OpError::new(
        codes::LINE_TOO_LONG,
        format!("request line longer than {MAX_LINE} bytes was refused"),
    );
    protocol::write_err(out, &serde_json::Value::Null, &err);
}

/// What woke a connection waiting for its next request.
enum Wake {
    Readable(io::Result<()>),
    Idle,
    Stop,
}

/// Serves one connection: each wakeup reads what has arrived (one read), serves every
/// complete request in it in order and writes all their answers at once (one write).
async fn connection(
    stream: UnixStream,
    peer: Peer,
    agent: Arc<Agent>,
    dispatcher: Arc<Dispatcher>,
    idle_timeout: Option<Duration>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    log::debug!(
        "connection from uid={} gid={} pid={:?}",
        peer.uid,
        peer.gid,
        peer.pid
    );
    let mut conn = Conn::new(stream);
    let mut stopping = *shutdown.borrow();
    let mut stop_rx = shutdown.clone();
    let stop = stop_rx.changed();
    tokio::pin!(stop);
    // One idle timer for the connection's life, moved on lazily: serving a request only
    // notes the time, and when the timer fires early it is set again from that note. (A
    // timer armed and cancelled per request cost two timer-wheel updates each.)
    let idle = idle_timeout.map(tokio::time::sleep);
    tokio::pin!(idle);
    let mut last_active = tokio::time::Instant::now();
    loop {
        if stopping && conn.buffered().is_empty() {
            break;
        }
        let woke = std::future::poll_fn(|cx| {
            if !stopping && stop.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(Wake::Stop);
            }
            if let std::task::Poll::Ready(r) = conn.stream.poll_read_ready(cx) {
                return std::task::Poll::Ready(Wake::Readable(r));
            }
            match idle.as_mut().as_pin_mut().map(|t| t.poll(cx)) {
                Some(std::task::Poll::Ready(())) => std::task::Poll::Ready(Wake::Idle),
                _ => std::task::Poll::Pending,
            }
        })
        .await;
        match woke {
            Wake::Stop => {
                stopping = true;
                continue;
            }
            Wake::Idle => {
                let timeout = idle_timeout.unwrap_or_default();
                let due = last_active + timeout;
                if tokio::time::Instant::now() >= due {
                    log::debug!(
                        "closing a connection of uid={} idle for {timeout:?} \
                         (socket.idle_timeout_secs)",
                        peer.uid
                    );
                    break;
                }
                if let Some(t) = idle.as_mut().as_pin_mut() {
                    t.reset(due);
                }
                continue;
            }
            Wake::Readable(r) => r?,
        }
        let eof = match conn.read() {
            Ok(n) => n == 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.settle();
                continue;
            }
            Err(e) => return Err(e),
        };
        if eof && (conn.discarding || !conn.buffered().is_empty()) {
            // A last request without its newline is still served.
            conn.buf.push(b'\n');
        }
        let mut out = socket_buffers::take();
        while let Some(next) = conn.next_line() {
            let range = match next {
                Next::TooLong => {
                    write_too_long(&mut out);
                    continue;
                }
                Next::Line(range) => range,
            };
            let line = &conn.buf[range];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            // A plain request is read in place; a hot operation is answered there, straight
            // into `out` (no task, no allocation). Everything else is served as before.
            let parsed = match protocol::parse_request_ref(line) {
                Some(req) if dispatcher.answer_inline(&agent, &req, peer, &mut out) => {
                    log::trace!("uid={} op={}", peer.uid, req.op);
                    None
                }
                Some(req) => Some(Ok(req.to_request())),
                None => Some(protocol::parse_request(line)),
            };
            match parsed {
                None => {}
                Some(Err((id, err))) => protocol::write_err(&mut out, &id, &err),
                Some(Ok(req)) if dispatcher.groups(&req.op) => {
                    let call = Call {
                        params: req.params,
                        peer,
                    };
                    let group = gather(&mut conn, &req.op, (req.id, Ok(call)), peer);
                    serve_group(&mut out, group, &req.op, agent.clone(), &dispatcher).await;
                }
                Some(Ok(req)) => {
                    log::trace!("uid={} op={}", peer.uid, req.op);
                    let call = Call {
                        params: req.params,
                        peer,
                    };
                    match dispatcher.dispatch(agent.clone(), &req.op, call).await {
                        Ok(Reply::Value(v)) => protocol::write_ok(&mut out, &req.id, &v),
                        Ok(Reply::Json(text)) => protocol::write_ok_json(&mut out, &req.id, &text),
                        Err(e) => protocol::write_err(&mut out, &req.id, &e),
                        Ok(Reply::Stream(events)) => {
                            write_all(&conn.stream, &out).await?;
                            socket_buffers::give(out);
                            return stream_events(conn, &req.id, events, shutdown).await;
                        }
                    }
                }
            }
            if out.len() >= MAX_HELD_ANSWERS {
                write_all(&conn.stream, &out).await?;
                out.clear();
            }
        }
        conn.settle();
        // Every answer of the wakeup in one write.
        if !out.is_empty() {
            write_all(&conn.stream, &out).await?;
        }
        socket_buffers::give(out);
        if eof {
            break;
        }
        if idle_timeout.is_some() {
            last_active = tokio::time::Instant::now();
        }
    }
    Ok(())
}

/// A `watch` stream: exempt from the idle timeout (it waits for events, not requests).
/// Events queued together go out in one write, as soon as they are sent.
async fn stream_events(
    conn: Conn,
    id: &protocol::Id,
    mut events: mpsc::Receiver<serde_json::Value>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    // Whatever followed the `watch` request is not read: the connection now carries events.
    let Conn { stream, buf, .. } = conn;
    socket_buffers::give(buf);
    let mut out = Vec::new();
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => {
                    out.clear();
                    protocol::write_event(&mut out, id, &ev);
                    while let Ok(ev) = events.try_recv() {
                        protocol::write_event(&mut out, id, &ev);
                    }
                    write_all(&stream, &out).await?;
                }
                None => return Ok(()),
            },
            // The client closing its side ends the stream; anything it sends is dropped.
            r = stream.readable() => {
                r?;
                let mut sink = [0u8; 256];
                match stream.try_read(&mut sink) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_under_the_descriptor_limit() {
        assert_eq!(connection_cap(16_384, 1024), 1024 - FD_RESERVE);
        assert_eq!(connection_cap(16_384, 1 << 20), 16_384);
        assert_eq!(connection_cap(100, u64::MAX), 100);
        assert_eq!(connection_cap(100, 10), 1);
    }
}
