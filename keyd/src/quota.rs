//! Record quotas of `reveal` and `index`, per principal per window, on by
//! default and durable across restarts.
//!
//! * `reveal`: distinct records (SHA-256 of the context encoding followed
//!   by the sealed bytes) and requests per window. Revealing the same record
//!   again costs a request, not a record slot.
//! * `index`: keyed hashes (HMACs) per window.
//! * `admit`: ingest ciphertexts admitted per window (issue 11), kept as an
//!   `index` counter named `PRINCIPAL/admit` ([`admit_counter`]).
//! * `unwrap`: the configured `quota` (unwrap requests and distinct keys
//!   per window) of principals that have one, kept the same way.
//!
//! A principal without a configured quota gets [`Defaults`] (overridable
//! in the `[default_quotas]` table of the configuration):
//!
//! | quota | window | limit | why |
//! |---|---|---|---|
//! | reveal | 3600 s | 100 distinct records, 1,000 requests | an admin screen or refund clerk reads tens of cards an hour; a stolen credential reads at most 2,400 a day, each one named in the audit |
//! | index | 60 s | 1,000 HMACs | a checkout front end hashes one PAN per card stored (16 a second is a busy shop); a masked PAN (BIN + last four) leaves ~10^5 Luhn-valid candidates, so a stolen index credential confirms at most one PAN per ~100 minutes |
//!
//! **Durability (write-ahead).** Before a charge is answered, a ceiling
//! at or above it is in `data_dir/quota.state` (temporary file, fsync,
//! rename, directory fsync); concurrent charges share one write (group
//! commit). A write reserves the next 2% of the limit (at least one slot),
//! so a principal near its limit writes at every charge and a busy one
//! every 50th; after a `kill -9` keyd counts every reserved slot as used:
//! a crash may cost a principal up to 2% of its window, and never grants
//! one slot more than the window allows. The file (version 2) is
//! authenticated with HMAC-SHA-256 under its own HKDF subkey of keyd's
//! master key ([`StateKeys::quota_mac`]), so it is read only once keyd is
//! unsealed. A version 1 file (keyed by HMAC of the state authentication
//! subkey) still reads, and is rewritten as version 2 at once; a file
//! that fails authentication makes every `reveal` and `index` charge fail
//! closed (quota exceeded) for the longest configured window, after which
//! counting starts afresh. Its format is `FORMAT.md` §16.
//!
//! Windows are fixed: a window starts with a principal's first charge
//! after the previous one ended, on the wall clock (so it survives a
//! restart). A clock set back keeps the current window.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::state_file::StateKeys;

type HmacSha256 = Hmac<Sha256>;

/// First line of `quota.state` as written (version 2).
pub(crate) const MAGIC: &str = "panseal-keyd-quota 2";
/// First line of a version 1 `quota.state` (read, then rewritten).
pub(crate) const MAGIC_V1: &str = "panseal-keyd-quota 1";
/// Label of the version 1 key derivation from the state authentication key.
const KEY_LABEL_V1: &[u8] = b"panseal-keyd quota state v1";

/// Default `reveal` window, seconds.
pub(crate) const DEFAULT_REVEAL_WINDOW: u64 = 3600;
/// Default distinct records per `reveal` window.
pub(crate) const DEFAULT_REVEAL_RECORDS: u64 = 100;
/// Default `reveal` requests per window.
pub(crate) const DEFAULT_REVEAL_REQUESTS: u64 = 1000;
/// Default `index` window, seconds.
pub(crate) const DEFAULT_INDEX_WINDOW: u64 = 60;
/// Default HMACs per `index` window.
pub(crate) const DEFAULT_INDEX_HASHES: u64 = 1000;
/// Default `admit` window, seconds.
pub(crate) const DEFAULT_ADMIT_WINDOW: u64 = 3600;
/// Default items admitted per `admit` window.
pub(crate) const DEFAULT_ADMIT_ITEMS: u64 = 100_000;

/// `admit_quota = { window_seconds, items }`: ingest ciphertexts admitted
/// per window. Kept in `quota.state` as an `index` counter named
/// `PRINCIPAL/admit` (a `/` never occurs in a principal's name), so its
/// durability is the index quota's.
#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdmitLimit {
    pub(crate) window_seconds: u64,
    pub(crate) items: u64,
}

impl AdmitLimit {
    /// The same limit as an index counter.
    pub(crate) fn as_index(&self) -> IndexLimit {
        IndexLimit {
            window_seconds: self.window_seconds,
            hashes: self.items,
        }
    }
}

/// The `quota.state` counter of `principal`'s admissions.
pub(crate) fn admit_counter(principal: &str) -> String {
    format!("{principal}/admit")
}

/// `reveal_quota = { window_seconds, distinct_records, requests }`.
#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevealLimit {
    pub(crate) window_seconds: u64,
    pub(crate) distinct_records: u64,
    pub(crate) requests: u64,
}

/// `index_quota = { window_seconds, hashes }`.
#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct IndexLimit {
    pub(crate) window_seconds: u64,
    pub(crate) hashes: u64,
}

/// The `[default_quotas]` table: limits of principals without their own.
#[derive(Deserialize, Clone, Copy, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct Defaults {
    #[serde(default = "default_reveal")]
    pub(crate) reveal: RevealLimit,
    #[serde(default = "default_index")]
    pub(crate) index: IndexLimit,
    #[serde(default = "default_admit")]
    pub(crate) admit: AdmitLimit,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            reveal: default_reveal(),
            index: default_index(),
            admit: default_admit(),
        }
    }
}

fn default_admit() -> AdmitLimit {
    AdmitLimit {
        window_seconds: DEFAULT_ADMIT_WINDOW,
        items: DEFAULT_ADMIT_ITEMS,
    }
}

fn default_reveal() -> RevealLimit {
    RevealLimit {
        window_seconds: DEFAULT_REVEAL_WINDOW,
        distinct_records: DEFAULT_REVEAL_RECORDS,
        requests: DEFAULT_REVEAL_REQUESTS,
    }
}

fn default_index() -> IndexLimit {
    IndexLimit {
        window_seconds: DEFAULT_INDEX_WINDOW,
        hashes: DEFAULT_INDEX_HASHES,
    }
}

/// Checks a limit read from the configuration.
pub(crate) fn check_reveal(l: &RevealLimit) -> Result<(), String> {
    if l.window_seconds == 0 {
        return Err("reveal quota window_seconds must be > 0".into());
    }
    if l.requests < l.distinct_records {
        return Err("reveal quota requests must be >= distinct_records".into());
    }
    Ok(())
}

/// Checks a limit read from the configuration.
pub(crate) fn check_index(l: &IndexLimit) -> Result<(), String> {
    if l.window_seconds == 0 {
        return Err("index quota window_seconds must be > 0".into());
    }
    Ok(())
}

/// Why a charge was refused (no PAN, no record content).
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Over a limit: the message says which and when to retry.
    Exceeded(String),
    /// The counters could not be made durable: nothing answered.
    NotDurable(String),
}

/// A reveal window as written: `requests` and `distinct_records` are
/// ceilings (at least what was used; after a crash, taken as used).
#[derive(Clone, Serialize, Deserialize, Default)]
struct RevealWindow {
    started: u64,
    window_seconds: u64,
    requests: u64,
    distinct_records: u64,
    /// Hex SHA-256 of distinct records revealed in the window (those known
    /// at the last write; re-revealing one costs no record slot).
    records: BTreeSet<String>,
}

/// An index window as written: `hashes` is a ceiling.
#[derive(Clone, Serialize, Deserialize, Default)]
struct IndexWindow {
    started: u64,
    window_seconds: u64,
    hashes: u64,
}

/// What a principal used in its current reveal window (memory only).
#[derive(Default)]
struct Live {
    requests: u64,
    records: u64,
    seen: HashSet<[u8; 32]>,
}

/// Slots reserved per write: 2% of the limit (at least 1). A crash loses
/// at most this many slots minus one, and never grants one.
fn chunk(limit: u64) -> u64 {
    limit.div_ceil(50).max(1)
}

/// The ceiling to write for `used` of `limit`.
fn ceiling(used: u64, limit: u64) -> u64 {
    used.saturating_add(chunk(limit) - 1).min(limit).max(used)
}

/// The file's JSON body.
#[derive(Clone, Serialize, Deserialize, Default)]
struct Snapshot {
    generation: u64,
    written_at: u64,
    reveal: BTreeMap<String, RevealWindow>,
    index: BTreeMap<String, IndexWindow>,
    /// `unwrap` windows: `requests` unwraps, `distinct_records` distinct
    /// keys, `records` SHA-256 of the key ids.
    #[serde(default)]
    unwrap: BTreeMap<String, RevealWindow>,
}

/// Which distinct-item quota a charge is for.
#[derive(Clone, Copy)]
enum Kind {
    Reveal,
    Unwrap,
}

struct Counters {
    snapshot: Snapshot,
    /// Each principal's use of its reveal window.
    live: HashMap<String, Live>,
    /// Each principal's use of its index window.
    index_used: HashMap<String, u64>,
    /// Each principal's use of its unwrap window.
    unwrap_live: HashMap<String, Live>,
    loaded: bool,
    /// Unix seconds until which every charge is refused (a file that
    /// failed authentication).
    refuse_until: u64,
}

/// The durable quota counters of one keyd.
pub(crate) struct QuotaStore {
    path: PathBuf,
    counters: Mutex<Counters>,
    /// Serialises writes; holds the newest generation on disk.
    written: Mutex<u64>,
    generation: AtomicU64,
    /// The longest configured window: how long a bad file locks charges.
    lockout: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The quota file's keys (FORMAT.md §16.4): the version 2 key, an HKDF
/// subkey of the master key ([`StateKeys::quota_mac`]), and the version 1
/// key, HMAC(state authentication subkey, label), to read an older file.
pub(crate) struct QuotaKey {
    current: Zeroizing<[u8; 32]>,
    v1: Zeroizing<[u8; 32]>,
}

impl QuotaKey {
    /// The keys of the file from keyd's subkeys.
    pub(crate) fn derive(keys: &StateKeys) -> QuotaKey {
        QuotaKey {
            current: keys.quota_mac.clone(),
            v1: derive_key_v1(&keys.state_mac),
        }
    }
}

/// The version 1 quota file's key: HMAC(state authentication key, label).
fn derive_key_v1(state_mac: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut m = <HmacSha256 as Mac>::new_from_slice(state_mac)
        .unwrap_or_else(|_| unreachable!("HMAC takes 32-byte keys"));
    m.update(KEY_LABEL_V1);
    Zeroizing::new(m.finalize().into_bytes().into())
}

/// HMAC-SHA-256(key, magic || "\n" || body).
fn mac(key: &[u8; 32], magic: &str, body: &[u8]) -> [u8; 32] {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes 32-byte keys"));
    m.update(magic.as_bytes());
    m.update(b"\n");
    m.update(body);
    m.finalize().into_bytes().into()
}

/// Encodes the file (version 2): magic line, JSON line,
/// `hmac-sha256 <hex>` line.
fn encode(key: &QuotaKey, s: &Snapshot) -> Vec<u8> {
    encode_as(&key.current, MAGIC, s)
}

fn encode_as(key: &[u8; 32], magic: &str, s: &Snapshot) -> Vec<u8> {
    let body = serde_json::to_vec(s).unwrap_or_default();
    let tag = mac(key, magic, &body);
    let mut out = Vec::with_capacity(body.len() + 120);
    out.extend_from_slice(magic.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(&body);
    out.extend_from_slice(b"\nhmac-sha256 ");
    out.extend_from_slice(hex::encode(tag).as_bytes());
    out.push(b'\n');
    out
}

/// The version of a decoded file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Version {
    V1,
    V2,
}

/// Decodes and authenticates the file (version 2, or version 1 under its
/// own key).
fn decode(key: &QuotaKey, bytes: &[u8]) -> Result<(Snapshot, Version), &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8")?;
    let mut lines = text.split('\n');
    let (magic, k, version) = match lines.next() {
        Some(MAGIC) => (MAGIC, &key.current, Version::V2),
        Some(MAGIC_V1) => (MAGIC_V1, &key.v1, Version::V1),
        _ => return Err("not a version 1 or 2 quota file"),
    };
    let body = lines.next().ok_or("truncated")?;
    let tag_line = lines.next().ok_or("truncated")?;
    if lines.next() != Some("") || lines.next().is_some() {
        return Err("trailing data");
    }
    let tag_hex = tag_line
        .strip_prefix("hmac-sha256 ")
        .ok_or("no authentication tag")?;
    let mut tag = [0u8; 32];
    hex::decode_to_slice(tag_hex, &mut tag).map_err(|_| "bad authentication tag")?;
    let expected = mac(k, magic, body.as_bytes());
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&tag[..], &expected[..])) {
        return Err("authentication failed");
    }
    let snapshot = serde_json::from_str(body).map_err(|_| "malformed body")?;
    Ok((snapshot, version))
}

fn retry_in(started: u64, window: u64, now: u64) -> u64 {
    (started + window).saturating_sub(now).max(1)
}

impl QuotaStore {
    /// The store for `data_dir/quota.state`; read at the first charge after
    /// unseal (its key needs the master key).
    pub(crate) fn new(data_dir: &std::path::Path, lockout: Duration) -> Self {
        QuotaStore {
            path: data_dir.join("quota.state"),
            counters: Mutex::new(Counters {
                snapshot: Snapshot::default(),
                live: HashMap::new(),
                index_used: HashMap::new(),
                unwrap_live: HashMap::new(),
                loaded: false,
                refuse_until: 0,
            }),
            written: Mutex::new(0),
            generation: AtomicU64::new(0),
            lockout: lockout.as_secs().max(1),
        }
    }

    fn load(&self, c: &mut Counters, key: &QuotaKey) {
        if c.loaded {
            return;
        }
        c.loaded = true;
        match std::fs::read(&self.path) {
            Ok(bytes) => match decode(key, &bytes) {
                Ok((s, version)) => {
                    if version == Version::V1 {
                        // Rewritten as version 2 at once (same counters);
                        // if that fails, the version 1 file still reads and
                        // the next charge's write replaces it.
                        let v2 = encode(key, &s);
                        if let Err(e) = panseal::keyd::server::write_atomically(&self.path, &v2) {
                            eprintln!(
                                "panseal-keyd: quota state {} not rewritten as version 2: {e}",
                                self.path.display()
                            );
                        }
                    }
                    // After a crash, every reserved slot counts as used.
                    let restore =
                        |windows: &BTreeMap<String, RevealWindow>| -> HashMap<String, Live> {
                            windows
                                .iter()
                                .map(|(p, w)| {
                                    let seen: HashSet<[u8; 32]> = w
                                        .records
                                        .iter()
                                        .filter_map(|h| {
                                            let mut d = [0u8; 32];
                                            hex::decode_to_slice(h, &mut d).ok().map(|_| d)
                                        })
                                        .collect();
                                    let live = Live {
                                        requests: w.requests,
                                        records: w.distinct_records.max(seen.len() as u64),
                                        seen,
                                    };
                                    (p.clone(), live)
                                })
                                .collect()
                        };
                    c.live = restore(&s.reveal);
                    c.unwrap_live = restore(&s.unwrap);
                    c.index_used = s.index.iter().map(|(p, w)| (p.clone(), w.hashes)).collect();
                    self.generation.store(s.generation, Ordering::SeqCst);
                    c.snapshot = s;
                }
                Err(why) => {
                    eprintln!(
                        "panseal-keyd: {} refused ({why}): reveal and index refused for {} s",
                        self.path.display(),
                        self.lockout
                    );
                    c.refuse_until = now_secs() + self.lockout;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                eprintln!(
                    "panseal-keyd: {} unreadable ({e}): reveal and index refused for {} s",
                    self.path.display(),
                    self.lockout
                );
                c.refuse_until = now_secs() + self.lockout;
            }
        }
    }

    fn locked(c: &Counters, now: u64) -> Result<(), Refusal> {
        if now < c.refuse_until {
            return Err(Refusal::Exceeded(format!(
                "quota state failed authentication; reveal and index refused for {} s",
                c.refuse_until - now
            )));
        }
        Ok(())
    }

    /// Charges one reveal of the record with digest `record` to
    /// `principal`, durably, or refuses.
    pub(crate) fn charge_reveal(
        &self,
        key: &QuotaKey,
        principal: &str,
        limit: &RevealLimit,
        record: [u8; 32],
    ) -> Result<(), Refusal> {
        self.charge_distinct(key, Kind::Reveal, principal, limit, record)
    }

    /// Charges one unwrap of key `key_id` to `principal` (its configured
    /// `quota` as a [`RevealLimit`]: unwraps as requests, distinct keys as
    /// distinct records, per window), durably, or refuses.
    pub(crate) fn charge_unwrap(
        &self,
        key: &QuotaKey,
        principal: &str,
        limit: &RevealLimit,
        key_id: &[u8; 8],
    ) -> Result<(), Refusal> {
        let mut h = <Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut h, b"panseal-keyd unwrap key id");
        sha2::Digest::update(&mut h, key_id);
        let item: [u8; 32] = sha2::Digest::finalize(h).into();
        self.charge_distinct(key, Kind::Unwrap, principal, limit, item)
    }

    fn charge_distinct(
        &self,
        key: &QuotaKey,
        kind: Kind,
        principal: &str,
        limit: &RevealLimit,
        record: [u8; 32],
    ) -> Result<(), Refusal> {
        let (what, items) = match kind {
            Kind::Reveal => ("reveal requests", "distinct records"),
            Kind::Unwrap => ("unwraps", "distinct keys"),
        };
        let now = now_secs();
        let generation = {
            let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            self.load(&mut c, key);
            Self::locked(&c, now)?;
            let c = &mut *c;
            let (windows, lives) = match kind {
                Kind::Reveal => (&mut c.snapshot.reveal, &mut c.live),
                Kind::Unwrap => (&mut c.snapshot.unwrap, &mut c.unwrap_live),
            };
            let w = windows.entry(principal.to_owned()).or_default();
            let live = lives.entry(principal.to_owned()).or_default();
            // A window ends after its own length, or sooner if the
            // configured window was shortened.
            let len = w.window_seconds.min(limit.window_seconds);
            if w.started == 0 || now >= w.started.saturating_add(len) {
                *w = RevealWindow {
                    started: now,
                    window_seconds: limit.window_seconds,
                    ..RevealWindow::default()
                };
                *live = Live::default();
            }
            let retry = retry_in(w.started, w.window_seconds, now);
            if live.requests >= limit.requests {
                return Err(Refusal::Exceeded(format!(
                    "principal {principal:?} reached {} {what} per {} s; retry in {retry} s",
                    limit.requests, limit.window_seconds
                )));
            }
            let new = !live.seen.contains(&record);
            if new && live.records >= limit.distinct_records {
                return Err(Refusal::Exceeded(format!(
                    "principal {principal:?} reached {} {items} per {} s; retry in {retry} s",
                    limit.distinct_records, limit.window_seconds
                )));
            }
            live.requests += 1;
            if new {
                live.records += 1;
                live.seen.insert(record);
                w.records.insert(hex::encode(record));
            }
            if live.requests <= w.requests && live.records <= w.distinct_records {
                // Within the slots already reserved on disk.
                return Ok(());
            }
            w.requests = w.requests.max(ceiling(live.requests, limit.requests));
            w.distinct_records = w
                .distinct_records
                .max(ceiling(live.records, limit.distinct_records));
            self.generation.fetch_add(1, Ordering::SeqCst) + 1
        };
        self.persist(key, generation)
    }

    /// Charges `n` keyed hashes to `principal`, durably, or refuses (and
    /// charges nothing).
    pub(crate) fn charge_index(
        &self,
        key: &QuotaKey,
        principal: &str,
        limit: &IndexLimit,
        n: u64,
    ) -> Result<(), Refusal> {
        let now = now_secs();
        let generation = {
            let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            self.load(&mut c, key);
            Self::locked(&c, now)?;
            let c = &mut *c;
            let w = c.snapshot.index.entry(principal.to_owned()).or_default();
            let used = c.index_used.entry(principal.to_owned()).or_default();
            let len = w.window_seconds.min(limit.window_seconds);
            if w.started == 0 || now >= w.started.saturating_add(len) {
                *w = IndexWindow {
                    started: now,
                    window_seconds: limit.window_seconds,
                    hashes: 0,
                };
                *used = 0;
            }
            if used.saturating_add(n) > limit.hashes {
                let retry = retry_in(w.started, w.window_seconds, now);
                return Err(Refusal::Exceeded(format!(
                    "principal {principal:?} would pass {} hashes per {} s ({} used, {n} asked); \
                     retry in {retry} s",
                    limit.hashes, limit.window_seconds, *used
                )));
            }
            *used += n;
            if *used <= w.hashes {
                return Ok(());
            }
            w.hashes = ceiling(*used, limit.hashes);
            self.generation.fetch_add(1, Ordering::SeqCst) + 1
        };
        self.persist(key, generation)
    }

    /// Returns once the counters of `generation` (or newer) are on disk.
    fn persist(&self, key: &QuotaKey, generation: u64) -> Result<(), Refusal> {
        // The write waits for the disk: let the runtime move other
        // connections to another worker meanwhile, so their charges share
        // the next write.
        tokio::task::block_in_place(|| self.persist_now(key, generation))
    }

    fn persist_now(&self, key: &QuotaKey, generation: u64) -> Result<(), Refusal> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if *written >= generation {
            // Another charge's write covered this one (group commit).
            return Ok(());
        }
        let (bytes, at) = {
            let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            let now = now_secs();
            // Drop windows long over (keeps the file small).
            c.snapshot
                .reveal
                .retain(|_, w| now < w.started.saturating_add(w.window_seconds));
            let c = &mut *c;
            c.live.retain(|p, _| c.snapshot.reveal.contains_key(p));
            c.snapshot
                .unwrap
                .retain(|_, w| now < w.started.saturating_add(w.window_seconds));
            c.unwrap_live
                .retain(|p, _| c.snapshot.unwrap.contains_key(p));
            c.snapshot
                .index
                .retain(|_, w| now < w.started.saturating_add(w.window_seconds));
            c.index_used.retain(|p, _| c.snapshot.index.contains_key(p));
            let at = self.generation.load(Ordering::SeqCst);
            c.snapshot.generation = at;
            c.snapshot.written_at = now;
            (encode(key, &c.snapshot), at)
        };
        panseal::keyd::server::write_atomically(&self.path, &bytes).map_err(|e| {
            eprintln!(
                "panseal-keyd: quota state {} not written: {e}",
                self.path.display()
            );
            Refusal::NotDurable("quota state could not be written; nothing revealed".into())
        })?;
        *written = at;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(current: [u8; 32], v1: [u8; 32]) -> QuotaKey {
        QuotaKey {
            current: Zeroizing::new(current),
            v1: Zeroizing::new(v1),
        }
    }

    /// The independent generator's version 1 file
    /// (tests/vectors/gen_quota_vectors.py) authenticates, decodes, and
    /// encodes back to the same bytes.
    #[test]
    fn python_vector_decodes_and_encodes_to_the_same_bytes() {
        let doc: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/vectors/keyd_quota/quota_state_v1.json"
        ))
        .unwrap();
        let q = &doc["quota_state"];
        let mut state_mac = [0u8; 32];
        hex::decode_to_slice(q["state_mac_hex"].as_str().unwrap(), &mut state_mac).unwrap();
        let v1 = derive_key_v1(&state_mac);
        assert_eq!(hex::encode(&v1[..]), q["quota_key_hex"].as_str().unwrap());
        let key = keys([0x55; 32], *v1);
        let file = q["file"].as_str().unwrap();
        let (s, version) = decode(&key, file.as_bytes()).unwrap();
        assert_eq!(version, Version::V1);
        let w = &s.reveal[q["reveal_principal"].as_str().unwrap()];
        assert_eq!(w.requests, q["requests"].as_u64().unwrap());
        assert_eq!(w.distinct_records, q["distinct_records"].as_u64().unwrap());
        assert_eq!(w.records.len(), 3);
        assert_eq!(
            s.index[q["index_principal"].as_str().unwrap()].hashes,
            q["hashes"].as_u64().unwrap()
        );
        assert_eq!(encode_as(&v1, MAGIC_V1, &s), file.as_bytes());
        assert!(decode(&keys(*v1, [0u8; 32]), file.as_bytes()).is_err());
    }

    /// The independent generator's version 2 file
    /// (tests/vectors/keyd_quota/gen_quota_v2_vectors.py: HKDF-SHA-256 of
    /// the master key, then HMAC) authenticates, decodes, and encodes back
    /// to the same bytes; it does not read under the version 1 key.
    #[test]
    fn python_v2_vector_decodes_and_encodes_to_the_same_bytes() {
        let doc: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/vectors/keyd_quota/quota_state_v2.json"
        ))
        .unwrap();
        let q = &doc["quota_state"];
        let mut master = [0u8; 32];
        hex::decode_to_slice(q["master_key_hex"].as_str().unwrap(), &mut master).unwrap();
        let sub = StateKeys::derive(&master);
        assert_eq!(
            hex::encode(&sub.quota_mac[..]),
            q["quota_key_hex"].as_str().unwrap()
        );
        assert_eq!(
            hex::encode(&sub.state_mac[..]),
            q["state_mac_hex"].as_str().unwrap()
        );
        let key = QuotaKey::derive(&sub);
        assert_eq!(
            hex::encode(&key.v1[..]),
            q["quota_key_v1_hex"].as_str().unwrap()
        );
        let file = q["file"].as_str().unwrap();
        let (s, version) = decode(&key, file.as_bytes()).unwrap();
        assert_eq!(version, Version::V2);
        assert_eq!(
            s.reveal[q["reveal_principal"].as_str().unwrap()].requests,
            q["requests"].as_u64().unwrap()
        );
        assert_eq!(
            s.index[q["index_principal"].as_str().unwrap()].hashes,
            q["hashes"].as_u64().unwrap()
        );
        assert_eq!(encode(&key, &s), file.as_bytes());
        // The subkey is not the version 1 derivation, and the version 2
        // magic does not read under the version 1 key.
        assert_ne!(&key.current[..], &key.v1[..]);
        assert!(decode(&keys(*key.v1, *key.v1), file.as_bytes()).is_err());
    }

    /// A version 1 file written by an older keyd loads (its counters
    /// count) and is rewritten as version 2 under the HKDF subkey at once.
    #[test]
    fn a_version_1_file_loads_and_is_rewritten_as_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let sub = StateKeys::derive(&[3u8; 32]);
        let key = QuotaKey::derive(&sub);
        let mut s = Snapshot {
            generation: 9,
            ..Snapshot::default()
        };
        let now = now_secs();
        s.index.insert(
            "front".into(),
            IndexWindow {
                started: now,
                window_seconds: 3600,
                hashes: 40,
            },
        );
        let v1 = encode_as(&derive_key_v1(&sub.state_mac), MAGIC_V1, &s);
        let path = dir.path().join("quota.state");
        std::fs::write(&path, &v1).unwrap();
        let store = QuotaStore::new(dir.path(), Duration::from_secs(60));
        {
            let mut c = store.counters.lock().unwrap();
            store.load(&mut c, &key);
            assert_eq!(c.refuse_until, 0, "a version 1 file is not refused");
            assert_eq!(c.index_used["front"], 40);
        }
        assert_eq!(store.generation.load(Ordering::SeqCst), 9);
        let now_on_disk = std::fs::read(&path).unwrap();
        assert!(now_on_disk.starts_with(b"panseal-keyd-quota 2\n"));
        let (back, version) = decode(&key, &now_on_disk).unwrap();
        assert_eq!(version, Version::V2);
        assert_eq!(back.index["front"].hashes, 40);
        assert_eq!(back.generation, 9);
        // A version 1 file under any other key is still refused.
        let forged = encode_as(&[1u8; 32], MAGIC_V1, &s);
        std::fs::write(&path, &forged).unwrap();
        let store = QuotaStore::new(dir.path(), Duration::from_secs(60));
        let mut c = store.counters.lock().unwrap();
        store.load(&mut c, &key);
        assert!(c.refuse_until > 0);
    }

    #[test]
    fn a_crash_never_grants_a_slot() {
        // Ceilings: never below what was used, never above the limit.
        for limit in [1u64, 3, 5, 100, 1000, 100_000] {
            for used in 0..=limit.min(300) {
                let c = ceiling(used, limit);
                assert!(c >= used && c <= limit);
                assert!(c - used < chunk(limit));
            }
        }
        assert_eq!(chunk(100), 2);
        assert_eq!(chunk(1000), 20);
        assert_eq!(chunk(3), 1);
    }

    #[test]
    fn file_round_trips_and_refuses_an_edit() {
        let key = keys([7u8; 32], [9u8; 32]);
        let mut s = Snapshot {
            generation: 3,
            ..Snapshot::default()
        };
        s.reveal.insert(
            "refunds".into(),
            RevealWindow {
                started: 100,
                window_seconds: 3600,
                requests: 5,
                distinct_records: 1,
                records: [hex::encode([1u8; 32])].into_iter().collect(),
            },
        );
        let bytes = encode(&key, &s);
        let (back, _) = decode(&key, &bytes).unwrap();
        assert_eq!(back.reveal["refunds"].requests, 5);
        let text = String::from_utf8(bytes).unwrap();
        let edited = text.replace("\"requests\":5", "\"requests\":0");
        assert_ne!(edited, text);
        assert!(decode(&key, edited.as_bytes()).is_err());
        assert!(decode(&keys([8u8; 32], [7u8; 32]), text.as_bytes()).is_err());
    }
}
