//! `panseal-keyd`: panseal's own key service.
//!
//! A separate process that holds the key-encryption keys (KEKs), so that a
//! compromise of the payment application or a dump of its database never
//! yields them. HTTPS (rustls, TLS 1.3) with client certificates as
//! principals, per-principal policy and unwrap quotas, versioned KEKs per
//! scope with dual-control destruction, a master key split into k-of-n
//! Shamir shares (the server starts sealed), and a hash-chained audit log
//! of every request.
//!
//! The command line (`panseal-keyd --help`, and `--help` after every
//! subcommand and custodian action):
//!
//! ```text
//! panseal-keyd dev [--dir DIR] [--listen IP:PORT] [--environment ENV]   (development only)
//! panseal-keyd wait (--address HOST:PORT | --file FILE) [--seconds N]
//! panseal-keyd gen-dev-certs --out DIR [--client NAME]... [--host NAME]...
//! panseal-keyd init --config FILE --threshold K --custodian NAME... [--listen IP:PORT]
//! panseal-keyd serve --config FILE [--listen IP:PORT]
//! panseal-keyd verify-audit (--config FILE | --log FILE --key FILE [--anchor FILE])
//! panseal-keyd check-config --config FILE
//! panseal-keyd fingerprint CERT.pem
//! panseal-keyd custodian ACTION --address HOST:PORT --ca CA.pem --cert ME.pem
//!     --key ME.key.pem --environment ENV [--server-name NAME] [--scope S]
//!     [--version N] [--key-id ID] [--purpose data|index] [--share-file FILE]
//!     [--statement TEXT] [--expect-generation N] [--threshold K] [--custodian NAME]...
//! ```
//!
//! Modules, one concept each (an arrow is "uses"; there are no cycles):
//!
//! * `dev`: `panseal-keyd dev` (development only) → `certs`, `init`,
//!   `serve`, `custodian`; and `panseal-keyd wait`.
//! * `cli`: the `clap` types and the dispatch → `dev`, `init`, `serve`,
//!   `verify_audit`, `certs` (`gen-dev-certs`, `fingerprint`) and
//!   `custodian` (the custodians' client over `RemoteKeyService`).
//! * `init` (new master key, shares collected by custodians) and `serve`
//!   (start-up checks and the accept loop) → `api`, `tls`, `state`, `seal`.
//! * `api`: the protocol handlers (`api::reveal`, `api::ingest`) → `quota`,
//!   `state`, `seal`, `config`.
//! * `quota`: durable reveal / index / unwrap counters (`quota.state`).
//! * `state`: the state store (snapshot, journal, anchor, lock) →
//!   `state_file`: the bytes of the state files (FORMAT.md §13) and the
//!   HKDF subkeys of the master key (`StateKeys`).
//! * `seal`: the master key, its Shamir shares and the sealing of keys.
//! * `config`: `keyd.toml`; `tls`: the server's TLS configuration.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod api;
mod certs;
mod cli;
mod config;
mod custodian;
mod dev;
mod init;
mod quota;
mod seal;
mod serve;
mod state;
#[doc(hidden)]
pub mod state_file;
mod tls;
mod verify_audit;

/// The `panseal-keyd` command line (the binary's `main`): parses the
/// process arguments and runs the command. Exit code 0 on success, 2 on a
/// usage error or a failed command, 1 when `verify-audit` finds the log
/// does not verify.
pub fn run() -> std::process::ExitCode {
    cli::run()
}
