//! Reads an `strace -f -y -xx` log of the agent into the operations the crash harness
//! replays (tests/e2e/crash.rs): what the kernel was asked to do to files under the state
//! directory (creates, writes, truncates, renames, unlinks, mkdirs, fsyncs), in the order
//! the calls completed, plus every answer written to a client socket (an
//! acknowledgement, by request id).
//!
//! Why strace and not a seam in the agent's storage code: a seam records only the writes
//! that go through it, and the point of the harness is to catch the one that does not.
//! This is how ALICE records an application's file-system calls, too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The system calls to trace (`strace -e trace=...`).
pub const SYSCALLS: &str = "open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,lseek,\
fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,rmdir,ftruncate,\
truncate,fallocate,link,linkat,symlink,symlinkat,sendmsg,sendto,close";

/// One operation on a path relative to the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `open(O_CREAT)` of a file that may not exist yet; `truncate`: `O_TRUNC`.
    Create {
        path: PathBuf,
        truncate: bool,
    },
    Write {
        path: PathBuf,
        offset: u64,
        data: Vec<u8>,
    },
    SetLen {
        path: PathBuf,
        len: u64,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    Unlink {
        path: PathBuf,
    },
    Mkdir {
        path: PathBuf,
    },
    /// fsync or fdatasync of a file or a directory.
    Sync {
        path: PathBuf,
    },
    /// An answer `{"id":N,"ok":true,...}` written to a client.
    Ack {
        id: u64,
    },
}

#[derive(Debug)]
pub struct TraceError(pub String);

impl std::fmt::Display for TraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits `a, "b, c", {x, y}, d</p, q>` at top-level commas.
fn split_args(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut quoted, mut start) = (Vec::new(), 0i32, false, 0);
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'(' | b'[' | b'{' | b'<' if !quoted => depth += 1,
            b')' | b']' | b'}' | b'>' if !quoted => depth -= 1,
            b',' if !quoted && depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if !s[start..].trim().is_empty() {
        out.push(s[start..].trim());
    }
    out
}

/// Decodes a `-xx` string literal (`"\x61\x62"`, maybe followed by `...` when cut).
fn string(arg: &str) -> Result<Vec<u8>, TraceError> {
    let inner = arg
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or_else(|| TraceError(format!("not a whole string (raise -s?): {arg:.80}")))?;
    let mut out = Vec::with_capacity(inner.len() / 4);
    let b = inner.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') && i + 4 <= b.len() {
            let h = std::str::from_utf8(&b[i + 2..i + 4]).unwrap_or("zz");
            out.push(
                u8::from_str_radix(h, 16)
                    .map_err(|_| TraceError(format!("bad escape in {arg:.80}")))?,
            );
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Decodes the `\xNN` escapes `-xx` puts in `-y` paths too.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 4);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') && i + 4 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 2..i + 4])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `5</tmp/x/state/f>` → (5, "/tmp/x/state/f"); `AT_FDCWD</cwd>` → (-100, "/cwd").
fn fd_path(arg: &str) -> Option<(i64, String)> {
    let (num, rest) = arg.split_once('<')?;
    let path = rest.strip_suffix('>')?;
    let fd = if num == "AT_FDCWD" {
        -100
    } else {
        num.parse().ok()?
    };
    Some((fd, unescape(path)))
}

/// The data of a write-like call's buffer argument (a string or an iovec array).
fn buffers(arg: &str) -> Result<Vec<u8>, TraceError> {
    if arg.starts_with('"') {
        return string(arg);
    }
    let mut out = Vec::new();
    for part in arg.split("iov_base=").skip(1) {
        let end = part
            .find("\", iov_len")
            .map(|e| e + 1)
            .unwrap_or(part.len());
        out.extend(string(&part[..end])?);
    }
    Ok(out)
}

/// The request id of an answer that says `"ok":true`, if the bytes are one.
fn ack_id(data: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(data).ok()?;
    let v: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
    if v["ok"] != true {
        return None;
    }
    v["id"].as_u64()
}

/// What one call returned: the number, and the `-y` path of a returned descriptor.
fn result(ret: &str) -> (i64, Option<&str>) {
    let ret = ret.trim();
    let (num, path) = match ret.split_once('<') {
        Some((n, p)) => (n, p.split_once('>').map(|(p, _)| p)),
        None => (ret.split_whitespace().next().unwrap_or(""), None),
    };
    (num.trim().parse().unwrap_or(-1), path)
}

/// Parses the trace. Paths are kept only under `root` (made relative to it); `unknown`
/// collects calls on state files that the model does not cover (hard links, fallocate).
pub fn parse(text: &str, root: &Path) -> Result<(Vec<Op>, Vec<String>), TraceError> {
    let mut ops = Vec::new();
    let mut unknown = Vec::new();
    // Calls split by another thread's output: "<unfinished ...>" then "<... x resumed>".
    let mut pending: HashMap<&str, String> = HashMap::new();
    // File offsets of descriptors open on state files (for plain write).
    let mut offsets: HashMap<i64, u64> = HashMap::new();
    let rel = |p: &str| -> Option<PathBuf> {
        let p = Path::new(p.strip_suffix(" (deleted)").unwrap_or(p));
        if p == root {
            return Some(PathBuf::new());
        }
        p.strip_prefix(root).ok().map(Path::to_path_buf)
    };
    // A path argument, resolved against its directory descriptor.
    let resolve = |dirfd: Option<&str>, arg: &str| -> Result<Option<PathBuf>, TraceError> {
        let bytes = string(arg)?;
        let p = PathBuf::from(String::from_utf8_lossy(&bytes).into_owned());
        let abs = if p.is_absolute() {
            p
        } else {
            let base = dirfd
                .and_then(fd_path)
                .map(|(_, d)| PathBuf::from(d))
                .ok_or_else(|| TraceError(format!("relative path without a directory: {arg}")))?;
            base.join(p)
        };
        Ok(rel(&abs.to_string_lossy()))
    };
    for line in text.lines() {
        let Some((pid, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let rest = rest.trim_start();
        let call: String = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, head.to_string());
            continue;
        } else if let Some(tail) = rest.strip_prefix("<... ") {
            let Some((_, after)) = tail.split_once(" resumed>") else {
                continue;
            };
            match pending.remove(pid) {
                Some(head) => head + after,
                None => continue,
            }
        } else {
            rest.to_string()
        };
        let Some(open) = call.find('(') else { continue };
        let name = &call[..open];
        // `) = 3`, or `)      = 3` after a resumed call (strace aligns the result).
        let Some(eq) = call.rfind(" = ") else {
            continue;
        };
        let Some(close) = call[..eq].rfind(')') else {
            continue;
        };
        let args = split_args(&call[open + 1..close]);
        let (ret, ret_path) = result(&call[eq + 3..]);
        if ret < 0 {
            continue; // failed: changed nothing
        }
        let arg = |i: usize| args.get(i).copied().unwrap_or("");
        let fd_arg = |i: usize| fd_path(arg(i));
        match name {
            "open" | "openat" | "creat" => {
                let (path_arg, flags) = match name {
                    "openat" => (arg(1), arg(2)),
                    "creat" => (arg(0), "O_CREAT|O_TRUNC"),
                    _ => (arg(0), arg(1)),
                };
                let dirfd = (name == "openat").then(|| arg(0));
                let Some(path) = resolve(dirfd, path_arg)? else {
                    continue;
                };
                offsets.insert(ret, 0);
                let _ = ret_path;
                if flags.contains("O_CREAT") || flags.contains("O_TRUNC") {
                    ops.push(Op::Create {
                        path,
                        truncate: flags.contains("O_TRUNC"),
                    });
                }
            }
            "close" => {
                if let Some((fd, _)) = fd_arg(0) {
                    offsets.remove(&fd);
                }
            }
            "lseek" => {
                if let Some((fd, _)) = fd_arg(0) {
                    offsets.insert(fd, ret as u64);
                }
            }
            "write" | "writev" | "pwrite64" | "pwritev" | "pwritev2" | "sendmsg" | "sendto" => {
                let Some((fd, p)) = fd_arg(0) else { continue };
                let data = if name == "sendmsg" {
                    buffers(
                        args.iter()
                            .find(|a| a.contains("msg_iov="))
                            .map(|a| &a[a.find("msg_iov=").unwrap() + 8..])
                            .unwrap_or(""),
                    )
                    .unwrap_or_default()
                } else {
                    buffers(arg(1))?
                };
                let data = data[..(ret as usize).min(data.len())].to_vec();
                if p.starts_with("socket:") || p.starts_with("UNIX") {
                    if let Some(id) = ack_id(&data) {
                        ops.push(Op::Ack { id });
                    }
                    continue;
                }
                let Some(path) = rel(&p) else { continue };
                if p.ends_with(" (deleted)") {
                    continue;
                }
                let offset = match name {
                    "pwrite64" | "pwritev" | "pwritev2" => arg(3)
                        .parse()
                        .map_err(|_| TraceError(format!("no offset in {call:.120}")))?,
                    _ => {
                        let o = offsets.entry(fd).or_insert(0);
                        let at = *o;
                        *o += data.len() as u64;
                        at
                    }
                };
                ops.push(Op::Write { path, offset, data });
            }
            "fsync" | "fdatasync" => {
                if let Some((_, p)) = fd_arg(0) {
                    if let Some(path) = rel(&p) {
                        ops.push(Op::Sync { path });
                    }
                }
            }
            "ftruncate" => {
                if let Some((_, p)) = fd_arg(0) {
                    if let Some(path) = rel(&p) {
                        let len = arg(1).parse().unwrap_or(0);
                        ops.push(Op::SetLen { path, len });
                    }
                }
            }
            "truncate" => {
                if let Some(path) = resolve(None, arg(0))? {
                    ops.push(Op::SetLen {
                        path,
                        len: arg(1).parse().unwrap_or(0),
                    });
                }
            }
            "rename" | "renameat" | "renameat2" => {
                let (from, to) = if name == "rename" {
                    (resolve(None, arg(0))?, resolve(None, arg(1))?)
                } else {
                    (
                        resolve(Some(arg(0)), arg(1))?,
                        resolve(Some(arg(2)), arg(3))?,
                    )
                };
                match (from, to) {
                    (Some(from), Some(to)) => ops.push(Op::Rename { from, to }),
                    (None, None) => {}
                    (f, t) => {
                        unknown.push(format!("rename across the state directory: {f:?} -> {t:?}"))
                    }
                }
            }
            "unlink" | "rmdir" => {
                if let Some(path) = resolve(None, arg(0))? {
                    ops.push(Op::Unlink { path });
                }
            }
            "unlinkat" => {
                if let Some(path) = resolve(Some(arg(0)), arg(1))? {
                    ops.push(Op::Unlink { path });
                }
            }
            "mkdir" | "mkdirat" => {
                let path = if name == "mkdir" {
                    resolve(None, arg(0))?
                } else {
                    resolve(Some(arg(0)), arg(1))?
                };
                if let Some(path) = path {
                    ops.push(Op::Mkdir { path });
                }
            }
            // Paths are escaped like the data: unescape before looking for the root.
            "fallocate" | "link" | "linkat" | "symlink" | "symlinkat"
                if unescape(&call).contains(&*root.to_string_lossy()) =>
            {
                unknown.push(unescape(&call).chars().take(200).collect());
            }
            _ => {}
        }
    }
    Ok((ops, unknown))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> String {
        s.bytes().map(|b| format!("\\x{b:02x}")).collect()
    }

    #[test]
    fn descriptor_paths_are_unescaped() {
        let (ops, _) = parse(
            &format!("1 fsync(3<{}>) = 0\n", hex("/t/state/f")),
            Path::new("/t/state"),
        )
        .unwrap();
        assert_eq!(
            ops,
            vec![Op::Sync {
                path: PathBuf::from("f")
            }]
        );
    }

    #[test]
    fn calls_become_operations_under_the_root_only() {
        let root = Path::new("/t/state");
        let trace = format!(
            "10 openat(AT_FDCWD</>, \"{p}\", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0600) = 5</t/state/.a.tmp>\n\
             11 write(5</t/state/.a.tmp>, \"{d}\", 3 <unfinished ...>\n\
             10 openat(AT_FDCWD</>, \"{o}\", O_RDONLY) = 6</t/other>\n\
             11 <... write resumed>)         = 3\n\
             11 write(5</t/state/.a.tmp>, \"{d}\", 3) = 2\n\
             11 fsync(5</t/state/.a.tmp>) = 0\n\
             11 rename(\"{p}\", \"{q}\") = 0\n\
             11 pwrite64(7</t/state/usage/l>, \"{d}\", 3, 40) = 3\n\
             11 unlinkat(AT_FDCWD</t/state>, \"{r}\", 0) = 0\n\
             11 unlink(\"{q}\") = -1 ENOENT (No such file or directory)\n\
             12 write(9<socket:[77]>, \"{ack}\", 30) = 30\n\
             12 writev(9<socket:[77]>, [{{iov_base=\"{nack}\", iov_len=20}}], 1) = 20\n\
             11 fdatasync(3</t/state>) = 0\n",
            p = hex("/t/state/.a.tmp"),
            q = hex("/t/state/a"),
            o = hex("/t/other"),
            r = hex("usage/x"),
            d = hex("abc"),
            ack = hex("{\"id\":7,\"ok\":true}\n"),
            nack = hex("{\"id\":8,\"ok\":false}\n"),
        );
        let (ops, unknown) = parse(&trace, root).unwrap();
        assert!(unknown.is_empty());
        let p = PathBuf::from;
        assert_eq!(
            ops,
            vec![
                Op::Create {
                    path: p(".a.tmp"),
                    truncate: true
                },
                Op::Write {
                    path: p(".a.tmp"),
                    offset: 0,
                    data: b"abc".to_vec()
                },
                Op::Write {
                    path: p(".a.tmp"),
                    offset: 3,
                    data: b"ab".to_vec()
                },
                Op::Sync { path: p(".a.tmp") },
                Op::Rename {
                    from: p(".a.tmp"),
                    to: p("a")
                },
                Op::Write {
                    path: p("usage/l"),
                    offset: 40,
                    data: b"abc".to_vec()
                },
                Op::Unlink { path: p("usage/x") },
                Op::Ack { id: 7 },
                Op::Sync { path: p("") },
            ]
        );
    }

    #[test]
    fn a_cut_string_is_an_error_not_a_short_write() {
        let trace = "1 write(5</t/state/f>, \"\\x61\"..., 300) = 300\n";
        assert!(parse(trace, Path::new("/t/state")).is_err());
    }
}
