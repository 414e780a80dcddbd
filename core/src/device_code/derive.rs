//! Keyed hashing: component hashes and the device code itself. Pure logic, no I/O.
//!
//! Byte-exact definitions (also in docs/device-code.md):
//!
//! ```text
//! component_hash(name, value) = hex(HMAC-SHA256(key = product_id, msg = "kooagent/component/v1/" name "\n" value))[..16]
//! code_bytes = HMAC-SHA256(key = product_id, msg = "kooagent/device-code/v1\n" { name "=" hash "\n" } )
//! ```
//!
//! where the `{ … }` lines list the identity components that have a hash, in [`code_order`] order.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::encode;

type HmacSha256 = Hmac<Sha256>;

/// Hex characters kept of each component hash (64 bits).
pub const COMPONENT_HASH_HEX: usize = 16;

fn hmac(key: &str, msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keyed, domain-separated hash of one raw identifier value (16 lowercase hex chars).
pub fn component_hash(product_id: &str, name: &str, value: &str) -> String {
    let mut msg = Vec::with_capacity(32 + name.len() + value.len());
    msg.extend_from_slice(b"kooagent/component/v1/");
    msg.extend_from_slice(name.as_bytes());
    msg.push(b'\n');
    msg.extend_from_slice(value.as_bytes());
    let mut h = hex(&hmac(product_id, &msg));
    h.truncate(COMPONENT_HASH_HEX);
    h
}

/// Built-in identity-class component names, in the order they enter the code. Vendor sources
/// (`vendor.<name>`) follow, sorted by name.
pub const IDENTITY_ORDER: &[&str] = &[
    "machine_id",
    "dmi_product_uuid",
    "board_serial",
    "devicetree_serial",
    "instance_id",
];

/// Position of a component name in the code message (`None`: never part of the code).
pub fn code_order(name: &str) -> Option<(usize, &str)> {
    if let Some(i) = IDENTITY_ORDER.iter().position(|n| *n == name) {
        return Some((i, ""));
    }
    name.strip_prefix("vendor.")
        .map(|v| (IDENTITY_ORDER.len(), v))
}

/// The device code for a set of identity components `(name, hash)`. Order of the input does not
/// matter: it is sorted by [`code_order`] here.
pub fn device_code(product_id: &str, identity: &[(&str, &str)]) -> String {
    let mut items: Vec<(&str, &str)> = identity
        .iter()
        .copied()
        .filter(|(n, _)| code_order(n).is_some())
        .collect();
    items.sort_by(|a, b| code_order(a.0).cmp(&code_order(b.0)));
    let mut msg = b"kooagent/device-code/v1\n".to_vec();
    for (name, hash) in items {
        msg.extend_from_slice(name.as_bytes());
        msg.push(b'=');
        msg.extend_from_slice(hash.as_bytes());
        msg.push(b'\n');
    }
    encode::format_code(&hmac(product_id, &msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            hex(&hmac("Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn component_hash_is_keyed_and_domain_separated() {
        let a = component_hash("prod-a", "machine_id", "abc");
        assert_eq!(a.len(), COMPONENT_HASH_HEX);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(a, component_hash("prod-a", "machine_id", "abc"));
        assert_ne!(a, component_hash("prod-b", "machine_id", "abc"));
        assert_ne!(a, component_hash("prod-a", "board_serial", "abc"));
        assert_ne!(a, component_hash("prod-a", "machine_id", "abd"));
    }

    #[test]
    fn code_is_order_independent_and_ignores_drift_components() {
        let a = device_code("p", &[("machine_id", "1111"), ("dmi_product_uuid", "2222")]);
        let b = device_code("p", &[("dmi_product_uuid", "2222"), ("machine_id", "1111")]);
        assert_eq!(a, b);
        let c = device_code(
            "p",
            &[
                ("dmi_product_uuid", "2222"),
                ("machine_id", "1111"),
                ("cpu", "x"),
            ],
        );
        assert_eq!(a, c);
        let d = device_code(
            "p",
            &[("machine_id", "1111"), ("vendor.b", "3"), ("vendor.a", "4")],
        );
        let e = device_code(
            "p",
            &[("vendor.a", "4"), ("machine_id", "1111"), ("vendor.b", "3")],
        );
        assert_eq!(d, e);
        assert_eq!(encode::parse_code(&a).unwrap(), a);
    }

    #[test]
    fn two_products_give_uncorrelated_codes() {
        // Same machine, 64 products: all codes distinct, and symbols agree by position at
        // roughly chance level (1/32), i.e. nothing links them.
        let codes: Vec<String> = (0..64)
            .map(|i| {
                let pid = format!("product-{i}");
                let h = component_hash(&pid, "machine_id", "0123456789abcdef0123456789abcdef");
                device_code(&pid, &[("machine_id", &h)])
            })
            .collect();
        let distinct: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(distinct.len(), codes.len());
        let mut same = 0usize;
        let mut total = 0usize;
        for w in codes.windows(2) {
            for (x, y) in w[0].chars().zip(w[1].chars()) {
                if x != '-' {
                    total += 1;
                    same += usize::from(x == y);
                }
            }
        }
        // Expected ≈ total/32 ≈ 39; a correlated scheme would be far above.
        assert!(same < total / 10, "{same}/{total} symbols agree");
    }
}
