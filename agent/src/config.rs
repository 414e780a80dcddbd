//! The agent's configuration: embedded defaults (so `kooagent run` works with no file),
//! overlaid by a TOML file, overlaid by command-line flags. Every effective value knows
//! where it came from (`kooagent config show`). Unknown keys and bad values are errors that
//! name the key; nothing starts half-configured.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device_code::IdentityConfig;
use crate::freeze::FreezeConfig;
use crate::license::LicenseConfig;
use crate::usage::UsageConfig;

/// Where the default paths point: FHS locations as root or as the service account
/// ([`SERVICE_USER`]), the user's XDG directories otherwise.
#[derive(Debug, Clone)]
pub struct DefaultPaths {
    pub config_file: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub pidfile: PathBuf,
}

pub fn is_root() -> bool {
    crate::sys::is_root()
}

/// The unprivileged user the packages, `kooagent-install` and the init scripts run the agent
/// as (home `/nonexistent`): it gets the FHS defaults too, or the packaged configuration
/// (every key commented out) would point the service at `/nonexistent/.local/share`.
pub const SERVICE_USER: &str = "kooagent";

impl DefaultPaths {
    pub fn detect() -> DefaultPaths {
        if is_root() || crate::sys::effective_user_name().as_deref() == Some(SERVICE_USER) {
            return DefaultPaths {
                config_file: "/etc/kooagent/agent.toml".into(),
                state_dir: "/var/lib/kooagent".into(),
                socket: "/run/kooagent/agent.sock".into(),
                pidfile: "/run/kooagent/kooagent.pid".into(),
            };
        }
        let dirs = directories::ProjectDirs::from("", "", "kooagent");
        let (config_dir, state_dir, runtime) = match &dirs {
            Some(d) => (
                d.config_dir().to_path_buf(),
                d.data_local_dir().to_path_buf(),
                d.runtime_dir().map(Path::to_path_buf),
            ),
            // No home directory at all (a bare service account): fall back to /tmp-free,
            // predictable paths under the working directory rather than failing.
            None => {
                let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
                (base.join("kooagent"), base.join("kooagent/state"), None)
            }
        };
        let runtime = runtime.unwrap_or_else(|| state_dir.clone());
        DefaultPaths {
            config_file: config_dir.join("agent.toml"),
            socket: runtime.join("agent.sock"),
            pidfile: runtime.join("kooagent.pid"),
            state_dir,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSection {
    /// The seller's product id: keys the device code, so codes differ per product.
    pub product_id: String,
    pub state_dir: PathBuf,
    pub log_level: String,
    pub pidfile: PathBuf,
    /// Runtime threads serving the socket. One is the default: the seller's software runs
    /// on the same (often 2-core) machine, and one worker, like Redis's single event loop,
    /// measured faster than two there (higher requests/s, half the p99 at 32 clients).
    /// Blocking work (fsync, HTTPS, identity probes) has threads of its own either way.
    pub worker_threads: usize,
}

impl Default for AgentSection {
    fn default() -> Self {
        let p = DefaultPaths::detect();
        AgentSection {
            product_id: "default".into(),
            state_dir: p.state_dir,
            log_level: "info".into(),
            pidfile: p.pidfile,
            worker_threads: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SocketSection {
    pub path: PathBuf,
    /// Group given access to the socket (mode 0660). Missing group: an error only when the
    /// group was configured explicitly. Empty: the socket keeps the agent's own group (for
    /// trying the agent on a host without a `kooagent` group).
    pub group: String,
    /// Octal file mode of the socket, as a string ("0660").
    pub mode: String,
    /// Connections beyond this are answered with a `busy` error and closed.
    pub max_connections: usize,
    /// Connections one uid may hold at once (by SO_PEERCRED); beyond it, `busy`. Unset: a
    /// quarter of `max_connections`, so one local user cannot take every slot.
    pub max_connections_per_uid: Option<usize>,
    /// A connection that sends no request for this many seconds is closed; 0: never.
    /// `watch` streams are exempt (they wait for events, not requests).
    pub idle_timeout_secs: u64,
}

impl SocketSection {
    /// The per-uid cap for `max_connections` connections in all (after fitting it under
    /// the descriptor limit).
    pub fn per_uid_cap(&self, max_connections: usize) -> usize {
        self.max_connections_per_uid
            .unwrap_or(max_connections / 4)
            .clamp(1, max_connections.max(1))
    }

    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        (self.idle_timeout_secs > 0).then(|| std::time::Duration::from_secs(self.idle_timeout_secs))
    }
}

impl Default for SocketSection {
    fn default() -> Self {
        SocketSection {
            path: DefaultPaths::detect().socket,
            group: "kooagent".into(),
            mode: "0660".into(),
            max_connections: 16_384,
            max_connections_per_uid: None,
            idle_timeout_secs: 600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub agent: AgentSection,
    pub socket: SocketSection,
    pub identity: IdentityConfig,
    pub usage: UsageConfig,
    pub license: LicenseConfig,
    pub freeze: FreezeConfig,
    pub authcode: crate::authcode::config::AuthcodeConfig,
    pub metrics: crate::metrics::MetricsConfig,
}

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Flag(name) => write!(f, "flag {name}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub log_level: Option<String>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
}

/// The effective configuration and the provenance of each leaf key ("socket.path").
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
    origins: BTreeMap<String, Origin>,
}

impl Loaded {
    pub fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }

    /// `key = value  # origin` lines for every leaf, in file order of sections.
    pub fn show(&self) -> String {
        let value = toml::Value::try_from(&self.config).expect("config serialises");
        let mut leaves = Vec::new();
        flatten("", &value, &mut leaves);
        let width = leaves
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .max()
            .unwrap_or(0)
            + 3;
        let mut out = String::new();
        for (k, v) in leaves {
            let pad = width.saturating_sub(k.len() + v.len());
            out.push_str(&format!("{k} = {v}{:pad$}# {}\n", "", self.origin(&k)));
        }
        out
    }
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

fn leaf_keys(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) => leaf_keys(&key, inner, out),
            _ => out.push(key),
        }
    }
}

impl Config {
    /// Parses TOML text (no validation beyond the shape).
    pub fn parse(text: &str, path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        let config: Config = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let mut keys = Vec::new();
        leaf_keys("", &table, &mut keys);
        Ok((config, keys))
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let pid = &self.agent.product_id;
        if pid.is_empty() || pid.len() > 128 || !pid.chars().all(|c| c.is_ascii_graphic()) {
            return Err(invalid(
                "agent.product_id",
                "must be 1..128 printable ASCII characters without spaces",
            ));
        }
        if !self.agent.state_dir.is_absolute() {
            return Err(invalid("agent.state_dir", "must be an absolute path"));
        }
        if !(1..=16).contains(&self.agent.worker_threads) {
            return Err(invalid("agent.worker_threads", "must be between 1 and 16"));
        }
        if !self.agent.pidfile.is_absolute() {
            return Err(invalid("agent.pidfile", "must be an absolute path"));
        }
        if crate::logging::parse_level(&self.agent.log_level).is_none() {
            return Err(invalid(
                "agent.log_level",
                format!(
                    "unknown level {:?} (expected error, warn, info, debug or trace)",
                    self.agent.log_level
                ),
            ));
        }
        if !self.socket.path.is_absolute() {
            return Err(invalid("socket.path", "must be an absolute path"));
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if self.socket.path.as_os_str().len() > 107 {
            return Err(invalid(
                "socket.path",
                "is longer than the 107 bytes a Unix socket path may have",
            ));
        }
        self.socket_mode()?;
        let g = &self.socket.group;
        if g.len() > 32
            || !g
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return Err(invalid(
                "socket.group",
                format!("{g:?} is not a valid group name"),
            ));
        }
        if self.socket.max_connections == 0 {
            return Err(invalid("socket.max_connections", "must be at least 1"));
        }
        if self.socket.max_connections_per_uid == Some(0) {
            return Err(invalid(
                "socket.max_connections_per_uid",
                "must be at least 1",
            ));
        }
        self.identity
            .validate()
            .map_err(|m| invalid("identity", m))?;
        self.usage
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        self.license
            .validate()
            .map_err(|(key, m)| invalid(&key, m))?;
        self.freeze
            .validate()
            .map_err(|(key, m)| invalid(&key, m))?;
        self.authcode
            .validate()
            .map_err(|(key, m)| invalid(&key, m))?;
        self.metrics
            .validate()
            .map_err(|(key, m)| invalid(key, m))?;
        Ok(())
    }

    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        let m = self.socket.mode.trim_start_matches("0o");
        match u32::from_str_radix(m, 8) {
            Ok(v) if v <= 0o777 && !m.is_empty() => Ok(v),
            _ => Err(invalid(
                "socket.mode",
                format!(
                    "{:?} is not an octal file mode such as \"0660\"",
                    self.socket.mode
                ),
            )),
        }
    }

    pub fn log_level(&self) -> log::LevelFilter {
        crate::logging::parse_level(&self.agent.log_level).unwrap_or(log::LevelFilter::Info)
    }
}

/// Loads the effective configuration. `explicit` is `--config`: it must exist. Without it
/// the default file is read when present, and the embedded defaults are used otherwise.
pub fn load(explicit: Option<&Path>, overrides: &Overrides) -> Result<Loaded, ConfigError> {
    let (path, must_exist) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => (DefaultPaths::detect().config_file, false),
    };
    let mut origins = BTreeMap::new();
    let (mut config, file) = match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|_| ConfigError::Parse {
                path: path.clone(),
                message: "not valid UTF-8".into(),
            })?;
            let (config, keys) = Config::parse(&text, &path)?;
            for k in keys {
                origins.insert(k, Origin::File(path.clone()));
            }
            (config, Some(path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
            (Config::default(), None)
        }
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    if let Some(l) = &overrides.log_level {
        config.agent.log_level = l.clone();
        origins.insert("agent.log_level".into(), Origin::Flag("--log-level"));
    }
    if let Some(s) = &overrides.socket {
        config.socket.path = s.clone();
        origins.insert("socket.path".into(), Origin::Flag("--socket"));
    }
    if let Some(s) = &overrides.state_dir {
        config.agent.state_dir = s.clone();
        origins.insert("agent.state_dir".into(), Origin::Flag("--state-dir"));
    }
    if let Some(s) = &overrides.pidfile {
        config.agent.pidfile = s.clone();
        origins.insert("agent.pidfile".into(), Origin::Flag("--pidfile"));
    }
    config.validate()?;
    Ok(Loaded {
        config,
        file,
        origins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("agent.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn packaged_template_is_valid_commented_and_uncommented() {
        let text = include_str!("../../packaging/agent.toml");
        let (c, keys) = Config::parse(text, Path::new("agent.toml")).unwrap();
        assert!(
            keys.is_empty(),
            "every line of the template is commented out"
        );
        c.validate().unwrap();
        // Uncommenting every setting gives a valid configuration too.
        let on: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if rest.starts_with('[') || rest.contains(" = ") => rest,
                _ => "",
            })
            .collect::<Vec<_>>()
            .join("\n");
        let (c, keys) = Config::parse(&on, Path::new("agent.toml")).unwrap();
        // Issue 20: the sections a seller bakes into an image are all there.
        for key in [
            "identity.metadata_url",
            "license.trusted_keys",
            "usage.key_file",
            "freeze.token_url",
            "freeze.license_url",
            "freeze.poll_interval_secs",
        ] {
            assert!(keys.contains(&key.to_string()), "{key} missing: {keys:?}");
        }
        c.validate().unwrap();
    }

    #[test]
    fn embedded_defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_values_carry_their_origin() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "[agent]\nproduct_id = \"sku-1\"\n");
        let l = load(Some(&p), &Overrides::default()).unwrap();
        assert_eq!(l.config.agent.product_id, "sku-1");
        assert_eq!(l.origin("agent.product_id"), Origin::File(p.clone()));
        assert_eq!(l.origin("socket.mode"), Origin::Default);
        let shown = l.show();
        assert!(shown.contains("agent.product_id = \"sku-1\""), "{shown}");
        assert!(
            shown.contains(&format!("# file {}", p.display())),
            "{shown}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "[socket]\nmod = \"0660\"\n");
        let e = load(Some(&p), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `mod`"), "{e}");
        let p = write(d.path(), "[sockets]\n");
        let e = load(Some(&p), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("sockets"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let d = tempfile::tempdir().unwrap();
        for (text, key) in [
            ("[socket]\nmode = \"999\"\n", "socket.mode"),
            ("[socket]\npath = \"relative.sock\"\n", "socket.path"),
            ("[agent]\nlog_level = \"loud\"\n", "agent.log_level"),
            ("[agent]\nproduct_id = \"\"\n", "agent.product_id"),
        ] {
            let p = write(d.path(), text);
            let e = load(Some(&p), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let p = write(d.path(), "[socket]\nmax_connections = \"many\"\n");
        let e = load(Some(&p), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn explicit_missing_file_is_an_error_and_flags_win() {
        let d = tempfile::tempdir().unwrap();
        let e = load(Some(&d.path().join("none.toml")), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("none.toml"));
        let p = write(d.path(), "[agent]\nlog_level = \"warn\"\n");
        let o = Overrides {
            log_level: Some("debug".into()),
            ..Default::default()
        };
        let l = load(Some(&p), &o).unwrap();
        assert_eq!(l.config.agent.log_level, "debug");
        assert_eq!(l.origin("agent.log_level"), Origin::Flag("--log-level"));
    }
}
