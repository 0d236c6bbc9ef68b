//! Payment card numbers and card verification codes.
//!
//! [`Pan`] holds the digits of a primary account number in a fixed inline
//! buffer that is wiped on drop. It never prints its digits: `Debug` and
//! `Display` show the masked form (last four, PCI DSS 3.4.1). The digits come
//! out only through [`Pan::expose_digits`].
//!
//! [`Cvv`] holds a card verification code. It cannot be cloned, serialized or
//! stored by any API of this crate, and it is consumed by the one call that
//! reads it ([`Cvv::use_once`]) (PCI DSS 3.3.1.2).

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::PanError;

/// Longest PAN allowed by ISO/IEC 7812.
pub const MAX_PAN_DIGITS: usize = 19;
/// Default shortest PAN accepted by [`Pan::parse`].
pub const DEFAULT_MIN_PAN_DIGITS: usize = 12;
/// Shortest minimum that [`PanRules::with_min_digits`] allows.
pub const ABSOLUTE_MIN_PAN_DIGITS: usize = 8;

/// Rules for parsing a PAN: today only the minimum length.
///
/// ISO/IEC 7812 PANs are 8 to 19 digits; card brands issue 12 to 19. The
/// default minimum is 12.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PanRules {
    min_digits: usize,
}

impl Default for PanRules {
    fn default() -> Self {
        Self {
            min_digits: DEFAULT_MIN_PAN_DIGITS,
        }
    }
}

impl PanRules {
    /// Rules that accept PANs of `min_digits` to 19 digits.
    ///
    /// # Errors
    ///
    /// [`PanError::InvalidRule`] if `min_digits` is outside 8..=19.
    pub fn with_min_digits(min_digits: usize) -> Result<Self, PanError> {
        if !(ABSOLUTE_MIN_PAN_DIGITS..=MAX_PAN_DIGITS).contains(&min_digits) {
            return Err(PanError::InvalidRule);
        }
        Ok(Self { min_digits })
    }

    /// The shortest PAN these rules accept.
    pub fn min_digits(&self) -> usize {
        self.min_digits
    }
}

/// How much of a PAN a masked form shows (PCI DSS 3.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MaskStyle {
    /// Only the last four digits: `************1111`.
    #[default]
    LastFour,
    /// The 6-digit BIN and the last four: `411111******1111`.
    Bin6LastFour,
    /// The 8-digit BIN and the last four: `41111111****1111`.
    Bin8LastFour,
}

/// A primary account number: 8–19 ASCII digits passing the Luhn check.
///
/// Stored inline (no heap), wiped on drop, printed only masked.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Pan {
    digits: [u8; MAX_PAN_DIGITS],
    len: u8,
}

impl Pan {
    /// Parses a PAN with the default rules (12–19 digits).
    ///
    /// The input is the digits, optionally in groups separated by **one**
    /// space or dash (`4111 1111 1111 1111`, `4111-1111-1111-1111`): a
    /// separator is accepted only between two digits, so a leading,
    /// trailing or doubled separator (`" 4111…"`, `"…1111 "`,
    /// `"4111  1111…"`, `"4111 -1111…"`) is [`PanError::MisplacedSeparator`],
    /// and any other character (a tab, a newline, a dot) is
    /// [`PanError::InvalidCharacter`]; trim what you read before parsing.
    /// The separators are dropped. Input that looks like magnetic-stripe
    /// track data is refused as [`PanError::TrackData`].
    ///
    /// # Errors
    ///
    /// A [`PanError`] that never contains the input.
    pub fn parse(input: &str) -> Result<Self, PanError> {
        Self::parse_with(input, &PanRules::default())
    }

    /// Parses a PAN with the given rules.
    ///
    /// # Errors
    ///
    /// A [`PanError`] that never contains the input.
    pub fn parse_with(input: &str, rules: &PanRules) -> Result<Self, PanError> {
        if looks_like_track_data(input) {
            return Err(PanError::TrackData);
        }
        let mut pan = Pan {
            digits: [0u8; MAX_PAN_DIGITS],
            len: 0,
        };
        let mut count = 0usize;
        // Whether the previous character was a digit: a separator must
        // follow a digit and be followed by one.
        let mut after_digit = false;
        let mut pending_separator: Option<usize> = None;
        for (position, c) in input.chars().enumerate() {
            match c {
                '0'..='9' => {
                    // Past 19 digits, only count (to report the length).
                    if count < MAX_PAN_DIGITS {
                        pan.digits[count] = c as u8;
                    }
                    count += 1;
                    after_digit = true;
                    pending_separator = None;
                }
                ' ' | '-' => {
                    if !after_digit {
                        // Leading, or right after another separator.
                        return Err(PanError::MisplacedSeparator { position });
                    }
                    after_digit = false;
                    pending_separator = Some(position);
                }
                _ => return Err(PanError::InvalidCharacter { position }),
            }
        }
        if let Some(position) = pending_separator {
            // Trailing.
            return Err(PanError::MisplacedSeparator { position });
        }
        if count == 0 {
            return Err(PanError::Empty);
        }
        if count > MAX_PAN_DIGITS {
            return Err(PanError::TooLong {
                digits: count,
                max: MAX_PAN_DIGITS,
            });
        }
        if count < rules.min_digits {
            return Err(PanError::TooShort {
                digits: count,
                min: rules.min_digits,
            });
        }
        pan.len = count as u8;
        if !luhn_valid(pan.as_ascii()) {
            return Err(PanError::Luhn);
        }
        Ok(pan)
    }

    /// A PAN whose digits a decoder writes in place (`fill` gets the
    /// zeroed digit buffer and returns how many ASCII digits it wrote, or
    /// `None` to refuse; the buffer is wiped either way when dropped). Only
    /// for decoders that check what `parse` checks: digits, 8–19 of them,
    /// Luhn (the packed-PAN reader, `format::read::unpack_pan`).
    pub(crate) fn decode_with(
        fill: impl FnOnce(&mut [u8; MAX_PAN_DIGITS]) -> Option<usize>,
    ) -> Option<Self> {
        let mut pan = Pan {
            digits: [0u8; MAX_PAN_DIGITS],
            len: 0,
        };
        let len = fill(&mut pan.digits)?;
        if !(ABSOLUTE_MIN_PAN_DIGITS..=MAX_PAN_DIGITS).contains(&len) {
            return None;
        }
        pan.len = len as u8;
        Some(pan)
    }

    fn as_ascii(&self) -> &[u8] {
        &self.digits[..usize::from(self.len)]
    }

    /// The full PAN as a string of digits. This is the one way to read it:
    /// keep the result short-lived and never log it.
    pub fn expose_digits(&self) -> &str {
        // The buffer only ever holds ASCII digits.
        std::str::from_utf8(self.as_ascii()).unwrap_or("")
    }

    /// Number of digits (8–19).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always `false`: a parsed PAN has at least 8 digits. Present for API
    /// symmetry with [`Pan::len`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The last four digits.
    pub fn last_four(&self) -> &str {
        let d = self.expose_digits();
        &d[d.len() - 4..]
    }

    /// The masked form, last four digits shown (PCI DSS 3.4.1).
    pub fn masked(&self) -> String {
        self.mask(MaskStyle::LastFour)
    }

    /// The masked form in the given style.
    ///
    /// Never shows more than the BIN and the last four digits, and always
    /// hides at least four digits: on short PANs the BIN shown is cut down
    /// to keep four hidden.
    pub fn mask(&self, style: MaskStyle) -> String {
        let (first, last) = self.shown_digits(style);
        let d = self.as_ascii();
        let mut out = String::with_capacity(d.len());
        for (i, &b) in d.iter().enumerate() {
            if i < first || i >= d.len() - last {
                out.push(char::from(b));
            } else {
                out.push('*');
            }
        }
        out
    }

    /// How many leading and trailing digits `style` shows for this PAN.
    fn shown_digits(&self, style: MaskStyle) -> (usize, usize) {
        let len = self.len();
        let bin = match style {
            MaskStyle::LastFour => 0,
            MaskStyle::Bin6LastFour => 6,
            MaskStyle::Bin8LastFour => 8,
        };
        // At least four hidden: first + last <= len - 4.
        let last = 4.min(len.saturating_sub(4));
        let first = bin.min(len.saturating_sub(4 + last));
        (first, last)
    }

    /// Writes the masked form (last four) into `out` without allocating;
    /// returns the number of bytes written. `out` must hold 19 bytes.
    pub(crate) fn mask_into(&self, style: MaskStyle, out: &mut [u8]) -> Option<usize> {
        let (first, last) = self.shown_digits(style);
        let d = self.as_ascii();
        if out.len() < d.len() {
            return None;
        }
        for (i, &b) in d.iter().enumerate() {
            out[i] = if i < first || i >= d.len() - last {
                b
            } else {
                b'*'
            };
        }
        Some(d.len())
    }
}

impl PartialEq for Pan {
    /// Constant-time comparison of the digits.
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.len == other.len && bool::from(self.digits.ct_eq(&other.digits))
    }
}

impl Eq for Pan {}

impl Clone for Pan {
    fn clone(&self) -> Self {
        Pan {
            digits: self.digits,
            len: self.len,
        }
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; MAX_PAN_DIGITS];
        let n = self.mask_into(MaskStyle::LastFour, &mut buf).unwrap_or(0);
        let s = std::str::from_utf8(&buf[..n]).unwrap_or("");
        write!(f, "Pan({s})")
    }
}

impl fmt::Display for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; MAX_PAN_DIGITS];
        let n = self.mask_into(MaskStyle::LastFour, &mut buf).unwrap_or(0);
        f.write_str(std::str::from_utf8(&buf[..n]).unwrap_or(""))
    }
}

/// The Luhn (mod 10) check over ASCII digits.
pub(crate) fn luhn_valid(ascii: &[u8]) -> bool {
    const DOUBLED: [u32; 10] = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9];
    let mut sum = 0u32;
    for (i, &b) in ascii.iter().rev().enumerate() {
        let d = usize::from(b.wrapping_sub(b'0')).min(9);
        sum += if i % 2 == 1 { DOUBLED[d] } else { d as u32 };
    }
    sum % 10 == 0
}

/// Track 1 starts `%B` and separates fields with `^`; track 2 starts `;` and
/// separates the PAN from the expiry with `=`.
fn looks_like_track_data(input: &str) -> bool {
    let t = input.trim_start();
    t.starts_with('%')
        || t.starts_with(';')
        || t.contains('=')
        || t.contains('^')
        || t.ends_with('?')
}

/// A card verification code (CVV2/CVC2/CID): 3 or 4 digits.
///
/// Deliberately poor in abilities: no `Clone`, no `Serialize`, a `Debug` that
/// prints `Cvv(***)`, wiped on drop, and read only by [`Cvv::use_once`],
/// which consumes it. No storage API of panseal accepts it (PCI DSS 3.3.1.2:
/// the code is not stored after authorization).
///
/// ```compile_fail
/// let cvv = panseal::Cvv::parse("123").unwrap();
/// let copy = cvv.clone();
/// ```
pub struct Cvv {
    digits: [u8; 4],
    len: u8,
}

impl Cvv {
    /// Parses a 3- or 4-digit code.
    ///
    /// # Errors
    ///
    /// [`PanError::InvalidCvv`], which never contains the input.
    pub fn parse(input: &str) -> Result<Self, PanError> {
        let b = input.as_bytes();
        if !(3..=4).contains(&b.len()) || !b.iter().all(u8::is_ascii_digit) {
            return Err(PanError::InvalidCvv);
        }
        let mut digits = [0u8; 4];
        digits[..b.len()].copy_from_slice(b);
        Ok(Cvv {
            digits,
            len: b.len() as u8,
        })
    }

    /// Hands the digits to `f` (for example, to put them in an authorization
    /// request) and then wipes them. The `Cvv` is consumed: it cannot be used
    /// twice.
    pub fn use_once<R>(self, f: impl FnOnce(&str) -> R) -> R {
        let s = std::str::from_utf8(&self.digits[..usize::from(self.len)]).unwrap_or("");
        f(s)
        // `self` drops here and wipes the digits.
    }
}

impl Drop for Cvv {
    fn drop(&mut self) {
        self.digits.zeroize();
        self.len.zeroize();
    }
}

impl fmt::Debug for Cvv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvv(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalizes() {
        let p = Pan::parse("4111 1111-1111 1111").unwrap();
        assert_eq!(p.expose_digits(), "4111111111111111");
        assert_eq!(p.len(), 16);
        assert_eq!(p.last_four(), "1111");
    }

    #[test]
    fn rejects_bad_input_without_echo() {
        for (input, want) in [
            ("", PanError::Empty),
            ("4111111111111112", PanError::Luhn),
            (
                "41111111111",
                PanError::TooShort {
                    digits: 11,
                    min: 12,
                },
            ),
            (
                "41111111111111111111",
                PanError::TooLong {
                    digits: 20,
                    max: 19,
                },
            ),
            (
                "4111x11111111111",
                PanError::InvalidCharacter { position: 4 },
            ),
            (
                ";4111111111111111=25121010000000000000?",
                PanError::TrackData,
            ),
            ("%B4111111111111111^DOE/JOHN^2512101?", PanError::TrackData),
            ("4111111111111111=2512", PanError::TrackData),
            (
                " 4111111111111111",
                PanError::MisplacedSeparator { position: 0 },
            ),
            (
                "-4111111111111111",
                PanError::MisplacedSeparator { position: 0 },
            ),
            (
                "4111111111111111 ",
                PanError::MisplacedSeparator { position: 16 },
            ),
            (
                "4111111111111111-",
                PanError::MisplacedSeparator { position: 16 },
            ),
            (
                "4111  1111 1111 1111",
                PanError::MisplacedSeparator { position: 5 },
            ),
            (
                "4111 -1111 1111 1111",
                PanError::MisplacedSeparator { position: 5 },
            ),
            (
                "4111--1111-1111-1111",
                PanError::MisplacedSeparator { position: 5 },
            ),
            (" ", PanError::MisplacedSeparator { position: 0 }),
            (
                "4111\t1111 1111 1111",
                PanError::InvalidCharacter { position: 4 },
            ),
            (
                "4111111111111111\n",
                PanError::InvalidCharacter { position: 16 },
            ),
        ] {
            let e = Pan::parse(input).unwrap_err();
            assert_eq!(e, want, "{input:?}");
            let msg = format!("{e} {e:?}");
            assert!(!msg.contains("4111111111111111"), "{msg}");
            assert!(!msg.contains("411111"), "{msg}");
        }
    }

    #[test]
    fn separators_only_between_digit_groups() {
        for ok in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "4111 1111-1111 1111",
            "4111 111111 111111",
            "4 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
        ] {
            assert_eq!(
                Pan::parse(ok).unwrap().expose_digits(),
                "4111111111111111",
                "{ok:?}"
            );
        }
        // Every placement of one separator: accepted exactly where it sits
        // between two digits.
        let digits = "4111111111111111";
        for sep in [' ', '-'] {
            for at in 0..=digits.len() {
                let input = format!("{}{sep}{}", &digits[..at], &digits[at..]);
                let between = at > 0 && at < digits.len();
                assert_eq!(Pan::parse(&input).is_ok(), between, "{input:?}");
            }
        }
    }

    #[test]
    fn configurable_minimum() {
        let rules = PanRules::with_min_digits(8).unwrap();
        // 8-digit Luhn-valid number.
        assert!(Pan::parse_with("12345674", &rules).is_ok());
        assert!(Pan::parse("12345674").is_err());
        assert!(PanRules::with_min_digits(7).is_err());
        assert!(PanRules::with_min_digits(20).is_err());
    }

    #[test]
    fn debug_and_display_are_masked() {
        let p = Pan::parse("4111111111111111").unwrap();
        assert_eq!(format!("{p}"), "************1111");
        assert_eq!(format!("{p:?}"), "Pan(************1111)");
        assert_eq!(p.mask(MaskStyle::Bin6LastFour), "411111******1111");
        assert_eq!(p.mask(MaskStyle::Bin8LastFour), "41111111****1111");
    }

    #[test]
    fn cvv_is_redacted_and_consumed() {
        let c = Cvv::parse("737").unwrap();
        assert_eq!(format!("{c:?}"), "Cvv(***)");
        let n = c.use_once(|d| d.len());
        assert_eq!(n, 3);
        assert!(Cvv::parse("12").is_err());
        assert!(Cvv::parse("12a").is_err());
    }
}
