//! The `kooagent-seller` binary's tools, run as a seller would (the server itself is
//! tested end to end with a real agent in tests/e2e).

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_kooagent-seller");
const CODE: &str = "ABCD-EFGH-JKMN-PQRS-TVW";

fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("KOOAGENT_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// keygen, issue and inspect: with `--key`, and without it against the agent's trusted
/// keys (its configuration from --config or KOOAGENT_CONFIG), as `kooagent seller inspect`
/// did when the tools were in the agent's binary.
#[test]
fn issue_then_inspect_with_a_key_and_with_the_agents_trusted_keys() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let out = run(&["keygen", "--out", &p("seller.key")], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let code = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
        .chars()
        .map(|c| format!("{CODE}{c}"))
        .find(|c| kooagent_core::device_code::parse_code(c).is_ok())
        .unwrap();
    let issue = [
        "issue",
        "--key",
        &p("seller.key"),
        "--device-code",
        &code,
        "--product",
        "sku",
        "--instance",
        "i-1",
        "--days",
        "30",
        "--id",
        "L-CLI",
        "-o",
        &p("l.lic"),
    ];
    let out = run(&issue, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        &["inspect", &p("l.lic"), "--key", &p("seller.key.pub")],
        &[],
    );
    assert!(
        out.status.success() && text(&out).contains("signature  valid"),
        "{}",
        text(&out)
    );

    // No --key: the agent's configuration says which keys it trusts.
    let trust = std::fs::read_to_string(p("seller.key.pub")).unwrap();
    std::fs::write(
        p("agent.toml"),
        format!(
            "[agent]\nlog_level = \"info\"\n[license]\ntrusted_keys = [\"{}\"]\n",
            trust.trim()
        ),
    )
    .unwrap();
    let out = run(&["--config", &p("agent.toml"), "inspect", &p("l.lic")], &[]);
    assert!(
        out.status.success() && text(&out).contains("valid (the agent's trusted keys)"),
        "{}",
        text(&out)
    );
    let out = run(
        &["inspect", &p("l.lic")],
        &[("KOOAGENT_CONFIG", &d.path().join("agent.toml"))],
    );
    assert!(
        text(&out).contains("the agent's trusted keys"),
        "{}",
        text(&out)
    );
    // Another key trusted: not verified, exit 2.
    let other = run(&["keygen", "--out", &p("other.key")], &[]);
    assert!(other.status.success());
    let other = std::fs::read_to_string(p("other.key.pub")).unwrap();
    std::fs::write(
        p("agent2.toml"),
        format!("[license]\ntrusted_keys = [\"{}\"]\n", other.trim()),
    )
    .unwrap();
    let out = run(
        &["--config", &p("agent2.toml"), "inspect", &p("l.lic")],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // None configured: said, not failed.
    let out = run(&["--config", &p("none.toml"), "inspect", &p("l.lic")], &[]);
    assert!(
        out.status.success() && text(&out).contains("not checked"),
        "{}",
        text(&out)
    );
}

/// The server's commands refuse to guess a configuration and name what is missing.
#[test]
fn serve_without_a_configuration_says_where_it_looked() {
    let d = tempfile::tempdir().unwrap();
    let out = run(
        &["outbox"],
        &[
            ("HOME", d.path()),
            ("XDG_CONFIG_HOME", &d.path().join("cfg")),
        ],
    );
    let t = text(&out);
    assert!(
        !out.status.success()
            && t.contains("no seller server configuration")
            && t.contains("--config"),
        "{t}"
    );
}
