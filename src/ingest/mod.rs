//! Write-only ingest: a front end (or a browser) seals a PAN with a scope's
//! public key and holds no secret; only the key service, which holds the
//! private key, opens it or admits it into the compact form.
//!
//! RFC 9180 HPKE, base mode, single shot, suite DHKEM(P-256, HKDF-SHA256)
//! (`0x0010`) + HKDF-SHA256 (`0x0001`) + AES-256-GCM (`0x0002`), through the
//! maintained `hpke` crate. `FORMAT.md` §17 is the specification:
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 1 | version `0x01` |
//! | 1 | 1 | kind `0x02`: HPKE ingest, the suite above |
//! | 2 | 4 | key tag: SHA-256(`"panseal ingest key"` ‖ public key)\[0..4\] |
//! | 6 | 4 | ingest key version, big-endian |
//! | 10 | 65 | `enc`, the sender's ephemeral public key (SEC1 uncompressed) |
//! | 75 | 10 | ciphertext of the packed PAN (as in the compact form) |
//! | 85 | 16 | GCM tag |
//!
//! HPKE `info` = `"panseal ingest v1"` ‖ `0x00` ‖ len(env) ‖ env ‖
//! len(scope) ‖ scope ‖ version (u32 BE); the AEAD associated data is bytes
//! 0..10 followed by the encoded [`Context`], as in the compact form. Text
//! form: `I1` + unpadded base64url of bytes 2..101 (134 characters).

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hpke::{Deserializable, Kem as _, OpModeS, Serializable};
use rand_core::OsRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::context::Context;
use crate::error::{Error, FormatError, KeyError};
use crate::format::{SealedPan, PACKED_LEN};
use crate::keys::{Environment, KeyState, Scope};
use crate::pan::Pan;

pub(crate) mod split;

type Kem = hpke::kem::DhP256HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::AesGcm256;

/// Version byte of the ingest ciphertext (shared numbering with the
/// compact form; the kind byte tells them apart).
pub(crate) const INGEST_VERSION: u8 = 0x01;
/// Kind byte: HPKE base mode, DHKEM(P-256, HKDF-SHA256), HKDF-SHA256,
/// AES-256-GCM, over a 10-byte packed PAN.
pub(crate) const KIND_HPKE_P256: u8 = 0x02;
/// Header length (version, kind, key tag, key version): also the start of
/// the associated data.
pub(crate) const INGEST_HEADER_LEN: usize = 10;
/// Length of `enc` and of a public key: an uncompressed SEC1 P-256 point.
pub const INGEST_PUBLIC_KEY_LEN: usize = 65;
const TAG_LEN: usize = 16;
const ENC_AT: usize = INGEST_HEADER_LEN;
const CT_AT: usize = ENC_AT + INGEST_PUBLIC_KEY_LEN;
const TAG_AT: usize = CT_AT + PACKED_LEN;
/// Total binary length of an ingest ciphertext (every PAN length).
pub const INGEST_LEN: usize = TAG_AT + TAG_LEN;
/// Text prefix of the ingest form.
pub(crate) const INGEST_TEXT_PREFIX: &str = "I1";
/// Total text length of an ingest ciphertext (fits a `VARCHAR(140)`).
pub const INGEST_TEXT_LEN: usize = 2 + ((INGEST_LEN - 2) * 4).div_ceil(3);
/// Label at the start of HPKE `info`.
pub(crate) const INFO_LABEL: &[u8] = b"panseal ingest v1";
/// Label of the key tag hash.
pub(crate) const KEY_TAG_LABEL: &[u8] = b"panseal ingest key";
/// Text prefix of a public key's text form.
const PUBLIC_TEXT_PREFIX: &str = "PIK1";

/// HPKE `info` for (environment, scope, version): `FORMAT.md` §17.2.
pub(crate) fn info_bytes(environment: &Environment, scope: &Scope, version: u32) -> Vec<u8> {
    let env = environment.as_str().as_bytes();
    let scope = scope.as_str().as_bytes();
    let mut info = Vec::with_capacity(INFO_LABEL.len() + 7 + env.len() + scope.len());
    info.extend_from_slice(INFO_LABEL);
    info.push(0);
    // Names are at most 64 bytes (validated by `Environment`/`Scope`).
    info.push(env.len() as u8);
    info.extend_from_slice(env);
    info.push(scope.len() as u8);
    info.extend_from_slice(scope);
    info.extend_from_slice(&version.to_be_bytes());
    info
}

/// The [`KeyId`] audit events name an ingest key by: the first 8 bytes of
/// SHA-256(`"panseal-ingest-key-id-v1"` ‖ environment ‖ `0x00` ‖ scope ‖
/// `0x00` ‖ version u32 BE) (`FORMAT.md` §17.5). Deterministic, so every
/// instance names the same key pair the same way; never a DEK's id.
pub(crate) fn ingest_key_id(
    environment: &Environment,
    scope: &Scope,
    version: u32,
) -> crate::keys::KeyId {
    let mut h = Sha256::new();
    h.update(b"panseal-ingest-key-id-v1");
    h.update(environment.as_str().as_bytes());
    h.update([0]);
    h.update(scope.as_str().as_bytes());
    h.update([0]);
    h.update(version.to_be_bytes());
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    crate::keys::KeyId::from_bytes(id)
}

/// The 4-byte key tag of a public key.
pub(crate) fn key_tag(point: &[u8; INGEST_PUBLIC_KEY_LEN]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(KEY_TAG_LABEL);
    h.update(point);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// A scope's ingest public key: what a front end is configured with. Not
/// secret; prints and serializes freely.
#[derive(Clone, PartialEq, Eq)]
pub struct IngestPublicKey {
    environment: Environment,
    scope: Scope,
    version: u32,
    point: [u8; INGEST_PUBLIC_KEY_LEN],
}

impl IngestPublicKey {
    /// A public key from its parts. `point` is the uncompressed SEC1
    /// encoding (65 bytes, `0x04` ‖ x ‖ y).
    ///
    /// # Errors
    ///
    /// [`FormatError::PublicKey`] if `point` is not a point on P-256 (wrong
    /// length, compressed, off the curve, the identity).
    pub fn from_parts(
        environment: &Environment,
        scope: &Scope,
        version: u32,
        point: &[u8],
    ) -> Result<Self, Error> {
        let point: [u8; INGEST_PUBLIC_KEY_LEN] =
            point.try_into().map_err(|_| FormatError::PublicKey)?;
        <Kem as hpke::Kem>::PublicKey::from_bytes(&point).map_err(|_| FormatError::PublicKey)?;
        Ok(IngestPublicKey {
            environment: environment.clone(),
            scope: scope.clone(),
            version,
            point,
        })
    }

    /// Parses the text form `PIK1/<environment>/<scope>/<version>/<base64url point>`.
    ///
    /// # Errors
    ///
    /// [`FormatError::Text`] for a malformed string, [`FormatError::PublicKey`]
    /// for a point not on the curve, [`Error::Config`] for a bad name.
    pub fn from_text(text: &str) -> Result<Self, Error> {
        let mut parts = text.trim().split('/');
        let (Some(prefix), Some(env), Some(scope), Some(version), Some(point), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(FormatError::Text.into());
        };
        if prefix != PUBLIC_TEXT_PREFIX {
            return Err(FormatError::Text.into());
        }
        // Canonical decimal only: `u32::from_str` also takes `+1` and `01`,
        // and a text form should have one spelling.
        if version.is_empty()
            || !version.bytes().all(|b| b.is_ascii_digit())
            || (version.len() > 1 && version.starts_with('0'))
        {
            return Err(FormatError::Text.into());
        }
        let version: u32 = version.parse().map_err(|_| FormatError::Text)?;
        let point = URL_SAFE_NO_PAD
            .decode(point)
            .map_err(|_| FormatError::Text)?;
        Self::from_parts(
            &Environment::new(env)?,
            &Scope::new(scope)?,
            version,
            &point,
        )
    }

    /// The text form, for configuration files and environment variables.
    pub fn to_text(&self) -> String {
        format!(
            "{PUBLIC_TEXT_PREFIX}/{}/{}/{}/{}",
            self.environment,
            self.scope,
            self.version,
            URL_SAFE_NO_PAD.encode(self.point)
        )
    }

    /// The environment the key serves.
    pub fn environment(&self) -> &Environment {
        &self.environment
    }

    /// The scope the key serves.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The key's version within its scope.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The uncompressed SEC1 point (65 bytes).
    pub fn as_bytes(&self) -> &[u8; INGEST_PUBLIC_KEY_LEN] {
        &self.point
    }

    /// The 4-byte key tag ciphertexts carry.
    pub fn key_tag(&self) -> [u8; 4] {
        key_tag(&self.point)
    }

    /// SHA-256 of the point, hex: what a front end pins.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.point))
    }
}

impl fmt::Debug for IngestPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngestPublicKey")
            .field("environment", &self.environment)
            .field("scope", &self.scope)
            .field("version", &self.version)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl Serialize for IngestPublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_text())
    }
}

impl<'de> Deserialize<'de> for IngestPublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        IngestPublicKey::from_text(&text).map_err(serde::de::Error::custom)
    }
}

/// One version of a scope's ingest key pair, as a key service lists it:
/// the public half and its lifecycle. The private half never leaves the
/// service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct IngestKeyInfo {
    /// The public key (environment, scope, version, point).
    pub public_key: IngestPublicKey,
    /// [`KeyState::Active`]: front ends seal with it;
    /// [`KeyState::DecryptOnly`] (retired): still opens and admits, never
    /// seals; destroyed versions are not listed.
    pub state: KeyState,
    /// Creation time, Unix seconds.
    pub created_at: u64,
}

/// Seals PANs with a scope's ingest public key. Holds no secret: no key
/// service, no credential, no key store. What a front end (or a browser,
/// in JavaScript) runs.
#[derive(Clone, Debug)]
pub struct IngestSealer {
    key: IngestPublicKey,
    pk: <Kem as hpke::Kem>::PublicKey,
    info: Vec<u8>,
    header: [u8; INGEST_HEADER_LEN],
}

impl IngestSealer {
    /// A sealer for `key`.
    pub fn new(key: IngestPublicKey) -> Self {
        // `from_parts` validated the point.
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&key.point)
            .unwrap_or_else(|_| unreachable!("validated at construction"));
        let info = info_bytes(&key.environment, &key.scope, key.version);
        let mut header = [0u8; INGEST_HEADER_LEN];
        header[0] = INGEST_VERSION;
        header[1] = KIND_HPKE_P256;
        header[2..6].copy_from_slice(&key.key_tag());
        header[6..10].copy_from_slice(&key.version.to_be_bytes());
        IngestSealer {
            key,
            pk,
            info,
            header,
        }
    }

    /// A sealer for a listed key, refusing one that no longer seals.
    ///
    /// # Errors
    ///
    /// [`KeyError::IngestKeyRetired`] unless `info.state` is active.
    pub fn from_info(info: &IngestKeyInfo) -> Result<Self, Error> {
        if info.state != KeyState::Active {
            return Err(KeyError::IngestKeyRetired {
                scope: info.public_key.scope.to_string(),
                version: info.public_key.version,
            }
            .into());
        }
        Ok(Self::new(info.public_key.clone()))
    }

    /// The public key this sealer uses.
    pub fn public_key(&self) -> &IngestPublicKey {
        &self.key
    }

    /// Seals `pan` bound to `context`. The packed PAN is wiped before
    /// returning.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] only if the system's random generator fails.
    pub fn seal(&self, pan: &Pan, context: &Context) -> Result<IngestSealed, Error> {
        let mut packed = [0u8; PACKED_LEN];
        crate::format::write::pack_pan(pan, &mut packed);
        let result = self.seal_packed(&mut packed, context);
        packed.zeroize();
        result
    }

    /// Seals 10 packed bytes (possibly non-conforming): for the hazmat
    /// vectors and fuzzing. With the `fast-ingest` feature the
    /// encapsulation runs on `ring`'s P-256 (`seal_packed_ring`),
    /// otherwise through the `hpke` crate; the output format is the same.
    pub(crate) fn seal_packed(
        &self,
        packed: &mut [u8; PACKED_LEN],
        context: &Context,
    ) -> Result<IngestSealed, Error> {
        #[cfg(feature = "fast-ingest")]
        {
            self.seal_packed_ring(packed, context)
        }
        #[cfg(not(feature = "fast-ingest"))]
        {
            self.seal_packed_hpke_crate(packed, context)
        }
    }

    fn aad(&self, context: &Context) -> Zeroizing<Vec<u8>> {
        let mut aad = Zeroizing::new(Vec::with_capacity(
            INGEST_HEADER_LEN + context.encoded().len(),
        ));
        aad.extend_from_slice(&self.header);
        aad.extend_from_slice(context.encoded());
        aad
    }

    /// The seal through the `hpke` crate (RustCrypto `p256`: two scalar
    /// multiplications, `skE · G` and `skE · pkR`). The default path; with
    /// `fast-ingest`, kept for the same-run comparison (bench, tests).
    #[cfg_attr(
        all(feature = "fast-ingest", not(any(test, feature = "hazmat-test-keys"))),
        allow(dead_code)
    )]
    pub(crate) fn seal_packed_hpke_crate(
        &self,
        packed: &mut [u8; PACKED_LEN],
        context: &Context,
    ) -> Result<IngestSealed, Error> {
        let aad = self.aad(context);
        let (enc, tag) = hpke::single_shot_seal_in_place_detached::<Aead, Kdf, Kem, _>(
            &OpModeS::Base,
            &self.pk,
            &self.info,
            packed,
            &aad,
            &mut OsRng,
        )
        .map_err(|_| encapsulation_failed())?;
        let mut out = [0u8; INGEST_LEN];
        out[..INGEST_HEADER_LEN].copy_from_slice(&self.header);
        out[ENC_AT..CT_AT].copy_from_slice(&enc.to_bytes());
        out[CT_AT..TAG_AT].copy_from_slice(packed);
        out[TAG_AT..].copy_from_slice(&tag.to_bytes());
        Ok(IngestSealed { bytes: out })
    }

    /// The seal with `ring`'s P-256 ECDH (feature `fast-ingest`): an
    /// ephemeral key from `SystemRandom`, `enc` = its 65-byte public key,
    /// `Z` = `agree_ephemeral` with `pkR`, then the RFC 9180 sender in
    /// [`split::seal_in_place`] (`ExtractAndExpand` with `enc || pkR`, the
    /// key schedule with this key's `info`, AES-256-GCM at sequence 0).
    ///
    /// `ring` does not zeroize its ephemeral scalar or its copy of `Z`
    /// (its stack frames keep them after it returns), and with `skE` or
    /// `Z` and the stored ciphertext anyone opens that card. So every
    /// frame that holds them lies below this one ([`Self::ring_seal`], not
    /// inlined), and those frames are overwritten with zeros
    /// ([`scrub_stack`]) before this returns.
    #[cfg(feature = "fast-ingest")]
    pub(crate) fn seal_packed_ring(
        &self,
        packed: &mut [u8; PACKED_LEN],
        context: &Context,
    ) -> Result<IngestSealed, Error> {
        let aad = self.aad(context);
        let mut out = [0u8; INGEST_LEN];
        let result = self.ring_seal(packed, &aad, &mut out);
        scrub_stack();
        result?;
        Ok(IngestSealed { bytes: out })
    }

    #[cfg(feature = "fast-ingest")]
    #[inline(never)]
    fn ring_seal(
        &self,
        packed: &mut [u8; PACKED_LEN],
        aad: &[u8],
        out: &mut [u8; INGEST_LEN],
    ) -> Result<(), Error> {
        use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
        let rng = ring::rand::SystemRandom::new();
        let esk =
            EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| encapsulation_failed())?;
        let epk = esk
            .compute_public_key()
            .map_err(|_| encapsulation_failed())?;
        if epk.as_ref().len() != INGEST_PUBLIC_KEY_LEN {
            return Err(encapsulation_failed());
        }
        out[..INGEST_HEADER_LEN].copy_from_slice(&self.header);
        out[ENC_AT..CT_AT].copy_from_slice(epk.as_ref());
        let peer = UnparsedPublicKey::new(&ECDH_P256, &self.key.point[..]);
        let dh = agree_ephemeral(esk, &peer, split::DhSecret::from_slice)
            .map_err(|_| encapsulation_failed())?
            .map_err(|_| encapsulation_failed())?;
        let tag = split::seal_in_place(
            split::SplitAead::Aes256Gcm,
            &dh,
            &out[ENC_AT..CT_AT],
            &self.key.point,
            &self.info,
            aad,
            packed,
        )
        .map_err(|_| encapsulation_failed())?;
        drop(dh);
        out[CT_AT..TAG_AT].copy_from_slice(packed);
        out[TAG_AT..].copy_from_slice(&tag);
        Ok(())
    }
}

/// Bytes of stack [`scrub_stack`] overwrites: several times what `ring`'s
/// P-256 key generation and agreement, the HKDF and the AES-GCM seal use.
#[cfg(feature = "fast-ingest")]
const SCRUB_LEN: usize = 16 * 1024;

/// Overwrites (volatile writes) the [`SCRUB_LEN`] bytes of stack below the
/// caller's frame, where the frames of the calls it just returned from
/// were: `ring`'s ephemeral scalar and DH output among them.
#[cfg(feature = "fast-ingest")]
#[inline(never)]
fn scrub_stack() {
    let mut buf = [0u8; SCRUB_LEN];
    buf.zeroize();
    std::hint::black_box(&buf);
}

fn encapsulation_failed() -> Error {
    Error::Config(crate::error::ConfigError::Invalid(
        "HPKE encapsulation failed".into(),
    ))
}

/// A PAN sealed with an ingest public key (`FORMAT.md` §17): 101 bytes, or
/// 134 characters of text. Not secret; stored until admitted into the
/// compact form ([`crate::Panseal::admit`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IngestSealed {
    bytes: [u8; INGEST_LEN],
}

impl IngestSealed {
    /// Parses the binary form.
    ///
    /// # Errors
    ///
    /// [`Error::Format`]: empty, wrong version, kind or length. Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let Some(&version) = bytes.first() else {
            return Err(FormatError::Empty.into());
        };
        if version != INGEST_VERSION {
            return Err(FormatError::UnknownVersion(version).into());
        }
        match bytes.get(1) {
            Some(&KIND_HPKE_P256) => {}
            Some(&kind) => return Err(FormatError::UnknownAlgorithm(kind).into()),
            None => {
                return Err(FormatError::Length {
                    expected: INGEST_LEN,
                    actual: bytes.len(),
                }
                .into())
            }
        }
        let bytes: [u8; INGEST_LEN] = bytes.try_into().map_err(|_| FormatError::Length {
            expected: INGEST_LEN,
            actual: bytes.len(),
        })?;
        Ok(IngestSealed { bytes })
    }

    /// Parses the text form (`I1` + 132 base64url characters).
    ///
    /// # Errors
    ///
    /// [`FormatError::Text`] for a wrong prefix, length or alphabet.
    pub fn from_text(text: &str) -> Result<Self, Error> {
        let body = text
            .strip_prefix(INGEST_TEXT_PREFIX)
            .ok_or(FormatError::Text)?;
        if text.len() != INGEST_TEXT_LEN {
            return Err(FormatError::Text.into());
        }
        let mut out = [0u8; INGEST_LEN];
        out[0] = INGEST_VERSION;
        out[1] = KIND_HPKE_P256;
        let n = URL_SAFE_NO_PAD
            .decode_slice(body, &mut out[2..])
            .map_err(|_| FormatError::Text)?;
        if n != INGEST_LEN - 2 {
            return Err(FormatError::Text.into());
        }
        // Reject non-canonical encodings (trailing bits set).
        if URL_SAFE_NO_PAD.encode(&out[2..]) != body {
            return Err(FormatError::Text.into());
        }
        Ok(IngestSealed { bytes: out })
    }

    /// The binary form (101 bytes).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The text form (134 characters).
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(INGEST_TEXT_LEN);
        s.push_str(INGEST_TEXT_PREFIX);
        URL_SAFE_NO_PAD.encode_string(&self.bytes[2..], &mut s);
        s
    }

    /// The version of the ingest key it was sealed with.
    pub fn key_version(&self) -> u32 {
        u32::from_be_bytes([self.bytes[6], self.bytes[7], self.bytes[8], self.bytes[9]])
    }

    /// The key tag of the public key it was sealed with.
    pub fn key_tag(&self) -> [u8; 4] {
        [self.bytes[2], self.bytes[3], self.bytes[4], self.bytes[5]]
    }

    pub(crate) fn header(&self) -> &[u8] {
        &self.bytes[..INGEST_HEADER_LEN]
    }

    pub(crate) fn enc(&self) -> &[u8] {
        &self.bytes[ENC_AT..CT_AT]
    }

    pub(crate) fn ciphertext(&self) -> &[u8] {
        &self.bytes[CT_AT..TAG_AT]
    }

    pub(crate) fn tag(&self) -> &[u8] {
        &self.bytes[TAG_AT..]
    }
}

impl fmt::Debug for IngestSealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngestSealed")
            .field("key_version", &self.key_version())
            .field("key_tag", &hex::encode(self.key_tag()))
            .finish_non_exhaustive()
    }
}

/// A sealed PAN of either form, borrowed: what [`crate::Panseal::open_pan`]
/// takes (`&SealedPan` and `&IngestSealed` convert into it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealedRef<'a> {
    /// The compact 48-byte form, sealed under a DEK.
    Compact(&'a SealedPan),
    /// The ingest form, sealed with a scope's public key.
    Ingest(&'a IngestSealed),
}

impl<'a> From<&'a SealedPan> for SealedRef<'a> {
    fn from(s: &'a SealedPan) -> Self {
        SealedRef::Compact(s)
    }
}

impl<'a> From<&'a IngestSealed> for SealedRef<'a> {
    fn from(s: &'a IngestSealed) -> Self {
        SealedRef::Ingest(s)
    }
}

/// So that `open_pan(sealed, …)` keeps compiling where `sealed` is
/// itself a `&&SealedPan` (an iterator item).
impl<'a> From<&&'a SealedPan> for SealedRef<'a> {
    fn from(s: &&'a SealedPan) -> Self {
        SealedRef::Compact(s)
    }
}

impl<'a> From<&&'a IngestSealed> for SealedRef<'a> {
    fn from(s: &&'a IngestSealed) -> Self {
        SealedRef::Ingest(s)
    }
}

impl<'a> From<&'a StoredPan> for SealedRef<'a> {
    fn from(s: &'a StoredPan) -> Self {
        match s {
            StoredPan::Compact(c) => SealedRef::Compact(c),
            StoredPan::Ingest(i) => SealedRef::Ingest(i),
        }
    }
}

/// A sealed PAN of either form, owned: for a column that holds ingest
/// ciphertexts until they are admitted, and compact ones after.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoredPan {
    /// The compact 48-byte form.
    Compact(SealedPan),
    /// The ingest form.
    Ingest(IngestSealed),
}

impl StoredPan {
    /// Parses either binary form (told apart by the kind byte).
    ///
    /// # Errors
    ///
    /// [`Error::Format`] as [`SealedPan::from_bytes`] / [`IngestSealed::from_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.get(1) == Some(&KIND_HPKE_P256) {
            return IngestSealed::from_bytes(bytes).map(StoredPan::Ingest);
        }
        SealedPan::from_bytes(bytes).map(StoredPan::Compact)
    }

    /// Parses either text form (told apart by the prefix).
    ///
    /// # Errors
    ///
    /// [`FormatError::Text`].
    pub fn from_text(text: &str) -> Result<Self, Error> {
        if text.starts_with(INGEST_TEXT_PREFIX) {
            return IngestSealed::from_text(text).map(StoredPan::Ingest);
        }
        SealedPan::from_text(text).map(StoredPan::Compact)
    }

    /// The binary form.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            StoredPan::Compact(c) => c.as_bytes(),
            StoredPan::Ingest(i) => i.as_bytes(),
        }
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        match self {
            StoredPan::Compact(c) => c.to_text(),
            StoredPan::Ingest(i) => i.to_text(),
        }
    }
}

/// The private half of an ingest key pair. Lives only inside a key service
/// (keyd's state, the local service's memory); zeroized on drop, never
/// printed.
#[cfg_attr(
    not(any(feature = "keyd-server", feature = "hazmat-test-keys")),
    allow(unreachable_pub, dead_code)
)]
pub struct IngestPrivateKey {
    sk: <Kem as hpke::Kem>::PrivateKey,
    /// The same scalar, for the receiver's ECDH (zeroized on drop).
    secret: p256::SecretKey,
    public: IngestPublicKey,
}

#[cfg_attr(
    not(any(feature = "keyd-server", feature = "hazmat-test-keys")),
    allow(unreachable_pub, dead_code)
)]
impl IngestPrivateKey {
    /// A fresh key pair from the OS CSPRNG.
    pub fn generate(environment: &Environment, scope: &Scope, version: u32) -> Self {
        let (sk, pk) = Kem::gen_keypair(&mut OsRng);
        Self::from_pair(environment, scope, version, sk, &pk)
    }

    fn from_pair(
        environment: &Environment,
        scope: &Scope,
        version: u32,
        sk: <Kem as hpke::Kem>::PrivateKey,
        pk: &<Kem as hpke::Kem>::PublicKey,
    ) -> Self {
        let mut point = [0u8; INGEST_PUBLIC_KEY_LEN];
        point.copy_from_slice(&pk.to_bytes());
        IngestPrivateKey {
            secret: p256::SecretKey::from_slice(&sk.to_bytes())
                .unwrap_or_else(|_| unreachable!("an hpke P-256 key is a valid scalar")),
            sk,
            public: IngestPublicKey {
                environment: environment.clone(),
                scope: scope.clone(),
                version,
                point,
            },
        }
    }

    /// Rebuilds a key pair from its 32-byte scalar (as stored sealed in a
    /// key service's state).
    ///
    /// # Errors
    ///
    /// [`FormatError::PublicKey`] if `scalar` is zero or not below the
    /// group order.
    pub fn from_scalar(
        environment: &Environment,
        scope: &Scope,
        version: u32,
        scalar: &[u8; 32],
    ) -> Result<Self, Error> {
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(scalar)
            .map_err(|_| FormatError::PublicKey)?;
        let pk = Kem::sk_to_pk(&sk);
        Ok(Self::from_pair(environment, scope, version, sk, &pk))
    }

    /// The 32-byte scalar, for sealing into a key service's state.
    pub fn to_scalar(&self) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&self.sk.to_bytes());
        out
    }

    /// The public half.
    pub fn public_key(&self) -> &IngestPublicKey {
        &self.public
    }

    /// Opens `sealed` bound to `context`.
    ///
    /// # Errors
    ///
    /// [`KeyError::IngestKeyMismatch`] if the ciphertext names another key
    /// (version or key tag: another scope, environment or key pair);
    /// [`Error::Decryption`] (opaque) for an altered ciphertext or another
    /// context; [`FormatError::Payload`] if what authenticates is not a
    /// packed PAN.
    pub fn open(&self, sealed: &IngestSealed, context: &Context) -> Result<Pan, Error> {
        let mut packed = self.open_packed(sealed, context)?;
        let pan = crate::format::read::unpack_pan(&packed);
        packed.zeroize();
        Ok(pan?)
    }

    pub(crate) fn open_packed(
        &self,
        sealed: &IngestSealed,
        context: &Context,
    ) -> Result<Zeroizing<[u8; PACKED_LEN]>, Error> {
        if sealed.key_version() != self.public.version || sealed.key_tag() != self.public.key_tag()
        {
            return Err(KeyError::IngestKeyMismatch.into());
        }
        // One scalar multiplication (`skR · enc`), then the rest of the
        // RFC 9180 receiver (`split`, checked against RFC 9180 A.3 and the
        // `hpke` crate).
        let enc = p256::PublicKey::from_sec1_bytes(sealed.enc()).map_err(|_| Error::Decryption)?;
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), enc.as_affine());
        let dh = split::DhSecret::from_slice(shared.raw_secret_bytes().as_slice())?;
        drop(shared);
        split::open_packed(&self.public, sealed, context, &dh)
    }

    /// The same open through the `hpke` crate's own decapsulation: the
    /// reference the split receiver is tested against.
    #[cfg(test)]
    pub(crate) fn open_packed_with_hpke_crate(
        &self,
        sealed: &IngestSealed,
        context: &Context,
    ) -> Result<Zeroizing<[u8; PACKED_LEN]>, Error> {
        if sealed.key_version() != self.public.version || sealed.key_tag() != self.public.key_tag()
        {
            return Err(KeyError::IngestKeyMismatch.into());
        }
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(sealed.enc())
            .map_err(|_| Error::Decryption)?;
        let tag =
            hpke::aead::AeadTag::<Aead>::from_bytes(sealed.tag()).map_err(|_| Error::Decryption)?;
        let mut aad = Vec::with_capacity(INGEST_HEADER_LEN + context.encoded().len());
        aad.extend_from_slice(sealed.header());
        aad.extend_from_slice(context.encoded());
        let mut packed = Zeroizing::new([0u8; PACKED_LEN]);
        packed.copy_from_slice(sealed.ciphertext());
        hpke::single_shot_open_in_place_detached::<Aead, Kdf, Kem>(
            &hpke::OpModeR::Base,
            &self.sk,
            &enc,
            &info_bytes(
                &self.public.environment,
                &self.public.scope,
                self.public.version,
            ),
            &mut packed[..],
            &aad,
            &tag,
        )
        .map_err(|_| Error::Decryption)?;
        Ok(packed)
    }
}

impl fmt::Debug for IngestPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngestPrivateKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> (Environment, Scope) {
        (
            Environment::new("test").unwrap(),
            Scope::new("merchant-42").unwrap(),
        )
    }

    #[test]
    fn sizes() {
        assert_eq!(INGEST_LEN, 101);
        assert_eq!(INGEST_TEXT_LEN, 134);
    }

    #[test]
    fn round_trip_every_length() {
        let (env, scope) = names();
        let key = IngestPrivateKey::generate(&env, &scope, 1);
        let sealer = IngestSealer::new(key.public_key().clone());
        let ctx = Context::new("cards", "pan", "row-1").unwrap();
        for pan in [
            "4111111111111111",
            "378282246310005",
            "6011000990139424",
            "4000056655665556",
        ] {
            let pan = Pan::parse(pan).unwrap();
            let sealed = sealer.seal(&pan, &ctx).unwrap();
            assert_eq!(sealed.as_bytes().len(), INGEST_LEN);
            let text = sealed.to_text();
            assert_eq!(text.len(), INGEST_TEXT_LEN);
            assert_eq!(IngestSealed::from_text(&text).unwrap(), sealed);
            assert_eq!(IngestSealed::from_bytes(sealed.as_bytes()).unwrap(), sealed);
            assert_eq!(key.open(&sealed, &ctx).unwrap(), pan);
            let other = Context::new("cards", "pan", "row-2").unwrap();
            assert!(matches!(key.open(&sealed, &other), Err(Error::Decryption)));
        }
    }

    #[test]
    fn another_scope_is_a_mismatch() {
        let (env, scope) = names();
        let a = IngestPrivateKey::generate(&env, &scope, 1);
        let b = IngestPrivateKey::generate(&env, &Scope::new("other").unwrap(), 1);
        let ctx = Context::new("cards", "pan", "row-1").unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        let sealed = IngestSealer::new(a.public_key().clone())
            .seal(&pan, &ctx)
            .unwrap();
        assert!(matches!(
            b.open(&sealed, &ctx),
            Err(Error::Key(KeyError::IngestKeyMismatch))
        ));
    }

    #[test]
    fn public_key_text_and_curve_check() {
        let (env, scope) = names();
        let key = IngestPrivateKey::generate(&env, &scope, 3);
        let text = key.public_key().to_text();
        assert_eq!(
            &IngestPublicKey::from_text(&text).unwrap(),
            key.public_key()
        );
        // One spelling of the version: `+3`, `03` and ` 3` are refused.
        for bad in ["/+3/", "/03/", "/ 3/"] {
            let t = text.replace("/3/", bad);
            assert!(
                matches!(
                    IngestPublicKey::from_text(&t),
                    Err(Error::Format(FormatError::Text))
                ),
                "{t}"
            );
        }
        let mut bad = *key.public_key().as_bytes();
        bad[64] ^= 1;
        assert!(matches!(
            IngestPublicKey::from_parts(&env, &scope, 3, &bad),
            Err(Error::Format(FormatError::PublicKey))
        ));
        let scalar = key.to_scalar();
        let again = IngestPrivateKey::from_scalar(&env, &scope, 3, &scalar).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        assert!(IngestPrivateKey::from_scalar(&env, &scope, 3, &[0u8; 32]).is_err());
    }
}

/// Feature `fast-ingest`: the `ring` sender against both receivers.
#[cfg(all(test, feature = "fast-ingest"))]
mod fast_ingest_tests {
    use super::*;
    use rand::Rng;

    fn random_pan(rng: &mut impl Rng) -> Pan {
        let len = rng.gen_range(13..=19);
        let mut digits: Vec<u8> = (0..len - 1).map(|_| rng.gen_range(0..10u8)).collect();
        digits[0] = rng.gen_range(1..10);
        let mut sum = 0u32;
        for (i, d) in digits.iter().rev().enumerate() {
            let mut v = u32::from(*d);
            if i % 2 == 0 {
                v *= 2;
                if v > 9 {
                    v -= 9;
                }
            }
            sum += v;
        }
        digits.push(((10 - sum % 10) % 10) as u8);
        let s: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
        Pan::parse(&s).unwrap()
    }

    fn names() -> (Environment, Scope) {
        (
            Environment::new("test").unwrap(),
            Scope::new("merchant-42").unwrap(),
        )
    }

    /// 500 seals through `ring` (random PANs, 5 key pairs, 3 versions):
    /// each has the ingest format (header, a valid `enc`, text round
    /// trip), opens with `IngestPrivateKey::open` and with the `hpke`
    /// crate's own decapsulation to the sealed PAN; no two `enc` repeat.
    #[test]
    fn ring_seals_open_with_both_receivers_500() {
        let (env, scope) = names();
        let mut rng = rand::thread_rng();
        let keys: Vec<IngestPrivateKey> = (0..5)
            .map(|i| IngestPrivateKey::generate(&env, &scope, 1 + (i % 3)))
            .collect();
        let (mut own, mut reference) = (0, 0);
        let mut encs = std::collections::HashSet::new();
        for i in 0..500 {
            let key = &keys[i % keys.len()];
            let sealer = IngestSealer::new(key.public_key().clone());
            let ctx = Context::new("cards", "pan", format!("row-{i}")).unwrap();
            let pan = random_pan(&mut rng);
            let sealed = sealer.seal(&pan, &ctx).unwrap();
            assert_eq!(sealed.as_bytes().len(), INGEST_LEN);
            assert_eq!(&sealed.as_bytes()[..INGEST_HEADER_LEN], &sealer.header);
            assert!(p256::PublicKey::from_sec1_bytes(sealed.enc()).is_ok());
            assert_eq!(IngestSealed::from_text(&sealed.to_text()).unwrap(), sealed);
            encs.insert(sealed.enc().to_vec());
            if key.open(&sealed, &ctx).unwrap() == pan {
                own += 1;
            }
            let packed = key.open_packed_with_hpke_crate(&sealed, &ctx).unwrap();
            if crate::format::read::unpack_pan(&packed).unwrap() == pan {
                reference += 1;
            }
        }
        assert_eq!((own, reference, encs.len()), (500, 500, 500));
    }

    /// The two senders are interchangeable: a seal through the `hpke`
    /// crate and one through `ring` of the same PAN open the same, and
    /// differ only in the randomness (`enc`, ciphertext, tag).
    #[test]
    fn ring_and_hpke_crate_seals_differ_only_in_randomness() {
        let (env, scope) = names();
        let key = IngestPrivateKey::generate(&env, &scope, 2);
        let sealer = IngestSealer::new(key.public_key().clone());
        let ctx = Context::new("cards", "pan", "row-1").unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        let mut p1 = [0u8; PACKED_LEN];
        crate::format::write::pack_pan(&pan, &mut p1);
        let mut p2 = p1;
        let a = sealer.seal_packed_ring(&mut p1, &ctx).unwrap();
        let b = sealer.seal_packed_hpke_crate(&mut p2, &ctx).unwrap();
        assert_eq!(a.header(), b.header());
        assert_ne!(a.enc(), b.enc());
        assert_eq!(key.open(&a, &ctx).unwrap(), pan);
        assert_eq!(key.open(&b, &ctx).unwrap(), pan);
    }

    /// The attacker with a `ring` seal and everything but the right key
    /// or row: another context, another key pair at the same version,
    /// the same scalar relabelled to another scope, environment or
    /// version, every single bit flipped → 0 PANs from either receiver.
    #[test]
    fn ring_seals_refuse_wrong_context_and_other_keys() {
        let (env, scope) = names();
        let key = IngestPrivateKey::generate(&env, &scope, 1);
        let sealer = IngestSealer::new(key.public_key().clone());
        let ctx = Context::new("cards", "pan", "row-1").unwrap();
        let pan = Pan::parse("4111111111111111").unwrap();
        let sealed = sealer.seal(&pan, &ctx).unwrap();

        let mut opened = 0;
        let other_ctx = Context::new("cards", "pan", "row-2").unwrap();
        let other_col = Context::new("cards", "pan2", "row-1").unwrap();
        for c in [&other_ctx, &other_col] {
            assert!(matches!(key.open(&sealed, c), Err(Error::Decryption)));
            assert!(matches!(
                key.open_packed_with_hpke_crate(&sealed, c),
                Err(Error::Decryption)
            ));
        }
        let other_pair = IngestPrivateKey::generate(&env, &scope, 1);
        assert!(matches!(
            other_pair.open(&sealed, &ctx),
            Err(Error::Key(KeyError::IngestKeyMismatch))
        ));
        let scalar = key.to_scalar();
        let other_scope =
            IngestPrivateKey::from_scalar(&env, &Scope::new("other").unwrap(), 1, &scalar).unwrap();
        let other_env =
            IngestPrivateKey::from_scalar(&Environment::new("prod").unwrap(), &scope, 1, &scalar)
                .unwrap();
        let other_version = IngestPrivateKey::from_scalar(&env, &scope, 2, &scalar).unwrap();
        for k in [&other_pair, &other_scope, &other_env, &other_version] {
            opened += usize::from(k.open(&sealed, &ctx).is_ok());
            opened += usize::from(k.open_packed_with_hpke_crate(&sealed, &ctx).is_ok());
        }
        for c in [&other_ctx, &other_col] {
            opened += usize::from(key.open(&sealed, c).is_ok());
        }
        assert!(matches!(
            other_scope.open(&sealed, &ctx),
            Err(Error::Decryption)
        ));
        let mut flipped = 0;
        for byte in 0..INGEST_LEN {
            for bit in 0..8 {
                let mut bytes = *<&[u8; INGEST_LEN]>::try_from(sealed.as_bytes()).unwrap();
                bytes[byte] ^= 1 << bit;
                flipped += 1;
                if let Ok(altered) = IngestSealed::from_bytes(&bytes) {
                    opened += usize::from(key.open(&altered, &ctx).is_ok());
                    opened += usize::from(key.open_packed_with_hpke_crate(&altered, &ctx).is_ok());
                }
            }
        }
        assert_eq!(flipped, 808);
        assert_eq!(opened, 0);
        assert_eq!(key.open(&sealed, &ctx).unwrap(), pan);
    }

    /// Stack bytes scanned below the seal's frame: twice `SCRUB_LEN`.
    #[cfg(target_os = "linux")]
    const SCAN_LEN: usize = 2 * SCRUB_LEN;

    /// Seals from below a 64 KiB frame (so that later, shallower calls do
    /// not overwrite the seal's frames) and returns the ciphertext and the
    /// address of a local of the frame that called the seal.
    #[cfg(target_os = "linux")]
    #[inline(never)]
    fn seal_deep(sealer: &IngestSealer, ctx: &Context, scrub: bool) -> (IngestSealed, usize) {
        let mut pad = [0u8; 64 * 1024];
        std::hint::black_box(&mut pad);
        let r = seal_here(sealer, ctx, scrub);
        std::hint::black_box(&pad);
        r
    }

    #[cfg(target_os = "linux")]
    #[inline(never)]
    fn seal_here(sealer: &IngestSealer, ctx: &Context, scrub: bool) -> (IngestSealed, usize) {
        let marker = 0u8;
        let at = std::hint::black_box(std::ptr::addr_of!(marker)) as usize;
        let mut packed = [0u8; PACKED_LEN];
        crate::format::write::pack_pan(&Pan::parse("4111111111111111").unwrap(), &mut packed);
        let sealed = if scrub {
            sealer.seal_packed_ring(&mut packed, ctx).unwrap()
        } else {
            // The control: the same ring calls without the scrub.
            let aad = sealer.aad(ctx);
            let mut out = [0u8; INGEST_LEN];
            sealer.ring_seal(&mut packed, &aad, &mut out).unwrap();
            IngestSealed { bytes: out }
        };
        (sealed, at)
    }

    /// The attacker with the sealing thread's stack (`/proc/self/mem`,
    /// read from another thread while it waits): every 32-byte window
    /// below the seal's frame, 8-aligned, in both byte orders,
    /// tried as the ephemeral scalar (`w · G == enc`) and as `Z` (opens
    /// the ciphertext). Returns (windows tried, keys found).
    #[cfg(target_os = "linux")]
    fn stack_attack(key: &IngestPrivateKey, scrub: bool) -> (usize, usize) {
        use std::io::{Read, Seek, SeekFrom};
        let sealer = IngestSealer::new(key.public_key().clone());
        let ctx = Context::new("cards", "pan", "row-1").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let sealer2 = sealer.clone();
        let ctx2 = ctx.clone();
        let t = std::thread::spawn(move || {
            let r = seal_deep(&sealer2, &ctx2, scrub);
            tx.send(r).unwrap();
            done_rx.recv().unwrap();
        });
        let (sealed, at) = rx.recv().unwrap();
        let mut stack = vec![0u8; SCAN_LEN];
        let mut mem = std::fs::File::open("/proc/self/mem").unwrap();
        // From an 8-aligned address, so that windows are 8-aligned.
        mem.seek(SeekFrom::Start(((at - SCAN_LEN) & !7) as u64))
            .unwrap();
        mem.read_exact(&mut stack).unwrap();
        done_tx.send(()).unwrap();
        t.join().unwrap();
        let enc = p256::PublicKey::from_sec1_bytes(sealed.enc()).unwrap();
        let (mut tried, mut found) = (0, 0);
        // 8-aligned windows (the drill's attacker E does the same).
        for w in stack.windows(32).step_by(8) {
            let mut rev = [0u8; 32];
            rev.copy_from_slice(w);
            rev.reverse();
            for cand in [w, &rev[..]] {
                if cand.iter().all(|b| *b == 0) {
                    continue;
                }
                tried += 1;
                if let Ok(sk) = p256::SecretKey::from_slice(cand) {
                    found += usize::from(sk.public_key() == enc);
                }
                let z = split::DhSecret::from_slice(cand).unwrap();
                found +=
                    usize::from(split::open_packed(key.public_key(), &sealed, &ctx, &z).is_ok());
            }
        }
        assert_eq!(key.open(&sealed, &ctx).unwrap().last_four(), "1111");
        (tried, found)
    }

    /// A dump of the sealing thread's stack after a `ring` seal yields 0
    /// ephemeral scalars and 0 DH outputs; the control (the same ring
    /// calls without the scrub) shows what the scan finds without it.
    #[cfg(target_os = "linux")]
    #[test]
    fn ring_seal_leaves_no_key_on_the_stack() {
        let (env, scope) = names();
        let key = IngestPrivateKey::generate(&env, &scope, 1);
        let (tried, found) = stack_attack(&key, true);
        let (c_tried, c_found) = stack_attack(&key, false);
        assert_eq!(
            found, 0,
            "scrubbed: {found} keys in {tried} windows of the sealing thread's stack"
        );
        assert!(
            c_found >= 1,
            "the scan finds ring's residue without the scrub \
             ({c_found} keys in {c_tried} windows)"
        );
    }
}
