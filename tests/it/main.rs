//! The integration tests of `panseal`, one test crate with a module per
//! concern: one link instead of one per file (issue 12). A module that
//! needs a feature is compiled with it only, so `cargo test -p panseal
//! --all-features` runs everything and `cargo test -p panseal` what needs
//! none (e.g. `compile_fail`'s `dek_from_bytes` case, which needs
//! `hazmat-test-keys` off).
//!
//! All modules share one process. What is process-wide is kept correct:
//! SoftHSM2 is set up once with every module's tokens and PKCS#11 tests
//! take [`softhsm::SERIAL`] (the module is loaded, initialized and
//! finalized process-wide); re-executing the test binary names a test by
//! its full path (`keystore::crash_child_writer`). `tests/fork.rs` forks,
//! so it stays a binary of its own.

// Shared helpers.
mod common;
#[cfg(feature = "keyd-client")]
#[path = "../../keyd/tests/keyd_harness/mod.rs"]
mod keyd_harness;
#[cfg(feature = "hazmat-test-keys")]
mod keyservice_conformance;
#[allow(dead_code)]
mod keystore_conformance;
#[cfg(feature = "aws-kms")]
mod moto;
#[cfg(feature = "pkcs11")]
mod softhsm;

// One module per former test crate.
#[cfg(all(feature = "postgres", feature = "hazmat-test-keys"))]
mod admit;
mod api;
mod audit_verify;
#[cfg(all(feature = "aws-kms", feature = "hazmat-test-keys"))]
mod aws_kms;
#[cfg(all(feature = "aws-kms", feature = "hazmat-test-keys"))]
mod aws_kms_conformance;
#[cfg(all(
    feature = "postgres",
    feature = "keyd-client",
    feature = "hazmat-test-keys"
))]
mod breach_drill;
#[cfg(all(
    feature = "postgres",
    feature = "keyd-client",
    feature = "hazmat-test-keys"
))]
mod browser_checkout;
mod compile_fail;
#[cfg(all(
    feature = "hazmat-test-keys",
    any(feature = "pkcs11", feature = "aws-kms", feature = "keyd-client")
))]
mod config;
#[cfg(feature = "hazmat-test-keys")]
mod conformance_local;
mod hpke_rfc9180;
#[cfg(feature = "hazmat-test-keys")]
mod ingest;
#[cfg(all(feature = "keyd-client", feature = "hazmat-test-keys"))]
mod key_ceremony;
#[cfg(all(feature = "keyd-client", feature = "hazmat-test-keys"))]
mod keyd_backend_conformance;
mod keystore;
#[cfg(feature = "hazmat-test-keys")]
mod no_pan_in_errors;
#[cfg(feature = "hazmat-test-keys")]
mod payload;
#[cfg(all(
    feature = "postgres",
    feature = "keyd-client",
    feature = "hazmat-test-keys"
))]
mod payments_backend;
#[cfg(all(feature = "pkcs11", feature = "hazmat-test-keys"))]
mod pkcs11;
#[cfg(all(feature = "pkcs11", feature = "hazmat-test-keys"))]
mod pkcs11_conformance;
#[cfg(all(feature = "pkcs11", feature = "hazmat-test-keys"))]
mod pkcs11_ingest;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
mod postgres_tls;
mod props;
mod readme;
#[cfg(all(feature = "postgres", feature = "hazmat-test-keys"))]
mod records;
#[cfg(all(feature = "postgres", feature = "hazmat-test-keys"))]
mod reencrypt;
#[cfg(all(feature = "postgres", feature = "pkcs11", feature = "hazmat-test-keys"))]
mod reindex;
#[cfg(all(
    feature = "keyd-client",
    feature = "postgres",
    feature = "hazmat-test-keys"
))]
mod rotate_kek;
#[cfg(all(
    feature = "keyd-client",
    feature = "postgres",
    feature = "hazmat-test-keys"
))]
mod tools;
#[cfg(feature = "hazmat-test-keys")]
mod vectors;
