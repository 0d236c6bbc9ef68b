//! A tamper-evident audit log: JSON lines, each authenticated by an HMAC
//! that chains it to the record before it (PCI DSS 10.3.2, 10.3.4).
//!
//! One record is one line:
//!
//! ```text
//! {"seq":N,"prev":"<64 hex>","event":<event JSON>,"mac":"<64 hex>"}
//! ```
//!
//! * `seq` counts records from 1;
//! * `prev` is the `mac` of the record before (64 zeros for the first);
//! * `mac` is HMAC-SHA-256 under the log's [`AuditKey`] of the label
//!   `panseal-audit-chain-v1\n` followed by every byte of the line before
//!   `,"mac":"`.
//!
//! The MAC covers the exact bytes written (no re-serialisation), so editing
//! a field, removing, inserting or reordering a record all make
//! [`verify_audit_chain`] fail, and it names the first bad record. What a
//! chain alone cannot show is a cut-off tail or a deleted file: for that,
//! keep an **anchor** (the count and head MAC, [`ChainSummary`]) outside the
//! log — [`ChainedAuditLog::write_anchor`] exports one to a file of its own
//! (MACed under the audit key), `panseal-keyd` also keeps one in its
//! authenticated state — and open or verify with
//! [`ChainedAuditLog::open_anchored`] / [`verify_audit_chain_anchored`]: a
//! log that ends before the anchored record, or whose record at that
//! position has another MAC, is refused.
//!
//! Durability: each record is one `write` (a killed process loses nothing
//! acknowledged). With [`ChainedAuditLog::set_sync_each_record`] every
//! record is also `fdatasync`ed before `append` returns (power loss loses
//! nothing acknowledged; costs one disk flush per record, see
//! `benches/keyd.rs`); otherwise call [`ChainedAuditLog::sync`]
//! periodically (anchors are written only after a sync).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use secrecy::{ExposeSecret, SecretBox};
use serde::Serialize;
use sha2::Sha256;
use zeroize::Zeroize;

use super::{AuditEvent, AuditSink};
use crate::error::AuditError;

type HmacSha256 = Hmac<Sha256>;

const LABEL: &[u8] = b"panseal-audit-chain-v1\n";
const ANCHOR_LABEL: &[u8] = b"panseal-audit-anchor-v1\n";
const KEY_ID_LABEL: &[u8] = b"panseal-audit-key-id-v1";
const MAC_PREFIX: &[u8] = b",\"mac\":\"";
/// `,"mac":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = 8 + 64 + 2;
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The 256-bit key that authenticates an audit chain. Keep it apart from the
/// log (another file system, owner or machine): whoever holds it can forge
/// records.
///
/// No `Debug` of its bytes, wiped on drop.
pub struct AuditKey {
    key: SecretBox<[u8; 32]>,
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut key = SecretBox::new(Box::new([0u8; 32]));
        OsRng.fill_bytes(secrecy::ExposeSecretMut::expose_secret_mut(&mut key));
        AuditKey { key }
    }

    /// **Tests only** (feature `hazmat-test-keys`): a key from given bytes.
    #[cfg(feature = "hazmat-test-keys")]
    #[doc(hidden)]
    pub fn from_bytes_insecure(bytes: [u8; 32]) -> Self {
        AuditKey {
            key: SecretBox::new(Box::new(bytes)),
        }
    }

    /// Generates a key and writes it, as 64 hex digits, to a new file at
    /// `path` (owner read/write only on Unix). Refuses to overwrite.
    ///
    /// # Errors
    ///
    /// An I/O error, including when the file exists.
    pub fn create_file(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let key = Self::generate();
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path)?;
        let mut text = hex::encode(key.key.expose_secret());
        let result = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
        text.zeroize();
        result?;
        Ok(key)
    }

    /// Reads a key written by [`AuditKey::create_file`].
    ///
    /// # Errors
    ///
    /// An I/O error, or [`AuditError::Rejected`] if the file does not hold
    /// 64 hex digits.
    pub fn load_file(path: impl AsRef<Path>) -> Result<Self, AuditError> {
        let mut text = fs::read_to_string(path)?;
        let mut key = SecretBox::new(Box::new([0u8; 32]));
        let parsed = hex::decode_to_slice(
            text.trim(),
            secrecy::ExposeSecretMut::expose_secret_mut(&mut key),
        );
        text.zeroize();
        parsed
            .map_err(|_| AuditError::Rejected("audit key file must hold 64 hex digits".into()))?;
        Ok(AuditKey { key })
    }

    fn mac_with(&self, label: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length; 32 bytes never fails.
        let mut m = <HmacSha256 as Mac>::new_from_slice(self.key.expose_secret())
            .unwrap_or_else(|_| unreachable_hmac());
        m.update(label);
        m
    }

    fn mac(&self) -> HmacSha256 {
        self.mac_with(LABEL)
    }

    /// A public identifier of this key (32 hex digits: an HMAC of a fixed
    /// label under it), to notice a log re-keyed with another key.
    pub fn key_id(&self) -> String {
        let m = self.mac_with(KEY_ID_LABEL);
        hex::encode(&m.finalize().into_bytes()[..16])
    }

    fn anchor_mac(&self, records: u64, head: &str) -> String {
        let mut m = self.mac_with(ANCHOR_LABEL);
        m.update(&records.to_be_bytes());
        m.update(head.as_bytes());
        hex::encode(m.finalize().into_bytes())
    }
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // `Hmac::new_from_slice` only fails for fixed-size-key MACs.
    panic!("HMAC-SHA-256 refused a 32-byte key")
}

/// What a successful verification saw: keep `records` and `head` somewhere
/// else to detect a log cut off at the end later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSummary {
    /// Number of records.
    pub records: u64,
    /// The MAC of the last record (64 hex digits; zeros for an empty log).
    pub head: String,
}

struct Tail {
    file: File,
    seq: u64,
    prev: String,
}

/// An append-only, hash-chained audit log file. Usable directly as an
/// [`AuditSink`] for the library's own events, and by `panseal-keyd` for
/// its request log.
///
/// Each record is written with one `write` call and handed to the operating
/// system before [`ChainedAuditLog::append`] returns, so a killed process
/// loses nothing it acknowledged; call [`ChainedAuditLog::sync`] to force
/// records to stable storage (power loss).
pub struct ChainedAuditLog {
    path: PathBuf,
    key: AuditKey,
    tail: Mutex<Tail>,
    sync_each: AtomicBool,
    /// A second handle for `fdatasync` outside the append lock, and the
    /// newest record known to be on stable storage (group commit: one
    /// flush covers every record appended before it started).
    sync: Mutex<(File, u64)>,
    /// Serialises anchor writes, so an anchor never goes back.
    anchor: Mutex<()>,
}

impl fmt::Debug for ChainedAuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainedAuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ChainedAuditLog {
    /// Opens the log at `path` (creating it if absent), verifies every
    /// record already in it, and continues its chain.
    ///
    /// # Errors
    ///
    /// [`AuditError::Tampered`] if the existing log fails verification (it
    /// is left untouched), or an I/O error.
    pub fn open(path: impl AsRef<Path>, key: AuditKey) -> Result<Self, AuditError> {
        Self::open_anchored(path, key, &ChainSummary::genesis())
    }

    /// As [`ChainedAuditLog::open`], and the log must reach `anchor` (a
    /// summary kept outside the log): it must hold at least
    /// `anchor.records` records, the one at that position with MAC
    /// `anchor.head`. A missing file is refused unless the anchor is the
    /// genesis (0 records).
    ///
    /// # Errors
    ///
    /// [`AuditError::Tampered`] for a log that fails verification, is cut
    /// before the anchor, was replaced, or is missing; or an I/O error.
    pub fn open_anchored(
        path: impl AsRef<Path>,
        key: AuditKey,
        anchor: &ChainSummary,
    ) -> Result<Self, AuditError> {
        let path = path.as_ref().to_path_buf();
        let summary = match fs::read(&path) {
            Ok(bytes) => verify_audit_bytes(&bytes, &key, anchor, &mut |_, _| {})?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if anchor.records > 0 {
                    return Err(AuditError::Tampered {
                        record: 1,
                        reason: "the log file is missing (deleted?) but its anchor names records",
                    });
                }
                ChainSummary::genesis()
            }
            Err(e) => return Err(e.into()),
        };
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let sync_file = file.try_clone()?;
        let synced = summary.records;
        Ok(ChainedAuditLog {
            path,
            key,
            tail: Mutex::new(Tail {
                file,
                seq: summary.records,
                prev: summary.head,
            }),
            sync_each: AtomicBool::new(false),
            sync: Mutex::new((sync_file, synced)),
            anchor: Mutex::new(()),
        })
    }

    /// Makes every record up to `seq` durable: waits for a flush already
    /// covering it, or flushes everything appended so far.
    fn sync_through(&self, seq: u64) -> Result<(), AuditError> {
        let mut s = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        if s.1 >= seq {
            return Ok(());
        }
        let upto = self.tail.lock().unwrap_or_else(|p| p.into_inner()).seq;
        s.0.sync_data()?;
        s.1 = upto;
        Ok(())
    }

    /// Whether every record is `fdatasync`ed before [`ChainedAuditLog::append`]
    /// returns (off by default).
    pub fn set_sync_each_record(&self, on: bool) {
        self.sync_each.store(on, Ordering::Relaxed);
    }

    /// Syncs the log, then writes its summary as an anchor file at `path`
    /// (atomically: temporary file, fsync, rename), MACed under the audit
    /// key. Keep it apart from the log; check it with
    /// [`read_audit_anchor`] and [`ChainedAuditLog::open_anchored`].
    ///
    /// # Errors
    ///
    /// An I/O error.
    pub fn write_anchor(&self, path: impl AsRef<Path>) -> Result<ChainSummary, AuditError> {
        static TEMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let _one_at_a_time = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        let summary = self.summary();
        self.sync_through(summary.records)?;
        let body = serde_json::json!({
            "v": 1,
            "records": summary.records,
            "head": summary.head,
            "mac": self.key.anchor_mac(summary.records, &summary.head),
        });
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        bytes.push(b'\n');
        let n = TEMP.fetch_add(1, Ordering::Relaxed) | (1 << 62);
        crate::keystore::file::write_atomically(path.as_ref(), &bytes, n)?;
        Ok(summary)
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record holding `event` (any value that serialises to
    /// JSON) and returns its sequence number.
    ///
    /// # Errors
    ///
    /// [`AuditError::Rejected`] if `event` does not serialise, or an I/O
    /// error (the chain is then not advanced).
    pub fn append<T: Serialize + ?Sized>(&self, event: &T) -> Result<u64, AuditError> {
        let event =
            serde_json::to_string(event).map_err(|e| AuditError::Rejected(e.to_string()))?;
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let seq = tail.seq + 1;
        let mut line = format!(
            "{{\"seq\":{seq},\"prev\":\"{}\",\"event\":{event}",
            tail.prev
        );
        let mut m = self.key.mac();
        m.update(line.as_bytes());
        let mac = hex::encode(m.finalize().into_bytes());
        line.push_str(",\"mac\":\"");
        line.push_str(&mac);
        line.push_str("\"}\n");
        tail.file.write_all(line.as_bytes())?;
        tail.seq = seq;
        tail.prev = mac;
        drop(tail);
        if self.sync_each.load(Ordering::Relaxed) {
            // Outside the append lock: concurrent appends share one flush.
            self.sync_through(seq)?;
        }
        Ok(seq)
    }

    /// Forces every record appended so far to stable storage.
    ///
    /// # Errors
    ///
    /// An I/O error.
    pub fn sync(&self) -> Result<(), AuditError> {
        let seq = self.tail.lock().unwrap_or_else(|p| p.into_inner()).seq;
        self.sync_through(seq)
    }

    /// The number of records and the newest MAC.
    pub fn summary(&self) -> ChainSummary {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        ChainSummary {
            records: tail.seq,
            head: tail.prev.clone(),
        }
    }
}

impl AuditSink for ChainedAuditLog {
    fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        self.append(event).map(|_| ())
    }
}

/// Verifies the whole log at `path` under `key`.
///
/// # Errors
///
/// [`AuditError::Tampered`] naming the first record (1-based line) that was
/// altered, removed, inserted or reordered, or an I/O error.
pub fn verify_audit_chain(
    path: impl AsRef<Path>,
    key: &AuditKey,
) -> Result<ChainSummary, AuditError> {
    verify_bytes(&fs::read(path)?, key)
}

/// Verifies the whole log at `path` under `key` and that it reaches
/// `anchor` (see [`ChainedAuditLog::open_anchored`]).
///
/// # Errors
///
/// [`AuditError::Tampered`] naming the first bad record, a cut tail (the
/// first missing record) or a missing file (record 1); or an I/O error.
pub fn verify_audit_chain_anchored(
    path: impl AsRef<Path>,
    key: &AuditKey,
    anchor: &ChainSummary,
) -> Result<ChainSummary, AuditError> {
    match fs::read(path) {
        Ok(bytes) => verify_audit_bytes(&bytes, key, anchor, &mut |_, _| {}),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && anchor.records > 0 => {
            Err(AuditError::Tampered {
                record: 1,
                reason: "the log file is missing (deleted?) but its anchor names records",
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads an anchor file written by [`ChainedAuditLog::write_anchor`].
///
/// # Errors
///
/// An I/O error, or [`AuditError::Rejected`] if it does not parse or its
/// MAC does not match (altered, or written under another key).
pub fn read_audit_anchor(
    path: impl AsRef<Path>,
    key: &AuditKey,
) -> Result<ChainSummary, AuditError> {
    parse_audit_anchor(&fs::read(path)?, key)
}

/// Parses anchor bytes (see [`read_audit_anchor`]).
#[doc(hidden)]
#[cfg_attr(not(feature = "keyd-client"), allow(unreachable_pub))]
pub fn parse_audit_anchor(bytes: &[u8], key: &AuditKey) -> Result<ChainSummary, AuditError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        v: u8,
        records: u64,
        head: String,
        mac: String,
    }
    let r: Raw = serde_json::from_slice(bytes)
        .map_err(|_| AuditError::Rejected("audit anchor does not parse".into()))?;
    if r.v != 1 || r.head.len() != 64 {
        return Err(AuditError::Rejected("audit anchor: unknown version".into()));
    }
    let want = key.anchor_mac(r.records, &r.head);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        want.as_bytes(),
        r.mac.as_bytes(),
    )) {
        return Err(AuditError::Rejected(
            "audit anchor fails its MAC: altered, or written under another audit key".into(),
        ));
    }
    Ok(ChainSummary {
        records: r.records,
        head: r.head,
    })
}

impl ChainSummary {
    /// The summary of an empty log.
    pub fn genesis() -> Self {
        ChainSummary {
            records: 0,
            head: GENESIS.into(),
        }
    }
}

#[derive(serde::Deserialize)]
struct Header<'a> {
    seq: u64,
    #[serde(borrow)]
    prev: &'a str,
    #[allow(dead_code)]
    event: serde::de::IgnoredAny,
}

fn verify_bytes(bytes: &[u8], key: &AuditKey) -> Result<ChainSummary, AuditError> {
    verify_audit_bytes(bytes, key, &ChainSummary::genesis(), &mut |_, _| {})
}

/// Chains raw event bytes (not checked to be JSON) into log bytes under
/// `key`, as [`ChainedAuditLog::append`] would: for the fuzz targets, so
/// they reach the checks behind the MAC.
#[cfg(feature = "keyd-client")]
#[doc(hidden)]
pub fn chain_raw_events(key: &AuditKey, events: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = GENESIS.to_owned();
    for (i, e) in events.iter().enumerate() {
        let mut line = format!("{{\"seq\":{},\"prev\":\"{prev}\",\"event\":", i + 1).into_bytes();
        line.extend_from_slice(e);
        let mut m = key.mac();
        m.update(&line);
        prev = hex::encode(m.finalize().into_bytes());
        out.extend_from_slice(&line);
        out.extend_from_slice(b",\"mac\":\"");
        out.extend_from_slice(prev.as_bytes());
        out.extend_from_slice(b"\"}\n");
    }
    out
}

/// Verifies log bytes against `anchor`, calling `visit(seq, body)` for each
/// authenticated record (body: the line before its MAC). For the server
/// and the fuzz targets.
///
/// # Errors
///
/// As [`verify_audit_chain_anchored`].
#[doc(hidden)]
#[cfg_attr(not(feature = "keyd-client"), allow(unreachable_pub))]
pub fn verify_audit_bytes(
    bytes: &[u8],
    key: &AuditKey,
    anchor: &ChainSummary,
    visit: &mut dyn FnMut(u64, &[u8]),
) -> Result<ChainSummary, AuditError> {
    let mut prev = GENESIS.to_owned();
    let mut n = 0u64;
    let mut rest = bytes;
    while !rest.is_empty() {
        n += 1;
        let bad = |reason| AuditError::Tampered { record: n, reason };
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(bad("incomplete last record (torn write or cut file)"));
        };
        let line = &rest[..end];
        rest = &rest[end + 1..];
        if line.len() < SUFFIX_LEN + 2 {
            return Err(bad("not a chained record"));
        }
        let (body, suffix) = line.split_at(line.len() - SUFFIX_LEN);
        if &suffix[..MAC_PREFIX.len()] != MAC_PREFIX || &suffix[SUFFIX_LEN - 2..] != b"\"}" {
            return Err(bad("not a chained record"));
        }
        let mac_hex = &suffix[MAC_PREFIX.len()..SUFFIX_LEN - 2];
        let mut mac = [0u8; 32];
        if hex::decode_to_slice(mac_hex, &mut mac).is_err() {
            return Err(bad("not a chained record"));
        }
        let mut m = key.mac();
        m.update(body);
        if m.verify_slice(&mac).is_err() {
            return Err(bad("MAC mismatch: record altered or forged"));
        }
        let mut json = body.to_vec();
        json.push(b'}');
        let header: Header<'_> =
            serde_json::from_slice(&json).map_err(|_| bad("record does not parse"))?;
        if header.seq != n {
            return Err(bad(
                "out of sequence: a record before it was removed, inserted or moved",
            ));
        }
        if header.prev != prev {
            return Err(bad("does not follow the record before it"));
        }
        prev = String::from_utf8_lossy(mac_hex).into_owned();
        if n == anchor.records
            && !bool::from(subtle::ConstantTimeEq::ct_eq(
                prev.as_bytes(),
                anchor.head.as_bytes(),
            ))
        {
            return Err(bad(
                "differs from the anchored record at this position: log replaced or rewritten",
            ));
        }
        visit(n, body);
    }
    if n < anchor.records {
        return Err(AuditError::Tampered {
            record: n + 1,
            reason: "log cut: it ends before the record its anchor names",
        });
    }
    Ok(ChainSummary {
        records: n,
        head: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_log(dir: &Path, n: u64) -> (PathBuf, AuditKey) {
        let path = dir.join("audit.log");
        let key_path = dir.join("audit.key");
        let key = AuditKey::create_file(&key_path).unwrap();
        let log = ChainedAuditLog::open(&path, key).unwrap();
        for i in 0..n {
            let seq = log
                .append(&serde_json::json!({"op": "unwrap", "i": i, "principal": "app"}))
                .unwrap();
            assert_eq!(seq, i + 1);
        }
        drop(log);
        (path, AuditKey::load_file(&key_path).unwrap())
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        fs::write(path, s).unwrap();
    }

    fn failing_record(path: &Path, key: &AuditKey) -> u64 {
        match verify_audit_chain(path, key) {
            Err(AuditError::Tampered { record, .. }) => record,
            other => panic!("expected a verification failure, got {other:?}"),
        }
    }

    #[test]
    fn intact_log_verifies_and_reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = write_log(dir.path(), 5);
        let s = verify_audit_chain(&path, &key).unwrap();
        assert_eq!(s.records, 5);
        let log = ChainedAuditLog::open(&path, key).unwrap();
        assert_eq!(log.append(&"sixth").unwrap(), 6);
        assert_eq!(log.summary().records, 6);
        log.sync().unwrap();
        let key = AuditKey::load_file(dir.path().join("audit.key")).unwrap();
        assert_eq!(verify_audit_chain(&path, &key).unwrap(), log.summary());
    }

    #[test]
    fn edited_record_fails_at_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = write_log(dir.path(), 6);
        let mut l = lines(&path);
        l[3] = l[3].replace("\"principal\":\"app\"", "\"principal\":\"bob\"");
        write_lines(&path, &l);
        assert_eq!(failing_record(&path, &key), 4);
    }

    #[test]
    fn deleted_record_fails_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = write_log(dir.path(), 6);
        let mut l = lines(&path);
        l.remove(2);
        write_lines(&path, &l);
        assert_eq!(failing_record(&path, &key), 3);
    }

    #[test]
    fn reordered_records_fail_at_the_first_moved_one() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = write_log(dir.path(), 6);
        let mut l = lines(&path);
        l.swap(1, 4);
        write_lines(&path, &l);
        assert_eq!(failing_record(&path, &key), 2);
    }

    #[test]
    fn wrong_key_torn_tail_and_refusal_to_continue_a_broken_log() {
        let dir = tempfile::tempdir().unwrap();
        let (path, key) = write_log(dir.path(), 3);
        assert_eq!(failing_record(&path, &AuditKey::generate()), 1);
        let mut bytes = fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 5);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(failing_record(&path, &key), 3);
        let err = ChainedAuditLog::open(&path, key).unwrap_err();
        assert!(
            matches!(err, AuditError::Tampered { record: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn works_as_an_audit_sink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let key = AuditKey::generate();
        let log = ChainedAuditLog::open(&path, key).unwrap();
        log.record(&AuditEvent {
            time: std::time::SystemTime::now(),
            operation: super::super::Operation::Open,
            outcome: super::super::Outcome::Success,
            failure: None,
            principal: "alice",
            purpose: "refund",
            scope: "m-1",
            key_id: None,
            context: None,
        })
        .unwrap();
        assert_eq!(log.summary().records, 1);
        assert!(lines(&path)[0].contains("\"principal\":\"alice\""));
    }
}
