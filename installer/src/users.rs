//! The `kooagent` system user and group, read from and (under `--root`) written to the
//! target tree's /etc/passwd, /etc/group, /etc/shadow and /etc/gshadow.

use std::fs;
use std::io;
use std::path::Path;

/// Looks up `name` in a colon-separated database (passwd or group) and returns field 2 (the id).
pub fn lookup_id(db: &Path, name: &str) -> Option<u32> {
    let text = fs::read_to_string(db).ok()?;
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != name {
            return None;
        }
        f.next()?;
        f.next()?.parse().ok()
    })
}

/// Whether some entry of `db` has id `id`.
pub fn has_id(db: &Path, id: u32) -> bool {
    ids(db).contains(&id)
}

fn ids(db: &Path) -> Vec<u32> {
    fs::read_to_string(db)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect()
}

/// Picks a system id like `useradd --system`: the highest id in 100..=999 that is free both
/// as a uid and as a gid, so that the user and its group share the number.
pub fn free_system_id(passwd: &Path, group: &Path) -> Option<u32> {
    let used: Vec<u32> = ids(passwd).into_iter().chain(ids(group)).collect();
    (100..=999).rev().find(|id| !used.contains(id))
}

/// Appends `line` to `db`, adding a newline first if the file does not end with one.
pub fn append_line(db: &Path, line: &str) -> io::Result<()> {
    let mut text = fs::read_to_string(db)?;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
    rewrite(db, &text)
}

/// Removes every line whose first field is `name`; returns whether one was removed.
pub fn remove_entry(db: &Path, name: &str) -> io::Result<bool> {
    let text = match fs::read_to_string(db) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let prefix = format!("{name}:");
    let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with(&prefix)).collect();
    if kept.len() == text.lines().count() {
        return Ok(false);
    }
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    rewrite(db, &out)?;
    Ok(true)
}

pub fn has_entry(db: &Path, name: &str) -> bool {
    let prefix = format!("{name}:");
    fs::read_to_string(db)
        .map(|t| t.lines().any(|l| l.starts_with(&prefix)))
        .unwrap_or(false)
}

/// Replaces the file's content, keeping its mode and owner (a new file next to it, renamed).
fn rewrite(db: &Path, text: &str) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = fs::metadata(db)?;
    let tmp = db.with_extension("kooagent-tmp");
    fs::write(&tmp, text)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    let _ = std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()));
    fs::rename(&tmp, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_allocate() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let group = dir.path().join("group");
        fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/sh\nsvc:x:999:999::/:/bin/false",
        )
        .unwrap();
        fs::write(&group, "root:x:0:\nsvc:x:999:\nother:x:998:\n").unwrap();
        assert_eq!(lookup_id(&passwd, "svc"), Some(999));
        assert_eq!(lookup_id(&passwd, "nobody"), None);
        assert_eq!(free_system_id(&passwd, &group), Some(997));
        append_line(&passwd, "kooagent:x:997:997::/nonexistent:/bin/false").unwrap();
        assert_eq!(lookup_id(&passwd, "kooagent"), Some(997));
        assert!(has_id(&passwd, 997));
        assert!(remove_entry(&passwd, "kooagent").unwrap());
        assert!(!remove_entry(&passwd, "kooagent").unwrap());
        assert!(has_entry(&passwd, "svc"));
    }
}
