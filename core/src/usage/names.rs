//! The marketplace's identifier rules, shared by the agent's `[usage]` configuration and
//! the usage relay's record checks.

/// An instance id, `metering_sn` or package instance: 1..64 printable ASCII characters.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// A meter name: 1..64 letters, digits, `_ - . :`.
pub fn valid_meter_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
}
