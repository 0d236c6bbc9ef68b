//! Issue 9, item 7: no error a caller can provoke with a card number in
//! its input carries that card number (or its first twelve digits) in its
//! `Display`, `Debug` or pretty `Debug`. Every error variant the library
//! produces from PAN-bearing input is made here and scanned.
use crate::common;

use common::Fixture;
use panseal::config::ClientConfig;
use panseal::{
    hazmat, Access, Context, Cvv, Dek, Error, KeyId, KeyState, Pan, PanRules, Policy, SealedPan,
};

const PANS: [&str; 3] = ["4111111111111111", "5555555555554444", "4012888888881881"];

/// Count of formatted texts that contain a test PAN or its first 12 digits
/// (as they are, or with spaces and dashes removed).
fn leaks(texts: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for t in texts {
        let squeezed: String = t.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
        for pan in PANS {
            let head = &pan[..12];
            if t.contains(head) || squeezed.contains(head) {
                out.push(t.clone());
            }
        }
    }
    out
}

fn forms(e: &dyn std::fmt::Debug, d: &dyn std::fmt::Display) -> Vec<String> {
    vec![format!("{d}"), format!("{e:?}"), format!("{e:#?}")]
}

fn all(e: &Error) -> Vec<String> {
    forms(e, e)
}

#[test]
fn no_error_carries_a_pan() {
    let mut texts = Vec::new();
    let mut produced = 0;
    let mut push = |e: Error, texts: &mut Vec<String>| {
        produced += 1;
        texts.extend(all(&e));
    };

    // Parsing: Luhn, letters, track data, lengths, CVVs.
    for pan in PANS {
        let mut luhn = pan.to_owned();
        let last = luhn.pop().unwrap();
        luhn.push(char::from(b'0' + (last as u8 - b'0' + 1) % 10));
        let inputs = [
            luhn.clone(),
            format!("{} {}", &luhn[..8], &luhn[8..]),
            format!("{pan}x"),
            format!("x{pan}"),
            format!("{pan}999"),
            format!(";{pan}=25121010000000000?"),
            format!("%B{pan}^DOE/JOHN^2512101?"),
            format!("{pan}=2512"),
            format!("{pan}{pan}"),
            pan[..7].to_owned(),
        ];
        for input in &inputs {
            let e = Pan::parse(input).expect_err(input);
            push(e.into(), &mut texts);
            if let Err(e) = Pan::parse_with(input, &PanRules::with_min_digits(13).unwrap()) {
                push(e.into(), &mut texts);
            }
        }
        push(Cvv::parse(pan).unwrap_err().into(), &mut texts);
        // A PAN where a ciphertext is expected.
        push(SealedPan::from_text(pan).unwrap_err(), &mut texts);
        push(
            SealedPan::from_bytes(pan.as_bytes()).unwrap_err(),
            &mut texts,
        );
        let mut p1 = format!("P1{pan}{pan}{pan}{pan}");
        p1.truncate(64);
        push(SealedPan::from_text(&p1).unwrap_err(), &mut texts);
        // A PAN as a context part, too long.
        let e = Context::new("cards", "pan", pan.repeat(64)).unwrap_err();
        push(e.into(), &mut texts);
        let e = Context::new(&pan.repeat(64), "pan", "1").unwrap_err();
        push(e.into(), &mut texts);
        // A PAN in the configuration, where a value, a name or a key goes.
        for json in [
            format!(r#"{{"environment":{pan},"scope":"m"}}"#),
            format!(r#"{{"environment":"dev","scope":"m","policy":{{"max_uses":"{pan}"}}}}"#),
            format!(r#"{{"environment":"dev","scope":"m","{pan}":1}}"#),
            format!(r#"{{"environment":"dev","scope":"m","policy":{{"max_uses":{pan}.5}}}}"#),
            format!(r#"{{"environment":"dev","scope":"m","key_service":{{"type":"{pan}"}}}}"#),
            format!(
                r#"{{"environment":"dev","scope":"m","key_service":{{"type":"local"}},"key_store":{{"type":"memory"}},"policy":{{"max_uses":-{pan}}}}}"#
            ),
            r#"{"environment":"dev", "#.to_owned(),
        ] {
            push(ClientConfig::from_json(&json).unwrap_err(), &mut texts);
        }
        let c = ClientConfig::from_json(&format!(
            r#"{{"environment":"{pan}","scope":"m","key_service":{{"type":"local"}},"key_store":{{"type":"memory"}}}}"#
        ))
        .unwrap();
        if let Err(e) = c.builder() {
            push(e, &mut texts);
        }
        push(
            Access::new(pan, &"x".repeat(300)).unwrap_err().into(),
            &mut texts,
        );
        push(
            panseal::Environment::new(&format!("{pan}!"))
                .unwrap_err()
                .into(),
            &mut texts,
        );
    }

    // Sealing and opening with the real API.
    let f = Fixture::new("test");
    let ps = f.blocking(Policy::default());
    let access = Access::new("alice", "refund").unwrap();
    let ctx = Context::new("cards", "pan", "1").unwrap();
    for pan in PANS {
        let p = Pan::parse(pan).unwrap();
        let sealed = ps.seal_pan(&p, &ctx).unwrap();
        // Wrong context, flipped bit: the opaque error.
        let other = Context::new("cards", "pan", pan).unwrap();
        push(
            ps.open_pan(&sealed, &other, &access).unwrap_err(),
            &mut texts,
        );
        let mut bytes = sealed.as_bytes().to_vec();
        bytes[30] ^= 1;
        let flipped = SealedPan::from_bytes(&bytes).unwrap();
        push(
            ps.open_pan(&flipped, &ctx, &access).unwrap_err(),
            &mut texts,
        );
        // Unknown key.
        let mut bytes = sealed.as_bytes().to_vec();
        bytes[2..10].copy_from_slice(&pan.as_bytes()[..8]);
        let unknown = SealedPan::from_bytes(&bytes).unwrap();
        push(
            ps.open_pan(&unknown, &ctx, &access).unwrap_err(),
            &mut texts,
        );
        // A payload that authenticates but is not a PAN: the PAN's own
        // digits with a broken check digit.
        let dek = Dek::from_bytes_insecure([9; 32]);
        let mut packed = hazmat::pack_pan(&p);
        packed[7] ^= 0x01;
        let s =
            hazmat::seal_packed_with_nonce(&dek, KeyId::from_bytes([1; 8]), [2; 12], &packed, &ctx);
        push(
            hazmat::open_with_dek(&dek, &s, &ctx).unwrap_err(),
            &mut texts,
        );
    }
    // Compromised, then destroyed; another scope.
    let p = Pan::parse(PANS[0]).unwrap();
    let sealed = ps.seal_pan(&p, &ctx).unwrap();
    ps.set_key_state(sealed.key_id(), KeyState::Compromised)
        .unwrap();
    push(ps.open_pan(&sealed, &ctx, &access).unwrap_err(), &mut texts);
    push(
        ps.set_key_state(sealed.key_id(), KeyState::Active)
            .unwrap_err(),
        &mut texts,
    );
    ps.set_key_state(sealed.key_id(), KeyState::Destroyed)
        .unwrap();
    push(ps.open_pan(&sealed, &ctx, &access).unwrap_err(), &mut texts);
    let other_scope = ps.with_scope("merchant-2").unwrap();
    let s2 = ps.seal_pan(&p, &ctx).unwrap();
    push(
        other_scope.open_pan(&s2, &ctx, &access).unwrap_err(),
        &mut texts,
    );

    // Everything on record: the audit sink's events.
    for e in f.audit.events() {
        texts.push(format!("{e:?}"));
    }

    let leaked = leaks(&texts);
    println!(
        "{produced} errors, {} texts scanned, {} leak",
        texts.len(),
        leaked.len()
    );
    assert!(produced > 100, "{produced}");
    assert!(leaked.is_empty(), "PAN in error text: {leaked:#?}");
}
