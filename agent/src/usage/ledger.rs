//! The usage ledger: an append-only log of checksummed entries in segment files under
//! `<state_dir>/usage/`, written by one thread that commits in groups.
//!
//! Why a log and not an embedded database (redb, sled): every change here is an append
//! (usage deltas, closes, delivery marks) and the whole model fits in memory, so a log of
//! `[len u32][crc32 u32][JSON entry]` frames is all the store needs. Its failure modes are
//! few and testable: a torn last frame is detected by length and CRC, cut off on open
//! and kept aside for inspection; anything before it was fsynced before any caller was
//! answered. A new segment starts with a snapshot of the model and is installed by
//! rename, so compaction is "write the snapshot, rename, delete the old segment", and the
//! ledger's size is bounded by the snapshot plus one segment's worth of appends.
//!
//! Group commit: callers queue commands on a channel; the writer takes everything queued,
//! writes it as one append, calls `fdatasync` once, applies it to the in-memory model and
//! only then answers. Closing hours and pruning run alone (they read the model), so a
//! close never misses usage committed in the same group.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::Serialize;
use tokio::sync::oneshot;

use super::hours::{self, Key};
use super::state::{Delta, Entry, State};
use crate::clock::Clock;
use crate::store;

const MAGIC: &[u8; 8] = b"KOOLEDG1";
const FRAME_HEADER: usize = 8;
/// A frame larger than this is corruption, not data.
const MAX_FRAME: u32 = 256 << 20;
/// Commands waiting for the writer before callers are told to retry.
const QUEUE: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("the disk holding the usage ledger is full; nothing was recorded ({0})")]
    DiskFull(String),
    #[error("the usage ledger reached usage.max_bytes ({0} bytes); nothing was recorded")]
    Full(u64),
    #[error("the usage ledger could not be written; nothing was recorded ({0})")]
    Io(String),
    #[error("the usage ledger is unavailable: {0}")]
    Unavailable(String),
    #[error("the usage ledger is busy; retry shortly")]
    Busy,
}

impl LedgerError {
    fn from_io(e: &io::Error) -> LedgerError {
        if crate::sys::is_disk_full(e) {
            LedgerError::DiskFull(e.to_string())
        } else {
            LedgerError::Io(e.to_string())
        }
    }
}

/// What opening found and repaired, for `usage.status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    /// Bytes of a torn or corrupt tail cut off the last segment on open.
    pub torn_bytes: u64,
    /// Whole, checksummed entries found inside that tail, after the damaged one. A crash
    /// tears only the last, unacknowledged group, which leaves none; any here may have been
    /// acknowledged (a second writer, or damage) and are kept for inspection.
    pub torn_entries: u64,
    /// Where those bytes were kept.
    pub torn_saved_as: Option<PathBuf>,
    /// Segments that could not be read at all and were moved aside.
    pub quarantined: Vec<PathBuf>,
    /// Entries replayed on open.
    pub replayed_entries: u64,
}

/// One segment file being appended to.
pub struct Log {
    dir: PathBuf,
    seq: u64,
    file: File,
    len: u64,
}

fn segment_name(seq: u64) -> String {
    format!("ledger-{seq:016}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("ledger-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = (payload.len() as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    out.extend_from_slice(&len);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// Splits `data` (after the magic) into frames; returns them and the length of the valid
/// prefix.
fn read_frames(data: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0;
    while data.len() - pos >= FRAME_HEADER {
        let len_bytes: [u8; 4] = data[pos..pos + 4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(len_bytes);
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().expect("4 bytes"));
        if len > MAX_FRAME || data.len() - pos - FRAME_HEADER < len as usize {
            break;
        }
        let payload = &data[pos + FRAME_HEADER..pos + FRAME_HEADER + len as usize];
        let mut h = crc32fast::Hasher::new();
        h.update(&len_bytes);
        h.update(payload);
        if h.finalize() != crc {
            break;
        }
        frames.push(payload);
        pos += FRAME_HEADER + len as usize;
    }
    (frames, pos)
}

/// Whole frames inside a cut tail: scans every offset after the damaged first frame for a
/// length and CRC that check out, skipping over each one found.
fn intact_frames_in(tail: &[u8]) -> u64 {
    let mut n = 0;
    let mut pos = 1;
    while pos + FRAME_HEADER <= tail.len() {
        let (frames, valid) = read_frames(&tail[pos..]);
        if frames.is_empty() {
            pos += 1;
        } else {
            n += frames.len() as u64;
            pos += valid;
        }
    }
    n
}

/// Torn tails and unreadable segments kept for inspection, newest first; older ones are
/// deleted so repeated crashes cannot fill the disk with evidence.
const KEEP_EVIDENCE: usize = 5;

fn prune_evidence(dir: &Path, keep: usize) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut kept: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("ledger-") && (n.contains(".torn.") || n.contains(".corrupt."))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    kept.sort_by_key(|k| std::cmp::Reverse(k.0));
    for (_, p) in kept.into_iter().skip(keep) {
        let _ = fs::remove_file(p);
    }
}

pub struct Opened {
    pub log: Log,
    /// The payloads of the segment in force, its base snapshot first.
    pub frames: Vec<Vec<u8>>,
    pub recovery: Recovery,
}

impl Log {
    /// Opens the newest readable segment in `dir`, cutting off a torn tail. `None` when
    /// there is none yet (the caller creates one with [`Log::create`]).
    pub fn open(dir: &Path, now: i64) -> io::Result<(Option<Opened>, Recovery)> {
        let mut recovery = Recovery::default();
        let mut seqs = Vec::new();
        for ent in fs::read_dir(dir)? {
            let ent = ent?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.starts_with(".ledger-") && name.ends_with(".tmp") {
                // A rotation that did not reach its rename: never acknowledged anything.
                let _ = fs::remove_file(ent.path());
            } else if let Some(seq) = parse_segment_name(&name) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        prune_evidence(dir, KEEP_EVIDENCE);
        let mut chosen = None;
        for (i, &seq) in seqs.iter().enumerate() {
            let path = dir.join(segment_name(seq));
            let mut data = Vec::new();
            File::open(&path)?.read_to_end(&mut data)?;
            let (frames, valid) = if data.len() >= MAGIC.len() && &data[..MAGIC.len()] == MAGIC {
                let (f, v) = read_frames(&data[MAGIC.len()..]);
                (f, v + MAGIC.len())
            } else {
                (Vec::new(), 0)
            };
            if frames.is_empty() {
                // No readable base snapshot: not a segment we can use. Keep it aside.
                let q = store::quarantine(&path, now).map_err(|e| e.source)?;
                log::error!(
                    "usage ledger: segment {} is unreadable; moved to {}",
                    path.display(),
                    q.display()
                );
                recovery.quarantined.push(q);
                continue;
            }
            if valid < data.len() {
                let tail = &data[valid..];
                let saved = dir.join(format!("{}.torn.{now}", segment_name(seq)));
                fs::write(&saved, tail)?;
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(valid as u64)?;
                f.sync_all()?;
                let intact = intact_frames_in(tail);
                if intact == 0 {
                    log::warn!(
                        "usage ledger: cut a torn tail of {} bytes off {} (kept in {}): \
                         a partial entry and no whole one, so nothing acknowledged",
                        tail.len(),
                        path.display(),
                        saved.display()
                    );
                } else {
                    log::error!(
                        "usage ledger: cut {} bytes off {} (kept in {}) holding {intact} \
                         whole entries after a damaged one; they may have been acknowledged \
                         (a second writer or disk damage), inspect the kept file",
                        tail.len(),
                        path.display(),
                        saved.display()
                    );
                }
                recovery.torn_entries = intact;
                recovery.torn_bytes = tail.len() as u64;
                recovery.torn_saved_as = Some(saved);
            }
            let frames: Vec<Vec<u8>> = frames.into_iter().map(<[u8]>::to_vec).collect();
            chosen = Some((seq, frames, valid as u64));
            // Older segments are superseded by this one's snapshot.
            for &old in &seqs[i + 1..] {
                let _ = fs::remove_file(dir.join(segment_name(old)));
            }
            break;
        }
        let Some((seq, frames, len)) = chosen else {
            return Ok((None, recovery));
        };
        let file = OpenOptions::new()
            .write(true)
            .open(dir.join(segment_name(seq)))?;
        store::sync_dir(dir).map_err(|e| e.source)?;
        let log = Log {
            dir: dir.to_path_buf(),
            seq,
            file,
            len,
        };
        Ok((
            Some(Opened {
                log,
                frames,
                recovery: recovery.clone(),
            }),
            recovery,
        ))
    }

    /// Starts a ledger with a first segment holding `base`.
    pub fn create(dir: &Path, base: &[u8]) -> io::Result<Log> {
        Log::install(dir, 1, base)
    }

    /// Writes segment `seq` holding `base` under a temporary name, fsyncs it, renames it
    /// into place and fsyncs the directory: it appears whole or not at all.
    fn install(dir: &Path, seq: u64, base: &[u8]) -> io::Result<Log> {
        let name = segment_name(seq);
        let tmp = dir.join(format!(".{name}.tmp"));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            let mut buf = Vec::with_capacity(base.len() + 16);
            buf.extend_from_slice(MAGIC);
            frame(base, &mut buf);
            f.write_all(&buf)?;
            f.sync_all()?;
            fs::rename(&tmp, dir.join(&name))?;
            store::sync_dir(dir).map_err(|e| e.source)?;
            Ok(Log {
                dir: dir.to_path_buf(),
                seq,
                file: OpenOptions::new().write(true).open(dir.join(&name))?,
                len: buf.len() as u64,
            })
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Appends the payloads as one write and makes them durable. On failure the segment
    /// is cut back to where it was, so a failed append leaves no partial frame behind.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + 8).sum());
        for p in payloads {
            frame(p, &mut buf);
        }
        let result = (|| {
            use std::os::unix::fs::FileExt;
            self.file.write_all_at(&buf, self.len)?;
            self.file.sync_data()
        })();
        match result {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                let _ = self.file.sync_all();
                Err(e)
            }
        }
    }

    /// Starts a new segment from `base` (a snapshot) and deletes the old one.
    pub fn rotate(&mut self, base: &[u8]) -> io::Result<()> {
        let next = Log::install(&self.dir, self.seq + 1, base)?;
        let old = self.dir.join(segment_name(self.seq));
        *self = next;
        let _ = fs::remove_file(old);
        let _ = store::sync_dir(&self.dir);
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(segment_name(self.seq))
    }
}

/// One usage record, validated and resolved to its key.
#[derive(Debug, Clone)]
pub struct Item {
    pub key: Key,
    /// When the usage happened (Unix seconds).
    pub at: i64,
    /// Amount in 10^-9 units, > 0.
    pub value: i128,
}

pub type Reply<T> = oneshot::Sender<Result<T, LedgerError>>;

enum Cmd {
    /// Answers with each item's effective hour.
    Record(Vec<Item>, Reply<Vec<i64>>),
    Close {
        device_code: String,
        lateness: i64,
        reply: Reply<usize>,
    },
    Mark(Entry, Reply<()>),
    Prune(i64, Reply<()>),
    Stop,
}

impl Cmd {
    /// Commands that read the model run alone, after everything queued before them.
    fn is_barrier(&self) -> bool {
        matches!(self, Cmd::Close { .. } | Cmd::Prune(..) | Cmd::Stop)
    }
}

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

impl LedgerConfig {
    /// A segment is compacted into a fresh snapshot once it grows past this.
    fn rotate_bytes(&self) -> u64 {
        (self.max_bytes / 4).max(64 * 1024)
    }
    /// The most a snapshot may take; older records are dropped (and counted) beyond it.
    /// Saturating: on a 32-bit target an `as usize` would wrap a budget of 4 GiB or more
    /// (`max_bytes` ≥ 8 GiB) to almost nothing and drop every record.
    fn snapshot_budget(&self) -> usize {
        usize::try_from(self.max_bytes / 2).unwrap_or(usize::MAX)
    }
}

/// Facts about the ledger for `usage.status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Info {
    pub open: bool,
    pub error: Option<String>,
    pub path: Option<PathBuf>,
    pub bytes: u64,
    pub commits: u64,
    pub rotations: u64,
    pub last_write_error: Option<String>,
    pub recovery: Recovery,
}

struct Shared {
    state: Mutex<State>,
    info: Mutex<Info>,
    /// Set once the open has finished (successfully or not).
    opened: (Mutex<bool>, std::sync::Condvar),
}

impl Shared {
    fn set_opened(&self) {
        *self.opened.0.lock().expect("opened lock") = true;
        self.opened.1.notify_all();
    }
}

/// The writer's end of the command queue. The queue is bounded by a count rather than
/// by `sync_channel`, whose array allocates and touches every slot up front (16k
/// commands: 1.25 MiB resident in an agent that may never record usage); this one
/// allocates as it fills.
struct Inbox {
    rx: Receiver<Cmd>,
    queued: Arc<AtomicUsize>,
}

impl Inbox {
    fn took(&self, c: Cmd) -> Cmd {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        c
    }
    fn recv(&self) -> Result<Cmd, mpsc::RecvError> {
        self.rx.recv().map(|c| self.took(c))
    }
    fn try_recv(&self) -> Result<Cmd, TryRecvError> {
        self.rx.try_recv().map(|c| self.took(c))
    }
    fn recv_timeout(&self, d: std::time::Duration) -> Result<Cmd, RecvTimeoutError> {
        self.rx.recv_timeout(d).map(|c| self.took(c))
    }
}

/// Handle to the ledger's writer thread; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    tx: Sender<Cmd>,
    /// Commands sent and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Ledger {
    /// Starts the writer thread, which opens (or creates) the ledger and then serves.
    /// Commands sent before the open completes wait for it.
    pub fn start(cfg: LedgerConfig, clock: Arc<dyn Clock>) -> Ledger {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let inbox = Inbox {
            rx,
            queued: queued.clone(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            info: Mutex::new(Info::default()),
            opened: (Mutex::new(false), std::sync::Condvar::new()),
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("usage-ledger".into())
            .spawn(move || writer(cfg, clock, s, inbox))
            .expect("spawning the ledger thread");
        Ledger {
            tx,
            queued,
            shared,
            thread: Arc::new(Mutex::new(Some(handle))),
        }
    }

    fn send(&self, cmd: Cmd) -> Result<(), LedgerError> {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(LedgerError::Busy);
        }
        self.push(cmd)
    }

    /// Queues past the bound (stop must always get through).
    fn push(&self, cmd: Cmd) -> Result<(), LedgerError> {
        if self.tx.send(cmd).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(LedgerError::Unavailable("the ledger has stopped".into()));
        }
        Ok(())
    }

    /// Queues records; the answer (each item's hour) comes once they are durable.
    pub async fn record(&self, items: Vec<Item>) -> Result<Vec<i64>, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Record(items, tx))?;
        rx.await
            .unwrap_or_else(|_| Err(LedgerError::Unavailable("the ledger has stopped".into())))
    }

    /// Closes every closable hour (blocking; for the upload thread). Returns how many
    /// records were made.
    pub fn close_hours(&self, device_code: &str, lateness: i64) -> Result<usize, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Close {
            device_code: device_code.into(),
            lateness,
            reply: tx,
        })?;
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(LedgerError::Unavailable("the ledger has stopped".into())))
    }

    /// Writes a delivery mark (blocking).
    pub fn mark(&self, entry: Entry) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Mark(entry, tx))?;
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(LedgerError::Unavailable("the ledger has stopped".into())))
    }

    /// Forgets what ended before `cutoff` (blocking), counting what was never sent.
    pub fn prune(&self, cutoff: i64) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Prune(cutoff, tx))?;
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(LedgerError::Unavailable("the ledger has stopped".into())))
    }

    /// Waits (blocking) until the ledger has been opened and replayed, at most `timeout`.
    /// True when it has.
    pub fn wait_open(&self, timeout: std::time::Duration) -> bool {
        let (lock, cv) = &self.shared.opened;
        let guard = lock.lock().expect("opened lock");
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |opened| !*opened)
            .expect("opened lock");
        *guard
    }

    /// The model as of the last commit.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("ledger state lock")
    }

    pub fn info(&self) -> Info {
        self.shared.info.lock().expect("ledger info lock").clone()
    }

    /// Finishes what is queued and stops the writer.
    pub fn stop(&self) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.push(Cmd::Stop);
        if let Some(h) = self.thread.lock().expect("thread lock").take() {
            let _ = h.join();
        }
    }
}

fn encode(e: &Entry) -> Vec<u8> {
    serde_json::to_vec(e).expect("entries serialise")
}

/// Opens the ledger and rebuilds the model.
fn open(cfg: &LedgerConfig, now: i64) -> Result<(Log, State, Recovery), String> {
    store::ensure_dir(&cfg.dir, 0o700).map_err(|e| e.to_string())?;
    let (opened, recovery) =
        Log::open(&cfg.dir, now).map_err(|e| format!("{}: {e}", cfg.dir.display()))?;
    let Some(opened) = opened else {
        let state = State::new(now);
        let base = encode(&Entry::Snapshot(Box::new(state.snapshot())));
        let log = Log::create(&cfg.dir, &base)
            .map_err(|e| format!("creating the ledger in {}: {e}", cfg.dir.display()))?;
        return Ok((log, state, recovery));
    };
    let mut state = State::default();
    let mut recovery = opened.recovery;
    for (i, f) in opened.frames.iter().enumerate() {
        let e: Entry = serde_json::from_slice(f).map_err(|e| {
            format!(
                "entry {i} of {} is not readable by this version ({e}); \
                 the file is left untouched",
                opened.log.path().display()
            )
        })?;
        if i == 0 && !matches!(e, Entry::Snapshot(_)) {
            return Err(format!(
                "{} does not start with a snapshot; the file is left untouched",
                opened.log.path().display()
            ));
        }
        state.apply(&e);
    }
    recovery.replayed_entries = opened.frames.len() as u64;
    Ok((opened.log, state, recovery))
}

struct Writer {
    cfg: LedgerConfig,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    log: Log,
    /// Don't retry a failed compaction on every commit.
    next_rotate_at: u64,
}

fn writer(cfg: LedgerConfig, clock: Arc<dyn Clock>, shared: Arc<Shared>, rx: Inbox) {
    let (log, state, recovery) = match open(&cfg, clock.now_secs()) {
        Ok(v) => v,
        Err(e) => {
            log::error!("usage ledger: {e}");
            shared.info.lock().expect("info lock").error = Some(e.clone());
            shared.set_opened();
            // Answer everything with the reason until told to stop.
            while let Ok(cmd) = rx.recv() {
                let err = LedgerError::Unavailable(e.clone());
                match cmd {
                    Cmd::Record(_, r) => drop(r.send(Err(err))),
                    Cmd::Close { reply, .. } => drop(reply.send(Err(err))),
                    Cmd::Mark(_, r) | Cmd::Prune(_, r) => drop(r.send(Err(err))),
                    Cmd::Stop => break,
                }
            }
            return;
        }
    };
    {
        let mut info = shared.info.lock().expect("info lock");
        info.open = true;
        info.path = Some(log.path());
        info.bytes = log.len();
        info.recovery = recovery;
    }
    *shared.state.lock().expect("state lock") = state;
    shared.set_opened();
    let mut w = Writer {
        next_rotate_at: cfg.rotate_bytes(),
        cfg,
        clock,
        shared,
        log,
    };
    let mut group: Vec<Cmd> = Vec::new();
    let mut held: Option<Cmd> = None;
    // Recent group size in commands, ×8 for precision without floats.
    let mut usual_group: u64 = 8;
    loop {
        let first = match held.take() {
            Some(c) => c,
            None => match rx.recv() {
                Ok(c) => c,
                Err(_) => return,
            },
        };
        if first.is_barrier() {
            if matches!(first, Cmd::Stop) {
                return;
            }
            w.barrier(first);
            continue;
        }
        group.push(first);
        while let Ok(c) = rx.try_recv() {
            if c.is_barrier() {
                held = Some(c);
                break;
            }
            group.push(c);
        }
        // Callers answered by the last commit are still sending their next command: with
        // many concurrent writers, wait a moment for them rather than paying a whole fsync
        // for a fraction of the group. A single writer never waits (its average is 1).
        let target = (usual_group * 3 / 32) as usize;
        if held.is_none() && group.len() < target {
            let deadline = std::time::Instant::now() + GATHER;
            while group.len() < target {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match rx.recv_timeout(left) {
                    Ok(c) if c.is_barrier() => {
                        held = Some(c);
                        break;
                    }
                    Ok(c) => group.push(c),
                    Err(_) => break,
                }
            }
        }
        // Moving average of group sizes, in commands.
        usual_group = (usual_group * 7 + group.len() as u64 * 8).div_ceil(8);
        usual_group = usual_group.min(8 * 1024);
        w.commit_group(std::mem::take(&mut group));
    }
}

/// The longest a commit waits for more writers to join it.
const GATHER: std::time::Duration = std::time::Duration::from_micros(300);

impl Writer {
    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("state lock")
    }

    /// Appends `entries` durably, then applies them. Checks the size bound first.
    fn write(&mut self, entries: &[Entry]) -> Result<(), LedgerError> {
        let payloads: Vec<Vec<u8>> = entries.iter().map(encode).collect();
        let size: u64 = payloads.iter().map(|p| p.len() as u64 + 8).sum();
        if self.log.len() + size > self.cfg.max_bytes {
            self.rotate();
            if self.log.len() + size > self.cfg.max_bytes {
                return Err(LedgerError::Full(self.cfg.max_bytes));
            }
        }
        if let Err(e) = self.log.append(&payloads) {
            let err = LedgerError::from_io(&e);
            log::error!("usage ledger: {err}");
            self.shared.info.lock().expect("info lock").last_write_error = Some(err.to_string());
            return Err(err);
        }
        {
            let mut st = self.state();
            for e in entries {
                st.apply(e);
            }
        }
        {
            let mut info = self.shared.info.lock().expect("info lock");
            info.commits += 1;
            info.bytes = self.log.len();
            info.last_write_error = None;
        }
        if self.log.len() >= self.next_rotate_at {
            self.rotate();
        }
        Ok(())
    }

    /// Compacts: a new segment holding only the snapshot of the model.
    fn rotate(&mut self) {
        let mut snap = self.state().clone();
        let dropped = snap.shrink_to(self.cfg.snapshot_budget());
        let base = encode(&Entry::Snapshot(Box::new(snap.snapshot())));
        match self.log.rotate(&base) {
            Ok(()) => {
                if dropped > 0 {
                    log::warn!(
                        "usage ledger: dropped {dropped} old records to stay within usage.max_bytes"
                    );
                }
                *self.state() = snap;
                self.next_rotate_at = self.log.len() + self.cfg.rotate_bytes();
                let mut info = self.shared.info.lock().expect("info lock");
                info.rotations += 1;
                info.bytes = self.log.len();
                info.path = Some(self.log.path());
            }
            Err(e) => {
                log::warn!("usage ledger: compaction failed, will retry later: {e}");
                self.next_rotate_at = self.log.len() + self.cfg.rotate_bytes() / 4;
            }
        }
    }

    fn commit_group(&mut self, group: Vec<Cmd>) {
        let now = self.clock.now_secs();
        let closed_before = self.state().closed_before;
        let mut deltas: HashMap<(i64, Key), (i128, u64)> = HashMap::new();
        let mut entries = Vec::new();
        let mut record_replies = Vec::new();
        let mut mark_replies = Vec::new();
        for cmd in group {
            match cmd {
                Cmd::Record(items, reply) => {
                    let mut hours_of = Vec::with_capacity(items.len());
                    for it in items {
                        let h = hours::effective_hour(it.at, closed_before, now);
                        hours_of.push(h);
                        let d = deltas.entry((h, it.key)).or_insert((0, 0));
                        d.0 += it.value;
                        d.1 += 1;
                    }
                    record_replies.push((reply, hours_of));
                }
                Cmd::Mark(e, reply) => {
                    entries.push(e);
                    mark_replies.push(reply);
                }
                _ => unreachable!("barriers are committed alone"),
            }
        }
        if !deltas.is_empty() {
            let mut d: Vec<Delta> = deltas
                .into_iter()
                .map(|((h, k), (v, n))| Delta { k, h, v, n })
                .collect();
            d.sort_by(|a, b| (a.h, &a.k).cmp(&(b.h, &b.k)));
            entries.push(Entry::Usage(d));
        }
        let result = self.write(&entries);
        for (reply, hours_of) in record_replies {
            let _ = reply.send(result.clone().map(|_| hours_of));
        }
        for reply in mark_replies {
            let _ = reply.send(result.clone());
        }
    }

    fn barrier(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Close {
                device_code,
                lateness,
                reply,
            } => {
                let now = self.clock.now_secs();
                let closing = {
                    let st = self.state();
                    hours::close(
                        &st.open,
                        &st.carry,
                        st.closed_before,
                        now,
                        lateness,
                        &device_code,
                    )
                };
                let result = match closing {
                    None => Ok(0),
                    Some(c) => {
                        let n = c.records.len();
                        self.write(&[Entry::close(c)]).map(|_| n)
                    }
                };
                let _ = reply.send(result);
            }
            Cmd::Prune(cutoff, reply) => {
                let needed = {
                    let st = self.state();
                    st.records.values().any(|s| s.rec.end() < cutoff)
                        || st.open.keys().any(|(h, _)| h + hours::HOUR < cutoff)
                };
                let result = if needed {
                    self.write(&[Entry::Prune { cutoff }])
                } else {
                    Ok(())
                };
                let _ = reply.send(result);
            }
            _ => unreachable!("only barriers"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    const T0: i64 = 1_700_000_000 / 3600 * 3600;

    /// 32-bit hazards (run on armv7 under qemu by scripts/cross-test.sh): sizes past 4 GiB
    /// never wrap, and frames are little-endian on every target.
    #[test]
    fn word_size_budgets_and_frames() {
        let cfg = |max_bytes: u64| LedgerConfig {
            dir: PathBuf::new(),
            max_bytes,
        };
        for max in [64 << 20, 6 << 30, 8 << 30, 10 << 30, u64::MAX] {
            let budget = cfg(max).snapshot_budget() as u128;
            let want = u128::from(max / 2).min(usize::MAX as u128);
            assert_eq!(budget, want, "max_bytes {max}");
            assert!(cfg(max).rotate_bytes() >= 64 * 1024);
        }
        let mut out = Vec::new();
        frame(b"{}", &mut out);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[2, 0, 0, 0]);
        crc.update(b"{}");
        let mut want = vec![2, 0, 0, 0];
        want.extend_from_slice(&crc.finalize().to_le_bytes());
        want.extend_from_slice(b"{}");
        assert_eq!(out, want);
        let (frames, valid) = read_frames(&out);
        assert_eq!((frames, valid), (vec![&b"{}"[..]], out.len()));
    }

    #[test]
    fn a_full_queue_answers_busy_and_frees_a_slot_per_command_taken() {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let inbox = Inbox {
            rx,
            queued: queued.clone(),
        };
        // No writer thread: nothing drains the queue but this test.
        let ledger = Ledger {
            tx,
            queued,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                info: Mutex::new(Info::default()),
                opened: (Mutex::new(true), std::sync::Condvar::new()),
            }),
            thread: Arc::new(Mutex::new(None)),
        };
        let prune = || Cmd::Prune(0, oneshot::channel().0);
        for _ in 0..QUEUE {
            ledger.send(prune()).unwrap();
        }
        assert_eq!(ledger.send(prune()), Err(LedgerError::Busy));
        assert!(matches!(inbox.try_recv(), Ok(Cmd::Prune(..))));
        ledger.send(prune()).unwrap();
        assert_eq!(ledger.send(prune()), Err(LedgerError::Busy));
        // Stop gets through a full queue.
        ledger.stop();
        let mut last = None;
        while let Ok(c) = inbox.try_recv() {
            last = Some(c);
        }
        assert!(matches!(last, Some(Cmd::Stop)));
        assert_eq!(inbox.queued.load(Ordering::Relaxed), 0);
    }

    fn key(m: &str) -> Key {
        Key {
            instance: "inst".into(),
            meter: m.into(),
            pkg: None,
        }
    }

    fn item(m: &str, at: i64, v: i128) -> Item {
        Item {
            key: key(m),
            at,
            value: v,
        }
    }

    fn start(dir: &Path, clock: Arc<FakeClock>, max_bytes: u64) -> Ledger {
        Ledger::start(
            LedgerConfig {
                dir: dir.to_path_buf(),
                max_bytes,
            },
            clock,
        )
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn records_survive_a_restart_and_a_torn_tail_is_cut() {
        let d = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new((T0 + 100) * 1000));
        let l = start(d.path(), clock.clone(), 1 << 20);
        let hours = rt()
            .block_on(l.record(vec![item("cpu", T0 + 5, 10), item("cpu", T0 - 3600, 5)]))
            .unwrap();
        assert_eq!(hours, vec![T0, T0 - 3600]);
        l.stop();
        // Garbage at the end, as a write torn by a crash would leave.
        let seg = d.path().join(segment_name(1));
        let good = fs::metadata(&seg).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0x20, 0, 0, 0, 1, 2, 3, 4, 5, 6]).unwrap();
        drop(f);
        let l = start(d.path(), clock.clone(), 1 << 20);
        rt().block_on(l.record(vec![item("cpu", T0 + 6, 1)]))
            .unwrap();
        let info = l.info();
        assert_eq!(info.recovery.torn_bytes, 10);
        assert!(info.recovery.torn_saved_as.as_ref().unwrap().exists());
        assert!(fs::metadata(&seg).unwrap().len() > good);
        assert_eq!(l.state().totals["cpu"].records, 3);
        assert_eq!(l.state().open[&(T0, key("cpu"))], 11);
        l.stop();
        let l = start(d.path(), clock, 1 << 20);
        // Wait for the open by queueing a no-op prune.
        l.prune(0).unwrap();
        assert_eq!(l.info().recovery.torn_bytes, 0);
        assert_eq!(l.state().totals["cpu"].value, 16);
    }

    #[test]
    fn a_cut_tail_counts_the_whole_entries_it_holds() {
        // A crash tears the last group: a partial frame, nothing whole after it.
        let mut torn = Vec::new();
        frame(b"{\"a\":1}", &mut torn);
        torn.truncate(torn.len() - 3);
        assert_eq!(intact_frames_in(&torn), 0);
        // A second writer overwrote the middle of a frame and appended its own: two whole
        // entries sit behind the damaged one, and the cut must say so.
        let mut tail = vec![0x40, 0, 0, 0, 9, 9, 9, 9, 1, 2, 3];
        frame(b"{\"b\":2}", &mut tail);
        frame(b"{\"c\":3}", &mut tail);
        assert_eq!(intact_frames_in(&tail), 2);
        let d = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new((T0 + 100) * 1000));
        let l = start(d.path(), clock.clone(), 1 << 20);
        rt().block_on(l.record(vec![item("cpu", T0 + 5, 10)]))
            .unwrap();
        l.stop();
        let seg = d.path().join(segment_name(1));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&tail).unwrap();
        drop(f);
        let l = start(d.path(), clock, 1 << 20);
        l.prune(0).unwrap();
        let info = l.info();
        assert_eq!(info.recovery.torn_bytes, tail.len() as u64);
        assert_eq!(info.recovery.torn_entries, 2);
        l.stop();
    }

    #[test]
    fn close_freezes_records_and_late_usage_moves_on() {
        let d = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new((T0 + 10) * 1000));
        let l = start(d.path(), clock.clone(), 1 << 20);
        rt().block_on(l.record(vec![item("cpu", T0 - 3600, 2_000_000_000)]))
            .unwrap();
        assert_eq!(l.close_hours("dev", 0).unwrap(), 1);
        assert_eq!(l.close_hours("dev", 0).unwrap(), 0);
        let sn = l.state().pending(10)[0].sn.clone();
        let hours = rt()
            .block_on(l.record(vec![item("cpu", T0 - 3600, 1)]))
            .unwrap();
        assert_eq!(hours, vec![T0], "late usage goes to the current hour");
        l.mark(Entry::Delivered {
            sns: vec![sn.clone()],
            at: T0,
            upstream: "u".into(),
            http: 200,
        })
        .unwrap();
        l.stop();
        let l = start(d.path(), clock, 1 << 20);
        l.prune(0).unwrap();
        assert_eq!(l.state().count(), (0, 1, 0));
        assert_eq!(l.state().records[&sn].rec.usage_value, "2");
    }

    #[test]
    fn compaction_keeps_the_ledger_bounded_and_loses_nothing() {
        let d = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new((T0 + 10) * 1000));
        let l = start(d.path(), clock.clone(), 256 * 1024);
        let rt = rt();
        for i in 0..300 {
            let items = (0..10)
                .map(|j| item(&format!("m{}", (i + j) % 7), T0 + i, 1))
                .collect();
            rt.block_on(l.record(items)).unwrap();
        }
        let info = l.info();
        assert!(info.rotations >= 1, "{info:?}");
        assert!(info.bytes <= 256 * 1024);
        let total: u64 = l.state().totals.values().map(|t| t.records).sum();
        assert_eq!(total, 3000);
        l.stop();
        let segs: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| parse_segment_name(&e.unwrap().file_name().to_string_lossy()))
            .collect();
        assert_eq!(segs.len(), 1, "old segments are deleted");
        let l = start(d.path(), clock, 256 * 1024);
        l.prune(0).unwrap();
        let total: u64 = l.state().totals.values().map(|t| t.records).sum();
        assert_eq!(total, 3000);
    }

    #[test]
    fn concurrent_writers_share_commits() {
        let d = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new((T0 + 10) * 1000));
        let l = start(d.path(), clock, 8 << 20);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..64 {
                let l = l.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..20 {
                        l.record(vec![item("cpu", T0, 1)]).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        assert_eq!(l.state().totals["cpu"].records, 64 * 20);
        // Group commit: fewer commits than records (at least some sharing).
        assert!(l.info().commits < 64 * 20, "{:?}", l.info());
        l.stop();
    }

    #[test]
    fn an_unreadable_segment_is_kept_aside() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(segment_name(3)), b"not a ledger").unwrap();
        let clock = Arc::new(FakeClock::new(T0 * 1000));
        let l = start(d.path(), clock, 1 << 20);
        l.prune(0).unwrap();
        let info = l.info();
        assert_eq!(info.recovery.quarantined.len(), 1);
        assert!(info.open);
        l.stop();
    }
}
