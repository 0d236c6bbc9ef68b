//! The KeyStore conformance suite, run against every store in this crate,
//! plus the file store's crash-safety and corruption tests.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::keystore_conformance::{conformance, record, successor};
use common::futures_lite;
use panseal::{
    Environment, FileKeyStore, KeyPurpose, KeyState, KeyStore, KeyStoreError, MemoryKeyStore,
    WrappedDek,
};

#[test]
fn memory_store_conforms() {
    futures_lite(conformance(&MemoryKeyStore::new(), 0));
}

#[test]
fn file_store_conforms_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.pks");
    let store = FileKeyStore::open(&path).unwrap();
    futures_lite(conformance(&store, 0));
    let before = futures_lite(store.list(None)).unwrap();
    drop(store);
    let reopened = FileKeyStore::open(&path).unwrap();
    assert_eq!(futures_lite(reopened.list(None)).unwrap(), before);
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn file_store_refuses_corruption_and_leaves_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.pks");
    let store = FileKeyStore::open(&path).unwrap();
    for i in 0..5 {
        futures_lite(store.insert(&record(i, "m"))).unwrap();
    }
    drop(store);
    let good = std::fs::read(&path).unwrap();
    // Every single-byte change, every truncation (a torn write) and an
    // appended byte are refused with Corrupt, and the file is unchanged.
    let mut cases: Vec<Vec<u8>> = Vec::new();
    for i in (0..good.len()).step_by(7) {
        let mut b = good.clone();
        b[i] ^= 0x40;
        cases.push(b);
    }
    for n in (0..good.len()).step_by(5) {
        cases.push(good[..n].to_vec());
    }
    let mut longer = good.clone();
    longer.push(0);
    cases.push(longer);
    for bad in cases {
        std::fs::write(&path, &bad).unwrap();
        let err = FileKeyStore::open(&path).unwrap_err();
        assert!(matches!(err, KeyStoreError::Corrupt(_)), "{err:?}");
        assert_eq!(std::fs::read(&path).unwrap(), bad, "file was modified");
    }
    std::fs::write(&path, &good).unwrap();
    assert_eq!(
        futures_lite(FileKeyStore::open(&path).unwrap().list(None))
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn file_store_is_safe_for_many_threads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.pks");
    let store = FileKeyStore::open(&path).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let r = record(t * 1000 + i, "m");
                    futures_lite(store.insert(&r)).unwrap();
                    let next = successor(&r, |n| n.uses += 1);
                    futures_lite(store.update(&r, &next)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let reopened = FileKeyStore::open(&path).unwrap();
    let all = futures_lite(reopened.list(None)).unwrap();
    assert_eq!(all.len(), 100);
    assert!(all.iter().all(|r| r.uses == sample_uses() + 1));
}

fn sample_uses() -> u64 {
    0
}

/// The child half of the crash test: writes records to the store named by
/// `PANSEAL_CRASH_STORE` forever, printing `ACK <id> <state>` after each
/// change returns. Run only by `file_store_survives_kill_9`.
#[test]
#[ignore]
fn crash_child_writer() {
    let Ok(path) = std::env::var("PANSEAL_CRASH_STORE") else {
        return;
    };
    let start: u64 = std::env::var("PANSEAL_CRASH_START")
        .unwrap()
        .parse()
        .unwrap();
    let store = FileKeyStore::open(&path).unwrap();
    for i in start.. {
        let r = record(i, "m");
        futures_lite(store.insert(&r)).unwrap();
        println!("ACK {} 1", r.id);
        if i % 2 == 0 {
            let next = successor(&r, |n| n.state = KeyState::DecryptOnly);
            futures_lite(store.update(&r, &next)).unwrap();
            println!("ACK {} 2", r.id);
        }
    }
}

#[test]
fn file_store_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.pks");
    let exe = std::env::current_exe().unwrap();
    let mut acked: std::collections::HashMap<String, u8> = Default::default();
    for round in 0..6u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "keystore::crash_child_writer",
                "--ignored",
                "--nocapture",
            ])
            .env("PANSEAL_CRASH_STORE", &path)
            .env("PANSEAL_CRASH_START", (round * 1_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines.push(line);
            }
            lines
        });
        // Let it write for a varying while, then SIGKILL it mid-stream.
        let deadline = Instant::now() + Duration::from_millis(150 + 70 * round);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        for line in reader.join().unwrap() {
            if let Some(rest) = line.strip_prefix("ACK ") {
                let mut it = rest.split(' ');
                let id = it.next().unwrap().to_owned();
                let state: u8 = it.next().unwrap().parse().unwrap();
                let e = acked.entry(id).or_default();
                *e = (*e).max(state);
            }
        }
        // The store always opens, and holds every acknowledged change.
        let store = FileKeyStore::open(&path).expect("store must open after kill -9");
        let all = futures_lite(store.list(None)).unwrap();
        for (id, state) in &acked {
            let r = all
                .iter()
                .find(|r| &r.id.to_string() == id)
                .unwrap_or_else(|| panic!("acknowledged record {id} lost"));
            assert!(r.state as u8 >= *state, "acknowledged state of {id} lost");
        }
    }
    assert!(acked.len() > 10, "child wrote too little: {}", acked.len());
}

#[test]
fn record_encoding_is_strict() {
    let r = record(42, "merchant-a");
    let bytes = r.to_bytes();
    assert_eq!(WrappedDek::from_bytes(&bytes).unwrap(), r);
    for n in 0..bytes.len() {
        assert!(WrappedDek::from_bytes(&bytes[..n]).is_err());
    }
    let _ = (KeyPurpose::Data, Environment::new("x").unwrap());
}
