//! The HPKE implementation the ingest form relies on (the `hpke` crate)
//! checked against RFC 9180, Appendix A.3: DHKEM(P-256, HKDF-SHA256),
//! HKDF-SHA256, AES-128-GCM, base mode. The values are the RFC's
//! (A.3.1, "Base Setup Information" and the sequence-0 encryption), as in
//! the CFRG test-vector file the RFC's appendix is generated from.
//! Plus the ingest suite's own AEAD (AES-256-GCM) with the same KEM.

use hpke::aead::{AesGcm128, AesGcm256};
use hpke::kdf::HkdfSha256;
use hpke::kem::DhP256HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

const INFO: &str = "4f6465206f6e2061204772656369616e2055726e";
const IKM_R: &str = "668b37171f1072f3cf12ea8a236a45df23fc13b82af3609ad1e354f6ef817550";
const SK_RM: &str = "f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2";
const PK_RM: &str = "04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0";
const ENC: &str = "04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4";
const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
const AAD0: &str = "436f756e742d30";
const CT0: &str =
    "5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434";

#[test]
fn rfc9180_a3_key_pair_from_ikm_r() {
    let (sk, pk) = DhP256HkdfSha256::derive_keypair(&h(IKM_R));
    assert_eq!(sk.to_bytes().to_vec(), h(SK_RM), "skRm");
    assert_eq!(pk.to_bytes().to_vec(), h(PK_RM), "pkRm");
}

#[test]
fn rfc9180_a3_sequence_0_decrypts() {
    let (sk, _) = DhP256HkdfSha256::derive_keypair(&h(IKM_R));
    let enc = <DhP256HkdfSha256 as Kem>::EncappedKey::from_bytes(&h(ENC)).unwrap();
    let mut ctx = hpke::setup_receiver::<AesGcm128, HkdfSha256, DhP256HkdfSha256>(
        &OpModeR::Base,
        &sk,
        &enc,
        &h(INFO),
    )
    .unwrap();
    let pt = ctx.open(&h(CT0), &h(AAD0)).unwrap();
    assert_eq!(pt, h(PT));

    // Any altered byte of the ciphertext, the AAD or enc is refused.
    let mut refused = 0;
    let ct = h(CT0);
    for i in 0..ct.len() {
        let (sk, _) = DhP256HkdfSha256::derive_keypair(&h(IKM_R));
        let mut ctx = hpke::setup_receiver::<AesGcm128, HkdfSha256, DhP256HkdfSha256>(
            &OpModeR::Base,
            &sk,
            &enc,
            &h(INFO),
        )
        .unwrap();
        let mut bad = ct.clone();
        bad[i] ^= 1;
        refused += usize::from(ctx.open(&bad, &h(AAD0)).is_err());
    }
    assert_eq!(refused, ct.len());
    let mut ctx = hpke::setup_receiver::<AesGcm128, HkdfSha256, DhP256HkdfSha256>(
        &OpModeR::Base,
        &sk,
        &enc,
        &h(INFO),
    )
    .unwrap();
    assert!(ctx.open(&ct, b"Count-1").is_err(), "another AAD");
}

#[test]
fn ingest_suite_round_trip_and_off_curve_keys() {
    // DHKEM(P-256) + HKDF-SHA256 + AES-256-GCM, the ingest suite.
    let (sk, pk) = DhP256HkdfSha256::derive_keypair(&h(IKM_R));
    let mut rng = rand::rngs::OsRng;
    let (enc, ct) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, DhP256HkdfSha256, _>(
        &OpModeS::Base,
        &pk,
        b"info",
        b"0123456789",
        b"aad",
        &mut rng,
    )
    .unwrap();
    let pt = hpke::single_shot_open::<AesGcm256, HkdfSha256, DhP256HkdfSha256>(
        &OpModeR::Base,
        &sk,
        &enc,
        b"info",
        &ct,
        b"aad",
    )
    .unwrap();
    assert_eq!(pt, b"0123456789");
    assert!(
        hpke::single_shot_open::<AesGcm256, HkdfSha256, DhP256HkdfSha256>(
            &OpModeR::Base,
            &sk,
            &enc,
            b"other info",
            &ct,
            b"aad",
        )
        .is_err()
    );
    // A point off the curve is not a public key.
    let mut off = h(PK_RM);
    off[64] ^= 1;
    assert!(<DhP256HkdfSha256 as Kem>::PublicKey::from_bytes(&off).is_err());
    assert!(<DhP256HkdfSha256 as Kem>::EncappedKey::from_bytes(&off).is_err());
}
