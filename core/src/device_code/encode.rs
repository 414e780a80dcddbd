//! Human-typable form of the device code: Crockford base32 with a GF(32) check symbol.
//!
//! A code is 19 data symbols (95 bits) plus 1 check symbol, shown as five groups of four:
//! `XXXX-XXXX-XXXX-XXXX-XXXC`. Pure logic, no I/O.
//!
//! # The check symbol
//!
//! Every symbol is read as an element of GF(2^5) (its 5-bit value, polynomial basis) with the
//! field built on the primitive polynomial `x^5 + x^2 + 1`, and `α = x` (value 2). The check is
//!
//! ```text
//! c = Σ_{i=0..18} d_i · α^(i+1)
//! ```
//!
//! Because addition in GF(2^5) is XOR (characteristic 2), a complete code `s_0..s_19`
//! (`s_19 = c`) satisfies the linear equation `Σ_{i=0..19} s_i · w_i = 0` with weights
//! `w_i = α^(i+1)` for `i < 19` and `w_19 = 1 = α^0`.
//!
//! *Single substitution.* Replacing `s_j` by `s_j + e` (`e ≠ 0`) changes the sum by `e · w_j`.
//! A field has no zero divisors and every weight is a power of `α`, hence non-zero, so the sum
//! becomes non-zero: detected.
//!
//! *Transposition.* Swapping `s_j = a` and `s_k = b` (`a ≠ b`) changes the sum by
//! `a·w_j + b·w_k + b·w_j + a·w_k = (a + b)(w_j + w_k)`. `a + b ≠ 0` since `a ≠ b`, and
//! `w_j + w_k ≠ 0` iff `w_j ≠ w_k`. `α` is primitive, so its powers `α^0 .. α^30` are pairwise
//! distinct; the 20 weights are `α^1 .. α^19` and `α^0`, all distinct. Therefore every
//! transposition of two different symbols is detected — adjacent ones (including data/check at
//! positions 18/19) and, as a bonus, non-adjacent ones too.
//!
//! Crockford's own mod-37 check was not used: its extra symbols `*~$=U` are awkward to type and
//! to read aloud. `tests::exhaustive_*` check both properties over every error pattern (the code
//! is linear, so detection depends only on the error, not on the code word it hits).

/// Crockford base32 alphabet (no I, L, O, U).
pub const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Number of data symbols.
pub const DATA_SYMBOLS: usize = 19;
/// Number of data bits carried by a code (19 × 5).
pub const DATA_BITS: usize = DATA_SYMBOLS * 5;
/// Length of a formatted code: 20 symbols + 4 hyphens.
pub const CODE_LEN: usize = 24;

/// Why a typed code was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// A character that is not a Crockford symbol, hyphen or space.
    #[error("invalid character {ch:?} at position {pos}: a device code uses 0-9 and A-Z without I, L, O, U")]
    InvalidChar { ch: char, pos: usize },
    /// Not 20 symbols once hyphens and spaces are removed.
    #[error("a device code has 20 symbols (XXXX-XXXX-XXXX-XXXX-XXXX), found {found}")]
    WrongLength { found: usize },
    /// The check symbol does not match: a symbol was mistyped or two were swapped.
    #[error("check symbol mismatch: expected {expected}, found {found}; a symbol is mistyped or two are swapped")]
    BadCheck { expected: char, found: char },
}

/// Multiplication in GF(2^5) modulo x^5 + x^2 + 1.
pub(crate) fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut r = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            r ^= a;
        }
        b >>= 1;
        a <<= 1;
        if a & 0x20 != 0 {
            a ^= 0b10_0101;
        }
    }
    r & 0x1f
}

/// `α^n` with `α = x`.
pub(crate) fn alpha_pow(n: usize) -> u8 {
    let mut r = 1u8;
    for _ in 0..(n % 31) {
        r = gf_mul(r, 2);
    }
    r
}

/// Check symbol value for 19 data symbol values (each < 32).
pub(crate) fn check_symbol(data: &[u8; DATA_SYMBOLS]) -> u8 {
    data.iter()
        .enumerate()
        .fold(0u8, |acc, (i, &d)| acc ^ gf_mul(d & 0x1f, alpha_pow(i + 1)))
}

/// Formats the first 95 bits of `bytes` (big-endian bit order) as a code with its check symbol.
///
/// # Panics
/// Never for `bytes.len() >= 12`; callers pass a 32-byte HMAC output.
pub(crate) fn format_code(bytes: &[u8]) -> String {
    debug_assert!(bytes.len() * 8 >= DATA_BITS);
    let mut data = [0u8; DATA_SYMBOLS];
    for (i, d) in data.iter_mut().enumerate() {
        let mut v = 0u8;
        for bit in i * 5..i * 5 + 5 {
            let byte = bytes.get(bit / 8).copied().unwrap_or(0);
            v = (v << 1) | ((byte >> (7 - bit % 8)) & 1);
        }
        *d = v;
    }
    let check = check_symbol(&data);
    let mut symbols: Vec<u8> = data.to_vec();
    symbols.push(check);
    group(&symbols)
}

fn group(symbols: &[u8]) -> String {
    let mut out = String::with_capacity(CODE_LEN);
    for (i, &s) in symbols.iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push('-');
        }
        out.push(ALPHABET[usize::from(s & 0x1f)] as char);
    }
    out
}

/// Value of one typed character, with Crockford's reading rules (lowercase, I/L → 1, O → 0).
fn symbol_value(c: char) -> Option<u8> {
    let c = match c.to_ascii_uppercase() {
        'I' | 'L' => '1',
        'O' => '0',
        c => c,
    };
    ALPHABET
        .iter()
        .position(|&a| a as char == c)
        .map(|p| p as u8)
}

/// Parses a typed device code and returns its canonical form `XXXX-XXXX-XXXX-XXXX-XXXX`.
///
/// Accepts lowercase, `I`/`L` for `1`, `O` for `0`, and ignores hyphens and spaces anywhere.
pub fn parse_code(s: &str) -> Result<String, CodeError> {
    let mut symbols = Vec::with_capacity(DATA_SYMBOLS + 1);
    for (pos, ch) in s.chars().enumerate() {
        if ch == '-' || ch.is_whitespace() {
            continue;
        }
        match symbol_value(ch) {
            Some(v) => symbols.push(v),
            None => return Err(CodeError::InvalidChar { ch, pos }),
        }
    }
    if symbols.len() != DATA_SYMBOLS + 1 {
        return Err(CodeError::WrongLength {
            found: symbols.len(),
        });
    }
    let mut data = [0u8; DATA_SYMBOLS];
    data.copy_from_slice(&symbols[..DATA_SYMBOLS]);
    let expected = check_symbol(&data);
    let found = symbols[DATA_SYMBOLS];
    if expected != found {
        return Err(CodeError::BadCheck {
            expected: ALPHABET[usize::from(expected)] as char,
            found: ALPHABET[usize::from(found)] as char,
        });
    }
    Ok(group(&symbols))
}

/// The one comparison form of a device code, as buyers and sellers type it (case, spaces
/// and hyphens do not matter): a valid code's canonical form ([`parse_code`]); anything
/// else (a code from another scheme in a license's `devices`) upper-cased with spaces and
/// hyphens removed. The agent, the seller tools and the seller server compare codes only
/// through this.
pub fn canonical(s: &str) -> String {
    parse_code(s).unwrap_or_else(|_| {
        s.chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .flat_map(char::to_uppercase)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weight of position `i` in the full 20-symbol code word.
    fn weight(i: usize) -> u8 {
        if i < DATA_SYMBOLS {
            alpha_pow(i + 1)
        } else {
            1
        }
    }

    fn sample_codes() -> Vec<String> {
        (0u8..8)
            .map(|seed| {
                let bytes: Vec<u8> = (0..32u8)
                    .map(|i| i.wrapping_mul(37).wrapping_add(seed.wrapping_mul(101)))
                    .collect();
                format_code(&bytes)
            })
            .collect()
    }

    #[test]
    fn canonical_ignores_case_spaces_and_hyphens() {
        for code in sample_codes() {
            let typed = format!(" {} ", code.to_lowercase().replace('-', " - "));
            assert_eq!(canonical(&typed), code);
            assert_eq!(canonical(&code.replace('-', "")), code);
            assert_eq!(canonical(&code.replace('-', "--")), code);
        }
        assert_eq!(
            canonical("node-1111 1111-1111-1111"),
            "NODE1111111111111111"
        );
        assert_eq!(canonical("NODE11111111-11111111"), "NODE1111111111111111");
    }

    #[test]
    fn field_is_gf32_with_primitive_alpha() {
        // α has order 31: all powers α^0..α^30 distinct and non-zero.
        let mut seen = std::collections::HashSet::new();
        for n in 0..31 {
            let p = alpha_pow(n);
            assert_ne!(p, 0);
            assert!(seen.insert(p), "α^{n} repeats");
        }
        assert_eq!(alpha_pow(31), 1);
        // Every non-zero element has an inverse (no zero divisors).
        for a in 1..32u8 {
            assert!((1..32u8).any(|b| gf_mul(a, b) == 1), "{a} has no inverse");
        }
        // α^5 = α^2 + 1 (the defining polynomial).
        assert_eq!(alpha_pow(5), 0b00101);
    }

    #[test]
    fn exhaustive_single_substitution_detected() {
        for j in 0..=DATA_SYMBOLS {
            for e in 1..32u8 {
                assert_ne!(gf_mul(e, weight(j)), 0, "error {e} at {j} undetected");
            }
        }
        // And on concrete codes, through the parser.
        for code in sample_codes() {
            let symbols: Vec<char> = code.chars().filter(|&c| c != '-').collect();
            for j in 0..symbols.len() {
                for &alt in ALPHABET.iter() {
                    let alt = alt as char;
                    if alt == symbols[j] {
                        continue;
                    }
                    let mut typed = symbols.clone();
                    typed[j] = alt;
                    let typed: String = typed.into_iter().collect();
                    assert!(
                        matches!(parse_code(&typed), Err(CodeError::BadCheck { .. })),
                        "{typed} accepted (from {code})"
                    );
                }
            }
        }
    }

    #[test]
    fn exhaustive_adjacent_transposition_detected() {
        for j in 0..DATA_SYMBOLS {
            for a in 0..32u8 {
                for b in 0..32u8 {
                    if a == b {
                        continue;
                    }
                    let delta = gf_mul(a, weight(j))
                        ^ gf_mul(b, weight(j + 1))
                        ^ gf_mul(b, weight(j))
                        ^ gf_mul(a, weight(j + 1));
                    assert_ne!(delta, 0, "swap of {a},{b} at {j} undetected");
                }
            }
        }
        // Bonus: all 20 weights are distinct, so any transposition is detected.
        let weights: std::collections::HashSet<u8> = (0..=DATA_SYMBOLS).map(weight).collect();
        assert_eq!(weights.len(), DATA_SYMBOLS + 1);
        for code in sample_codes() {
            let symbols: Vec<char> = code.chars().filter(|&c| c != '-').collect();
            for j in 0..symbols.len() - 1 {
                if symbols[j] == symbols[j + 1] {
                    continue;
                }
                let mut typed = symbols.clone();
                typed.swap(j, j + 1);
                let typed: String = typed.into_iter().collect();
                assert!(parse_code(&typed).is_err(), "{typed} accepted");
            }
        }
    }

    #[test]
    fn format_and_parse_round_trip() {
        for code in sample_codes() {
            assert_eq!(code.len(), CODE_LEN);
            assert_eq!(code.matches('-').count(), 4);
            assert_eq!(parse_code(&code).unwrap(), code);
            assert_eq!(parse_code(&code.to_lowercase()).unwrap(), code);
            let spaced = code.replace('-', " ");
            assert_eq!(parse_code(&spaced).unwrap(), code);
            let squashed = code.replace('-', "");
            assert_eq!(parse_code(&squashed).unwrap(), code);
        }
    }

    #[test]
    fn confusable_letters_are_read_as_digits() {
        let code = format_code(&[0u8; 32]);
        assert_eq!(code, "0000-0000-0000-0000-0000");
        assert_eq!(parse_code("oooo-OOOO-0o0O-0000-0000").unwrap(), code);
        let ones = {
            let mut data = [1u8; DATA_SYMBOLS];
            data[0] = 1;
            let mut s: Vec<u8> = data.to_vec();
            s.push(check_symbol(&data));
            group(&s)
        };
        let typed: String = ones
            .chars()
            .enumerate()
            .map(|(i, c)| match (c, i % 3) {
                ('1', 0) => 'I',
                ('1', 1) => 'l',
                (c, _) => c,
            })
            .collect();
        assert_eq!(parse_code(&typed).unwrap(), ones);
    }

    #[test]
    fn clear_errors() {
        assert_eq!(
            parse_code("ABCD-EFGH-JKMN-PQRS-TVWU"),
            Err(CodeError::InvalidChar { ch: 'U', pos: 23 })
        );
        assert_eq!(
            parse_code("ABCD-EFGH"),
            Err(CodeError::WrongLength { found: 8 })
        );
        assert!(parse_code("").is_err());
        let code = sample_codes().remove(0);
        let mut typed: Vec<char> = code.chars().collect();
        let last = typed.len() - 1;
        typed[last] = if typed[last] == 'A' { 'B' } else { 'A' };
        let err = parse_code(&typed.into_iter().collect::<String>()).unwrap_err();
        assert!(matches!(err, CodeError::BadCheck { .. }));
        assert!(err.to_string().contains("check symbol mismatch"));
    }
}
