//! Starts the real `kooagent` binary on a temporary directory and talks to its socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The binary under test: cargo's build of `kooagent`, or the one `KOOAGENT_E2E_BIN` names
/// (scripts/test.sh runs this suite again on the shipped static build that way).
pub const BIN: Bin = Bin;

#[derive(Clone, Copy)]
pub struct Bin;

impl Bin {
    pub fn path(self) -> &'static str {
        static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        PATH.get_or_init(|| match std::env::var("KOOAGENT_E2E_BIN") {
            Ok(bin) => bin,
            Err(_) => {
                let bin = env!("CARGO_BIN_EXE_kooagent");
                build_seller_beside(Path::new(bin));
                bin.to_string()
            }
        })
    }
}

/// `kooagent seller ARGS` runs the `kooagent-seller` beside it (another package's binary,
/// which cargo builds for this package's tests only as a library): build it, up to date,
/// before the first test uses the agent. Cargo holds no lock while tests run. With
/// `KOOAGENT_E2E_BIN` the caller provides it (beside that binary or in PATH).
fn build_seller_beside(bin: &Path) {
    let dir = bin.parent().expect("the binary's directory");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--quiet",
            "-p",
            "kooagent-seller",
            "--bin",
            "kooagent-seller",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.file_name() == Some("release".as_ref()) {
        cargo.arg("--release");
    }
    let status = cargo
        .status()
        .expect("running cargo to build kooagent-seller");
    let seller = dir.join("kooagent-seller");
    assert!(
        status.success() && seller.is_file(),
        "the e2e tests need {} (cargo build -p kooagent-seller)",
        seller.display()
    );
}

impl AsRef<std::ffi::OsStr> for Bin {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path().as_ref()
    }
}

impl std::fmt::Display for Bin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path())
    }
}

pub struct TestAgent {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
}

/// A temp dir with a short path: Unix socket paths are limited to 107 bytes.
/// Runs `cmd` to its end and asserts it succeeded (its stderr is the failure message).
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ka")
        .tempdir_in("/tmp")
        .unwrap()
}

/// The config every test agent gets, with `extra` (TOML) merged in: its keys replace or
/// extend the base's, section by section. The TPM anchor is off (a test must never write
/// to the host's TPM); tests/e2e/tpm.rs turns it on with a software TPM.
pub fn base_config(dir: &Path, extra: &str) -> String {
    let base = format!(
        "[agent]\nstate_dir = \"{d}/state\"\npidfile = \"{d}/agent.pid\"\nlog_level = \"debug\"\n\
         [socket]\npath = \"{d}/agent.sock\"\n[identity]\nmetadata = false\n\
         [freeze]\ntpm = \"off\"\n",
        d = dir.display()
    );
    let mut base: toml::Table = base.parse().unwrap();
    let extra: toml::Table = extra.parse().expect("extra config is TOML");
    merge(&mut base, extra);
    toml::to_string(&base).unwrap()
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

impl TestAgent {
    /// Writes a config (the base plus `extra`) without starting anything.
    pub fn prepare(extra: &str) -> TestAgent {
        let dir = short_tempdir();
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, base_config(dir.path(), extra)).unwrap();
        TestAgent {
            socket: dir.path().join("agent.sock"),
            state: dir.path().join("state"),
            config,
            dir,
            child: None,
        }
    }

    pub fn start(extra: &str) -> TestAgent {
        let mut a = TestAgent::prepare(extra);
        a.spawn(&[]);
        a
    }

    /// Starts `kooagent run` with extra args and waits for the socket.
    pub fn spawn(&mut self, args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            // Tests talk to loopback only: never through a proxy from the environment.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    /// Runs `kooagent run` on this config expecting it to refuse to start; its stderr.
    pub fn run_refused(&self) -> String {
        let out = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "the agent started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn wait_ready(&mut self) {
        let t0 = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().unwrap() {
                    panic!("agent exited early ({status}); log:\n{}", self.log());
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "agent not ready; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn connect(&self) -> Conn {
        Conn::open(&self.socket)
    }

    /// One request on a fresh connection; Ok(result) or Err(error object).
    pub fn call(&self, op: &str, params: Value) -> Result<Value, Value> {
        self.connect().call(op, params)
    }

    /// Runs the CLI against this agent's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, sig) };
    }

    /// Sends SIGTERM and returns the exit status and how long the exit took.
    pub fn stop(&mut self) -> (std::process::ExitStatus, Duration) {
        self.signal(libc::SIGTERM);
        let t0 = Instant::now();
        let status = self.child.take().unwrap().wait().unwrap();
        (status, t0.elapsed())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

/// One connection, for pipelining and raw lines.
pub struct Conn {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
    next_id: u64,
}

impl Conn {
    pub fn open(path: &Path) -> Conn {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
            next_id: 1,
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    pub fn read_json(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).unwrap();
        assert!(n > 0, "connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
    }

    /// True when the agent has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }

    pub fn call(&mut self, op: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = serde_json::to_vec(&json!({"v":1,"id":id,"op":op,"params":params})).unwrap();
        line.push(b'\n');
        self.send_raw(&line);
        let mut v = self.read_json();
        assert_eq!(v["id"], json!(id), "answer out of order: {v}");
        if v["ok"] == json!(true) {
            Ok(v["result"].take())
        } else {
            Err(v["error"].take())
        }
    }
}
