//! How the agent reaches the open APIs: directly (AK/SK on the device) or through the
//! seller's relay (device key, docs: relay protocol). Both parse the answers with the same
//! `api::parse_*` functions.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;

use super::api::{self, ActivateRequest, Activation, ApiError, HeartbeatRequest, LicenseInfo};
use super::apig_sign::AkSk;
use super::client::{Answered, Client, ClientError};
use super::config::{AuthcodeConfig, Mode};
use super::relay_auth;
use crate::clock::Clock;

pub const RELAY_ACTIVATE: &str = "/v1/authcode/activate";
pub const RELAY_HEARTBEAT: &str = "/v1/authcode/heartbeat";
pub const RELAY_USAGE: &str = "/v1/authcode/usage";
pub use kooagent_core::authcode::relay_auth::HEADER_ENROLLMENT;
/// Answers are small JSON; more is not read.
const MAX_ANSWER: u64 = 64 * 1024;

/// The device key's file in the state directory.
pub fn relay_key_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("relay.key")
}

pub struct RelayClient {
    agent: ureq::Agent,
    base: String,
    key: SigningKey,
    clock: Arc<dyn Clock>,
    /// The seller's enrollment token, sent with every call (the server uses it only
    /// while it does not know the key).
    enrollment: Option<String>,
}

/// One request ready to send: URL, headers, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

impl RelayClient {
    pub fn new(
        url: &str,
        extra_ca: Option<&Path>,
        timeout: Duration,
        key: SigningKey,
        clock: Arc<dyn Clock>,
    ) -> Result<RelayClient, ClientError> {
        let base = relay_base(url).map_err(ClientError::Config)?;
        Ok(RelayClient {
            agent: crate::https::agent(extra_ca, "authcode.extra_ca_file", timeout)
                .map_err(ClientError::Config)?,
            base,
            key,
            clock,
            enrollment: None,
        })
    }

    /// Sends the seller's enrollment token read from `path` (one line).
    pub fn with_enrollment_file(mut self, path: &Path) -> Result<RelayClient, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientError::Config(format!(
                "authcode.enrollment_token_file {}: {e}",
                path.display()
            ))
        })?;
        let token = text.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Config(format!(
                "authcode.enrollment_token_file {}: not one line of printable ASCII",
                path.display()
            )));
        }
        self.enrollment = Some(token.to_string());
        Ok(self)
    }

    /// The URL and headers of a POST of `body` to `path` at `now_ms` with `nonce`.
    pub fn prepare(&self, path: &str, body: &[u8], now_ms: i64, nonce: &str) -> Prepared {
        let h = relay_auth::sign(&self.key, "POST", path, body, now_ms, nonce);
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        headers.extend(
            h.pairs()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        if let Some(t) = &self.enrollment {
            headers.push((HEADER_ENROLLMENT.to_string(), t.clone()));
        }
        Prepared {
            url: format!("{}{path}", self.base),
            headers,
        }
    }

    fn post(&self, path: &str, body: &[u8]) -> Result<(String, u16, String), ClientError> {
        // One host only: nothing is ever resent elsewhere.
        let p = self.prepare(path, body, self.clock.now_ms(), &relay_auth::new_nonce());
        let mut r = self.agent.post(&p.url);
        for (k, v) in &p.headers {
            r = r.header(k, v);
        }
        let mut resp = r
            .send(body)
            .map_err(|e| ClientError::Unreachable(format!("{}: {e}", self.base)))?;
        let http = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .unwrap_or_default();
        Ok((self.base.clone(), http, text))
    }
}

/// `https://host[:port]` without a trailing slash, path or query.
fn relay_base(url: &str) -> Result<String, String> {
    let bad = |why: &str| format!("authcode.relay_url {url:?} {why}");
    if url.is_empty() {
        return Err("authcode.relay_url is not set (relay mode needs the seller's server)".into());
    }
    let uri: ureq::http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("is not https://"));
    }
    let auth = uri.authority().ok_or_else(|| bad("has no host"))?;
    if auth.as_str().contains('@') || !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("must be https://host[:port] only"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// Reads `AK` / `SK` (two lines) from a root-only file.
pub fn load_aksk(path: &Path) -> Result<AkSk, String> {
    let secret = crate::usage::secret::Secret::load_as(path, "authcode.aksk_file")?;
    let text = std::str::from_utf8(secret.expose())
        .map_err(|_| format!("authcode.aksk_file {}: not UTF-8", path.display()))?;
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    match (lines.next(), lines.next(), lines.next()) {
        (Some(ak), Some(sk), None) => Ok(AkSk::new(ak, sk.as_bytes().to_vec())),
        _ => Err(format!(
            "authcode.aksk_file {}: must hold two lines, the AK then the SK",
            path.display()
        )),
    }
}

pub enum Transport {
    Direct(Client),
    Relay(RelayClient),
}

impl Transport {
    pub fn from_config(
        cfg: &AuthcodeConfig,
        state_dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Transport, ClientError> {
        let timeout = Duration::from_secs(cfg.timeout_secs);
        match cfg.mode {
            Mode::Direct => {
                let key = load_aksk(&cfg.aksk_file).map_err(ClientError::Config)?;
                Ok(Transport::Direct(Client::new(
                    &cfg.bases,
                    cfg.extra_ca(),
                    "authcode.extra_ca_file",
                    timeout,
                    key,
                    clock,
                )?))
            }
            Mode::Relay => {
                let key = relay_auth::load_or_create_key(&relay_key_path(state_dir))
                    .map_err(|e| ClientError::Config(format!("device key: {e}")))?;
                let client = RelayClient::new(&cfg.relay_url, cfg.extra_ca(), timeout, key, clock)?;
                let client = if cfg.enrollment_token_file.as_os_str().is_empty() {
                    client
                } else {
                    client.with_enrollment_file(&cfg.enrollment_token_file)?
                };
                Ok(Transport::Relay(client))
            }
        }
    }

    fn call<T>(
        &self,
        direct: &str,
        relay: &str,
        req: &impl serde::Serialize,
        parse: fn(u16, &str) -> Result<T, ApiError>,
    ) -> Result<Answered<T>, ClientError> {
        let body = serde_json::to_vec(req).expect("request types serialise");
        let (base, http, text) = match self {
            Transport::Direct(c) => c.post(direct, &body)?,
            Transport::Relay(r) => r.post(relay, &body)?,
        };
        Ok(Answered {
            value: parse(http, &text)?,
            base,
        })
    }

    /// An answer naming another code is an error (never applied to ours).
    pub fn activate(&self, req: &ActivateRequest) -> Result<Answered<Activation>, ClientError> {
        let a = self.call(api::PATH_ACTIVATE, RELAY_ACTIVATE, req, api::parse_activate)?;
        let named = a
            .value
            .info
            .as_ref()
            .and_then(|i| i.license_code.as_deref());
        api::check_answer_code(&req.license, named)?;
        Ok(a)
    }

    /// An answer naming another code is an error (never applied to ours).
    pub fn heartbeat(&self, req: &HeartbeatRequest) -> Result<Answered<LicenseInfo>, ClientError> {
        let a = self.call(
            api::PATH_HEARTBEAT,
            RELAY_HEARTBEAT,
            req,
            api::parse_heartbeat,
        )?;
        api::check_answer_code(&req.license, Some(&a.value.license_code))?;
        Ok(a)
    }

    pub fn report_usage(&self, req: &api::UsageRequest) -> Result<Answered<()>, ClientError> {
        req.validate()?;
        self.call(api::PATH_USAGE, RELAY_USAGE, req, api::parse_usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    #[test]
    fn relay_requests_verify_with_relay_auth() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let c = RelayClient::new(
            "https://seller.example:8443/",
            None,
            Duration::from_secs(5),
            key.clone(),
            Arc::new(FakeClock::new(0)),
        )
        .unwrap();
        let body = serde_json::to_vec(&HeartbeatRequest::new("CODE-1").unwrap()).unwrap();
        let nonce = relay_auth::new_nonce();
        let p = c.prepare(RELAY_HEARTBEAT, &body, 1_000_000, &nonce);
        assert_eq!(p.url, "https://seller.example:8443/v1/authcode/heartbeat");
        let get = |h: &str| {
            p.headers
                .iter()
                .find(|(k, _)| k == h)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("content-type"), Some("application/json"));
        let h = relay_auth::RelayHeaders::from_lookup(get).unwrap();
        let got = relay_auth::verify(&h, "POST", RELAY_HEARTBEAT, &body, 1_000_000, |n| {
            n == nonce
        })
        .unwrap();
        assert_eq!(got, key.verifying_key());
        // The same headers do not authorise another endpoint or body.
        assert!(relay_auth::verify(&h, "POST", RELAY_USAGE, &body, 1_000_000, |_| true).is_err());
        assert!(
            relay_auth::verify(&h, "POST", RELAY_HEARTBEAT, b"{}", 1_000_000, |_| true).is_err()
        );
    }

    #[test]
    fn relay_url_and_aksk_file_are_checked() {
        assert!(relay_base("").unwrap_err().contains("not set"));
        assert!(relay_base("http://x").is_err());
        assert!(relay_base("https://x/path").is_err());
        assert_eq!(relay_base("https://x:1/").unwrap(), "https://x:1");
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("aksk");
        std::fs::write(&p, "AK1\nSK/2+=\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = load_aksk(&p).unwrap();
        assert_eq!(k.ak, "AK1");
        assert_eq!(k.sk(), b"SK/2+=");
        std::fs::write(&p, "only-one\n").unwrap();
        assert!(load_aksk(&p).unwrap_err().contains("two lines"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_aksk(&p).unwrap_err().contains("chmod 600"));
    }
}
