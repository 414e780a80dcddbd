//! The worked examples in docs/protocol.md are run against a real agent, so the page
//! cannot drift from the behaviour.

use std::process::Command;

use crate::harness::{run_ok, TestAgent};

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).unwrap()
}

/// The first ```lang block of `doc` that contains `containing` (also used for
/// docs/license-format.md in license.rs).
pub fn block(doc: &str, lang: &str, containing: &str) -> String {
    let fence = format!("```{lang}\n");
    doc.split(&fence)
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap().to_string())
        .find(|b| b.contains(containing))
        .unwrap_or_else(|| panic!("no ```{lang} block containing {containing:?}"))
}

#[test]
fn python_example_runs() {
    let a = TestAgent::start("");
    let code = block(&doc(), "python", "import json, socket").replace(
        "def agent(path=\"/run/kooagent/agent.sock\")",
        &format!("def agent(path={:?})", a.socket.display().to_string()),
    );
    let out = run_ok(Command::new("python3").arg("-c").arg(&code));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0 {'pong': True}"), "{text}");
    assert!(text.contains("'code': '"), "{text}");
}

#[test]
fn socat_example_runs() {
    if Command::new("socat").arg("-V").output().is_err() {
        eprintln!("skipped: socat is not installed (scripts/test.sh installs it)");
        return;
    }
    let a = TestAgent::start("");
    let script = block(&doc(), "sh", "socat - UNIX-CONNECT");
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env(
            "PATH",
            format!(
                "{}:{}",
                std::path::Path::new(crate::harness::BIN.path())
                    .parent()
                    .unwrap()
                    .display(),
                std::env::var("PATH").unwrap()
            ),
        )
        .env("KOOAGENT_CONFIG", &a.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("{\"v\":1,\"id\":1,\"ok\":true,\"result\":{\"pong\":true}}"),
        "{text}"
    );
    assert!(lines[1].contains("\"code\":"), "{text}");
}
