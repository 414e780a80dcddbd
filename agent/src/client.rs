//! A small blocking client for the local socket, used by the CLI and the benchmark.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}: {source} (is `kooagent run` running?)")]
    Connect { path: String, source: io::Error },
    #[error("talking to the agent: {0}")]
    Io(#[from] io::Error),
    #[error("the agent sent an unreadable answer: {0}")]
    BadAnswer(String),
    #[error("{code}: {message}")]
    Op {
        code: String,
        message: String,
        details: Option<Value>,
    },
}

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    line: String,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            next_id: 1,
            line: String::new(),
        })
    }

    /// Sends one request and returns its `result`, or the agent's error.
    pub fn call(&mut self, op: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = serde_json::to_vec(&json!({"v": 1, "id": id, "op": op, "params": params}))
            .expect("requests serialise");
        req.push(b'\n');
        self.writer.write_all(&req)?;
        self.read_answer(id)
    }

    fn read_answer(&mut self, id: u64) -> Result<Value, ClientError> {
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            return Err(ClientError::BadAnswer("connection closed".into()));
        }
        let mut v: Value = serde_json::from_str(&self.line)
            .map_err(|e| ClientError::BadAnswer(format!("{e}: {}", self.line.trim_end())))?;
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
}
