//! `POST /v1/reveal`: one sealed record opened inside keyd, counted per
//! distinct record, audited with its context; and `POST /v1/whoami`.
//!
//! The DEK is unwrapped into keyd's own cache (bounded, zeroizing,
//! expired by time, wiped when keyd seals) and never leaves the process;
//! only the PAN's digits are answered, in a buffer wiped once sent. The PAN
//! is never logged nor audited; a failed open is one opaque error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use panseal::keyd::server::protocol::{
    PanDigits, RevealRequest, RevealResponse, WhoamiResponse, WireWrapped,
};
use panseal::{Access, Context, KeyPurpose, KeyState, SealedPan, WrappedDek};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{
    json, now_secs, parse, require, slot, truncate, Answer, AuditRecord, Failure, Server, Vault,
};
use crate::config::Principal;
use crate::quota::Refusal;
use panseal::keyd::server::protocol::{ErrorKind, Permission};

/// Unwrapped DEKs keyd keeps for `reveal`.
pub(crate) const CACHE_CAPACITY: usize = 1024;
/// How long an unwrapped DEK stays in keyd's reveal cache.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(300);

/// Where a revealed record lives, for the audit record (never the PAN).
#[derive(Serialize, Clone)]
pub(crate) struct AuditContext {
    table: String,
    column: String,
    /// The row key when it is UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    row_key: Option<String>,
    /// The row key in hex when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    row_key_hex: Option<String>,
}

impl AuditContext {
    pub(super) fn of(c: &Context) -> Self {
        let (row_key, row_key_hex) = match std::str::from_utf8(c.row_key()) {
            Ok(t) => (Some(t.to_owned()), None),
            Err(_) => (None, Some(hex::encode(c.row_key()))),
        };
        AuditContext {
            table: c.table().to_owned(),
            column: c.column().to_owned(),
            row_key,
            row_key_hex,
        }
    }
}

struct Cached {
    key: Arc<Zeroizing<[u8; 32]>>,
    at: Instant,
}

/// keyd's own DEK cache for `reveal`: at most [`CACHE_CAPACITY`] keys, each
/// for [`CACHE_TTL`], keyed by a digest of the whole wrap binding (so only
/// the very wrap that unwrapped a key finds it), wiped on drop and at seal.
pub(crate) struct RevealCache {
    map: Mutex<HashMap<[u8; 32], Cached>>,
}

impl RevealCache {
    pub(crate) fn new() -> Self {
        RevealCache {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, k: &[u8; 32]) -> Option<Arc<Zeroizing<[u8; 32]>>> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(k) {
            Some(c) if c.at.elapsed() < CACHE_TTL => Some(Arc::clone(&c.key)),
            Some(_) => {
                m.remove(k);
                None
            }
            None => None,
        }
    }

    fn insert(&self, k: [u8; 32], key: Arc<Zeroizing<[u8; 32]>>) {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= CACHE_CAPACITY {
            m.retain(|_, c| c.at.elapsed() < CACHE_TTL);
        }
        if m.len() >= CACHE_CAPACITY {
            if let Some(oldest) = m.iter().min_by_key(|(_, c)| c.at).map(|(k, _)| *k) {
                m.remove(&oldest);
            }
        }
        m.insert(
            k,
            Cached {
                key,
                at: Instant::now(),
            },
        );
    }

    /// Wipes every key (keyd sealed).
    pub(crate) fn clear(&self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Keys held now.
    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

pub(super) fn bad(message: &str) -> Failure {
    Failure::new(ErrorKind::BadRequest, message)
}

pub(super) fn open_failed() -> Failure {
    Failure::new(ErrorKind::OpenFailed, "sealed record failed to open")
}

/// The distinct-record identity a reveal is counted under:
/// SHA-256(context encoding || sealed bytes) (`FORMAT.md` §16).
pub(crate) fn record_digest(context: &Context, sealed: &SealedPan) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(context.encoded());
    h.update(sealed.as_bytes());
    h.finalize().into()
}

fn cache_key(record: &WrappedDek) -> [u8; 32] {
    let mut h = Sha256::new();
    let kek = panseal::KekRef {
        id: record.wrapped.kek.id.clone(),
        version: record.wrapped.kek.version,
    };
    h.update(record.key_request().wrap_aad(&kek));
    h.update(&record.wrapped.bytes);
    h.finalize().into()
}

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Exceeded(m) => Failure::new(ErrorKind::QuotaExceeded, m),
            Refusal::NotDurable(m) => Failure::new(ErrorKind::Internal, m),
        }
    }
}

impl Server {
    /// The quota file's keys, derived from the master key's subkeys (keyd
    /// must be unsealed).
    pub(super) fn quota_key(&self) -> Result<crate::quota::QuotaKey, Failure> {
        let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
        let Vault::Open { master, .. } = &*vault else {
            return Err(Failure::new(ErrorKind::Sealed, "keyd is sealed"));
        };
        Ok(crate::quota::QuotaKey::derive(master.keys()))
    }

    /// Charges `n` keyed hashes to `p`'s `index` quota, durably, before
    /// any is computed.
    /// (`pub(super)`: called from the `index` handlers in `api.rs`.)
    pub(super) fn charge_index(&self, p: &Principal, n: u64) -> Result<(), Failure> {
        let key = self.quota_key()?;
        Ok(self.quotas.charge_index(&key, &p.name, &p.index_quota, n)?)
    }

    /// `POST /v1/whoami`.
    pub(super) fn whoami(&self, p: &Principal) -> Answer {
        json(&WhoamiResponse {
            principal: p.name.clone(),
            environment: p.environment.clone(),
            permissions: p.permissions.iter().copied().collect(),
        })
    }

    /// Fails unless the KEK version `version` of the record's scope is live.
    fn kek_live(&self, record: &WrappedDek) -> Result<(), Failure> {
        let vault = self.vault.read().unwrap_or_else(|e| e.into_inner());
        let Vault::Open { keks, .. } = &*vault else {
            return Err(Failure::new(ErrorKind::Sealed, "keyd is sealed"));
        };
        let live = keks
            .get(&slot(record.environment.as_str(), record.scope.as_str()))
            .is_some_and(|sk| sk.ciphers.contains_key(&record.wrapped.kek.version));
        if live {
            Ok(())
        } else {
            Err(Failure::new(
                ErrorKind::KekDestroyed,
                format!(
                    "KEK {}#v{} destroyed or unknown",
                    record.wrapped.kek.id, record.wrapped.kek.version
                ),
            ))
        }
    }

    /// The record's DEK from keyd's cache, or unwrapped into it.
    pub(super) fn reveal_key(
        &self,
        record: &WrappedDek,
    ) -> Result<Arc<Zeroizing<[u8; 32]>>, Failure> {
        let request = record.key_request();
        let ck = cache_key(record);
        if let Some(k) = self.reveal_cache.get(&ck) {
            // Destruction since the key was cached still refuses.
            self.refuse_destroyed_dek(&request)?;
            self.kek_live(record)?;
            return Ok(k);
        }
        let wire: WireWrapped = (&record.wrapped).into();
        let key = Arc::new(self.unwrap_now(&request, &wire)?);
        self.reveal_cache.insert(ck, Arc::clone(&key));
        Ok(key)
    }

    /// `POST /v1/reveal`.
    pub(super) fn reveal(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: RevealRequest = parse(body)?;
        rec.on_behalf_of = Some(truncate(&r.on_behalf_of));
        rec.purpose = Some(truncate(&r.purpose));
        require(p, Permission::Reveal)?;
        let record = WrappedDek::from_bytes(&r.record)
            .map_err(|e| bad(&format!("record does not parse: {e}")))?;
        rec.environment = Some(record.environment.to_string());
        rec.scope = Some(record.scope.to_string());
        rec.key_id = Some(record.id.to_string());
        rec.purpose_of_key = Some(record.purpose);
        rec.kek = Some(format!(
            "{}#v{}",
            record.wrapped.kek.id, record.wrapped.kek.version
        ));
        let context = Context::new(&r.context.table, &r.context.column, &r.context.row_key)
            .map_err(|e| bad(&format!("context: {e}")))?;
        rec.context = Some(AuditContext::of(&context));
        Access::new(&r.on_behalf_of, &r.purpose)
            .map_err(|e| bad(&format!("on_behalf_of / purpose: {e}")))?;
        let sealed =
            SealedPan::from_bytes(&r.sealed).map_err(|_| bad("sealed is not a sealed PAN"))?;
        if record.purpose != KeyPurpose::Data {
            return Err(denied_purpose());
        }
        self.check_scope(p, &record.environment, &record.scope)?;
        self.verify_record_for_reveal(&record)?;
        match record.state {
            KeyState::Destroyed => {
                return Err(Failure::new(
                    ErrorKind::KeyDestroyed,
                    format!("key {} is destroyed", record.id),
                ))
            }
            KeyState::Compromised => {
                return Err(Failure::new(
                    ErrorKind::KeyCompromised,
                    format!(
                        "key {} is compromised: it opens only to be re-sealed",
                        record.id
                    ),
                ))
            }
            _ => {}
        }
        let now = now_secs();
        if now > record.decrypt_until {
            return Err(Failure::new(
                ErrorKind::KeyExpired,
                format!("key {} is past its decrypt-until date", record.id),
            ));
        }
        // Counted before anything opens: a failed open costs the same.
        let key = self.quota_key()?;
        self.quotas.charge_reveal(
            &key,
            &p.name,
            &p.reveal_quota,
            record_digest(&context, &sealed),
        )?;
        if sealed.key_id() != record.id {
            return Err(open_failed());
        }
        let dek = self.reveal_key(&record)?;
        let pan = panseal::keyd::server::open_with_key(&dek, &sealed, &context)
            .map_err(|_| open_failed())?;
        json(&RevealResponse {
            pan: PanDigits::new(pan.expose_digits().to_owned()),
            needs_reseal: record.state != KeyState::Active || now >= record.encrypt_until,
        })
    }
}

fn denied_purpose() -> Failure {
    Failure::new(
        ErrorKind::PermissionDenied,
        "reveal opens data keys' records only",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The distinct-record digest matches the independent generator
    /// (tests/vectors/gen_quota_vectors.py, FORMAT.md §16.3).
    #[test]
    fn record_digest_matches_the_python_vectors() {
        let doc: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/vectors/keyd_quota/quota_state_v1.json"
        ))
        .unwrap();
        let vectors = doc["record_digests"].as_array().unwrap();
        assert_eq!(vectors.len(), 3);
        for v in vectors {
            let row_key = hex::decode(v["row_key_hex"].as_str().unwrap()).unwrap();
            let c = Context::new(
                v["table"].as_str().unwrap(),
                v["column"].as_str().unwrap(),
                row_key,
            )
            .unwrap();
            let sealed =
                SealedPan::from_bytes(&hex::decode(v["sealed_hex"].as_str().unwrap()).unwrap())
                    .unwrap();
            assert_eq!(
                hex::encode(record_digest(&c, &sealed)),
                v["record_sha256_hex"].as_str().unwrap()
            );
        }
    }
}
