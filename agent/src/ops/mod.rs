//! Socket operations: one small module per family, each exporting `OPS`, a table of
//! `(name, handler)`. What an operation is (params, answer, read-only, who may call it) is
//! its row in the catalogue, `kooagent_client::catalogue`: adding an operation is one
//! catalogue row, one handler here and one section in docs/protocol.md (see
//! docs/architecture.md, "Adding a socket operation").

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::mpsc;

use kooagent_client::catalogue::{self, Caller, Operation};

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

/// Answers to a group of calls, one per call, in the calls' order.
pub type GroupFuture = Pin<Box<dyn Future<Output = Vec<OpResult>> + Send>>;
/// Serves several pipelined calls of one operation together (each entry is a call, or the
/// reason it was already refused); answers exactly one result per entry, in order.
pub type GroupHandler = fn(Arc<Agent>, Vec<Result<Call, OpError>>) -> GroupFuture;

/// An operation that gains from serving consecutive pipelined calls as one: `usage.record`
/// makes one ledger commit (one fsync) for all of them instead of one each.
pub struct GroupSpec {
    pub name: &'static str,
    pub handler: GroupHandler,
}

/// A request to an operation that can be answered in place ([`InlineSpec`]), borrowed from
/// the request line.
pub struct Inline<'a> {
    pub id: &'a RawValue,
    /// The params object as sent; None when absent or null.
    pub params: Option<&'a RawValue>,
    pub peer: Peer,
}

/// Answers a request in place when it can: writes its whole answer line into the output
/// buffer and returns true, or writes nothing and returns false, leaving the request to the
/// operation's [`Handler`] (which answers every case: bad params, errors, waits). It must
/// leave any params it does not fully understand to the handler, which names what is wrong.
pub type InlineHandler = fn(&Agent, &Inline<'_>, &mut Vec<u8>) -> bool;

/// The hot operations (`ping`, `license.check`) also answer in place: no task, no future,
/// no allocation and no copy of the request or the answer per request; a request served
/// this way answers byte for byte what its handler would.
pub struct InlineSpec {
    pub name: &'static str,
    pub handler: InlineHandler,
}

/// Serialises a typed result into a reply.
pub fn reply<T: Serialize>(value: &T) -> OpResult {
    serde_json::to_value(value)
        .map(Reply::Value)
        .map_err(|e| OpError::internal(format!("could not encode result: {e}")))
}

/// A caller the catalogue does not allow for the operation ([`Caller::Owner`]).
pub const PERMISSION_DENIED: &str = "permission_denied";

/// Every family's handler table.
const TABLES: &[&[OpSpec]] = &[
    ping::OPS,
    authcode::OPS,
    status::OPS,
    device::OPS,
    license::OPS,
    usage::OPS,
    freeze::OPS,
];

/// Operations served in groups when pipelined (see [`GroupSpec`]).
const GROUPS: &[GroupSpec] = &[usage::RECORD_GROUP];

/// Operations also answered in place (see [`InlineSpec`]).
const INLINE: &[InlineSpec] = &[ping::INLINE, license::CHECK_INLINE];

pub struct Dispatcher {
    ops: HashMap<&'static str, (&'static Operation, Handler)>,
    groups: HashMap<&'static str, (&'static Operation, GroupHandler)>,
    /// Two entries: a scan is cheaper than hashing the name.
    inline: Vec<(&'static Operation, InlineHandler)>,
    /// The agent's own uid: with root, the [`Caller::Owner`] of every operation.
    own_uid: u32,
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Dispatcher {
    pub fn new() -> Dispatcher {
        let mut ops = HashMap::new();
        for spec in TABLES.iter().flat_map(|t| t.iter()) {
            // A handler without a row would answer with no params, docs or resend rule.
            let op = catalogue::operation(spec.name)
                .unwrap_or_else(|| panic!("operation {} has no catalogue row", spec.name));
            let clash = ops.insert(spec.name, (op, spec.handler));
            assert!(clash.is_none(), "operation {} registered twice", spec.name);
        }
        // A group or in-place handler serves an operation that has a row and a handler.
        let row = |name: &str, kind: &str| {
            ops.get(name)
                .map(|(op, _)| *op)
                .unwrap_or_else(|| panic!("{kind} handler for unknown operation {name}"))
        };
        let groups = GROUPS
            .iter()
            .map(|g| (g.name, (row(g.name, "group"), g.handler)))
            .collect();
        let inline = INLINE
            .iter()
            .map(|i| (row(i.name, "inline"), i.handler))
            .collect();
        Dispatcher {
            ops,
            groups,
            inline,
            own_uid: crate::sys::euid(),
        }
    }

    /// Names of every operation, sorted (for `agent.status` and docs).
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.ops.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn dispatch(&self, agent: Arc<Agent>, op: &str, call: Call) -> OpFuture {
        let err = match self.ops.get(op) {
            Some((row, h)) => match self
                .refuse(row, call.peer)
                .or_else(|| unknown_param(row, &call.params))
            {
                None => return h(agent, call),
                Some(err) => err,
            },
            None => OpError::new(codes::UNKNOWN_OP, format!("unknown operation {op:?}")),
        };
        Box::pin(async move { Err(err) })
    }

    /// Answers `req` in place into `out` when its operation has an [`InlineHandler`], the
    /// peer may call it and the handler can; false (nothing written) otherwise: then
    /// [`Self::dispatch`] serves it.
    pub fn answer_inline(
        &self,
        agent: &Agent,
        req: &crate::protocol::RequestRef<'_>,
        peer: Peer,
        out: &mut Vec<u8>,
    ) -> bool {
        let Some((row, h)) = self.inline.iter().find(|(row, _)| row.name == req.op) else {
            return false;
        };
        if self.refuse(row, peer).is_some() {
            return false;
        }
        let call = Inline {
            id: req.id,
            params: req.params,
            peer,
        };
        h(agent, &call, out)
    }

    /// Whether consecutive pipelined calls of `op` are served together ([`Self::dispatch_group`]).
    pub fn groups(&self, op: &str) -> bool {
        self.groups.contains_key(op)
    }

    /// Serves `calls` of `op` (an operation for which [`Self::groups`] holds) as one group:
    /// each call is checked as [`Self::dispatch`] would, and answered on its own.
    pub fn dispatch_group(&self, agent: Arc<Agent>, op: &str, calls: Vec<Call>) -> GroupFuture {
        let Some((row, h)) = self.groups.get(op) else {
            let err = OpError::new(codes::UNKNOWN_OP, format!("unknown operation {op:?}"));
            let n = calls.len();
            return Box::pin(async move { (0..n).map(|_| Err(err.clone())).collect() });
        };
        let checked = calls
            .into_iter()
            .map(|call| {
                match self
                    .refuse(row, call.peer)
                    .or_else(|| unknown_param(row, &call.params))
                {
                    None => Ok(call),
                    Some(err) => Err(err),
                }
            })
            .collect();
        h(agent, checked)
    }

    /// Why `peer` may not call `row`, if it may not (the peer's uid, from SO_PEERCRED).
    fn refuse(&self, row: &Operation, peer: Peer) -> Option<OpError> {
        match row.caller {
            Caller::Socket => None,
            Caller::Owner if peer.uid == 0 || peer.uid == self.own_uid => None,
            Caller::Owner => Some(OpError::new(
                PERMISSION_DENIED,
                format!(
                    "{} needs root or the agent's user (uid {}); you are uid {}",
                    row.name, self.own_uid, peer.uid
                ),
            )),
        }
    }
}

/// A param the catalogue row does not list: refused for every operation alike (handlers
/// that take no params would otherwise ignore it, and a typo would pass unnoticed).
fn unknown_param(row: &Operation, params: &Value) -> Option<OpError> {
    let Value::Object(map) = params else {
        return None;
    };
    let k = map
        .keys()
        .find(|k| !row.params.iter().any(|p| p.name == k.as_str()))?;
    let expected = match row.params {
        [] => "it takes none".to_string(),
        ps => {
            let names: Vec<&str> = ps.iter().map(|p| p.name).collect();
            format!("expected {}", names.join(", "))
        }
    };
    Some(OpError::invalid_params(format!(
        "unknown param {k:?} for {} ({expected})",
        row.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every catalogue row has a handler and every handler a row: the catalogue is the
    /// truth the client, the C header and the docs are built from.
    #[test]
    fn handlers_match_the_catalogue() {
        let d = Dispatcher::new();
        let handled: Vec<&str> = d.names();
        let mut listed: Vec<&str> = catalogue::OPERATIONS.iter().map(|o| o.name).collect();
        listed.sort_unstable();
        assert_eq!(handled, listed);
    }

    #[test]
    fn owner_operations_refuse_other_users() {
        let d = Dispatcher::new();
        let remove = catalogue::operation("license.remove").unwrap();
        let peer = |uid| Peer {
            uid,
            gid: 0,
            pid: None,
        };
        assert!(d.refuse(remove, peer(0)).is_none());
        assert!(d.refuse(remove, peer(d.own_uid)).is_none());
        let other = if d.own_uid == 4242 { 4243 } else { 4242 };
        let e = d.refuse(remove, peer(other)).unwrap();
        assert_eq!(e.code, PERMISSION_DENIED);
        assert!(e.message.contains("license.remove"), "{}", e.message);
        let check = catalogue::operation("license.check").unwrap();
        assert!(d.refuse(check, peer(other)).is_none());
    }

    #[test]
    fn params_the_catalogue_does_not_list_are_refused() {
        let ping = catalogue::operation("ping").unwrap();
        assert!(unknown_param(ping, &serde_json::json!({})).is_none());
        let e = unknown_param(ping, &serde_json::json!({"x": 1})).unwrap();
        assert_eq!(e.code, codes::INVALID_PARAMS);
        assert!(
            e.message.contains("\"x\"") && e.message.contains("takes none"),
            "{}",
            e.message
        );
        let check = catalogue::operation("license.check").unwrap();
        let ok = serde_json::json!({"product": "p", "feature": "f"});
        assert!(unknown_param(check, &ok).is_none());
        let e = unknown_param(check, &serde_json::json!({"product": "p", "feture": "f"})).unwrap();
        assert!(
            e.message.contains("expected product, feature"),
            "{}",
            e.message
        );
    }
}
