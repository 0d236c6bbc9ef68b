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

use crate::audit::Access;
use crate::error::KeyServiceError;
use crate::keys::{Dek, KeyRequest, KeyState, WrappedKey};

#[cfg(feature = "aws-kms")]
mod aws_kms;
pub(crate) mod local;
#[cfg(feature = "pkcs11")]
mod pkcs11;
#[cfg(feature = "keyd-client")]
mod remote;

#[cfg(feature = "aws-kms")]
pub use aws_kms::{AwsKmsConfig, AwsKmsCredentials, AwsKmsKeyService};
pub use local::LocalKeyService;
#[cfg(feature = "pkcs11")]
pub use pkcs11::{Pkcs11Config, Pkcs11KeyService, Pkcs11Pin, Pkcs11PoolStats};
#[cfg(feature = "keyd-client")]
pub use remote::{RemoteKeyService, RemoteKeyServiceBuilder};

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
    /// Unwrap blind-index keys (compute lookup hashes; no PAN decryption).
    pub index: bool,
    /// Rewrap under the newest KEK version (the key never leaves the service).
    pub rewrap: bool,
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
            rewrap: true,
            custodian: true,
        }
    }

    /// Encrypt-only front end: wrap new DEKs and compute blind indexes, never
    /// unwrap a data key.
    pub const fn wrap_only() -> Self {
        Permissions {
            wrap: true,
            unwrap: false,
            index: true,
            rewrap: false,
            custodian: false,
        }
    }

    /// An application that seals and opens.
    pub const fn application() -> Self {
        Permissions {
            wrap: true,
            unwrap: true,
            index: true,
            rewrap: false,
            custodian: false,
        }
    }

    /// Whether every permission in `other` is also in `self`.
    pub fn includes(&self, other: &Permissions) -> bool {
        (self.wrap || !other.wrap)
            && (self.unwrap || !other.unwrap)
            && (self.index || !other.index)
            && (self.rewrap || !other.rewrap)
            && (self.custodian || !other.custodian)
    }
}

/// Non-secret facts about a key service's current KEK.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}
