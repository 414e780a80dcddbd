//! Device keys already decompressed, by their base64 form: a relay request's key is parsed
//! (base64, point decompression: a field inversion, a few µs) once per device and process,
//! not once per request. Only keys that parsed are kept, so the cache answers exactly as
//! `relay_auth::parse_device_key` does. Bounded: when full it starts over (a fleet larger
//! than the bound pays the parse again, nothing else changes).

use std::collections::HashMap;
use std::sync::Mutex;

use ed25519_dalek::VerifyingKey;
use kooagent_core::authcode::relay_auth::{self, RelayAuthError};

/// Keys held at most (≈ 250 bytes each).
const CAPACITY: usize = 100_000;

pub struct KeyCache {
    keys: Mutex<HashMap<String, VerifyingKey>>,
    capacity: usize,
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache::with_capacity(CAPACITY)
    }
}

impl KeyCache {
    pub fn with_capacity(capacity: usize) -> KeyCache {
        KeyCache {
            keys: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// `relay_auth::parse_device_key(b64)`, remembered.
    pub fn parse(&self, b64: &str) -> Result<VerifyingKey, RelayAuthError> {
        if let Some(k) = self.keys.lock().expect("key cache lock").get(b64) {
            return Ok(*k);
        }
        // Parsed outside the lock: a burst of new devices does not queue behind one.
        let key = relay_auth::parse_device_key(b64)?;
        let mut keys = self.keys.lock().expect("key cache lock");
        if keys.len() >= self.capacity {
            keys.clear();
        }
        keys.insert(b64.to_string(), key);
        Ok(key)
    }

    pub fn len(&self) -> usize {
        self.keys.lock().expect("key cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64(seed: u8) -> String {
        let k = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        base64::engine::general_purpose::STANDARD.encode(k.verifying_key().as_bytes())
    }

    #[test]
    fn answers_as_the_parser_does_and_stays_bounded() {
        let c = KeyCache::with_capacity(2);
        for s in [1u8, 2, 1, 2] {
            assert_eq!(c.parse(&b64(s)), relay_auth::parse_device_key(&b64(s)));
        }
        assert_eq!(c.len(), 2);
        // Keys that do not parse are refused every time and never kept.
        for bad in ["not base64!", "AAAA", &"A".repeat(44)] {
            assert_eq!(c.parse(bad), relay_auth::parse_device_key(bad));
            assert!(c.parse(bad).is_err());
        }
        assert_eq!(c.len(), 2);
        // Full: it starts over rather than grow.
        c.parse(&b64(3)).unwrap();
        assert_eq!(c.len(), 1);
    }
}
