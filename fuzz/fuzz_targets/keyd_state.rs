//! keyd `state.bin` (versions 1 and 2) and `state.anchor` readers: never
//! panic; what parses writes back (version 2, under a test key) and reads
//! to the same state.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal_keyd::state_file::{decode_snapshot, encode_snapshot, Anchor, StateKeys};

fuzz_target!(|data: &[u8]| {
    let keys = StateKeys::derive(&[7; 32]);
    if let Ok(s) = decode_snapshot(data, 1) {
        let _ = s.verify(&keys);
        let (bytes, mac) = encode_snapshot(&s.state, &keys);
        let back = decode_snapshot(&bytes, 1).expect("a written snapshot reads");
        assert_eq!(back.state, s.state);
        assert_eq!(back.mac, mac);
        back.verify(&keys)
            .expect("a written snapshot authenticates");
    }
    if let Ok(a) = Anchor::parse(data) {
        let _ = a.verify(&keys);
        assert_eq!(Anchor::parse(&a.encode()).expect("reads"), a);
    }
});
