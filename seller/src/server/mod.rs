//! The seller license server, `kooagent seller serve`: the HTTPS endpoint KooGallery
//! calls when a buyer orders, renews, lets expire, releases or is frozen (koogallery.md
//! §2, §3.3, §4, §5, Part B §B3), producing the licenses (docs/license-format.md) and
//! status tokens the agent verifies, and serving them to agents. See
//! docs/seller-server.md.
//!
//! - [`auth`]: the marketplace's request signature and our `Body-Sign` (the
//!   [UNCONFIRMED] choices live there);
//! - [`activities`]: request → decision, on a database transaction;
//! - [`db`]: the storage interface, SQLite and PostgreSQL, one thread with group commit;
//! - [`tokens`]: where status tokens come from (the freeze module);
//! - [`devices`]: the device registry and the agents' signed license/status fetches;
//! - [`limits`]: token buckets in the database (shared by every server process);
//! - [`relay`]: the authorization-code relay (device signatures, trust on first use,
//!   forwarding with the seller's AK/SK);
//! - [`usage_relay`]: usage records from devices (device signatures), held in an outbox
//!   and uploaded with the interconnection key;
//! - [`console`]: the seller's web console under `/console`;
//! - [`metrics`]: `GET /metrics`, the Prometheus counters, behind their own token;
//! - [`http`]: TLS, HTTP, routing, timeouts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod activities;
pub mod auth;
pub mod call;
pub mod conns;
pub mod console;
pub mod db;
pub mod devices;
pub mod heap;
pub mod http;
pub mod key_cache;
pub mod limits;
pub mod metrics;
pub mod pool;
pub mod relay;
pub mod sig_batch;
pub mod tokens;
pub mod upload;
pub mod usage_relay;

/// The configuration file of `kooagent seller serve`: one `[seller_server]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SellerFile {
    pub seller_server: SellerServerConfig,
}

/// `[seller_server]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SellerServerConfig {
    /// Address and port to listen on (HTTPS only).
    pub listen: String,
    /// TLS certificate chain (PEM, leaf first) and its private key (PEM, mode 0600).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The seller's Ed25519 license key (PKCS#8 PEM, mode 0600; `kooagent seller keygen`).
    pub signing_key_file: PathBuf,
    /// The marketplace interconnection key for this production interface (mode 0600):
    /// verifies the marketplace's requests and signs our answers.
    pub interconnection_key_file: PathBuf,
    /// SQLite database directory (`seller.db` inside), used when `database_url` is empty.
    pub state_dir: PathBuf,
    /// PostgreSQL connection (`postgresql://user@host/db` or `host=/run/postgresql
    /// dbname=...`); empty: SQLite.
    pub database_url: String,
    /// PostgreSQL schema holding the tables.
    pub database_schema: String,
    /// PostgreSQL connections this process opens, each with its own database thread (a
    /// transaction waiting on another replica's lock holds up only its own). SQLite: one.
    pub database_connections: usize,
    /// How far the marketplace's `timestamp` may be from our clock.
    pub timestamp_window_secs: u64,
    /// One entry per marketplace product: the URL path its production interface calls.
    pub products: Vec<ProductConfig>,
    /// The seller's APIG AK/SK for the authorization-code relay (`/v1/authcode/...`):
    /// two lines, the AK then the SK, mode 0600. Empty: no relay (those paths answer 404).
    pub aksk_file: PathBuf,
    /// The marketplace open-API hosts the relay forwards to, in the order tried.
    pub marketplace_bases: Vec<String>,
    /// A CA certificate (PEM) trusted for those hosts besides the web PKI (tests,
    /// inspecting proxies); empty: none.
    pub marketplace_extra_ca_file: PathBuf,
    /// `[seller_server.usage]`: the usage relay (issue 19).
    pub usage: usage_relay::UsageRelayConfig,
    /// Upload each `getLicenseAsync` license to the marketplace (§2) from a durable
    /// outbox, signed with `aksk_file`. Off by default: the call is [UNCONFIRMED]
    /// (docs/seller-server.md "License upload").
    pub license_upload: bool,
    /// The upload's path on `marketplace_bases`; `{event_id}` is replaced.
    pub license_upload_path: String,
    /// The first retry of a failed upload waits this long, then twice as long each
    /// time, at most an hour.
    pub license_upload_retry_secs: u64,
    /// Rate limits (`[seller_server.limits]`).
    pub limits: limits::LimitsConfig,
    /// Relay: threads calling the marketplace, calls that may wait for one, and how long
    /// a call may wait before it is answered busy instead of forwarded.
    pub relay_workers: usize,
    pub relay_queue: usize,
    pub relay_queue_wait_secs: u64,
    /// A request body must arrive whole within this (headers: 10 s).
    pub body_timeout_secs: u64,
    /// Connections held at once, at most; lowered at start to fit `RLIMIT_NOFILE`
    /// (docs/seller-server.md "Connections").
    pub max_connections: usize,
    /// Connections from one source address (IPv6: one /64); 0: no cap.
    pub max_connections_per_address: usize,
    /// Of `max_connections`, this many are kept for the marketplace's calls: device
    /// requests are answered busy when fewer are free.
    pub marketplace_reserved_connections: usize,
    /// The bearer token of `GET /metrics` (one line, mode 0600); empty: no `/metrics`
    /// (it answers 404). Must differ from the interconnection key.
    pub metrics_token_file: PathBuf,
    /// The console's admin password hash (argon2id, `kooagent seller console-password`,
    /// mode 0600); empty: no console (`/console` answers 404).
    pub console_password_file: PathBuf,
    /// The console's audit log (JSON lines); empty: `console-audit.log` in `state_dir`.
    pub console_audit_file: PathBuf,
}

/// The seller server's own places, apart from the agent's: as root the FHS ones
/// (/etc/kooagent-seller, /var/lib/kooagent-seller), otherwise the user's XDG directories, so
/// a developer trying the server needs no root and never touches a real installation.
fn user_dirs() -> Option<directories::ProjectDirs> {
    if rustix::process::geteuid().is_root() {
        return None;
    }
    directories::ProjectDirs::from("", "", "kooagent-seller")
}

/// `seller serve|device|enroll` read this file when no --config is given.
pub fn default_config_file() -> PathBuf {
    match user_dirs() {
        Some(d) => d.config_dir().join("server.toml"),
        None => "/etc/kooagent-seller/server.toml".into(),
    }
}

fn default_state_dir() -> PathBuf {
    match user_dirs() {
        Some(d) => d.data_local_dir().to_path_buf(),
        None => "/var/lib/kooagent-seller".into(),
    }
}

impl Default for SellerServerConfig {
    fn default() -> Self {
        SellerServerConfig {
            listen: "0.0.0.0:8443".into(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            signing_key_file: PathBuf::new(),
            interconnection_key_file: PathBuf::new(),
            state_dir: default_state_dir(),
            database_url: String::new(),
            database_schema: "public".into(),
            database_connections: 4,
            timestamp_window_secs: 60,
            products: vec![],
            aksk_file: PathBuf::new(),
            marketplace_bases: kooagent_edge::marketplace::DEFAULT_BASES
                .iter()
                .map(|b| b.to_string())
                .collect(),
            marketplace_extra_ca_file: PathBuf::new(),
            usage: Default::default(),
            license_upload: false,
            license_upload_path: upload::DEFAULT_PATH.into(),
            license_upload_retry_secs: 30,
            limits: limits::LimitsConfig::default(),
            relay_workers: 8,
            relay_queue: 64,
            relay_queue_wait_secs: 5,
            body_timeout_secs: 10,
            max_connections: 4096,
            max_connections_per_address: 64,
            marketplace_reserved_connections: 64,
            metrics_token_file: PathBuf::new(),
            console_password_file: PathBuf::new(),
            console_audit_file: PathBuf::new(),
        }
    }
}

/// How a marketplace product maps to licenses. The marketplace's License calls carry no
/// product field, and each product has its own production URL in the seller console:
/// the path tells the product, and this entry what its licenses hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    /// The URL path configured as this product's production interface, e.g. `/koogallery/sku-pro`.
    pub path: String,
    /// The license `product` field (what `license.check` asks by).
    pub product: String,
    #[serde(default)]
    pub grace_secs: u64,
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub limits: BTreeMap<String, u64>,
    /// Refuse (`000002`) an order without `deviceFingerprint` (default); false: such an
    /// order gets a license valid on any device.
    #[serde(default = "yes")]
    pub require_device: bool,
}

fn yes() -> bool {
    true
}

/// A configuration error naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

impl SellerServerConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<SellerServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(path.display().to_string(), e.to_string()))?;
        let file: SellerFile = toml::from_str(&text)
            .map_err(|e| invalid(path.display().to_string(), e.to_string()))?;
        file.seller_server.validate()?;
        Ok(file.seller_server)
    }

    /// Checks every value without touching files (those are read at start).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| invalid("seller_server.listen", format!("{:?}: {e}", self.listen)))?;
        for (key, p) in [
            ("seller_server.cert_file", &self.cert_file),
            ("seller_server.key_file", &self.key_file),
            ("seller_server.signing_key_file", &self.signing_key_file),
            (
                "seller_server.interconnection_key_file",
                &self.interconnection_key_file,
            ),
        ] {
            if p.as_os_str().is_empty() {
                return Err(invalid(key, "required"));
            }
        }
        if self.database_url.is_empty() && !self.state_dir.is_absolute() {
            return Err(invalid(
                "seller_server.state_dir",
                "must be an absolute path (or set database_url)",
            ));
        }
        if !db::postgres::valid_schema(&self.database_schema) {
            return Err(invalid(
                "seller_server.database_schema",
                "lower-case letters, digits and _, not starting with a digit",
            ));
        }
        if !(1..=64).contains(&self.database_connections) {
            return Err(invalid(
                "seller_server.database_connections",
                "must be between 1 and 64",
            ));
        }
        if !(1..=3600).contains(&self.timestamp_window_secs) {
            return Err(invalid(
                "seller_server.timestamp_window_secs",
                "must be between 1 and 3600",
            ));
        }
        if self.products.is_empty() {
            return Err(invalid(
                "seller_server.products",
                "configure at least one product (path and product)",
            ));
        }
        if self.marketplace_bases.is_empty() {
            return Err(invalid(
                "seller_server.marketplace_bases",
                "give at least one https:// URL",
            ));
        }
        for (i, b) in self.marketplace_bases.iter().enumerate() {
            if !b.starts_with("https://") {
                return Err(invalid(
                    format!("seller_server.marketplace_bases[{i}]"),
                    format!("{b:?} is not an https:// URL"),
                ));
            }
        }
        self.usage.validate()?;
        if self.license_upload && self.aksk_file.as_os_str().is_empty() {
            return Err(invalid(
                "seller_server.license_upload",
                "needs seller_server.aksk_file (the upload is signed with the seller's AK/SK)",
            ));
        }
        if !self.license_upload_path.starts_with('/')
            || !self.license_upload_path.contains("{event_id}")
            || self.license_upload_path.contains(['?', '#', ' '])
        {
            return Err(invalid(
                "seller_server.license_upload_path",
                "must be a URL path starting with / and holding {event_id}",
            ));
        }
        if !(1..=3600).contains(&self.license_upload_retry_secs) {
            return Err(invalid(
                "seller_server.license_upload_retry_secs",
                "must be between 1 and 3600",
            ));
        }
        if !(1..=256).contains(&self.relay_workers) {
            return Err(invalid(
                "seller_server.relay_workers",
                "must be between 1 and 256",
            ));
        }
        if !(1..=100_000).contains(&self.relay_queue) {
            return Err(invalid(
                "seller_server.relay_queue",
                "must be between 1 and 100000",
            ));
        }
        if !(1..=120).contains(&self.body_timeout_secs) {
            return Err(invalid(
                "seller_server.body_timeout_secs",
                "must be between 1 and 120",
            ));
        }
        if !(2..=1_000_000).contains(&self.max_connections) {
            return Err(invalid(
                "seller_server.max_connections",
                "must be between 2 and 1000000",
            ));
        }
        if self.max_connections_per_address > 1_000_000 {
            return Err(invalid(
                "seller_server.max_connections_per_address",
                "must be at most 1000000 (0: no cap)",
            ));
        }
        if self.marketplace_reserved_connections * 2 > self.max_connections {
            return Err(invalid(
                "seller_server.marketplace_reserved_connections",
                "must be at most half of max_connections",
            ));
        }
        if !(1..=60).contains(&self.relay_queue_wait_secs) {
            return Err(invalid(
                "seller_server.relay_queue_wait_secs",
                "must be between 1 and 60",
            ));
        }
        self.limits
            .validate()
            .map_err(|m| invalid("seller_server.limits", m))?;
        let mut paths = std::collections::HashSet::new();
        for (i, p) in self.products.iter().enumerate() {
            let key = |k: &str| format!("seller_server.products[{i}].{k}");
            if !p.path.starts_with('/') || p.path.contains(['?', '#', ' ']) {
                return Err(invalid(key("path"), "must be a URL path starting with /"));
            }
            if p.path.starts_with("/v1/") {
                return Err(invalid(
                    key("path"),
                    "/v1/ is reserved for the agents' endpoints",
                ));
            }
            if p.path == metrics::PATH {
                return Err(invalid(key("path"), "/metrics is the metrics endpoint"));
            }
            if p.path == console::PREFIX || p.path.starts_with("/console/") {
                return Err(invalid(key("path"), "/console is the seller console's"));
            }
            if !paths.insert(p.path.as_str()) {
                return Err(invalid(
                    key("path"),
                    format!("{} is configured twice", p.path),
                ));
            }
            // The product's license fields, checked by the license format's own rules.
            let probe = kooagent_core::license::issue::IssueRequest {
                id: Some("probe".into()),
                product: p.product.clone(),
                instance: "probe".into(),
                devices: vec![],
                unbound: true,
                issued_at: 1_700_000_000,
                not_before: None,
                term: kooagent_core::license::issue::Term::Perpetual,
                grace_secs: p.grace_secs,
                features: p.features.clone(),
                limits: p.limits.clone(),
                meta: BTreeMap::new(),
            };
            kooagent_core::license::issue::build(&probe)
                .map_err(|e| invalid(key("product"), e.to_string()))?;
        }
        Ok(())
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.state_dir.join("seller.db")
    }

    /// Opens the configured database.
    pub fn open_db(&self) -> Result<db::Db, db::DbError> {
        if self.database_url.is_empty() {
            crate::files::ensure_dir(&self.state_dir, 0o700)
                .map_err(|e| db::DbError::Backend(format!("{}: {e}", self.state_dir.display())))?;
            let mut backend = db::sqlite::Sqlite::open(&self.sqlite_path())?;
            backend.checkpoint_in_background(&self.sqlite_path())?;
            return Ok(db::Db::start(Box::new(backend)));
        }
        let mut pool: Vec<Box<dyn db::Backend>> = Vec::new();
        for _ in 0..self.database_connections.max(1) {
            pool.push(Box::new(db::postgres::Postgres::connect(
                &self.database_url,
                &self.database_schema,
            )?));
        }
        Ok(db::Db::start_pool(pool))
    }
}

#[cfg(test)]
mod tests;
