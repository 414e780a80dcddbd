//! Pure normalisation of raw identifier values: placeholders, UUIDs, MACs, `/proc` text formats.

/// Vendor filler strings found in DMI / device-tree fields instead of a real value
/// (compared case-insensitively after trimming).
const PLACEHOLDERS: &[&str] = &[
    "",
    "none",
    "null",
    "n/a",
    "na",
    "unknown",
    "empty",
    "default string",
    "not specified",
    "not applicable",
    "not available",
    "not present",
    "to be filled by o.e.m.",
    "to be filled by oem",
    "o.e.m.",
    "oem",
    "system serial number",
    "base board serial number",
    "chassis serial number",
    "serial number",
    "123456789",
    "1234567890",
    "0123456789",
    "xxxxxxxxxx",
];

/// True when `value` is a vendor placeholder rather than a real identifier: one of the known
/// filler strings, or made only of one repeated character ignoring separators (`0`, `00000000`,
/// `FFFFFFFF-FFFF-…`, `----`, `....`).
pub fn is_placeholder(value: &str) -> bool {
    let v = value.trim();
    let lower = v.to_ascii_lowercase();
    if PLACEHOLDERS.contains(&lower.as_str()) {
        return true;
    }
    let mut significant = lower
        .chars()
        .filter(|c| !matches!(c, '-' | ':' | ' ' | '.'));
    match significant.next() {
        None => true,
        Some(first) => significant.all(|c| c == first) && matches!(first, '0' | 'f' | 'x'),
    }
}

/// Trims whitespace and trailing NULs (device-tree strings are NUL-terminated).
pub fn clean(raw: &str) -> String {
    raw.trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

/// Parses 32 hex digits (hyphens, braces and whitespace ignored) into 16 bytes.
fn uuid_bytes(value: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = value
        .bytes()
        .filter(|b| !matches!(b, b'-' | b'{' | b'}') && !b.is_ascii_whitespace())
        .collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn uuid_string(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Swaps the byte order of the first three UUID fields (4, 2 and 2 bytes): the difference between
/// the SMBIOS < 2.6 (big-endian) and ≥ 2.6 (little-endian) encodings that VMware exposes.
fn byteswap_uuid(b: &[u8; 16]) -> [u8; 16] {
    let mut s = *b;
    s[0..4].reverse();
    s[4..6].reverse();
    s[6..8].reverse();
    s
}

/// Normalises a DMI product UUID: lowercase, hyphenated, and invariant to the byte-swapped form
/// (the smaller of the two renderings is kept). Values that are not 32 hex digits are kept as
/// trimmed lowercase text. Returns `None` for placeholders (empty, all-zero, all-F).
pub fn normalize_uuid(raw: &str) -> Option<String> {
    let v = clean(raw);
    if is_placeholder(&v) {
        return None;
    }
    match uuid_bytes(&v) {
        Some(b) => {
            let a = uuid_string(&b);
            let s = uuid_string(&byteswap_uuid(&b));
            Some(a.min(s))
        }
        None => Some(v.to_ascii_lowercase()),
    }
}

/// Normalises a MAC address to lowercase; `None` for an all-zero or empty address.
pub fn normalize_mac(raw: &str) -> Option<String> {
    let v = clean(raw).to_ascii_lowercase();
    if v.is_empty() || v.chars().all(|c| c == '0' || c == ':') {
        return None;
    }
    Some(v)
}

/// Collapses runs of whitespace into single spaces.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// CPU identity (vendor and brand, no core count) from `/proc/cpuinfo` text.
///
/// x86: `vendor_id` + `model name`. ARM: `CPU implementer` + the sorted set of `CPU part`s
/// (big.LITTLE systems list several). Others: `vendor_id`/`uarch`/`cpu model`/`Processor`
/// as found. Returns `None` when nothing identifying is present.
pub fn cpu_from_cpuinfo(text: &str) -> Option<String> {
    let mut vendor: Option<String> = None;
    let mut brand: Option<String> = None;
    let mut parts: Vec<String> = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        let value = squash(value);
        if value.is_empty() {
            continue;
        }
        match key {
            "vendor_id" | "CPU implementer" | "mvendorid" if vendor.is_none() => {
                vendor = Some(value)
            }
            "model name" | "cpu model" | "uarch" | "Processor" | "cpu" if brand.is_none() => {
                brand = Some(value)
            }
            "CPU part" if !parts.contains(&value) => parts.push(value),
            _ => {}
        }
    }
    if !parts.is_empty() {
        parts.sort();
        let parts = format!("part {}", parts.join(","));
        brand = Some(match brand {
            Some(b) => format!("{b} {parts}"),
            None => parts,
        });
    }
    match (vendor, brand) {
        (None, None) => None,
        (v, b) => Some(format!(
            "{}\n{}",
            v.unwrap_or_default(),
            b.unwrap_or_default()
        )),
    }
}

/// The root mount in `/proc/self/mountinfo` text: `(major:minor, source)`. The last `/` entry
/// wins (later mounts stack on top of earlier ones).
pub fn root_mount(mountinfo: &str) -> Option<(String, String)> {
    let mut found = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split_whitespace().collect();
        if fields.len() < 5 || fields[4] != "/" {
            continue;
        }
        let mut r = right.split_whitespace();
        let _fstype = r.next();
        let source = r.next().unwrap_or("").to_string();
        found = Some((fields[2].to_string(), source));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        for p in [
            "",
            "  ",
            "None",
            "To be filled by O.E.M.",
            "Default string",
            "Not Specified",
            "0",
            "00000000",
            "00000000-0000-0000-0000-000000000000",
            "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
            "ffffffff",
            "....",
        ] {
            assert!(is_placeholder(p), "{p:?} should be a placeholder");
        }
        for real in ["PF2ABCDE", "1", "0000000a", "VMware-56 4d", "L1HF95S00XY"] {
            assert!(!is_placeholder(real), "{real:?} is real");
        }
    }

    #[test]
    fn uuid_normalisation_is_byteswap_invariant() {
        let be = "4C4C4544-0042-3510-8052-B4C04F4E4E32";
        let le = "44454C4C-4200-1035-8052-b4c04f4e4e32";
        assert_eq!(normalize_uuid(be), normalize_uuid(le));
        assert_eq!(
            normalize_uuid(be).unwrap(),
            "44454c4c-4200-1035-8052-b4c04f4e4e32"
        );
        assert_eq!(
            normalize_uuid("{4c4c4544004235108052b4c04f4e4e32}\n"),
            normalize_uuid(be)
        );
        assert_eq!(normalize_uuid("00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(normalize_uuid("ffffffff-ffff-ffff-ffff-ffffffffffff"), None);
        assert_eq!(normalize_uuid("Not Settable"), Some("not settable".into()));
        assert_ne!(
            normalize_uuid("4C4C4544-0042-3510-8052-B4C04F4E4E33"),
            normalize_uuid(be)
        );
    }

    #[test]
    fn cpuinfo_x86_and_arm() {
        let x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)  Gold 6278C CPU @ 2.60GHz\ncpu cores\t: 2\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6278C CPU @ 2.60GHz\n";
        assert_eq!(
            cpu_from_cpuinfo(x86).unwrap(),
            "GenuineIntel\nIntel(R) Xeon(R) Gold 6278C CPU @ 2.60GHz"
        );
        let arm = "processor\t: 0\nBogoMIPS\t: 200.00\nCPU implementer\t: 0x48\nCPU part\t: 0xd01\n\nprocessor\t: 1\nCPU implementer\t: 0x48\nCPU part\t: 0xd01\n";
        assert_eq!(cpu_from_cpuinfo(arm).unwrap(), "0x48\npart 0xd01");
        assert_eq!(cpu_from_cpuinfo(""), None);
    }

    #[test]
    fn mountinfo_root() {
        let mi = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                  25 22 0:5 / /dev rw - devtmpfs udev rw\n";
        assert_eq!(root_mount(mi), Some(("8:1".into(), "/dev/sda1".into())));
        let overlay = "600 500 0:52 / / rw - overlay overlay rw,lowerdir=/x\n";
        assert_eq!(root_mount(overlay), Some(("0:52".into(), "overlay".into())));
        assert_eq!(root_mount("garbage\n"), None);
    }

    #[test]
    fn macs() {
        assert_eq!(
            normalize_mac("FA:16:3E:00:11:22\n").unwrap(),
            "fa:16:3e:00:11:22"
        );
        assert_eq!(normalize_mac("00:00:00:00:00:00"), None);
        assert_eq!(normalize_mac(""), None);
    }
}
