//! `panseal-keyd`'s own tests, one test crate with a module per concern:
//! the server as a real process on 127.0.0.1 (its binary, found through
//! `CARGO_BIN_EXE_panseal-keyd`), driven through `RemoteKeyService` and
//! raw HTTPS.

// Shared helpers: the harness stays in `keyd/tests/keyd_harness` (the root
// crate's tests and keyd's benches include it too); the one KeyService
// conformance suite is the root crate's (this crate runs its custodian
// cycle against keyd's two-custodian destroy).
#[path = "../keyd_harness/mod.rs"]
mod keyd_harness;
#[path = "../../../tests/it/keyservice_conformance.rs"]
mod keyservice_conformance;

// One module per former test crate (`tests/keyd*.rs` of the root crate).
mod backup;
mod cli;
mod dev;
mod keyd;
mod keyd_index;
mod keyd_ingest;
mod keyd_reveal;
