//! The keyd request and answer bodies added for issue 11 (ingest keys,
//! ingest open, generate-wrapped, admit) and the ciphertext, public-key and
//! record strings they carry: never panic; what parses serialises and
//! parses to the same JSON; a sealed string that parses re-encodes to the
//! same ciphertext.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::keyd::server::protocol::*;
use panseal::{IngestPublicKey, IngestSealed, WrappedDek};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned>(body: &[u8]) -> Option<T> {
    let v = serde_json::from_slice::<T>(body).ok()?;
    let once = to_json_wiped(&v).expect("serialises");
    let back: T = serde_json::from_slice(&once).expect("reads back");
    assert_eq!(&*to_json_wiped(&back).expect("serialises"), &*once);
    Some(back)
}

fn sealed(s: &str) {
    if let Some(x) = parse_ingest_sealed(s) {
        let text = x.to_text();
        assert_eq!(
            IngestSealed::from_text(&text).unwrap().as_bytes(),
            x.as_bytes()
        );
        assert_eq!(parse_ingest_sealed(&text).unwrap().as_bytes(), x.as_bytes());
    }
}

fn public_key(s: &str) {
    if let Ok(k) = IngestPublicKey::from_text(s) {
        assert_eq!(IngestPublicKey::from_text(&k.to_text()).unwrap(), k);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            if let Some(r) = round_trip::<AdmitRequest>(body) {
                if let Ok(rec) = WrappedDek::from_bytes(&r.record) {
                    assert_eq!(WrappedDek::from_bytes(&rec.to_bytes()).ok(), Some(rec));
                }
                for it in &r.items {
                    sealed(&it.sealed);
                }
            }
        }
        1 => {
            if let Some(r) = round_trip::<IngestOpenRequest>(body) {
                sealed(&r.sealed);
            }
        }
        2 => {
            round_trip::<IngestStateRequest>(body);
            round_trip::<GenerateRequest>(body);
        }
        3 => {
            round_trip::<AdmitResponse>(body);
        }
        4 => {
            if let Some(r) = round_trip::<IngestKeysResponse>(body) {
                for v in &r.versions {
                    public_key(&v.public_key);
                }
            }
        }
        _ => {
            if let Ok(s) = std::str::from_utf8(body) {
                sealed(s);
                public_key(s);
            }
        }
    }
});
