//! What the real open path does with plaintexts that authenticate but are
//! not conforming packed PANs (issue 9, item 11): sealed under a real DEK
//! with `hazmat::seal_packed_with_nonce`, opened with `Panseal::open_pan`.
//! The same check as `fuzz/seal_open_packed`, over the structured cases
//! and random bytes, so that the suite runs it.
use crate::common;

use common::{futures_lite, luhn_pan};
use panseal::{
    blocking, hazmat, Access, Context, Dek, Environment, Error, FormatError, KeyId, KeyStore,
    LocalKeyService, MemoryAuditSink, MemoryKeyStore, Pan, Panseal,
};
use proptest::prelude::*;

struct Setup {
    ps: blocking::Panseal,
    dek: Dek,
    id: KeyId,
}

fn setup() -> Setup {
    let kek = [0x42; 32];
    let store = MemoryKeyStore::new();
    let ps = blocking::Panseal::build(
        Panseal::builder()
            .key_service(LocalKeyService::from_kek_bytes_insecure(
                Environment::new("test").unwrap(),
                kek,
            ))
            .key_store(store.clone())
            .audit(MemoryAuditSink::new())
            .environment("test")
            .scope("m"),
    )
    .unwrap();
    let pan = Pan::parse("4111111111111111").unwrap();
    let id = ps.seal_pan(&pan, &ctx()).unwrap().key_id();
    let record = futures_lite(store.fetch(id)).unwrap().unwrap();
    let dek = hazmat::unwrap_with_kek(
        &kek,
        &record.wrapped.kek,
        &record.key_request(),
        &record.wrapped.bytes,
    )
    .unwrap();
    Setup { ps, dek, id }
}

fn ctx() -> Context {
    Context::new("cards", "pan", "1").unwrap()
}

/// `Some(digits)` if the payload opened, `None` if it was refused as
/// `FormatError::Payload`; panics on any other outcome.
fn open(s: &Setup, packed: [u8; 10]) -> Option<String> {
    let sealed = hazmat::seal_packed_with_nonce(&s.dek, s.id, [7; 12], &packed, &ctx());
    let access = Access::new("t", "payload").unwrap();
    match s.ps.open_pan(&sealed, &ctx(), &access) {
        Ok(opened) => {
            assert_eq!(
                hazmat::pack_pan(&opened.pan),
                packed,
                "non-canonical payload opened"
            );
            Some(opened.pan.expose_digits().to_owned())
        }
        Err(Error::Format(FormatError::Payload)) => None,
        Err(e) => panic!("unexpected error for {packed:02x?}: {e:?}"),
    }
}

/// BCD of `digits`, padded with `0xF` nibbles.
fn pack(digits: &str) -> [u8; 10] {
    let mut nibbles: Vec<u8> = digits.bytes().map(|d| d - b'0').collect();
    nibbles.resize(20, 0xF);
    let mut out = [0u8; 10];
    for (i, b) in out.iter_mut().enumerate() {
        *b = (nibbles[2 * i] << 4) | nibbles[2 * i + 1];
    }
    out
}

#[test]
fn every_kind_of_bad_payload_is_a_typed_error() {
    let s = setup();
    let mut opened = 0;
    let mut refused = 0;
    for len in 0..=20usize {
        let good = luhn_pan("4", len.max(2), 9);
        let good = &good[..len.min(good.len())];
        // Luhn-valid digits of this length (too short and too long ones
        // included), then the same with the check digit off by one.
        let mut variants = vec![good.to_owned()];
        if let Some(last) = good.bytes().last() {
            let mut off = good[..len - 1].to_owned();
            off.push(char::from(b'0' + (last - b'0' + 1) % 10));
            variants.push(off);
        }
        for digits in variants {
            if digits.len() > 20 {
                continue;
            }
            let packed = pack(&digits);
            let luhn_ok =
                Pan::parse_with(&digits, &panseal::PanRules::with_min_digits(8).unwrap()).is_ok();
            let expect = (8..=19).contains(&digits.len()) && luhn_ok;
            match open(&s, packed) {
                Some(d) => {
                    assert!(expect, "{digits} opened");
                    assert_eq!(d, digits);
                    opened += 1;
                }
                None => {
                    assert!(!expect, "{digits} refused");
                    refused += 1;
                }
            }
            // Every nibble replaced by each non-digit value, and the padding
            // broken: always refused unless it yields a canonical PAN.
            for pos in 0..20 {
                for bad in 0xAu8..=0xF {
                    let mut p = packed;
                    let shift = if pos % 2 == 0 { 4 } else { 0 };
                    p[pos / 2] = (p[pos / 2] & !(0xF << shift)) | (bad << shift);
                    if open(&s, p).is_some() {
                        opened += 1;
                    } else {
                        refused += 1;
                    }
                }
            }
        }
    }
    assert!(opened > 0 && refused > 1000, "{opened} {refused}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_ten_bytes_open_canonically_or_refuse(packed in any::<[u8; 10]>()) {
        thread_local!(static S: Setup = setup());
        S.with(|s| { open(s, packed); });
    }
}
