//! Property tests: round trip for every PAN length, any single-bit flip
//! fails, any context change fails, parse∘write is the identity.

use crate::common;

use common::{luhn_pan, Fixture};
use panseal::{Access, Context, Error, Pan, Policy, SealedPan};
use proptest::prelude::*;

fn pan_strategy() -> impl Strategy<Value = String> {
    (12usize..=19, any::<u64>(), 1u8..=9)
        .prop_map(|(len, seed, first)| luhn_pan(&first.to_string(), len, seed))
}

fn context_strategy() -> impl Strategy<Value = (String, String, Vec<u8>)> {
    (
        "[a-z_]{1,20}",
        "[a-z_]{1,20}",
        proptest::collection::vec(any::<u8>(), 1..40),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip_any_pan_any_context(digits in pan_strategy(), (t, c, r) in context_strategy()) {
        let f = Fixture::new("test");
        let ps = f.blocking(Policy::default());
        let pan = Pan::parse(&digits).unwrap();
        let ctx = Context::new(&t, &c, &r).unwrap();
        let sealed = ps.seal_pan(&pan, &ctx).unwrap();
        prop_assert_eq!(sealed.as_bytes().len(), 48);
        let access = Access::new("p", "q").unwrap();
        let opened = ps.open_pan(&sealed, &ctx, &access).unwrap();
        prop_assert_eq!(opened.pan.expose_digits(), digits.as_str());
    }

    #[test]
    fn any_single_bit_flip_fails(digits in pan_strategy(), bit in 0usize..(48 * 8)) {
        let f = Fixture::new("test");
        let ps = f.blocking(Policy::default());
        let pan = Pan::parse(&digits).unwrap();
        let ctx = Context::new("cards", "pan", "1").unwrap();
        let sealed = ps.seal_pan(&pan, &ctx).unwrap();
        let mut bytes = sealed.as_bytes().to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let access = Access::new("p", "q").unwrap();
        // Either the structure is refused, or the key is unknown, or
        // authentication fails: never a PAN.
        match SealedPan::from_bytes(&bytes) {
            Err(Error::Format(_)) => {}
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
            Ok(s) => {
                let r = ps.open_pan(&s, &ctx, &access);
                prop_assert!(
                    matches!(r, Err(Error::Decryption) | Err(Error::Key(panseal::KeyError::UnknownKey(_)))),
                    "bit {bit}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn any_context_change_fails(
        digits in pan_strategy(),
        (t, c, r) in context_strategy(),
        (t2, c2, r2) in context_strategy(),
    ) {
        prop_assume!((&t, &c, &r) != (&t2, &c2, &r2));
        let f = Fixture::new("test");
        let ps = f.blocking(Policy::default());
        let pan = Pan::parse(&digits).unwrap();
        let sealed = ps.seal_pan(&pan, &Context::new(&t, &c, &r).unwrap()).unwrap();
        let other = Context::new(&t2, &c2, &r2).unwrap();
        let access = Access::new("p", "q").unwrap();
        prop_assert!(matches!(ps.open_pan(&sealed, &other, &access), Err(Error::Decryption)));
    }

    #[test]
    fn binary_parse_write_is_identity(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(s) = SealedPan::from_bytes(&bytes) {
            prop_assert_eq!(s.as_bytes(), bytes.as_slice());
            let text = s.to_text();
            prop_assert_eq!(SealedPan::from_text(&text).unwrap(), s);
        }
    }

    #[test]
    fn text_parse_write_is_identity(tail in "[A-Za-z0-9_-]{60,64}", prefix in "(P1|P2|p1|)") {
        let text = format!("{prefix}{tail}");
        if let Ok(s) = SealedPan::from_text(&text) {
            prop_assert_eq!(s.to_text(), text);
        }
    }

    #[test]
    fn valid_text_round_trips(body in proptest::collection::vec(any::<u8>(), 46)) {
        let mut bytes = vec![1u8, 1];
        bytes.extend_from_slice(&body);
        let s = SealedPan::from_bytes(&bytes).unwrap();
        let text = s.to_text();
        prop_assert_eq!(text.len(), 64);
        prop_assert_eq!(SealedPan::from_text(&text).unwrap(), s);
    }

    #[test]
    fn pan_parse_never_panics_and_never_echoes(input in ".{0,40}") {
        if let Err(e) = Pan::parse(&input) {
            let msg = format!("{e} {e:?}");
            let digits: String = input.chars().filter(char::is_ascii_digit).collect();
            if digits.len() >= 8 {
                prop_assert!(!msg.contains(&digits));
            }
        }
    }

    #[test]
    fn masking_shows_at_most_bin_plus_four_and_hides_at_least_four(
        digits in (8usize..=19, any::<u64>()).prop_map(|(l, s)| luhn_pan("4", l, s)),
    ) {
        use panseal::{MaskStyle, PanRules};
        let pan = Pan::parse_with(&digits, &PanRules::with_min_digits(8).unwrap()).unwrap();
        for (style, bin) in [(MaskStyle::LastFour, 0), (MaskStyle::Bin6LastFour, 6), (MaskStyle::Bin8LastFour, 8)] {
            let m = pan.mask(style);
            prop_assert_eq!(m.len(), digits.len());
            let shown = m.chars().filter(|c| *c != '*').count();
            let hidden = m.len() - shown;
            prop_assert!(shown <= bin + 4, "{m}");
            prop_assert!(hidden >= 4, "{m}");
            // What is shown is the real digit in place.
            for (a, b) in m.chars().zip(digits.chars()) {
                prop_assert!(a == '*' || a == b);
            }
            prop_assert!(m.ends_with(&digits[digits.len() - 4.min(digits.len() - 4)..]));
        }
        prop_assert_eq!(format!("{pan}"), pan.mask(MaskStyle::LastFour));
    }
}

/// One signed record from a real seal, with the fixture that signed it.
fn signed_record() -> (Fixture, panseal::WrappedDek) {
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let pan = Pan::parse("4111111111111111").unwrap();
    ps.seal_pan(&pan, &Context::new("t", "c", "r").unwrap())
        .unwrap();
    ps.report_usage().unwrap();
    let r = f.store_records().remove(0);
    (f, r)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any single-bit change of a stored version-2 record either fails to
    /// decode or fails the key service's verification: forged records
    /// accepted = 0.
    #[test]
    fn any_bit_flip_of_a_signed_record_is_refused(bit in 0usize..(185 * 8)) {
        use panseal::KeyService;
        static SIGNED: std::sync::OnceLock<(Fixture, panseal::WrappedDek)> =
            std::sync::OnceLock::new();
        let (f, r) = SIGNED.get_or_init(|| std::thread::spawn(signed_record).join().unwrap());
        let mut bytes = r.to_bytes();
        let bit = bit % (bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        if let Ok(edited) = panseal::WrappedDek::from_bytes(&bytes) {
            let verdict = common::futures_lite(f.ks.verify_record(&edited));
            prop_assert!(verdict.is_err(), "bit {bit} accepted");
        }
    }
}
