//! The license parser's fuzz target body, shared by the cargo-fuzz target (`fuzz/`, needs
//! nightly) and a stable-toolchain mutational harness run by `cargo test` (bounded by
//! iterations; `KOOAGENT_FUZZ_SECS=N` runs it for N seconds instead).

use super::format;

/// Feeds arbitrary bytes to every parsing layer. Must never panic; what parses must
/// round-trip through our own serialiser.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(p) = format::parse(data) {
        // A parsed license re-serialises to something that parses to the same contents.
        let again = format::payload_bytes(&p.license).expect("a parsed license serialises");
        assert_eq!(format::parse_payload(&again).as_ref(), Ok(&p.license));
    }
    let _ = format::parse_payload(data);
}

/// A small deterministic PRNG (SplitMix64): the harness must run offline, reproducibly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b".",
    b"kl1.",
    b"kl2.",
    b"=",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"\\u0000",
    b"\xff",
    b"\xc3",
    b"1e999",
    b"-0",
    b"18446744073709551616",
    b"\"v\":1,",
    b"\"v\":1,\"v\":1",
    b"\"devices\":[]",
    b"\"unbound\":true",
    b"\"not_after\":null",
    b"9999-12-31T23:59:59Z",
];

/// One random mutation of `input` (byte flips, inserts, deletes, splices with other corpus
/// entries and interesting tokens), sometimes applied inside the decoded payload so the
/// JSON layer is reached with a valid envelope.
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    if rng.below(3) == 0 {
        if let Ok(p) = format::parse(input) {
            let payload = mutate_bytes(rng, &p.payload, corpus);
            return format!(
                "kl1.{}.{}",
                URL_SAFE_NO_PAD.encode(payload),
                URL_SAFE_NO_PAD.encode(p.signature)
            )
            .into_bytes();
        }
    }
    mutate_bytes(rng, input, corpus)
}

fn mutate_bytes(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let pos = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let end = (pos + 1 + rng.below(16)).min(v.len());
                v.drain(pos.min(end)..end);
            }
            2 => {
                let t = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(pos..pos, t.iter().copied());
            }
            3 => v.insert(pos, rng.next_u64() as u8),
            4 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                let a = rng.below(other.len() + 1);
                let b = (a + rng.below(64)).min(other.len());
                v.splice(pos..pos, other[a..b].iter().copied());
            }
            5 => v.truncate(pos),
            _ => {
                let i = rng.below(v.len() + 1);
                let j = rng.below(v.len() + 1);
                let (a, b) = (i.min(j), i.max(j));
                let chunk: Vec<u8> = v[a..b].to_vec();
                v.splice(pos.min(v.len())..pos.min(v.len()), chunk);
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{sample, test_key};
    use std::time::{Duration, Instant};

    fn corpus() -> Vec<Vec<u8>> {
        let mut c = Vec::new();
        let key = test_key(5);
        let mut l = sample();
        c.push(format::sign(&l, &key).unwrap().into_bytes());
        l.not_after = None;
        l.unbound = true;
        l.devices.clear();
        l.meta.insert("note".into(), "ünïcode \"quoted\"".into());
        c.push(format::sign(&l, &key).unwrap().into_bytes());
        let p = format::parse(&c[0]).unwrap();
        c.push(p.payload.clone());
        c
    }

    /// Bounded: a fixed number of iterations by default (deterministic, seed 1), or
    /// `KOOAGENT_FUZZ_SECS` seconds with a time-derived seed (printed, to replay).
    #[test]
    fn parser_survives_mutations() {
        let secs: Option<u64> = std::env::var("KOOAGENT_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok());
        let seed = match secs {
            Some(_) => std::env::var("KOOAGENT_FUZZ_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| crate::clock::Clock::now_ms(&crate::clock::SystemClock) as u64),
            None => 1,
        };
        eprintln!("fuzz seed {seed} (KOOAGENT_FUZZ_SEED to replay)");
        let mut rng = Rng::new(seed);
        let mut corpus = corpus();
        let deadline = secs.map(|s| Instant::now() + Duration::from_secs(s));
        let mut runs = 0u64;
        loop {
            match deadline {
                Some(d) if Instant::now() >= d => break,
                None if runs >= 20_000 => break,
                _ => {}
            }
            let base = corpus[rng.below(corpus.len())].clone();
            let input = mutate(&mut rng, &base, &corpus);
            fuzz_parse(&input);
            // Keep inputs that still parse: they reach deeper checks when mutated again.
            if corpus.len() < 256 && format::parse(&input).is_ok() {
                corpus.push(input);
            }
            runs += 1;
        }
        eprintln!("fuzz: {runs} inputs, corpus {}", corpus.len());
    }

    #[test]
    fn deep_nesting_and_huge_inputs_do_not_crash() {
        fuzz_parse(&vec![b'['; 100_000]);
        let mut deep = b"{\"meta\":".to_vec();
        deep.extend(std::iter::repeat_n(b'[', 10_000));
        fuzz_parse(&deep);
        fuzz_parse(&vec![b'k'; format::MAX_LICENSE_BYTES + 10]);
    }
}
