//! The in-process key service.
//!
//! **Not for production PAN data.** Its KEKs live in the same process (and
//! memory) as the application, so it cuts none of the links that a separate
//! key service cuts. It exists for tests, examples and single-binary
//! development, and as the reference behaviour the other backends are
//! tested against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use async_trait::async_trait;
use rand::RngCore;
use sha2::digest::generic_array::GenericArray;
use zeroize::{Zeroize, Zeroizing};

use super::{
    sealed, AdmitOutput, AdmitRequest, IndexKeyInfo, IngestOpenRequest, KekInfo, KeyService,
    Permissions, MAX_ADMIT_BATCH,
};
use crate::access::Access;
use crate::error::{AdmitItemError, Error, KeyError, KeyServiceError};
use crate::ingest::{IngestKeyInfo, IngestPrivateKey, IngestSealed};
use crate::keys::{
    unix_now, Dek, Environment, KekRef, KeyId, KeyPurpose, KeyRequest, KeyState, RecordTag, Scope,
    WrappedDek, WrappedKey,
};
use crate::pan::Pan;
use crate::Opened;

const KEK_ID: &str = "local";
const WRAPPED_LEN: usize = 12 + 32 + 16;

/// HKDF-SHA-256 `info` of the record key derived from the KEK bytes in
/// [`LocalKeyService::from_kek_bytes_insecure`] (`FORMAT.md` §9).
#[cfg_attr(not(feature = "hazmat-test-keys"), allow(dead_code))]
pub(crate) const RECORD_KEY_INFO: &[u8] = b"panseal-local-record-key-v1";
/// HKDF-SHA-256 `info` prefix of the index keys derived from the KEK bytes
/// in [`LocalKeyService::from_kek_bytes_insecure`] (`FORMAT.md` §11).
pub(crate) const INDEX_KEY_INFO: &[u8] = b"panseal-local-index-key-v1";
/// HKDF-SHA-256 `info` prefix of the ingest scalars derived from the KEK
/// bytes in [`LocalKeyService::from_kek_bytes_insecure`] (`FORMAT.md` §17).
pub(crate) const INGEST_KEY_INFO: &[u8] = b"panseal-local-ingest-key-v1";
/// Most PANs × versions one `blind_index` request may ask for.
pub(crate) const MAX_INDEX_BATCH: usize = 100_000;
/// Most freshly wrapped, not yet signed key ids remembered (see
/// [`LocalKeyService`]'s record rules).
const MAX_PENDING: usize = 65_536;

/// One version of a scope's index key, held only here.
struct IndexKey {
    version: u32,
    state: KeyState,
    created_at: u64,
    /// `None` once destroyed (wiped).
    key: Option<Zeroizing<[u8; 32]>>,
}

/// One version of a scope's ingest key pair, held only here.
struct IngestKey {
    version: u32,
    state: KeyState,
    created_at: u64,
    /// The public half (kept after destruction, never listed then).
    public: crate::ingest::IngestPublicKey,
    /// `None` once destroyed (the scalar is wiped on drop).
    key: Option<IngestPrivateKey>,
}

/// Record authentication state.
struct Records {
    /// Newest sequence signed or verified per record id (rollback within
    /// this process).
    newest: HashMap<KeyId, u64>,
    /// Ids this service wrapped a fresh key for, with the wrapped bytes,
    /// not yet signed: a new record signed with only `wrap` must be one of
    /// them.
    pending: HashMap<KeyId, Vec<u8>>,
}

struct Kek {
    version: u32,
    state: KeyState,
    /// `None` once destroyed (the cipher and its key schedule are wiped).
    cipher: Option<Aes256Gcm>,
}

struct Inner {
    environment: Environment,
    keks: RwLock<Vec<Kek>>,
    /// Index keys per scope, oldest version first.
    index: RwLock<HashMap<Scope, Vec<IndexKey>>>,
    /// Ingest key pairs per scope, oldest version first.
    ingest: RwLock<HashMap<Scope, Vec<IngestKey>>>,
    /// The key record tags are made with.
    record_key: Zeroizing<[u8; 32]>,
    /// Set only by `from_kek_bytes_insecure`: index keys are derived from
    /// it (so test vectors reproduce) instead of drawn from the CSPRNG.
    seed: Option<Zeroizing<[u8; 32]>>,
    records: Mutex<Records>,
}

/// An in-process key service with versioned AES-256-GCM KEKs.
///
/// Cheap to clone; clones share the KEKs. [`LocalKeyService::restricted`]
/// hands out a handle with fewer permissions, e.g. a wrap-only credential
/// for an encrypt-only front end.
///
/// It also holds each scope's blind-index keys (created by
/// [`KeyService::create_index_key`], used only inside it by
/// [`KeyService::blind_index`]; never returned) and a record key that
/// signs key-store records ([`KeyService::authenticate_record`]) after
/// [`WrappedDek::check_transition`] with this handle's permissions. A new
/// record signed with only `wrap` must name a key this service wrapped for
/// that id and not signed yet. [`KeyService::verify_record`] checks the tag
/// in constant time and refuses a record older than the newest one this
/// process signed or verified for the same id (a rollback); that memory
/// does not survive the process (`panseal-keyd` keeps it durably).
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
        let mut key = Zeroizing::new([0u8; 32]);
        rand_core::OsRng.fill_bytes(&mut key[..]);
        let mut record_key = Zeroizing::new([0u8; 32]);
        rand_core::OsRng.fill_bytes(&mut record_key[..]);
        Self::with_kek(environment, &key, record_key, None)
    }

    fn with_kek(
        environment: Environment,
        key: &[u8; 32],
        record_key: Zeroizing<[u8; 32]>,
        seed: Option<Zeroizing<[u8; 32]>>,
    ) -> Self {
        LocalKeyService {
            inner: Arc::new(Inner {
                environment,
                keks: RwLock::new(vec![Kek {
                    version: 1,
                    state: KeyState::Active,
                    cipher: Some(Aes256Gcm::new(key.into())),
                }]),
                index: RwLock::new(HashMap::new()),
                ingest: RwLock::new(HashMap::new()),
                record_key,
                seed,
                records: Mutex::new(Records {
                    newest: HashMap::new(),
                    pending: HashMap::new(),
                }),
            }),
            permissions: Permissions::all(),
        }
    }

    /// A service whose KEK version 1 is `key`, whose record key is
    /// HKDF-SHA-256(`key`, info `"panseal-local-record-key-v1"`), and whose
    /// index key version `v` of a scope is HKDF-SHA-256(`key`, info
    /// `"panseal-local-index-key-v1" || u8 len || environment || u8 len ||
    /// scope || u32 v`) (`FORMAT.md` §9, §11). **Hazardous**: only for
    /// known-answer tests and committed test vectors.
    #[cfg(feature = "hazmat-test-keys")]
    pub fn from_kek_bytes_insecure(environment: Environment, key: [u8; 32]) -> Self {
        let key = Zeroizing::new(key);
        let record_key = hkdf32(&key, &[RECORD_KEY_INFO]);
        Self::with_kek(environment, &key, record_key, Some(Zeroizing::new(*key)))
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
                admit: p.admit && permissions.admit,
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

    /// Remembers that a fresh key was wrapped for `id` (see the record
    /// rules on [`LocalKeyService`]).
    fn note_fresh(&self, id: KeyId, wrapped: &WrappedKey) {
        let mut records = self.inner.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.pending.len() >= MAX_PENDING {
            // Keys wrapped long ago and never stored: their records can
            // still be signed by a custodian.
            records.pending.clear();
        }
        records.pending.insert(id, wrapped.bytes.clone());
    }

    fn tag_ok(&self, record: &WrappedDek) -> Result<(), KeyServiceError> {
        let tampered = || KeyServiceError::RecordTampered(record.id.to_string());
        if record.environment != self.inner.environment {
            return Err(tampered());
        }
        let tag = record.tag.ok_or_else(tampered)?;
        // `RecordTag`'s equality is constant-time.
        if record_tag(&self.inner.record_key, record) != tag {
            return Err(tampered());
        }
        Ok(())
    }

    fn index_infos(&self, scope: &Scope) -> Vec<IndexKeyInfo> {
        let index = self.inner.index.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<IndexKeyInfo> = index
            .get(scope)
            .into_iter()
            .flatten()
            .filter(|k| k.state != KeyState::Destroyed)
            .map(|k| IndexKeyInfo {
                scope: scope.clone(),
                version: k.version,
                state: k.state,
                created_at: k.created_at,
            })
            .collect();
        out.sort_by_key(|k| std::cmp::Reverse(k.version));
        out
    }

    fn ingest_infos(&self, scope: &Scope) -> Vec<IngestKeyInfo> {
        let ingest = self.inner.ingest.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<IngestKeyInfo> = ingest
            .get(scope)
            .into_iter()
            .flatten()
            .filter(|k| k.state != KeyState::Destroyed)
            .map(|k| IngestKeyInfo {
                public_key: k.public.clone(),
                state: k.state,
                created_at: k.created_at,
            })
            .collect();
        out.sort_by_key(|k| std::cmp::Reverse(k.public_key.version()));
        out
    }

    /// A fresh ingest key pair: from the CSPRNG, or (hazmat test services)
    /// derived from the seed so vectors reproduce.
    fn new_ingest_key(&self, scope: &Scope, version: u32) -> IngestPrivateKey {
        let env = &self.inner.environment;
        if let Some(seed) = &self.inner.seed {
            let mut info = INGEST_KEY_INFO.to_vec();
            info.extend_from_slice(&index_key_info(env, scope, version)[INDEX_KEY_INFO.len()..]);
            // A scalar at or above the group order (probability ~2^-32):
            // derive again with a counter byte.
            for counter in 0u8..=255 {
                let scalar = hkdf32(seed, &[&info, &[counter]]);
                if let Ok(k) = IngestPrivateKey::from_scalar(env, scope, version, &scalar) {
                    return k;
                }
            }
        }
        IngestPrivateKey::generate(env, scope, version)
    }

    /// Opens one ingest ciphertext with `scope`'s key of its version;
    /// the packed PAN comes back unpacked.
    fn open_ingest_now(
        &self,
        scope: &Scope,
        sealed: &IngestSealed,
        context: &crate::Context,
    ) -> Result<Pan, AdmitItemError> {
        let version = sealed.key_version();
        let ingest = self.inner.ingest.read().unwrap_or_else(|p| p.into_inner());
        let key = ingest
            .get(scope)
            .into_iter()
            .flatten()
            .find(|k| k.version == version)
            .and_then(|k| k.key.as_ref())
            .ok_or(AdmitItemError::UnknownIngestKey(version))?;
        key.open(sealed, context).map_err(|e| match e {
            Error::Key(KeyError::IngestKeyMismatch) => AdmitItemError::KeyMismatch,
            _ => AdmitItemError::OpenFailed,
        })
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

/// HKDF-SHA-256 (RFC 5869, no salt) of `ikm` with `info` = the parts
/// concatenated, 32 bytes.
#[cfg_attr(not(feature = "hazmat-test-keys"), allow(dead_code))]
fn hkdf32(ikm: &[u8; 32], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, ikm);
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is always a valid HKDF-SHA-256 output length.
    let _ = hk.expand_multi_info(info, &mut out[..]);
    out
}

/// The `info` of a derived index key (see `from_kek_bytes_insecure`).
fn index_key_info(environment: &Environment, scope: &Scope, version: u32) -> Vec<u8> {
    let mut info = INDEX_KEY_INFO.to_vec();
    info.push(environment.as_str().len() as u8);
    info.extend_from_slice(environment.as_str().as_bytes());
    info.push(scope.as_str().len() as u8);
    info.extend_from_slice(scope.as_str().as_bytes());
    info.extend_from_slice(&version.to_be_bytes());
    info
}

/// SHA-256 initial state (FIPS 180-4, 5.3.3).
const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// HMAC-SHA-256 (RFC 2104) under a 32-byte key, on SHA-256's compression
/// function with every key- or message-dependent buffer wiped before
/// returning.
///
/// The `hmac` crate's state (the key XOR ipad/opad and the two chaining
/// values derived from them, which are as good as the key) cannot be
/// zeroized: its types have no `Zeroize` and are moved by value. Here the
/// padded key blocks, the chaining values and the message blocks live in
/// local arrays that are wiped. (`compress256` itself may leave message
/// words in registers or its own stack frame, as every implementation
/// does.) Checked against the `hmac` crate in the tests below.
pub(crate) fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    // Key block XOR ipad, then XOR opad.
    let mut pad = GenericArray::from([0x36u8; 64]);
    for (p, k) in pad.iter_mut().zip(key) {
        *p ^= k;
    }
    let mut inner = SHA256_IV;
    sha2::compress256(&mut inner, std::slice::from_ref(&pad));
    let mut block = GenericArray::from([0u8; 64]);
    let mut chunks = msg.chunks_exact(64);
    for chunk in &mut chunks {
        block.copy_from_slice(chunk);
        sha2::compress256(&mut inner, std::slice::from_ref(&block));
    }
    // The last block(s): rest || 0x80 || zeros || bit length of (64 + msg).
    let rest = chunks.remainder();
    block.fill(0);
    block[..rest.len()].copy_from_slice(rest);
    block[rest.len()] = 0x80;
    let bits = ((64 + msg.len() as u64) * 8).to_be_bytes();
    if rest.len() > 55 {
        sha2::compress256(&mut inner, std::slice::from_ref(&block));
        block.fill(0);
    }
    block[56..].copy_from_slice(&bits);
    sha2::compress256(&mut inner, std::slice::from_ref(&block));

    for p in pad.iter_mut() {
        *p ^= 0x36 ^ 0x5c;
    }
    let mut outer = SHA256_IV;
    sha2::compress256(&mut outer, std::slice::from_ref(&pad));
    // The outer message block: inner digest || 0x80 || zeros || 768 bits.
    block.fill(0);
    for (chunk, word) in block.chunks_exact_mut(4).zip(inner) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    block[32] = 0x80;
    block[56..].copy_from_slice(&((64u64 + 32) * 8).to_be_bytes());
    sha2::compress256(&mut outer, std::slice::from_ref(&block));

    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(outer) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    pad.as_mut_slice().zeroize();
    block.as_mut_slice().zeroize();
    inner.zeroize();
    outer.zeroize();
    out
}

/// The local service's record tag: HMAC-SHA-256(record key,
/// [`WrappedDek::signed_bytes`]) (`FORMAT.md` §9).
pub(crate) fn record_tag(record_key: &[u8; 32], record: &WrappedDek) -> RecordTag {
    RecordTag(hmac_sha256(record_key, &record.signed_bytes()))
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
        super::refuse_index_purpose(request)?;
        let wrapped = self.wrap_now(request, dek.expose_secret())?;
        self.note_fresh(request.id, &wrapped);
        Ok(wrapped)
    }

    async fn unwrap(
        &self,
        request: &KeyRequest,
        wrapped: &WrappedKey,
        _access: &Access,
    ) -> Result<Dek, KeyServiceError> {
        super::refuse_index_purpose(request)?;
        self.require(self.permissions.unwrap, "unwrap")?;
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

    async fn permissions(&self) -> Result<Permissions, KeyServiceError> {
        Ok(self.permissions)
    }

    async fn index_keys(&self, scope: &Scope) -> Result<Vec<IndexKeyInfo>, KeyServiceError> {
        self.require(self.permissions.index, "index")?;
        Ok(self.index_infos(scope))
    }

    async fn blind_index(
        &self,
        scope: &Scope,
        versions: &[u32],
        pans: &[&Pan],
        _access: &Access,
    ) -> Result<Vec<[u8; 32]>, KeyServiceError> {
        self.require(self.permissions.index, "index")?;
        let total = pans.len().saturating_mul(versions.len());
        if total > MAX_INDEX_BATCH {
            return Err(KeyServiceError::BatchItem {
                index: MAX_INDEX_BATCH / versions.len().max(1),
                reason: format!("a batch holds at most {MAX_INDEX_BATCH} PANs x versions"),
            });
        }
        let index = self.inner.index.read().unwrap_or_else(|p| p.into_inner());
        let live = index.get(scope);
        let mut keys = Vec::with_capacity(versions.len());
        for &version in versions {
            let key = live
                .into_iter()
                .flatten()
                .find(|k| k.version == version)
                .and_then(|k| k.key.as_ref())
                .ok_or_else(|| KeyServiceError::UnknownIndexKey {
                    scope: scope.to_string(),
                    version,
                })?;
            keys.push(key);
        }
        let mut out = Vec::with_capacity(total);
        for pan in pans {
            let digits = pan.expose_digits().as_bytes();
            for key in &keys {
                out.push(hmac_sha256(key, digits));
            }
        }
        Ok(out)
    }

    async fn create_index_key(&self, scope: &Scope) -> Result<IndexKeyInfo, KeyServiceError> {
        self.require(self.permissions.custodian, "custodian")?;
        let mut index = self.inner.index.write().unwrap_or_else(|p| p.into_inner());
        let keys = index.entry(scope.clone()).or_default();
        let version = keys.last().map(|k| k.version).unwrap_or(0) + 1;
        let key = match &self.inner.seed {
            Some(seed) => {
                let info = index_key_info(&self.inner.environment, scope, version);
                hkdf32(seed, &[&info])
            }
            None => {
                let mut k = Zeroizing::new([0u8; 32]);
                rand_core::OsRng.fill_bytes(&mut k[..]);
                k
            }
        };
        for k in keys.iter_mut().filter(|k| k.state == KeyState::Active) {
            k.state = KeyState::DecryptOnly;
        }
        let created_at = unix_now();
        keys.push(IndexKey {
            version,
            state: KeyState::Active,
            created_at,
            key: Some(key),
        });
        Ok(IndexKeyInfo {
            scope: scope.clone(),
            version,
            state: KeyState::Active,
            created_at,
        })
    }

    async fn set_index_key_state(
        &self,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), KeyServiceError> {
        self.require(self.permissions.custodian, "custodian")?;
        let mut index = self.inner.index.write().unwrap_or_else(|p| p.into_inner());
        let key = index
            .get_mut(scope)
            .and_then(|keys| {
                keys.iter_mut()
                    .find(|k| k.version == version && k.state != KeyState::Destroyed)
            })
            .ok_or_else(|| KeyServiceError::UnknownIndexKey {
                scope: scope.to_string(),
                version,
            })?;
        if key.state == state {
            return Ok(());
        }
        if !key.state.can_become(state) {
            return Err(KeyServiceError::Other(format!(
                "index key {scope} v{version} cannot go from {:?} to {state:?}",
                key.state
            )));
        }
        key.state = state;
        if state == KeyState::Destroyed {
            // Zeroizing wipes the bytes on drop.
            key.key = None;
        }
        Ok(())
    }

    async fn ingest_keys(&self, scope: &Scope) -> Result<Vec<IngestKeyInfo>, KeyServiceError> {
        Ok(self.ingest_infos(scope))
    }

    async fn create_ingest_key(&self, scope: &Scope) -> Result<IngestKeyInfo, KeyServiceError> {
        self.require(self.permissions.custodian, "custodian")?;
        let mut ingest = self.inner.ingest.write().unwrap_or_else(|p| p.into_inner());
        let keys = ingest.entry(scope.clone()).or_default();
        let version = keys.last().map(|k| k.version).unwrap_or(0) + 1;
        let key = self.new_ingest_key(scope, version);
        for k in keys.iter_mut().filter(|k| k.state == KeyState::Active) {
            k.state = KeyState::DecryptOnly;
        }
        let created_at = unix_now();
        let public = key.public_key().clone();
        keys.push(IngestKey {
            version,
            state: KeyState::Active,
            created_at,
            public: public.clone(),
            key: Some(key),
        });
        Ok(IngestKeyInfo {
            public_key: public,
            state: KeyState::Active,
            created_at,
        })
    }

    async fn set_ingest_key_state(
        &self,
        scope: &Scope,
        version: u32,
        state: KeyState,
    ) -> Result<(), KeyServiceError> {
        self.require(self.permissions.custodian, "custodian")?;
        let mut ingest = self.inner.ingest.write().unwrap_or_else(|p| p.into_inner());
        let key = ingest
            .get_mut(scope)
            .and_then(|keys| {
                keys.iter_mut()
                    .find(|k| k.version == version && k.state != KeyState::Destroyed)
            })
            .ok_or_else(|| KeyServiceError::UnknownIngestKey {
                scope: scope.to_string(),
                version,
            })?;
        if key.state == state {
            return Ok(());
        }
        if !key.state.can_become(state) {
            return Err(KeyServiceError::Other(format!(
                "ingest key {scope} v{version} cannot go from {:?} to {state:?}",
                key.state
            )));
        }
        key.state = state;
        if state == KeyState::Destroyed {
            // The private key's scalar is wiped on drop.
            key.key = None;
        }
        Ok(())
    }

    async fn open_ingest(
        &self,
        request: &IngestOpenRequest<'_>,
        _access: &Access,
    ) -> Result<Opened, KeyServiceError> {
        self.require(
            self.permissions.reveal || self.permissions.unwrap,
            "reveal or unwrap",
        )?;
        match self.open_ingest_now(request.scope, request.sealed, request.context) {
            Ok(pan) => Ok(Opened {
                pan,
                needs_reseal: true,
            }),
            Err(AdmitItemError::UnknownIngestKey(version)) => {
                Err(KeyServiceError::UnknownIngestKey {
                    scope: request.scope.to_string(),
                    version,
                })
            }
            Err(_) => Err(KeyServiceError::OpenFailed),
        }
    }

    async fn admit(
        &self,
        request: &AdmitRequest<'_>,
        _access: &Access,
    ) -> Result<Vec<Result<AdmitOutput, AdmitItemError>>, KeyServiceError> {
        self.require(self.permissions.admit, "admit")?;
        if request.items.len() > MAX_ADMIT_BATCH {
            return Err(KeyServiceError::BatchItem {
                index: MAX_ADMIT_BATCH,
                reason: format!("an admit request holds at most {MAX_ADMIT_BATCH} items"),
            });
        }
        let record = request.record;
        // The record must be one this service signed, not rolled back, and
        // an active data DEK that may still encrypt.
        self.verify_record(record).await?;
        if record.purpose != KeyPurpose::Data
            || record.state != KeyState::Active
            || unix_now() >= record.encrypt_until
            || record.uses >= record.max_uses
        {
            return Err(KeyServiceError::PermissionDenied(format!(
                "key record {} is not an active data key that may encrypt",
                record.id
            )));
        }
        let dek = self.unwrap_now(&record.key_request(), &record.wrapped)?;
        let cipher = dek.cipher();
        let index = self.inner.index.read().unwrap_or_else(|p| p.into_inner());
        let live = index.get(&record.scope);
        let mut keys = Vec::with_capacity(request.index_versions.len());
        for &version in request.index_versions {
            let key = live
                .into_iter()
                .flatten()
                .find(|k| k.version == version)
                .and_then(|k| k.key.as_ref())
                .ok_or_else(|| KeyServiceError::UnknownIndexKey {
                    scope: record.scope.to_string(),
                    version,
                })?;
            keys.push(key);
        }
        let mut out = Vec::with_capacity(request.items.len());
        for item in request.items {
            let pan = match self.open_ingest_now(&record.scope, item.sealed, item.context) {
                Ok(pan) => pan,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let (nonce, _) = crate::seal::fresh_nonce();
            let sealed = crate::seal::seal_raw(&cipher, record.id, nonce, &pan, item.context);
            let digits = pan.expose_digits().as_bytes();
            let index = keys.iter().map(|k| hmac_sha256(k, digits)).collect();
            out.push(Ok(AdmitOutput::new(sealed, index)));
        }
        Ok(out)
    }

    async fn authenticate_record(
        &self,
        previous: Option<&WrappedDek>,
        record: &WrappedDek,
    ) -> Result<RecordTag, KeyServiceError> {
        if record.environment != self.inner.environment {
            return Err(KeyServiceError::Environment {
                service: self.inner.environment.to_string(),
                request: record.environment.to_string(),
            });
        }
        let p = &self.permissions;
        if !(p.wrap || p.rewrap || p.custodian) {
            return Err(KeyServiceError::PermissionDenied(
                "signing a key record needs wrap, rewrap or custodian".into(),
            ));
        }
        if let Some(prev) = previous {
            // The record it replaces must be one this service signed and
            // not older than one it has seen.
            self.tag_ok(prev)?;
            if prev.id != record.id {
                return Err(KeyServiceError::RecordTransition(
                    "identity fields may not change".into(),
                ));
            }
        }
        WrappedDek::check_transition(previous, record, p, unix_now())
            .map_err(KeyServiceError::RecordTransition)?;
        let mut records = self.inner.records.lock().unwrap_or_else(|p| p.into_inner());
        let newest = records.newest.get(&record.id).copied();
        match previous {
            Some(prev) => {
                if newest.is_some_and(|n| n > prev.sequence) {
                    return Err(KeyServiceError::RecordStale(record.id.to_string()));
                }
            }
            None => {
                if newest.is_some() {
                    return Err(KeyServiceError::RecordTransition(
                        "this record was signed before; sign a successor".into(),
                    ));
                }
                if !p.custodian {
                    // Only a record for a key this service just wrapped.
                    match records.pending.get(&record.id) {
                        Some(bytes) if *bytes == record.wrapped.bytes => {}
                        _ => {
                            return Err(KeyServiceError::RecordTransition(
                                "a new record must hold a key this service wrapped for its id"
                                    .into(),
                            ))
                        }
                    }
                }
                records.pending.remove(&record.id);
            }
        }
        // Remember the record it replaces, not the new one: a successor
        // that never reaches the store (a killed writer, a lost swap) must
        // not make the stored record look rolled back. Verifying the new
        // record after it is written moves this forward.
        let seen = previous.map(|p| p.sequence).unwrap_or(0);
        let newest = records.newest.entry(record.id).or_insert(seen);
        *newest = (*newest).max(seen);
        Ok(record_tag(&self.inner.record_key, record))
    }

    async fn verify_record(&self, record: &WrappedDek) -> Result<(), KeyServiceError> {
        if record.tag.is_none() {
            // An unsigned (version-1) record for a key this service has
            // signed a record of is a downgrade: the tag was stripped.
            let records = self.inner.records.lock().unwrap_or_else(|p| p.into_inner());
            if records.newest.contains_key(&record.id) {
                return Err(KeyServiceError::RecordStale(record.id.to_string()));
            }
            return Err(KeyServiceError::RecordTampered(record.id.to_string()));
        }
        self.tag_ok(record)?;
        let mut records = self.inner.records.lock().unwrap_or_else(|p| p.into_inner());
        let newest = records.newest.entry(record.id).or_insert(record.sequence);
        if *newest > record.sequence {
            return Err(KeyServiceError::RecordStale(record.id.to_string()));
        }
        *newest = record.sequence;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use hmac::{Hmac, Mac};

    use super::*;
    use crate::keys::KekRef;
    use crate::keys::KeyPurpose;

    fn reference(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
        mac.update(msg);
        mac.finalize().into_bytes().into()
    }

    #[test]
    fn wiped_hmac_matches_the_hmac_crate_for_every_length() {
        for len in 0..=300usize {
            for seed in 0..3u8 {
                let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(31) ^ seed);
                let msg: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(seed)).collect();
                assert_eq!(hmac_sha256(&key, &msg), reference(&key, &msg), "len {len}");
            }
        }
    }

    #[test]
    fn rfc_4231_known_answer() {
        // RFC 4231 test case 1 (key 0x0b * 20; zero-padding to 32 bytes is
        // the same HMAC key).
        let mut key = [0u8; 32];
        key[..20].fill(0x0b);
        assert_eq!(
            hex::encode(hmac_sha256(&key, b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
    }

    fn env() -> Environment {
        Environment::new("test").unwrap()
    }

    fn scope() -> Scope {
        Scope::new("m").unwrap()
    }

    fn access() -> Access {
        Access::new("t", "t").unwrap()
    }

    #[tokio::test]
    async fn index_keys_live_inside_and_rotate() {
        let ks = LocalKeyService::new(env());
        assert!(ks.index_keys(&scope()).await.unwrap().is_empty());
        let pans = [
            Pan::parse("4111111111111111").unwrap(),
            Pan::parse("5555555555554444").unwrap(),
        ];
        let refs: Vec<&Pan> = pans.iter().collect();
        assert!(matches!(
            ks.blind_index(&scope(), &[1], &refs, &access()).await,
            Err(KeyServiceError::UnknownIndexKey { version: 1, .. })
        ));
        let v1 = ks.create_index_key(&scope()).await.unwrap();
        assert_eq!((v1.version, v1.state), (1, KeyState::Active));
        let one = ks
            .blind_index(&scope(), &[1], &refs, &access())
            .await
            .unwrap();
        assert_eq!(one.len(), 2);
        assert_ne!(one[0], one[1]);
        let v2 = ks.create_index_key(&scope()).await.unwrap();
        assert_eq!(v2.version, 2);
        let infos = ks.index_keys(&scope()).await.unwrap();
        assert_eq!(
            infos
                .iter()
                .map(|k| (k.version, k.state))
                .collect::<Vec<_>>(),
            vec![(2, KeyState::Active), (1, KeyState::DecryptOnly)]
        );
        // PAN-major: pans[i] under versions[j] at i * 2 + j.
        let both = ks
            .blind_index(&scope(), &[2, 1], &refs, &access())
            .await
            .unwrap();
        assert_eq!(both.len(), 4);
        assert_eq!(both[1], one[0]);
        assert_eq!(both[3], one[1]);
        assert_ne!(both[0], both[1]);
        // Another scope has its own keys.
        let other = Scope::new("other").unwrap();
        assert!(ks.index_keys(&other).await.unwrap().is_empty());
        // Destroyed versions are gone.
        ks.set_index_key_state(&scope(), 1, KeyState::Destroyed)
            .await
            .unwrap();
        assert_eq!(ks.index_keys(&scope()).await.unwrap().len(), 1);
        assert!(matches!(
            ks.blind_index(&scope(), &[1], &refs, &access()).await,
            Err(KeyServiceError::UnknownIndexKey { version: 1, .. })
        ));
        assert!(ks
            .set_index_key_state(&scope(), 2, KeyState::Active)
            .await
            .is_ok());
        assert!(ks
            .set_index_key_state(&scope(), 1, KeyState::Active)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn index_permissions() {
        let ks = LocalKeyService::new(env());
        let front = ks.restricted(Permissions::wrap_only());
        assert!(matches!(
            front.create_index_key(&scope()).await,
            Err(KeyServiceError::PermissionDenied(_))
        ));
        ks.create_index_key(&scope()).await.unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        assert_eq!(
            front
                .blind_index(&scope(), &[1], &[&pan], &access())
                .await
                .unwrap(),
            ks.blind_index(&scope(), &[1], &[&pan], &access())
                .await
                .unwrap()
        );
        let no_index = ks.restricted(Permissions {
            index: false,
            ..Permissions::all()
        });
        assert!(no_index.index_keys(&scope()).await.is_err());
        assert!(no_index
            .blind_index(&scope(), &[1], &[&pan], &access())
            .await
            .is_err());
        assert_eq!(front.permissions, Permissions::wrap_only());
        assert_eq!(
            KeyService::permissions(&front).await.unwrap(),
            Permissions::wrap_only()
        );
        // No index key is wrapped for or unwrapped to a caller.
        let request = KeyRequest {
            id: KeyId::random(),
            scope: scope(),
            environment: env(),
            purpose: KeyPurpose::Index,
        };
        assert!(matches!(
            ks.generate(&request).await,
            Err(KeyServiceError::PermissionDenied(_))
        ));
        let fake = WrappedKey {
            kek: KekRef {
                id: KEK_ID.into(),
                version: 1,
            },
            bytes: vec![0; WRAPPED_LEN],
        };
        assert!(matches!(
            ks.unwrap(&request, &fake, &access()).await,
            Err(KeyServiceError::PermissionDenied(_))
        ));
    }

    async fn fresh_record(ks: &LocalKeyService) -> WrappedDek {
        let id = KeyId::random();
        let request = KeyRequest {
            id,
            scope: scope(),
            environment: env(),
            purpose: KeyPurpose::Data,
        };
        let (_dek, wrapped) = ks.generate(&request).await.unwrap();
        let now = unix_now();
        WrappedDek {
            id,
            purpose: KeyPurpose::Data,
            version: 0,
            scope: scope(),
            environment: env(),
            state: KeyState::Active,
            wrapped,
            created_at: now,
            encrypt_until: now + 100,
            decrypt_until: now + 1000,
            max_uses: 1000,
            uses: 0,
            sequence: 0,
            tag: None,
        }
    }

    #[tokio::test]
    async fn records_sign_verify_and_refuse() {
        let ks = LocalKeyService::new(env());
        let front = ks.restricted(Permissions::wrap_only());
        let mut r = fresh_record(&front).await;
        r.tag = Some(front.authenticate_record(None, &r).await.unwrap());
        ks.verify_record(&r).await.unwrap();
        // Signing the same new record twice is refused.
        assert!(matches!(
            front.authenticate_record(None, &r).await,
            Err(KeyServiceError::RecordTransition(_))
        ));
        // A use-count report.
        let mut next = r.clone();
        next.uses = 10;
        next.sequence = 1;
        next.tag = Some(front.authenticate_record(Some(&r), &next).await.unwrap());
        ks.verify_record(&next).await.unwrap();
        // The old record is now stale.
        assert!(matches!(
            ks.verify_record(&r).await,
            Err(KeyServiceError::RecordStale(_))
        ));
        // Edits of a signed record are detected.
        let mut edited = 0;
        for edit in 0..6 {
            let mut bad = next.clone();
            match edit {
                0 => bad.state = KeyState::DecryptOnly,
                1 => bad.encrypt_until += 1,
                2 => bad.uses = 0,
                3 => bad.version = 7,
                4 => bad.purpose = KeyPurpose::Index,
                _ => bad.wrapped.bytes[0] ^= 1,
            }
            if matches!(
                ks.verify_record(&bad).await,
                Err(KeyServiceError::RecordTampered(_))
            ) {
                edited += 1;
            }
        }
        assert_eq!(edited, 6);
        // What a wrap credential cannot get signed.
        let mut refused = 0;
        for edit in 0..5 {
            let mut bad = next.clone();
            bad.sequence = 2;
            match edit {
                0 => bad.uses = 3,
                1 => bad.encrypt_until += 1,
                2 => bad.state = KeyState::Compromised,
                3 => bad.max_uses += 1,
                _ => bad.sequence = 5,
            }
            if matches!(
                front.authenticate_record(Some(&next), &bad).await,
                Err(KeyServiceError::RecordTransition(_))
            ) {
                refused += 1;
            }
        }
        assert_eq!(refused, 5);
        // A new record for an id the service did not wrap.
        let mut planted = fresh_record(&front).await;
        planted.id = KeyId::random();
        assert!(front.authenticate_record(None, &planted).await.is_err());
        // A record of another service does not verify.
        let other = LocalKeyService::new(env());
        assert!(matches!(
            other.verify_record(&next).await,
            Err(KeyServiceError::RecordTampered(_))
        ));
        // Untagged (version 1) records do not verify.
        let mut v1 = next.clone();
        v1.tag = None;
        assert!(ks.verify_record(&v1).await.is_err());
        // A custodian signs the version-1 upgrade.
        let mut legacy = fresh_record(&ks).await;
        legacy.uses = 5;
        legacy.state = KeyState::DecryptOnly;
        assert!(front.authenticate_record(None, &legacy).await.is_err());
        legacy.tag = Some(ks.authenticate_record(None, &legacy).await.unwrap());
        ks.verify_record(&legacy).await.unwrap();
    }

    #[cfg(feature = "hazmat-test-keys")]
    #[tokio::test]
    async fn insecure_service_is_deterministic() {
        let a = LocalKeyService::from_kek_bytes_insecure(env(), [7; 32]);
        let b = LocalKeyService::from_kek_bytes_insecure(env(), [7; 32]);
        let pan = Pan::parse("4111111111111111").unwrap();
        a.create_index_key(&scope()).await.unwrap();
        b.create_index_key(&scope()).await.unwrap();
        assert_eq!(
            a.blind_index(&scope(), &[1], &[&pan], &access())
                .await
                .unwrap(),
            b.blind_index(&scope(), &[1], &[&pan], &access())
                .await
                .unwrap()
        );
        let mut r = fresh_record(&a).await;
        r.tag = Some(a.authenticate_record(None, &r).await.unwrap());
        b.verify_record(&r).await.unwrap();
    }
}
