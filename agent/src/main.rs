//! The `kooagent` binary: the daemon (`run`), its CLI (a client of the socket), and the
//! tools that work without a daemon (`id`, `config show`, `image-prep`). The bench is its
//! own binary (src/bin/kooagent-bench/).

use std::process::ExitCode;

fn main() -> ExitCode {
    // The shipped binary links glibc statically (`scripts/release.sh`). A static glibc
    // that meets a `systemd`, `ldap` or `myhostname` line in /etc/nsswitch.conf dlopens that
    // module, which drags in the host's own libc.so and crashes the process. The agent only
    // looks up its socket group, a user's home directory and upstream host names, so it
    // pins those databases to the modules built into libc itself: `files` (/etc/group,
    // /etc/passwd, /etc/hosts) and `dns` (/etc/resolv.conf). See docs/operations.md ("The
    // static binary"). Before any thread exists: the call is not thread-safe.
    #[cfg(all(target_feature = "crt-static", target_env = "gnu"))]
    kooagent::sys::static_nss();
    kooagent::cli::main()
}
