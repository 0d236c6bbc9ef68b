//! Shared pieces of `panseal-keyd`, the crate's own key-service server, and
//! its client [`crate::RemoteKeyService`].
//!
//! * [`protocol`]: the HTTP/JSON messages both sides exchange (documented so
//!   that clients in other languages can be written against it).
//! * `state` (hidden): the parsers and writers of keyd's state files, for
//!   the server, the fuzz targets and the tests.
//! * With the `keyd` feature: the server-side wrap primitives, which are the
//!   same code as the in-process [`crate::LocalKeyService`] so the
//!   "Wrap binding" of `FORMAT.md` holds for keyd too, and the atomic file
//!   replacement used by the key store.
//!
//! The server itself is the `panseal-keyd` binary (`src/bin/keyd/`).

pub mod protocol;

#[doc(hidden)]
pub mod state;
#[cfg(feature = "keyd")]
mod support;

#[doc(hidden)]
pub use crate::audit::{chain_raw_events, parse_audit_anchor, verify_audit_bytes};
pub use crate::ingest::IngestPrivateKey;
#[cfg(feature = "keyd")]
pub use support::{open_with_key, seal_with_key, unwrap_key, wrap_key, write_atomically};
