//! Write-only ingest inside keyd (`FORMAT.md` §18): the scopes' ingest
//! (HPKE, P-256) key pairs, sealed in state version 4; `POST
//! /v1/ingest/{keys,create,state,open}`, `/v1/generate-wrapped` and
//! `/v1/admit`.
//!
//! The private scalar is opened from the state only for the request that
//! needs it and dropped (zeroized) with it; a PAN exists only inside a
//! request, in zeroizing types, and is never logged, audited or answered
//! except by `/v1/ingest/open` to a `reveal` or `unwrap` principal.

use std::collections::BTreeMap;

use crate::state_file::{IngestKeyRecord, IngestScopeRecord};
use panseal::keyd::server::protocol::{
    AdmitItemErrorKind, AdmitRequest, AdmitResponse, ErrorBody, ErrorKind, GenerateRequest,
    IngestKeyVersion, IngestKeysResponse, IngestOpenRequest, IngestStateRequest, KekTarget,
    PanDigits, Permission, RevealResponse, WireAdmitResult, WireContext, WrappedResponse,
};
use panseal::keyd::server::IngestPrivateKey;
use panseal::{
    Access, Context, Environment, IngestSealed, KeyPurpose, KeyRequest, KeyState, Scope,
    WrappedDek, MAX_ADMIT_BATCH,
};

use super::reveal::{bad, open_failed, AuditContext};
use super::{
    denied, json, now_secs, parse, random_nonce, refuse_index_purpose, require, slot, truncate, v3,
    Answer, AuditRecord, Failure, Server,
};
use crate::config::Principal;

/// The answer for a version that is not live (never created, destroyed).
pub(super) fn unknown_ingest_key(scope: &str, version: u32) -> Failure {
    let mut b = ErrorBody::new(
        ErrorKind::UnknownIngestKey,
        format!("ingest key version {version} of scope {scope:?} is not live"),
    );
    b.scope = Some(scope.to_owned());
    b.version = Some(version);
    Failure(Box::new(b))
}

/// The `sealed` string of a request (text form or base64 bytes).
pub(crate) fn parse_ingest(s: &str) -> Option<IngestSealed> {
    panseal::keyd::server::protocol::parse_ingest_sealed(s)
}

fn context_of(c: &WireContext) -> Result<Context, Failure> {
    Context::new(&c.table, &c.column, &c.row_key).map_err(|e| bad(&format!("context: {e}")))
}

/// Why an ingest key cannot be used for one version.
enum Lookup {
    Unknown,
    Internal,
}

impl Server {
    fn ingest_status(&self, env: &Environment, scope: &Scope) -> IngestKeysResponse {
        let state = self.state.read();
        let mut versions: Vec<IngestKeyVersion> = state
            .ingest_keys
            .get(&slot(env.as_str(), scope.as_str()))
            .map(|r| {
                r.versions
                    .iter()
                    .filter(|k| k.state != KeyState::Destroyed)
                    .map(|k| IngestKeyVersion {
                        version: k.version,
                        state: k.state,
                        created_at: k.created_at,
                        public_key: k.public_key.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        versions.sort_by_key(|v| std::cmp::Reverse(v.version));
        IngestKeysResponse {
            environment: env.clone(),
            scope: scope.clone(),
            versions,
        }
    }

    /// The private key of one live version, opened from the state.
    fn ingest_private(
        &self,
        env: &str,
        scope: &str,
        version: u32,
    ) -> Result<IngestPrivateKey, Lookup> {
        let keys = self.state_keys().map_err(|_| Lookup::Internal)?;
        let sealed = {
            let state = self.state.read();
            let k = state
                .ingest_keys
                .get(&slot(env, scope))
                .and_then(|r| r.versions.iter().find(|k| k.version == version))
                .filter(|k| matches!(k.state, KeyState::Active | KeyState::DecryptOnly));
            match k.and_then(|k| k.sealed.clone()) {
                Some(s) => s,
                None => return Err(Lookup::Unknown),
            }
        };
        let aad = v3::ingest_key_aad(env, scope, version);
        let scalar =
            v3::open_secret(&keys.ingest_seal, &aad, &sealed).map_err(|_| Lookup::Internal)?;
        let (Ok(e), Ok(s)) = (Environment::new(env), Scope::new(scope)) else {
            return Err(Lookup::Internal);
        };
        IngestPrivateKey::from_scalar(&e, &s, version, &scalar).map_err(|_| Lookup::Internal)
    }

    fn ingest_private_or_fail(
        &self,
        env: &str,
        scope: &str,
        version: u32,
    ) -> Result<IngestPrivateKey, Failure> {
        self.ingest_private(env, scope, version)
            .map_err(|l| match l {
                Lookup::Unknown => unknown_ingest_key(scope, version),
                Lookup::Internal => {
                    Failure::new(ErrorKind::Internal, "a sealed ingest key failed to open")
                }
            })
    }

    /// `POST /v1/ingest/keys`: any principal of the environment whose
    /// scopes include the scope (a front end needs no other permission).
    pub(super) fn ingest_keys(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let t: KekTarget = parse(body)?;
        Self::note_target(rec, &t.environment, &t.scope);
        self.check_scope(p, &t.environment, &t.scope)?;
        json(&self.ingest_status(&t.environment, &t.scope))
    }

    /// `POST /v1/ingest/create`: the next key pair; the previous active
    /// version is retired (opens, never seals).
    pub(super) fn ingest_create(
        &self,
        p: &Principal,
        body: &[u8],
        rec: &mut AuditRecord,
    ) -> Answer {
        let t: KekTarget = parse(body)?;
        Self::note_target(rec, &t.environment, &t.scope);
        require(p, Permission::Custodian)?;
        self.check_scope(p, &t.environment, &t.scope)?;
        let keys = self.state_keys()?;
        let (env, scope) = (t.environment.as_str(), t.scope.as_str());
        let key = slot(env, scope);
        let version = self
            .state
            .mutate(&self.audit, |d| -> Result<u32, Failure> {
                let mut r = d.ingest_scope(&key).cloned().unwrap_or(IngestScopeRecord {
                    environment: env.to_owned(),
                    scope: scope.to_owned(),
                    versions: Vec::new(),
                });
                let version = r.versions.iter().map(|k| k.version).max().unwrap_or(0) + 1;
                for k in r.versions.iter_mut() {
                    if k.state == KeyState::Active {
                        k.state = KeyState::DecryptOnly;
                    }
                }
                let pair = IngestPrivateKey::generate(&t.environment, &t.scope, version);
                let aad = v3::ingest_key_aad(env, scope, version);
                r.versions.push(IngestKeyRecord {
                    version,
                    state: KeyState::Active,
                    created_at: now_secs(),
                    created_by: p.name.clone(),
                    public_key: pair.public_key().to_text(),
                    sealed: Some(v3::seal_secret(
                        &keys.ingest_seal,
                        random_nonce(),
                        &aad,
                        &pair.to_scalar(),
                    )),
                });
                d.put_ingest_scope(&key, r);
                Ok(version)
            })?;
        rec.index_versions = Some(vec![version]);
        rec.detail = Some(format!("ingest key version {version} created"));
        json(&self.ingest_status(&t.environment, &t.scope))
    }

    /// `POST /v1/ingest/state`: forward only; `destroyed` erases the
    /// scalar and folds the journal into a snapshot (no older line keeps
    /// it).
    pub(super) fn ingest_set_state(
        &self,
        p: &Principal,
        body: &[u8],
        rec: &mut AuditRecord,
    ) -> Answer {
        let t: IngestStateRequest = parse(body)?;
        Self::note_target(rec, &t.environment, &t.scope);
        rec.index_versions = Some(vec![t.version]);
        rec.detail = Some(format!("ingest key to {:?}", t.state));
        require(p, Permission::Custodian)?;
        self.check_scope(p, &t.environment, &t.scope)?;
        let key = slot(t.environment.as_str(), t.scope.as_str());
        let destroyed = self
            .state
            .mutate(&self.audit, |d| -> Result<bool, Failure> {
                let no_such = || unknown_ingest_key(t.scope.as_str(), t.version);
                let mut r = d.ingest_scope(&key).cloned().ok_or_else(no_such)?;
                let k = r
                    .versions
                    .iter_mut()
                    .find(|k| k.version == t.version && k.state != KeyState::Destroyed)
                    .ok_or_else(no_such)?;
                if k.state == t.state {
                    return Ok(false);
                }
                if !matches!(t.state, KeyState::DecryptOnly | KeyState::Destroyed)
                    || !k.state.can_become(t.state)
                {
                    return Err(Failure::new(
                        ErrorKind::Conflict,
                        format!(
                            "ingest key states only move forward, to decrypt-only or destroyed \
                             ({:?} -> {:?} refused)",
                            k.state, t.state
                        ),
                    ));
                }
                k.state = t.state;
                let destroyed = t.state == KeyState::Destroyed;
                if destroyed {
                    k.sealed = None;
                }
                d.put_ingest_scope(&key, r);
                Ok(destroyed)
            })?;
        if destroyed {
            let keys = self.state_keys()?;
            self.state.replace_with(
                &self.audit,
                |current| -> Result<_, Failure> { Ok((current.clone(), keys)) },
                || {},
            )?;
        }
        json(&self.ingest_status(&t.environment, &t.scope))
    }

    /// `POST /v1/ingest/open`: `reveal` (charged to the reveal quota per
    /// distinct ciphertext and context, audited as a reveal) or `unwrap`
    /// (its unwrap quota, if any). Answers the digits and `needs_reseal`.
    pub(super) fn ingest_open(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: IngestOpenRequest = parse(body)?;
        Self::note_target(rec, &r.environment, &r.scope);
        rec.on_behalf_of = Some(truncate(&r.on_behalf_of));
        rec.purpose = Some(truncate(&r.purpose));
        let as_reveal = p.may(Permission::Reveal);
        if !as_reveal && !p.may(Permission::Unwrap) {
            return Err(denied(format!(
                "principal {:?} lacks the reveal or unwrap permission",
                p.name
            )));
        }
        self.check_scope(p, &r.environment, &r.scope)?;
        let context = context_of(&r.context)?;
        rec.context = Some(AuditContext::of(&context));
        Access::new(&r.on_behalf_of, &r.purpose)
            .map_err(|e| bad(&format!("on_behalf_of / purpose: {e}")))?;
        let sealed =
            parse_ingest(&r.sealed).ok_or_else(|| bad("sealed is not an ingest ciphertext"))?;
        let version = sealed.key_version();
        rec.index_versions = Some(vec![version]);
        let private =
            self.ingest_private_or_fail(r.environment.as_str(), r.scope.as_str(), version)?;
        // Counted before anything opens: a failed open costs the same.
        let digest = ingest_digest(&context, &sealed);
        let qk = self.quota_key()?;
        if as_reveal {
            self.quotas
                .charge_reveal(&qk, &p.name, &p.reveal_quota, digest)?;
        } else if let Some(q) = p.quota {
            let mut item = [0u8; 8];
            item.copy_from_slice(&digest[..8]);
            self.quotas
                .charge_unwrap(&qk, &p.name, &q.as_limit(), &item)?;
        }
        // Another scope's key, an altered byte, another context: one
        // opaque answer.
        let pan = private.open(&sealed, &context).map_err(|_| open_failed())?;
        json(&RevealResponse {
            pan: PanDigits::new(pan.expose_digits().to_owned()),
            needs_reseal: true,
        })
    }

    /// `POST /v1/generate-wrapped`: as `/v1/generate`, answering only the
    /// wrap; the key is marked freshly wrapped so its first record may be
    /// signed by the `wrap` credential.
    pub(super) fn generate_wrapped(
        &self,
        p: &Principal,
        body: &[u8],
        rec: &mut AuditRecord,
    ) -> Answer {
        let r: GenerateRequest = parse(body)?;
        Self::note_key(rec, &r.key);
        require(p, Permission::Wrap)?;
        refuse_index_purpose(r.key.purpose)?;
        self.check_scope(p, &r.key.environment, &r.key.scope)?;
        let request: KeyRequest = r.key.into();
        if request.purpose != KeyPurpose::Data {
            return Err(denied("generate-wrapped makes data keys only".into()));
        }
        // Derived, not drawn: `/v1/admit` recognises an admission DEK by
        // recomputing it, so a DEK any caller holds (from `/v1/generate`,
        // `/v1/wrap` or another writer) is never sealed under by admit.
        let keys = self.state_keys()?;
        let key = crate::state_file::admission_dek(
            &keys,
            request.environment.as_str(),
            request.scope.as_str(),
            request.id.as_bytes(),
        );
        let wrapped = self.wrap_now(p, &request, &key)?;
        drop(key);
        self.note_fresh_wrap(&request, &wrapped.bytes);
        rec.kek = Some(format!("{}#v{}", wrapped.kek_id, wrapped.kek_version));
        json(&WrappedResponse { wrapped })
    }

    /// `POST /v1/admit`.
    pub(super) fn admit(&self, p: &Principal, body: &[u8], rec: &mut AuditRecord) -> Answer {
        let r: AdmitRequest = parse(body)?;
        rec.on_behalf_of = Some(truncate(&r.on_behalf_of));
        rec.purpose = Some(truncate(&r.purpose));
        rec.count = Some(r.items.len() as u64);
        rec.index_versions = Some(r.index_versions.iter().copied().take(16).collect());
        require(p, Permission::Admit)?;
        let record = WrappedDek::from_bytes(&r.record)
            .map_err(|e| bad(&format!("record does not parse: {e}")))?;
        Self::note_record(rec, &record);
        rec.kek = Some(format!(
            "{}#v{}",
            record.wrapped.kek.id, record.wrapped.kek.version
        ));
        if r.items.is_empty() || r.items.len() > MAX_ADMIT_BATCH {
            return Err(bad(&format!(
                "name 1 to {MAX_ADMIT_BATCH} items per request ({} given)",
                r.items.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        if !r.index_versions.iter().all(|v| seen.insert(*v)) || r.index_versions.len() > 16 {
            return Err(bad("index versions: at most 16, none twice"));
        }
        if record.purpose != KeyPurpose::Data {
            return Err(denied("admit seals under data keys only".into()));
        }
        self.check_scope(p, &record.environment, &record.scope)?;
        // The record exactly as a reveal checks it: tag, registry, floor.
        self.verify_record_for_reveal(&record)?;
        match record.state {
            KeyState::Active => {}
            KeyState::Destroyed => {
                return Err(Failure::new(
                    ErrorKind::KeyDestroyed,
                    format!("key {} is destroyed", record.id),
                ))
            }
            KeyState::Compromised => {
                return Err(Failure::new(
                    ErrorKind::KeyCompromised,
                    format!("key {} is compromised", record.id),
                ))
            }
            KeyState::DecryptOnly => {
                return Err(denied(format!(
                    "key {} is decrypt-only: admit seals under an active key",
                    record.id
                )))
            }
        }
        let now = now_secs();
        if now >= record.encrypt_until {
            return Err(Failure::new(
                ErrorKind::KeyExpired,
                format!("key {} is past its encrypt-until date", record.id),
            ));
        }
        // The DEK's use budget (its nonce budget) holds here too, not only
        // in the client's accounting.
        if record.uses.saturating_add(r.items.len() as u64) > record.max_uses {
            return Err(denied(format!(
                "key {} has {} of {} uses left: make a new admission DEK",
                record.id,
                record.max_uses.saturating_sub(record.uses),
                record.max_uses
            )));
        }
        let (env, scope) = (record.environment.as_str(), record.scope.as_str());
        let macs = self.index_macs(env, scope, &r.index_versions)?;
        // Charged before any work: a refused item costs the same.
        let qk = self.quota_key()?;
        self.quotas.charge_index(
            &qk,
            &crate::quota::admit_counter(&p.name),
            &p.admit_quota.as_index(),
            r.items.len() as u64,
        )?;
        let dek = self.reveal_key(&record)?;
        // Only a DEK keyd derived for admission: a caller who generated or
        // wrapped a DEK itself (any `wrap` credential can) would otherwise
        // read every admitted PAN back out of the compact answers.
        let keys = self.state_keys()?;
        let expected = crate::state_file::admission_dek(
            &keys,
            record.environment.as_str(),
            record.scope.as_str(),
            record.id.as_bytes(),
        );
        if !crate::state_file::keys_equal(&dek, &expected) {
            return Err(denied(format!(
                "key {} is not an admission DEK (made by /v1/generate-wrapped): admit seals \
                 only under a DEK no caller ever held",
                record.id
            )));
        }
        drop(expected);
        let mut privates: BTreeMap<u32, Option<IngestPrivateKey>> = BTreeMap::new();
        let mut counts = [0u64; 5];
        let mut results = Vec::with_capacity(r.items.len());
        for item in &r.items {
            let outcome = (|| -> Result<WireAdmitResult, (AdmitItemErrorKind, Option<u32>)> {
                let malformed = (AdmitItemErrorKind::Malformed, None);
                let sealed = parse_ingest(&item.sealed).ok_or(malformed)?;
                let context = Context::new(
                    &item.context.table,
                    &item.context.column,
                    &item.context.row_key,
                )
                .map_err(|_| malformed)?;
                let v = sealed.key_version();
                let private = privates
                    .entry(v)
                    .or_insert_with(|| self.ingest_private(env, scope, v).ok());
                let Some(private) = private.as_ref() else {
                    return Err((AdmitItemErrorKind::UnknownIngestKey, Some(v)));
                };
                let pan = private.open(&sealed, &context).map_err(|e| match e {
                    panseal::Error::Key(panseal::KeyError::IngestKeyMismatch) => {
                        (AdmitItemErrorKind::KeyMismatch, None)
                    }
                    _ => (AdmitItemErrorKind::OpenFailed, None),
                })?;
                let compact = panseal::keyd::server::seal_with_key(&dek, record.id, &pan, &context);
                let mut index = Vec::with_capacity(macs.len() * 32);
                for m in &macs {
                    let mut m = m.clone();
                    hmac::Mac::update(&mut m, pan.expose_digits().as_bytes());
                    index.extend_from_slice(&hmac::Mac::finalize(m).into_bytes());
                }
                Ok(WireAdmitResult::Ok {
                    sealed: compact.as_bytes().to_vec(),
                    index,
                })
            })();
            let r = match outcome {
                Ok(ok) => {
                    counts[0] += 1;
                    ok
                }
                Err((error, version)) => {
                    counts[match error {
                        AdmitItemErrorKind::Malformed => 1,
                        AdmitItemErrorKind::KeyMismatch => 2,
                        AdmitItemErrorKind::UnknownIngestKey => 3,
                        AdmitItemErrorKind::OpenFailed => 4,
                    }] += 1;
                    WireAdmitResult::Error { error, version }
                }
            };
            results.push(r);
        }
        rec.detail = Some(format!(
            "admitted {}, refused {} (malformed {}, key-mismatch {}, unknown-ingest-key {}, \
             open-failed {})",
            counts[0],
            counts[1] + counts[2] + counts[3] + counts[4],
            counts[1],
            counts[2],
            counts[3],
            counts[4]
        ));
        json(&AdmitResponse { results })
    }
}

/// The distinct-record identity an ingest open is counted under:
/// SHA-256(context encoding || ingest bytes), as `/v1/reveal` counts a
/// compact record (the two forms differ in length and kind byte).
fn ingest_digest(context: &Context, sealed: &IngestSealed) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(context.encoded());
    h.update(sealed.as_bytes());
    h.finalize().into()
}
