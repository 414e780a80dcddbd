//! Client for the KooAgent local socket (protocol v1, see `docs/protocol.md`).
//!
//! Blocking and dependency-light on purpose: it is linked into the seller's software (also
//! through the C ABI in `kooagent-ffi`), which may have no async runtime.
//!
//! ```no_run
//! let mut agent = kooagent_client::Client::new(kooagent_client::default_socket_path());
//! let code = agent.device_code()?;
//! println!("{}", code.code);
//! # Ok::<(), kooagent_client::ClientError>(())
//! ```
//!
//! Reconnects: when the agent restarts, the next call reconnects with backoff (for up to
//! `reconnect_for`). A request is sent again after a reconnect only when it is safe: either
//! it never left this process, or the operation only reads (see [`is_read_only`]). For
//! operations that change state (recording usage, installing a license) a lost connection
//! after sending is reported as [`ClientError::ConnectionLost`], because the agent may or
//! may not have applied it.
//!
//! [`CachedClient`] answers `license.check` from the verdict table the agent streams (no
//! round trip), falling back to the socket when it cannot (see [`cached`]).
//!
//! [`protocol`] is the wire format (the agent parses and writes with it too) and
//! [`catalogue`] lists every operation: its params, its answer, whether it only reads and
//! who may call it.

pub mod cached;
pub mod catalogue;
pub mod protocol;

pub use cached::{CachedClient, Verdict};

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

pub const PROTOCOL_VERSION: u64 = protocol::VERSION;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // `cause`, not `source`: the message already holds the OS error, and an error chain
    // printer (anyhow's `{:#}`) would print it a second time.
    #[error("cannot reach the agent at {path}: {cause} (is `kooagent run` running?)")]
    Connect { path: String, cause: io::Error },
    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection to the agent was lost after the request was sent; it may or may not have been applied")]
    ConnectionLost,
    #[error("the agent sent an unreadable answer: {0}")]
    BadAnswer(String),
    #[error("{code}: {message}")]
    Op {
        code: String,
        message: String,
        details: Option<Value>,
    },
}

impl ClientError {
    /// The agent's stable error code, when the agent answered with an error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Op { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The socket the agent uses by default for this user: `$KOOAGENT_SOCKET`, else the
/// system agent's `/run/kooagent/agent.sock` when it exists, else the per-user one.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KOOAGENT_SOCKET") {
        return PathBuf::from(p);
    }
    let system = PathBuf::from("/run/kooagent/agent.sock");
    if system.exists() {
        return system;
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("kooagent/agent.sock"),
        None => system,
    }
}

/// Operations that only read state: safe to send again after a reconnect. The catalogue
/// says which; an operation it does not know is treated as one that changes state.
pub fn is_read_only(op: &str) -> bool {
    catalogue::operation(op).is_some_and(|o| o.read_only)
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// A connection to the agent that reconnects on demand.
pub struct Client {
    path: PathBuf,
    conn: Option<Conn>,
    next_id: u64,
    timeout: Duration,
    reconnect_for: Duration,
    line: String,
}

impl Client {
    /// A client for `path`; it connects on the first call.
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client {
            path: path.into(),
            conn: None,
            next_id: 1,
            timeout: Duration::from_secs(30),
            reconnect_for: Duration::from_secs(10),
            line: String::new(),
        }
    }

    /// Connects now, failing at once if the agent is unreachable (no reconnect window).
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let mut c = Client::new(path).reconnect_for(Duration::ZERO);
        c.ensure_connected()?;
        c.reconnect_for = Duration::from_secs(10);
        Ok(c)
    }

    /// How long one answer may take.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// How long to keep trying to reconnect when the agent is away (restarting).
    pub fn reconnect_for(mut self, t: Duration) -> Self {
        self.reconnect_for = t;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> Result<Conn, ClientError> {
        let s = UnixStream::connect(&self.path).map_err(|cause| ClientError::Connect {
            path: self.path.display().to_string(),
            cause,
        })?;
        s.set_read_timeout(Some(self.timeout))?;
        s.set_write_timeout(Some(self.timeout))?;
        Ok(Conn {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    fn ensure_connected(&mut self) -> Result<(), ClientError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + self.reconnect_for;
        let mut wait = Duration::from_millis(20);
        loop {
            match self.open() {
                Ok(c) => {
                    self.conn = Some(c);
                    return Ok(());
                }
                Err(e) if Instant::now() + wait > deadline => return Err(e),
                Err(_) => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Sends one request and returns its `result`, or the agent's error.
    pub fn call(&mut self, op: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&json!({
            "v": PROTOCOL_VERSION, "id": id, "op": op, "params": params
        }))
        .map_err(|e| ClientError::BadAnswer(format!("request not encodable: {e}")))?;
        line.push(b'\n');
        let mut retried = false;
        loop {
            self.ensure_connected()?;
            let failure = match self.exchange(&line, id) {
                Ok(answer) => return answer,
                Err(f) => f,
            };
            // A timed-out answer may still arrive later: never resend over it.
            let safe = match &failure {
                Failure::BeforeSend(_) => true,
                Failure::AfterSend(ClientError::Timeout(_)) => false,
                Failure::AfterSend(_) => is_read_only(op),
            };
            if retried || !safe {
                return Err(match failure {
                    Failure::BeforeSend(e) => e,
                    Failure::AfterSend(e @ ClientError::Timeout(_)) => e,
                    Failure::AfterSend(_) => ClientError::ConnectionLost,
                });
            }
            // The connection broke (the agent restarted?): reconnect and send it again.
            retried = true;
        }
    }

    fn exchange(&mut self, line: &[u8], id: u64) -> Result<Result<Value, ClientError>, Failure> {
        let conn = self.conn.as_mut().expect("connected");
        if let Err(e) = conn.writer.write_all(line) {
            self.conn = None;
            return Err(Failure::BeforeSend(e.into()));
        }
        self.line.clear();
        let read = conn.reader.read_line(&mut self.line);
        match read {
            Ok(0) => {
                self.conn = None;
                return Err(Failure::AfterSend(ClientError::ConnectionLost));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                self.conn = None;
                return Err(Failure::AfterSend(ClientError::Timeout(self.timeout)));
            }
            Err(e) => {
                self.conn = None;
                return Err(Failure::AfterSend(e.into()));
            }
            Ok(_) => {}
        }
        Ok(decode(&self.line, id))
    }

    /// `ping`.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.call("ping", json!({})).map(|_| ())
    }

    /// `agent.status`, as JSON (its fields grow with the agent's capabilities).
    pub fn status(&mut self) -> Result<Value, ClientError> {
        self.call("agent.status", json!({}))
    }

    /// `device.code`.
    pub fn device_code(&mut self) -> Result<DeviceCode, ClientError> {
        typed(self.call("device.code", json!({}))?)
    }

    /// `license.check`: may the software run, and with which entitlements. No license
    /// installed for `product` is an answer (state `no_license`, not allowed), not an error.
    pub fn check(&mut self, product: &str, feature: Option<&str>) -> Result<Check, ClientError> {
        let mut params = json!({ "product": product });
        if let Some(f) = feature {
            params["feature"] = json!(f);
        }
        match self.call("license.check", params) {
            Ok(v) => typed(v),
            Err(ClientError::Op { code, message, .. }) if code == "no_license" => Ok(Check {
                state: code,
                allowed: false,
                days_left: None,
                license_id: None,
                reason: Some(message),
                features: vec![],
                limits: Default::default(),
                extra: Default::default(),
            }),
            Err(e) => Err(e),
        }
    }

    /// `usage.record`: durable once this returns Ok. `value` is a decimal string ("1.5").
    pub fn record_usage(&mut self, meter: &str, value: &str) -> Result<Value, ClientError> {
        self.call("usage.record", json!({ "meter": meter, "value": value }))
    }

    /// Opens a dedicated connection streaming state changes (`watch`).
    pub fn watch(&self, params: Value) -> Result<Watch, ClientError> {
        Watch::open(self.path.clone(), params, self.reconnect_for)
    }
}

enum Failure {
    BeforeSend(ClientError),
    AfterSend(ClientError),
}

fn decode(line: &str, id: u64) -> Result<Value, ClientError> {
    let mut v: Value = serde_json::from_str(line)
        .map_err(|e| ClientError::BadAnswer(format!("{e}: {}", line.trim_end())))?;
    if v["id"] != json!(id) {
        return Err(ClientError::BadAnswer(format!(
            "answer for id {} instead of {id}",
            v["id"]
        )));
    }
    if v["ok"] == json!(true) {
        return Ok(v["result"].take());
    }
    let e = &mut v["error"];
    Err(ClientError::Op {
        code: e["code"].as_str().unwrap_or("unknown").to_string(),
        message: e["message"].as_str().unwrap_or("").to_string(),
        details: Some(e["details"].take()).filter(|d| !d.is_null()),
    })
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ClientError> {
    T::deserialize(&v).map_err(|e| ClientError::BadAnswer(format!("{e}: {v}")))
}

/// The device identification code and its clone/drift status.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceCode {
    pub code: String,
    pub status: String,
    #[serde(default)]
    pub accepted_codes: Vec<String>,
    #[serde(default)]
    pub product_id: String,
}

/// The answer of `license.check`.
#[derive(Debug, Clone, Deserialize)]
pub struct Check {
    /// `valid`, `grace`, `expired`, `not_yet_valid`, `wrong_device`, `bad_signature`,
    /// `untrusted_key`, `clock_rollback`, `frozen`, ...
    pub state: String,
    /// May the software run? (`valid` or `grace`, and the feature if one was asked.)
    #[serde(default)]
    pub allowed: bool,
    #[serde(default)]
    pub days_left: Option<i64>,
    #[serde(default)]
    pub license_id: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub limits: serde_json::Map<String, Value>,
    /// The whole answer, for fields this version does not model.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// A stream of events from a `watch` operation; reconnects and re-subscribes when the
/// agent restarts (the agent sends the current state first on every subscription, so a
/// reconnect cannot miss the latest state).
pub struct Watch {
    path: PathBuf,
    params: Value,
    reconnect_for: Duration,
    reader: Option<BufReader<UnixStream>>,
    line: String,
}

impl Watch {
    fn open(path: PathBuf, params: Value, reconnect_for: Duration) -> Result<Watch, ClientError> {
        let mut w = Watch {
            path,
            params,
            reconnect_for,
            reader: None,
            line: String::new(),
        };
        w.subscribe()?;
        Ok(w)
    }

    fn subscribe(&mut self) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.reconnect_for;
        let mut wait = Duration::from_millis(20);
        let mut stream = loop {
            match UnixStream::connect(&self.path) {
                Ok(s) => break s,
                Err(cause) if Instant::now() + wait > deadline => {
                    return Err(ClientError::Connect {
                        path: self.path.display().to_string(),
                        cause,
                    })
                }
                Err(_) => {
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        };
        let mut line = serde_json::to_vec(
            &json!({"v": 1, "id": "watch", "op": "watch", "params": self.params}),
        )
        .expect("watch request encodes");
        line.push(b'\n');
        stream.write_all(&line)?;
        self.reader = Some(BufReader::new(stream));
        Ok(())
    }

    /// Blocks for the next event.
    pub fn next_event(&mut self) -> Result<Value, ClientError> {
        loop {
            let reader = match self.reader.as_mut() {
                Some(r) => r,
                None => {
                    self.subscribe()?;
                    continue;
                }
            };
            self.line.clear();
            match reader.read_line(&mut self.line) {
                Ok(0) | Err(_) => {
                    self.reader = None;
                    continue;
                }
                Ok(_) => {}
            }
            let mut v: Value = serde_json::from_str(&self.line)
                .map_err(|e| ClientError::BadAnswer(format!("{e}: {}", self.line.trim_end())))?;
            if v["ok"] != json!(true) {
                let e = &mut v["error"];
                return Err(ClientError::Op {
                    code: e["code"].as_str().unwrap_or("unknown").to_string(),
                    message: e["message"].as_str().unwrap_or("").to_string(),
                    details: Some(e["details"].take()).filter(|d| !d.is_null()),
                });
            }
            return Ok(v["event"].take());
        }
    }
}

impl Iterator for Watch {
    type Item = Result<Value, ClientError>;
    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_event())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake agent: connection i answers `conns[i]` line by line, then closes; after the
    /// last connection the fake stops.
    fn fake(path: &Path, conns: Vec<Vec<&'static str>>) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for answers in conns {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                for a in answers {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap() == 0 {
                        break;
                    }
                    w.write_all(a.as_bytes()).unwrap();
                }
            }
        })
    }

    #[test]
    fn decodes_results_and_errors() {
        assert_eq!(
            decode(r#"{"v":1,"id":3,"ok":true,"result":{"pong":true}}"#, 3).unwrap(),
            json!({"pong": true})
        );
        let e = decode(
            r#"{"v":1,"id":3,"ok":false,"error":{"code":"unknown_op","message":"no"}}"#,
            3,
        )
        .unwrap_err();
        assert_eq!(e.code(), Some("unknown_op"));
        assert!(matches!(
            decode(r#"{"v":1,"id":4,"ok":true,"result":1}"#, 3),
            Err(ClientError::BadAnswer(_))
        ));
        assert!(matches!(
            decode("garbage", 3),
            Err(ClientError::BadAnswer(_))
        ));
    }

    #[test]
    fn read_only_calls_survive_a_dropped_connection() {
        let dir = std::env::temp_dir().join(format!("kac-{}-a", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        // First connection: answers once then closes; second answers again.
        let h = fake(
            &dir,
            vec![
                vec!["{\"v\":1,\"id\":1,\"ok\":true,\"result\":{\"pong\":true}}\n"],
                vec!["{\"v\":1,\"id\":2,\"ok\":true,\"result\":{\"pong\":true}}\n"],
            ],
        );
        let mut c = Client::new(&dir);
        c.ping().unwrap();
        // The first connection closes after one answer: id 2 is resent on a new one.
        c.ping().unwrap();
        h.join().unwrap();
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn state_changing_calls_report_a_lost_connection() {
        let dir = std::env::temp_dir().join(format!("kac-{}-b", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        // Second connection (if the client's write hit the closed first one): read the
        // request, then close without answering.
        let _fake = fake(
            &dir,
            vec![
                vec!["{\"v\":1,\"id\":1,\"ok\":true,\"result\":{}}\n"],
                vec![""],
            ],
        );
        let mut c = Client::new(&dir).reconnect_for(Duration::from_millis(100));
        c.record_usage("m", "1").unwrap();
        let e = c.record_usage("m", "1").unwrap_err();
        assert!(matches!(e, ClientError::ConnectionLost), "{e}");
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn the_resend_rule_is_the_catalogue() {
        for op in catalogue::OPERATIONS {
            assert_eq!(is_read_only(op.name), op.read_only, "{}", op.name);
        }
        // Read-only operations the hand-kept list of earlier versions missed.
        assert!(is_read_only("authcode.status") && is_read_only("watch"));
        assert!(!is_read_only("no.such.op"));
    }

    #[test]
    fn unreachable_agent_is_a_connect_error() {
        let e = Client::connect(Path::new("/nonexistent/agent.sock"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/agent.sock"));
    }
}
