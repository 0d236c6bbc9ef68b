//! The in-process key service.
//!
//! **Not for production PAN data.** Its KEKs live in the same process (and
//! memory) as the application, so it cuts none of the links that a separate
//! key service cuts. It exists for tests, examples and single-binary
//! development, and as the reference behaviour the other backends are
//! tested against.

use std::sync::{Arc, RwLock};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use async_trait::async_trait;
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

use super::{sealed, KekInfo, KeyService, Permissions};
use crate::audit::Access;
use crate::error::KeyServiceError;
use crate::keys::{Dek, Environment, KekRef, KeyPurpose, KeyRequest, KeyState, WrappedKey};

const KEK_ID: &str = "local";
const WRAPPED_LEN: usize = 12 + 32 + 16;

struct Kek {
    version: u32,
    state: KeyState,
    /// `None` once destroyed (the cipher and its key schedule are wiped).
    cipher: Option<Aes256Gcm>,
}

struct Inner {
    environment: Environment,
    keks: RwLock<Vec<Kek>>,
}

/// An in-process key service with versioned AES-256-GCM KEKs.
///
/// Cheap to clone; clones share the KEKs. [`LocalKeyService::restricted`]
/// hands out a handle with fewer permissions, e.g. a wrap-only credential
/// for an encrypt-only front end.
///
/// See the module documentation: not for production PAN data.
#[derive(Clone)]
pub struct LocalKeyService {
    inner: Arc<Inner>,
    permissions: Permissions,
}

impl std::fmt::Debug for LocalKeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyService")
            .field("environment", &self.inner.environment)
            .field("permissions", &self.permissions)
            .finish_non_exhaustive()
    }
}

impl LocalKeyService {
    /// A service for `environment` with a fresh KEK (version 1) from the OS
    /// CSPRNG and every permission.
    pub fn new(environment: Environment) -> Self {
        let mut key = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut key);
        let s = Self::with_kek(environment, &key);
        key.zeroize();
        s
    }

    fn with_kek(environment: Environment, key: &[u8; 32]) -> Self {
        LocalKeyService {
            inner: Arc::new(Inner {
                environment,
                keks: RwLock::new(vec![Kek {
                    version: 1,
                    state: KeyState::Active,
                    cipher: Some(Aes256Gcm::new(key.into())),
                }]),
            }),
            permissions: Permissions::all(),
        }
    }

    /// A service whose KEK version 1 is `key`. **Hazardous**: only for
    /// known-answer tests and committed test vectors.
    #[cfg(feature = "hazmat-test-keys")]
    pub fn from_kek_bytes_insecure(environment: Environment, key: [u8; 32]) -> Self {
        Self::with_kek(environment, &key)
    }

    /// A handle to the same KEKs limited to `permissions` (never more than
    /// this handle has).
    pub fn restricted(&self, permissions: Permissions) -> Self {
        let p = &self.permissions;
        LocalKeyService {
            inner: Arc::clone(&self.inner),
            permissions: Permissions {
                wrap: p.wrap && permissions.wrap,
                unwrap: p.unwrap && permissions.unwrap,
                index: p.index && permissions.index,
                reveal: p.reveal && permissions.reveal,
                rewrap: p.rewrap && permissions.rewrap,
                custodian: p.custodian && permissions.custodian,
            },
        }
    }

    /// This handle's permissions.
    pub fn permissions(&self) -> Permissions {
        self.permissions
    }

    /// Retires a KEK version: it unwraps but never wraps again. Needs
    /// `custodian`.
    ///
    /// # Errors
    ///
    /// Permission, unknown version, or a version that is the only active one.
    pub fn retire_kek(&self, version: u32) -> Result<(), KeyServiceError> {
        self.change_kek(version, KeyState::DecryptOnly)
    }

    /// Destroys a KEK version: its key is wiped and every DEK wrapped only
    /// under it becomes unrecoverable. Needs `custodian`. (The local service
    /// has no dual control; `panseal-keyd` requires two custodians.)
    ///
    /// # Errors
    ///
    /// Permission, unknown version, or a version that is the only active one.
    pub fn destroy_kek(&self, version: u32) -> Result<(), KeyServiceError> {
        self.change_kek(version, KeyState::Destroyed)
    }

    fn change_kek(&self, version: u32, to: KeyState) -> Result<(), KeyServiceError> {
        self.require(self.permissions.custodian, "custodian")?;
        let mut keks = self.inner.keks.write().unwrap_or_else(|p| p.into_inner());
        let newest = keks.last().map(|k| k.version).unwrap_or(0);
        let kek = keks
            .iter_mut()
            .find(|k| k.version == version)
            .ok_or_else(|| KeyServiceError::UnknownKek(kek_name(version)))?;
        if version == newest {
            return Err(KeyServiceError::Other(
                "the newest KEK version cannot be retired or destroyed; rotate first".into(),
            ));
        }
        if !kek.state.can_become(to) && kek.state != to {
            return Err(KeyServiceError::Other(format!(
                "KEK {} cannot go from {:?} to {:?}",
                kek_name(version),
                kek.state,
                to
            )));
        }
        kek.state = to;
        if to == KeyState::Destroyed {
            kek.cipher = None;
        }
        Ok(())
    }

    fn require(&self, allowed: bool, what: &str) -> Result<(), KeyServiceError> {
        if allowed {
            Ok(())
        } else {
            Err(KeyServiceError::PermissionDenied(format!(
                "this credential lacks the {what} permission"
            )))
        }
    }

    fn check_env(&self, request: &KeyRequest) -> Result<(), KeyServiceError> {
        if request.environment != self.inner.environment {
            return Err(KeyServiceError::Environment {
                service: self.inner.environment.to_string(),
                request: request.environment.to_string(),
            });
        }
        Ok(())
    }

    fn wrap_now(
        &self,
        request: &KeyRequest,
        key: &[u8; 32],
    ) -> Result<WrappedKey, KeyServiceError> {
        let keks = self.inner.keks.read().unwrap_or_else(|p| p.into_inner());
        let kek = keks
            .last()
            .ok_or_else(|| KeyServiceError::UnknownKek(KEK_ID.into()))?;
        let cipher = kek
            .cipher
            .as_ref()
            .ok_or_else(|| KeyServiceError::KekDestroyed(kek_name(kek.version)))?;
        let kek_ref = KekRef {
            id: KEK_ID.into(),
            version: kek.version,
        };
        let mut nonce = [0u8; 12];
        rand_core::OsRng.fill_bytes(&mut nonce);
        let bytes = wrap_raw(cipher, &kek_ref, request, key, nonce);
        Ok(WrappedKey {
            kek: kek_ref,
            bytes,
        })
    }

    fn unwrap_now(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
    ) -> Result<Dek, KeyServiceError> {
        if wrapped.kek.id != KEK_ID {
            return Err(KeyServiceError::UnknownKek(wrapped.kek.to_string()));
        }
        let keks = self.inner.keks.read().unwrap_or_else(|p| p.into_inner());
        let kek = keks
            .iter()
            .find(|k| k.version == wrapped.kek.version)
            .ok_or_else(|| KeyServiceError::UnknownKek(wrapped.kek.to_string()))?;
        let cipher = kek
            .cipher
            .as_ref()
            .ok_or_else(|| KeyServiceError::KekDestroyed(wrapped.kek.to_string()))?;
        unwrap_raw(cipher, &wrapped.kek, request, &wrapped.bytes)
    }

    fn info(&self) -> KekInfo {
        let keks = self.inner.keks.read().unwrap_or_else(|p| p.into_inner());
        let (version, state) = keks
            .last()
            .map(|k| (k.version, k.state))
            .unwrap_or((0, KeyState::Destroyed));
        KekInfo {
            id: KEK_ID.into(),
            version,
            algorithm: "AES-256-GCM".into(),
            strength_bits: 256,
            environment: self.inner.environment.to_string(),
            state,
        }
    }
}

/// AES-256-GCM wrap of a 32-byte key bound to the request and KEK version
/// (`FORMAT.md`, "Wrap binding"): `nonce || ciphertext || tag`, 60 bytes.
pub(crate) fn wrap_raw(
    cipher: &Aes256Gcm,
    kek: &KekRef,
    request: &KeyRequest,
    key: &[u8; 32],
    nonce: [u8; 12],
) -> Vec<u8> {
    let aad = request.wrap_aad(kek);
    let mut out = vec![0u8; WRAPPED_LEN];
    out[..12].copy_from_slice(&nonce);
    out[12..44].copy_from_slice(key);
    // Fails only for messages longer than GCM allows; 32 bytes never are.
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut out[12..44])
        .unwrap_or_default();
    out[44..].copy_from_slice(&tag);
    out
}

/// Reverses [`wrap_raw`]; any mismatch is the opaque `UnwrapFailed`.
pub(crate) fn unwrap_raw(
    cipher: &Aes256Gcm,
    kek: &KekRef,
    request: &KeyRequest,
    wrapped: &[u8],
) -> Result<Dek, KeyServiceError> {
    let key = unwrap_raw_bytes(cipher, kek, request, wrapped)?;
    Ok(Dek::from_unwrapped(&key))
}

/// [`unwrap_raw`] returning the key bytes in a wiping buffer.
pub(crate) fn unwrap_raw_bytes(
    cipher: &Aes256Gcm,
    kek: &KekRef,
    request: &KeyRequest,
    wrapped: &[u8],
) -> Result<Zeroizing<[u8; 32]>, KeyServiceError> {
    if wrapped.len() != WRAPPED_LEN {
        return Err(KeyServiceError::UnwrapFailed);
    }
    let aad = request.wrap_aad(kek);
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&wrapped[12..44]);
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(&wrapped[..12]),
            &aad,
            &mut key[..],
            wrapped[44..].into(),
        )
        .map_err(|_| KeyServiceError::UnwrapFailed)?;
    Ok(key)
}

fn kek_name(version: u32) -> String {
    format!("{KEK_ID}#v{version}")
}

impl sealed::Sealed for LocalKeyService {}

#[async_trait]
impl KeyService for LocalKeyService {
    async fn kek_info(&self) -> Result<KekInfo, KeyServiceError> {
        Ok(self.info())
    }

    async fn wrap(&self, request: &KeyRequest, dek: &Dek) -> Result<WrappedKey, KeyServiceError> {
        self.require(self.permissions.wrap, "wrap")?;
        self.check_env(request)?;
        self.wrap_now(request, dek.expose_secret())
    }

    async fn unwrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
        _access: &Access,
    ) -> Result<Dek, KeyServiceError> {
        match request.purpose {
            KeyPurpose::Data => self.require(self.permissions.unwrap, "unwrap")?,
            KeyPurpose::Index => self.require(self.permissions.index, "index")?,
        }
        self.check_env(request)?;
        self.unwrap_now(request, wrapped)
    }

    async fn rewrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, KeyServiceError> {
        self.require(self.permissions.rewrap, "rewrap")?;
        self.check_env(request)?;
        let dek = self.unwrap_now(request, wrapped)?;
        self.wrap_now(request, dek.expose_secret())
    }

    async fn rotate_kek(&self) -> Result<KekInfo, KeyServiceError> {
        self.require(self.permissions.custodian, "custodian")?;
        {
            let mut keks = self.inner.keks.write().unwrap_or_else(|p| p.into_inner());
            let next = keks.last().map(|k| k.version).unwrap_or(0) + 1;
            let mut key = [0u8; 32];
            rand_core::OsRng.fill_bytes(&mut key);
            if let Some(prev) = keks.last_mut() {
                if prev.state == KeyState::Active {
                    prev.state = KeyState::DecryptOnly;
                }
            }
            keks.push(Kek {
                version: next,
                state: KeyState::Active,
                cipher: Some(Aes256Gcm::new((&key).into())),
            });
            key.zeroize();
        }
        Ok(self.info())
    }
}
