//! The file-system model of the crash harness (tests/e2e/crash.rs): replays the traced
//! operations (crash_trace.rs) and says what a state directory may look like after a crash
//! at any point.
//!
//! Two views are kept, as ALICE does: what the page cache holds (every operation so far,
//! the state after a kill -9), and what is durable (the state after a power cut), under
//! POSIX's rules only: a file's data is durable once the file is fsynced; a directory entry
//! (a create, rename or unlink) once its directory is fsynced, and it then points at the
//! file's durable data, which may still be empty.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::crash_trace::Op;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    File(usize),
    Dir,
}

#[derive(Debug, Clone, Default)]
struct Inode {
    cached: Vec<u8>,
    durable: Vec<u8>,
}

/// Paths are relative to the state directory, which always exists ("" is the root).
#[derive(Debug, Clone)]
pub struct Model {
    inodes: Vec<Inode>,
    cached: BTreeMap<PathBuf, Entry>,
    durable: BTreeMap<PathBuf, Entry>,
}

/// A state directory's content: each path and its bytes (`None`: a directory).
pub type Tree = BTreeMap<PathBuf, Option<Vec<u8>>>;

fn parent(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}

impl Default for Model {
    fn default() -> Self {
        let root = BTreeMap::from([(PathBuf::new(), Entry::Dir)]);
        Model {
            inodes: Vec::new(),
            cached: root.clone(),
            durable: root,
        }
    }
}

impl Model {
    fn file(&mut self, path: &Path) -> Result<&mut Inode, String> {
        match self.cached.get(path) {
            Some(Entry::File(i)) => Ok(&mut self.inodes[*i]),
            other => Err(format!(
                "{}: not a file in the model ({other:?})",
                path.display()
            )),
        }
    }

    /// Applies one operation (acknowledgements change nothing).
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Create { path, truncate } => match self.cached.get(path) {
                Some(Entry::File(i)) => {
                    if *truncate {
                        self.inodes[*i].cached.clear();
                    }
                }
                Some(Entry::Dir) => return Err(format!("create over directory {path:?}")),
                None => {
                    self.inodes.push(Inode::default());
                    self.cached
                        .insert(path.clone(), Entry::File(self.inodes.len() - 1));
                }
            },
            Op::Write { path, offset, data } => {
                let f = self.file(path)?;
                let end = *offset as usize + data.len();
                if f.cached.len() < end {
                    f.cached.resize(end, 0);
                }
                f.cached[*offset as usize..end].copy_from_slice(data);
            }
            Op::SetLen { path, len } => self.file(path)?.cached.resize(*len as usize, 0),
            Op::Rename { from, to } => {
                let e = self
                    .cached
                    .remove(from)
                    .ok_or_else(|| format!("rename of a missing {from:?}"))?;
                if e == Entry::Dir {
                    let moved: Vec<_> = self
                        .cached
                        .keys()
                        .filter(|k| k.starts_with(from))
                        .cloned()
                        .collect();
                    for k in moved {
                        let v = self.cached.remove(&k).expect("listed");
                        let rest = k.strip_prefix(from).expect("prefix").to_path_buf();
                        self.cached.insert(to.join(rest), v);
                    }
                }
                self.cached.insert(to.clone(), e);
            }
            Op::Unlink { path } => {
                self.cached.retain(|k, _| !k.starts_with(path));
            }
            Op::Mkdir { path } => {
                self.cached.entry(path.clone()).or_insert(Entry::Dir);
            }
            Op::Sync { path } => match self.cached.get(path).copied() {
                Some(Entry::File(i)) => {
                    let ino = &mut self.inodes[i];
                    ino.durable = ino.cached.clone();
                }
                Some(Entry::Dir) => {
                    // The directory's own entries become what the cache shows.
                    self.durable
                        .retain(|k, _| k.as_os_str().is_empty() || parent(k) != *path);
                    for (k, v) in &self.cached {
                        if !k.as_os_str().is_empty() && parent(k) == *path {
                            self.durable.insert(k.clone(), *v);
                        }
                    }
                }
                None => return Err(format!("fsync of a missing {path:?}")),
            },
            Op::Ack { .. } => {}
        }
        Ok(())
    }

    fn tree(&self, entries: &BTreeMap<PathBuf, Entry>, durable: bool) -> Tree {
        let mut out = Tree::new();
        for (k, v) in entries {
            if k.as_os_str().is_empty() {
                continue;
            }
            // Reachable only through durable (or cached) directories.
            let reachable = k
                .ancestors()
                .skip(1)
                .all(|a| matches!(entries.get(a), Some(Entry::Dir)));
            if !reachable {
                continue;
            }
            out.insert(
                k.clone(),
                match v {
                    Entry::Dir => None,
                    Entry::File(i) => Some(if durable {
                        self.inodes[*i].durable.clone()
                    } else {
                        self.inodes[*i].cached.clone()
                    }),
                },
            );
        }
        out
    }

    /// A hash of `cached()` or `durable()`, without copying the data.
    fn digest(&self, durable: bool) -> u64 {
        use std::hash::{Hash, Hasher};
        let entries = if durable { &self.durable } else { &self.cached };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (k, v) in entries {
            let reachable = k
                .ancestors()
                .skip(1)
                .all(|a| matches!(entries.get(a), Some(Entry::Dir)));
            if k.as_os_str().is_empty() || !reachable {
                continue;
            }
            k.hash(&mut h);
            match v {
                Entry::Dir => 0u8.hash(&mut h),
                Entry::File(i) => {
                    let ino = &self.inodes[*i];
                    if durable { &ino.durable } else { &ino.cached }.hash(&mut h);
                }
            }
        }
        h.finish()
    }

    /// Everything done so far: the state after the process was killed.
    pub fn cached(&self) -> Tree {
        self.tree(&self.cached, false)
    }

    /// Only what was made durable: the state after a power cut.
    pub fn durable(&self) -> Tree {
        self.tree(&self.durable, true)
    }
}

/// How a crash point's state was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Every operation up to the point (a kill -9).
    Cached,
    /// Only what was fsynced (a power cut).
    Durable,
    /// Every earlier operation, and the first half of the write at the point.
    Torn,
}

/// One crash state: the operations before it, how it was made, what was acknowledged.
#[derive(Debug, Clone)]
pub struct CrashState {
    /// The crash came after `ops[..point]` (for `Torn`, during `ops[point]`).
    pub point: usize,
    pub kind: Kind,
    /// Requests acknowledged before the crash.
    pub acked: Vec<u64>,
}

/// Every distinct crash state of the trace: for each point after a file operation, its
/// cached and durable views, and a torn variant of each write. A state equal to one already
/// listed with as many acknowledgements is left out (the trees are compared by digest and
/// rebuilt by `tree_of`, so thousands of states fit in memory).
pub fn crash_states(ops: &[Op]) -> Result<Vec<CrashState>, String> {
    let mut model = Model::default();
    let mut acked = Vec::new();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut push = |point: usize, kind: Kind, digest: u64, acked: &[u64], out: &mut Vec<_>| {
        if seen.insert((digest, acked.len())) {
            out.push(CrashState {
                point,
                kind,
                acked: acked.to_vec(),
            });
        }
    };
    push(0, Kind::Durable, model.digest(true), &acked, &mut out);
    for (i, op) in ops.iter().enumerate() {
        if let Op::Ack { id } = op {
            acked.push(*id);
            continue;
        }
        if let Some(torn) = torn(op) {
            let mut m = model.clone();
            m.apply(&torn)?;
            push(i, Kind::Torn, m.digest(false), &acked, &mut out);
        }
        model
            .apply(op)
            .map_err(|e| format!("operation {i} ({op:?}): {e}"))?;
        push(i + 1, Kind::Cached, model.digest(false), &acked, &mut out);
        push(i + 1, Kind::Durable, model.digest(true), &acked, &mut out);
    }
    Ok(out)
}

/// The first half of a write, if it is one of two bytes or more.
fn torn(op: &Op) -> Option<Op> {
    match op {
        Op::Write { path, offset, data } if data.len() >= 2 => Some(Op::Write {
            path: path.clone(),
            offset: *offset,
            data: data[..data.len() / 2].to_vec(),
        }),
        _ => None,
    }
}

/// The state directory of one crash state.
pub fn tree_of(ops: &[Op], s: &CrashState) -> Result<Tree, String> {
    let mut model = Model::default();
    for op in &ops[..s.point] {
        model.apply(op)?;
    }
    Ok(match s.kind {
        Kind::Cached => model.cached(),
        Kind::Durable => model.durable(),
        Kind::Torn => {
            model.apply(&torn(&ops[s.point]).ok_or("not a write")?)?;
            model.cached()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn w(path: &str, offset: u64, data: &[u8]) -> Op {
        Op::Write {
            path: p(path),
            offset,
            data: data.to_vec(),
        }
    }

    fn create(path: &str) -> Op {
        Op::Create {
            path: p(path),
            truncate: true,
        }
    }

    fn sync(path: &str) -> Op {
        Op::Sync { path: p(path) }
    }

    #[test]
    fn data_needs_an_fsync_and_names_need_the_directorys() {
        let mut m = Model::default();
        for op in [create(".t"), w(".t", 0, b"new")] {
            m.apply(&op).unwrap();
        }
        assert_eq!(m.cached()[&p(".t")], Some(b"new".to_vec()));
        assert!(m.durable().is_empty(), "nothing fsynced yet");
        m.apply(&sync("")).unwrap();
        assert_eq!(
            m.durable()[&p(".t")],
            Some(vec![]),
            "the name is durable, its data is not"
        );
        m.apply(&sync(".t")).unwrap();
        m.apply(&Op::Rename {
            from: p(".t"),
            to: p("a"),
        })
        .unwrap();
        assert!(m.durable().contains_key(&p(".t")), "rename not yet durable");
        m.apply(&sync("")).unwrap();
        assert_eq!(m.durable()[&p("a")], Some(b"new".to_vec()));
        assert!(!m.durable().contains_key(&p(".t")));
    }

    #[test]
    fn a_file_in_a_directory_not_yet_durable_is_lost_with_it() {
        let mut m = Model::default();
        for op in [
            Op::Mkdir { path: p("d") },
            create("d/f"),
            w("d/f", 0, b"x"),
            sync("d/f"),
            sync("d"),
        ] {
            m.apply(&op).unwrap();
        }
        assert!(m.durable().is_empty(), "the root was never fsynced");
        m.apply(&sync("")).unwrap();
        assert_eq!(m.durable()[&p("d/f")], Some(b"x".to_vec()));
    }

    #[test]
    fn states_cover_torn_writes_and_follow_acknowledgements() {
        let ops = [
            create("f"),
            sync(""),
            w("f", 0, b"abcd"),
            sync("f"),
            Op::Ack { id: 1 },
            w("f", 4, b"ef"),
        ];
        let states = crash_states(&ops).unwrap();
        let tree = |s: &CrashState| tree_of(&ops, s).unwrap();
        let torn: Vec<_> = states.iter().filter(|s| s.kind == Kind::Torn).collect();
        assert_eq!(tree(torn[0])[&p("f")], Some(b"ab".to_vec()));
        assert_eq!(torn[0].acked, Vec::<u64>::new());
        assert_eq!(tree(torn[1])[&p("f")], Some(b"abcde".to_vec()));
        assert_eq!(torn[1].acked, vec![1]);
        let last = states.iter().rfind(|s| s.kind == Kind::Durable).unwrap();
        assert_eq!(tree(last)[&p("f")], Some(b"abcd".to_vec()));
        // The same tree with the same acknowledgements is listed once.
        let durable_after_ack = states
            .iter()
            .filter(|s| s.kind == Kind::Durable && s.acked.len() == 1)
            .count();
        assert_eq!(durable_after_ack, 1);
    }
}
