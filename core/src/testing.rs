//! Fixtures for tests here and in the crates above (feature `testing`, which only
//! dev-dependencies enable): deterministic keys and a sample license.

use ed25519_dalek::SigningKey;

use crate::license::format::License;

/// A deterministic ed25519 key.
pub fn test_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A license with every field set.
pub fn sample() -> License {
    License {
        key_id: String::new(),
        id: "L-1".into(),
        product: "sku-pro".into(),
        instance: "inst-1".into(),
        unbound: false,
        devices: vec!["AAAA-BBBB-CCCC-DDDD-EEEE".into()],
        not_before: 1_800_000_000,
        not_after: Some(1_800_000_000 + 30 * 86_400),
        grace_secs: 7 * 86_400,
        features: vec!["export".into(), "sso".into()],
        limits: [("cores".to_string(), 8u64), ("users".into(), 100)]
            .into_iter()
            .collect(),
        issued_at: 1_799_999_000,
        meta: [("order".to_string(), "CS123".to_string())]
            .into_iter()
            .collect(),
    }
}

/// A device code with a valid check symbol, starting with `prefix` (4 symbols).
pub fn test_code(prefix: &str) -> String {
    "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
        .chars()
        .map(|c| format!("{prefix}-EFGH-JKMN-PQRS-TVW{c}"))
        .find(|c| crate::device_code::parse_code(c).is_ok())
        .expect("one check symbol fits")
}
