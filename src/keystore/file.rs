//! A crash-safe key store in one file.
//!
//! Every change rewrites the whole file: the new contents go to a temporary
//! file in the same directory, which is fsynced, renamed over the old file,
//! and the directory is fsynced. A crash at any point leaves either the old
//! or the new file, never a mix. The file ends with a SHA-256 of everything
//! before it; a torn or altered file is refused at open with
//! [`KeyStoreError::Corrupt`] and left untouched (never truncated or
//! "repaired").
//!
//! One process owns the file (several threads may share the store). Fleets
//! of application instances use a database-backed store.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::{KeyStore, Records};
use crate::error::KeyStoreError;
use crate::keys::{KeyId, Scope, WrappedDek};

/// File magic: "PANSEAL" + "K" (key store).
pub(crate) const MAGIC: &[u8; 8] = b"PANSEALK";
/// File format version.
pub(crate) const FILE_V1: u8 = 1;

struct Inner {
    path: PathBuf,
    records: Mutex<Records>,
    tmp_counter: AtomicU64,
}

/// A key store in a single file, with atomic, fsynced replacement on every
/// change and an integrity checksum. Cheap to clone; clones share the file.
#[derive(Clone)]
pub struct FileKeyStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FileKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKeyStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl FileKeyStore {
    /// Opens the store at `path`, or starts an empty one if the file does not
    /// exist (it is created at the first change).
    ///
    /// # Errors
    ///
    /// [`KeyStoreError::Corrupt`] if the file fails its checksum or does not
    /// parse (the file is left as it is), or an I/O error.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, KeyStoreError> {
        let path = path.as_ref().to_path_buf();
        let records = match fs::read(&path) {
            Ok(bytes) => decode_file(&bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Records::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(FileKeyStore {
            inner: Arc::new(Inner {
                path,
                records: Mutex::new(records),
                tmp_counter: AtomicU64::new(0),
            }),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Applies `change` to a copy of the records, writes the copy durably,
    /// and only then makes it the live set.
    fn mutate<R>(
        &self,
        change: impl FnOnce(&mut Records) -> Result<(R, bool), KeyStoreError>,
    ) -> Result<R, KeyStoreError> {
        let mut live = self.inner.records.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = live.clone();
        let (result, changed) = change(&mut next)?;
        if changed {
            self.write_atomically(&encode_file(&next))?;
            *live = next;
        }
        Ok(result)
    }

    fn write_atomically(&self, bytes: &[u8]) -> Result<(), KeyStoreError> {
        let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
        write_atomically(&self.inner.path, bytes, n).map_err(KeyStoreError::Io)
    }
}

/// Replaces the file at `path` with `bytes` so that a crash at any point
/// leaves either the old or the new contents: write a temporary file in the
/// same directory, fsync it, rename it over `path`, fsync the directory.
/// `n` distinguishes concurrent temporary files of one process.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], n: u64) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keystore".into());
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()?;
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// `MAGIC | version u8 | count u32 | (len u32 | record)* | SHA-256(all before)`.
pub(crate) fn encode_file(records: &Records) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(FILE_V1);
    out.extend_from_slice(&(records.map.len() as u32).to_be_bytes());
    for r in records.map.values() {
        let b = r.to_bytes();
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(&b);
    }
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Strict decoding of a key-store file. Never panics.
pub(crate) fn decode_file(bytes: &[u8]) -> Result<Records, KeyStoreError> {
    let corrupt = |what: &str| KeyStoreError::Corrupt(what.to_owned());
    if bytes.len() < MAGIC.len() + 1 + 4 + 32 {
        return Err(corrupt("file too short (torn write?)"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if &body[..MAGIC.len()] != MAGIC {
        return Err(corrupt("not a panseal key-store file"));
    }
    let computed = Sha256::digest(body);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(computed.as_slice(), digest)) {
        return Err(corrupt("checksum mismatch (torn or altered file)"));
    }
    if body[MAGIC.len()] != FILE_V1 {
        return Err(corrupt("unknown file version"));
    }
    let mut rest = &body[MAGIC.len() + 1..];
    let count = take_u32(&mut rest).ok_or_else(|| corrupt("record count"))?;
    let mut records = Records::default();
    for _ in 0..count {
        let len = take_u32(&mut rest).ok_or_else(|| corrupt("record length"))? as usize;
        if rest.len() < len {
            return Err(corrupt("record length"));
        }
        let (rec, tail) = rest.split_at(len);
        rest = tail;
        let record =
            WrappedDek::from_bytes(rec).map_err(|e| KeyStoreError::Corrupt(e.to_string()))?;
        if records.map.insert(record.id, record).is_some() {
            return Err(corrupt("duplicate record id"));
        }
    }
    if !rest.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(records)
}

fn take_u32(b: &mut &[u8]) -> Option<u32> {
    if b.len() < 4 {
        return None;
    }
    let (h, t) = b.split_at(4);
    *b = t;
    Some(u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
}

#[async_trait]
impl KeyStore for FileKeyStore {
    async fn insert(&self, record: &WrappedDek) -> Result<(), KeyStoreError> {
        self.mutate(|r| r.insert(record).map(|()| ((), true)))
    }

    async fn fetch(&self, id: KeyId) -> Result<Option<WrappedDek>, KeyStoreError> {
        let live = self.inner.records.lock().unwrap_or_else(|p| p.into_inner());
        Ok(live.map.get(&id).cloned())
    }

    async fn list(&self, scope: Option<&Scope>) -> Result<Vec<WrappedDek>, KeyStoreError> {
        let live = self.inner.records.lock().unwrap_or_else(|p| p.into_inner());
        Ok(live.list(scope))
    }

    async fn update(&self, previous: &WrappedDek, next: &WrappedDek) -> Result<(), KeyStoreError> {
        self.mutate(|r| r.update(previous, next).map(|()| ((), true)))
    }
}
