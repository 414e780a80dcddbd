//! The operation catalogue: every socket operation the agent answers, in one table.
//!
//! One row per operation says its name, its params, the fields its answer always carries,
//! whether it only reads (so a client may send it again after a reconnect), who may call
//! it and which error codes of its own it answers with. The agent's dispatcher refuses to
//! start with a handler the catalogue does not list (and a unit test checks the reverse),
//! the dispatcher enforces [`Caller`] and refuses params a row does not list,
//! [`crate::Client`] resends by [`Operation::read_only`],
//! the C header and `kooagent call --help` list the table, and a test fails when
//! docs/protocol.md lacks a section (with an example it sends to a live agent) for a row.

/// Who may call an operation. The socket's mode and group decide who can connect at all;
/// this narrows a few operations further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Anyone who can open the socket (root, the agent's user, the socket's group).
    Socket,
    /// Only root or the user the agent runs as (the kernel's `SO_PEERCRED` says who).
    Owner,
}

impl Caller {
    /// How docs and the C header name it.
    pub fn describe(self) -> &'static str {
        match self {
            Caller::Socket => "anyone who can open the socket",
            Caller::Owner => "root or the agent's own user",
        }
    }
}

/// A JSON type, as a param's or the answer's documentation names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    String,
    /// A decimal string (`"1.5"`, exact) or a JSON number.
    Decimal,
    /// An RFC 3339 UTC time (`"2026-01-02T03:04:05Z"`) or Unix seconds.
    Time,
    /// An array of objects, described by the operation's docs.
    Array,
}

/// One parameter of an operation's `params` object. Params not listed are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    pub name: &'static str,
    pub kind: Kind,
    pub required: bool,
}

/// What an operation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// One `result` object carrying at least these fields.
    Result(&'static [&'static str]),
    /// A stream of `event` objects, each carrying at least these fields; the connection then
    /// carries only the stream.
    Stream(&'static [&'static str]),
}

impl Answer {
    pub fn fields(&self) -> &'static [&'static str] {
        match self {
            Answer::Result(f) | Answer::Stream(f) => f,
        }
    }
}

/// One row of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    pub name: &'static str,
    /// One line for people (the C header, `kooagent call --help`).
    pub summary: &'static str,
    pub params: &'static [Param],
    pub answer: Answer,
    /// It changes nothing: safe to send again when the connection broke after sending.
    pub read_only: bool,
    pub caller: Caller,
    /// Error codes of its own (the protocol-level ones in [`crate::protocol::codes`] can
    /// come from any operation).
    pub errors: &'static [&'static str],
}

const fn p(name: &'static str, kind: Kind, required: bool) -> Param {
    Param {
        name,
        kind,
        required,
    }
}

const USAGE_RECORD_ERRORS: &[&str] = &[
    "invalid_value",
    "invalid_time",
    "unknown_meter",
    "disk_full",
    "ledger_full",
    "ledger_unavailable",
    "ledger_io_error",
];

const AUTHCODE_ERRORS: &[&str] = &[
    "invalid_code",
    "activation_refused",
    "marketplace_unreachable",
    "authcode_config",
    "authcode_failed",
    "store_failed",
];

const AUTHCODE_STATUS_FIELDS: &[&str] = &[
    "mode",
    "codes",
    "heartbeats",
    "usage_reports",
    "load_error",
    "source",
];

/// Every operation, in the order docs/protocol.md presents them.
pub const OPERATIONS: &[Operation] = &[
    Operation {
        name: "ping",
        summary: "liveness, the cheapest round trip",
        params: &[],
        answer: Answer::Result(&["pong"]),
        read_only: true,
        caller: Caller::Socket,
        errors: &[],
    },
    Operation {
        name: "agent.status",
        summary: "version, uptime, paths, configuration, identity, license and online sources",
        params: &[],
        answer: Answer::Result(&[
            "version",
            "protocol",
            "pid",
            "started_at",
            "uptime_secs",
            "config_file",
            "state_dir",
            "socket",
            "product_id",
            "configured",
            "identity",
            "license",
            "sources",
        ]),
        read_only: true,
        caller: Caller::Socket,
        errors: &[],
    },
    Operation {
        name: "device.code",
        summary: "the device identification code the buyer types into the marketplace",
        params: &[p("explain", Kind::Bool, false)],
        answer: Answer::Result(&["code", "status", "accepted_codes", "product_id"]),
        read_only: true,
        caller: Caller::Socket,
        errors: &["identity_settling", "identity_unavailable"],
    },
    Operation {
        name: "license.check",
        summary: "may the software run, and with which entitlements",
        params: &[
            p("product", Kind::String, true),
            p("feature", Kind::String, false),
        ],
        answer: Answer::Result(&["product", "state", "allowed", "reason"]),
        read_only: true,
        caller: Caller::Socket,
        errors: &["no_license"],
    },
    Operation {
        name: "license.status",
        summary: "every installed license, refused files and the trusted time",
        params: &[],
        answer: Answer::Result(&["licenses", "rejected", "computed_at", "trusted_time"]),
        read_only: true,
        caller: Caller::Socket,
        errors: &[],
    },
    Operation {
        name: "license.install",
        summary: "verify a license file's text and store it",
        params: &[
            p("text", Kind::String, true),
            p("product", Kind::String, false),
        ],
        answer: Answer::Result(&["license_id", "action"]),
        read_only: false,
        caller: Caller::Socket,
        errors: &[
            "malformed_license",
            "license_too_large",
            "bad_signature",
            "untrusted_key",
            "wrong_product",
            "stale_license",
            "store_failed",
        ],
    },
    Operation {
        name: "license.remove",
        summary: "remove an installed license",
        params: &[p("license_id", Kind::String, true)],
        answer: Answer::Result(&["license_id", "removed"]),
        read_only: false,
        caller: Caller::Owner,
        errors: &["license_not_found", "permission_denied", "store_failed"],
    },
    Operation {
        name: "license.activate",
        summary: "activate a KooGallery authorization code on this device",
        params: &[
            p("code", Kind::String, true),
            p("product", Kind::String, false),
        ],
        answer: Answer::Result(&["code", "license_id", "product", "state", "allowed"]),
        read_only: false,
        caller: Caller::Socket,
        errors: AUTHCODE_ERRORS,
    },
    Operation {
        name: "authcode.status",
        summary: "the authorization codes activated here and their heartbeats",
        params: &[],
        answer: Answer::Result(AUTHCODE_STATUS_FIELDS),
        read_only: true,
        caller: Caller::Socket,
        errors: &[],
    },
    Operation {
        name: "authcode.client_seen",
        summary: "count a client of an authorization-code product for the usage report",
        params: &[
            p("product", Kind::String, true),
            p("client", Kind::String, false),
        ],
        answer: Answer::Result(&["license_id", "client"]),
        read_only: false,
        caller: Caller::Socket,
        errors: &["no_authcode"],
    },
    Operation {
        name: "authcode.sync",
        summary: "heartbeat and report usage for every code now",
        params: &[],
        answer: Answer::Result(AUTHCODE_STATUS_FIELDS),
        read_only: false,
        caller: Caller::Socket,
        errors: &[
            "authcode_config",
            "marketplace_unreachable",
            "authcode_failed",
        ],
    },
    Operation {
        name: "usage.record",
        summary: "record usage of a meter; durable once answered",
        params: &[
            p("meter", Kind::String, true),
            p("value", Kind::Decimal, true),
            p("at", Kind::Time, false),
        ],
        answer: Answer::Result(&["hour", "moved"]),
        read_only: false,
        caller: Caller::Socket,
        errors: USAGE_RECORD_ERRORS,
    },
    Operation {
        name: "usage.record_batch",
        summary: "record many usage records at once, all or nothing",
        params: &[p("records", Kind::Array, true)],
        answer: Answer::Result(&["recorded", "moved"]),
        read_only: false,
        caller: Caller::Socket,
        errors: USAGE_RECORD_ERRORS,
    },
    Operation {
        name: "usage.status",
        summary: "the usage ledger: open hours, pending, delivered and parked records",
        params: &[p("records", Kind::Bool, false)],
        answer: Answer::Result(&["started"]),
        read_only: true,
        caller: Caller::Socket,
        errors: &[],
    },
    Operation {
        name: "usage.flush",
        summary: "close what can be closed and deliver it now",
        params: &[p("retry_parked", Kind::Bool, false)],
        answer: Answer::Result(&[
            "closed_records",
            "requeued",
            "round",
            "pending",
            "not_sent_because",
        ]),
        read_only: false,
        caller: Caller::Socket,
        errors: &[
            "disk_full",
            "ledger_full",
            "ledger_unavailable",
            "ledger_io_error",
        ],
    },
    Operation {
        name: "freeze.status",
        summary: "each license's freeze lifecycle",
        params: &[],
        answer: Answer::Result(&["licenses", "tampered"]),
        read_only: true,
        caller: Caller::Socket,
        errors: &[],
    },
    Operation {
        name: "token.apply",
        summary: "apply a seller's status token (freeze, release, ...)",
        params: &[p("token", Kind::String, true)],
        answer: Answer::Result(&["license_id", "action", "seq", "applied", "replayed"]),
        read_only: false,
        caller: Caller::Socket,
        errors: &[
            "malformed_token",
            "untrusted_key",
            "bad_signature",
            "wrong_device",
            "device_pending",
            "unknown_license",
            "stale_token",
            "token_from_future",
            "license_released",
        ],
    },
    Operation {
        name: "watch",
        summary: "stream each license's state, then every lifecycle transition",
        params: &[p("verdicts", Kind::Bool, false)],
        answer: Answer::Stream(&["type", "seq", "license_id", "product", "state"]),
        read_only: true,
        caller: Caller::Socket,
        errors: &[],
    },
];

/// The catalogue's row for `name`.
pub fn operation(name: &str) -> Option<&'static Operation> {
    OPERATIONS.iter().find(|o| o.name == name)
}

/// The catalogue as a comment block, one operation per line (the C header carries it).
pub fn listing(prefix: &str) -> String {
    let width = OPERATIONS.iter().map(|o| o.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for o in OPERATIONS {
        let mut notes = Vec::new();
        if o.read_only {
            notes.push("read-only");
        }
        if matches!(o.answer, Answer::Stream(_)) {
            notes.push("stream");
        }
        if o.caller == Caller::Owner {
            notes.push("root or the agent's user only");
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" [{}]", notes.join(", "))
        };
        out.push_str(&format!(
            "{prefix}{:width$}  {}{notes}\n",
            o.name, o.summary
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for o in OPERATIONS {
            assert!(seen.insert(o.name), "{} listed twice", o.name);
            assert!(
                o.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_'),
                "{}",
                o.name
            );
            assert!(!o.answer.fields().is_empty(), "{} answers nothing", o.name);
            let mut params = std::collections::BTreeSet::new();
            for p in o.params {
                assert!(params.insert(p.name), "{}: param {} twice", o.name, p.name);
            }
        }
    }

    #[test]
    fn only_reading_operations_are_resent() {
        assert!(operation("license.check").unwrap().read_only);
        assert!(!operation("usage.record").unwrap().read_only);
        assert!(!operation("license.install").unwrap().read_only);
        assert!(operation("nope").is_none());
    }

    #[test]
    fn the_listing_names_every_operation() {
        let l = listing("// ");
        assert_eq!(l.lines().count(), OPERATIONS.len());
        assert!(l.contains("license.remove") && l.contains("root or the agent's user only"));
    }
}
