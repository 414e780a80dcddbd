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
//!
//! Kept memory still costs a page fault (and the kernel clearing the page) the first time
//! it is touched, and a burst of orders soon after start is exactly when it is: on a
//! fresh server a thousand orders at once spent ≈ 8 % of the machine's CPU there.
//! [`warm_this_thread`] touches a thread's heap once, at start, so that burst finds its
//! pages already there (as a server that has had one burst already finds them); the
//! price is ≈ 72 MiB resident from the start.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether [`warm_this_thread`] touches anything: only in the server (and its bench),
/// which set the allocator up with [`keep_freed_memory`]; the CLI and the tests open
/// databases too, and have no burst to prepare for.
static WARM: AtomicBool = AtomicBool::new(false);

/// What a worker touches at start. Its heap holds the connections (TLS and HTTP state, a
/// few KiB each) before the orders come: in the bench, 1,000 connections and then their
/// 1,000 orders at once touched ≈ 3,300 fresh pages in the timed window with 16 MiB
/// warmed per thread and 12 with 32 MiB.
pub const WORKER_HEAP: usize = 32 << 20;

/// What the database thread touches at start (≈ 2 MiB in the same window).
pub const DB_HEAP: usize = 8 << 20;

/// Sets the allocator for a long-running server; call once, before the threads start.
/// Threads that then call [`warm_this_thread`] get their heap touched.
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
        WARM.store(true, Ordering::Relaxed);
    }
}

/// Touches `bytes` of the calling thread's heap and frees them again: the free blocks
/// merge back into the heap's top, which the settings above keep (it stays under
/// `M_TRIM_THRESHOLD`), so the thread's next allocations land on resident pages.
pub fn warm_this_thread(bytes: usize) {
    if !WARM.load(Ordering::Relaxed) {
        return;
    }
    // Blocks under M_MMAP_THRESHOLD, so that they come from this thread's heap.
    const BLOCK: usize = 256 << 10;
    let mut blocks: Vec<Vec<u8>> = (0..bytes / BLOCK).map(|_| touched_block(BLOCK)).collect();
    // Last first: each block then borders the top and merges into it.
    while blocks.pop().is_some() {}
}

/// A block of `len` bytes from the heap with every page of it written once (so resident).
fn touched_block(len: usize) -> Vec<u8> {
    // Not `vec![0; n]`: calloc knows fresh heap memory is zero and would not touch it.
    let mut b = Vec::<u8>::with_capacity(len);
    let p = b.as_mut_ptr();
    for off in (0..len).step_by(4096) {
        // SAFETY: `off` < len, the capacity; a volatile write so it is not elided.
        unsafe { std::ptr::write_volatile(p.add(off), 1) };
    }
    b
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Page faults this thread took so far.
    fn faults() -> i64 {
        // SAFETY: getrusage fills a local struct.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
            u.ru_minflt
        }
    }

    /// Allocates `bytes` in 64 KiB blocks, writes every page, and returns the page faults
    /// that took (the blocks are freed after).
    fn touch_new_blocks(bytes: usize) -> i64 {
        let before = faults();
        let blocks: Vec<Vec<u8>> = (0..bytes / (64 << 10))
            .map(|_| super::touched_block(64 << 10))
            .collect();
        let n = faults() - before;
        drop(blocks);
        n
    }

    #[test]
    fn a_warmed_heap_takes_no_page_faults_for_what_it_holds() {
        // On a thread of its own: a fresh heap, not one the test harness's threads share.
        std::thread::spawn(|| {
            super::keep_freed_memory();
            super::warm_this_thread(16 << 20);
            // 4 MiB is 1,024 pages: cold, each would fault once.
            let n = touch_new_blocks(4 << 20);
            assert!(n < 64, "{n} page faults on a warmed heap");
        })
        .join()
        .unwrap();
    }
}
