//! The persisted state and the checks that keep it from being rolled back.
//!
//! Files (`FORMAT.md`, "keyd state", version 2):
//!
//! * `state.bin`: a snapshot, `PANSEALD | 0x02 | JSON | HMAC | SHA-256`,
//!   the HMAC under a subkey of the master key. Replaced atomically.
//! * `state.journal`: one authenticated, chained line per change since the
//!   snapshot (a change rewrites only the records it touches, so its cost
//!   does not grow with the number of scopes); folded into a new snapshot
//!   every [`COMPACT_AFTER`] entries, at a re-share and at the version 1
//!   migration (not at every unseal).
//! * `state.anchor` (in `anchor_dir`, ideally another file system): the
//!   newest generation and head MAC, rewritten after every change. Every
//!   change is also recorded as a `state-commit` record in the audit log.
//!   At start the state must be at least as new as both; otherwise it was
//!   rolled back and keyd refuses to start. At unseal the anchor's MAC
//!   must verify (or, for an anchor older than the state, the audit log
//!   must hold the `state-commit` record it repeats: a crash during a
//!   re-share leaves an anchor under the old master key).
//! * `keyd.lock`: held (`flock`, exclusive) while a keyd uses the folder.
//!
//! Acknowledgements given while sealed are held in memory only (nothing
//! authenticates a file written while sealed) and folded into the journal
//! at unseal; a restart while sealed drops them. A leftover
//! `acknowledgements.pending` from an earlier build is ignored.
//!
//! Version 1 (`PANSEALD | 0x01 | JSON | SHA-256`, no MAC) is still read,
//! only where no version 2 state ever was (no `state.anchor`,
//! `audit.anchor`, `state.journal`, nor a `state-commit` audit record), and
//! is rewritten as version 2 at the first unseal.
//!
//! Version 3 (`PANSEALD | 0x03 | …`, MAC label `panseal-keyd-state-v3`)
//! adds blind-index keys, record-MAC keys and the record registry; journal
//! and anchor keep their encoding, and a journal change of a version 3 kind
//! after a version 1 or 2 snapshot is refused. A version 2 state is
//! rewritten as version 3 at the first unseal (one atomic snapshot, as the
//! version 1 migration); every later snapshot is version 3.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use crate::state_file::{
    self as fmt, Acknowledgement, Anchor, AuditPosition, Change, DekRecord, FormatError,
    IndexScopeRecord, IngestScopeRecord, JournalEntry, JournalHeader, RecordKeyRecord,
    RegistryEntry, ScopeRecord, State, StateKeys,
};
use panseal::{ChainSummary, ChainedAuditLog};

/// Journal entries after which the state is rewritten as one snapshot.
pub(crate) const COMPACT_AFTER: usize = 1024;

/// Why the state cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("no state at {0}: run `panseal-keyd init` first")]
    Missing(PathBuf),
    #[error("state {path} is corrupt ({what}); refusing to start. Restore it from a backup.")]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "state rolled back: {path} is at generation {state} but {witness} records generation \
         {anchored}; refusing to start (an older copy of the state was restored, or another keyd \
         wrote it). Restore the newest state; do not delete the anchor"
    )]
    RolledBack {
        path: PathBuf,
        state: u64,
        anchored: u64,
        witness: String,
    },
    #[error(
        "state rolled back: {path} is version 1, but {trace} exists, so a version 2 state was \
         written here; refusing to start (a pre-upgrade backup was restored). Restore the \
         newest state"
    )]
    Version1AfterVersion2 { path: PathBuf, trace: String },
    #[error("{0}")]
    Unauthentic(String),
    /// The data directory, audit key or anchors come from another keyd
    /// (a backup restored into the wrong place).
    #[error(
        "state/backup belongs to another keyd: {0}; refusing to start (nothing changed). \
         Restore this keyd's own backup of each (README \"Backup and recovery\")"
    )]
    OtherKeyd(String),
    #[error("another panseal-keyd holds {0} (one keyd per data directory); refusing to start")]
    Locked(PathBuf),
    #[error("state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the state files live.
#[derive(Clone, Debug)]
pub(crate) struct Paths {
    pub(crate) state: PathBuf,
    pub(crate) journal: PathBuf,
    pub(crate) anchor: PathBuf,
    pub(crate) audit_anchor: PathBuf,
    /// Written by earlier builds; never read (unauthenticated), removed
    /// at unseal.
    pub(crate) pending: PathBuf,
    pub(crate) lock: PathBuf,
}

impl Paths {
    pub(crate) fn new(data_dir: &Path, anchor_dir: &Path) -> Paths {
        Paths {
            state: data_dir.join("state.bin"),
            journal: data_dir.join("state.journal"),
            anchor: anchor_dir.join("state.anchor"),
            audit_anchor: anchor_dir.join("audit.anchor"),
            pending: data_dir.join("acknowledgements.pending"),
            lock: data_dir.join("keyd.lock"),
        }
    }
}

/// The exclusive lock on a data directory, held while the value lives.
pub(crate) struct DirLock {
    #[cfg(target_os = "linux")]
    _flock: nix::fcntl::Flock<File>,
    #[cfg(not(target_os = "linux"))]
    _file: File,
}

impl DirLock {
    pub(crate) fn take(path: &Path) -> Result<DirLock, StateError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        #[cfg(target_os = "linux")]
        {
            let flock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|_| StateError::Locked(path.to_owned()))?;
            Ok(DirLock { _flock: flock })
        }
        #[cfg(not(target_os = "linux"))]
        {
            Ok(DirLock { _file: file })
        }
    }
}

/// What was read at start and can only be authenticated once the master
/// key is known (at unseal).
struct Unverified {
    snapshot: fmt::Snapshot,
    entries: Vec<JournalEntry>,
    anchor: Option<Anchor>,
}

struct Writer {
    journal: Option<File>,
    head: [u8; 32],
    entries: usize,
}

/// The state files and their live copy. Changes are serialised; readers see
/// the last durably written state.
pub(crate) struct StateStore {
    paths: Paths,
    writer: Mutex<Writer>,
    live: RwLock<State>,
    /// The format on disk: 1 until the migration writes version 2.
    version: AtomicU8,
    unverified: Mutex<Option<Unverified>>,
    /// Set at start when the audit log holds a `state-commit` record with
    /// the anchor's generation and head.
    anchor_vouched: AtomicBool,
    /// Acknowledgements given over mutual TLS while sealed (memory only).
    pending: Mutex<BTreeMap<String, Acknowledgement>>,
    /// Set at unseal (authenticate); taken after the change lock, never
    /// held across it.
    keys: Mutex<Option<StateKeys>>,
    _lock: DirLock,
}

/// The changes one [`StateStore::mutate`] makes, copy-on-write over the
/// live state.
pub(crate) struct Draft<'a> {
    base: &'a State,
    scopes: BTreeMap<String, ScopeRecord>,
    deks: BTreeMap<String, DekRecord>,
    acks: Vec<Acknowledgement>,
    index_keys: BTreeMap<String, IndexScopeRecord>,
    record_keys: BTreeMap<String, RecordKeyRecord>,
    registry: BTreeMap<String, RegistryEntry>,
    ingest_keys: BTreeMap<String, IngestScopeRecord>,
}

impl Draft<'_> {
    pub(crate) fn ingest_scope(&self, key: &str) -> Option<&IngestScopeRecord> {
        self.ingest_keys
            .get(key)
            .or_else(|| self.base.ingest_keys.get(key))
    }

    pub(crate) fn put_ingest_scope(&mut self, key: &str, r: IngestScopeRecord) {
        self.ingest_keys.insert(key.to_owned(), r);
    }

    pub(crate) fn scope(&self, key: &str) -> Option<&ScopeRecord> {
        self.scopes.get(key).or_else(|| self.base.scopes.get(key))
    }

    pub(crate) fn scope_mut(&mut self, key: &str) -> Option<&mut ScopeRecord> {
        if !self.scopes.contains_key(key) {
            let r = self.base.scopes.get(key)?.clone();
            self.scopes.insert(key.to_owned(), r);
        }
        self.scopes.get_mut(key)
    }

    pub(crate) fn put_scope(&mut self, key: &str, r: ScopeRecord) {
        self.scopes.insert(key.to_owned(), r);
    }

    pub(crate) fn dek(&self, key: &str) -> Option<&DekRecord> {
        self.deks.get(key).or_else(|| self.base.deks.get(key))
    }

    pub(crate) fn put_dek(&mut self, key: &str, r: DekRecord) {
        self.deks.insert(key.to_owned(), r);
    }

    pub(crate) fn acknowledge(&mut self, a: Acknowledgement) {
        self.acks.push(a);
    }

    pub(crate) fn index_scope(&self, key: &str) -> Option<&IndexScopeRecord> {
        self.index_keys
            .get(key)
            .or_else(|| self.base.index_keys.get(key))
    }

    pub(crate) fn put_index_scope(&mut self, key: &str, r: IndexScopeRecord) {
        self.index_keys.insert(key.to_owned(), r);
    }

    pub(crate) fn record_key(&self, environment: &str) -> Option<&RecordKeyRecord> {
        self.record_keys
            .get(environment)
            .or_else(|| self.base.record_keys.get(environment))
    }

    pub(crate) fn put_record_key(&mut self, environment: &str, r: RecordKeyRecord) {
        self.record_keys.insert(environment.to_owned(), r);
    }

    pub(crate) fn registry(&self, key: &str) -> Option<&RegistryEntry> {
        self.registry
            .get(key)
            .or_else(|| self.base.registry.get(key))
    }

    pub(crate) fn put_registry(&mut self, key: &str, e: RegistryEntry) {
        self.registry.insert(key.to_owned(), e);
    }

    fn into_changes(self) -> Vec<Change> {
        let mut out: Vec<Change> = self
            .acks
            .into_iter()
            .map(|value| Change::Acknowledgement { value })
            .collect();
        out.extend(
            self.scopes
                .into_iter()
                .map(|(key, value)| Change::Scope { key, value }),
        );
        out.extend(
            self.deks
                .into_iter()
                .map(|(key, value)| Change::Dek { key, value }),
        );
        out.extend(
            self.index_keys
                .into_iter()
                .map(|(key, value)| Change::IndexScope { key, value }),
        );
        out.extend(
            self.record_keys
                .into_iter()
                .map(|(key, value)| Change::RecordKey { key, value }),
        );
        out.extend(
            self.registry
                .into_iter()
                .map(|(key, value)| Change::Registry { key, value }),
        );
        out.extend(
            self.ingest_keys
                .into_iter()
                .map(|(key, value)| Change::IngestScope { key, value }),
        );
        out
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl StateStore {
    /// Locks the folder and reads the state (snapshot, journal, anchor)
    /// without the master key: structure, chain links and generations are
    /// checked now, MACs at [`StateStore::authenticate`].
    ///
    /// `same_keyd` runs on the state before the anchors are compared with
    /// it (so another keyd's backup is named as such, not as a rollback);
    /// nothing is written when it refuses.
    pub(crate) fn open_with(
        paths: &Paths,
        same_keyd: impl FnOnce(&State) -> Result<(), StateError>,
    ) -> Result<Self, StateError> {
        let lock = DirLock::take(&paths.lock)?;
        let corrupt = |path: &Path, e: FormatError| StateError::Corrupt {
            path: path.to_owned(),
            what: e.to_string(),
        };
        let bytes =
            read_optional(&paths.state)?.ok_or_else(|| StateError::Missing(paths.state.clone()))?;
        let snapshot =
            fmt::decode_snapshot(&bytes, now_secs()).map_err(|e| corrupt(&paths.state, e))?;
        if snapshot.version == fmt::V1 {
            // Version 1 has no MAC (its generation is anyone's to set): it
            // is read only where version 2 never ran.
            for trace in [&paths.anchor, &paths.audit_anchor, &paths.journal] {
                let exists = std::fs::symlink_metadata(trace)
                    .map(|_| true)
                    .or_else(|e| match e.kind() {
                        std::io::ErrorKind::NotFound => Ok(false),
                        _ => Err(e),
                    })
                    .map_err(io(trace))?;
                if exists {
                    return Err(StateError::Version1AfterVersion2 {
                        path: paths.state.clone(),
                        trace: trace.display().to_string(),
                    });
                }
            }
        }
        let mut state = snapshot.state.clone();
        let mut head = snapshot.mac;
        let mut entries = Vec::new();
        if let Some(j) = read_optional(&paths.journal)? {
            let (parsed, good) = fmt::parse_journal(&j).map_err(|e| corrupt(&paths.journal, e))?;
            if good < j.len() {
                // A torn append: never acknowledged, cut it off.
                let f = OpenOptions::new()
                    .write(true)
                    .open(&paths.journal)
                    .map_err(io(&paths.journal))?;
                f.set_len(good as u64).map_err(io(&paths.journal))?;
                f.sync_all().map_err(io(&paths.journal))?;
            }
            for e in parsed {
                if e.header.generation <= snapshot.state.generation {
                    // Left over from before the last snapshot.
                    continue;
                }
                if e.header.generation != state.generation + 1 || e.header.prev != hex::encode(head)
                {
                    return Err(corrupt(
                        &paths.journal,
                        FormatError::Corrupt("journal entry out of sequence (removed or moved)"),
                    ));
                }
                if snapshot.version < fmt::V3 && e.header.changes.iter().any(Change::is_v3) {
                    return Err(corrupt(
                        &paths.journal,
                        FormatError::Corrupt("version 3 change after a version 2 snapshot"),
                    ));
                }
                if snapshot.version < fmt::V4 && e.header.changes.iter().any(Change::is_v4) {
                    return Err(corrupt(
                        &paths.journal,
                        FormatError::Corrupt("version 4 change after a version 2 or 3 snapshot"),
                    ));
                }
                state.generation = e.header.generation;
                state.audit = e.header.audit.clone();
                for c in e.header.changes.iter().cloned() {
                    state.apply(c);
                }
                head = e.mac;
                entries.push(e);
            }
        }
        same_keyd(&state)?;
        let anchor = match read_optional(&paths.anchor)? {
            Some(b) => Some(Anchor::parse(&b).map_err(|e| corrupt(&paths.anchor, e))?),
            None => None,
        };
        match &anchor {
            Some(a) if a.generation > state.generation => {
                return Err(StateError::RolledBack {
                    path: paths.state.clone(),
                    state: state.generation,
                    anchored: a.generation,
                    witness: format!("the anchor {}", paths.anchor.display()),
                })
            }
            Some(a) if a.generation == state.generation && a.head != hex::encode(head) => {
                return Err(StateError::RolledBack {
                    path: paths.state.clone(),
                    state: state.generation,
                    anchored: a.generation,
                    witness: format!(
                        "the anchor {} (same generation, other contents: a forked copy)",
                        paths.anchor.display()
                    ),
                })
            }
            None if snapshot.version != fmt::V1 => {
                return Err(StateError::Unauthentic(format!(
                    "the anchor {} is missing (deleted?): without it a restored older state \
                     cannot be told apart; refusing to start. Restore it (it is kept by \
                     anchor_dir) or see README \"Backup and recovery\"",
                    paths.anchor.display()
                )))
            }
            _ => {}
        }
        let n = entries.len();
        Ok(StateStore {
            paths: paths.clone(),
            writer: Mutex::new(Writer {
                journal: None,
                head,
                entries: n,
            }),
            keys: Mutex::new(None),
            live: RwLock::new(state),
            version: AtomicU8::new(snapshot.version),
            unverified: Mutex::new(Some(Unverified {
                snapshot,
                entries,
                anchor,
            })),
            anchor_vouched: AtomicBool::new(false),
            pending: Mutex::new(BTreeMap::new()),
            _lock: lock,
        })
    }

    /// Writes the first state of a new server (version 4) and its anchor.
    pub(crate) fn create(paths: &Paths, state: &State, keys: &StateKeys) -> Result<(), StateError> {
        if paths.state.exists() {
            return Err(StateError::Io {
                path: paths.state.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "state exists; refusing to overwrite",
                ),
            });
        }
        let (bytes, mac) = fmt::encode_snapshot(state, keys);
        panseal::keyd::server::write_atomically(&paths.state, &bytes).map_err(io(&paths.state))?;
        let _ = std::fs::remove_file(&paths.journal);
        panseal::keyd::server::write_atomically(
            &paths.anchor,
            &Anchor::new(keys, state.generation, &mac).encode(),
        )
        .map_err(io(&paths.anchor))
    }

    /// The format version on disk (1, 2 or 3 until migrated, then 4).
    pub(crate) fn version(&self) -> u8 {
        self.version.load(Ordering::SeqCst)
    }

    /// The anchor read at start (generation, head), not yet authenticated.
    pub(crate) fn anchor_claim(&self) -> Option<(u64, String)> {
        let u = self.unverified.lock().unwrap_or_else(|p| p.into_inner());
        u.as_ref()?
            .anchor
            .as_ref()
            .map(|a| (a.generation, a.head.clone()))
    }

    /// The authenticated audit log holds a `state-commit` record with the
    /// anchor's generation and head: the anchor repeats what keyd wrote.
    pub(crate) fn vouch_anchor(&self) {
        self.anchor_vouched.store(true, Ordering::SeqCst);
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `custodian` acknowledged: on record (authenticated at
    /// unseal: a forged record fails the state's MAC), or over mutual TLS
    /// while this process was sealed.
    pub(crate) fn acknowledged(&self, custodian: &str) -> bool {
        self.read().acknowledgements.contains_key(custodian)
            || self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(custodian)
    }

    /// Authenticates what was read at start under the master key's
    /// subkeys; from then on changes can be written. Idempotent.
    pub(crate) fn authenticate(&self, keys: &StateKeys) -> Result<(), StateError> {
        let mut u = self.unverified.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(un) = u.as_ref() {
            let bad = |e: FormatError| StateError::Unauthentic(format!("{e}; refusing to unseal"));
            un.snapshot.verify(keys).map_err(bad)?;
            for e in &un.entries {
                e.verify(keys).map_err(bad)?;
            }
            // Every anchor must verify. One older than the state is a
            // crash between writing the state and the anchor; after a
            // re-share it is under the old master key, so it may instead
            // be vouched for by its `state-commit` audit record (written
            // before it, authenticated under the audit key the now
            // authenticated state names).
            if let Some(a) = &un.anchor {
                // Exactly the shape a re-share leaves: the state is a
                // snapshot one generation past the anchor, written by a
                // re-share (epoch > 0), with no journal entry after it.
                let reshare_crash = a.generation + 1 == self.read().generation
                    && un.entries.is_empty()
                    && un.snapshot.state.share_epoch > 0;
                if a.verify(keys).is_err()
                    && !(reshare_crash && self.anchor_vouched.load(Ordering::SeqCst))
                {
                    return Err(StateError::Unauthentic(format!(
                        "the anchor {} (generation {}) fails authentication under the master \
                         key and no state-commit audit record vouches for it: forged; \
                         refusing to unseal. Restore the anchor and state from the newest \
                         backup",
                        self.paths.anchor.display(),
                        a.generation
                    )));
                }
            }
        }
        *u = None;
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = Some(keys.clone());
        Ok(())
    }

    /// Forgets the subkeys (sealing): no change is written until the next
    /// unseal authenticates again.
    pub(crate) fn forget_keys(&self) {
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Records an acknowledgement given over mutual TLS while sealed (in
    /// memory: no key authenticates a file yet).
    pub(crate) fn acknowledge_sealed(&self, a: Acknowledgement) {
        let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        p.insert(a.custodian.clone(), a);
    }

    /// Folds acknowledgements given while sealed into the journal (and
    /// removes a leftover `acknowledgements.pending` of an earlier build).
    pub(crate) fn fold_pending(&self, audit: &ChainedAuditLog) -> Result<(), StateError> {
        let _ = std::fs::remove_file(&self.paths.pending);
        let acks: Vec<Acknowledgement> = {
            let p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.values().cloned().collect()
        };
        if acks.is_empty() {
            return Ok(());
        }
        self.mutate(audit, |d| {
            for a in acks {
                d.acknowledge(a);
            }
            Ok::<_, StateError>(())
        })?;
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    /// Applies `change` (copy-on-write), appends it durably to the journal,
    /// makes it live, records a `state-commit` audit record and rewrites
    /// the anchor. Needs [`StateStore::authenticate`] first.
    pub(crate) fn mutate<R, E: From<StateError>>(
        &self,
        audit: &ChainedAuditLog,
        change: impl FnOnce(&mut Draft<'_>) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (r, changes) = {
            let live = self.read();
            let mut d = Draft {
                base: &live,
                scopes: BTreeMap::new(),
                deks: BTreeMap::new(),
                acks: Vec::new(),
                index_keys: BTreeMap::new(),
                record_keys: BTreeMap::new(),
                registry: BTreeMap::new(),
                ingest_keys: BTreeMap::new(),
            };
            let r = change(&mut d)?;
            (r, d.into_changes())
        };
        if changes.is_empty() {
            return Ok(r);
        }
        let keys = match self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(k) => k,
            None => {
                return Err(StateError::Unauthentic(
                    "state is not authenticated yet (sealed)".into(),
                )
                .into())
            }
        };
        let generation = self.read().generation + 1;
        let pos = audit.summary();
        let header = JournalHeader {
            generation,
            prev: hex::encode(w.head),
            audit: AuditPosition {
                records: pos.records,
                head: pos.head,
            },
            changes,
        };
        let (line, mac) = fmt::encode_journal_entry(&header, &keys);
        if w.journal.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.paths.journal)
                .map_err(io(&self.paths.journal))?;
            w.journal = Some(f);
            sync_dir(&self.paths.journal);
        }
        if let Some(f) = w.journal.as_mut() {
            f.write_all(&line)
                .and_then(|()| f.sync_data())
                .map_err(io(&self.paths.journal))?;
        }
        {
            let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
            live.generation = generation;
            live.audit = header.audit.clone();
            for c in header.changes {
                live.apply(c);
            }
        }
        w.head = mac;
        w.entries += 1;
        self.after_commit(&w, &keys, audit, generation)?;
        if w.entries >= COMPACT_AFTER {
            self.compact_locked(&mut w, audit, None)?;
        }
        Ok(r)
    }

    /// Audit record and anchor after a change at `generation`.
    fn after_commit(
        &self,
        w: &Writer,
        keys: &StateKeys,
        audit: &ChainedAuditLog,
        generation: u64,
    ) -> Result<(), StateError> {
        let rec = serde_json::json!({
            "time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            "principal": "panseal-keyd",
            "origin": "local",
            "operation": "state-commit",
            "state_generation": generation,
            "state_head": hex::encode(w.head),
            "outcome": "success",
        });
        audit
            .append(&rec)
            .and_then(|_| audit.write_anchor(&self.paths.audit_anchor))
            .map_err(|e| StateError::Io {
                path: audit.path().to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?;
        panseal::keyd::server::write_atomically(
            &self.paths.anchor,
            &Anchor::new(keys, generation, &w.head).encode(),
        )
        .map_err(io(&self.paths.anchor))
    }

    /// Rewrites the whole state as one snapshot: `prepare` computes the new
    /// state and keys from the current one (re-sharing, the version 1 and
    /// 2 migrations); `then` runs after the write, still under the change lock.
    pub(crate) fn replace_with<E: From<StateError>>(
        &self,
        audit: &ChainedAuditLog,
        prepare: impl FnOnce(&State) -> Result<(State, StateKeys), E>,
        then: impl FnOnce(),
    ) -> Result<(), E> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let replace = {
            let current = self.read();
            prepare(&current)?
        };
        self.compact_locked(&mut w, audit, Some(replace))?;
        then();
        Ok(())
    }

    fn compact_locked(
        &self,
        w: &mut Writer,
        audit: &ChainedAuditLog,
        replace: Option<(State, StateKeys)>,
    ) -> Result<(), StateError> {
        let mut next = match &replace {
            Some((s, _)) => s.clone(),
            None => self.read().clone(),
        };
        let keys = match replace {
            Some((_, k)) => k,
            None => self
                .keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .ok_or_else(|| StateError::Unauthentic("state is not authenticated".into()))?,
        };
        next.generation = self.read().generation.max(next.generation) + 1;
        let pos = audit.summary();
        next.audit = AuditPosition {
            records: pos.records,
            head: pos.head,
        };
        let (bytes, mac) = fmt::encode_snapshot(&next, &keys);
        panseal::keyd::server::write_atomically(&self.paths.state, &bytes)
            .map_err(io(&self.paths.state))?;
        self.version.store(fmt::V4, Ordering::SeqCst);
        // Entries of the old journal are older than the snapshot: ignored
        // at load, then dropped here.
        w.journal = None;
        panseal::keyd::server::write_atomically(&self.paths.journal, b"")
            .map_err(io(&self.paths.journal))?;
        let generation = next.generation;
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = next;
        w.head = mac;
        w.entries = 0;
        self.after_commit(w, &keys, audit, generation)?;
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = Some(keys);
        Ok(())
    }

    /// Runs `f` while holding the change lock (so the live state cannot
    /// change under it).
    pub(crate) fn exclusive<R>(&self, f: impl FnOnce() -> R) -> R {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// The audit position the state vouches for (unauthenticated until
    /// unseal; a forged one fails then).
    pub(crate) fn audit_anchor(&self) -> ChainSummary {
        let s = self.read();
        if s.audit.records == 0 {
            return ChainSummary::genesis();
        }
        ChainSummary {
            records: s.audit.records,
            head: s.audit.head.clone(),
        }
    }
}
