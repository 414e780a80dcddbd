//! docs/guide.md runs (issue 20): every ```sh run block, in order, in one bash in an empty
//! directory, against the real binaries; each ```text expect block is checked against the
//! output of the run block before it. The guide cannot go stale.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{short_tempdir, BIN};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// A run block and what its output must show.
struct Step {
    line: usize,
    script: String,
    expect: Option<String>,
}

/// The marked blocks of the guide, in order (an expect block belongs to the run block
/// before it).
fn steps(doc: &str) -> Vec<Step> {
    let mut out: Vec<Step> = vec![];
    let mut lines = doc.lines().enumerate();
    while let Some((n, l)) = lines.next() {
        let info = match l.strip_prefix("```") {
            Some(i) if !i.is_empty() => i.trim(),
            _ => continue,
        };
        let mut body = String::new();
        for (_, l) in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        match info {
            "sh run" => out.push(Step {
                line: n + 1,
                script: body,
                expect: None,
            }),
            "text expect" => {
                let last = out.last_mut().expect("an expect block follows a run block");
                assert!(
                    last.expect.is_none(),
                    "two expect blocks after line {}",
                    last.line
                );
                last.expect = Some(body);
            }
            _ => {}
        }
    }
    out
}

/// `pattern` matches all of `line`, `…` standing for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    let mut rest = line;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(p) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(p) && rest.len() >= p.len();
        } else {
            let Some(at) = rest.find(p) else { return false };
            rest = &rest[at + p.len()..];
        }
    }
    rest.is_empty()
}

/// Every expected line matches an output line, in order (others may come between;
/// empty expected lines and a lone `>`/`<` are skipped).
fn check(expect: &str, output: &str) -> Result<(), String> {
    let mut out = output.lines();
    for want in expect.lines().map(str::trim_end) {
        if want.is_empty() {
            continue;
        }
        if !out.any(|l| matches(want, l.trim_end())) {
            return Err(format!("no line matching {want:?}"));
        }
    }
    Ok(())
}

#[test]
fn matching_rules() {
    assert!(matches("a…c", "abbbc"));
    assert!(matches("…", "anything"));
    assert!(matches("exact", "exact"));
    assert!(!matches("exact", "exactly"));
    assert!(!matches("a…c", "abd"));
    assert!(matches("> POST …?x=…&y=…", "> POST u?x=1&y=2"));
    assert!(check("one\n…two…\n", "zero\none\nthe two\n").is_ok());
    assert!(check("two\none\n", "one\ntwo\n").is_err());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_guide_runs() {
    for tool in ["openssl", "python3"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: {tool} is not installed (scripts/deps.sh installs it)");
            return;
        }
    }
    let doc = std::fs::read_to_string(format!("{ROOT}/docs/guide.md")).unwrap();
    let steps = steps(&doc);
    assert!(steps.len() >= 10, "the guide lost its run blocks");
    let dir = short_tempdir();
    let work = dir.path();
    std::os::unix::fs::symlink(format!("{ROOT}/examples"), work.join("examples")).unwrap();
    std::fs::create_dir(work.join(".guide")).unwrap();
    let port = free_port().to_string();
    let mut script = String::from(
        "set -euo pipefail\n\
         cleanup() { kill $(jobs -p) 2>/dev/null; [ -f device/agent.pid ] && kill \"$(cat device/agent.pid)\" 2>/dev/null; true; }\n\
         trap cleanup EXIT\n",
    );
    for (i, s) in steps.iter().enumerate() {
        script.push_str(&format!(
            "echo {i} > .guide/current\n{{\n{}\n}} > .guide/{i}.out 2>&1\n",
            s.script.replace("8443", &port)
        ));
    }
    std::fs::write(work.join(".guide/script.sh"), &script).unwrap();
    let bin_dir = Path::new(BIN.path()).parent().unwrap();
    let mut child = Command::new("bash")
        .arg(".guide/script.sh")
        .current_dir(work)
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .env_remove("KOOAGENT_CONFIG")
        .env_remove("KOOAGENT_SOCKET")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = |i: usize| {
        std::fs::read_to_string(work.join(format!(".guide/{i}.out"))).unwrap_or_default()
    };
    if status.is_none_or(|s| !s.success()) {
        let current: usize = std::fs::read_to_string(work.join(".guide/current"))
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        let s = &steps[current];
        panic!(
            "docs/guide.md: the block at line {} {} ({status:?}):\n{}\n--- its output:\n{}{}",
            s.line,
            if status.is_none() {
                "timed out"
            } else {
                "failed"
            },
            s.script,
            output(current),
            ["device/agent.log", "server.log", "app.log"]
                .iter()
                .map(|f| format!(
                    "\n--- {f}:\n{}",
                    std::fs::read_to_string(work.join(f)).unwrap_or_default()
                ))
                .collect::<String>()
        );
    }
    for (i, s) in steps.iter().enumerate() {
        // KOOAGENT_GUIDE_SHOW=1 (with --nocapture): every block's real output, for
        // writing the expect blocks.
        if std::env::var_os("KOOAGENT_GUIDE_SHOW").is_some() {
            eprintln!("=== line {}:\n{}", s.line, output(i));
        }
        if let Some(expect) = &s.expect {
            let expect = expect.replace("8443", &port);
            if let Err(e) = check(&expect, &output(i)) {
                panic!(
                    "docs/guide.md: the output of the block at line {}: {e}\n--- expected:\n{expect}--- got:\n{}",
                    s.line,
                    output(i)
                );
            }
        }
    }
}
