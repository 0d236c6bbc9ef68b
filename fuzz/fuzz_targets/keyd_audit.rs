//! The chained audit log and audit anchor readers (used by keyd at start
//! and by `verify-audit`): never panic. The input's lines are chained under
//! a fixed key first (so the checks behind the MAC run: header parse,
//! sequence, links, anchor), then one byte is flipped and the log read
//! again; an intact chain verifies to its own count and head.
#![no_main]
use libfuzzer_sys::fuzz_target;
use panseal::keyd::server::{chain_raw_events, parse_audit_anchor, verify_audit_bytes};
use panseal::{AuditKey, ChainSummary};

fuzz_target!(|data: &[u8]| {
    let key = AuditKey::from_bytes_insecure([5; 32]);
    let _ = verify_audit_bytes(data, &key, &ChainSummary::genesis(), &mut |_, _| {});
    let _ = parse_audit_anchor(data, &key);
    let events: Vec<&[u8]> = data
        .split(|&b| b == b'\n')
        .filter(|e| !e.is_empty())
        .take(64)
        .collect();
    let log = chain_raw_events(&key, &events);
    let whole = verify_audit_bytes(&log, &key, &ChainSummary::genesis(), &mut |_, _| {});
    if let Ok(s) = &whole {
        assert_eq!(s.records as usize, events.len());
        // Anchored at itself it verifies; anchored one further it is cut.
        verify_audit_bytes(&log, &key, s, &mut |_, _| {}).expect("reaches its own anchor");
        let beyond = ChainSummary {
            records: s.records + 1,
            head: s.head.clone(),
        };
        assert!(verify_audit_bytes(&log, &key, &beyond, &mut |_, _| {}).is_err());
    }
    if !log.is_empty() {
        let mut flipped = log.clone();
        let at = usize::from(data[0]) * 7 % flipped.len();
        flipped[at] ^= 1 << (data[data.len() - 1] % 8);
        let _ = verify_audit_bytes(&flipped, &key, &ChainSummary::genesis(), &mut |_, _| {});
    }
});
