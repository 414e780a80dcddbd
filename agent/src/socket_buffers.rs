//! Byte buffers the socket connections borrow while they serve a wakeup's requests and
//! give back once its answers are written: a busy connection reads into and answers from
//! memory reused across requests (no allocation, no zeroing per request), and an idle one
//! holds no buffer at all. Kept per thread (the runtime's event loop thread, or each worker
//! of a multi-thread runtime), so taking and giving back is a `Vec` pop and push, no lock.

use std::cell::RefCell;

/// Bytes read per read(2): one page-sized chunk covers almost every request, and a
/// pipelined burst larger than it is read over several wakeups.
pub const CHUNK: usize = 4 * 1024;

/// Buffers kept for reuse per thread; more connections active at once allocate.
const KEEP: usize = 16;
/// A buffer grown past this (a long line, a large batch of answers) is freed rather than
/// kept, so one large request does not stay resident in an idle agent.
const KEEP_CAPACITY: usize = 16 * 1024;

thread_local! {
    static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for at least [`CHUNK`] bytes.
pub fn take() -> Vec<u8> {
    FREE.with_borrow_mut(|free| free.pop())
        .unwrap_or_else(|| Vec::with_capacity(CHUNK))
}

/// Gives `buf` back for reuse (its content is dropped).
pub fn give(mut buf: Vec<u8>) {
    if buf.capacity() < CHUNK || buf.capacity() > KEEP_CAPACITY {
        return;
    }
    buf.clear();
    FREE.with_borrow_mut(|free| {
        if free.len() < KEEP {
            free.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_empty_and_large_ones_are_not_kept() {
        let mut a = take();
        assert!(a.capacity() >= CHUNK && a.is_empty());
        a.extend_from_slice(b"left over");
        let ptr = a.as_ptr();
        give(a);
        let b = take();
        assert_eq!(
            (b.as_ptr(), b.len()),
            (ptr, 0),
            "the buffer given back is reused"
        );
        give(b);
        let big = Vec::with_capacity(KEEP_CAPACITY * 2);
        let big_ptr = big.as_ptr();
        give(big);
        let c = take();
        assert_ne!(
            c.as_ptr(),
            big_ptr,
            "an oversized buffer is freed, not kept"
        );
    }
}
