//! Idempotent file-system and command operations. Each one first compares the wanted state
//! with what is there, prints one line, and changes something only when they differ and the
//! mode is [`Mode::Apply`].

use std::fs;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::users;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Make the changes.
    Apply,
    /// Print what would change; write nothing, run nothing but read-only probes.
    DryRun,
    /// Report whether the installed state matches; write nothing.
    Status,
}

pub struct Ctx {
    /// Target tree; `/` for the live system.
    pub root: PathBuf,
    /// `root` is `/`: commands (useradd, systemctl, ...) may run.
    pub live: bool,
    pub mode: Mode,
    /// Effective uid is 0: ownership can be set.
    pub am_root: bool,
    /// Changes made (Apply) or that would be made (DryRun), or differences found (Status).
    pub changes: usize,
    notes: Vec<String>,
}

#[derive(Clone, Copy)]
pub struct Owner(pub &'static str, pub &'static str);

pub const ROOT: Owner = Owner("root", "root");

impl Ctx {
    pub fn new(root: PathBuf, mode: Mode) -> Ctx {
        let live = root == Path::new("/");
        Ctx {
            root,
            live,
            mode,
            am_root: effective_uid() == Some(0),
            changes: 0,
            notes: Vec::new(),
        }
    }

    /// The host path of `abs` (an absolute path on the target system).
    pub fn p(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    pub fn apply(&self) -> bool {
        self.mode == Mode::Apply
    }

    /// Prints `ok`-type lines (nothing to change).
    pub fn ok(&self, what: &str, detail: &str) {
        println!("  {:<12} {}", what, detail);
    }

    /// Prints and counts a change (or, for status, a difference).
    pub fn change(&mut self, verb: &str, detail: &str) {
        self.changes += 1;
        let verb = match self.mode {
            Mode::Apply => verb.to_string(),
            Mode::DryRun => format!("would {verb}"),
            Mode::Status => "differs".to_string(),
        };
        println!("  {:<12} {}", verb, detail);
    }

    /// A note printed once at the end.
    pub fn note(&mut self, note: String) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// uid/gid of an owner in the target tree, if they can be set at all.
    fn resolve(&mut self, owner: Owner) -> Option<(u32, u32)> {
        if !self.am_root {
            self.note("not running as root: file owners were not checked or set".into());
            return None;
        }
        let uid = if owner.0 == "root" {
            Some(0)
        } else {
            users::lookup_id(&self.p("/etc/passwd"), owner.0)
        };
        let gid = if owner.1 == "root" {
            Some(0)
        } else {
            users::lookup_id(&self.p("/etc/group"), owner.1)
        };
        match (uid, gid) {
            (Some(u), Some(g)) => Some((u, g)),
            _ => {
                self.note(format!(
                    "user/group {}:{} not found in {}: owners left as they are",
                    owner.0,
                    owner.1,
                    self.p("/etc/passwd").display()
                ));
                None
            }
        }
    }

    fn fix_meta(&mut self, abs: &str, mode: u32, owner: Owner) -> io::Result<()> {
        let path = self.p(abs);
        let meta = fs::symlink_metadata(&path)?;
        if meta.mode() & 0o7777 != mode {
            self.change(
                "chmod",
                &format!("{abs} {:04o} -> {:04o}", meta.mode() & 0o7777, mode),
            );
            if self.apply() {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
            }
        }
        if let Some((uid, gid)) = self.resolve(owner) {
            if meta.uid() != uid || meta.gid() != gid {
                self.change(
                    "chown",
                    &format!(
                        "{abs} {}:{} -> {}:{}",
                        meta.uid(),
                        meta.gid(),
                        owner.0,
                        owner.1
                    ),
                );
                if self.apply() {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                }
            }
        }
        Ok(())
    }

    /// Creates the parent directories of `abs` that are missing (mode 0755).
    fn parents(&mut self, abs: &str) -> io::Result<()> {
        let parent = Path::new(abs).parent().unwrap_or(Path::new("/"));
        let host = self.p(&parent.to_string_lossy());
        if !host.exists() && self.apply() {
            fs::create_dir_all(&host)?;
        }
        Ok(())
    }

    pub fn dir(&mut self, abs: &str, mode: u32, owner: Owner) -> io::Result<()> {
        let path = self.p(abs);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                let before = self.changes;
                self.fix_meta(abs, mode, owner)?;
                if before == self.changes {
                    self.ok(
                        "ok",
                        &format!("{abs}/ ({mode:04o} {}:{})", owner.0, owner.1),
                    );
                }
            }
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} exists and is not a directory",
                    path.display()
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.change(
                    "mkdir",
                    &format!("{abs}/ ({mode:04o} {}:{})", owner.0, owner.1),
                );
                if self.apply() {
                    fs::create_dir_all(&path)?;
                    self.fix_meta_quiet(abs, mode, owner)?;
                }
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Sets mode and owner of something just created, without printing more lines.
    fn fix_meta_quiet(&mut self, abs: &str, mode: u32, owner: Owner) -> io::Result<()> {
        let path = self.p(abs);
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = self.resolve(owner) {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Makes `abs` a regular file with `contents`; with `keep`, an existing file's content is
    /// left alone (configuration), only its mode and owner are enforced.
    /// Returns whether the content was (or would be) written.
    pub fn file(
        &mut self,
        abs: &str,
        contents: &[u8],
        mode: u32,
        owner: Owner,
        keep: bool,
    ) -> io::Result<bool> {
        let path = self.p(abs);
        let desc = format!("{abs} ({mode:04o} {}:{})", owner.0, owner.1);
        let existing = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Some(m),
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} exists and is not a regular file",
                    path.display()
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let write = match &existing {
            None => {
                self.change("create", &desc);
                true
            }
            Some(_) if keep => false,
            Some(m) => {
                let same = m.len() == contents.len() as u64 && fs::read(&path)? == contents;
                if !same {
                    self.change("update", &desc);
                }
                !same
            }
        };
        if write {
            if self.apply() {
                self.parents(abs)?;
                // New file beside the old one, then rename: atomic, and works while the old
                // binary is running ("text file busy" does not apply to rename).
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                let tmp = path.with_file_name(format!(".{name}.kooagent-new"));
                let _ = fs::remove_file(&tmp);
                fs::write(&tmp, contents)?;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
                if let Some((uid, gid)) = self.resolve(owner) {
                    std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
                }
                fs::rename(&tmp, &path)?;
            }
        } else {
            let before = self.changes;
            self.fix_meta(abs, mode, owner)?;
            if before == self.changes {
                let kept = if keep { ", existing content kept" } else { "" };
                self.ok("ok", &format!("{desc}{kept}"));
            }
        }
        Ok(write)
    }

    pub fn symlink(&mut self, abs: &str, target: &str) -> io::Result<()> {
        let path = self.p(abs);
        let desc = format!("{abs} -> {target}");
        match fs::read_link(&path) {
            Ok(t) if t == Path::new(target) => {
                self.ok("ok", &desc);
                return Ok(());
            }
            Ok(_) => self.change("relink", &desc),
            Err(_) if fs::symlink_metadata(&path).is_ok() => {
                return Err(io::Error::other(format!(
                    "{} exists and is not a symlink",
                    path.display()
                )))
            }
            Err(_) => self.change("link", &desc),
        }
        if self.apply() {
            self.parents(abs)?;
            let _ = fs::remove_file(&path);
            std::os::unix::fs::symlink(target, &path)?;
        }
        Ok(())
    }

    /// Removes a file, symlink or (recursively) directory.
    pub fn remove(&mut self, abs: &str) -> io::Result<()> {
        let path = self.p(abs);
        match fs::symlink_metadata(&path) {
            Ok(m) => {
                self.change("remove", abs);
                if self.apply() {
                    if m.is_dir() {
                        fs::remove_dir_all(&path)?;
                    } else {
                        fs::remove_file(&path)?;
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if self.mode != Mode::Status {
                    self.ok("absent", abs);
                }
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Runs a command that changes the live system. Under `--root` it is only printed.
    /// Returns whether it ran and succeeded.
    pub fn run(&mut self, argv: &[&str]) -> io::Result<bool> {
        let line = argv
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("\"{a}\"")
                } else {
                    a.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        if !self.live {
            println!("  {:<12} {line} (--root: not run on this host)", "skip");
            return Ok(false);
        }
        self.change("run", &line);
        if !self.apply() {
            return Ok(false);
        }
        let status = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .status()?;
        if !status.success() {
            eprintln!("kooagent-install: `{line}` failed: {status}");
        }
        Ok(status.success())
    }

    /// Runs a read-only query on the live system (e.g. `systemctl is-active`); never under
    /// `--root`. Returns None when it could not run.
    pub fn probe(&self, argv: &[&str]) -> Option<bool> {
        if !self.live {
            return None;
        }
        Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
            .map(|s| s.success())
    }

    /// Whether an executable exists in the target tree (one of several usual places).
    pub fn find_tool(&self, name: &str) -> Option<String> {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| format!("{d}/{name}"))
            .find(|p| self.p(p).is_file())
    }
}

/// Effective uid from /proc/self/status (no libc dependency).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
