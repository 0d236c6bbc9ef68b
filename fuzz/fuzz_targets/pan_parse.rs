//! PAN parser: never panics; errors never echo the input's digits; accepted
//! PANs are 8–19 digits that survive pack/seal/open, and every space or dash
//! in an accepted input sits between two digits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::{hazmat, Context, Dek, KeyId, Pan, PanRules};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let rules = PanRules::with_min_digits(8).expect("8 is allowed");
    match Pan::parse_with(input, &rules) {
        Ok(pan) => {
            assert!((8..=19).contains(&pan.len()));
            assert!(pan.expose_digits().bytes().all(|b| b.is_ascii_digit()));
            let b = input.as_bytes();
            for (i, c) in b.iter().enumerate() {
                if matches!(c, b' ' | b'-') {
                    assert!(i > 0 && b[i - 1].is_ascii_digit(), "separator not after a digit");
                    assert!(b.get(i + 1).is_some_and(u8::is_ascii_digit), "separator not before a digit");
                }
            }
            let digits: String = input.chars().filter(char::is_ascii_digit).collect();
            assert_eq!(pan.expose_digits(), digits, "digits other than the input's");
            let masked = pan.to_string();
            assert!(masked.len() == pan.len());
            let dek = Dek::from_bytes_insecure([1; 32]);
            let ctx = Context::new("t", "c", "r").expect("valid context");
            let s = hazmat::seal_with_nonce(&dek, KeyId::from_bytes([2; 8]), [3; 12], &pan, &ctx);
            assert_eq!(hazmat::open_with_dek(&dek, &s, &ctx).expect("opens"), pan);
        }
        Err(e) => {
            let digits: String = input.chars().filter(char::is_ascii_digit).collect();
            if digits.len() >= 6 {
                let msg = format!("{e} {e:?}");
                assert!(!msg.contains(&digits), "error echoes the input");
            }
        }
    }
});
