//! Cloud instance id from the OpenStack metadata service (Huawei Cloud ECS serves it at
//! `http://169.254.169.254/openstack/latest/meta_data.json`, field `uuid`).
//!
//! Blocking; called from the daemon's background work, never from `resolve`.

use std::time::Duration;

use super::normalize::{clean, is_placeholder};

/// Largest metadata document accepted.
const MAX_BODY: u64 = 1024 * 1024;

/// Fetches the instance id (`uuid` field), trimmed and lowercased. The whole exchange (connect,
/// send, receive) is bounded by `timeout`; proxies from the environment are not used since the
/// service is link-local.
pub(crate) fn fetch_instance_id(url: &str, timeout: Duration) -> Result<String, String> {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .proxy(None)
        .http_status_as_error(true)
        .max_redirects(0)
        .build();
    let agent: ureq::Agent = config.into();
    let mut resp = agent
        .get(url)
        .header("Accept", "application/json")
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|e| format!("GET {url}: reading body: {e}"))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("GET {url}: bad JSON: {e}"))?;
    let uuid = doc
        .get("uuid")
        .and_then(|v| v.as_str())
        .map(clean)
        .ok_or_else(|| format!("GET {url}: no string field \"uuid\""))?;
    if is_placeholder(&uuid) {
        return Err(format!("GET {url}: placeholder \"uuid\""));
    }
    Ok(uuid.to_ascii_lowercase())
}

#[cfg(test)]
pub(crate) mod testserver {
    //! A one-shot HTTP server on 127.0.0.1 for tests (loopback only).
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// Serves `body` with `status` to up to `n` requests, then stops. Returns the base URL.
    pub fn serve(status: u16, body: &str, n: usize) -> (String, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let body = body.to_string();
        let handle = std::thread::spawn(move || {
            for _ in 0..n {
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => req.extend_from_slice(&buf[..k]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes());
            }
        });
        (
            format!("http://{addr}/openstack/latest/meta_data.json"),
            handle,
        )
    }

    /// A listener that accepts connections but never answers. Keep it alive for the test.
    pub fn silent() -> (String, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (
            format!("http://{addr}/openstack/latest/meta_data.json"),
            listener,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn reads_uuid_field() {
        let (url, h) = testserver::serve(
            200,
            r#"{"uuid":" 3F2504E0-4F89-11D3-9A0C-0305E82C3301 ","name":"ecs-1","availability_zone":"az1"}"#,
            1,
        );
        let id = fetch_instance_id(&url, Duration::from_secs(2)).unwrap();
        assert_eq!(id, "3f2504e0-4f89-11d3-9a0c-0305e82c3301");
        h.join().unwrap();
    }

    #[test]
    fn http_error_and_bad_documents() {
        let (url, h) = testserver::serve(404, "{}", 1);
        assert!(fetch_instance_id(&url, Duration::from_secs(2)).is_err());
        h.join().unwrap();
        let (url, h) = testserver::serve(200, r#"{"name":"x"}"#, 1);
        let e = fetch_instance_id(&url, Duration::from_secs(2)).unwrap_err();
        assert!(e.contains("uuid"), "{e}");
        h.join().unwrap();
        let (url, h) = testserver::serve(200, "not json", 1);
        assert!(fetch_instance_id(&url, Duration::from_secs(2)).is_err());
        h.join().unwrap();
    }

    #[test]
    fn silent_server_times_out() {
        let (url, _listener) = testserver::silent();
        let start = Instant::now();
        let e = fetch_instance_id(&url, Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(3), "{e}");
    }
}
