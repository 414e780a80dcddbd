//! `ping`: liveness, the cheapest round trip.

use super::{Inline, InlineSpec, OpSpec, Reply};
use crate::protocol;

const PONG: &str = r#"{"pong":true}"#;

pub const OPS: &[OpSpec] = &[OpSpec {
    name: "ping",
    handler: |_, _| Box::pin(async { Ok(Reply::Json(PONG.into())) }),
}];

pub const INLINE: InlineSpec = InlineSpec {
    name: "ping",
    handler: inline,
};

/// `ping` with no params (an empty object or none): anything else goes to the handler,
/// which refuses unknown params.
fn inline(_: &crate::agent::Agent, req: &Inline<'_>, out: &mut Vec<u8>) -> bool {
    let empty = req.params.is_none_or(|p| {
        p.get()
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .eq(*b"{}")
    });
    if empty {
        protocol::write_ok_start(out, req.id);
        out.extend_from_slice(PONG.as_bytes());
        protocol::write_ok_end(out);
    }
    empty
}
