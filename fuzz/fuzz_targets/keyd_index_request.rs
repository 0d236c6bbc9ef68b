//! The keyd request bodies added for issue 10 (keyed hashes, index-key
//! lifecycle, record sign/verify) and the record bytes they carry: never
//! panic; what parses serialises and parses to the same JSON; a record
//! that decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::keyd::server::protocol::*;
use panseal::WrappedDek;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned>(body: &[u8]) -> Option<T> {
    let v = serde_json::from_slice::<T>(body).ok()?;
    let once = to_json_wiped(&v).expect("serialises");
    let back: T = serde_json::from_slice(&once).expect("reads back");
    assert_eq!(&*to_json_wiped(&back).expect("serialises"), &*once);
    Some(back)
}

fn record(bytes: &[u8]) {
    if let Ok(r) = WrappedDek::from_bytes(bytes) {
        assert_eq!(WrappedDek::from_bytes(&r.to_bytes()).ok(), Some(r.clone()));
        let _ = r.signed_bytes();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            round_trip::<IndexHashRequest>(body);
        }
        1 => {
            round_trip::<IndexStateRequest>(body);
        }
        2 => {
            if let Some(r) = round_trip::<RecordSignRequest>(body) {
                record(&r.record);
                if let Some(p) = &r.previous {
                    record(p);
                }
            }
        }
        3 => {
            if let Some(r) = round_trip::<RecordVerifyRequest>(body) {
                record(&r.record);
            }
        }
        4 => {
            round_trip::<IndexHashResponse>(body);
            round_trip::<IndexKeysResponse>(body);
        }
        _ => record(body),
    }
});
