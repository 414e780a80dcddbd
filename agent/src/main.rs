//! The `kooagent` binary: the daemon (`run`), its CLI (a client of the socket), and the
//! tools that work without a daemon (`id`, `config show`, `bench`).

use std::process::ExitCode;

fn main() -> ExitCode {
    #[cfg(target_feature = "crt-static")]
    static_nss();
    kooagent::cli::main()
}

/// The shipped binary links glibc statically (`scripts/release.sh`). A static
/// glibc that meets a `systemd`, `ldap` or `myhostname` line in /etc/nsswitch.conf
/// dlopens that module, which drags in the host's own libc.so and crashes the process.
/// The agent only looks up its socket group, a user's home directory and upstream host
/// names, so it pins those databases to the modules built into libc itself: `files`
/// (/etc/group, /etc/passwd, /etc/hosts) and `dns` (/etc/resolv.conf). See
/// docs/operations.md ("The static binary").
#[cfg(target_feature = "crt-static")]
fn static_nss() {
    extern "C" {
        // glibc, <nss.h>: overrides the service line of one database, for "static
        // binaries" in the header's words.
        fn __nss_configure_lookup(
            db: *const std::ffi::c_char,
            line: *const std::ffi::c_char,
        ) -> std::ffi::c_int;
    }
    for (db, line) in [
        (c"group", c"files"),
        (c"passwd", c"files"),
        (c"hosts", c"files dns"),
    ] {
        // SAFETY: both are NUL-terminated static strings; called before any thread
        // exists, as the function is not thread-safe.
        unsafe { __nss_configure_lookup(db.as_ptr(), line.as_ptr()) };
    }
}
