//! Usage amounts as fixed-point decimals: an `i128` count of 10^-9 units. Binary floats
//! would drift when thousands of small values are summed into an hour; integers do not.
//! The marketplace takes at most 4 decimals, so hourly totals are cut to 10^-4 and the
//! rest is carried into the next hour (see `hours.rs`), never lost.

use std::fmt;

/// Internal units per 1.
pub const SCALE: i128 = 1_000_000_000;
/// Internal units per 10^-4, the marketplace's resolution.
pub const WIRE_UNIT: i128 = 100_000;
/// Digits after the point accepted on input.
pub const MAX_FRACTION_DIGITS: usize = 9;
/// The largest `usage_value` the marketplace takes (Double(12,4) on the intl page):
/// 99,999,999.9999. A single record above it is refused; an hour above it sends this much
/// and carries the rest.
pub const MAX_WIRE: i128 = 99_999_999 * SCALE + 9_999 * WIRE_UNIT;

/// A usage amount in 10^-9 units. Always positive when it comes from [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Amount(pub i128);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalError {
    #[error("is empty")]
    Empty,
    #[error("is negative; usage values must be greater than zero")]
    Negative,
    #[error("is zero; usage values must be greater than zero")]
    Zero,
    #[error("{0:?} is not a number")]
    NotANumber(String),
    #[error("{0:?} uses exponent notation; write it as a plain decimal such as \"0.000001\"")]
    Exponent(String),
    #[error("{0:?} has more than {MAX_FRACTION_DIGITS} digits after the decimal point")]
    TooPrecise(String),
    #[error("{0:?} is larger than the marketplace's maximum of 99999999.9999 for one record")]
    TooLarge(String),
}

/// Parses a plain decimal such as `"12"`, `"0.5"` or `"1.234567891"`.
pub fn parse(s: &str) -> Result<Amount, DecimalError> {
    if s.is_empty() {
        return Err(DecimalError::Empty);
    }
    if s.starts_with('-') {
        return Err(DecimalError::Negative);
    }
    let lower = s.to_ascii_lowercase();
    if lower.contains("nan") || lower.contains("inf") {
        return Err(DecimalError::NotANumber(s.into()));
    }
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || !frac.is_none_or(all_digits) {
        if s.bytes().any(|b| b == b'e' || b == b'E')
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b"eE.+-".contains(&b))
        {
            return Err(DecimalError::Exponent(s.into()));
        }
        return Err(DecimalError::NotANumber(s.into()));
    }
    let frac = frac.unwrap_or("");
    if int.is_empty() && frac.is_empty() {
        return Err(DecimalError::NotANumber(s.into()));
    }
    if frac.len() > MAX_FRACTION_DIGITS {
        return Err(DecimalError::TooPrecise(s.into()));
    }
    let int = int.trim_start_matches('0');
    // Anything with more integer digits than the maximum is too large; this also keeps
    // the arithmetic below far from overflow.
    if int.len() > 8 {
        return Err(DecimalError::TooLarge(s.into()));
    }
    let mut units: i128 = if int.is_empty() {
        0
    } else {
        int.parse::<i128>().expect("checked digits") * SCALE
    };
    if !frac.is_empty() {
        let f: i128 = frac.parse().expect("checked digits");
        units += f * 10i128.pow((MAX_FRACTION_DIGITS - frac.len()) as u32);
    }
    if units == 0 {
        return Err(DecimalError::Zero);
    }
    if units > MAX_WIRE {
        return Err(DecimalError::TooLarge(s.into()));
    }
    Ok(Amount(units))
}

/// Parses a JSON value: a string (preferred: exact) or a number. Numbers that are not
/// integers reach us as binary floats; their shortest decimal form (what the sender most
/// likely wrote) is what is parsed.
pub fn parse_json(v: &serde_json::Value) -> Result<Amount, DecimalError> {
    match v {
        serde_json::Value::String(s) => parse(s),
        serde_json::Value::Number(n) => parse(&n.to_string()),
        other => Err(DecimalError::NotANumber(other.to_string())),
    }
}

impl Amount {
    /// Splits into what the marketplace can take (a multiple of 10^-4, at most
    /// [`MAX_WIRE`]) and the remainder to carry.
    pub fn split_wire(self) -> (Amount, Amount) {
        let wire = (self.0 - self.0.rem_euclid(WIRE_UNIT)).clamp(0, MAX_WIRE);
        (Amount(wire), Amount(self.0 - wire))
    }

    /// The marketplace's form: at most 4 decimals, no trailing zeros (`"99"`, `"1.2345"`).
    /// Digits below 10^-4 are cut; callers send only [`split_wire`](Self::split_wire) values.
    pub fn to_wire(self) -> String {
        let v = self.0 - self.0.rem_euclid(WIRE_UNIT);
        format_units(v, 4)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

/// Full precision, no trailing zeros.
impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_units(self.0, MAX_FRACTION_DIGITS))
    }
}

fn format_units(v: i128, digits: usize) -> String {
    let sign = if v < 0 { "-" } else { "" };
    let v = v.unsigned_abs();
    let int = v / SCALE as u128;
    let frac = v % SCALE as u128;
    let frac = format!("{frac:09}");
    let frac = frac[..digits].trim_end_matches('0');
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 32-bit hazards (run on armv7 under qemu by scripts/cross-test.sh): amounts past
    /// 2^32 and 2^53 units stay exact (i128 arithmetic is software on 32-bit targets).
    #[test]
    fn word_size_amounts_stay_exact() {
        let max = parse("99999999.9999").unwrap();
        assert_eq!(max.0, 99_999_999_999_900_000);
        assert!(max.0 > 1 << 53);
        assert_eq!(max.to_string(), "99999999.9999");
        assert_eq!(max.to_wire(), "99999999.9999");
        let past_u32 = parse("4.294967297").unwrap();
        assert_eq!(past_u32.0, (1i128 << 32) + 1);
        assert_eq!(past_u32.to_string(), "4.294967297");
        let (wire, rest) = Amount(max.0 + 12_345).split_wire();
        assert_eq!((wire, rest), (max, Amount(12_345)));
        let sum: i128 = (0..1000).map(|_| parse("0.0001").unwrap().0).sum();
        assert_eq!(Amount(sum).to_wire(), "0.1");
        assert_eq!(
            parse_json(&serde_json::json!(12_345_678u64)).unwrap().0,
            12_345_678 * SCALE
        );
    }

    #[test]
    fn parses_plain_decimals_exactly() {
        assert_eq!(parse("1").unwrap(), Amount(SCALE));
        assert_eq!(parse("0.5").unwrap(), Amount(SCALE / 2));
        assert_eq!(parse(".25").unwrap(), Amount(SCALE / 4));
        assert_eq!(parse("3.").unwrap(), Amount(3 * SCALE));
        assert_eq!(parse("0.000000001").unwrap(), Amount(1));
        assert_eq!(parse("007.10").unwrap(), Amount(7 * SCALE + SCALE / 10));
        assert_eq!(parse("99999999.9999").unwrap(), Amount(MAX_WIRE));
        // Ten thousand tenths sum to exactly one thousand: no float drift.
        let tenth = parse("0.1").unwrap().0;
        assert_eq!((0..10_000).map(|_| tenth).sum::<i128>(), 1000 * SCALE);
    }

    #[test]
    fn refuses_bad_values_with_the_reason() {
        assert_eq!(parse("-1"), Err(DecimalError::Negative));
        assert_eq!(parse("0"), Err(DecimalError::Zero));
        assert_eq!(parse("0.000"), Err(DecimalError::Zero));
        assert_eq!(parse(""), Err(DecimalError::Empty));
        assert!(matches!(parse("NaN"), Err(DecimalError::NotANumber(_))));
        assert!(matches!(parse("inf"), Err(DecimalError::NotANumber(_))));
        assert!(matches!(parse("1e5"), Err(DecimalError::Exponent(_))));
        assert!(matches!(parse("1.5E-3"), Err(DecimalError::Exponent(_))));
        assert!(matches!(parse("1.2.3"), Err(DecimalError::NotANumber(_))));
        assert!(matches!(parse(" 1"), Err(DecimalError::NotANumber(_))));
        assert!(matches!(parse("+1"), Err(DecimalError::NotANumber(_))));
        assert!(matches!(parse("."), Err(DecimalError::NotANumber(_))));
        assert!(matches!(
            parse("0.0000000001"),
            Err(DecimalError::TooPrecise(_))
        ));
        assert!(matches!(parse("100000000"), Err(DecimalError::TooLarge(_))));
        assert!(matches!(
            parse("99999999.99991"),
            Err(DecimalError::TooLarge(_))
        ));
        assert!(parse("-1").unwrap_err().to_string().contains("negative"));
    }

    #[test]
    fn json_numbers_and_strings() {
        use serde_json::json;
        assert_eq!(parse_json(&json!(2)).unwrap(), Amount(2 * SCALE));
        assert_eq!(parse_json(&json!(0.1)).unwrap(), Amount(SCALE / 10));
        assert_eq!(parse_json(&json!("0.1")).unwrap(), Amount(SCALE / 10));
        assert_eq!(parse_json(&json!(-3)), Err(DecimalError::Negative));
        assert!(parse_json(&json!(null)).is_err());
        assert!(matches!(
            parse_json(&json!(1e-7)),
            Err(DecimalError::Exponent(_))
        ));
    }

    #[test]
    fn wire_form_cuts_to_four_decimals_and_carries_the_rest() {
        let a = parse("1.23456789").unwrap();
        let (wire, rest) = a.split_wire();
        assert_eq!(wire.to_wire(), "1.2345");
        assert_eq!(rest, Amount(67_890));
        assert_eq!(Amount(wire.0 + rest.0), a);
        assert_eq!(parse("99").unwrap().to_wire(), "99");
        assert_eq!(parse("0.5").unwrap().to_wire(), "0.5");
        let (w, r) = parse("0.00001").unwrap().split_wire();
        assert!(w.is_zero());
        assert_eq!(r, Amount(10_000));
        let big = Amount(MAX_WIRE * 3 + 5);
        let (w, r) = big.split_wire();
        assert_eq!(w, Amount(MAX_WIRE));
        assert_eq!(r, Amount(MAX_WIRE * 2 + 5));
        assert_eq!(Amount(MAX_WIRE).to_wire(), "99999999.9999");
        assert_eq!(Amount(1_500_000_001).to_string(), "1.500000001");
    }
}
