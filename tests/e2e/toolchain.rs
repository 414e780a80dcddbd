//! The toolchain floor (issue 20 item 6): the workspace's `rust-version` is the highest
//! `rust-version` any locked dependency declares, and README.md states it. A seller on an
//! older toolchain would otherwise get a build error from a dependency instead of cargo's
//! clear "requires rustc X" message.

use std::process::Command;

use serde_json::Value;

fn version(v: &str) -> Vec<u64> {
    let mut p: Vec<u64> = v.split('.').map(|x| x.parse().unwrap()).collect();
    p.resize(3, 0);
    p
}

#[test]
fn rust_version_is_the_locked_dependencies_floor() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Offline: scripts/deps.sh runs `cargo fetch --locked` first, so every locked
    // package's manifest is on disk (tests use no network).
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata failed (run `cargo fetch --locked` once): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: Vec<&str> = m["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut workspace = None;
    let mut highest: Option<(Vec<u64>, String)> = None;
    for p in m["packages"].as_array().unwrap() {
        let Some(rv) = p["rust_version"].as_str() else {
            continue;
        };
        if members.contains(&p["id"].as_str().unwrap()) {
            workspace = Some(rv.to_string());
            continue;
        }
        let who = format!("{} {} ({rv})", p["name"], p["version"]);
        if highest.as_ref().is_none_or(|(h, _)| version(rv) > *h) {
            highest = Some((version(rv), who));
        }
    }
    let workspace = workspace.expect("the workspace declares rust-version");
    let (floor, who) = highest.unwrap();
    assert_eq!(
        version(&workspace),
        floor,
        "workspace rust-version {workspace} differs from the highest locked dependency's: {who}"
    );
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let stated = format!("stable, {workspace} or newer");
    assert!(
        readme.contains(&stated),
        "README.md should say {stated:?} (the toolchain floor)"
    );
}
