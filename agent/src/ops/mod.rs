//! Socket operations: one small module per family, each exporting `OPS`, a table of
//! `(name, handler)`. Adding an operation is one module and one line in [`Dispatcher::new`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::protocol::{codes, OpError};

pub mod authcode;
pub mod device;
pub mod freeze;
pub mod license;
pub mod ping;
pub mod status;
pub mod usage;

/// Who is on the other end of the socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// One call of an operation.
pub struct Call {
    pub params: Value,
    pub peer: Peer,
}

/// What an operation answers: one value, or a stream of events that ends the exchange
/// (the connection then carries only events, see docs/protocol.md).
pub enum Reply {
    Value(Value),
    /// A result already serialised (one JSON value): for the hot paths (`ping`,
    /// `license.check`), which answer from text prepared in advance instead of building
    /// and serialising a map per request.
    Json(std::borrow::Cow<'static, str>),
    Stream(mpsc::Receiver<Value>),
}

impl From<Value> for Reply {
    fn from(v: Value) -> Self {
        Reply::Value(v)
    }
}

pub type OpResult = Result<Reply, OpError>;
pub type OpFuture = Pin<Box<dyn Future<Output = OpResult> + Send>>;
pub type Handler = fn(Arc<Agent>, Call) -> OpFuture;

/// An operation's entry in its module's table.
pub struct OpSpec {
    pub name: &'static str,
    pub handler: Handler,
}

/// Serialises a typed result into a reply.
pub fn reply<T: Serialize>(value: &T) -> OpResult {
    serde_json::to_value(value)
        .map(Reply::Value)
        .map_err(|e| OpError::internal(format!("could not encode result: {e}")))
}

pub struct Dispatcher {
    ops: HashMap<&'static str, Handler>,
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Dispatcher {
    pub fn new() -> Dispatcher {
        let tables: &[&[OpSpec]] = &[
            ping::OPS,
            authcode::OPS,
            status::OPS,
            device::OPS,
            license::OPS,
            usage::OPS,
            freeze::OPS,
        ];
        let mut ops = HashMap::new();
        for spec in tables.iter().flat_map(|t| t.iter()) {
            let clash = ops.insert(spec.name, spec.handler);
            assert!(clash.is_none(), "operation {} registered twice", spec.name);
        }
        Dispatcher { ops }
    }

    /// Names of every operation, sorted (for `agent.status` and docs).
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.ops.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn dispatch(&self, agent: Arc<Agent>, op: &str, call: Call) -> OpFuture {
        match self.ops.get(op) {
            Some(h) => h(agent, call),
            None => {
                let err = OpError::new(codes::UNKNOWN_OP, format!("unknown operation {op:?}"));
                Box::pin(async move { Err(err) })
            }
        }
    }
}
