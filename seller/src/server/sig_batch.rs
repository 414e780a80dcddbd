//! Device signatures of concurrent requests checked together (issue 19: at a fleet's
//! hourly close a thousand devices post at once, and one Ed25519 verification, a double
//! scalar multiplication and a point compression, was the largest part of a usage
//! request's server CPU). Requests hand their [`Unverified`] signature to one thread,
//! which takes every signature waiting and checks them with one multiscalar
//! multiplication (`ed25519_dalek::verify_batch`, random linear combination): about half
//! the work per signature in batches of tens.
//!
//! A batch that does not verify is checked again one signature at a time, so a bad
//! signature is refused alone and never refuses a good request with it. A lone signature
//! is checked alone (a batch of one saves nothing). The verdict for a valid signature is
//! the single check's; the batch equation is cofactorless like the single check, and
//! only the key's holder could make a signature that one check accepts and the other
//! refuses (it proves nothing about anyone else's key).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use ed25519_dalek::{Signature, VerifyingKey};
use kooagent_core::authcode::relay_auth::Unverified;
use tokio::sync::oneshot;

/// Signatures checked together at most: beyond some tens the gain per signature levels
/// off, and a large batch that fails costs a long recheck.
pub const MAX_BATCH: usize = 64;

struct Item {
    sig: Unverified,
    reply: oneshot::Sender<bool>,
}

/// The checking thread, started on first use.
pub struct BatchVerifier {
    queue: mpsc::Sender<Item>,
    /// Signatures waiting before the thread starts (tests start it late to see a batch).
    held: Mutex<Option<mpsc::Receiver<Item>>>,
    stats: Arc<Stats>,
}

/// Counts, for tests and the bench's reading of a profile.
#[derive(Debug, Default)]
pub struct Stats {
    pub batches: AtomicUsize,
    pub signatures: AtomicUsize,
    pub largest: AtomicUsize,
}

impl Default for BatchVerifier {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        BatchVerifier {
            queue: tx,
            held: Mutex::new(Some(rx)),
            stats: Arc::default(),
        }
    }
}

impl BatchVerifier {
    /// Whether `sig` verifies.
    pub async fn verify(&self, sig: Unverified) -> bool {
        let (reply, answer) = oneshot::channel();
        self.start();
        match self.queue.send(Item { sig, reply }) {
            Ok(()) => answer.await.unwrap_or(false),
            // The thread is gone (it could not start): checked here, alone.
            Err(mpsc::SendError(item)) => item.sig.verify(),
        }
    }

    /// Starts the thread if it is not running (the first request does).
    pub fn start(&self) {
        let Some(rx) = self.held.lock().expect("verifier lock").take() else {
            return;
        };
        let stats = self.stats.clone();
        let started = std::thread::Builder::new()
            .name("sig-verify".into())
            .spawn(move || run(rx, &stats));
        if let Err(e) = started {
            log::error!("device signatures: cannot start the checking thread ({e}); checking each request on its own");
            // Dropping the receiver makes every send fail: each is then checked alone.
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

fn run(rx: mpsc::Receiver<Item>, stats: &Stats) {
    while let Ok(first) = rx.recv() {
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(i) => items.push(i),
                Err(_) => break,
            }
        }
        let sigs: Vec<&Unverified> = items.iter().map(|i| &i.sig).collect();
        let verdicts = check(&sigs);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.signatures.fetch_add(items.len(), Ordering::Relaxed);
        stats.largest.fetch_max(items.len(), Ordering::Relaxed);
        for (item, ok) in items.into_iter().zip(verdicts) {
            // A request that gave up waiting (its connection closed) does not matter.
            let _ = item.reply.send(ok);
        }
    }
}

/// The verdict for each signature: together when there are several, and one by one when
/// the batch does not verify.
pub fn check(sigs: &[&Unverified]) -> Vec<bool> {
    if sigs.len() >= 2 {
        let messages: Vec<&[u8]> = sigs.iter().map(|s| s.message.as_slice()).collect();
        let signatures: Vec<Signature> = sigs.iter().map(|s| s.signature).collect();
        let keys: Vec<VerifyingKey> = sigs.iter().map(|s| s.key).collect();
        if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
            return vec![true; sigs.len()];
        }
    }
    sigs.iter().map(|s| s.verify()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(seed: u8, msg: &str) -> Unverified {
        let k = SigningKey::from_bytes(&[seed; 32]);
        Unverified {
            key: k.verifying_key(),
            message: msg.as_bytes().to_vec(),
            signature: k.sign(msg.as_bytes()),
        }
    }

    /// A forged signature (another key's, or another message's) is refused whether it is
    /// alone or among good ones, and never takes a good one down with it.
    #[test]
    fn a_bad_signature_is_refused_alone() {
        let good: Vec<Unverified> = (1..=10).map(|i| signed(i, &format!("m{i}"))).collect();
        let mut wrong_key = signed(11, "m11");
        wrong_key.key = SigningKey::from_bytes(&[12; 32]).verifying_key();
        let mut wrong_msg = signed(13, "m13");
        wrong_msg.message = b"m13 changed".to_vec();
        let all: Vec<&Unverified> = good
            .iter()
            .take(5)
            .chain([&wrong_key])
            .chain(good.iter().skip(5))
            .chain([&wrong_msg])
            .collect();
        let want: Vec<bool> = all.iter().map(|s| s.verify()).collect();
        assert_eq!(want.iter().filter(|ok| !**ok).count(), 2);
        assert_eq!(check(&all), want);
        assert_eq!(check(&all[..5]), vec![true; 5]);
        assert_eq!(check(&[&wrong_key]), vec![false]);
        assert_eq!(check(&[]), Vec::<bool>::new());
    }

    /// Signatures waiting together are checked in one batch, each answered with its own
    /// verdict.
    #[test]
    fn waiting_signatures_are_checked_together() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let v = Arc::new(BatchVerifier::default());
        let mut answers = Vec::new();
        // Queued before the thread runs: it finds all twenty waiting.
        for i in 0..20u8 {
            let mut s = signed(i + 1, &format!("request {i}"));
            if i == 7 {
                s.message.push(b'!');
            }
            let (reply, answer) = oneshot::channel();
            v.queue.send(Item { sig: s, reply }).unwrap();
            answers.push(answer);
        }
        v.start();
        let got: Vec<bool> = rt.block_on(async {
            let mut out = Vec::new();
            for a in answers {
                out.push(a.await.unwrap());
            }
            out
        });
        let want: Vec<bool> = (0..20).map(|i| i != 7).collect();
        assert_eq!(got, want);
        assert_eq!(v.stats().batches.load(Ordering::Relaxed), 1);
        assert_eq!(v.stats().largest.load(Ordering::Relaxed), 20);
        // Through the async door too, once the thread runs.
        assert!(rt.block_on(v.verify(signed(50, "alone"))));
        let mut bad = signed(51, "alone");
        bad.signature = signed(52, "alone").signature;
        assert!(!rt.block_on(v.verify(bad)));
    }
}
