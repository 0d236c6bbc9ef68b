#![allow(dead_code)]

pub mod pg;

use std::sync::Arc;

use panseal::{
    blocking, Environment, KeyStore, LocalKeyService, MemoryAuditSink, MemoryKeyStore, Panseal,
    PansealBuilder, Policy,
};

/// A Luhn-valid PAN of `len` digits starting with `prefix`, the middle filled
/// from `seed`.
pub fn luhn_pan(prefix: &str, len: usize, seed: u64) -> String {
    let mut digits: Vec<u8> = prefix.bytes().map(|b| b - b'0').collect();
    let mut x = seed;
    while digits.len() < len - 1 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        digits.push(((x >> 33) % 10) as u8);
    }
    // Check digit.
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(d);
        if i % 2 == 0 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    digits.push(((10 - sum % 10) % 10) as u8);
    digits.iter().map(|d| char::from(b'0' + d)).collect()
}

pub struct Fixture {
    pub ks: LocalKeyService,
    pub store: MemoryKeyStore,
    pub audit: Arc<MemoryAuditSink>,
}

impl Fixture {
    pub fn new(env: &str) -> Self {
        Fixture {
            ks: LocalKeyService::new(Environment::new(env).unwrap()),
            store: MemoryKeyStore::new(),
            audit: Arc::new(MemoryAuditSink::new()),
        }
    }

    pub fn builder(&self, env: &str, scope: &str) -> PansealBuilder {
        Panseal::builder()
            .key_service(self.ks.clone())
            .key_store(self.store.clone())
            .audit_arc(self.audit.clone())
            .environment(env)
            .scope(scope)
    }

    pub fn blocking(&self, policy: Policy) -> blocking::Panseal {
        blocking::Panseal::build(self.builder("test", "merchant-1").policy(policy)).unwrap()
    }

    pub fn store_records(&self) -> Vec<panseal::WrappedDek> {
        futures_lite(self.store.list(None)).unwrap()
    }
}

/// Runs a future to completion on a fresh current-thread runtime.
pub fn futures_lite<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Asserts that no formatting of `value` contains any 12+ digit run of `pan`.
pub fn assert_no_pan(text: &str, pan: &str) {
    assert!(!text.contains(pan), "PAN leaked into: {text}");
    // Also no 6-digit BIN + anything longer than last four in a row.
    let middle = &pan[6..pan.len() - 4];
    if middle.len() >= 4 {
        assert!(
            !text.contains(&pan[..pan.len() - 4]),
            "PAN prefix leaked into: {text}"
        );
    }
}

/// The example binary `name` built for this test run: `cargo test` builds
/// examples as `target/<profile>/examples/<name>-<hash>`, `cargo build
/// --example` as `…/examples/<name>`; the newest one wins.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let mut best: Option<(std::time::SystemTime, std::path::PathBuf)> = None;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|_| panic!("no {}", dir.display())) {
        let entry = entry.unwrap();
        let file = entry.file_name().to_string_lossy().into_owned();
        let stem_ok = file == name
            || file
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|h| h.chars().all(|c| c.is_ascii_hexdigit()));
        if !stem_ok {
            continue;
        }
        let meta = entry.metadata().unwrap();
        let modified = meta.modified().unwrap();
        // `cargo test --examples` leaves test-harness builds of examples
        // under the same names: skip those.
        let help = std::process::Command::new(entry.path())
            .arg("--help")
            .output();
        if help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("List all tests")) {
            continue;
        }
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, entry.path()));
        }
    }
    best.unwrap_or_else(|| {
        panic!("example {name} not built: run `cargo test --all-features` (it builds examples)")
    })
    .1
}
