//! HTTPS: rustls (TLS 1.2 and 1.3, ring), HTTP/1.1 by hyper, one tokio task per
//! connection. Routes:
//!
//! - `POST <product path>`: the marketplace's production interface (always HTTP 200 with
//!   a `resultCode`, and a `Body-Sign` header on every answer);
//! - `GET /v1/licenses/<license id>`: the current license text, for agents to fetch a
//!   renewed license without the buyer copying files;
//! - `GET /v1/licenses/<license id>/status`: the newest status token;
//! - `POST /v1/authcode/{activate,heartbeat,usage}`: the authorization-code relay
//!   ([`super::relay`]), when `aksk_file` is configured;
//! - `POST /v1/usage/records`: the usage relay ([`super::usage_relay`]).
//!
//! Database work runs on the database thread; signatures and JSON on the workers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::activities::{self, answer, Ctx, ResultCode};
use super::auth;
use super::conns::{self, Conns, Refusal, RefusalLog, Slot};
use super::db::Db;
use super::devices;
use super::limits::{self, LimitsConfig};
use super::relay::{self, Endpoint, Gate, Relay};
use super::tokens::StatusTokens;
use super::{ProductConfig, SellerServerConfig};
use kooagent_core::clock::Clock;
use kooagent_edge::secret::Secret;

/// A device request answered busy because the connections left are the marketplace's.
pub const ERR_BUSY: &str = "KOOAGENT.SERVER.0503";
/// Largest request body accepted (the marketplace's are well under 4 KiB).
const MAX_BODY: usize = 64 * 1024;
/// The marketplace gives up after 5 s; answer before that even when the database is slow.
const ANSWER_WITHIN: Duration = Duration::from_millis(4500);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The same for a connection admitted into the marketplace's reserve: the marketplace gives
/// up after 5 s anyway, and a stalled connection there must not hold the reserve long.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one line about refused connections per this.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// How often forgotten nonces are pruned (they only matter within the window).
const PRUNE_EVERY_SECS: i64 = 60;

/// Everything a request needs.
pub struct State {
    pub products: Vec<ProductConfig>,
    pub signing_key: SigningKey,
    pub interconnection_key: Secret,
    pub tokens: Arc<dyn StatusTokens>,
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    /// None: no `aksk_file`, no relay.
    pub relay: Option<Arc<Relay>>,
    /// The usage relay (`POST /v1/usage/records`).
    pub usage: Arc<super::usage_relay::UsageRelay>,
    /// `license_upload`: `getLicenseAsync` licenses go into the upload outbox.
    pub upload: bool,
    /// What SIGHUP may change ([`Live`]).
    live: std::sync::RwLock<Arc<Live>>,
    /// Open connections and their limits ([`super::conns`]).
    pub conns: Arc<Conns>,
    /// `metrics_token_file`'s token; None: no `/metrics` ([`super::metrics`]).
    pub metrics_token: Option<Secret>,
    /// `console_password_file` set: the console ([`super::console`]).
    pub console: Option<super::console::Console>,
    last_prune: AtomicI64,
}

impl State {
    pub fn new(
        cfg: &SellerServerConfig,
        signing_key: SigningKey,
        interconnection_key: Secret,
        tokens: Arc<dyn StatusTokens>,
        db: Db,
        clock: Arc<dyn Clock>,
        relay: Option<Arc<Relay>>,
    ) -> State {
        State {
            products: cfg.products.clone(),
            signing_key,
            interconnection_key,
            tokens,
            db,
            clock,
            relay,
            usage: Arc::new(super::usage_relay::UsageRelay::new(&cfg.usage)),
            upload: cfg.license_upload,
            live: std::sync::RwLock::new(Arc::new(Live::from(cfg))),
            conns: Conns::new(conns::Limits {
                max: cfg.max_connections,
                per_address: cfg.max_connections_per_address,
                reserve: cfg.marketplace_reserved_connections,
            }),
            metrics_token: None,
            console: None,
            last_prune: AtomicI64::new(0),
        }
    }

    /// The settings in force now.
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies a reloaded configuration's [`Live`] part and connection limits.
    fn set_live(&self, live: Live, conns: conns::Limits) {
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(live);
        self.conns.set_limits(conns);
    }

    /// Once a minute (to one caller): the time before which nonces can be forgotten,
    /// outside both the marketplace's window and the relay's.
    fn prune_before(&self, now: i64) -> Option<i64> {
        let last = self.last_prune.load(Ordering::Relaxed);
        let due = now - last >= PRUNE_EVERY_SECS
            && self
                .last_prune
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        let window = self.live().window_secs;
        due.then(|| now - 2 * window.max(relay::WINDOW_SECS) - 1)
    }
}

/// The settings a SIGHUP reload changes in place (with the TLS certificate and the
/// connection limits); every other key needs a restart ([`restart_keys`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Live {
    pub window_secs: i64,
    pub limits: LimitsConfig,
    pub body_timeout: Duration,
}

impl From<&SellerServerConfig> for Live {
    fn from(cfg: &SellerServerConfig) -> Live {
        Live {
            window_secs: cfg.timestamp_window_secs as i64,
            limits: cfg.limits.clone(),
            body_timeout: Duration::from_secs(cfg.body_timeout_secs),
        }
    }
}

/// The keys that differ between `old` and `new` but take effect only at a restart: the
/// listener, the database, the keys and secrets shared with background workers, the
/// relay's pool and the outboxes' workers are built once.
pub fn restart_keys(old: &SellerServerConfig, new: &SellerServerConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key: &'static str, same: bool| {
        if !same {
            keys.push(key);
        }
    };
    check("listen", old.listen == new.listen);
    check("state_dir", old.state_dir == new.state_dir);
    check("database_url", old.database_url == new.database_url);
    check(
        "database_schema",
        old.database_schema == new.database_schema,
    );
    check(
        "signing_key_file",
        old.signing_key_file == new.signing_key_file,
    );
    check(
        "interconnection_key_file",
        old.interconnection_key_file == new.interconnection_key_file,
    );
    check("products", old.products == new.products);
    check("aksk_file", old.aksk_file == new.aksk_file);
    check(
        "marketplace_bases",
        old.marketplace_bases == new.marketplace_bases,
    );
    check(
        "marketplace_extra_ca_file",
        old.marketplace_extra_ca_file == new.marketplace_extra_ca_file,
    );
    check("usage", old.usage == new.usage);
    check(
        "metrics_token_file",
        old.metrics_token_file == new.metrics_token_file,
    );
    check(
        "console_password_file/console_audit_file",
        old.console_password_file == new.console_password_file
            && old.console_audit_file == new.console_audit_file,
    );
    check(
        "license_upload",
        old.license_upload == new.license_upload
            && old.license_upload_path == new.license_upload_path
            && old.license_upload_retry_secs == new.license_upload_retry_secs,
    );
    check(
        "relay_workers/relay_queue/relay_queue_wait_secs",
        old.relay_workers == new.relay_workers
            && old.relay_queue == new.relay_queue
            && old.relay_queue_wait_secs == new.relay_queue_wait_secs,
    );
    keys
}

/// The TLS configuration from PEM files. The private key must not be readable by others.
pub fn tls_config(cert_file: &Path, key_file: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("seller_server.cert_file {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "seller_server.cert_file {}: no CERTIFICATE in the file",
            cert_file.display()
        ));
    }
    private_file_mode("seller_server.key_file", key_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("seller_server.key_file {}: {e}", key_file.display()))?;
    let mut provider = rustls::crypto::ring::default_provider();
    // TLS 1.3 connections get TLS_AES_128_GCM_SHA256 (the suite every TLS 1.3 client must
    // implement, RFC 8446 §9.1) whatever the client lists first (rustls clients list
    // AES-256/SHA-384 first): its handshake hashes with SHA-256, which CPUs with the SHA
    // extensions (Zen, recent Intel and ARM) compute in hardware while SHA-384 runs in
    // software, and AES-128 takes 10 rounds instead of 14. The key exchange (X25519,
    // forward secrecy) is the same. A device reconnecting each hour pays this per
    // connection: SHA-384 was ≈ 7 % of the server's CPU per resumed 4-record usage
    // request (docs/usage.md "Measured"). TLS 1.2 suites keep rustls' order, after these.
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 1,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 2,
        _ => 3,
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("seller_server.cert_file/key_file: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.ignore_client_order = true;
    // Stateless TLS 1.3 session tickets (keys rotated every 6 h, random per process): a
    // device reconnecting each hour (the usage relay, the authorization-code relay)
    // resumes its session instead of a full handshake, however large the fleet. The
    // default stateful cache holds 256 sessions, which a fleet's hourly close evicts.
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(Arc::new(cfg))
}

/// Refuses a secret file others may read.
pub fn private_file_mode(key: &str, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{key} {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{key} {}: readable or writable by group or others (mode {mode:04o}); run chmod 600 on it",
            path.display()
        ));
    }
    Ok(())
}

/// The TLS configuration new connections get; a reload replaces it, connections already
/// open keep theirs.
pub struct TlsSlot(std::sync::RwLock<TlsAcceptor>);

impl TlsSlot {
    pub fn new(tls: Arc<rustls::ServerConfig>) -> Arc<TlsSlot> {
        Arc::new(TlsSlot(std::sync::RwLock::new(TlsAcceptor::from(tls))))
    }

    fn acceptor(&self) -> TlsAcceptor {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn replace(&self, tls: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = TlsAcceptor::from(tls);
    }
}

/// SIGHUP: reads `path` again and applies what can change in place (the TLS certificate
/// and key, `[seller_server.limits]`, the connection limits, `body_timeout_secs`,
/// `timestamp_window_secs`), all or nothing: a file that does not load, a key that does
/// not validate or a certificate that does not read leaves everything as it was. Returns
/// the keys changed in the file that need a restart.
pub fn reload(
    path: &Path,
    started: &SellerServerConfig,
    state: &State,
    tls: &TlsSlot,
    nofile: u64,
) -> Result<Vec<&'static str>, String> {
    let new = SellerServerConfig::load(path).map_err(|e| e.to_string())?;
    let cert = tls_config(&new.cert_file, &new.key_file)?;
    let limits = fit_connections(&new, nofile);
    state.set_live(Live::from(&new), limits);
    tls.replace(cert);
    Ok(restart_keys(started, &new))
}

/// Accept queue length asked of the kernel (it caps it at `net.core.somaxconn`, 4096 on
/// current kernels). tokio's `TcpListener::bind` asks for 128: a fleet closing its hour or
/// a burst of marketplace calls opening 1,000 connections at once overflowed it, and every
/// connection past the queue waited for its client's SYN retransmit, a whole second
/// (measured: 426 of 1,000 in the usage relay bench).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (`host:port`) with [`LISTEN_BACKLOG`], trying each address it resolves to.
pub async fn bind_listener(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let bound = socket.and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(a)?;
            s.listen(LISTEN_BACKLOG)
        });
        match bound {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "resolves to no address")
    }))
}

/// One descriptor held back so that a connection can still be accepted and closed when the
/// process is out of descriptors: otherwise it would wait in the backlog (its client
/// hanging) and the listener would stay readable, the accept loop spinning.
struct Spare(Option<std::fs::File>);

impl Spare {
    fn new() -> Spare {
        Spare(std::fs::File::open("/dev/null").ok())
    }

    /// Frees the spare descriptor, accepts and closes one waiting connection, takes the
    /// descriptor back. Whether a connection was closed.
    fn refuse_one(&mut self, listener: &TcpListener) -> bool {
        self.0 = None;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let refused = matches!(listener.poll_accept(&mut cx), std::task::Poll::Ready(Ok(_)));
        self.0 = std::fs::File::open("/dev/null").ok();
        refused
    }
}

/// Accepts connections until `shutdown` resolves. Connections over the limits
/// ([`super::conns`]) are accepted and closed at once; refusals are logged at most once a
/// minute, with counts.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<TlsSlot>,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut spare = Spare::new();
    let mut refusals = RefusalLog::new(REFUSAL_LOG_EVERY);
    let mut refused = |why: Refusal| {
        if let Some(line) = refusals.note(why, std::time::Instant::now()) {
            log::warn!("{line}");
        }
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    match state.conns.admit(&limits::address_key(peer.ip())) {
                        Ok(slot) => {
                            let (acceptor, state) = (tls.acceptor(), state.clone());
                            tokio::spawn(async move {
                                connection(tcp, peer, acceptor, state, slot).await
                            });
                        }
                        Err(why) => {
                            drop(tcp);
                            refused(why);
                        }
                    }
                }
                Err(e) if super::conns::out_of_descriptors(&e) => {
                    if spare.refuse_one(&listener) {
                        refused(Refusal::Descriptors);
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(e) => {
                    // Other transient failures (ECONNABORTED, ENOBUFS): back off briefly
                    // instead of spinning, and say so at debug level only: each comes from
                    // a client, and an attacker must not fill the log.
                    log::debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    slot: Slot,
) {
    let _ = tcp.set_nodelay(true);
    // Admitted into the marketplace's reserve: shorter deadlines.
    let limits = state.conns.limits();
    let deadline = if state.conns.open() > limits.device_room() {
        RESERVE_TIMEOUT
    } else {
        HANDSHAKE_TIMEOUT
    };
    let tls = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            log::debug!("{peer}: TLS handshake: {e}");
            return;
        }
        Err(_) => {
            log::debug!("{peer}: TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| route(state.clone(), peer, req));
    // Title case on the wire: hyper keeps header names lower-case, and the marketplace
    // reads `Body-Sign` case-sensitively (§4.3); title case of `body-sign` is exactly that.
    let r = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(deadline.min(HEADER_TIMEOUT))
        .title_case_headers(true)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = r {
        log::debug!("{peer}: {e}");
    }
    drop(slot);
}

pub(super) type Resp = Response<Full<Bytes>>;

pub(super) fn plain(status: StatusCode, text: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(text.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        "text/plain; charset=utf-8".parse().expect("valid"),
    );
    r
}

async fn route(
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    if path == super::metrics::PATH {
        return Ok(super::metrics::handle(&state, &req).await);
    }
    if path == super::console::PREFIX || path.starts_with("/console/") {
        return Ok(super::console::handle(&state, peer, req).await);
    }
    if path.starts_with("/v1/") && !state.conns.device_room() {
        // Device traffic must leave the marketplace's share free: busy, and the connection
        // closed to give its descriptor back.
        log::debug!("{peer}: {path}: busy (connections kept for the marketplace)");
        let mut r = closing(device_error(
            StatusCode::SERVICE_UNAVAILABLE,
            ERR_BUSY,
            "the server is busy; try again later",
        ));
        r.headers_mut()
            .insert("retry-after", "30".parse().expect("valid"));
        return Ok(r);
    }
    if let Some(rest) = path.strip_prefix("/v1/licenses/") {
        if req.method() != Method::GET {
            return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"));
        }
        let rest = rest.to_string();
        let endpoint = if rest.ends_with("/status") {
            "status"
        } else {
            "license"
        };
        let r = agent_get(&state, peer, &rest, &req).await;
        super::metrics::relay_call(endpoint, r.status());
        return Ok(r);
    }
    if path == kooagent_core::usage::relay::PATH {
        if req.method() != Method::POST {
            return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"));
        }
        let r = super::usage_relay::handle(state, req).await;
        super::metrics::relay_call("usage_records", r.status());
        return Ok(r);
    }
    if let Some(name) = path.strip_prefix(relay::PREFIX) {
        let Some(ep) = Endpoint::from_name(name) else {
            return Ok(plain(StatusCode::NOT_FOUND, "no such endpoint\n"));
        };
        if req.method() != Method::POST {
            return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"));
        }
        let r = relay_call(state, peer, ep, req).await;
        super::metrics::relay_call(ep.metrics_name(), r.status());
        return Ok(r);
    }
    let Some(i) = state.products.iter().position(|p| p.path == path) else {
        return Ok(plain(StatusCode::NOT_FOUND, "no such endpoint\n"));
    };
    // GET: the legacy style (§4.2) sends its parameters in the query string.
    if req.method() != Method::POST && req.method() != Method::GET {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "use POST or GET\n"));
    }
    Ok(marketplace(state, i, req).await)
}

/// Checks either signature style (§4.1 `signature` in the query over the raw body; §4.2
/// `authToken` among the parameters of the query and of a JSON body) and returns the
/// nonce to remember and the request as one JSON object for [`activities::handle`].
fn authenticate(
    state: &State,
    query: Option<&str>,
    body: Bytes,
    now_ms: i64,
) -> Result<(String, Bytes), auth::AuthError> {
    let key = state.interconnection_key.expose();
    let pairs = auth::query_pairs(query);
    if pairs.iter().any(|(k, _)| k == "signature") || !has_auth_token(&pairs, &body) {
        let params = auth::Params::from_query(query);
        let nonce = auth::verify(key, &params, &body, now_ms, state.live().window_secs)?;
        return Ok((nonce, body));
    }
    // Legacy: every parameter, from the query and from a JSON object body.
    let mut fields = serde_json::Map::new();
    for (k, v) in &pairs {
        fields.insert(k.clone(), serde_json::Value::from(v.as_str()));
    }
    if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice(&body) {
        fields.extend(o);
    }
    let params: Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect();
    let nonce = auth::legacy_verify(key, &params, now_ms, state.live().window_secs)?;
    let merged = serde_json::Value::Object(fields).to_string();
    Ok((nonce, Bytes::from(merged)))
}

/// Whether the request carries a legacy `authToken` (query or JSON body).
fn has_auth_token(pairs: &[(String, String)], body: &[u8]) -> bool {
    pairs.iter().any(|(k, _)| k == "authToken")
        || (may_name_auth_token(body)
            && serde_json::from_slice::<serde_json::Value>(body)
                .is_ok_and(|v| v.get("authToken").is_some()))
}

/// Whether a JSON body can hold an `authToken` key at all: the name spelled out, or some
/// `\` escape (which could spell it). Most bodies (§4.1) hold neither, and then need no
/// JSON parse here: this ran on every order, a whole parse into a map for nothing.
fn may_name_auth_token(body: &[u8]) -> bool {
    body.contains(&b'\\') || body.windows(9).any(|w| w == b"authToken")
}

/// A marketplace answer: always 200, signed.
fn signed(state: &State, body: String) -> Resp {
    let sign = auth::body_sign(state.interconnection_key.expose(), body.as_bytes());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    let h = r.headers_mut();
    h.insert(
        "content-type",
        "application/json;charset=UTF-8".parse().expect("valid"),
    );
    h.insert("Body-Sign", sign.parse().expect("ASCII"));
    r
}

/// The whole body within `body_timeout` (headers have their own limit): a body that never
/// comes, or trickles, cannot hold a connection. With bodies of at most [`MAX_BODY`] the
/// deadline is also the minimum transfer rate (64 KiB in 10 s by default).
pub(super) async fn read_body(state: &State, req: Request<Incoming>) -> Result<Bytes, String> {
    let limit = state.live().body_timeout;
    match tokio::time::timeout(limit, Limited::new(req.into_body(), MAX_BODY).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) => Err(format!(
            "request body unreadable or larger than {MAX_BODY} bytes: {e}"
        )),
        Err(_) => Err(format!(
            "the request body did not arrive within {} s",
            limit.as_secs()
        )),
    }
}

/// The answer, then the connection is closed (its request was not read to the end).
fn closing(mut r: Resp) -> Resp {
    r.headers_mut()
        .insert("connection", "close".parse().expect("valid"));
    r
}

async fn marketplace(state: Arc<State>, product: usize, req: Request<Incoming>) -> Resp {
    let started = std::time::Instant::now();
    let query = req.uri().query().map(str::to_string);
    let body = match read_body(&state, req).await {
        Ok(b) => b,
        Err(msg) => {
            let out = answer(ResultCode::BadParams, &msg, &[]);
            super::metrics::marketplace_call("other", &out, started.elapsed());
            return closing(signed(&state, out));
        }
    };
    let (activity, out) = marketplace_answer(&state, product, query, body).await;
    super::metrics::marketplace_call(activity, &out, started.elapsed());
    signed(&state, out)
}

/// The answer to a marketplace call, and the call's activity for the metrics
/// (`unauthenticated` when the signature was refused).
async fn marketplace_answer(
    state: &Arc<State>,
    product: usize,
    query: Option<String>,
    body: Bytes,
) -> (&'static str, String) {
    let now_ms = state.clock.now_ms();
    let (nonce, body) = match authenticate(state, query.as_deref(), body, now_ms) {
        Ok(x) => x,
        Err(e) => {
            log::warn!("marketplace request refused: {e}");
            return (
                "unauthenticated",
                answer(ResultCode::AuthFailed, &e.to_string(), &[]),
            );
        }
    };
    let now = now_ms.div_euclid(1000);
    let prune = state.prune_before(now);
    // The new license is signed here, on the workers, in parallel; the database thread
    // only decides (replay, released instance) and stores.
    let presigned = activities::presign(
        &Ctx {
            now,
            product: &state.products[product],
            key: &state.signing_key,
            tokens: state.tokens.as_ref(),
            presigned: None,
            upload: false,
        },
        &body,
    );
    let activity = match &presigned {
        Some(p) => p.activity(),
        None => super::metrics::activity_of(&body),
    };
    // What the job reads, shared with this worker, which holds it until the answer is
    // back: the database thread drops only its reference (`db` drops a job before
    // answering it), so the request's many allocations are freed on the thread that
    // made them (glibc's free of another thread's memory locks that arena; it was a
    // fifth of the database thread's CPU).
    let order = Arc::new((nonce, body, presigned));
    let shared = order.clone();
    let st = state.clone();
    let job = move |tx: &mut dyn super::db::Tx| {
        let (nonce, body, presigned) = &*shared;
        if let Some(before) = prune {
            tx.prune_nonces(before)?;
        }
        if !tx.nonce_fresh(nonce, now)? {
            log::warn!("marketplace request refused: nonce {nonce:?} replayed");
            return Ok(answer(
                ResultCode::AuthFailed,
                &auth::AuthError::Replay.to_string(),
                &[],
            ));
        }
        let ctx = Ctx {
            now,
            product: &st.products[product],
            key: &st.signing_key,
            tokens: st.tokens.as_ref(),
            presigned: presigned.as_ref(),
            upload: st.upload,
        };
        activities::handle(tx, &ctx, body)
    };
    let out = match tokio::time::timeout(ANSWER_WITHIN, state.db.run(job)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => activities::failure_answer(&e),
        Err(_) => {
            log::error!(
                "marketplace request: no answer from the database within {ANSWER_WITHIN:?}"
            );
            answer(
                ResultCode::Internal,
                "internal error (timeout); please retry",
                &[],
            )
        }
    };
    drop(order);
    (activity, out)
}

pub(super) fn json(status: StatusCode, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        "application/json;charset=UTF-8".parse().expect("valid"),
    );
    r
}

fn relay_error(status: StatusCode, code: &str, msg: &str) -> Resp {
    json(status, relay::error_body(code, msg))
}

/// One relayed call: device signature, body, nonce and trust on first use, then the
/// marketplace (on a blocking thread), then the binding of a newly activated code.
async fn relay_call(
    state: Arc<State>,
    peer: SocketAddr,
    ep: Endpoint,
    req: Request<Incoming>,
) -> Resp {
    let Some(rl) = state.relay.clone() else {
        return plain(
            StatusCode::NOT_FOUND,
            "the authorization-code relay is not configured on this server\n",
        );
    };
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    let body = match read_body(&state, req).await {
        Ok(b) => b,
        Err(msg) => {
            return closing(relay_error(
                StatusCode::BAD_REQUEST,
                relay::ERR_BAD_REQUEST,
                &msg,
            ))
        }
    };
    let now_ms = state.clock.now_ms();
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let device = match relay::verify(header, "POST", &path, &body, now_ms) {
        Ok(d) => d,
        Err(e) => {
            log::warn!("relay {path}: refused: {e}");
            let m = e.to_string();
            return relay_error(StatusCode::UNAUTHORIZED, relay::ERR_UNAUTHENTICATED, &m);
        }
    };
    let (codes, forward) = match relay::parse_body(ep, &body) {
        Ok(x) => x,
        Err(m) => return relay_error(StatusCode::BAD_REQUEST, relay::ERR_BAD_REQUEST, &m),
    };
    let now = now_ms.div_euclid(1000);
    let prune = state.prune_before(now);
    let (c, d) = (codes.clone(), device.clone());
    let live = state.live();
    let buckets = relay::buckets(&device, &limits::address_key(peer.ip()), &live.limits);
    let bucket_age = live.limits.longest_refill_ms();
    let enrollment = header(relay::HEADER_ENROLLMENT).map(relay::enrollment_hash);
    let gate = state.db.run(move |tx| {
        if let Some(before) = prune {
            tx.prune_nonces(before)?;
            tx.prune_buckets(now_ms - bucket_age)?;
        }
        relay::gate(tx, ep, &c, &d, enrollment.as_deref(), &buckets, now_ms)
    });
    let (claimed, priority) = match tokio::time::timeout(ANSWER_WITHIN, gate).await {
        Ok(Ok(Gate::Forward { claimed, priority })) => (claimed, priority),
        Ok(Ok(Gate::Replay)) => {
            log::warn!("relay {path}: nonce {} replayed", device.nonce);
            let m = "x-kooagent-nonce was already used (replayed request)";
            return relay_error(StatusCode::UNAUTHORIZED, relay::ERR_UNAUTHENTICATED, m);
        }
        Ok(Ok(Gate::Limited(bucket))) => {
            log::warn!("relay {path}: over the rate limit {bucket}");
            let m = "too many relay calls; try again later";
            let mut r = relay_error(StatusCode::TOO_MANY_REQUESTS, relay::ERR_LIMITED, m);
            r.headers_mut()
                .insert("retry-after", "60".parse().expect("valid"));
            return r;
        }
        Ok(Ok(Gate::Unknown(m))) => {
            log::debug!("relay {path}: {m} (device key {})", device.key);
            return relay_error(StatusCode::FORBIDDEN, relay::ERR_FORBIDDEN, &m);
        }
        Ok(Ok(Gate::Forbidden(m))) => {
            log::warn!("relay {path}: {m} (device key {})", device.key);
            return relay_error(StatusCode::FORBIDDEN, relay::ERR_FORBIDDEN, &m);
        }
        Ok(Err(e)) => {
            log::error!("relay {path}: database: {e}");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
        }
        Err(_) => {
            log::error!("relay {path}: no answer from the database within {ANSWER_WITHIN:?}");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "try again later\n");
        }
    };
    let busy = || {
        let m = "the relay is busy; try again later";
        let mut r = relay_error(StatusCode::SERVICE_UNAVAILABLE, relay::ERR_BUSY, m);
        r.headers_mut()
            .insert("retry-after", "30".parse().expect("valid"));
        r
    };
    let market_path = ep.market_path();
    let client = rl.clone();
    let forwarded = (ep != Endpoint::Activate).then(|| forward.clone());
    let sent = rl
        .pool
        .run(priority, move || client.client.post(market_path, &forward))
        .await;
    let (http, text) = match sent {
        Ok(Some(Ok((_, http, text)))) => (http, text),
        Ok(Some(Err(e))) => {
            // The answer may be lost after the marketplace acted: a claim stays, so the
            // device's retry is recognised (recovery) rather than refused.
            log::warn!("relay {path}: {e}");
            let m = format!("marketplace unreachable: {e}");
            return relay_error(StatusCode::BAD_GATEWAY, relay::ERR_UNREACHABLE, &m);
        }
        Ok(None) | Err(_) => {
            log::warn!(
                "relay {path}: busy, not forwarded (device key {})",
                device.key
            );
            if claimed {
                let (code, key) = (codes[0].clone(), device.key.clone());
                let _ = state
                    .db
                    .run(move |tx| relay::unclaim(tx, &code, &key, now))
                    .await;
            }
            return busy();
        }
    };
    if let Some(forwarded) = forwarded {
        // For the console's codes page, after the answer is known and without holding it.
        let notes = relay::code_notes(ep, &codes, &forwarded, http, &text);
        let db = state.db.clone();
        tokio::spawn(async move {
            if let Err(e) = db.run(move |tx| relay::record_notes(tx, &notes, now)).await {
                log::warn!("relay: recording the codes' activity: {e}");
            }
        });
    }
    if ep == Endpoint::Activate {
        let code = codes[0].clone();
        match relay::after_activate(http, &text, claimed) {
            relay::AfterActivate::Pass => {}
            how @ (relay::AfterActivate::Unclaim | relay::AfterActivate::UnclaimStripped) => {
                let key = device.key.clone();
                let c = code.clone();
                if let Err(e) = state
                    .db
                    .run(move |tx| relay::unclaim(tx, &c, &key, now))
                    .await
                {
                    log::error!("relay {path}: releasing the claim on {code}: {e}");
                }
                if how == relay::AfterActivate::UnclaimStripped {
                    log::warn!(
                        "relay {path}: {code} was already activated, not through this server \
                         by device key {}",
                        device.key
                    );
                    return json(StatusCode::OK, relay::strip_data(&text));
                }
            }
            relay::AfterActivate::Recover => {
                return recover(&rl, &path, &code, &device.key, priority, text).await;
            }
        }
    }
    // The marketplace's status too: 200 for its business answers (error_code inside), its
    // gateway's own for the rest, so the agent parses exactly what direct mode would.
    json(
        StatusCode::from_u16(http).unwrap_or(StatusCode::BAD_GATEWAY),
        text,
    )
}

/// `92020003` for a code this very key activated through this server earlier: the first
/// answer was lost. The code is queried; ALIVE → the activate-success shape with
/// `kooagent_recovered: true`, else the marketplace's refusal without `data`.
async fn recover(
    rl: &Arc<Relay>,
    path: &str,
    code: &str,
    key: &str,
    priority: relay::Priority,
    refusal: String,
) -> Resp {
    let body = match kooagent_core::authcode::api::HeartbeatRequest::new(code) {
        Ok(req) => serde_json::to_vec(&req).expect("request types serialise"),
        Err(_) => return json(StatusCode::OK, relay::strip_data(&refusal)),
    };
    let client = rl.clone();
    let sent = rl
        .pool
        .run(priority, move || {
            client
                .client
                .post(kooagent_core::authcode::api::PATH_HEARTBEAT, &body)
        })
        .await;
    match sent {
        Ok(Some(Ok((_, http, text)))) => match relay::recovered_answer(code, http, &text) {
            Some(answer) => {
                log::info!(
                    "relay {path}: {code} recovered for device key {key} (the marketplace had \
                     activated it; the first answer was lost)"
                );
                json(StatusCode::OK, answer)
            }
            None => json(StatusCode::OK, relay::strip_data(&refusal)),
        },
        Ok(Some(Err(e))) => {
            let m = format!("marketplace unreachable: {e}");
            relay_error(StatusCode::BAD_GATEWAY, relay::ERR_UNREACHABLE, &m)
        }
        Ok(None) | Err(_) => relay_error(
            StatusCode::SERVICE_UNAVAILABLE,
            relay::ERR_BUSY,
            "the relay is busy; try again later",
        ),
    }
}

fn device_error(status: StatusCode, code: &str, msg: &str) -> Resp {
    json(status, relay::error_body(code, msg))
}

/// `GET /v1/licenses/<id>[/status]?device_code=CODE`, signed with the device key
/// ([`devices`]).
async fn agent_get(state: &State, peer: SocketAddr, rest: &str, req: &Request<Incoming>) -> Resp {
    let (id, status) = match rest.strip_suffix("/status") {
        Some(id) => (id.to_string(), true),
        None => (rest.to_string(), false),
    };
    let target = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let now_ms = state.clock.now_ms();
    let headers = req.headers();
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let device = match relay::verify(header, "GET", &target, b"", now_ms) {
        Ok(d) => d,
        Err(e) => {
            let m = format!("licenses are served to signed device requests only: {e}");
            return device_error(StatusCode::UNAUTHORIZED, devices::ERR_UNAUTHENTICATED, &m);
        }
    };
    let device_code = match devices::code_from_query(req.uri().query()) {
        Ok(c) => c,
        Err(m) => return device_error(StatusCode::BAD_REQUEST, relay::ERR_BAD_REQUEST, &m),
    };
    if id.is_empty() || id.len() > 128 || id.contains('/') {
        return device_error(
            StatusCode::NOT_FOUND,
            devices::ERR_NOT_FOUND,
            "no such license",
        );
    }
    let fetch = devices::Fetch {
        license_id: id,
        status,
        device_code,
        key: device.key,
        nonce: device.nonce,
        address: limits::address_key(peer.ip()),
    };
    let lim = state.live().limits.clone();
    let prune = state.prune_before(now_ms.div_euclid(1000));
    let bucket_age = lim.longest_refill_ms();
    let r = state
        .db
        .run(move |tx| {
            if let Some(before) = prune {
                tx.prune_nonces(before)?;
                tx.prune_buckets(now_ms - bucket_age)?;
            }
            devices::fetch(tx, &fetch, &lim, now_ms)
        })
        .await;
    match r {
        Ok(devices::Answer::Serve(text)) => plain(StatusCode::OK, &text),
        Ok(devices::Answer::NotFound(m)) => {
            device_error(StatusCode::NOT_FOUND, devices::ERR_NOT_FOUND, &m)
        }
        Ok(devices::Answer::Bound(m)) => {
            log::warn!("{peer}: license fetch refused: {m}");
            device_error(StatusCode::FORBIDDEN, devices::ERR_BOUND, &m)
        }
        Ok(devices::Answer::Limited(bucket)) => {
            log::debug!("{peer}: license fetch over the miss limit ({bucket})");
            let mut r = device_error(
                StatusCode::TOO_MANY_REQUESTS,
                devices::ERR_LIMITED,
                "too many requests for licenses that are not yours; try again later",
            );
            r.headers_mut()
                .insert("retry-after", "60".parse().expect("valid"));
            r
        }
        Ok(devices::Answer::Replay) => device_error(
            StatusCode::UNAUTHORIZED,
            devices::ERR_UNAUTHENTICATED,
            "x-kooagent-nonce was already used (replayed request)",
        ),
        Err(e) => {
            log::error!("agent request failed: {e}");
            plain(StatusCode::SERVICE_UNAVAILABLE, "try again later\n")
        }
    }
}

/// The configured connection limits under the descriptor limit `nofile`, saying so when
/// they had to be lowered.
fn fit_connections(cfg: &SellerServerConfig, nofile: u64) -> conns::Limits {
    let fitted = conns::Limits::fit(
        cfg.max_connections,
        cfg.max_connections_per_address,
        cfg.marketplace_reserved_connections,
        nofile,
        cfg.relay_workers,
    );
    if fitted.max < cfg.max_connections {
        log::warn!(
            "seller_server.max_connections {} does not fit RLIMIT_NOFILE {nofile} (descriptors \
             kept for files and marketplace calls); serving at most {} connections, {} of them \
             kept for the marketplace; raise LimitNOFILE to serve more",
            cfg.max_connections,
            fitted.max,
            fitted.reserve
        );
    }
    fitted
}

/// `metrics_token_file`'s token, refused when it is the interconnection key: the
/// marketplace's key must not open the metrics, nor the metrics token sign its calls.
fn metrics_token(cfg: &SellerServerConfig, market: &Secret) -> Result<Option<Secret>, String> {
    if cfg.metrics_token_file.as_os_str().is_empty() {
        return Ok(None);
    }
    let key = "seller_server.metrics_token_file";
    let t = Secret::load_as(&cfg.metrics_token_file, key)?;
    if t.expose() == market.expose() {
        return Err(format!(
            "{key} {}: holds the interconnection key; give /metrics a token of its own",
            cfg.metrics_token_file.display()
        ));
    }
    if t.expose().len() < 16 {
        return Err(format!(
            "{key} {}: the token is shorter than 16 characters",
            cfg.metrics_token_file.display()
        ));
    }
    Ok(Some(t))
}

/// The async runtime's worker threads.
const WORKERS: usize = 2;

/// `kooagent seller serve`: reads the configuration's files, opens the database, listens,
/// prints `listening on ADDR` and serves until SIGTERM or SIGINT.
/// `config_path`: the file SIGHUP reads again (None: SIGHUP is logged and ignored).
pub fn run(
    cfg: &SellerServerConfig,
    config_path: Option<&Path>,
    clock: Arc<dyn Clock>,
) -> Result<(), String> {
    super::heap::keep_freed_memory();
    // The runtime and the SIGHUP handler come first: a reload asked for while the server
    // still reads its keys and opens the database (seconds on a busy PostgreSQL) is carried
    // out once it listens, instead of killing it (SIGHUP's default action).
    // The two workers are the runtime's first threads (blocking threads come later, on
    // demand, and need no warm heap).
    let started = std::sync::atomic::AtomicUsize::new(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .on_thread_start(move || {
            if started.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < WORKERS {
                super::heap::warm_this_thread(super::heap::WORKER_HEAP);
            }
        })
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let hangup = {
        let _in_runtime = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| format!("installing the SIGHUP handler: {e}"))?
    };
    private_file_mode("seller_server.signing_key_file", &cfg.signing_key_file)?;
    let signing_key = kooagent_edge::keyfile::read_signing_key(&cfg.signing_key_file)
        .map_err(|e| format!("seller_server.signing_key_file: {e}"))?;
    let interconnection_key = Secret::load_as(
        &cfg.interconnection_key_file,
        "seller_server.interconnection_key_file",
    )?;
    let relay = if cfg.aksk_file.as_os_str().is_empty() {
        None
    } else {
        let ca = &cfg.marketplace_extra_ca_file;
        let ca = (!ca.as_os_str().is_empty()).then_some(ca.as_path());
        Some(Arc::new(Relay::new(cfg, ca, clock.clone())?))
    };
    let tls = TlsSlot::new(tls_config(&cfg.cert_file, &cfg.key_file)?);
    let db = cfg.open_db().map_err(|e| e.to_string())?;
    // The delivery worker's own copy of the interconnection key (read with the same
    // checks: mode 0600, owner; never logged).
    let usage_key = Arc::new(Secret::load_as(
        &cfg.interconnection_key_file,
        "seller_server.interconnection_key_file",
    )?);
    let tokens: Arc<dyn StatusTokens> = Arc::new(super::tokens::FreezeTokens {
        key: signing_key.clone(),
    });
    let metrics_token = metrics_token(cfg, &interconnection_key)?;
    let mut state = State::new(
        cfg,
        signing_key,
        interconnection_key,
        tokens,
        db,
        clock,
        relay,
    );
    state.metrics_token = metrics_token;
    if !cfg.console_password_file.as_os_str().is_empty() {
        let audit = if cfg.console_audit_file.as_os_str().is_empty() {
            crate::files::ensure_dir(&cfg.state_dir, 0o700)
                .map_err(|e| format!("seller_server.state_dir: {e}"))?;
            cfg.state_dir.join("console-audit.log")
        } else {
            cfg.console_audit_file.clone()
        };
        state.console = Some(super::console::Console::load(
            &cfg.console_password_file,
            audit,
        )?);
    }
    let state = Arc::new(state);
    let nofile = conns::raise_fd_limit();
    let fitted = fit_connections(cfg, nofile);
    state.conns.set_limits(fitted);
    super::usage_relay::start_worker(
        state.usage.clone(),
        state.db.clone(),
        usage_key,
        state.clock.clone(),
    )?;
    rt.block_on(async move {
        let (hup_state, hup_tls, started) = (state.clone(), tls.clone(), cfg.clone());
        let path = config_path.map(Path::to_path_buf);
        tokio::spawn(async move {
            let mut hangup = hangup;
            while hangup.recv().await.is_some() {
                let Some(path) = &path else {
                    log::warn!("SIGHUP: no configuration file to read again; ignored");
                    continue;
                };
                match reload(path, &started, &hup_state, &hup_tls, nofile) {
                    Ok(pending) => {
                        log::info!(
                            "SIGHUP: reloaded {}: TLS certificate, limits, connection limits, \
                             body_timeout_secs, timestamp_window_secs",
                            path.display()
                        );
                        if !pending.is_empty() {
                            log::warn!(
                                "SIGHUP: {} changed in {} but take effect only at a restart; \
                                 still running with the values the server started with",
                                pending.join(", "),
                                path.display()
                            );
                        }
                    }
                    Err(e) => log::error!(
                        "SIGHUP: reloading {} failed, still serving the previous \
                         configuration: {e}",
                        path.display()
                    ),
                }
            }
        });
        let listener = bind_listener(&cfg.listen)
            .await
            .map_err(|e| format!("seller_server.listen {}: {e}", cfg.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        log::info!(
            "seller server listening on {addr}: products {}",
            cfg.products
                .iter()
                .map(|p| format!("{} at {}", p.product, p.path))
                .collect::<Vec<_>>()
                .join(", ")
        );
        {
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "listening on {addr}");
            let _ = out.flush();
        }
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                std::future::pending::<()>().await;
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            log::info!("seller server stopping");
        };
        if let (true, Some(rl)) = (cfg.license_upload, state.relay.clone()) {
            let up = super::upload::Uploader {
                relay: rl,
                template: cfg.license_upload_path.clone(),
                first_backoff: cfg.license_upload_retry_secs as i64,
                clock: state.clock.clone(),
            };
            tokio::spawn(super::upload::run(state.db.clone(), up));
        }
        serve(listener, tls, state, shutdown).await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shortcut that skips the JSON parse never misses a legacy token, however the
    /// key is written, and a §4.1 body is not parsed.
    #[test]
    fn auth_token_detection_skips_the_parse_only_when_no_token_can_be_there() {
        let none: &[(String, String)] = &[];
        assert!(has_auth_token(none, br#"{"authToken":"x","activity":"a"}"#));
        assert!(has_auth_token(none, br#"{"auth\u0054oken":"x"}"#));
        assert!(!has_auth_token(none, br#"{"activity":"getLicense"}"#));
        assert!(!has_auth_token(none, br#"{"note":"authToken"}"#));
        assert!(!may_name_auth_token(
            br#"{"activity":"getLicense","instanceId":"i"}"#
        ));
        let q = [("authToken".to_string(), "x".to_string())];
        assert!(has_auth_token(&q, b"not json"));
    }

    /// One handshake in memory between `client` and `server`, the server's session
    /// tickets read by the client: how it went.
    fn handshake(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> rustls::HandshakeKind {
        handshake_details(client, server).0
    }

    /// One handshake in memory between `client` and `server`, the server's session
    /// tickets read by the client; the server's view of it: (kind, cipher suite, key
    /// exchange group).
    fn handshake_details(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> (
        rustls::HandshakeKind,
        rustls::CipherSuite,
        Option<rustls::NamedGroup>,
    ) {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c =
            rustls::Connection::from(rustls::ClientConnection::new(client.clone(), name).unwrap());
        let mut s =
            rustls::Connection::from(rustls::ServerConnection::new(server.clone()).unwrap());
        for _ in 0..10 {
            flight(&mut c, &mut s);
            flight(&mut s, &mut c);
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
                break;
            }
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (
            s.handshake_kind().unwrap(),
            s.negotiated_cipher_suite().unwrap().suite(),
            s.negotiated_key_exchange_group().map(|g| g.name()),
        )
    }

    /// Everything `from` has to send, read and processed by `to`.
    fn flight(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut r = &buf[..];
        while !r.is_empty() {
            to.read_tls(&mut r).unwrap();
        }
        to.process_new_packets().unwrap();
    }

    /// The server's TLS configuration (`tls_config`, from files as `seller serve` reads
    /// them) for a fresh self-signed `localhost` certificate, and roots that trust it.
    fn server_for_localhost() -> (Arc<rustls::ServerConfig>, rustls::RootCertStore) {
        let d = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(d.path().join("c.pem"), cert.pem()).unwrap();
        std::fs::write(d.path().join("k.pem"), key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            d.path().join("k.pem"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let server = tls_config(&d.path().join("c.pem"), &d.path().join("k.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        (server, roots)
    }

    /// A device reconnecting the next hour resumes its TLS session even when a fleet
    /// larger than a session cache connected in between (stateless tickets), so the
    /// hourly close does not cost every device a full handshake.
    #[test]
    fn a_device_resumes_its_session_after_a_fleet_connected() {
        let (server, roots) = server_for_localhost();
        let device = || {
            Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth(),
            )
        };
        let me = device();
        assert_eq!(handshake(&me, &server), rustls::HandshakeKind::Full);
        // The rest of the fleet: more sessions than rustls' default cache (256) holds.
        for _ in 0..300 {
            handshake(&device(), &server);
        }
        assert_eq!(handshake(&me, &server), rustls::HandshakeKind::Resumed);
    }

    /// A device's client lists AES-256/SHA-384 first (rustls' order): the server still
    /// picks TLS_AES_128_GCM_SHA256 (hashing in hardware where the CPU can), on the full
    /// handshake and on the resumed one, and resuming still does an X25519 exchange
    /// (forward secrecy: no psk_ke-only resumption).
    #[test]
    fn tls13_connections_get_aes128_sha256_and_resume_with_x25519() {
        let (server, roots) = server_for_localhost();
        let provider = rustls::crypto::ring::default_provider();
        assert_eq!(
            provider.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the device's client lists AES-256 first"
        );
        let device = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        for want in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
            let (kind, suite, kx) = handshake_details(&device, &server);
            assert_eq!(kind, want);
            assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
            assert_eq!(kx, Some(rustls::NamedGroup::X25519), "{want:?}");
        }
    }

    /// 300 clients connect at once and nobody accepts: with tokio's default backlog (128)
    /// the connections past the queue wait a second for their SYN retransmit.
    #[test]
    fn a_burst_of_connections_fits_the_accept_queue() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(4096);
        let burst = 300.min(somaxconn);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = bind_listener("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut connects = tokio::task::JoinSet::new();
            for _ in 0..burst {
                connects.spawn(tokio::time::timeout(
                    Duration::from_millis(700),
                    tokio::net::TcpStream::connect(addr),
                ));
            }
            let done = connects.join_all().await;
            let connected = done.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
            assert_eq!(connected, burst, "connections completed without an accept");
            drop(listener);
        });
    }
}
