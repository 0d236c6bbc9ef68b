//! # panseal
//!
//! Field-level envelope encryption for payment card numbers (PANs), so that
//! a dump of the database never yields a card number (PCI DSS v4 3.5.1.2),
//! with the key management of requirements 3.6–3.7 built in.
//!
//! * [`Pan`] and [`Cvv`]: parsing (Luhn, track-data refusal), masking within
//!   PCI DSS 3.4.1, zeroized on drop, never printed in full.
//! * [`Panseal::seal_pan`] / [`Panseal::open_pan`]: AES-256-GCM under a
//!   data-encryption key (DEK) that rotates by age and use count, bound to a
//!   [`Context`] (table, column, row key); a 48-byte [`SealedPan`] with a
//!   64-character text form (`FORMAT.md`).
//! * DEKs are stored only wrapped by a key-encryption key that stays in a
//!   [`KeyService`]; records live in a [`KeyStore`].
//! * [`Panseal::blind_index`]: HMAC-SHA-256 of the PAN under a separate,
//!   rotatable index key that stays in the key service and is used there
//!   (PCI DSS 3.5.1.1).
//! * Key-store records are signed by the key service and verified at every
//!   read for use: an edited or rolled-back record is refused
//!   ([`KeyError::RecordTampered`], [`KeyError::RecordStale`]).
//! * Every open is audited to an [`AuditSink`]; opening fails closed without
//!   one (PCI DSS 10.2).
//!
//! ```
//! use panseal::{Access, Context, Environment, LocalKeyService, MemoryAuditSink,
//!               MemoryKeyStore, Pan, Panseal};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let panseal = Panseal::builder()
//!     .key_service(LocalKeyService::new(Environment::new("test")?)) // dev only
//!     .key_store(MemoryKeyStore::new())
//!     .audit(MemoryAuditSink::new())
//!     .environment("test")
//!     .scope("merchant-42")
//!     .build()
//!     .await?;
//!
//! let pan = Pan::parse("4111 1111 1111 1111")?;
//! let ctx = Context::new("cards", "pan", "row-17")?;
//! let sealed = panseal.seal_pan(&pan, &ctx).await?;
//! assert_eq!(sealed.as_bytes().len(), 48);
//!
//! let opened = panseal
//!     .open_pan(&sealed, &ctx, &Access::new("alice", "refund")?)
//!     .await?;
//! assert_eq!(opened.pan, pan);
//! assert_eq!(opened.pan.to_string(), "************1111");
//! # Ok::<(), panseal::Error>(())
//! # }).unwrap();
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]
#![warn(unreachable_pub, clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod access;
#[cfg(feature = "postgres")]
pub mod admit;
mod api;
mod audit;
pub mod blocking;
mod clock;
pub mod config;
mod context;
mod error;
mod format;
#[cfg(feature = "hazmat-test-keys")]
pub mod hazmat;
mod ids;
mod index;
mod ingest;
#[cfg(feature = "keyd-client")]
pub mod keyd;
mod keys;
mod keyservice;
mod keystore;
mod pan;
#[cfg(feature = "postgres")]
pub mod reencrypt;
#[cfg(feature = "postgres")]
pub mod reindex;
mod seal;

pub use access::Access;
pub use api::{Admission, Opened, Panseal, PansealBuilder};
pub use audit::{
    read_audit_anchor, verify_audit_chain, verify_audit_chain_anchored, AuditEvent, AuditKey,
    AuditSink, ChainSummary, ChainedAuditLog, JsonLinesAuditSink, MemoryAuditSink, Operation,
    Outcome, RecordedEvent,
};
pub use context::{Context, MAX_COLUMN_LEN, MAX_ROW_KEY_LEN, MAX_TABLE_LEN};
pub use error::{
    AdmitItemError, AuditError, ConfigError, ContextError, Error, FormatError, KeyError,
    KeyServiceError, KeyStoreError, PanError,
};
pub use format::{SealedPan, V1_LEN, V1_TEXT_LEN};
pub use index::BlindIndex;
pub use ingest::{
    IngestKeyInfo, IngestPublicKey, IngestSealed, IngestSealer, SealedRef, StoredPan, INGEST_LEN,
    INGEST_PUBLIC_KEY_LEN, INGEST_TEXT_LEN,
};
#[cfg(feature = "keyd-client")]
pub use keyd::{RemoteKeyService, RemoteKeyServiceBuilder};
pub use keys::{
    Dek, Environment, KekRef, KeyId, KeyPurpose, KeyRequest, KeyState, Policy, RecordTag, Scope,
    WrappedDek, WrappedKey, DEK_STRENGTH_BITS, MAX_CACHE_TTL, NONCE_LIMIT, RECORD_CLOCK_SKEW,
};
pub use keyservice::{
    AdmitItem, AdmitOutput, AdmitRequest, IndexKeyInfo, IngestOpenRequest, KekInfo, KeyService,
    LocalKeyService, Permissions, RevealRequest, MAX_ADMIT_BATCH,
};
#[cfg(feature = "aws-kms")]
pub use keyservice::{AwsKmsConfig, AwsKmsCredentials, AwsKmsKeyService};
#[cfg(feature = "pkcs11")]
pub use keyservice::{Pkcs11Config, Pkcs11KeyService, Pkcs11Pin, Pkcs11PoolStats};
#[cfg(feature = "postgres")]
pub use keystore::postgres::{Inventory, InventoryEntry, PostgresKeyStore, RegisteredColumn};
pub use keystore::{rewrap_record, FileKeyStore, KeyStore, MemoryKeyStore};
pub use pan::{
    Cvv, MaskStyle, Pan, PanRules, ABSOLUTE_MIN_PAN_DIGITS, DEFAULT_MIN_PAN_DIGITS, MAX_PAN_DIGITS,
};
