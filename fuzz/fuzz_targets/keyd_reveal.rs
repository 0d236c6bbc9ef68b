//! keyd's `reveal` and `whoami` messages (FORMAT.md §16): never panic;
//! what parses serialises and parses to the same JSON; the fields of a
//! parsed reveal request go through the same decoders keyd applies
//! (key-store record, sealed PAN, context), which refuse without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::keyd::server::protocol::*;
use panseal::{Context, SealedPan, WrappedDek};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned>(body: &[u8]) -> Option<T> {
    let v = serde_json::from_slice::<T>(body).ok()?;
    let once = to_json_wiped(&v).expect("serialises");
    let back: T = serde_json::from_slice(&once).expect("reads back");
    assert_eq!(&*to_json_wiped(&back).expect("serialises"), &*once);
    Some(back)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Some(r) = round_trip::<RevealRequest>(body) {
                let _ = WrappedDek::from_bytes(&r.record);
                let _ = SealedPan::from_bytes(&r.sealed);
                let _ = Context::new(&r.context.table, &r.context.column, &r.context.row_key);
            }
        }
        1 => {
            let _ = round_trip::<RevealResponse>(body);
        }
        _ => {
            let _ = round_trip::<WhoamiResponse>(body);
        }
    }
});
