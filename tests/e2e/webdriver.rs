//! A small W3C WebDriver client (JSON over HTTP, <https://www.w3.org/TR/webdriver2/>) for a
//! chromedriver started here on a loopback port, driving a headless Chromium.
//!
//! Written over the `ureq` and `serde_json` the tree already has rather than with
//! `fantoccini`/`thirtyfour`: those pull in an async HTTP stack for a dozen commands
//! used by one test, and chromedriver's own extension (`goog/cdp/execute`, the DevTools
//! protocol) gives the rest: phone-width emulation, JavaScript off, full-page screenshots.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

/// The W3C name of an element reference in a JSON answer.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The browser and its driver, as found on this machine.
pub struct Tools {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

/// `KOOAGENT_CHROMIUM` / `KOOAGENT_CHROMEDRIVER`, else Debian's `chromium` and
/// `chromedriver` (packages `chromium`, `chromium-driver`: scripts/deps.sh) in PATH.
pub fn tools() -> Result<Tools, String> {
    let find = |var: &str, names: &[&str]| -> Result<PathBuf, String> {
        if let Some(p) = std::env::var_os(var) {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(p)
            } else {
                Err(format!("{var}={} is not a file", p.display()))
            };
        }
        names
            .iter()
            .find_map(|n| in_path(n))
            .ok_or_else(|| format!("none of {names:?} in PATH (and no {var})"))
    };
    Ok(Tools {
        chromium: find(
            "KOOAGENT_CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        )?,
        chromedriver: find("KOOAGENT_CHROMEDRIVER", &["chromedriver"])?,
    })
}

fn in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// One browser session; dropping it ends the session (Chromium quits) and the driver.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: ureq::Agent,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium with a fresh
    /// profile, accepting the test server's self-signed certificate, `width`×`height` px.
    pub fn start(tools: &Tools, width: u32, height: u32) -> Browser {
        let profile = crate::harness::short_tempdir();
        let log = profile.path().join("chromedriver.log");
        let mut driver = Command::new(&tools.chromedriver)
            .arg("--port=0")
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", tools.chromedriver.display()));
        // "ChromeDriver was started successfully on port 38215." (EOF if it exits).
        let mut out = BufReader::new(driver.stdout.take().expect("piped"));
        let mut port = None;
        let mut seen = String::new();
        for _ in 0..20 {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            seen.push_str(&line);
            if let Some(p) = line
                .trim()
                .strip_prefix("ChromeDriver was started successfully on port ")
            {
                port = p.trim_end_matches('.').parse::<u16>().ok();
                break;
            }
        }
        let Some(port) = port else {
            let _ = driver.kill();
            let _ = driver.wait();
            panic!("chromedriver did not say its port; it printed:\n{seen}");
        };
        // Keep reading its stdout so that it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            // Loopback only, whatever HTTP(S)_PROXY says.
            .proxy(None)
            .build()
            .into();
        let mut b = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            http,
            log,
            _profile: profile,
        };
        let profile_dir = b._profile.path().join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // The seller server's certificate is the test's own CA's.
            "acceptInsecureCerts": true,
            "timeouts": {"pageLoad": 30_000, "script": 10_000, "implicit": 0},
            "goog:chromeOptions": {
                "binary": tools.chromium.to_string_lossy(),
                "args": [
                    "--headless=new",
                    // Root in a container: no user namespaces for Chromium's sandbox.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-proxy-server",
                    "--no-first-run",
                    "--hide-scrollbars",
                    "--lang=en-US",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile_dir.display()),
                ],
            },
        }}});
        let v = b
            .send("POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("a new Chromium session: {e}\n{}", b.driver_log()));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {v}"))
            .to_string();
        b
    }

    /// chromedriver's log (for failure messages).
    pub fn driver_log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// One command: its `value`, or the WebDriver error (`error: message`).
    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let r = match (method, body) {
            ("GET", _) => self.http.get(&url).call(),
            ("DELETE", _) => self.http.delete(&url).call(),
            (_, b) => self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .send(b.cloned().unwrap_or(json!({})).to_string()),
        };
        let mut r = r.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = r.status().as_u16();
        let text = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| format!("{method} {path}: reading the answer: {e}"))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{method} {path}: {e} in {text:.200}"))?;
        if status != 200 {
            return Err(format!(
                "{method} {path}: {status} {}: {}",
                v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    fn cmd(&self, method: &str, rest: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{rest}", self.session);
        self.send(method, &path, body.as_ref())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    pub fn title(&self) -> String {
        self.cmd("GET", "/title", None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Runs `script` (a function body) in the page; its return value.
    pub fn exec(&self, script: &str, args: Value) -> Value {
        self.try_exec(script, args)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_exec(&self, script: &str, args: Value) -> Result<Value, String> {
        let path = format!("/session/{}/execute/sync", self.session);
        let body = json!({"script": script, "args": args});
        self.send("POST", &path, Some(&body))
    }

    /// Clicks a button that sends a form and waits until the next page has loaded: a
    /// click can return before the navigation it starts, so a mark set in this document
    /// must be gone (bounded: 20 s).
    pub fn click_to_load(&self, el: &str) {
        self.exec("window.kooagentOldPage = true", json!([]));
        self.click(el);
        let t0 = std::time::Instant::now();
        loop {
            // Errors while the old document goes away: try again.
            let done = self.try_exec(
                "return window.kooagentOldPage === undefined && document.readyState === 'complete'",
                json!([]),
            );
            if done == Ok(json!(true)) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no new page 20 s after the click ({}): {done:?}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks and checks that no page is loaded (a form the browser refuses to send).
    pub fn click_to_stay(&self, el: &str) {
        self.exec("window.kooagentOldPage = true", json!([]));
        self.click(el);
        // Long enough for a navigation to begin: a form sent answers within milliseconds.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            self.try_exec("return window.kooagentOldPage === true", json!([])),
            Ok(json!(true)),
            "the click loaded another page ({})",
            self.url()
        );
    }

    pub fn find_all(&self, css: &str) -> Vec<String> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The one element `css` selects (a clear failure naming the page if there is none).
    pub fn find(&self, css: &str) -> String {
        self.find_all(css)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no {css} on {} ({})", self.url(), self.title()))
    }

    pub fn click(&self, el: &str) {
        self.cmd("POST", &format!("/element/{el}/click"), Some(json!({})));
    }

    pub fn clear(&self, el: &str) {
        self.cmd("POST", &format!("/element/{el}/clear"), Some(json!({})));
    }

    pub fn type_into(&self, el: &str, text: &str) {
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// The rendered text of an element, as a reader sees it.
    pub fn text(&self, el: &str) -> String {
        self.cmd("GET", &format!("/element/{el}/text"), None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    pub fn selected(&self, el: &str) -> bool {
        self.cmd("GET", &format!("/element/{el}/selected"), None) == json!(true)
    }

    /// A DevTools protocol command through chromedriver's extension.
    pub fn cdp(&self, command: &str, params: Value) -> Value {
        self.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(json!({"cmd": command, "params": params})),
        )
    }

    /// Lays pages out as a phone of `width` CSS px does (honouring the viewport meta),
    /// or, with None, as the desktop window again.
    pub fn phone_width(&self, width: Option<u32>) {
        match width {
            Some(w) => self.cdp(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": w, "height": 844, "deviceScaleFactor": 1, "mobile": true}),
            ),
            None => self.cdp("Emulation.clearDeviceMetricsOverride", json!({})),
        };
    }

    /// Pages' own scripts off (or on again); WebDriver's commands still run.
    pub fn javascript(&self, on: bool) {
        self.cdp(
            "Emulation.setScriptExecutionDisabled",
            json!({ "value": !on }),
        );
    }

    /// The whole page (not only the viewport) as PNG.
    pub fn screenshot_png(&self) -> Vec<u8> {
        let v = self.cdp(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        base64::engine::general_purpose::STANDARD
            .decode(v["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG")
    }

    /// Saves a screenshot as `dir/name.png`.
    pub fn save_screenshot(&self, dir: &Path, name: &str) {
        let png = self.screenshot_png();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.send("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
