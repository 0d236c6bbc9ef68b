//! The persisted state: master-key checks, custodians' share checks and
//! acknowledgements, and every KEK version sealed under the master key.
//!
//! One file, `state.bin`: `PANSEALD | 0x01 | JSON | SHA-256(all before)`,
//! replaced atomically and durably on every change (write a temporary file,
//! fsync, rename, fsync the folder) before the change is acknowledged. A
//! torn or altered file fails its checksum and the server refuses to start.
//! KEKs inside are AES-256-GCM-sealed under the master key and bound to
//! their environment, scope and version, so a blob moved to another slot
//! does not open at unseal.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use panseal::KeyState;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"PANSEALD";
const VERSION: u8 = 1;

/// Why the state cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("no state at {0}: run `panseal-keyd init` first")]
    Missing(PathBuf),
    #[error("state {path} is corrupt ({what}); refusing to start. Restore it from a backup.")]
    Corrupt { path: PathBuf, what: &'static str },
    #[error("state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One custodian's share: its x coordinate and a salted MAC of the whole
/// share, so a wrong share is refused on its own (the MAC reveals nothing
/// about a 256-bit share).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CustodianShare {
    pub(crate) custodian: String,
    pub(crate) x: u8,
    pub(crate) check: String,
}

/// A custodian's acknowledgement of their responsibilities (PCI DSS 3.7.8).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Acknowledgement {
    pub(crate) custodian: String,
    pub(crate) statement_sha256: String,
    pub(crate) at: u64,
}

/// One KEK version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct KekRecord {
    pub(crate) environment: String,
    pub(crate) scope: String,
    pub(crate) version: u32,
    pub(crate) state: KeyState,
    pub(crate) created_at: u64,
    /// The KEK sealed under the master key (hex); `None` once destroyed.
    pub(crate) sealed: Option<String>,
    pub(crate) destroy_approvals: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) threshold: u8,
    pub(crate) share_salt: String,
    pub(crate) master_check: String,
    pub(crate) shares: Vec<CustodianShare>,
    pub(crate) acknowledgements: Vec<Acknowledgement>,
    pub(crate) keks: Vec<KekRecord>,
    /// Counts writes; never goes back.
    pub(crate) generation: u64,
}

impl State {
    pub(crate) fn acknowledged(&self, custodian: &str) -> bool {
        self.acknowledgements
            .iter()
            .any(|a| a.custodian == custodian)
    }

    pub(crate) fn versions<'a>(
        &'a self,
        environment: &'a str,
        scope: &'a str,
    ) -> impl Iterator<Item = &'a KekRecord> + 'a {
        self.keks
            .iter()
            .filter(move |k| k.environment == environment && k.scope == scope)
    }

    pub(crate) fn version_mut(
        &mut self,
        environment: &str,
        scope: &str,
        version: u32,
    ) -> Option<&mut KekRecord> {
        self.keks
            .iter_mut()
            .find(|k| k.environment == environment && k.scope == scope && k.version == version)
    }
}

pub(crate) fn encode(state: &State) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    // Serialising plain data to a Vec cannot fail.
    out.extend_from_slice(&serde_json::to_vec(state).unwrap_or_default());
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<State, StateError> {
    let corrupt = |what| StateError::Corrupt {
        path: path.to_owned(),
        what,
    };
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
    if body[MAGIC.len()] != VERSION {
        return Err(corrupt("unknown state version"));
    }
    serde_json::from_slice(&body[MAGIC.len() + 1..]).map_err(|_| corrupt("does not parse"))
}

/// The state file and its live copy. Changes are serialised; readers see
/// the last durably written state.
pub(crate) struct StateStore {
    path: PathBuf,
    writer: Mutex<()>,
    live: RwLock<State>,
}

impl StateStore {
    pub(crate) fn open(path: &Path) -> Result<Self, StateError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::Missing(path.to_owned()))
            }
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let state = decode(path, &bytes)?;
        Ok(StateStore {
            path: path.to_owned(),
            writer: Mutex::new(()),
            live: RwLock::new(state),
        })
    }

    pub(crate) fn create(path: &Path, state: &State) -> Result<(), StateError> {
        if path.exists() {
            return Err(StateError::Io {
                path: path.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "state exists; refusing to overwrite",
                ),
            });
        }
        panseal::keyd::write_atomically(path, &encode(state)).map_err(|source| StateError::Io {
            path: path.to_owned(),
            source,
        })
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` to a copy, writes the copy durably, then makes it
    /// live and runs `after` (still serialised with other changes).
    pub(crate) fn mutate<R, E: From<StateError>>(
        &self,
        change: impl FnOnce(&mut State) -> Result<R, E>,
    ) -> Result<R, E> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.read().clone();
        let r = change(&mut next)?;
        next.generation += 1;
        panseal::keyd::write_atomically(&self.path, &encode(&next)).map_err(|source| {
            StateError::Io {
                path: self.path.clone(),
                source,
            }
        })?;
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(r)
    }

    /// Runs `f` while holding the change lock (so the live state cannot
    /// change under it).
    pub(crate) fn exclusive<R>(&self, f: impl FnOnce() -> R) -> R {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        f()
    }
}
