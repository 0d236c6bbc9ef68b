//! The bytes of `panseal-keyd`'s persisted state (`FORMAT.md`, "keyd
//! state"): the snapshot `state.bin` (versions 1, 2 and 3, read and
//! migrated; version 4, written),
//! the authenticated change journal `state.journal`, and the rollback
//! anchor `state.anchor`. Parsers only; the server owns the files.
//!
//! Hidden from the documentation: exposed so the fuzz targets and the
//! tests can reach the parsers, not a stable API.

use std::collections::BTreeMap;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use panseal::KeyState;

type HmacSha256 = Hmac<Sha256>;

/// First bytes of `state.bin`.
pub const MAGIC: &[u8; 8] = b"PANSEALD";
/// The first format: JSON and an unkeyed SHA-256 (read, then migrated).
pub const V1: u8 = 1;
/// The second format: JSON, HMAC under the state key, SHA-256 (read, then
/// migrated to version 3).
pub const V2: u8 = 2;
/// The third format: version 2 plus index keys, record keys and the
/// record registry (FORMAT.md §13.7); its own snapshot MAC label (read,
/// then migrated to version 4).
pub const V3: u8 = 3;
/// The current format: version 3 plus ingest (HPKE) private keys
/// (FORMAT.md §18); its own snapshot MAC label.
pub const V4: u8 = 4;

const SNAPSHOT_LABEL: &[u8] = b"panseal-keyd-state-v2\n";
const SNAPSHOT_LABEL_V3: &[u8] = b"panseal-keyd-state-v3\n";
const SNAPSHOT_LABEL_V4: &[u8] = b"panseal-keyd-state-v4\n";
const INGEST_KEY_LABEL: &[u8] = b"panseal-keyd-ingest-key-v4";
const INDEX_KEY_LABEL: &[u8] = b"panseal-keyd-index-key-v3";
const RECORD_KEY_LABEL: &[u8] = b"panseal-keyd-record-key-v3";
const JOURNAL_LABEL: &[u8] = b"panseal-keyd-journal-v2\n";
const ANCHOR_LABEL: &[u8] = b"panseal-keyd-anchor-v2\n";
const MAC_PREFIX: &[u8] = b",\"mac\":\"";
const SUFFIX_LEN: usize = 8 + 64 + 2;

/// Why state bytes are refused. Carries no input bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The bytes are damaged or not a state file.
    #[error("{0}")]
    Corrupt(&'static str),
    /// The bytes parse but fail authentication under the master key.
    #[error("{0}")]
    Unauthentic(&'static str),
}

#[derive(Clone)]
/// The subkeys `panseal-keyd` derives from its master key with
/// HKDF-SHA-256 (no salt; `info` = the label), one per purpose.
pub struct StateKeys {
    /// HMAC key of the snapshot and the journal.
    pub state_mac: Zeroizing<[u8; 32]>,
    /// HMAC key of the rollback anchor.
    pub anchor_mac: Zeroizing<[u8; 32]>,
    /// AES-256-GCM key sealing KEKs in state version 2.
    pub kek_seal: Zeroizing<[u8; 32]>,
    /// AES-256-GCM key of the master-key check value in version 2.
    pub check: Zeroizing<[u8; 32]>,
    /// AES-256-GCM key sealing blind-index keys (state version 3).
    pub index_seal: Zeroizing<[u8; 32]>,
    /// AES-256-GCM key sealing record-MAC keys (state version 3).
    pub record_seal: Zeroizing<[u8; 32]>,
    /// AES-256-GCM key sealing ingest (P-256) private scalars (state
    /// version 4).
    pub ingest_seal: Zeroizing<[u8; 32]>,
    /// HMAC key deriving admission DEKs (`/v1/generate-wrapped`), so that
    /// `/v1/admit` seals only under a DEK no caller was ever given. Not
    /// stored: nothing on disk changes.
    pub admission_dek: Zeroizing<[u8; 32]>,
    /// HMAC key of `quota.state` version 2 (FORMAT.md §16.4).
    pub quota_mac: Zeroizing<[u8; 32]>,
}

impl StateKeys {
    /// Derives every subkey from the master key.
    pub fn derive(master: &[u8; 32]) -> StateKeys {
        let hk = Hkdf::<Sha256>::new(None, master);
        let sub = |info: &[u8]| {
            let mut k = Zeroizing::new([0u8; 32]);
            // 32 bytes is far below HKDF-SHA-256's output limit.
            hk.expand(info, &mut k[..])
                .unwrap_or_else(|_| unreachable!("HKDF output of 32 bytes"));
            k
        };
        StateKeys {
            state_mac: sub(b"panseal-keyd v2 state authentication"),
            anchor_mac: sub(b"panseal-keyd v2 rollback anchor"),
            kek_seal: sub(b"panseal-keyd v2 kek sealing"),
            check: sub(b"panseal-keyd v2 master check"),
            index_seal: sub(b"panseal-keyd v3 index-key sealing"),
            record_seal: sub(b"panseal-keyd v3 record-key sealing"),
            ingest_seal: sub(b"panseal-keyd v4 ingest-key sealing"),
            admission_dek: sub(b"panseal-keyd v4 admission dek"),
            quota_mac: sub(b"panseal-keyd quota state v2 authentication"),
        }
    }
}

/// The admission DEK of `(environment, scope, id)`: HMAC-SHA-256 under
/// [`StateKeys::admission_dek`] of a label and the length-prefixed names
/// and id (FORMAT.md §18). Only keyd can compute it; `/v1/admit` refuses a
/// record whose wrapped DEK is anything else (one a caller generated,
/// wrapped or was handed).
pub fn admission_dek(
    keys: &StateKeys,
    environment: &str,
    scope: &str,
    id: &[u8; 8],
) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(hmac(
        &keys.admission_dek,
        b"panseal-keyd admission dek v1\0",
        &[
            &[environment.len() as u8],
            environment.as_bytes(),
            &[scope.len() as u8],
            scope.as_bytes(),
            id,
        ],
    ))
}

/// Constant-time equality of two keys.
pub fn keys_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    ct_eq(a, b)
}

fn hmac(key: &[u8; 32], label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes 32-byte keys"));
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a, b))
}

/// One custodian's share: its x coordinate and a salted MAC of the share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodianShare {
    /// Custodian principal.
    pub custodian: String,
    /// Shamir x coordinate.
    pub x: u8,
    /// HMAC-SHA-256(salt, label || share), hex.
    pub check: String,
}

/// A custodian's acknowledgement (PCI DSS 3.7.8).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledgement {
    /// Custodian principal.
    pub custodian: String,
    /// SHA-256 of the statement, hex.
    pub statement_sha256: String,
    /// Unix seconds.
    pub at: u64,
}

/// One custodian's approval of a destruction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Custodian principal.
    pub custodian: String,
    /// Unix seconds; approvals expire.
    pub at: u64,
}

/// One KEK version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekRecord {
    /// Version, from 1.
    pub version: u32,
    /// Active, decrypt-only or destroyed.
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: u64,
    /// The KEK sealed under the KEK-sealing subkey (hex); `None` once destroyed.
    pub sealed: Option<String>,
    /// Pending destroy approvals.
    pub destroy_approvals: Vec<Approval>,
}

/// One scope's KEK versions: one journal record per scope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeRecord {
    /// Environment tag.
    pub environment: String,
    /// Scope.
    pub scope: String,
    /// Who created the scope's first KEK.
    pub created_by: String,
    /// Versions, oldest first.
    pub versions: Vec<KekRecord>,
}

/// A DEK whose destruction custodians approved (or are approving).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DekRecord {
    /// Environment tag.
    pub environment: String,
    /// Scope.
    pub scope: String,
    /// Key id, 16 hex digits.
    pub id: String,
    /// Pending approvals (cleared once destroyed).
    pub approvals: Vec<Approval>,
    /// Unix seconds of the destruction; `None` while pending.
    pub destroyed_at: Option<u64>,
    /// Who approved the destruction.
    pub destroyed_by: Vec<String>,
}

/// Where the audit log stood when the state last changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPosition {
    /// Records in the log.
    pub records: u64,
    /// MAC of the last record (hex; zeros for none).
    pub head: String,
}

/// The whole state (version 2 snapshot body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Shares needed to unseal.
    pub threshold: u8,
    /// Salt of the share checks, hex.
    pub share_salt: String,
    /// Value only the right master key opens, hex.
    pub master_check: String,
    /// One entry per custodian holding a share.
    pub shares: Vec<CustodianShare>,
    /// Counts re-sharings. A record only, never compared: a share of an
    /// earlier epoch is refused because it fails its check under the new
    /// `share_salt`.
    pub share_epoch: u32,
    /// Acknowledgements by custodian.
    pub acknowledgements: BTreeMap<String, Acknowledgement>,
    /// KEKs by `environment/scope`.
    pub scopes: BTreeMap<String, ScopeRecord>,
    /// DEK destructions by `environment/scope/id`.
    pub deks: BTreeMap<String, DekRecord>,
    /// Counts changes; never goes back.
    pub generation: u64,
    /// The audit log's position at the last change.
    pub audit: AuditPosition,
    /// Identifies the audit key (not secret: an HMAC of a label under it).
    pub audit_key_id: String,
    /// Version 3: blind-index keys by `environment/scope`.
    #[serde(default)]
    pub index_keys: BTreeMap<String, IndexScopeRecord>,
    /// Version 3: the record-MAC key of each environment, by environment.
    #[serde(default)]
    pub record_keys: BTreeMap<String, RecordKeyRecord>,
    /// Version 3: the newest key-store record signed, by
    /// `environment/scope/id`.
    #[serde(default)]
    pub registry: BTreeMap<String, RegistryEntry>,
    /// Version 4: ingest (HPKE) key pairs by `environment/scope`.
    #[serde(default)]
    pub ingest_keys: BTreeMap<String, IngestScopeRecord>,
}

/// One version of a scope's ingest key pair (state version 4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestKeyRecord {
    /// Version, from 1.
    pub version: u32,
    /// Active (front ends seal with it), decrypt-only (retired: opens and
    /// admits, never seals) or destroyed (the scalar is erased).
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: u64,
    /// The custodian who created it.
    pub created_by: String,
    /// The public key, text form (`PIK1/env/scope/version/…`): listed
    /// without unsealing anything.
    pub public_key: String,
    /// The 32-byte P-256 private scalar sealed under the ingest-sealing
    /// subkey (hex, [`seal_secret`] with [`ingest_key_aad`]); `None` once
    /// destroyed.
    pub sealed: Option<String>,
}

/// One scope's ingest key versions (state version 4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestScopeRecord {
    /// Environment tag.
    pub environment: String,
    /// Scope.
    pub scope: String,
    /// Versions, oldest first.
    pub versions: Vec<IngestKeyRecord>,
}

/// One version of a scope's blind-index key (state version 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexKeyRecord {
    /// Version, from 1.
    pub version: u32,
    /// Active (hashes new rows), decrypt-only (lookup only) or destroyed.
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: u64,
    /// The custodian who created it.
    pub created_by: String,
    /// The 32-byte HMAC key sealed under the index-sealing subkey (hex,
    /// [`seal_secret`] with [`index_key_aad`]); `None` once destroyed.
    pub sealed: Option<String>,
}

/// One scope's blind-index key versions (state version 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexScopeRecord {
    /// Environment tag.
    pub environment: String,
    /// Scope.
    pub scope: String,
    /// Versions, oldest first.
    pub versions: Vec<IndexKeyRecord>,
}

/// One environment's record-MAC key (state version 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordKeyRecord {
    /// Environment tag.
    pub environment: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The 32-byte HMAC key sealed under the record-sealing subkey (hex,
    /// [`seal_secret`] with [`record_key_aad`]).
    pub sealed: String,
}

/// The newest key-store record keyd signed for one key (state version 3):
/// an older, once-valid row is a rollback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// The record's sequence.
    pub sequence: u64,
    /// The record's state.
    pub state: KeyState,
    /// The tag signed (hex).
    pub tag: String,
    /// Unix seconds of the signature.
    pub signed_at: u64,
}

/// `environment/scope/id`: the registry key of a record.
pub fn registry_key(environment: &str, scope: &str, id: &str) -> String {
    format!("{environment}/{scope}/{id}")
}

fn aad_of(label: &[u8], parts: &[&str], version: Option<u32>) -> Vec<u8> {
    let mut aad = label.to_vec();
    for p in parts {
        aad.extend_from_slice(&(p.len() as u16).to_be_bytes());
        aad.extend_from_slice(p.as_bytes());
    }
    if let Some(v) = version {
        aad.extend_from_slice(&v.to_be_bytes());
    }
    aad
}

/// Associated data of a sealed index key: `"panseal-keyd-index-key-v3" ||
/// u16 len || environment || u16 len || scope || u32 version` (big-endian).
pub fn index_key_aad(environment: &str, scope: &str, version: u32) -> Vec<u8> {
    aad_of(INDEX_KEY_LABEL, &[environment, scope], Some(version))
}

/// Associated data of a sealed ingest private scalar:
/// `"panseal-keyd-ingest-key-v4" || u16 len || environment || u16 len ||
/// scope || u32 version` (big-endian).
pub fn ingest_key_aad(environment: &str, scope: &str, version: u32) -> Vec<u8> {
    aad_of(INGEST_KEY_LABEL, &[environment, scope], Some(version))
}

/// Associated data of a sealed record key: `"panseal-keyd-record-key-v3"
/// || u16 len || environment`.
pub fn record_key_aad(environment: &str) -> Vec<u8> {
    aad_of(RECORD_KEY_LABEL, &[environment], None)
}

/// Seals a 32-byte key: hex of `nonce (12) || AES-256-GCM(key, nonce, aad,
/// secret)` (ciphertext and 16-byte tag). `nonce` must be fresh (the
/// server draws it from the OS CSPRNG).
pub fn seal_secret(key: &[u8; 32], nonce: [u8; 12], aad: &[u8], secret: &[u8; 32]) -> String {
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
    let cipher = Aes256Gcm::new(key.into());
    let mut buf = Zeroizing::new(secret.to_vec());
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut buf[..])
        .unwrap_or_default();
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    out.extend_from_slice(&tag);
    hex::encode(out)
}

/// Opens what [`seal_secret`] sealed.
///
/// # Errors
///
/// [`FormatError::Unauthentic`] for a wrong key, wrong associated data or
/// altered bytes; [`FormatError::Corrupt`] for bytes of the wrong shape.
pub fn open_secret(
    key: &[u8; 32],
    aad: &[u8],
    sealed_hex: &str,
) -> Result<Zeroizing<[u8; 32]>, FormatError> {
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
    let sealed = Zeroizing::new(
        hex::decode(sealed_hex).map_err(|_| FormatError::Corrupt("sealed key is not hex"))?,
    );
    if sealed.len() != 12 + 32 + 16 {
        return Err(FormatError::Corrupt("sealed key has the wrong length"));
    }
    let mut key_out = Zeroizing::new([0u8; 32]);
    key_out.copy_from_slice(&sealed[12..44]);
    Aes256Gcm::new(key.into())
        .decrypt_in_place_detached(
            Nonce::from_slice(&sealed[..12]),
            aad,
            &mut key_out[..],
            sealed[44..].into(),
        )
        .map_err(|_| FormatError::Unauthentic("a sealed key fails to open: altered or moved"))?;
    Ok(key_out)
}

/// One change in a journal entry: the new value of one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Change {
    /// A custodian's acknowledgement.
    Acknowledgement {
        /// The acknowledgement.
        value: Acknowledgement,
    },
    /// A scope's KEK record.
    Scope {
        /// `environment/scope`.
        key: String,
        /// The whole record.
        value: ScopeRecord,
    },
    /// A DEK destruction record.
    Dek {
        /// `environment/scope/id`.
        key: String,
        /// The whole record.
        value: DekRecord,
    },
    /// Version 3: a scope's index-key record.
    IndexScope {
        /// `environment/scope`.
        key: String,
        /// The whole record.
        value: IndexScopeRecord,
    },
    /// Version 3: an environment's record key.
    RecordKey {
        /// The environment.
        key: String,
        /// The whole record.
        value: RecordKeyRecord,
    },
    /// Version 3: a registry entry.
    Registry {
        /// `environment/scope/id`.
        key: String,
        /// The whole entry.
        value: RegistryEntry,
    },
    /// Version 4: a scope's ingest-key record.
    IngestScope {
        /// `environment/scope`.
        key: String,
        /// The whole record.
        value: IngestScopeRecord,
    },
}

impl Change {
    /// Whether this change exists only in state version 3.
    pub fn is_v3(&self) -> bool {
        matches!(
            self,
            Change::IndexScope { .. } | Change::RecordKey { .. } | Change::Registry { .. }
        )
    }

    /// Whether this change exists only in state version 4.
    pub fn is_v4(&self) -> bool {
        matches!(self, Change::IngestScope { .. })
    }
}

impl State {
    /// Applies one change.
    pub fn apply(&mut self, c: Change) {
        match c {
            Change::Acknowledgement { value } => {
                self.acknowledgements.insert(value.custodian.clone(), value);
            }
            Change::Scope { key, value } => {
                self.scopes.insert(key, value);
            }
            Change::Dek { key, value } => {
                self.deks.insert(key, value);
            }
            Change::IndexScope { key, value } => {
                self.index_keys.insert(key, value);
            }
            Change::RecordKey { key, value } => {
                self.record_keys.insert(key, value);
            }
            Change::Registry { key, value } => {
                self.registry.insert(key, value);
            }
            Change::IngestScope { key, value } => {
                self.ingest_keys.insert(key, value);
            }
        }
    }
}

/// A decoded snapshot.
#[derive(Debug)]
pub struct Snapshot {
    /// The state.
    pub state: State,
    /// Format version it was read from.
    pub version: u8,
    /// Versions 2 and 3: the MAC (the journal's first `prev`). Version 1: zeros.
    pub mac: [u8; 32],
    /// Version 2: the exact authenticated bytes, for checking the MAC once
    /// the master key is known.
    pub authenticated: Vec<u8>,
}

impl Snapshot {
    /// Checks the MAC of a version 2 snapshot. Version 1 has none and
    /// passes: the server reads version 1 only where no version 2 state
    /// ever was (FORMAT.md §13.5).
    ///
    /// # Errors
    ///
    /// [`FormatError::Unauthentic`] when the MAC does not match.
    pub fn verify(&self, keys: &StateKeys) -> Result<(), FormatError> {
        if self.version == V1 {
            return Ok(());
        }
        let label = match self.version {
            V4 => SNAPSHOT_LABEL_V4,
            V3 => SNAPSHOT_LABEL_V3,
            _ => SNAPSHOT_LABEL,
        };
        let mac = hmac(&keys.state_mac, label, &[&self.authenticated]);
        if ct_eq(&mac, &self.mac) {
            Ok(())
        } else {
            Err(FormatError::Unauthentic(
                "state.bin fails authentication under the master key: altered, or not written by this keyd",
            ))
        }
    }
}

/// `MAGIC | 0x04 | JSON | HMAC (32) | SHA-256 of all before (32)`: the
/// current version (4; its MAC label is `panseal-keyd-state-v4\n`).
pub fn encode_snapshot(state: &State, keys: &StateKeys) -> (Vec<u8>, [u8; 32]) {
    encode_snapshot_as(V4, state, keys)
}

/// As [`encode_snapshot`] in an older version 2 or 3 (tests and vector
/// checks: what an earlier keyd wrote). Fields the version lacks must be
/// empty.
#[doc(hidden)]
pub fn encode_snapshot_as(version: u8, state: &State, keys: &StateKeys) -> (Vec<u8>, [u8; 32]) {
    let label = match version {
        V4 => SNAPSHOT_LABEL_V4,
        V3 => SNAPSHOT_LABEL_V3,
        _ => SNAPSHOT_LABEL,
    };
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(version);
    out.extend_from_slice(&serde_json::to_vec(state).unwrap_or_default());
    let mac = hmac(&keys.state_mac, label, &[&out]);
    out.extend_from_slice(&mac);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    (out, mac)
}

// Version 1 (read only).
#[derive(Deserialize)]
struct V1Kek {
    environment: String,
    scope: String,
    version: u32,
    state: KeyState,
    created_at: u64,
    sealed: Option<String>,
    destroy_approvals: Vec<String>,
}

#[derive(Deserialize)]
struct V1State {
    threshold: u8,
    share_salt: String,
    master_check: String,
    shares: Vec<CustodianShare>,
    acknowledgements: Vec<Acknowledgement>,
    keks: Vec<V1Kek>,
    generation: u64,
}

/// `environment/scope`.
pub fn scope_key(environment: &str, scope: &str) -> String {
    format!("{environment}/{scope}")
}

fn from_v1(v: V1State, now: u64) -> State {
    let mut scopes: BTreeMap<String, ScopeRecord> = BTreeMap::new();
    for k in v.keks {
        let rec = scopes
            .entry(scope_key(&k.environment, &k.scope))
            .or_insert_with(|| ScopeRecord {
                environment: k.environment.clone(),
                scope: k.scope.clone(),
                created_by: "-".into(),
                versions: Vec::new(),
            });
        rec.versions.push(KekRecord {
            version: k.version,
            state: k.state,
            created_at: k.created_at,
            sealed: k.sealed,
            // Version 1 approvals had no time: they count from migration.
            destroy_approvals: k
                .destroy_approvals
                .into_iter()
                .map(|custodian| Approval { custodian, at: now })
                .collect(),
        });
    }
    for r in scopes.values_mut() {
        r.versions.sort_by_key(|k| k.version);
    }
    State {
        threshold: v.threshold,
        share_salt: v.share_salt,
        master_check: v.master_check,
        shares: v.shares,
        share_epoch: 0,
        acknowledgements: v
            .acknowledgements
            .into_iter()
            .map(|a| (a.custodian.clone(), a))
            .collect(),
        scopes,
        deks: BTreeMap::new(),
        generation: v.generation,
        audit: AuditPosition::default(),
        audit_key_id: String::new(),
        index_keys: BTreeMap::new(),
        record_keys: BTreeMap::new(),
        registry: BTreeMap::new(),
        ingest_keys: BTreeMap::new(),
    }
}

/// Reads `state.bin` of version 1, 2, 3 or 4 (`now` dates version 1
/// approvals). The MAC of versions 2 and 3 is checked later with
/// [`Snapshot::verify`]. A version 2 body carrying a version 3 field, or a
/// version 2 or 3 body carrying a version 4 field, is refused.
///
/// # Errors
///
/// [`FormatError::Corrupt`] for anything that is not an intact state file.
pub fn decode_snapshot(bytes: &[u8], now: u64) -> Result<Snapshot, FormatError> {
    let corrupt = FormatError::Corrupt;
    if bytes.len() < MAGIC.len() + 1 + 32 {
        return Err(corrupt("file too short"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if &body[..MAGIC.len()] != MAGIC {
        return Err(corrupt("not a panseal-keyd state file"));
    }
    if Sha256::digest(body).as_slice() != digest {
        return Err(corrupt("checksum mismatch: torn or altered"));
    }
    match body[MAGIC.len()] {
        V1 => {
            let v: V1State = serde_json::from_slice(&body[MAGIC.len() + 1..])
                .map_err(|_| corrupt("does not parse"))?;
            Ok(Snapshot {
                state: from_v1(v, now),
                version: V1,
                mac: [0; 32],
                authenticated: Vec::new(),
            })
        }
        v @ (V2 | V3 | V4) => {
            if body.len() < MAGIC.len() + 1 + 32 {
                return Err(corrupt("file too short"));
            }
            let (authenticated, mac) = body.split_at(body.len() - 32);
            let state: State = serde_json::from_slice(&authenticated[MAGIC.len() + 1..])
                .map_err(|_| corrupt("does not parse"))?;
            if v == V2
                && !(state.index_keys.is_empty()
                    && state.record_keys.is_empty()
                    && state.registry.is_empty())
            {
                return Err(corrupt("version 2 state with version 3 fields"));
            }
            if v < V4 && !state.ingest_keys.is_empty() {
                return Err(corrupt("version 2 or 3 state with version 4 fields"));
            }
            let mut m = [0u8; 32];
            m.copy_from_slice(mac);
            Ok(Snapshot {
                state,
                version: v,
                mac: m,
                authenticated: authenticated.to_vec(),
            })
        }
        _ => Err(corrupt("unknown state version")),
    }
}

/// One line of `state.journal`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalHeader {
    /// The state's generation after this entry.
    pub generation: u64,
    /// MAC of the entry before (the snapshot's MAC for the first), hex.
    pub prev: String,
    /// The audit log's position when the change was made.
    pub audit: AuditPosition,
    /// The changed records.
    pub changes: Vec<Change>,
}

/// Encodes one journal line (with its newline) and returns its MAC.
pub fn encode_journal_entry(h: &JournalHeader, keys: &StateKeys) -> (Vec<u8>, [u8; 32]) {
    let json = serde_json::to_vec(h).unwrap_or_default();
    // Drop the closing brace; the MAC field closes the object.
    let mut line = json[..json.len().saturating_sub(1)].to_vec();
    let mac = hmac(&keys.state_mac, JOURNAL_LABEL, &[&line]);
    line.extend_from_slice(MAC_PREFIX);
    line.extend_from_slice(hex::encode(mac).as_bytes());
    line.extend_from_slice(b"\"}\n");
    (line, mac)
}

/// A parsed journal line, not yet authenticated.
#[derive(Debug)]
pub struct JournalEntry {
    /// The entry.
    pub header: JournalHeader,
    /// Its MAC.
    pub mac: [u8; 32],
    body: Vec<u8>,
}

impl JournalEntry {
    /// Checks the entry's MAC.
    ///
    /// # Errors
    ///
    /// [`FormatError::Unauthentic`] when it does not match.
    pub fn verify(&self, keys: &StateKeys) -> Result<(), FormatError> {
        let mac = hmac(&keys.state_mac, JOURNAL_LABEL, &[&self.body]);
        if ct_eq(&mac, &self.mac) {
            Ok(())
        } else {
            Err(FormatError::Unauthentic(
                "state.journal fails authentication under the master key: altered or forged",
            ))
        }
    }
}

/// Parses one journal line (without its newline).
///
/// # Errors
///
/// [`FormatError::Corrupt`] if it is not a journal entry.
pub fn parse_journal_line(line: &[u8]) -> Result<JournalEntry, FormatError> {
    let bad = FormatError::Corrupt("state.journal: not a journal entry");
    if line.len() < SUFFIX_LEN + 2 {
        return Err(bad);
    }
    let (body, suffix) = line.split_at(line.len() - SUFFIX_LEN);
    if &suffix[..MAC_PREFIX.len()] != MAC_PREFIX || &suffix[SUFFIX_LEN - 2..] != b"\"}" {
        return Err(bad);
    }
    let mut mac = [0u8; 32];
    hex::decode_to_slice(&suffix[MAC_PREFIX.len()..SUFFIX_LEN - 2], &mut mac)
        .map_err(|_| bad.clone())?;
    let mut json = body.to_vec();
    json.push(b'}');
    let header: JournalHeader = serde_json::from_slice(&json).map_err(|_| bad)?;
    Ok(JournalEntry {
        header,
        mac,
        body: body.to_vec(),
    })
}

/// Splits journal bytes into parsed entries. An incomplete last line (a
/// torn append, never acknowledged) is dropped; its length is returned so
/// the server can cut it off.
///
/// # Errors
///
/// [`FormatError::Corrupt`] for a damaged complete line.
pub fn parse_journal(bytes: &[u8]) -> Result<(Vec<JournalEntry>, usize), FormatError> {
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut good = 0;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        out.push(parse_journal_line(&rest[..end])?);
        good += end + 1;
        rest = &rest[end + 1..];
    }
    Ok((out, good))
}

/// `state.anchor`: the newest generation and head MAC, kept where the state
/// file's writer cannot reach (another file system, or a path only keyd
/// writes to), so restoring an older `state.bin` is noticed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// Format version, 2.
    pub v: u8,
    /// The state's generation.
    pub generation: u64,
    /// MAC of the newest snapshot or journal entry, hex.
    pub head: String,
    /// HMAC under the anchor subkey of `v`, `generation`, `head`, hex.
    pub mac: String,
}

impl Anchor {
    fn mac_of(keys: &StateKeys, generation: u64, head: &str) -> String {
        hex::encode(hmac(
            &keys.anchor_mac,
            ANCHOR_LABEL,
            &[&[V2], &generation.to_be_bytes(), head.as_bytes()],
        ))
    }

    /// An anchor for `generation` and `head`.
    pub fn new(keys: &StateKeys, generation: u64, head: &[u8; 32]) -> Anchor {
        let head = hex::encode(head);
        Anchor {
            v: V2,
            mac: Self::mac_of(keys, generation, &head),
            generation,
            head,
        }
    }

    /// Parses anchor bytes.
    ///
    /// # Errors
    ///
    /// [`FormatError::Corrupt`] if they are not an anchor.
    pub fn parse(bytes: &[u8]) -> Result<Anchor, FormatError> {
        let a: Anchor = serde_json::from_slice(bytes)
            .map_err(|_| FormatError::Corrupt("state.anchor does not parse"))?;
        if a.v != V2 {
            return Err(FormatError::Corrupt("state.anchor: unknown version"));
        }
        Ok(a)
    }

    /// The bytes written.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Checks the MAC.
    ///
    /// # Errors
    ///
    /// [`FormatError::Unauthentic`] when it does not match.
    pub fn verify(&self, keys: &StateKeys) -> Result<(), FormatError> {
        if ct_eq(
            Self::mac_of(keys, self.generation, &self.head).as_bytes(),
            self.mac.as_bytes(),
        ) {
            Ok(())
        } else {
            Err(FormatError::Unauthentic(
                "state.anchor fails authentication under the master key",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            threshold: 2,
            share_salt: "00".repeat(32),
            master_check: "ab".into(),
            shares: vec![CustodianShare {
                custodian: "alice".into(),
                x: 1,
                check: "cd".into(),
            }],
            share_epoch: 0,
            acknowledgements: BTreeMap::new(),
            scopes: BTreeMap::new(),
            deks: BTreeMap::new(),
            generation: 3,
            audit: AuditPosition::default(),
            audit_key_id: "k".into(),
            index_keys: BTreeMap::new(),
            record_keys: BTreeMap::new(),
            registry: BTreeMap::new(),
            ingest_keys: BTreeMap::new(),
        }
    }

    #[test]
    fn snapshot_and_journal_round_trip_and_authenticate() {
        let keys = StateKeys::derive(&[7; 32]);
        let other = StateKeys::derive(&[8; 32]);
        let (bytes, mac) = encode_snapshot(&sample(), &keys);
        let s = decode_snapshot(&bytes, 0).unwrap();
        assert_eq!(s.state, sample());
        assert_eq!(s.mac, mac);
        s.verify(&keys).unwrap();
        assert!(s.verify(&other).is_err());
        let h = JournalHeader {
            generation: 4,
            prev: hex::encode(mac),
            audit: AuditPosition::default(),
            changes: vec![Change::Acknowledgement {
                value: Acknowledgement {
                    custodian: "bob".into(),
                    statement_sha256: "ff".into(),
                    at: 1,
                },
            }],
        };
        let (line, jm) = encode_journal_entry(&h, &keys);
        let (entries, good) = parse_journal(&line).unwrap();
        assert_eq!(good, line.len());
        assert_eq!(entries[0].header, h);
        assert_eq!(entries[0].mac, jm);
        entries[0].verify(&keys).unwrap();
        assert!(entries[0].verify(&other).is_err());
        // A torn last line is dropped.
        let (entries, good) = parse_journal(&line[..line.len() - 3]).unwrap();
        assert!(entries.is_empty() && good == 0);
        let a = Anchor::new(&keys, 4, &jm);
        let back = Anchor::parse(&a.encode()).unwrap();
        back.verify(&keys).unwrap();
        assert!(back.verify(&other).is_err());
    }

    #[test]
    fn version_3_round_trips_and_sealed_keys_are_bound() {
        let keys = StateKeys::derive(&[7; 32]);
        let mut st = sample();
        let aad = index_key_aad("test", "m-1", 1);
        let sealed = seal_secret(&keys.index_seal, [1; 12], &aad, &[9; 32]);
        st.index_keys.insert(
            "test/m-1".into(),
            IndexScopeRecord {
                environment: "test".into(),
                scope: "m-1".into(),
                versions: vec![IndexKeyRecord {
                    version: 1,
                    state: KeyState::Active,
                    created_at: 1,
                    created_by: "alice".into(),
                    sealed: Some(sealed.clone()),
                }],
            },
        );
        let (bytes, _) = encode_snapshot(&st, &keys);
        assert_eq!(bytes[8], V4);
        let s = decode_snapshot(&bytes, 0).unwrap();
        s.verify(&keys).unwrap();
        assert_eq!(s.state, st);
        assert_eq!(
            *open_secret(&keys.index_seal, &aad, &sealed).unwrap(),
            [9; 32]
        );
        // Another scope, version, subkey or a flipped bit: refused.
        assert!(open_secret(&keys.index_seal, &index_key_aad("test", "m-2", 1), &sealed).is_err());
        assert!(open_secret(&keys.index_seal, &index_key_aad("test", "m-1", 2), &sealed).is_err());
        assert!(open_secret(&keys.record_seal, &aad, &sealed).is_err());
        let mut flipped = hex::decode(&sealed).unwrap();
        flipped[20] ^= 1;
        assert!(open_secret(&keys.index_seal, &aad, &hex::encode(flipped)).is_err());
        assert!(open_secret(&keys.index_seal, &aad, "zz").is_err());
        // Version 3 fields in a version 2 file: refused.
        let mut v2 = bytes[..bytes.len() - 64].to_vec();
        v2[8] = V2;
        v2.extend_from_slice(&[0; 32]); // any MAC: refused before it is checked
        let d = Sha256::digest(&v2);
        v2.extend_from_slice(&d);
        assert!(matches!(
            decode_snapshot(&v2, 0),
            Err(FormatError::Corrupt(_))
        ));
        assert!(Change::IndexScope {
            key: "k".into(),
            value: st.index_keys["test/m-1"].clone()
        }
        .is_v3());
    }
}
