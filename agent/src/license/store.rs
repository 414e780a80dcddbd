//! Installed licenses: `<state_dir>/licenses/<id>.lic`, each file exactly the bytes the
//! seller issued. The directory is also the drop directory: a `*.lic` file put there under
//! any other name is checked like `license install` and, when good, moved to its
//! `<id>.lic` name; a bad one is renamed `<name>.rejected` and reported.
//!
//! The rule everywhere: a bad new license never displaces a good installed one. Install
//! verifies before writing; an installed license overwritten in place with bad (or older)
//! bytes is restored from memory, the bad bytes kept aside.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::format::{self, FormatError, Parsed, MAX_LICENSE_BYTES};
use super::keys::{Integrity, TrustedKeys};
use crate::drop_dir::DropError;
use crate::store::{self as fsstore, StoreError};

/// How many rejected files `license.status` remembers.
const REJECTED_KEPT: usize = 32;

/// One installed license.
#[derive(Debug, Clone)]
pub struct Entry {
    pub parsed: Parsed,
    pub bytes: Vec<u8>,
    pub file: PathBuf,
    pub integrity: Integrity,
}

/// A file the agent refused, for `license.status`.
#[derive(Debug, Clone, Serialize)]
pub struct Rejected {
    pub file: String,
    pub error: String,
    pub at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("the license's signature does not verify with key {0}: it was altered, or signed by another key")]
    BadSignature(String),
    #[error("{0}")]
    UntrustedKey(String),
    #[error("the license is for product {product:?}; {accepted}")]
    WrongProduct { product: String, accepted: String },
    #[error("license {id} issued {new} is older than the installed copy issued {installed}; keeping the installed one")]
    Stale {
        id: String,
        new: String,
        installed: String,
    },
    #[error("could not store the license: {0}")]
    Store(#[from] StoreError),
}

impl InstallError {
    /// The stable error code of the socket operation.
    pub fn code(&self) -> &'static str {
        match self {
            InstallError::Format(FormatError::TooLarge(_)) => "license_too_large",
            InstallError::Format(_) => "malformed_license",
            InstallError::BadSignature(_) => "bad_signature",
            InstallError::UntrustedKey(_) => "untrusted_key",
            InstallError::WrongProduct { .. } => "wrong_product",
            InstallError::Stale { .. } => "stale_license",
            InstallError::Store(_) => "store_failed",
        }
    }
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    New(String),
    Replaced(String),
    /// The same bytes were already installed.
    Unchanged(String),
}

impl Installed {
    pub fn id(&self) -> &str {
        match self {
            Installed::New(i) | Installed::Replaced(i) | Installed::Unchanged(i) => i,
        }
    }
}

pub struct LicenseStore {
    dir: PathBuf,
    /// Products licenses may be installed for; empty: any.
    products: Vec<String>,
    entries: BTreeMap<String, Entry>,
    rejected: VecDeque<Rejected>,
}

/// Reads a license file; `Ok(Err(size))` when it is over the size limit (not read).
fn read_limited(path: &Path) -> Result<Vec<u8>, DropError> {
    crate::drop_dir::read(path, MAX_LICENSE_BYTES)
}

/// Only `*.lic` files count; dot files are atomic_write's temporaries.
pub fn is_license_name(name: &str) -> bool {
    name.ends_with(".lic") && !name.starts_with('.') && name.len() > 4
}

impl LicenseStore {
    pub fn new(dir: PathBuf, products: Vec<String>) -> LicenseStore {
        LicenseStore {
            dir,
            products,
            entries: BTreeMap::new(),
            rejected: VecDeque::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn set_products(&mut self, products: Vec<String>) {
        self.products = products;
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    pub fn rejected(&self) -> impl Iterator<Item = &Rejected> {
        self.rejected.iter()
    }

    /// Creates the directory and loads every file in it: installed licenses first (so a
    /// dropped older copy cannot win by being read first), then dropped files.
    pub fn load_all(&mut self, keys: &TrustedKeys, now: i64) -> Result<(), StoreError> {
        fsstore::ensure_dir(&self.dir, 0o700)?;
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|e| StoreError::new("list", &self.dir, e))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_license_name(n))
            .collect();
        names.sort();
        let (installed, dropped): (Vec<_>, Vec<_>) = names.into_iter().partition(|n| {
            read_limited(&self.dir.join(n))
                .ok()
                .and_then(|b| format::parse(&b).ok())
                .is_some_and(|p| p.license.file_name() == *n)
        });
        for n in installed.iter().chain(&dropped) {
            self.on_file(n, keys, now);
        }
        Ok(())
    }

    /// Checks a license the way `install` accepts it: parses, verifies with a trusted key,
    /// and checks the product and that it is not older than the installed copy.
    fn vet(
        &self,
        bytes: &[u8],
        keys: &TrustedKeys,
        product: Option<&str>,
    ) -> Result<Parsed, InstallError> {
        let parsed = format::parse(bytes)?;
        match keys.check(&parsed) {
            Integrity::Verified => {}
            Integrity::BadSignature => {
                return Err(InstallError::BadSignature(parsed.license.key_id.clone()))
            }
            Integrity::UntrustedKey(why) => return Err(InstallError::UntrustedKey(why)),
        }
        let lic = &parsed.license;
        if let Some(p) = product {
            if p != lic.product {
                return Err(InstallError::WrongProduct {
                    product: lic.product.clone(),
                    accepted: format!("the installer asked for product {p:?}"),
                });
            }
        }
        if !self.products.is_empty() && !self.products.contains(&lic.product) {
            return Err(InstallError::WrongProduct {
                product: lic.product.clone(),
                accepted: format!(
                    "this agent accepts licenses for {} ([license] products)",
                    self.products.join(", ")
                ),
            });
        }
        if let Some(old) = self.entries.get(&lic.id) {
            if old.integrity == Integrity::Verified && old.parsed.license.issued_at > lic.issued_at
            {
                return Err(InstallError::Stale {
                    id: lic.id.clone(),
                    new: crate::clock::format_rfc3339(lic.issued_at),
                    installed: crate::clock::format_rfc3339(old.parsed.license.issued_at),
                });
            }
        }
        Ok(parsed)
    }

    /// Installs license bytes (from the socket): verify, then write `<id>.lic` atomically.
    /// Nothing is touched when anything is wrong.
    pub fn install(
        &mut self,
        bytes: &[u8],
        keys: &TrustedKeys,
        product: Option<&str>,
    ) -> Result<Installed, InstallError> {
        let parsed = self.vet(bytes, keys, product)?;
        let id = parsed.license.id.clone();
        let file = self.dir.join(parsed.license.file_name());
        let previous = self.entries.get(&id);
        // The same license, whatever whitespace surrounds it (a file's final newline, a
        // JSON answer without one): what the format reads is what counts.
        let same = |old: &[u8]| {
            old == bytes || format::license_text(old).ok() == format::license_text(bytes).ok()
        };
        if previous.is_some_and(|e| same(&e.bytes)) {
            return Ok(Installed::Unchanged(id));
        }
        let replaced = previous.is_some();
        fsstore::atomic_write(&file, bytes, 0o600)?;
        self.entries.insert(
            id.clone(),
            Entry {
                parsed,
                bytes: bytes.to_vec(),
                file,
                integrity: Integrity::Verified,
            },
        );
        Ok(if replaced {
            Installed::Replaced(id)
        } else {
            Installed::New(id)
        })
    }

    /// Removes an installed license (file and entry). Returns whether it existed.
    pub fn remove(&mut self, id: &str) -> Result<bool, StoreError> {
        let Some(e) = self.entries.get(id) else {
            return Ok(false);
        };
        match std::fs::remove_file(&e.file) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(StoreError::new("remove", &e.file, err)),
        }
        fsstore::sync_dir(&self.dir)?;
        self.entries.remove(id);
        Ok(true)
    }

    /// Re-checks every installed license's signer (the trusted keys changed).
    pub fn reverify(&mut self, keys: &TrustedKeys) {
        for e in self.entries.values_mut() {
            e.integrity = keys.check(&e.parsed);
        }
    }

    fn reject(&mut self, name: &str, error: String, now: i64) {
        log::warn!("license file {name} refused: {error}");
        if self.rejected.len() == REJECTED_KEPT {
            self.rejected.pop_front();
        }
        self.rejected.push_back(Rejected {
            file: name.to_string(),
            error,
            at: crate::clock::format_rfc3339(now),
        });
    }

    /// Sets the bad bytes aside as `<name>.rejected` (evidence for the operator).
    fn set_aside(&self, name: &str, bytes: Option<&[u8]>) {
        let from = self.dir.join(name);
        let to = self.dir.join(format!("{name}.rejected"));
        let r = match bytes {
            Some(b) => fsstore::atomic_write(&to, b, 0o600),
            None => std::fs::rename(&from, &to).map_err(|e| StoreError::new("rename", &from, e)),
        };
        if let Err(e) = r {
            log::warn!("could not set {name} aside: {e}");
        }
    }

    /// A file in the directory appeared, changed or disappeared: brings the entries in
    /// line. Returns whether the set of licenses changed.
    pub fn on_file(&mut self, name: &str, keys: &TrustedKeys, now: i64) -> bool {
        if !is_license_name(name) {
            return false;
        }
        let path = self.dir.join(name);
        let holder = self
            .entries
            .values()
            .find(|e| e.file == path)
            .map(|e| e.parsed.license.id.clone());
        let (bytes, vetted) = match read_limited(&path) {
            Ok(b) => {
                if holder
                    .as_ref()
                    .is_some_and(|id| self.entries[id].bytes == b)
                {
                    return false;
                }
                let v = self.vet(&b, keys, None);
                (Some(b), v)
            }
            Err(DropError::TooLarge { .. }) => {
                let size = std::fs::symlink_metadata(&path).map_or(0, |m| m.len() as usize);
                (
                    None,
                    Err(FormatError::TooLarge(size.max(MAX_LICENSE_BYTES + 1)).into()),
                )
            }
            Err(e) if e.is_not_found() => {
                // Deleted (or moved away): the license is removed.
                return match holder {
                    Some(id) => {
                        log::info!("license {id} removed ({name} deleted)");
                        self.entries.remove(&id);
                        true
                    }
                    None => false,
                };
            }
            Err(e) => {
                // A symlink, FIFO or unreadable file: set aside so it is refused once.
                self.set_aside(name, None);
                let removed = holder.is_some_and(|id| self.entries.remove(&id).is_some());
                self.reject(name, format!("{e} (kept as {name}.rejected)"), now);
                return removed;
            }
        };
        let err = match vetted {
            Ok(parsed) => {
                let bytes = bytes.expect("vetted bytes were read");
                return self.adopt(name, parsed, bytes, holder, now);
            }
            Err(e) => e,
        };
        if let Some(id) = holder
            .clone()
            .filter(|h| self.entries[h].integrity == Integrity::Verified)
        {
            // A good installed license was overwritten in place: put it back.
            let good = self.entries[&id].bytes.clone();
            self.set_aside(name, bytes.as_deref());
            let outcome = match fsstore::atomic_write(&path, &good, 0o600) {
                Ok(()) => format!("the installed license {id} was restored, the new bytes kept as {name}.rejected"),
                Err(e) => format!("the installed license {id} stays in force but could not be rewritten: {e}"),
            };
            self.reject(name, format!("{err}; {outcome}"), now);
            return false;
        }
        // An installed file whose signer is no longer trusted (keys changed between runs)
        // stays installed, with that verdict: it is not bad input, and trusting the key
        // again brings it back.
        if matches!(
            err,
            InstallError::BadSignature(_) | InstallError::UntrustedKey(_)
        ) {
            if let Some(parsed) = bytes.as_deref().and_then(|b| format::parse(b).ok()) {
                if self.dir.join(parsed.license.file_name()) == path {
                    let id = parsed.license.id.clone();
                    log::warn!("license {id} in {name}: {err}");
                    let integrity = keys.check(&parsed);
                    self.entries.insert(
                        id,
                        Entry {
                            parsed,
                            bytes: bytes.expect("parsed bytes were read"),
                            file: path,
                            integrity,
                        },
                    );
                    return true;
                }
            }
        }
        self.set_aside(name, None);
        let removed = holder.is_some_and(|id| self.entries.remove(&id).is_some());
        self.reject(name, format!("{err} (kept as {name}.rejected)"), now);
        removed
    }

    /// Takes a vetted license found in the directory: a dropped file is moved to its
    /// `<id>.lic` name.
    fn adopt(
        &mut self,
        name: &str,
        parsed: Parsed,
        bytes: Vec<u8>,
        holder: Option<String>,
        now: i64,
    ) -> bool {
        let path = self.dir.join(name);
        let id = parsed.license.id.clone();
        let canonical = self.dir.join(parsed.license.file_name());
        if canonical != path {
            if let Err(e) = fsstore::atomic_write(&canonical, &bytes, 0o600) {
                self.reject(name, format!("could not install it: {e}"), now);
                return false;
            }
            log::info!("license {id} installed from dropped file {name}");
            // The file may have held another installed license: that one stays.
            match holder.filter(|h| *h != id) {
                Some(other) => {
                    let keep = self.entries[&other].bytes.clone();
                    if let Err(e) = fsstore::atomic_write(&path, &keep, 0o600) {
                        log::warn!("could not rewrite license {other} to {name}: {e}");
                    }
                }
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        } else {
            log::info!("license {id} loaded from {name}");
        }
        self.entries.insert(
            id,
            Entry {
                parsed,
                bytes,
                file: canonical,
                integrity: Integrity::Verified,
            },
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::format::{sign, License};
    use kooagent_core::testing::{sample, test_key};

    fn keys() -> TrustedKeys {
        TrustedKeys::from_keys([test_key(1).verifying_key()], &[])
    }

    fn issue(edit: impl FnOnce(&mut License)) -> Vec<u8> {
        let mut l = sample();
        edit(&mut l);
        sign(&l, &test_key(1)).unwrap().into_bytes()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn install_keeps_bytes_exactly_and_refuses_bad_ones() {
        let d = tempfile::tempdir().unwrap();
        let mut s = LicenseStore::new(d.path().join("licenses"), vec![]);
        s.load_all(&keys(), 0).unwrap();
        let good = issue(|_| {});
        assert_eq!(
            s.install(&good, &keys(), None).unwrap(),
            Installed::New("L-1".into())
        );
        assert_eq!(
            std::fs::read(d.path().join("licenses/L-1.lic")).unwrap(),
            good
        );
        assert_eq!(
            s.install(&good, &keys(), None).unwrap(),
            Installed::Unchanged("L-1".into())
        );
        // Bad ones: nothing changes.
        let mut tampered = good.clone();
        let mid = tampered.len() / 3;
        tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
        let e = s.install(&tampered, &keys(), None).unwrap_err();
        assert!(
            matches!(e.code(), "bad_signature" | "malformed_license"),
            "{e}"
        );
        let other_key = sign(&sample(), &test_key(2)).unwrap();
        assert_eq!(
            s.install(other_key.as_bytes(), &keys(), None)
                .unwrap_err()
                .code(),
            "untrusted_key"
        );
        assert_eq!(
            s.install(b"kl1.", &keys(), None).unwrap_err().code(),
            "malformed_license"
        );
        let e = s.install(&good, &keys(), Some("other")).unwrap_err();
        assert_eq!(e.code(), "wrong_product");
        assert!(e.to_string().contains("sku-pro"), "{e}");
        let older = issue(|l| l.issued_at -= 10);
        assert_eq!(
            s.install(&older, &keys(), None).unwrap_err().code(),
            "stale_license"
        );
        assert_eq!(
            std::fs::read(d.path().join("licenses/L-1.lic")).unwrap(),
            good
        );
        assert_eq!(s.entries().count(), 1);
        // A newer issue of the same license replaces it.
        let newer = issue(|l| l.issued_at += 10);
        assert_eq!(
            s.install(&newer, &keys(), None).unwrap(),
            Installed::Replaced("L-1".into())
        );
        // Products restricted by configuration.
        s.set_products(vec!["sku-basic".into()]);
        let other = issue(|l| l.id = "L-2".into());
        let e = s.install(&other, &keys(), None).unwrap_err();
        assert!(e.to_string().contains("[license] products"), "{e}");
    }

    #[test]
    fn dropped_files_are_adopted_or_rejected() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("licenses");
        let mut s = LicenseStore::new(dir.clone(), vec![]);
        s.load_all(&keys(), 0).unwrap();
        let good = issue(|l| l.id = "L-9".into());
        std::fs::write(dir.join("from-mail.lic"), &good).unwrap();
        assert!(s.on_file("from-mail.lic", &keys(), 0));
        assert_eq!(names(&dir), vec!["L-9.lic"]);
        std::fs::write(dir.join("junk.lic"), b"not a license").unwrap();
        assert!(!s.on_file("junk.lic", &keys(), 0));
        assert_eq!(names(&dir), vec!["L-9.lic", "junk.lic.rejected"]);
        let r: Vec<_> = s.rejected().collect();
        assert!(r[0].error.contains("kl1."), "{}", r[0].error);
        // Other names are ignored.
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        assert!(!s.on_file("notes.txt", &keys(), 0));
        // Deleting the file removes the license.
        std::fs::remove_file(dir.join("L-9.lic")).unwrap();
        assert!(s.on_file("L-9.lic", &keys(), 0));
        assert_eq!(s.entries().count(), 0);
    }

    #[test]
    fn overwriting_an_installed_license_with_garbage_restores_it() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("licenses");
        let mut s = LicenseStore::new(dir.clone(), vec![]);
        s.load_all(&keys(), 0).unwrap();
        let good = issue(|_| {});
        s.install(&good, &keys(), None).unwrap();
        std::fs::write(dir.join("L-1.lic"), b"garbage").unwrap();
        assert!(!s.on_file("L-1.lic", &keys(), 0));
        assert_eq!(std::fs::read(dir.join("L-1.lic")).unwrap(), good);
        assert_eq!(
            std::fs::read(dir.join("L-1.lic.rejected")).unwrap(),
            b"garbage"
        );
        // Same for an older copy of the same license.
        std::fs::write(dir.join("L-1.lic"), issue(|l| l.issued_at -= 1)).unwrap();
        assert!(!s.on_file("L-1.lic", &keys(), 0));
        assert_eq!(std::fs::read(dir.join("L-1.lic")).unwrap(), good);
        assert_eq!(s.entries().count(), 1);
    }

    #[test]
    fn reload_keeps_licenses_and_untrusted_ones_stay_visible() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("licenses");
        let mut s = LicenseStore::new(dir.clone(), vec![]);
        s.load_all(&keys(), 0).unwrap();
        s.install(&issue(|_| {}), &keys(), None).unwrap();
        s.install(&issue(|l| l.id = "L-2".into()), &keys(), None)
            .unwrap();
        // A dropped older copy of L-1 must not win at the next start.
        std::fs::write(dir.join("a-old.lic"), issue(|l| l.issued_at -= 5)).unwrap();
        let mut s2 = LicenseStore::new(dir.clone(), vec![]);
        s2.load_all(&keys(), 0).unwrap();
        assert_eq!(s2.entries().count(), 2);
        assert_eq!(
            s2.get("L-1").unwrap().parsed.license.issued_at,
            sample().issued_at
        );
        assert!(names(&dir).contains(&"a-old.lic.rejected".to_string()));
        // Restarted with the key no longer trusted: still listed, as untrusted.
        let none = TrustedKeys::default();
        let mut s3 = LicenseStore::new(dir.clone(), vec![]);
        s3.load_all(&none, 0).unwrap();
        assert_eq!(s3.entries().count(), 2);
        assert!(s3
            .entries()
            .all(|e| matches!(e.integrity, Integrity::UntrustedKey(_))));
        s3.reverify(&keys());
        assert!(s3.entries().all(|e| e.integrity == Integrity::Verified));
        assert!(s3.remove("L-2").unwrap());
        assert!(!dir.join("L-2.lic").exists());
        assert!(!s3.remove("L-2").unwrap());
    }

    #[test]
    fn oversized_file_is_refused_without_reading_it_all() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("licenses");
        let mut s = LicenseStore::new(dir.clone(), vec![]);
        s.load_all(&keys(), 0).unwrap();
        std::fs::write(dir.join("big.lic"), vec![b'k'; 3 << 20]).unwrap();
        assert!(!s.on_file("big.lic", &keys(), 0));
        let r: Vec<_> = s.rejected().collect();
        assert!(r[0].error.contains("3145728 bytes"), "{}", r[0].error);
    }
}
