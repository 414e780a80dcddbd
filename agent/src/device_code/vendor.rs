//! Running a vendor identity command with a time limit.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Most output kept from a vendor command.
const MAX_OUTPUT: u64 = 64 * 1024;

/// Runs `argv` (no shell) with stdin closed and stderr discarded, and returns its stdout.
/// The command runs in its own process group, which is killed when it outlives `timeout`.
/// Any failure (cannot start, non-zero exit, timeout, non-UTF-8) is an `Err` with a reason.
pub(crate) fn run(argv: &[String], timeout: Duration) -> Result<String, String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {prog}: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    // The reader thread ends when the pipe closes; if a grandchild keeps it open after a kill,
    // the thread is simply left behind (it owns nothing else).
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let res = (&mut stdout).take(MAX_OUTPUT).read_to_end(&mut buf);
        let _ = tx.send(res.map(|_| buf));
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                kill_group(&mut child);
                return Err(format!("{prog} timed out after {} ms", timeout.as_millis()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                kill_group(&mut child);
                return Err(format!("waiting for {prog}: {e}"));
            }
        }
    };
    if !status.success() {
        return Err(format!("{prog} failed ({status})"));
    }
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let out = rx
        .recv_timeout(remaining)
        .map_err(|_| format!("{prog}: output still open after exit"))?
        .map_err(|e| format!("reading {prog} output: {e}"))?;
    String::from_utf8(out).map_err(|_| format!("{prog}: output is not UTF-8"))
}

fn kill_group(child: &mut std::process::Child) {
    // The group we created with process_group(0): the helper's own children too.
    let _ = crate::sys::kill_process_group(child.id());
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn captures_stdout() {
        let out = run(&argv(&["echo", "board-42"]), Duration::from_secs(2)).unwrap();
        assert_eq!(out, "board-42\n");
    }

    #[test]
    fn failures_are_errors() {
        assert!(run(&argv(&["false"]), Duration::from_secs(2)).is_err());
        assert!(run(
            &argv(&["/nonexistent/kooagent-test-prog"]),
            Duration::from_secs(2)
        )
        .is_err());
        assert!(run(&[], Duration::from_secs(2)).is_err());
    }

    #[test]
    fn timeout_kills_the_group() {
        let start = Instant::now();
        let err = run(
            &argv(&["sh", "-c", "sleep 30; echo late"]),
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
