//! Outgoing HTTPS shared by the marketplace clients (usage upload, authorization codes):
//! rustls, Mozilla's roots plus an optional extra CA, verification always on,
//! `HTTPS_PROXY` honoured, every request bounded in time, HTTP errors returned as answers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Loads the trust roots: Mozilla's set plus the certificates of `extra_ca` (PEM).
/// Errors name `config_key`, the setting the file came from.
pub fn roots(
    extra_ca: Option<&Path>,
    config_key: &str,
) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let mut certs: Vec<ureq::tls::Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()))
        .collect();
    if let Some(path) = extra_ca {
        let pem =
            std::fs::read(path).map_err(|e| format!("{config_key} {}: {e}", path.display()))?;
        let mut n = 0;
        for item in ureq::tls::parse_pem(&pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => {
                    certs.push(c);
                    n += 1;
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "{config_key} {}: not valid PEM: {e}",
                        path.display()
                    ))
                }
            }
        }
        if n == 0 {
            return Err(format!(
                "{config_key} {}: holds no certificate",
                path.display()
            ));
        }
    }
    Ok(certs)
}

/// Longest a connection (TCP and TLS) may take before the next host is tried.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A blocking agent: whole requests bounded by `timeout`, status codes not turned into errors.
pub fn agent(
    extra_ca: Option<&Path>,
    config_key: &str,
    timeout: Duration,
) -> Result<ureq::Agent, String> {
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots(
            extra_ca, config_key,
        )?)))
        .build();
    // The default configuration reads HTTPS_PROXY / ALL_PROXY / NO_PROXY.
    let config = ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(timeout))
        // Connecting is bounded apart, so that a timeout says whether the host was
        // reached at all (authcode::client::answer_maybe_lost).
        .timeout_connect(Some(timeout.min(CONNECT_TIMEOUT)))
        .http_status_as_error(false)
        .user_agent(format!("kooagent/{}", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(ureq::Agent::new_with_config(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_ca_problems_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ca.pem");
        std::fs::write(&p, "nothing here").unwrap();
        let e = roots(Some(&p), "usage.extra_ca_file").unwrap_err();
        assert!(
            e.contains("usage.extra_ca_file") && e.contains("no certificate"),
            "{e}"
        );
        let e = roots(Some(&d.path().join("missing.pem")), "k").unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
        assert!(roots(None, "k").unwrap().len() > 50);
    }
}
