//! Every keyd request body parser (the server's `serde_json` view of each
//! protocol message): never panics; what parses serialises and parses to
//! the same JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::keyd::server::protocol::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T: Serialize + DeserializeOwned>(body: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(body) {
        let once = to_json_wiped(&v).expect("serialises");
        let back: T = serde_json::from_slice(&once).expect("reads back");
        assert_eq!(&*to_json_wiped(&back).expect("serialises"), &*once);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 13 {
        0 => round_trip::<WrapRequest>(body),
        1 => round_trip::<GenerateRequest>(body),
        2 => round_trip::<UnwrapRequest>(body),
        3 => round_trip::<RewrapRequest>(body),
        4 => round_trip::<KekTarget>(body),
        5 => round_trip::<KekVersionTarget>(body),
        6 => round_trip::<AcknowledgeRequest>(body),
        7 => round_trip::<UnsealRequest>(body),
        8 => round_trip::<AuditReadRequest>(body),
        9 => round_trip::<DekTarget>(body),
        10 => round_trip::<WithdrawRequest>(body),
        11 => round_trip::<ReshareRequest>(body),
        _ => round_trip::<CollectRequest>(body),
    }
});
