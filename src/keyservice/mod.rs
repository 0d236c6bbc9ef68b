//! Key services: where key-encryption keys (KEKs) live and wrap/unwrap DEKs.
//!
//! [`KeyService`] is the one trait; the implementations are chosen by the
//! user: [`LocalKeyService`] (in-process, for tests, examples and
//! development), `Pkcs11KeyService` (feature `pkcs11`: HSMs),
//! `AwsKmsKeyService` (feature `aws-kms`: AWS KMS and compatible services),
//! and the `panseal-keyd` client behind its own feature. The trait is sealed: a backend must keep
//! plaintext keys inside this crate's zeroizing types, so new backends are
//! added here.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::access::Access;
use crate::context::Context;
use crate::error::{AdmitItemError, KeyServiceError};
use crate::format::SealedPan;
use crate::ingest::{IngestKeyInfo, IngestSealed};
use crate::keys::{
    Dek, KeyPurpose, KeyRequest, KeyState, RecordTag, Scope, WrappedDek, WrappedKey,
};
use crate::pan::Pan;
use crate::Opened;

#[cfg(feature = "aws-kms")]
mod aws_kms;
pub(crate) mod local;
#[cfg(feature = "pkcs11")]
mod pkcs11;

#[cfg(feature = "aws-kms")]
pub use aws_kms::{AwsKmsConfig, AwsKmsCredentials, AwsKmsKeyService};
pub use local::LocalKeyService;
#[cfg(feature = "pkcs11")]
pub use pkcs11::{Pkcs11Config, Pkcs11KeyService, Pkcs11Pin, Pkcs11PoolStats};

/// Index keys live and are used only inside a key service: none is
/// wrapped for, or unwrapped to, a caller.
pub(crate) fn refuse_index_purpose(request: &KeyRequest) -> Result<(), KeyServiceError> {
    if request.purpose == KeyPurpose::Index {
        return Err(KeyServiceError::PermissionDenied(
            "index keys never leave the key service (use blind_index)".into(),
        ));
    }
    Ok(())
}

pub(crate) mod sealed {
    /// Prevents implementations outside this crate.
    pub trait Sealed {}
}

/// What a credential may do with a key service. Front ends that only store
/// cards get [`Permissions::wrap_only`]: they can create and wrap DEKs but
/// never unwrap one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Permissions {
    /// Create and wrap new keys.
    pub wrap: bool,
    /// Unwrap data keys (decrypt PANs).
    pub unwrap: bool,
    /// Ask the service for blind-index values (keyed hashes of PANs,
    /// computed inside the service); the index key itself never leaves it.
    pub index: bool,
    /// Ask the service to open one sealed record and return its PAN
    /// (per-record, counted in distinct records per window); never
    /// receives a DEK.
    pub reveal: bool,
    /// Rewrap under the newest KEK version (the key never leaves the service).
    pub rewrap: bool,
    /// Admit ingest ciphertexts into the compact form inside the service
    /// ([`KeyService::admit`]): the PAN and the DEK stay in the service.
    pub admit: bool,
    /// KEK lifecycle: rotate, retire, destroy.
    pub custodian: bool,
}

impl Permissions {
    /// Everything.
    pub const fn all() -> Self {
        Permissions {
            wrap: true,
            unwrap: true,
            index: true,
            reveal: true,
            rewrap: true,
            admit: true,
            custodian: true,
        }
    }

    /// Nothing: a write-only front end's credential, which may only list a
    /// scope's ingest public keys.
    pub const fn none() -> Self {
        Permissions {
            wrap: false,
            unwrap: false,
            index: false,
            reveal: false,
            rewrap: false,
            admit: false,
            custodian: false,
        }
    }

    /// Encrypt-only front end: wrap new DEKs and compute blind indexes, never
    /// unwrap a data key.
    pub const fn wrap_only() -> Self {
        Permissions {
            wrap: true,
            unwrap: false,
            index: true,
            reveal: false,
            rewrap: false,
            admit: false,
            custodian: false,
        }
    }

    /// An application that seals and opens.
    pub const fn application() -> Self {
        Permissions {
            wrap: true,
            unwrap: true,
            index: true,
            reveal: false,
            rewrap: false,
            admit: false,
            custodian: false,
        }
    }

    /// Whether every permission in `other` is also in `self`.
    pub fn includes(&self, other: &Permissions) -> bool {
        (self.wrap || !other.wrap)
            && (self.unwrap || !other.unwrap)
            && (self.index || !other.index)
            && (self.reveal || !other.reveal)
            && (self.rewrap || !other.rewrap)
            && (self.admit || !other.admit)
            && (self.custodian || !other.custodian)
    }
}

/// One version of a scope's blind-index key. The key lives inside the key
/// service (keyd state, an HSM object, a KMS key); only these facts leave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct IndexKeyInfo {
    /// The scope the key serves.
    pub scope: Scope,
    /// Version 1, 2, … within the scope.
    pub version: u32,
    /// [`KeyState::Active`]: computes the values new rows store;
    /// [`KeyState::DecryptOnly`]: lookup only (kept while a re-index job
    /// moves rows to a newer version); destroyed versions are not listed.
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: u64,
}

/// A request to open one sealed record inside the key service
/// ([`KeyService::reveal`]): the ciphertext, its context and the
/// authenticated key-store record of its DEK. The service unwraps the DEK
/// into its own memory, opens, and returns only the PAN.
#[derive(Clone, Copy)]
pub struct RevealRequest<'a> {
    /// The DEK's key-store record (with its [`RecordTag`]).
    pub record: &'a WrappedDek,
    /// The sealed PAN.
    pub sealed: &'a SealedPan,
    /// The context it was sealed under.
    pub context: &'a Context,
}

/// A request to open one ingest ciphertext inside the key service
/// ([`KeyService::open_ingest`]).
#[derive(Clone, Copy)]
pub struct IngestOpenRequest<'a> {
    /// The scope whose ingest key sealed it (the service's environment).
    pub scope: &'a Scope,
    /// The ingest ciphertext.
    pub sealed: &'a IngestSealed,
    /// The context it was sealed under.
    pub context: &'a Context,
}

/// One ingest ciphertext to admit, with its context.
#[derive(Clone, Copy)]
pub struct AdmitItem<'a> {
    /// The ingest ciphertext.
    pub sealed: &'a IngestSealed,
    /// The context it was sealed under (and the compact form is bound to).
    pub context: &'a Context,
}

/// A batch to admit ([`KeyService::admit`]): ingest ciphertexts of the
/// record's scope, turned into compact ciphertexts under the record's DEK
/// and blind-indexed under `index_versions`, inside the service.
#[derive(Clone, Copy)]
pub struct AdmitRequest<'a> {
    /// The authenticated key-store record of an active data DEK of the
    /// scope (made with [`KeyService::generate_wrapped`], so its plaintext
    /// never left the service).
    pub record: &'a WrappedDek,
    /// The index-key versions to compute (usually the active one); may be
    /// empty.
    pub index_versions: &'a [u32],
    /// The ciphertexts, at most [`MAX_ADMIT_BATCH`].
    pub items: &'a [AdmitItem<'a>],
}

/// The most items one [`KeyService::admit`] request carries (clients split
/// larger batches).
pub const MAX_ADMIT_BATCH: usize = 1024;

/// One admitted item: the compact ciphertext and its blind-index values
/// (one per requested version, in order).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdmitOutput {
    /// The compact form, under the request's DEK, bound to the item's
    /// context.
    pub sealed: SealedPan,
    /// HMAC-SHA-256 values, one per `index_versions` entry.
    pub index: Vec<[u8; 32]>,
}

impl AdmitOutput {
    /// An output (for key-service implementations in this crate's tests).
    pub fn new(sealed: SealedPan, index: Vec<[u8; 32]>) -> Self {
        AdmitOutput { sealed, index }
    }
}

/// Non-secret facts about a key service's current KEK.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct KekInfo {
    /// The KEK's identifier.
    pub id: String,
    /// The version that wraps new keys.
    pub version: u32,
    /// Algorithm, e.g. `AES-256-GCM`.
    pub algorithm: String,
    /// Security strength in bits (must be at least the DEK's 256).
    pub strength_bits: u32,
    /// The environment tag the service serves.
    pub environment: String,
    /// The state of this version.
    pub state: KeyState,
}

/// A service that holds KEKs and wraps, unwraps and rewraps DEKs under them.
///
/// Every call binds the wrap to the [`KeyRequest`] (id, scope, environment,
/// purpose) and the KEK version as associated data, so a wrapped key moved to
/// another record, scope or environment, or rolled back to another KEK
/// version, fails with [`KeyServiceError::UnwrapFailed`] (PCI DSS 3.7.7).
///
/// Methods return [`KeyServiceError`]; use
/// [`KeyServiceError::is_retryable`] to tell outages from refusals.
#[async_trait]
pub trait KeyService: sealed::Sealed + Send + Sync {
    /// Facts about the KEK version that wraps new keys.
    async fn kek_info(&self) -> Result<KekInfo, KeyServiceError>;

    /// Wraps `dek` under the current KEK version. Needs `wrap`.
    async fn wrap(&self, request: &KeyRequest, dek: &Dek) -> Result<WrappedKey, KeyServiceError>;

    /// Creates a fresh key and returns it with its wrap. Needs `wrap`.
    /// Services with their own generator (HSM, KMS) use it; the default
    /// draws from the OS CSPRNG.
    async fn generate(&self, request: &KeyRequest) -> Result<(Dek, WrappedKey), KeyServiceError> {
        let dek = Dek::generate();
        let wrapped = self.wrap(request, &dek).await?;
        Ok((dek, wrapped))
    }

    /// Unwraps a key on behalf of `access`. Needs `unwrap` (data keys) or
    /// `index` (index keys).
    async fn unwrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
        access: &Access,
    ) -> Result<Dek, KeyServiceError>;

    /// Re-encrypts a wrapped key under the newest KEK version without the
    /// key leaving the service. Needs `rewrap`.
    async fn rewrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, KeyServiceError>;

    /// Creates a new KEK version that wraps from now on; older versions keep
    /// unwrapping. Needs `custodian`.
    async fn rotate_kek(&self) -> Result<KekInfo, KeyServiceError>;

    /// What this service's credential may do. `Panseal::open_pan` uses it to
    /// choose between unwrapping a DEK (`unwrap`) and asking the service to
    /// open the one record (`reveal` without `unwrap`).
    async fn permissions(&self) -> Result<Permissions, KeyServiceError> {
        Ok(Permissions {
            reveal: false,
            ..Permissions::all()
        })
    }

    // ----- blind index: keyed hashes computed inside the service -------------

    /// The live index-key versions of `scope`, newest first (at most one
    /// [`KeyState::Active`]). Empty if a custodian has not created one yet.
    /// Needs `index`.
    async fn index_keys(&self, scope: &Scope) -> Result<Vec<IndexKeyInfo>, KeyServiceError> {
        let _ = scope;
        Err(KeyServiceError::Unsupported("index_keys"))
    }

    /// HMAC-SHA-256 of each PAN's ASCII digits under each of `versions` of
    /// `scope`'s index key, computed inside the service: the result holds
    /// `pans.len() * versions.len()` values, PAN-major (`pans[i]` under
    /// `versions[j]` at `i * versions.len() + j`). One request, one quota
    /// charge of `pans.len() * versions.len()` hashes, one audit record
    /// (count only, never a PAN). Needs `index`.
    ///
    /// # Errors
    ///
    /// [`KeyServiceError::UnknownIndexKey`] for a version that is not live,
    /// [`KeyServiceError::BatchItem`] naming the position of a PAN the
    /// service refuses (never echoing it), quota, permission and outage
    /// errors. Nothing is computed for a refused batch.
    async fn blind_index(
        &self,
        scope: &Scope,
        versions: &[u32],
        pans: &[&Pan],
        access: &Access,
    ) -> Result<Vec<[u8; 32]>, KeyServiceError> {
        let _ = (scope, versions, pans, access);
        Err(KeyServiceError::Unsupported("blind_index"))
    }

    /// Creates the next index-key version of `scope` inside the service; it
    /// becomes active and the previous active version becomes lookup-only.
    /// Needs `custodian`: nothing outside the service (a key-store row, a
    /// `wrap` credential) can choose which key hashes.
    async fn create_index_key(&self, scope: &Scope) -> Result<IndexKeyInfo, KeyServiceError> {
        let _ = scope;
        Err(KeyServiceError::Unsupported("create_index_key"))
    }

    /// Moves an index-key version forward along the lifecycle
    /// ([`KeyState::DecryptOnly`] = lookup only, [`KeyState::Destroyed`]
    /// after a re-index job moved every row off it). Needs `custodian`.
    async fn set_index_key_state(
        &self,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), KeyServiceError> {
        let _ = (scope, version, state);
        Err(KeyServiceError::Unsupported("set_index_key_state"))
    }

    // ----- authenticated key-store records -----------------------------------

    /// The service's MAC over `record`'s canonical encoding
    /// (`FORMAT.md`, "Key-store record, version 2"), under a record key that
    /// never leaves the service. `previous` is the stored record it replaces
    /// (with its tag), `None` for a new record; the service checks the
    /// change is one the lifecycle allows (`keys::check_transition`: state
    /// only forward, dates never extended, use count never lowered, identity
    /// fields and sequence unchanged/incremented) before it signs. Needs
    /// `wrap` (a new active record, a use-count report, retiring one's own
    /// key) or `custodian` (any other transition).
    async fn authenticate_record(
        &self,
        previous: Option<&WrappedDek>,
        record: &WrappedDek,
    ) -> Result<RecordTag, KeyServiceError> {
        let _ = (previous, record);
        Err(KeyServiceError::Unsupported("authenticate_record"))
    }

    /// Checks `record`'s tag. Services that remember the newest sequence
    /// they signed per record (keyd) also refuse an older, once-valid
    /// record (a rollback).
    ///
    /// # Errors
    ///
    /// [`KeyServiceError::RecordTampered`] or [`KeyServiceError::RecordStale`].
    async fn verify_record(&self, record: &WrappedDek) -> Result<(), KeyServiceError> {
        let _ = record;
        Err(KeyServiceError::Unsupported("verify_record"))
    }

    // ----- per-record reveal -------------------------------------------------

    /// Opens one sealed record inside the service on behalf of `access` and
    /// returns only its PAN. Counted per distinct record (context +
    /// ciphertext) per principal per window; one audit record per reveal
    /// (principal, on-behalf-of, purpose, context; never the PAN). Needs
    /// `reveal`. Services that hand DEKs to their callers (local, PKCS#11,
    /// KMS) do not offer it.
    ///
    /// # Errors
    ///
    /// [`KeyServiceError::OpenFailed`] (opaque) for an altered ciphertext
    /// or a wrong context, [`KeyServiceError::RecordTampered`], quota,
    /// permission and outage errors.
    async fn reveal(
        &self,
        request: &RevealRequest<'_>,
        access: &Access,
    ) -> Result<Opened, KeyServiceError> {
        let _ = (request, access);
        Err(KeyServiceError::Unsupported("reveal"))
    }

    // ----- write-only ingest (HPKE) ------------------------------------------

    /// The live ingest-key versions of `scope`, newest first (at most one
    /// [`KeyState::Active`]), with their public keys. Any authenticated
    /// principal may ask: a front end fetches and pins the public key.
    async fn ingest_keys(&self, scope: &Scope) -> Result<Vec<IngestKeyInfo>, KeyServiceError> {
        let _ = scope;
        Err(KeyServiceError::Unsupported("ingest_keys"))
    }

    /// Creates the next ingest key pair of `scope` inside the service; it
    /// becomes active and the previous active version is retired (opens,
    /// never seals). Needs `custodian`.
    async fn create_ingest_key(&self, scope: &Scope) -> Result<IngestKeyInfo, KeyServiceError> {
        let _ = scope;
        Err(KeyServiceError::Unsupported("create_ingest_key"))
    }

    /// Moves an ingest-key version forward ([`KeyState::DecryptOnly`] =
    /// retired, [`KeyState::Destroyed`] = the private key is erased). Needs
    /// `custodian`.
    async fn set_ingest_key_state(
        &self,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), KeyServiceError> {
        let _ = (scope, version, state);
        Err(KeyServiceError::Unsupported("set_ingest_key_state"))
    }

    /// Opens one ingest ciphertext inside the service and returns its PAN
    /// (with `needs_reseal`: ingest ciphertexts are admitted, not kept).
    /// Needs `reveal` (counted and audited as a reveal) or `unwrap`.
    ///
    /// # Errors
    ///
    /// [`KeyServiceError::OpenFailed`] (opaque) for an altered ciphertext,
    /// a wrong context or another scope's key;
    /// [`KeyServiceError::UnknownIngestKey`]; quota, permission and outage
    /// errors.
    async fn open_ingest(
        &self,
        request: &IngestOpenRequest<'_>,
        access: &Access,
    ) -> Result<Opened, KeyServiceError> {
        let _ = (request, access);
        Err(KeyServiceError::Unsupported("open_ingest"))
    }

    /// Creates a fresh data DEK and returns only its wrap: the plaintext
    /// never leaves the service. What an admission job seals under (through
    /// [`KeyService::admit`]). Needs `wrap`. The default (services that
    /// hand DEKs to callers anyway) generates and drops the plaintext.
    async fn generate_wrapped(&self, request: &KeyRequest) -> Result<WrappedKey, KeyServiceError> {
        let (dek, wrapped) = self.generate(request).await?;
        drop(dek);
        Ok(wrapped)
    }

    /// Admits a batch of ingest ciphertexts inside the service: opens each
    /// with the scope's ingest private key, seals it into the compact form
    /// under the record's DEK with a fresh nonce, bound to the same context,
    /// and computes its blind index; the PAN never leaves the service. One
    /// result per item, in order: a bad item does not stop the others.
    /// Needs `admit`; one audit record per request (count, never a PAN).
    ///
    /// # Errors
    ///
    /// For the whole request: the record is not an active, authenticated
    /// data DEK of a scope ([`KeyServiceError::RecordTampered`],
    /// [`KeyServiceError::RecordStale`], [`KeyServiceError::PermissionDenied`]),
    /// [`KeyServiceError::UnknownIndexKey`], quota, permission, outage.
    async fn admit(
        &self,
        request: &AdmitRequest<'_>,
        access: &Access,
    ) -> Result<Vec<Result<AdmitOutput, AdmitItemError>>, KeyServiceError> {
        let _ = (request, access);
        Err(KeyServiceError::Unsupported("admit"))
    }
}
