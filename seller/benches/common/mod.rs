//! What both benches need from the system.

/// CPU time (user + system) a process used so far, in microseconds; None once it is gone.
pub fn process_cpu_us(pid: u32) -> Option<f64> {
    // SAFETY: plain libc calls on local values.
    unsafe {
        let mut clock: libc::clockid_t = 0;
        if libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) != 0 {
            return None;
        }
        let mut t: libc::timespec = std::mem::zeroed();
        if libc::clock_gettime(clock, &mut t) != 0 {
            return None;
        }
        Some(t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3)
    }
}

/// The seller server to measure: `KOOAGENT_BENCH_SERVER` (another build, to compare two
/// servers with the same client; an older `kooagent` built with the seller server works
/// too) or this build's `kooagent-seller`. Returns it with the arguments that run `serve`.
pub fn server() -> (std::ffi::OsString, &'static [&'static str]) {
    let server = std::env::var_os("KOOAGENT_BENCH_SERVER")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_kooagent-seller").into());
    let old = std::path::Path::new(&server).file_name() == Some("kooagent".as_ref());
    (
        server,
        if old {
            &["seller", "serve"]
        } else {
            &["serve"]
        },
    )
}

/// A TLS client trusting only `ca` (the bench's own certificate).
pub fn tls_connector(
    ca: &rustls::pki_types::CertificateDer<'static>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

/// The client's runtime: two workers, like the server's (the usage relay bench's;
/// seller_serve's client runs on one thread, see there).
#[allow(dead_code)]
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
