//! keyd `state.journal` reader: never panics; every parsed entry written
//! again (under a test key) parses to the same entry and authenticates.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal_keyd::state_file::{encode_journal_entry, parse_journal, StateKeys};

fuzz_target!(|data: &[u8]| {
    let keys = StateKeys::derive(&[7; 32]);
    if let Ok((entries, good)) = parse_journal(data) {
        assert!(good <= data.len());
        for e in entries {
            let _ = e.verify(&keys);
            let (line, mac) = encode_journal_entry(&e.header, &keys);
            let (again, n) = parse_journal(&line).expect("a written entry reads");
            assert_eq!(n, line.len());
            assert_eq!(again[0].header, e.header);
            assert_eq!(again[0].mac, mac);
            again[0]
                .verify(&keys)
                .expect("a written entry authenticates");
        }
    }
});
