//! The `panseal-keyd` protocol: JSON bodies over HTTPS (HTTP/1.1, TLS 1.3,
//! client certificates), one `POST` per operation.
//!
//! | path | body | answer | permission |
//! |---|---|---|---|
//! | `/v1/status` | none | [`StatusResponse`] | any principal (also while sealed) |
//! | `/v1/kek/info` | [`KekTarget`] | [`KekStatus`] | any permission in the scope |
//! | `/v1/wrap` | [`WrapRequest`] | [`WrappedResponse`] | `wrap` |
//! | `/v1/generate` | [`GenerateRequest`] | [`GenerateResponse`] | `wrap` |
//! | `/v1/unwrap` | [`UnwrapRequest`] | [`UnwrapResponse`] | `unwrap` (data keys only: an index key never leaves keyd) |
//! | `/v1/rewrap` | [`RewrapRequest`] | [`WrappedResponse`] | `rewrap` |
//! | `/v1/kek/rotate` | [`KekTarget`] | [`KekStatus`] | `custodian` |
//! | `/v1/kek/retire` | [`KekVersionTarget`] | [`KekStatus`] | `custodian` |
//! | `/v1/kek/destroy` | [`KekVersionTarget`] | [`DestroyResponse`] | `custodian`, two different principals |
//! | `/v1/acknowledge` | [`AcknowledgeRequest`] | [`StatusResponse`] | `custodian` (also while sealed) |
//! | `/v1/unseal` | [`UnsealRequest`] | [`StatusResponse`] | `custodian` with an acknowledgement (while sealed) |
//! | `/v1/seal` | none | [`StatusResponse`] | `custodian` |
//! | `/v1/audit` | [`AuditReadRequest`] | [`AuditReadResponse`] | `audit-read` |
//! | `/v1/dek/destroy` | [`DekTarget`] | [`DekDestroyResponse`] | `custodian`, two different principals |
//! | `/v1/approval/withdraw` | [`WithdrawRequest`] | [`WithdrawResponse`] | `custodian` (own approval) |
//! | `/v1/reshare` | [`ReshareRequest`] | [`ReshareResponse`] | `custodian` with a current share, k of them |
//! | `/v1/share/collect` | [`CollectRequest`] | [`CollectResponse`] | `custodian` named in an `init` or re-share, once |
//! | `/v1/reveal` | [`RevealRequest`] | [`RevealResponse`] | `reveal` (counted per distinct record) |
//! | `/v1/whoami` | none | [`WhoamiResponse`] | any principal (also while sealed) |
//! | `/v1/index/keys` | [`KekTarget`] | [`IndexKeysResponse`] | `index` or `custodian` |
//! | `/v1/index/hash` | [`IndexHashRequest`] | [`IndexHashResponse`] | `index` |
//! | `/v1/index/create` | [`KekTarget`] | [`IndexKeysResponse`] | `custodian` |
//! | `/v1/index/state` | [`IndexStateRequest`] | [`IndexKeysResponse`] | `custodian` |
//! | `/v1/record/sign` | [`RecordSignRequest`] | [`RecordSignResponse`] | `wrap`, `rewrap` or `custodian`, by transition |
//! | `/v1/record/verify` | [`RecordVerifyRequest`] | [`RecordVerifyResponse`] | any key permission in the scope |
//! | `/v1/ingest/keys` | [`KekTarget`] | [`IngestKeysResponse`] | any principal of the environment and scope |
//! | `/v1/ingest/create` | [`KekTarget`] | [`IngestKeysResponse`] | `custodian` |
//! | `/v1/ingest/state` | [`IngestStateRequest`] | [`IngestKeysResponse`] | `custodian` |
//! | `/v1/ingest/open` | [`IngestOpenRequest`] | [`RevealResponse`] | `reveal` (counted as a reveal) or `unwrap` |
//! | `/v1/generate-wrapped` | [`GenerateRequest`] | [`WrappedResponse`] | `wrap` |
//! | `/v1/admit` | [`AdmitRequest`] | [`AdmitResponse`] | `admit` (counted per item) |
//!
//! Every failure is an HTTP error status with an [`ErrorBody`]. Key bytes
//! travel base64-encoded in [`KeyMaterial`], which wipes its buffer.

use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, Zeroizing};

use crate::error::KeyServiceError;
use crate::keys::{
    Environment, KekRef, KeyId, KeyPurpose, KeyRequest, KeyState, Scope, WrappedKey,
};

/// Largest request or response body either side accepts.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Serialises `v` as JSON into a buffer allocated once at its exact size
/// and wiped on drop (no reallocation leaves a copy of a key behind).
///
/// # Errors
///
/// A serialisation error (never for the protocol's own types).
#[doc(hidden)]
pub fn to_json_wiped<T: Serialize + ?Sized>(
    v: &T,
) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    serde_json::to_writer(&mut n, v)?;
    let mut out = Zeroizing::new(Vec::with_capacity(n.0));
    serde_json::to_writer(&mut *out, v)?;
    Ok(out)
}

/// Appends `data` to `buf`; when `buf` must grow, its contents move to a
/// new buffer and the old one is wiped (unlike `Vec::extend`).
#[doc(hidden)]
pub fn extend_wiped(buf: &mut Zeroizing<Vec<u8>>, data: &[u8]) {
    let need = buf.len() + data.len();
    if need > buf.capacity() {
        let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(2 * buf.capacity())));
        bigger.extend_from_slice(buf);
        *buf = bigger;
    }
    buf.extend_from_slice(data);
}

/// `POST /v1/status`.
pub const STATUS: &str = "/v1/status";
/// `POST /v1/kek/info`.
pub const KEK_INFO: &str = "/v1/kek/info";
/// `POST /v1/wrap`.
pub const WRAP: &str = "/v1/wrap";
/// `POST /v1/generate`.
pub const GENERATE: &str = "/v1/generate";
/// `POST /v1/unwrap`.
pub const UNWRAP: &str = "/v1/unwrap";
/// `POST /v1/rewrap`.
pub const REWRAP: &str = "/v1/rewrap";
/// `POST /v1/kek/rotate`.
pub const KEK_ROTATE: &str = "/v1/kek/rotate";
/// `POST /v1/kek/retire`.
pub const KEK_RETIRE: &str = "/v1/kek/retire";
/// `POST /v1/kek/destroy`.
pub const KEK_DESTROY: &str = "/v1/kek/destroy";
/// `POST /v1/acknowledge`.
pub const ACKNOWLEDGE: &str = "/v1/acknowledge";
/// `POST /v1/unseal`.
pub const UNSEAL: &str = "/v1/unseal";
/// `POST /v1/seal`.
pub const SEAL: &str = "/v1/seal";
/// `POST /v1/audit`.
pub const AUDIT: &str = "/v1/audit";
/// `POST /v1/dek/destroy`.
pub const DEK_DESTROY: &str = "/v1/dek/destroy";
/// `POST /v1/approval/withdraw`.
pub const APPROVAL_WITHDRAW: &str = "/v1/approval/withdraw";
/// `POST /v1/reshare`.
pub const RESHARE: &str = "/v1/reshare";
/// `POST /v1/share/collect`.
pub const SHARE_COLLECT: &str = "/v1/share/collect";
/// `POST /v1/reveal`.
pub const REVEAL: &str = "/v1/reveal";
/// `POST /v1/whoami`.
pub const WHOAMI: &str = "/v1/whoami";
/// `POST /v1/index/keys`: the live index-key versions of a scope.
pub const INDEX_KEYS: &str = "/v1/index/keys";
/// `POST /v1/index/hash`: keyed hashes of a batch of PANs.
pub const INDEX_HASH: &str = "/v1/index/hash";
/// `POST /v1/index/create`: a scope's next index-key version.
pub const INDEX_CREATE: &str = "/v1/index/create";
/// `POST /v1/index/state`: moves an index-key version along its lifecycle.
pub const INDEX_STATE: &str = "/v1/index/state";
/// `POST /v1/record/sign`: the MAC of a key-store record.
pub const RECORD_SIGN: &str = "/v1/record/sign";
/// `POST /v1/record/verify`: checks a key-store record's MAC and freshness.
pub const RECORD_VERIFY: &str = "/v1/record/verify";

/// `POST /v1/ingest/keys`: the live ingest-key versions of a scope.
pub const INGEST_KEYS: &str = "/v1/ingest/keys";
/// `POST /v1/ingest/create`: a scope's next ingest key pair.
pub const INGEST_CREATE: &str = "/v1/ingest/create";
/// `POST /v1/ingest/state`: moves an ingest-key version forward.
pub const INGEST_STATE: &str = "/v1/ingest/state";
/// `POST /v1/ingest/open`: opens one ingest ciphertext inside keyd.
pub const INGEST_OPEN: &str = "/v1/ingest/open";
/// `POST /v1/generate-wrapped`: a fresh DEK of which only the wrap leaves keyd.
pub const GENERATE_WRAPPED: &str = "/v1/generate-wrapped";
/// `POST /v1/admit`: ingest ciphertexts turned into compact ones inside keyd.
pub const ADMIT: &str = "/v1/admit";

/// Largest `/v1/admit` request or answer body (a full batch of
/// [`crate::MAX_ADMIT_BATCH`] items with long row keys); every other path
/// keeps [`MAX_BODY_BYTES`].
pub const MAX_ADMIT_BODY_BYTES: usize = 1024 * 1024;

/// Most keyed hashes (PANs × versions) one [`IndexHashRequest`] may ask
/// for; the client splits larger batches.
pub const MAX_INDEX_BATCH: usize = 4096;

/// A permission a principal may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    /// Create and wrap new keys (encrypt-only front ends get only this).
    Wrap,
    /// Unwrap data keys (decrypt PANs).
    Unwrap,
    /// Ask for keyed hashes of PANs (blind index) computed inside keyd;
    /// never receives the index key.
    Index,
    /// Rewrap under the newest KEK version.
    Rewrap,
    /// KEK lifecycle, unsealing, acknowledgements.
    Custodian,
    /// Read the audit log.
    AuditRead,
    /// Ask keyd to open one sealed record and return its PAN (counted per
    /// distinct record); never receives a DEK.
    Reveal,
    /// Admit ingest (HPKE) ciphertexts into the compact form inside keyd;
    /// never receives a PAN or a DEK.
    Admit,
}

impl Permission {
    /// The name used in configuration files and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Wrap => "wrap",
            Permission::Unwrap => "unwrap",
            Permission::Index => "index",
            Permission::Rewrap => "rewrap",
            Permission::Custodian => "custodian",
            Permission::AuditRead => "audit-read",
            Permission::Reveal => "reveal",
            Permission::Admit => "admit",
        }
    }
}

/// The key a request is about: what its wrap is bound to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireKeyRequest {
    /// Key id.
    pub id: KeyId,
    /// Scope (tenant/merchant).
    pub scope: Scope,
    /// Environment tag.
    pub environment: Environment,
    /// Data or index key.
    pub purpose: KeyPurpose,
}

impl From<&KeyRequest> for WireKeyRequest {
    fn from(r: &KeyRequest) -> Self {
        WireKeyRequest {
            id: r.id,
            scope: r.scope.clone(),
            environment: r.environment.clone(),
            purpose: r.purpose,
        }
    }
}

impl From<WireKeyRequest> for KeyRequest {
    fn from(r: WireKeyRequest) -> Self {
        KeyRequest {
            id: r.id,
            scope: r.scope,
            environment: r.environment,
            purpose: r.purpose,
        }
    }
}

/// A wrapped key on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireWrapped {
    /// KEK id.
    pub kek_id: String,
    /// KEK version.
    pub kek_version: u32,
    /// Wrapped bytes, base64.
    #[serde(with = "b64")]
    pub bytes: Vec<u8>,
}

impl From<&WrappedKey> for WireWrapped {
    fn from(w: &WrappedKey) -> Self {
        WireWrapped {
            kek_id: w.kek.id.clone(),
            kek_version: w.kek.version,
            bytes: w.bytes.clone(),
        }
    }
}

impl From<WireWrapped> for WrappedKey {
    fn from(w: WireWrapped) -> Self {
        WrappedKey {
            kek: KekRef {
                id: w.kek_id,
                version: w.kek_version,
            },
            bytes: w.bytes,
        }
    }
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// A 256-bit key in the clear, base64 on the wire. Wiped on drop; `Debug`
/// prints `KeyMaterial(..)`.
pub struct KeyMaterial(Zeroizing<[u8; 32]>);

impl KeyMaterial {
    /// Wraps key bytes.
    pub fn new(key: Zeroizing<[u8; 32]>) -> Self {
        KeyMaterial(key)
    }

    /// The key bytes.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial(..)")
    }
}

impl Serialize for KeyMaterial {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&self.0[..]));
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for KeyMaterial {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = KeyMaterial;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base64 256-bit key")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<KeyMaterial, E> {
                let mut buf = Zeroizing::new([0u8; 33]);
                let n = base64::engine::general_purpose::STANDARD
                    .decode_slice(v.as_bytes(), &mut buf[..])
                    .map_err(|_| E::custom("key must be 32 bytes of base64"))?;
                if n != 32 {
                    return Err(E::custom("key must be 32 bytes of base64"));
                }
                let mut key = Zeroizing::new([0u8; 32]);
                key.copy_from_slice(&buf[..32]);
                Ok(KeyMaterial(key))
            }
        }
        d.deserialize_str(V)
    }
}

/// A custodian's unseal share, as text. Wiped on drop; `Debug` prints
/// `ShareText(..)`.
#[derive(Deserialize, Serialize)]
#[serde(transparent)]
pub struct ShareText(String);

impl ShareText {
    /// Wraps share text (as written by `panseal-keyd init`).
    pub fn new(text: String) -> Self {
        ShareText(text)
    }

    /// The text.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl Drop for ShareText {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for ShareText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShareText(..)")
    }
}

/// `POST /v1/wrap`: wrap a key the client generated.
#[derive(Debug, Serialize, Deserialize)]
pub struct WrapRequest {
    /// What the wrap is bound to.
    pub key: WireKeyRequest,
    /// The key to wrap.
    pub dek: KeyMaterial,
}

/// `POST /v1/generate`: the server creates a key and returns it with its wrap.
#[derive(Debug, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// What the wrap is bound to.
    pub key: WireKeyRequest,
}

/// Answer to [`GenerateRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub struct GenerateResponse {
    /// The new key.
    pub dek: KeyMaterial,
    /// Its wrap.
    pub wrapped: WireWrapped,
}

/// `POST /v1/unwrap`.
#[derive(Debug, Serialize, Deserialize)]
pub struct UnwrapRequest {
    /// What the wrap is bound to.
    pub key: WireKeyRequest,
    /// The wrapped key.
    pub wrapped: WireWrapped,
    /// The end user or job the application acts for (audited).
    pub on_behalf_of: String,
    /// Why (audited).
    pub purpose: String,
}

/// Answer to [`UnwrapRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub struct UnwrapResponse {
    /// The key.
    pub dek: KeyMaterial,
}

/// `POST /v1/rewrap`: the key never leaves the server.
#[derive(Debug, Serialize, Deserialize)]
pub struct RewrapRequest {
    /// What the wrap is bound to.
    pub key: WireKeyRequest,
    /// The wrapped key.
    pub wrapped: WireWrapped,
}

/// Answer to wrap and rewrap.
#[derive(Debug, Serialize, Deserialize)]
pub struct WrappedResponse {
    /// The wrapped key.
    pub wrapped: WireWrapped,
}

/// Names one scope's KEK.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KekTarget {
    /// Environment tag.
    pub environment: Environment,
    /// Scope.
    pub scope: Scope,
}

/// Names one version of a scope's KEK.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KekVersionTarget {
    /// Environment tag.
    pub environment: Environment,
    /// Scope.
    pub scope: Scope,
    /// KEK version.
    pub version: u32,
}

/// One KEK version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekVersionInfo {
    /// The version.
    pub version: u32,
    /// Active, decrypt-only (retired) or destroyed.
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// Custodians who approved destroying it so far.
    pub destroy_approvals: Vec<String>,
}

/// A scope's KEK and its versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekStatus {
    /// The KEK id used in wrapped keys.
    pub kek_id: String,
    /// Environment tag.
    pub environment: Environment,
    /// Scope.
    pub scope: Scope,
    /// `AES-256-GCM`.
    pub algorithm: String,
    /// Security strength in bits.
    pub strength_bits: u32,
    /// The version that wraps new keys (0 if the scope has no KEK yet).
    pub active_version: u32,
    /// Every version, oldest first.
    pub versions: Vec<KekVersionInfo>,
}

/// Answer to a destroy request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DestroyResponse {
    /// Whether the version is now destroyed.
    pub destroyed: bool,
    /// Custodians who approved so far.
    pub approvals: Vec<String>,
    /// Approvals needed.
    pub required: u32,
    /// The KEK after the request.
    pub kek: KekStatus,
}

/// `POST /v1/acknowledge`: a custodian's acknowledgement of their
/// responsibilities (PCI DSS 3.7.8).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AcknowledgeRequest {
    /// The statement acknowledged (kept as a SHA-256 on record).
    pub statement: String,
}

/// `POST /v1/unseal`: one custodian's share.
#[derive(Debug, Serialize, Deserialize)]
pub struct UnsealRequest {
    /// The share.
    pub share: ShareText,
    /// The state generation this custodian last noted (shown by `status`
    /// and after every change): the share is refused if the server's state
    /// is at another generation (a restored older state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_generation: Option<u64>,
}

/// `POST /v1/dek/destroy`: one custodian's approval to destroy a DEK (or
/// index key). With two distinct custodians' unexpired approvals keyd
/// records the key as destroyed and never unwraps or rewraps it again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DekTarget {
    /// The key.
    pub key: WireKeyRequest,
}

/// Answer to [`DekTarget`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DekDestroyResponse {
    /// Whether the key is now destroyed.
    pub destroyed: bool,
    /// Custodians whose approvals count (unexpired).
    pub approvals: Vec<String>,
    /// Approvals needed.
    pub required: u32,
    /// When the oldest counting approval expires (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// `POST /v1/approval/withdraw`: withdraws the caller's own pending
/// destroy approval of a KEK version or a DEK (exactly one of the two).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WithdrawRequest {
    /// A KEK version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kek: Option<KekVersionTarget>,
    /// A DEK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dek: Option<WireKeyRequest>,
}

/// Answer to [`WithdrawRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WithdrawResponse {
    /// The approvals still pending.
    pub approvals: Vec<String>,
}

/// `POST /v1/reshare`: one current custodian's vote, with their current
/// share, for new shares (a new master key) split `threshold`-of-n among
/// `custodians`. When `k` current custodians sent the same proposal, keyd
/// makes the new master key and shares; each new custodian collects theirs
/// ([`CollectRequest`]); when all have, the state is re-sealed under the new
/// master key and every old share stops working.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReshareRequest {
    /// New threshold.
    pub threshold: u8,
    /// New custodians.
    pub custodians: Vec<String>,
    /// The caller's current share.
    pub share: ShareText,
}

/// Answer to [`ReshareRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReshareResponse {
    /// Current custodians who voted for this proposal.
    pub submitted: Vec<String>,
    /// Votes needed (the current threshold).
    pub threshold: u32,
    /// New custodians who still have to collect their share.
    pub awaiting_collection: Vec<String>,
}

/// `POST /v1/share/collect`: the caller's own new share, handed out once.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CollectRequest {
    /// The custodian's acknowledgement of their responsibilities, recorded
    /// with the share (PCI DSS 3.7.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
}

/// Answer to [`CollectRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub struct CollectResponse {
    /// The share: keep it secret, apart from the other shares.
    pub share: ShareText,
    /// New custodians who still have to collect theirs.
    pub awaiting_collection: Vec<String>,
}

/// One live index-key version (the key itself never leaves keyd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexKeyVersion {
    /// Version, from 1.
    pub version: u32,
    /// `active` (hashes new rows) or `decrypt-only` (lookup only).
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: u64,
}

/// Answer to `/v1/index/keys`, `/v1/index/create` and `/v1/index/state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexKeysResponse {
    /// Environment tag.
    pub environment: Environment,
    /// Scope.
    pub scope: Scope,
    /// Live versions, newest first (destroyed ones are not listed).
    pub versions: Vec<IndexKeyVersion>,
}

/// A PAN's ASCII digits on the wire. Wiped on drop; `Debug` prints
/// `WirePan(..)`.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
pub struct WirePan(String);

impl WirePan {
    /// Wraps PAN digits.
    pub fn new(digits: &str) -> Self {
        WirePan(digits.to_owned())
    }

    /// The digits.
    pub fn expose_digits(&self) -> &str {
        &self.0
    }
}

impl Drop for WirePan {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for WirePan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WirePan(..)")
    }
}

/// `POST /v1/index/hash`: HMAC-SHA-256 of each PAN's ASCII digits under
/// each of `versions` of the scope's index key. At most
/// [`MAX_INDEX_BATCH`] hashes (`pans.len() * versions.len()`).
#[derive(Debug, Serialize, Deserialize)]
pub struct IndexHashRequest {
    /// Environment tag.
    pub environment: Environment,
    /// Scope.
    pub scope: Scope,
    /// Index-key versions, each live.
    pub versions: Vec<u32>,
    /// The PANs (8 to 19 ASCII digits, Luhn-valid).
    pub pans: Vec<WirePan>,
    /// The end user or job the application acts for (audited).
    #[serde(default)]
    pub on_behalf_of: String,
    /// Why (audited).
    #[serde(default)]
    pub purpose: String,
}

/// Answer to [`IndexHashRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub struct IndexHashResponse {
    /// The versions, as asked.
    pub versions: Vec<u32>,
    /// PANs hashed.
    pub count: u64,
    /// `count * versions.len()` hashes of 32 bytes, concatenated PAN-major
    /// (PAN `i` under `versions[j]` at `(i * versions.len() + j) * 32`),
    /// base64.
    #[serde(with = "b64")]
    pub hashes: Vec<u8>,
}

/// `POST /v1/index/state`: a custodian moves an index-key version forward
/// (`decrypt-only`: lookup only; `destroyed`: the key is wiped).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndexStateRequest {
    /// Environment tag.
    pub environment: Environment,
    /// Scope.
    pub scope: Scope,
    /// The version.
    pub version: u32,
    /// The new state.
    pub state: KeyState,
}

/// `POST /v1/record/sign`: the key-store record `record` (as
/// `WrappedDek::to_bytes`, base64) replacing `previous` (the stored record
/// with its tag; absent for a new record).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordSignRequest {
    /// The stored record it replaces, with its tag.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub previous: Option<Vec<u8>>,
    /// The new record (its tag, if any, is ignored).
    #[serde(with = "b64")]
    pub record: Vec<u8>,
}

/// Answer to [`RecordSignRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordSignResponse {
    /// HMAC-SHA-256(record key of the environment, `signed_bytes`), base64.
    #[serde(with = "b64")]
    pub tag: Vec<u8>,
    /// The sequence now registered for the key.
    pub sequence: u64,
}

/// `POST /v1/record/verify`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordVerifyRequest {
    /// The record with its tag (`WrappedDek::to_bytes`), base64.
    #[serde(with = "b64")]
    pub record: Vec<u8>,
}

/// What `/v1/record/verify` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordCheck {
    /// The tag verifies and the sequence is the newest keyd signed.
    Ok,
    /// No tag, or a tag keyd did not make for these bytes.
    Tampered,
    /// A once-valid record older than the newest keyd signed (rollback).
    Stale,
}

/// Answer to [`RecordVerifyRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordVerifyResponse {
    /// The verdict.
    pub result: RecordCheck,
    /// The sequence keyd registered for the key (0 if none).
    pub registered_sequence: u64,
}

mod b64_opt {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        s.map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

/// The server's state as seen by the caller.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusResponse {
    /// Whether the server is sealed (serves no key operation).
    pub sealed: bool,
    /// Shares needed to unseal.
    pub threshold: u32,
    /// Custodians whose shares were accepted in the current unseal attempt.
    pub submitted: Vec<String>,
    /// The caller's principal.
    pub principal: String,
    /// The caller's environment tag.
    pub environment: Environment,
    /// The caller's permissions.
    pub permissions: Vec<Permission>,
    /// Whether the caller has an acknowledgement on record.
    pub acknowledged: bool,
    /// The state's generation (counts changes): custodians note it and
    /// confirm it at unseal (`expected_generation`).
    #[serde(default)]
    pub state_generation: u64,
    /// Custodians who still have to collect a new share.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub awaiting_collection: Vec<String>,
}

/// `POST /v1/audit`: read records from the chained audit log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditReadRequest {
    /// First record (1-based).
    pub from: u64,
    /// At most this many records.
    pub limit: u32,
}

/// Answer to [`AuditReadRequest`]: raw chained records (JSON lines).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditReadResponse {
    /// The records.
    pub records: Vec<String>,
}

/// The context a sealed PAN is bound to, on the wire (`FORMAT.md`,
/// "Context encoding", field by field).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireContext {
    /// Table name.
    pub table: String,
    /// Column name.
    pub column: String,
    /// Row key bytes, base64.
    #[serde(with = "b64")]
    pub row_key: Vec<u8>,
}

/// `POST /v1/reveal`: open one sealed record inside keyd.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevealRequest {
    /// The DEK's key-store record (`FORMAT.md`, "Key-store record"), base64.
    #[serde(with = "b64")]
    pub record: Vec<u8>,
    /// The sealed PAN in its binary form, base64.
    #[serde(with = "b64")]
    pub sealed: Vec<u8>,
    /// The context it was sealed under.
    pub context: WireContext,
    /// The user or service the caller acts for (audited).
    pub on_behalf_of: String,
    /// Why (audited).
    pub purpose: String,
}

/// A PAN's ASCII digits in the clear (the one answer that carries a PAN).
/// Wiped on drop; `Debug` prints `PanDigits(..)`.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
pub struct PanDigits(String);

impl PanDigits {
    /// Wraps digits.
    pub fn new(digits: String) -> Self {
        PanDigits(digits)
    }

    /// The digits.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl Drop for PanDigits {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for PanDigits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PanDigits(..)")
    }
}

/// Answer to [`RevealRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub struct RevealResponse {
    /// The PAN's digits.
    pub pan: PanDigits,
    /// The DEK is no longer active or past its encrypt period: re-seal.
    pub needs_reseal: bool,
}

/// Answer to `POST /v1/whoami`: the caller's identity and rights.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WhoamiResponse {
    /// The caller's principal.
    pub principal: String,
    /// The caller's environment tag.
    pub environment: Environment,
    /// The caller's permissions.
    pub permissions: Vec<Permission>,
}

/// One live ingest-key version: its public key and lifecycle (the private
/// scalar never leaves keyd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestKeyVersion {
    /// Version, from 1.
    pub version: u32,
    /// `active` (front ends seal with it) or `decrypt-only` (retired:
    /// opens and admits, never seals).
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: u64,
    /// The public key, text form (`PIK1/env/scope/version/base64url`).
    pub public_key: String,
}

/// Answer to `/v1/ingest/keys`, `/v1/ingest/create` and `/v1/ingest/state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestKeysResponse {
    /// Environment tag.
    pub environment: Environment,
    /// Scope.
    pub scope: Scope,
    /// Live versions, newest first (destroyed ones are not listed).
    pub versions: Vec<IngestKeyVersion>,
}

/// `POST /v1/ingest/state`: a custodian moves an ingest-key version
/// forward (`decrypt-only`: retired; `destroyed`: the scalar is erased).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestStateRequest {
    /// Environment tag.
    pub environment: Environment,
    /// Scope.
    pub scope: Scope,
    /// The version.
    pub version: u32,
    /// The new state.
    pub state: KeyState,
}

/// `POST /v1/ingest/open`: open one ingest ciphertext inside keyd and
/// answer its PAN (as `/v1/reveal`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestOpenRequest {
    /// Environment tag.
    pub environment: Environment,
    /// The scope whose ingest key sealed it.
    pub scope: Scope,
    /// The ingest ciphertext: its text form (`I1…`) or its binary form in
    /// standard base64.
    pub sealed: String,
    /// The context it was sealed under.
    pub context: WireContext,
    /// The user or service the caller acts for (audited).
    pub on_behalf_of: String,
    /// Why (audited).
    pub purpose: String,
}

/// Reads the `sealed` string of an [`IngestOpenRequest`] or
/// [`WireAdmitItem`]: the ingest text form (`I1…`) or standard base64 of
/// the 101 bytes. `None` for anything else.
pub fn parse_ingest_sealed(s: &str) -> Option<crate::IngestSealed> {
    if s.starts_with("I1") {
        return crate::IngestSealed::from_text(s).ok();
    }
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .ok()?,
    );
    crate::IngestSealed::from_bytes(&bytes).ok()
}

/// One item of an [`AdmitRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireAdmitItem {
    /// The ingest ciphertext (text form or standard base64 of the bytes).
    pub sealed: String,
    /// The context it was sealed under; the compact form is bound to it.
    pub context: WireContext,
}

/// `POST /v1/admit`: open each item with the scope's ingest key, seal it
/// compact under the record's DEK bound to the same context, and compute
/// its blind-index values, all inside keyd. At most
/// [`crate::MAX_ADMIT_BATCH`] items.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitRequest {
    /// The DEK's key-store record (with its tag), base64.
    #[serde(with = "b64")]
    pub record: Vec<u8>,
    /// Index-key versions of the record's scope to compute (may be empty).
    #[serde(default)]
    pub index_versions: Vec<u32>,
    /// The items.
    pub items: Vec<WireAdmitItem>,
    /// The user or job the caller acts for (audited).
    #[serde(default)]
    pub on_behalf_of: String,
    /// Why (audited).
    #[serde(default)]
    pub purpose: String,
}

/// Why one admit item was refused (`panseal::AdmitItemError` on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdmitItemErrorKind {
    /// Not a well-formed ingest ciphertext.
    Malformed,
    /// Sealed for another ingest key (scope, environment or key pair).
    KeyMismatch,
    /// The ingest-key version is not live (never created, or destroyed).
    UnknownIngestKey,
    /// Altered, or bound to another context.
    OpenFailed,
}

/// One item's outcome in an [`AdmitResponse`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case", deny_unknown_fields)]
pub enum WireAdmitResult {
    /// Admitted.
    Ok {
        /// The compact ciphertext (binary form), base64.
        #[serde(with = "b64")]
        sealed: Vec<u8>,
        /// One 32-byte HMAC per requested index version, concatenated,
        /// base64.
        #[serde(with = "b64")]
        index: Vec<u8>,
    },
    /// Refused.
    Error {
        /// Why.
        error: AdmitItemErrorKind,
        /// For `unknown-ingest-key`: the version the item names.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
    },
}

/// Answer to [`AdmitRequest`]: one result per item, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdmitResponse {
    /// The results.
    pub results: Vec<WireAdmitResult>,
}

/// What went wrong, in a form each side maps to the same
/// [`KeyServiceError`] variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The server is sealed.
    Sealed,
    /// No or unknown credential.
    Unauthenticated,
    /// The principal lacks the permission, scope or environment.
    PermissionDenied,
    /// A quota was exceeded.
    QuotaExceeded,
    /// Unknown KEK or version.
    UnknownKek,
    /// The KEK version is destroyed.
    KekDestroyed,
    /// The DEK was destroyed by two custodians.
    KeyDestroyed,
    /// The KEK version is retired (decrypt only).
    KekRetired,
    /// Environment mismatch.
    Environment,
    /// The wrapped key failed to authenticate (no detail).
    UnwrapFailed,
    /// An unseal share was refused (no detail).
    ShareRefused,
    /// The request is malformed.
    BadRequest,
    /// The request conflicts with the current state (e.g. already unsealed,
    /// same custodian twice).
    Conflict,
    /// The server cannot serve now; retry later.
    Unavailable,
    /// The server failed (e.g. its audit log or state could not be written).
    Internal,
    /// A sealed record failed to open inside keyd: altered, another key or
    /// another context (no detail).
    OpenFailed,
    /// The DEK record is marked compromised: keyd does not reveal under it.
    KeyCompromised,
    /// The DEK record is past its decrypt-until date.
    KeyExpired,
    /// The index-key version is not live in the scope.
    UnknownIndexKey,
    /// One PAN of a batch was refused (`index` names it); nothing computed.
    BatchItem,
    /// A key-store record's tag does not verify.
    RecordTampered,
    /// A key-store record is older than the newest keyd signed.
    RecordStale,
    /// The record change is not one the lifecycle allows.
    RecordTransition,
    /// The ingest-key version is not live in the scope (never created, or
    /// destroyed).
    UnknownIngestKey,
}

impl ErrorKind {
    /// The HTTP status for this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest
            | ErrorKind::UnwrapFailed
            | ErrorKind::ShareRefused
            | ErrorKind::OpenFailed
            | ErrorKind::BatchItem => 400,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::PermissionDenied | ErrorKind::Environment | ErrorKind::RecordTransition => {
                403
            }
            ErrorKind::UnknownKek | ErrorKind::UnknownIndexKey | ErrorKind::UnknownIngestKey => {
                404
            }
            ErrorKind::Conflict
            | ErrorKind::KekRetired
            | ErrorKind::RecordTampered
            | ErrorKind::RecordStale => 409,
            ErrorKind::KekDestroyed
            | ErrorKind::KeyDestroyed
            | ErrorKind::KeyCompromised
            | ErrorKind::KeyExpired => 410,
            ErrorKind::QuotaExceeded => 429,
            ErrorKind::Internal => 500,
            ErrorKind::Sealed | ErrorKind::Unavailable => 503,
        }
    }
}

/// The body of every error answer. Never holds key material or a PAN.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The kind.
    pub error: ErrorKind,
    /// A human-readable message.
    pub message: String,
    /// For [`ErrorKind::Environment`]: the environment the principal may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_environment: Option<String>,
    /// For [`ErrorKind::Environment`]: the environment asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_environment: Option<String>,
    /// For [`ErrorKind::BatchItem`]: the refused item's position, from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// For [`ErrorKind::UnknownIndexKey`]: the scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// For [`ErrorKind::UnknownIndexKey`]: the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

impl ErrorBody {
    /// An error body.
    pub fn new(error: ErrorKind, message: impl Into<String>) -> Self {
        ErrorBody {
            error,
            message: message.into(),
            allowed_environment: None,
            requested_environment: None,
            index: None,
            scope: None,
            version: None,
        }
    }

    /// The client-side error for this answer.
    pub fn into_error(self) -> KeyServiceError {
        match self.error {
            ErrorKind::Sealed => KeyServiceError::Sealed,
            ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => {
                KeyServiceError::PermissionDenied(self.message)
            }
            ErrorKind::QuotaExceeded => KeyServiceError::QuotaExceeded(self.message),
            ErrorKind::UnknownKek => KeyServiceError::UnknownKek(self.message),
            ErrorKind::KekDestroyed | ErrorKind::KeyDestroyed => {
                KeyServiceError::KekDestroyed(self.message)
            }
            ErrorKind::KekRetired => KeyServiceError::KekRetired(self.message),
            ErrorKind::Environment => KeyServiceError::Environment {
                service: self.allowed_environment.unwrap_or_default(),
                request: self.requested_environment.unwrap_or_default(),
            },
            ErrorKind::UnwrapFailed => KeyServiceError::UnwrapFailed,
            ErrorKind::Unavailable => KeyServiceError::Unavailable(self.message),
            ErrorKind::OpenFailed => KeyServiceError::OpenFailed,
            ErrorKind::KeyCompromised | ErrorKind::KeyExpired => {
                KeyServiceError::PermissionDenied(self.message)
            }
            ErrorKind::UnknownIndexKey => KeyServiceError::UnknownIndexKey {
                scope: self.scope.unwrap_or_default(),
                version: self.version.unwrap_or(0),
            },
            ErrorKind::BatchItem => KeyServiceError::BatchItem {
                index: self.index.unwrap_or(0) as usize,
                reason: self.message,
            },
            ErrorKind::RecordTampered => KeyServiceError::RecordTampered(self.message),
            ErrorKind::RecordStale => KeyServiceError::RecordStale(self.message),
            ErrorKind::RecordTransition => KeyServiceError::RecordTransition(self.message),
            ErrorKind::UnknownIngestKey => KeyServiceError::UnknownIngestKey {
                scope: self.scope.unwrap_or_default(),
                version: self.version.unwrap_or(0),
            },
            ErrorKind::ShareRefused
            | ErrorKind::BadRequest
            | ErrorKind::Conflict
            | ErrorKind::Internal => KeyServiceError::Other(self.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_holding_keys_never_reallocate_unwiped() {
        let r = WrapRequest {
            key: WireKeyRequest {
                id: KeyId::random(),
                scope: Scope::new("m").unwrap(),
                environment: Environment::new("test").unwrap(),
                purpose: KeyPurpose::Data,
            },
            dek: KeyMaterial::new(Zeroizing::new([9u8; 32])),
        };
        let j = to_json_wiped(&r).unwrap();
        assert_eq!(j.capacity(), j.len(), "allocated once, exactly");
        let mut buf = Zeroizing::new(Vec::with_capacity(4));
        for chunk in j.chunks(5) {
            extend_wiped(&mut buf, chunk);
        }
        assert_eq!(&buf[..], &j[..]);
        // Secrets in requests and answers print as `..`.
        let share = "pks1-0123456789abcdef";
        let dbg = format!(
            "{:?} {:?} {:?}",
            r,
            UnsealRequest {
                share: ShareText::new(share.into()),
                expected_generation: None
            },
            CollectResponse {
                share: ShareText::new(share.into()),
                awaiting_collection: vec![]
            }
        );
        assert!(!dbg.contains("0123456789abcdef"), "{dbg}");
        assert!(!dbg.contains(&base64::engine::general_purpose::STANDARD.encode([9u8; 32])));
    }

    #[test]
    fn key_material_round_trips_and_never_prints() {
        let k = KeyMaterial::new(Zeroizing::new([7u8; 32]));
        assert_eq!(format!("{k:?}"), "KeyMaterial(..)");
        let j = serde_json::to_string(&k).unwrap();
        let back: KeyMaterial = serde_json::from_str(&j).unwrap();
        assert_eq!(back.expose_secret(), &[7u8; 32]);
        assert!(serde_json::from_str::<KeyMaterial>("\"AAAA\"").is_err());
    }
}
