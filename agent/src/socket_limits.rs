//! Book-keeping for the socket's connection limits: how many connections each uid holds
//! (the per-uid cap), and how many are open at all (to give freed memory back to the
//! system once a crowd of connections is gone).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Connections per uid, at most `cap` each.
pub struct PerUid {
    cap: usize,
    held: Mutex<HashMap<u32, usize>>,
}

/// One connection counted against its uid; dropping it gives the slot back.
pub struct UidSlot {
    owner: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    pub fn new(cap: usize) -> PerUid {
        PerUid {
            cap: cap.max(1),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `uid`, or None when it already holds `cap` connections.
    pub fn try_take(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(uid).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            owner: self.clone(),
            uid,
        })
    }

    pub fn held(&self, uid: u32) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&uid).copied().unwrap_or(0)
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                // Keep the map as small as the set of uids connected now.
                held.remove(&self.uid);
            }
        }
    }
}

/// Open connections, and the most there were since memory was last given back.
#[derive(Default)]
pub struct Live {
    open: AtomicUsize,
    peak: AtomicUsize,
}

/// Trimming is worth its cost (a walk over the heap) only after this many connections went.
const TRIM_AFTER: usize = 256;

/// One open connection; dropping it may give memory back to the system.
pub struct Open(Arc<Live>);

impl Live {
    pub fn opened(self: &Arc<Self>) -> Open {
        let n = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        Open(self.clone())
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let live = &self.0;
        let now = live.open.fetch_sub(1, Ordering::Relaxed) - 1;
        let peak = live.peak.load(Ordering::Relaxed);
        if should_trim(peak, now)
            && live
                .peak
                .compare_exchange(peak, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // Off the runtime's thread: a trim walks the whole heap.
            std::thread::Builder::new()
                .name("kooagent-trim".into())
                .spawn(trim)
                .ok();
        }
    }
}

/// Whether memory should be given back: at least [`TRIM_AFTER`] connections closed since
/// the peak and at most half of them remain (a long-lived few do not block it).
pub fn should_trim(peak: usize, now: usize) -> bool {
    peak.saturating_sub(now) >= TRIM_AFTER && now <= peak / 2
}

/// Returns free heap pages to the system. glibc keeps freed memory in its arenas (both the
/// dynamic and the static builds link glibc's malloc); without this the RSS of a burst of
/// 16,384 connections stays after they close.
pub fn trim() {
    crate::sys::malloc_trim();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_gets_at_most_its_cap_and_slots_come_back() {
        let p = Arc::new(PerUid::new(2));
        let a = p.try_take(1000).unwrap();
        let _b = p.try_take(1000).unwrap();
        assert!(p.try_take(1000).is_none());
        assert!(p.try_take(1001).is_some(), "another uid is not affected");
        drop(a);
        assert_eq!(p.held(1000), 1);
        assert!(p.try_take(1000).is_some());
    }

    #[test]
    fn trimming_waits_for_a_crowd_to_leave() {
        assert!(
            !should_trim(10, 0),
            "a handful of connections is not worth a trim"
        );
        assert!(should_trim(16_384, 0));
        assert!(should_trim(1000, 500));
        assert!(!should_trim(1000, 700), "most are still open");
    }
}
