//! The worked examples in docs/protocol.md are run against a real agent, so the page
//! cannot drift from the behaviour; every operation of the protocol catalogue has its
//! section there, with an example request sent to a live agent.

use std::collections::BTreeMap;
use std::process::Command;

use kooagent_client::catalogue::{self, Answer, Caller, Kind, Operation};
use serde_json::{json, Value};

use crate::harness::{run_ok, Conn, TestAgent};
use crate::license::{device_code, install, Seller};

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

/// The `## Operations` part of docs/protocol.md: the table and one `### \`op\`` section
/// per operation.
fn operation_sections(doc: &str) -> (String, BTreeMap<String, String>) {
    let start = doc
        .find("\n## Operations\n")
        .expect("docs/protocol.md has ## Operations");
    let part = &doc[start + 1..];
    let part = &part[..part[3..].find("\n## ").map_or(part.len(), |e| e + 3)];
    let mut chunks = part.split("\n### `");
    let intro = chunks.next().unwrap().to_string();
    let sections = chunks
        .map(|c| {
            let (name, body) = c.split_once('`').expect("### `op` heading");
            (name.to_string(), body.to_string())
        })
        .collect();
    (intro, sections)
}

/// The request/answer pairs of a section: ```json blocks of two lines.
fn examples(body: &str) -> Vec<(String, String)> {
    body.split("```json\n")
        .skip(1)
        .map(|rest| {
            let block = rest.split("```").next().unwrap();
            let lines: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(
                lines.len(),
                2,
                "an example is a request and an answer: {block}"
            );
            (lines[0].to_string(), lines[1].to_string())
        })
        .collect()
}

/// `live` has every field `doc` shows, with the same JSON type (`null` on either side
/// matches anything: the field is nullable); arrays compare their first elements.
fn same_shape(doc: &Value, live: &Value, path: &str) -> Result<(), String> {
    let kind = |v: &Value| std::mem::discriminant(v);
    match (doc, live) {
        (Value::Null, _) | (_, Value::Null) => Ok(()),
        (Value::Object(d), Value::Object(l)) => d.iter().try_for_each(|(k, dv)| {
            let lv = l
                .get(k)
                .ok_or_else(|| format!("{path}.{k} is documented but not in the answer"))?;
            same_shape(dv, lv, &format!("{path}.{k}"))
        }),
        (Value::Array(d), Value::Array(l)) => match (d.first(), l.first()) {
            (Some(dv), Some(lv)) => same_shape(dv, lv, &format!("{path}[0]")),
            _ => Ok(()),
        },
        (d, l) if kind(d) == kind(l) => Ok(()),
        (d, l) => Err(format!("{path}: documented {d}, the agent answered {l}")),
    }
}

/// Checks one documented section against its catalogue row (without an agent).
fn check_section(op: &Operation, body: &str) -> Vec<(String, String)> {
    for p in op.params {
        assert!(
            body.contains(&format!("\"{}\"", p.name)) || body.contains(&format!("`{}`", p.name)),
            "docs/protocol.md, {}: param {} is not documented",
            op.name,
            p.name
        );
    }
    for code in op.errors {
        assert!(
            body.contains(&format!("`{code}`")) || body.contains(&format!("\"code\":\"{code}\"")),
            "docs/protocol.md, {}: error code {code} is not documented",
            op.name
        );
    }
    if op.caller == Caller::Owner {
        assert!(
            body.contains(Caller::Owner.describe()),
            "docs/protocol.md, {}: does not say it is for {}",
            op.name,
            Caller::Owner.describe()
        );
    }
    let ex = examples(body);
    assert!(!ex.is_empty(), "docs/protocol.md, {}: no example", op.name);
    for (request, _) in &ex {
        let r: Value = serde_json::from_str(request).unwrap_or_else(|e| {
            panic!("{}: example request is not JSON ({e}): {request}", op.name)
        });
        assert_eq!(r["op"], json!(op.name), "{request}");
        for k in r["params"].as_object().into_iter().flat_map(|m| m.keys()) {
            assert!(
                op.params.iter().any(|p| p.name == k),
                "{}: the example sends param {k}, which the catalogue does not list",
                op.name
            );
        }
    }
    ex
}

/// Sends one documented request to the agent and checks the answer's shape.
fn run_example(
    a: &TestAgent,
    op: &Operation,
    request: &str,
    answer: &str,
    subst: &[(&str, String)],
) {
    let doc_answer: Value = serde_json::from_str(answer)
        .unwrap_or_else(|e| panic!("{}: example answer is not JSON ({e}): {answer}", op.name));
    let mut line = request.to_string();
    for (placeholder, value) in subst {
        line = line.replace(&format!("\"{placeholder}\""), &json!(value).to_string());
    }
    let mut conn = Conn::open(&a.socket);
    conn.send_raw(format!("{line}\n").as_bytes());
    let live = conn.read_json();
    let ctx = format!(
        "{}: sent {request}\ndocumented {answer}\nanswered {live}",
        op.name
    );
    assert_eq!(live["id"], doc_answer["id"], "{ctx}");
    assert_eq!(live["ok"], doc_answer["ok"], "{ctx}");
    if doc_answer["ok"] == json!(false) {
        let code = &doc_answer["error"]["code"];
        assert_eq!(live["error"]["code"], *code, "{ctx}");
        assert!(
            op.errors.iter().any(|e| json!(e) == *code),
            "{}: documented error {code} is not in the catalogue row",
            op.name
        );
        return;
    }
    let key = match op.answer {
        Answer::Result(_) => "result",
        Answer::Stream(_) => "event",
    };
    same_shape(&doc_answer[key], &live[key], key).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
    for f in op.answer.fields() {
        assert!(
            live[key].get(f).is_some(),
            "{}: the catalogue says the answer carries {f}\n{ctx}",
            op.name
        );
    }
}

#[test]
fn every_operation_is_documented_with_an_example_a_live_agent_answers() {
    let doc = doc();
    let (intro, sections) = operation_sections(&doc);

    // The table is the catalogue: same operations, read-only and caller.
    let mut rows = BTreeMap::new();
    for line in intro.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        rows.insert(
            cells[0].trim_matches('`').to_string(),
            (cells[1] == "yes", cells[2].to_string()),
        );
    }
    for op in catalogue::OPERATIONS {
        let caller = match op.caller {
            Caller::Socket => "socket",
            Caller::Owner => Caller::Owner.describe(),
        };
        assert_eq!(
            rows.remove(op.name),
            Some((op.read_only, caller.to_string())),
            "docs/protocol.md's table row for {} disagrees with the catalogue",
            op.name
        );
    }
    assert!(
        rows.is_empty(),
        "documented but not in the catalogue: {rows:?}"
    );

    let mut checked = Vec::new();
    for op in catalogue::OPERATIONS {
        let body = sections
            .get(op.name)
            .unwrap_or_else(|| panic!("docs/protocol.md has no section ### `{}`", op.name));
        checked.push((op, check_section(op, body)));
    }
    let extra: Vec<&String> = sections
        .keys()
        .filter(|k| catalogue::operation(k).is_none())
        .collect();
    assert!(
        extra.is_empty(),
        "sections for operations the catalogue lacks: {extra:?}"
    );

    // An agent the examples can talk to: the seller's key trusted, a meter, two licenses.
    // An hour closes an hour after it ends, so the hour `usage.record` writes into is still
    // open when `usage.status` shows it, whatever the time of day the test runs.
    let seller = Seller::new();
    let a = TestAgent::start(&format!(
        "{}[usage]\nlateness_secs = 3600\n[usage.meters.requests]\ninstance_id = \"inst-1\"\n",
        seller.config()
    ));
    let code = device_code(&a);
    let license = seller.bound(
        &code,
        "sku-pro",
        &["--days", "365", "--feature", "sso", "--id", "L-2026-0001"],
    );
    install(&a, &license).unwrap();
    install(
        &a,
        &seller.bound(&code, "sku-pro", &["--days", "30", "--id", "L-2026-0002"]),
    )
    .unwrap();
    let token = crate::freeze::token(&seller, "L-2026-0001", "unfreeze", 1, &[]);
    let subst = [
        ("<license>", license),
        ("<token>", token.trim().to_string()),
    ];
    // In the page's order, each on its own connection (`watch` keeps its connection).
    let mut order: Vec<_> = checked.into_iter().collect();
    order.sort_by_key(|(op, _)| doc.find(&format!("### `{}`", op.name)));
    for (op, examples) in order {
        for (request, answer) in examples {
            run_example(&a, op, &request, &answer, &subst);
        }
    }

    // The catalogue's params are the handlers' params: each listed one is understood, and
    // anything else is refused (as the page says), whatever the operation.
    for op in catalogue::OPERATIONS {
        let send = |params: Value| {
            let mut conn = Conn::open(&a.socket);
            let line = json!({"v": 1, "id": 1, "op": op.name, "params": params});
            conn.send_raw(format!("{line}\n").as_bytes());
            conn.read_json()
        };
        let answer = send(json!({"no_such_param": 1}));
        assert_eq!(
            answer["error"]["code"], "invalid_params",
            "{}: {answer}",
            op.name
        );
        for p in op.params {
            let sample = match p.kind {
                Kind::Bool => json!(false),
                Kind::String | Kind::Decimal => json!("1"),
                Kind::Time => json!(0),
                Kind::Array => json!([]),
            };
            let answer = send(json!({ p.name: sample }));
            let message = answer["error"]["message"].as_str().unwrap_or("");
            assert!(
                !message.contains("unknown"),
                "{}: the catalogue lists param {} but the agent does not know it: {answer}",
                op.name,
                p.name
            );
        }
    }
}

/// The keys docs/*.md and README.md document: dotted keys written out (`usage.batch_size`),
/// `key = ...` lines of TOML examples under a `[section]` header, and table rows
/// (`| \`key\` |`) under a heading that names the `[section]`. A meter's name reads `*`.
fn documented_keys() -> (std::collections::BTreeSet<String>, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut files: Vec<_> = std::fs::read_dir(format!("{root}/docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.push(format!("{root}/README.md").into());
    let mut keys = std::collections::BTreeSet::new();
    let mut all = String::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut section: Option<String> = None;
        let mut in_code = false;
        for line in text.lines() {
            let t = line.trim_start();
            if t.starts_with("```") {
                in_code = !in_code;
                continue;
            }
            let uncommented = t.trim_start_matches('#').trim_start();
            if uncommented.starts_with('[') && (in_code || !t.starts_with('|')) {
                // A TOML table header (`[usage]`, `#[usage]`, `[[identity.source]]`).
                let name = uncommented.trim_start_matches('[');
                if let Some(end) = name.find(']') {
                    section = Some(meter_wildcard(&name[..end]));
                    continue;
                }
            }
            if !in_code && t.starts_with('#') {
                // A markdown heading: its section when it names one (`### Configuration: `[authcode]``).
                section = t
                    .split("`[")
                    .nth(1)
                    .and_then(|r| r.split(']').next())
                    .map(meter_wildcard);
                continue;
            }
            let Some(sec) = &section else { continue };
            let key = if let Some(row) = t.strip_prefix("| `") {
                row.split('`').next()
            } else if in_code {
                uncommented.split_once('=').map(|(k, _)| k.trim())
            } else {
                None
            };
            if let Some(k) = key.filter(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            {
                keys.insert(format!("{sec}.{k}"));
            }
        }
        all.push_str(&text);
    }
    (keys, all)
}

/// `usage.meters.requests` → `usage.meters.*`: a meter's name is the seller's.
fn meter_wildcard(key: &str) -> String {
    let mut parts: Vec<&str> = key.split('.').collect();
    if let Some(i) = parts.iter().position(|p| *p == "meters") {
        if i + 1 < parts.len() {
            parts[i + 1] = "*";
        }
    }
    parts.join(".")
}

#[test]
fn every_key_config_show_prints_is_documented() {
    let a = TestAgent::prepare(
        "[usage.meters.requests]\ninstance_id = \"i-1\"\npackage_instance_id = \"p-1\"\n",
    );
    let out = run_ok(
        Command::new(crate::harness::BIN.path())
            .args(["config", "show"])
            .env("KOOAGENT_CONFIG", &a.config),
    );
    let shown = String::from_utf8(out.stdout).unwrap();
    let (documented, text) = documented_keys();
    let mut missing = Vec::new();
    let mut n = 0;
    for line in shown.lines() {
        let Some((key, _)) = line.split_once(" = ") else {
            continue;
        };
        n += 1;
        let key = meter_wildcard(key.trim());
        let written = key.replace('*', "<name>");
        if !documented.contains(&key) && !text.contains(&written) {
            missing.push(key);
        }
    }
    assert!(n > 40, "config show printed too little:\n{shown}");
    assert!(
        missing.is_empty(),
        "keys `kooagent config show` prints that no doc (docs/*.md, README.md) describes: {missing:?}"
    );
}
