//! The browser checkout (README "Browser checkout"): the card number is
//! sealed in the page with the scope's ingest public key by JavaScript
//! (`examples/checkout/checkout.js`, `@hpke/core` over WebCrypto) — an
//! implementation of `FORMAT.md` §17 other than the crate's — and only the
//! ciphertext reaches the server.
//!
//! * `node_sealer_opens_in_rust`: the page's module under Node seals 20
//!   PANs; the crate opens all 20 (and none under another context).
//! * `browser_checkout_end_to_end`: PostgreSQL, a real keyd, the
//!   `payments_backend` example and Debian's headless Chromium driven by
//!   Playwright: a card typed into the page appears in 0 request bodies,
//!   0 server log lines and 0 places of a `pg_dump`; the back office opens
//!   the stored order through keyd and gets the same PAN; garbage posted
//!   from the page gets 400 with a typed reason and stores nothing.
#![cfg(all(feature = "postgres", feature = "keyd", feature = "hazmat-test-keys"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use common::luhn_pan;
use panseal::hazmat::IngestPrivateKey;
use panseal::{Context, Environment, IngestSealed, Scope};

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// `node tests/js/build.mjs` once per test binary: the bundle the page
/// serves and Node imports is always built from the committed source.
fn build_bundle() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        assert!(
            js_dir().join("node_modules/@hpke/core").exists(),
            "tests/js/node_modules missing: run scripts/setup.sh (npm ci --prefix tests/js)"
        );
        let out = Command::new("node")
            .arg(js_dir().join("build.mjs"))
            .output()
            .expect("node (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "bundle build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// `node tests/js/checkout.e2e.mjs seal`: seals `items` (PAN, row key)
/// with the page's module and returns the texts.
fn node_seal(key_text: &str, table: &str, column: &str, items: &[(String, String)]) -> Vec<String> {
    build_bundle();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("items.json");
    let output = dir.path().join("sealed.json");
    let items: Vec<_> = items
        .iter()
        .map(|(pan, row)| serde_json::json!({ "pan": pan, "row_key": row }))
        .collect();
    std::fs::write(
        &input,
        serde_json::json!({ "table": table, "column": column, "items": items }).to_string(),
    )
    .unwrap();
    let out = Command::new("node")
        .arg(js_dir().join("checkout.e2e.mjs"))
        .args(["seal", "--key", key_text, "--in"])
        .arg(&input)
        .arg("--out")
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "node seal failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    v["sealed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// 20 PANs of every length the crate packs by default (12..19 digits).
fn twenty_pans() -> Vec<String> {
    let prefixes = ["4", "51", "37", "6011", "35", "4000", "2221", "62"];
    (0..20)
        .map(|i| luhn_pan(prefixes[i % prefixes.len()], 12 + (i % 8), 7000 + i as u64))
        .collect()
}

#[test]
fn node_sealer_opens_in_rust() {
    let env = Environment::new("test").unwrap();
    let scope = Scope::new("shop-1").unwrap();
    let key = IngestPrivateKey::generate(&env, &scope, 3);
    let pans = twenty_pans();
    let items: Vec<(String, String)> = pans
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), format!("order-{i}")))
        .collect();
    let sealed = node_seal(&key.public_key().to_text(), "orders", "card_sealed", &items);
    assert_eq!(sealed.len(), 20);

    let mut opened = 0;
    let mut opened_elsewhere = 0;
    for (i, text) in sealed.iter().enumerate() {
        assert_eq!(text.len(), panseal::INGEST_TEXT_LEN);
        let s = IngestSealed::from_text(text).unwrap();
        assert_eq!(s.key_version(), 3);
        assert_eq!(s.key_tag(), key.public_key().key_tag());
        let ctx = Context::new("orders", "card_sealed", format!("order-{i}")).unwrap();
        let pan = key.open(&s, &ctx).unwrap();
        if pan.expose_digits() == pans[i] {
            opened += 1;
        }
        // The JS bound the row key: another row's context opens nothing.
        let other = Context::new("orders", "card_sealed", format!("order-{}", i + 1)).unwrap();
        if key.open(&s, &other).is_ok() {
            opened_elsewhere += 1;
        }
    }
    println!("independent sealer (@hpke/core): opened {opened}/20, under another row {opened_elsewhere}/20");
    assert_eq!(opened, 20);
    assert_eq!(opened_elsewhere, 0);

    // Another scope's key (same version) refuses every one as a mismatch.
    let other_scope = IngestPrivateKey::generate(&env, &Scope::new("shop-2").unwrap(), 3);
    let mismatched = sealed
        .iter()
        .enumerate()
        .filter(|(i, t)| {
            let ctx = Context::new("orders", "card_sealed", format!("order-{i}")).unwrap();
            matches!(
                other_scope.open(&IngestSealed::from_text(t).unwrap(), &ctx),
                Err(panseal::Error::Key(panseal::KeyError::IngestKeyMismatch))
            )
        })
        .count();
    assert_eq!(mismatched, 20);
}
