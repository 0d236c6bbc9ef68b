//! Shared pieces of `panseal-keyd`, the crate's own key-service server, and
//! its client [`crate::RemoteKeyService`].
//!
//! * [`protocol`]: the HTTP/JSON messages both sides exchange (documented so
//!   that clients in other languages can be written against it).
//! * With the `keyd` feature: the server-side wrap primitives, which are the
//!   same code as the in-process [`crate::LocalKeyService`] so the
//!   "Wrap binding" of `FORMAT.md` holds for keyd too, and the atomic file
//!   replacement used by the key store.
//!
//! The server itself is the `panseal-keyd` binary (`src/bin/keyd/`).

pub mod protocol;

#[cfg(feature = "keyd")]
#[doc(hidden)]
pub mod state;
#[cfg(feature = "keyd")]
mod support;

#[cfg(feature = "keyd")]
#[doc(hidden)]
pub use crate::audit::{parse_audit_anchor, verify_audit_bytes};
#[cfg(feature = "keyd")]
pub use support::{unwrap_key, wrap_key, write_atomically};
