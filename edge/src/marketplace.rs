//! Blocking HTTPS client of the authorization-code open APIs (koogallery.md B0): every
//! request AK/SK-signed (§1.3) with `X-Sdk-Date` from the agent's clock, certificates
//! always verified (web PKI plus an optional extra CA), bounded in time, and the next host
//! tried only when one cannot be reached (an HTTP answer, even an error, is final).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kooagent_core::authcode::api::{
    self, ActivateRequest, Activation, ApiError, HeartbeatRequest, LicenseInfo,
};
use kooagent_core::authcode::apig_sign::{self, AkSk};
use kooagent_core::clock::{format_compact, Clock};

/// The documented host, then its fallback.
pub const DEFAULT_BASES: [&str; 2] = [
    "https://mkt.myhuaweicloud.com",
    "https://mkt.myhuaweicloud.cn",
];
/// **[UNCONFIRMED]** (koogallery.md B0): the APIG stage header appears only in a
/// third-party gem, not in Huawei's pages. It is harmless if the gateway ignores it; if
/// Huawei says otherwise, change or drop it here (it is signed like any other header).
pub const STAGE_HEADER: Option<(&str, &str)> = Some(("x-stage", "RELEASE"));
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Answers are small JSON; more is not read.
const MAX_ANSWER: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("authorization-code client: {0}")]
    Config(String),
    #[error(transparent)]
    Api(#[from] ApiError),
    /// No host gave an HTTP answer; each one's failure is listed.
    #[error("no KooGallery host could be reached: {0}")]
    Unreachable(String),
}

impl ClientError {
    /// Worth trying again later unchanged.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Api(e) => e.is_transient(),
            ClientError::Config(_) => false,
        }
    }
}

/// An answer and the base URL of the host that gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered<T> {
    pub value: T,
    pub base: String,
}

struct Base {
    url: String,
    /// `host[:port]` as the Host header carries it (and as it is signed).
    authority: String,
}

pub struct Client {
    agent: ureq::Agent,
    bases: Vec<Base>,
    key: AkSk,
    clock: Arc<dyn Clock>,
}

fn parse_base(url: &str) -> Result<Base, ClientError> {
    let bad = |why: &str| ClientError::Config(format!("base URL {url:?} {why}"));
    let uri: ureq::http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("is not https://"));
    }
    let auth = uri.authority().ok_or_else(|| bad("has no host"))?;
    if auth.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("must be https://host[:port] only"));
    }
    let authority = match auth.port_u16() {
        Some(443) | None => auth.host().to_string(),
        Some(p) => format!("{}:{p}", auth.host()),
    };
    Ok(Base {
        url: url.trim_end_matches('/').to_string(),
        authority,
    })
}

impl Client {
    /// `bases` in the order to try (normally [`DEFAULT_BASES`]); `extra_ca` is trusted in
    /// addition to the web PKI roots, `ca_key` names its setting in errors.
    pub fn new(
        bases: &[String],
        extra_ca: Option<&Path>,
        ca_key: &str,
        timeout: Duration,
        key: AkSk,
        clock: Arc<dyn Clock>,
    ) -> Result<Client, ClientError> {
        if bases.is_empty() {
            return Err(ClientError::Config("no base URL".into()));
        }
        if key.ak.is_empty() || key.sk().is_empty() {
            return Err(ClientError::Config(
                "the AK and the SK must not be empty".into(),
            ));
        }
        Ok(Client {
            agent: crate::https::agent(extra_ca, ca_key, timeout).map_err(ClientError::Config)?,
            bases: bases
                .iter()
                .map(|b| parse_base(b))
                .collect::<Result<_, _>>()?,
            key,
            clock,
        })
    }

    /// An answer naming another code is an error (never applied to ours).
    pub fn activate(&self, req: &ActivateRequest) -> Result<Answered<Activation>, ClientError> {
        let a = self.call(api::PATH_ACTIVATE, req, api::parse_activate)?;
        let named = a
            .value
            .info
            .as_ref()
            .and_then(|i| i.license_code.as_deref());
        api::check_answer_code(&req.license, named)?;
        Ok(a)
    }

    /// The daily query (`v1/license/heartbeat`), without the sunset `heartbeatInfo`. An
    /// answer naming another code is an error (never applied to ours).
    pub fn heartbeat(&self, req: &HeartbeatRequest) -> Result<Answered<LicenseInfo>, ClientError> {
        let a = self.call(api::PATH_HEARTBEAT, req, api::parse_heartbeat)?;
        api::check_answer_code(&req.license, Some(&a.value.license_code))?;
        Ok(a)
    }

    /// Validated before anything is sent.
    pub fn report_usage(&self, req: &api::UsageRequest) -> Result<Answered<()>, ClientError> {
        req.validate()?;
        self.call(api::PATH_USAGE, req, api::parse_usage)
    }

    fn call<T>(
        &self,
        path: &str,
        req: &impl serde::Serialize,
        parse: fn(u16, &str) -> Result<T, ApiError>,
    ) -> Result<Answered<T>, ClientError> {
        let body = serde_json::to_vec(req).expect("request types serialise");
        let (base, http, text) = self.post(path, &body)?;
        Ok(Answered {
            value: parse(http, &text)?,
            base,
        })
    }

    /// Signs and POSTs `body` to `path` on the first host that answers: (base, status, body).
    ///
    /// An activation is not idempotent (a second one is refused `92020003`): after a
    /// timeout once connected, the marketplace may have activated the code and only the
    /// answer was lost, so it is not resent to the next host; the error is returned and
    /// the activation is resent only by the caller's recovery
    /// (docs/authorization-codes.md "Recovery").
    pub fn post(&self, path: &str, body: &[u8]) -> Result<(String, u16, String), ClientError> {
        let mut failures = Vec::new();
        for base in &self.bases {
            match self.post_to(base, path, body) {
                Ok((http, text)) => return Ok((base.url.clone(), http, text)),
                Err(e) => {
                    log::info!("authcode: {} cannot be reached: {e}", base.url);
                    failures.push(format!("{}: {e}", base.url));
                    if path == api::PATH_ACTIVATE && answer_maybe_lost(&e) {
                        failures.push(
                            "the activation may have reached KooGallery: not resent to another host"
                                .into(),
                        );
                        break;
                    }
                }
            }
        }
        Err(ClientError::Unreachable(failures.join("; ")))
    }

    fn post_to(&self, base: &Base, path: &str, body: &[u8]) -> Result<(u16, String), ureq::Error> {
        let mut headers: Vec<(String, String)> = vec![
            ("Content-Type".into(), "application/json".into()),
            ("Host".into(), base.authority.clone()),
            (
                apig_sign::HEADER_DATE.into(),
                format_compact(self.clock.now_secs()),
            ),
        ];
        if let Some((k, v)) = STAGE_HEADER {
            headers.push((k.into(), v.into()));
        }
        let parts = apig_sign::Parts {
            method: "POST",
            path,
            query: &[],
            headers: &headers,
            body,
        };
        let auth = apig_sign::authorization(&self.key, &parts).expect("Host and date are set");
        let mut r = self.agent.post(format!("{}{path}", base.url));
        for (k, v) in &headers {
            r = r.header(k, v);
        }
        let mut resp = r.header("Authorization", &auth).send(body)?;
        let http = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .unwrap_or_default();
        Ok((http, text))
    }
}

/// Whether a failed request may have been received and acted upon, its answer lost: a
/// timeout after the connection was made (resolving and connecting are bounded apart,
/// see `https::agent`, and time out as `Resolve`/`Connect`).
pub fn answer_maybe_lost(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Timeout(t) => !matches!(t, ureq::Timeout::Resolve | ureq::Timeout::Connect),
        ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_are_checked() {
        let b = parse_base("https://mkt.myhuaweicloud.com/").unwrap();
        assert_eq!(
            (b.url.as_str(), b.authority.as_str()),
            ("https://mkt.myhuaweicloud.com", "mkt.myhuaweicloud.com")
        );
        assert_eq!(
            parse_base("https://localhost:8443").unwrap().authority,
            "localhost:8443"
        );
        assert_eq!(parse_base("https://h:443").unwrap().authority, "h");
        for bad in [
            "http://mkt.myhuaweicloud.com",
            "https://u:p@h",
            "https://h/x",
            "nope",
        ] {
            assert!(
                matches!(parse_base(bad), Err(ClientError::Config(_))),
                "{bad}"
            );
        }
        let clock = Arc::new(kooagent_core::clock::FakeClock::new(0));
        let none: Vec<String> = vec![];
        assert!(Client::new(
            &none,
            None,
            "k",
            DEFAULT_TIMEOUT,
            AkSk::new("a", "b"),
            clock.clone()
        )
        .is_err());
        let one = vec![DEFAULT_BASES[0].to_string()];
        assert!(Client::new(
            &one,
            None,
            "k",
            DEFAULT_TIMEOUT,
            AkSk::new("a", ""),
            clock.clone()
        )
        .is_err());
        assert!(Client::new(&one, None, "k", DEFAULT_TIMEOUT, AkSk::new("a", "b"), clock).is_ok());
    }
}
