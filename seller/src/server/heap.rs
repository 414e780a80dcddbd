//! The allocator's settings for the server process (glibc malloc).
//!
//! Every order allocates and frees a few hundred small blocks on the workers and the
//! database thread. With glibc's defaults a thread's heap hands its free top back to the
//! kernel as soon as 128 KiB are free there (`M_TRIM_THRESHOLD`), and grows again by the
//! page at the next burst: in the bench's profile the workers spent ≈ 4 % of their time
//! in page faults, clearing pages and `mprotect` for memory they had just returned.
//! Keeping up to 64 MiB free per heap, growing by 16 MiB at a time, and serving blocks up
//! to 1 MiB from the heaps instead of fresh `mmap`s trades a resident size that stays at
//! its peak (tens of MiB for thousands of orders at once) for not paying that again.

/// Sets the allocator for a long-running server; call once, before the threads start.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const TRIM_THRESHOLD: libc::c_int = 64 << 20;
        const TOP_PAD: libc::c_int = 16 << 20;
        const MMAP_THRESHOLD: libc::c_int = 1 << 20;
        for (param, value) in [
            (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (libc::M_TOP_PAD, TOP_PAD),
            (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        ] {
            // SAFETY: mallopt only sets glibc's allocator parameters; it returns 0 when
            // it refuses a value, which leaves the default (slower, not wrong).
            if unsafe { libc::mallopt(param, value) } == 0 {
                log::warn!("mallopt({param}, {value}) refused");
            }
        }
    }
}
