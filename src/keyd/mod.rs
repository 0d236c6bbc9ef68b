//! The client of `panseal-keyd`, panseal's own key-service server (the
//! separate crate `panseal-keyd`), and the wire protocol both sides speak.
//!
//! * [`crate::RemoteKeyService`] (re-exported at the
//!   crate root): the [`KeyService`](crate::KeyService) an application uses
//!   to reach keyd over mutual TLS, with the custodian calls (status, KEK
//!   rotation, destruction approvals, unseal, reshare, audit) the tools in
//!   `examples/` make.
//! * This module: the types those calls return, and [`Permission`]s.
//! * `protocol` (private): every HTTP/JSON message of the protocol
//!   (`FORMAT.md` §8–§18), the one definition the client and the server
//!   share. The server reaches it, and the wrap primitives it shares with
//!   [`LocalKeyService`](crate::LocalKeyService), through the hidden
//!   `server` module of the `keyd-server` feature, which is `panseal-keyd`'s
//!   interface to this crate and not for applications.

mod client;
// The protocol's messages are public for the server (feature
// `keyd-server`); without it the client uses them and the crate re-exports
// only what its calls return.
#[allow(unreachable_pub)]
#[cfg_attr(not(feature = "keyd-server"), allow(dead_code))]
mod protocol;
#[cfg(feature = "keyd-server")]
mod support;

pub use client::{RemoteKeyService, RemoteKeyServiceBuilder};
pub use protocol::{
    CollectResponse, DekDestroyResponse, DestroyResponse, KekStatus, KekVersionInfo, Permission,
    ReshareResponse, ShareText, StatusResponse, WithdrawResponse,
};

/// `panseal-keyd`'s interface to this crate (feature `keyd-server`): the
/// whole wire protocol, the wrap primitives shared with
/// [`LocalKeyService`](crate::LocalKeyService) (so the "Wrap binding" of
/// `FORMAT.md` holds for keyd too), the raw audit-chain functions and the
/// atomic file replacement. Not for applications and not a stable API: it
/// changes with the server.
#[cfg(feature = "keyd-server")]
#[doc(hidden)]
pub mod server {
    /// The HTTP/JSON messages of the keyd protocol (`FORMAT.md`).
    pub mod protocol {
        pub use crate::keyd::protocol::*;
    }
    pub use super::support::{
        open_with_key, seal_with_key, unwrap_key, wrap_key, write_atomically,
    };
    pub use crate::audit::{chain_raw_events, parse_audit_anchor, verify_audit_bytes};
    pub use crate::ingest::IngestPrivateKey;
}
