//! Moving a stored blind-index column to the scope's newest index-key
//! version (feature `postgres`), as the `reindex` custodian tool does.
//!
//! After a custodian creates a new index-key version inside the key
//! service ([`KeyService::create_index_key`]), rows still carry values
//! under older versions (or legacy values made with the old in-database
//! index keys). This job walks the table in primary-key order and, per
//! batch of rows:
//!
//! 1. opens each row's sealed PAN ([`Panseal::open_pan`], audited under the
//!    job's [`Access`]): the job therefore needs a **bulk credential with
//!    `unwrap`** (to open) **and `index`** (to hash) — the crown-jewel
//!    credential of DESIGN.md, for the duration of the job only;
//! 2. asks the key service for every new value in **one**
//!    [`KeyService::blind_index`] request (one quota charge and one audit
//!    record per batch, never a PAN);
//! 3. writes the values that changed with a compare-and-set on the old
//!    index value, version and sealed value (an application that rewrote a
//!    row meanwhile wins: its value is current anyway), together with the
//!    job's checkpoint, in one transaction.
//!
//! A crash or `kill -9` at any moment leaves either a whole batch done and
//! recorded or none of it; a new run resumes after the last committed batch
//! and neither redoes nor skips rows. Because every value is recomputed from
//! the PAN, legacy values (made by the old in-database index keys, which may
//! carry the same version number) are migrated too, and a second run
//! changes nothing. If the newest version changes while a job is
//! interrupted, the next run starts over for the new version.
//!
//! Requirements on the table: a `bigint` (or smaller integer) primary key;
//! contexts built as `Context::new(context_table, context_column, id as
//! decimal text)`; the index value as 64 lowercase hex digits (`char(64)`/
//! `text`, as `payments_backend` and `breach_drill` store it) or 32 bytes
//! (`bytea`); an `integer` version column; optionally a key-id column
//! (16 hex digits, as [`crate::BlindIndex::key_id`] prints).

use std::sync::Arc;

use serde::Serialize;

use crate::access::Access;
use crate::context::Context;
use crate::error::{Error, KeyServiceError};
use crate::format::SealedPan;
use crate::keys::KeyState;
use crate::keyservice::KeyService;
use crate::keystore::postgres::PostgresKeyStore;
use crate::pan::Pan;
use crate::reencrypt::SealedForm;
use crate::Panseal;

/// How index values are stored in the column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexForm {
    /// 64 lowercase hex digits (`char(64)` / `text`).
    Hex,
    /// 32 bytes (`bytea`).
    Binary,
}

/// What can stop a re-index job. Nothing committed before the error is
/// lost; the next run resumes from the last checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReindexError {
    /// The job's settings are unusable (bad identifier, batch size).
    #[error("re-index job configuration: {0}")]
    Config(String),
    /// The scope has no active index-key version (a custodian must create
    /// one in the key service first).
    #[error("scope {0} has no active index key in the key service")]
    NoActiveIndexKey(String),
    /// A row's sealed PAN did not open (altered, wrong context, key
    /// destroyed). The row is named by its id; the job stops and the row is
    /// left as it is.
    #[error("row {id}: sealed PAN did not open: {source}")]
    Open {
        /// The row's primary key.
        id: i64,
        /// Why (never a PAN).
        #[source]
        source: Error,
    },
    /// A row holds something that is not a sealed PAN or an index value.
    #[error("row {id}: malformed {what}")]
    Malformed {
        /// The row's primary key.
        id: i64,
        /// Which column.
        what: &'static str,
    },
    /// The key service refused or failed the batch's keyed hashes
    /// ([`KeyServiceError::is_retryable`] tells an outage).
    #[error("key service: {0}")]
    KeyService(#[from] KeyServiceError),
    /// The database failed.
    #[error("database: {0}")]
    Database(String),
    /// Another panseal error (key store, configuration).
    #[error(transparent)]
    Panseal(#[from] Error),
}

impl ReindexError {
    /// Whether running the job again later can help (an outage).
    pub fn is_retryable(&self) -> bool {
        match self {
            ReindexError::KeyService(e) => e.is_retryable(),
            ReindexError::Database(_) => true,
            ReindexError::Panseal(e) => e.is_retryable(),
            _ => false,
        }
    }
}

fn db(e: tokio_postgres::Error) -> ReindexError {
    ReindexError::Database(e.to_string())
}

fn pool(e: deadpool_postgres::PoolError) -> ReindexError {
    ReindexError::Database(e.to_string())
}

/// One re-index job.
#[derive(Clone, Debug)]
pub struct ReindexJob {
    /// The job's name: its checkpoint is kept under it.
    pub name: String,
    /// The table.
    pub table: String,
    /// Its integer primary-key column.
    pub id_column: String,
    /// The column holding sealed PANs.
    pub sealed_column: String,
    /// Text or binary sealed form.
    pub sealed_form: SealedForm,
    /// The column holding the index value.
    pub index_column: String,
    /// Hex or binary index form.
    pub index_form: IndexForm,
    /// The `integer` column holding the index-key version.
    pub version_column: String,
    /// Optional column holding the index key's id (16 hex digits).
    pub key_id_column: Option<String>,
    /// The table name used in the sealing context.
    pub context_table: String,
    /// The column name used in the sealing context.
    pub context_column: String,
    /// Rows per batch (one transaction and one keyed-hash request each).
    pub batch_size: i64,
}

/// Where a job stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReindexProgress {
    /// The index-key version rows are moved to.
    pub target_version: u32,
    /// Rows read.
    pub scanned: u64,
    /// Rows whose index value or version was rewritten.
    pub updated: u64,
    /// Rows already holding the target version's value.
    pub unchanged: u64,
    /// Rows the application changed between read and write (left as the
    /// application wrote them).
    pub skipped_concurrent: u64,
    /// The last primary key committed.
    pub last_id: Option<i64>,
    /// Whether the whole table has been walked.
    pub finished: bool,
}

/// What a job would do (dry run: counts only, nothing opened or changed).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ReindexPlan {
    /// The newest active index-key version.
    pub target_version: u32,
    /// Rows after the checkpoint (with a sealed PAN).
    pub remaining_rows: u64,
    /// Of those, rows whose stored version differs from the target.
    pub remaining_on_other_versions: u64,
    /// Whether a checkpoint for another target version will be discarded.
    pub restarts: bool,
}

const CHECKPOINT_DDL: &str = "CREATE TABLE IF NOT EXISTS panseal_reindex_checkpoints (
        job            text PRIMARY KEY,
        target_version integer NOT NULL,
        last_id        bigint NOT NULL,
        scanned        bigint NOT NULL,
        updated        bigint NOT NULL,
        unchanged      bigint NOT NULL,
        skipped        bigint NOT NULL,
        updated_at     timestamptz NOT NULL DEFAULT now()
    )";

impl ReindexJob {
    fn check(&self) -> Result<(), ReindexError> {
        let mut idents = vec![
            &self.table,
            &self.id_column,
            &self.sealed_column,
            &self.index_column,
            &self.version_column,
        ];
        if let Some(k) = &self.key_id_column {
            idents.push(k);
        }
        for ident in idents {
            crate::keystore::postgres::check_ident(ident)
                .map_err(|e| ReindexError::Config(e.to_string()))?;
        }
        if self.batch_size < 1 {
            return Err(ReindexError::Config("batch size must be >= 1".into()));
        }
        Ok(())
    }

    /// The newest active index-key version of `panseal`'s scope.
    ///
    /// # Errors
    ///
    /// [`ReindexError::NoActiveIndexKey`], key-service errors.
    pub async fn target_version(
        &self,
        panseal: &Panseal,
        ks: &dyn KeyService,
    ) -> Result<u32, ReindexError> {
        ks.index_keys(panseal.scope())
            .await?
            .iter()
            .filter(|k| k.state == KeyState::Active)
            .map(|k| k.version)
            .max()
            .ok_or_else(|| ReindexError::NoActiveIndexKey(panseal.scope().to_string()))
    }

    async fn ensure_table(&self, store: &PostgresKeyStore) -> Result<(), ReindexError> {
        store.ready_public().await.map_err(Error::from)?;
        let c = store.pool().get().await.map_err(pool)?;
        match c.batch_execute(CHECKPOINT_DDL).await {
            Ok(()) => Ok(()),
            // Two jobs creating it at once: the other one won.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                Ok(())
            }
            Err(e) => Err(db(e)),
        }
    }

    /// The committed checkpoint (default if none).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn checkpoint(
        &self,
        store: &PostgresKeyStore,
    ) -> Result<ReindexProgress, ReindexError> {
        self.ensure_table(store).await?;
        let c = store.pool().get().await.map_err(pool)?;
        let row = c
            .query_opt(
                "SELECT target_version, last_id, scanned, updated, unchanged, skipped
                 FROM panseal_reindex_checkpoints WHERE job = $1",
                &[&self.name],
            )
            .await
            .map_err(db)?;
        Ok(row
            .map(|r| ReindexProgress {
                target_version: r.get::<_, i32>(0) as u32,
                last_id: Some(r.get(1)),
                scanned: r.get::<_, i64>(2) as u64,
                updated: r.get::<_, i64>(3) as u64,
                unchanged: r.get::<_, i64>(4) as u64,
                skipped_concurrent: r.get::<_, i64>(5) as u64,
                finished: false,
            })
            .unwrap_or_default())
    }

    /// Counts what a run would do; opens and changes nothing.
    ///
    /// # Errors
    ///
    /// Database and key-service errors.
    pub async fn plan(
        &self,
        panseal: &Panseal,
        ks: &dyn KeyService,
        store: &PostgresKeyStore,
    ) -> Result<ReindexPlan, ReindexError> {
        self.check()?;
        let target = self.target_version(panseal, ks).await?;
        let cp = self.checkpoint(store).await?;
        let restarts = cp.last_id.is_some() && cp.target_version != target;
        let start = if restarts {
            i64::MIN
        } else {
            cp.last_id.unwrap_or(i64::MIN)
        };
        let c = store.pool().get().await.map_err(pool)?;
        let sql = format!(
            "SELECT count(*), count(*) FILTER (WHERE \"{v}\" IS DISTINCT FROM $2)
             FROM \"{t}\" WHERE \"{id}\" > $1 AND \"{s}\" IS NOT NULL",
            t = self.table,
            id = self.id_column,
            s = self.sealed_column,
            v = self.version_column,
        );
        let row = c
            .query_one(sql.as_str(), &[&start, &(target as i32)])
            .await
            .map_err(db)?;
        Ok(ReindexPlan {
            target_version: target,
            remaining_rows: row.get::<_, i64>(0) as u64,
            remaining_on_other_versions: row.get::<_, i64>(1) as u64,
            restarts,
        })
    }

    /// Runs (or resumes) the job to the end, calling `on_batch` after every
    /// committed batch; stops cleanly between batches when `stop` returns
    /// true. `access` is the job's principal (audited on every open; needs
    /// `unwrap` and `index`).
    ///
    /// # Errors
    ///
    /// [`ReindexError`]; whatever was committed before stays committed and
    /// the next run resumes from it.
    pub async fn run(
        &self,
        panseal: &Panseal,
        ks: Arc<dyn KeyService>,
        store: &PostgresKeyStore,
        access: &Access,
        mut on_batch: impl FnMut(&ReindexProgress),
        stop: impl Fn() -> bool,
    ) -> Result<ReindexProgress, ReindexError> {
        self.check()?;
        let target = self.target_version(panseal, &*ks).await?;
        let mut progress = self.checkpoint(store).await?;
        if progress.last_id.is_some() && progress.target_version != target {
            tracing::info!(
                job = %self.name,
                from = progress.target_version,
                to = target,
                "newest index-key version changed since the checkpoint; starting over"
            );
            progress = ReindexProgress::default();
        }
        progress.target_version = target;
        let key_id = crate::index::index_key_id(panseal.environment(), panseal.scope(), target);
        let (sealed_cast, index_cast) = (
            match self.sealed_form {
                SealedForm::Text => "text",
                SealedForm::Binary => "bytea",
            },
            match self.index_form {
                IndexForm::Hex => "text",
                IndexForm::Binary => "bytea",
            },
        );
        let select = format!(
            "SELECT \"{id}\"::bigint, \"{s}\"::{sealed_cast}, \"{i}\"::{index_cast}, \"{v}\"
             FROM \"{t}\" WHERE \"{id}\" > $1 ORDER BY \"{id}\" LIMIT $2",
            t = self.table,
            id = self.id_column,
            s = self.sealed_column,
            i = self.index_column,
            v = self.version_column,
        );
        let key_id_set = self
            .key_id_column
            .as_ref()
            .map(|k| format!(", \"{k}\" = $6"))
            .unwrap_or_default();
        let update = format!(
            "UPDATE \"{t}\" AS t SET \"{i}\" = v.new, \"{v}\" = $5{key_id_set}
             FROM unnest($1::bigint[], $2::{index_cast}[], $3::{index_cast}[], $4::integer[],
                         $7::{sealed_cast}[]) AS v(id, new, old, old_version, sealed)
             WHERE t.\"{id}\" = v.id
               AND t.\"{i}\"::{index_cast} IS NOT DISTINCT FROM v.old
               AND t.\"{v}\" IS NOT DISTINCT FROM v.old_version
               AND t.\"{s}\"::{sealed_cast} = v.sealed",
            t = self.table,
            id = self.id_column,
            s = self.sealed_column,
            i = self.index_column,
            v = self.version_column,
        );
        let update = if self.key_id_column.is_none() {
            // Keep the parameter numbering: $6 is bound but unused.
            update.replace("$7::", "$6::")
        } else {
            update
        };
        let scope = panseal.scope().clone();
        loop {
            if stop() {
                return Ok(progress);
            }
            let mut c = store.pool().get().await.map_err(pool)?;
            let tx = c.transaction().await.map_err(db)?;
            let cursor = progress.last_id.unwrap_or(i64::MIN);
            let rows = tx
                .query(select.as_str(), &[&cursor, &self.batch_size])
                .await
                .map_err(db)?;
            if rows.is_empty() {
                tx.execute(
                    "DELETE FROM panseal_reindex_checkpoints WHERE job = $1",
                    &[&self.name],
                )
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                progress.finished = true;
                on_batch(&progress);
                return Ok(progress);
            }
            let mut batch = progress.clone();
            // Rows with a sealed PAN: (id, sealed as stored, old index, old version).
            let mut work: Vec<RowRead> = Vec::new();
            let mut pans: Vec<Pan> = Vec::new();
            for row in &rows {
                let id: i64 = row.get(0);
                batch.scanned += 1;
                batch.last_id = Some(id);
                let stored = match self.sealed_form {
                    SealedForm::Text => row
                        .try_get::<_, Option<String>>(1)
                        .map_err(db)?
                        .map(StoredSealed::Text),
                    SealedForm::Binary => row
                        .try_get::<_, Option<Vec<u8>>>(1)
                        .map_err(db)?
                        .map(StoredSealed::Binary),
                };
                let Some(stored) = stored else { continue };
                let sealed = match &stored {
                    StoredSealed::Text(t) => SealedPan::from_text(t),
                    StoredSealed::Binary(b) => SealedPan::from_bytes(b),
                }
                .map_err(|_| ReindexError::Malformed {
                    id,
                    what: "sealed PAN",
                })?;
                let old_index = match self.index_form {
                    IndexForm::Hex => row
                        .try_get::<_, Option<String>>(2)
                        .map_err(db)?
                        .map(String::into_bytes),
                    IndexForm::Binary => row.try_get::<_, Option<Vec<u8>>>(2).map_err(db)?,
                };
                let old_version: Option<i32> = row.try_get(3).map_err(db)?;
                let ctx = Context::new(&self.context_table, &self.context_column, id.to_string())
                    .map_err(|e| ReindexError::Config(e.to_string()))?;
                let opened = panseal
                    .open_pan(&sealed, &ctx, access)
                    .await
                    .map_err(|source| ReindexError::Open { id, source })?;
                pans.push(opened.pan);
                work.push((id, stored, old_index, old_version));
            }
            let values = if pans.is_empty() {
                Vec::new()
            } else {
                let refs: Vec<&Pan> = pans.iter().collect();
                let v = ks.blind_index(&scope, &[target], &refs, access).await?;
                if v.len() != pans.len() {
                    return Err(ReindexError::KeyService(KeyServiceError::Other(format!(
                        "blind_index returned {} values for {} PANs",
                        v.len(),
                        pans.len()
                    ))));
                }
                v
            };
            drop(pans);
            let mut ids = Vec::new();
            let (mut new_hex, mut old_hex) = (Vec::<Option<String>>::new(), Vec::new());
            let (mut new_bin, mut old_bin) = (Vec::<Option<Vec<u8>>>::new(), Vec::new());
            let mut old_versions = Vec::new();
            let (mut sealed_text, mut sealed_bin) = (Vec::new(), Vec::new());
            for ((id, stored, old_index, old_version), value) in work.into_iter().zip(values) {
                let current = old_version == Some(target as i32)
                    && match (self.index_form, &old_index) {
                        (IndexForm::Hex, Some(old)) => ct_eq(old, hex::encode(value).as_bytes()),
                        (IndexForm::Binary, Some(old)) => ct_eq(old, &value),
                        (_, None) => false,
                    };
                if current {
                    batch.unchanged += 1;
                    continue;
                }
                ids.push(id);
                old_versions.push(old_version);
                match self.index_form {
                    IndexForm::Hex => {
                        new_hex.push(Some(hex::encode(value)));
                        old_hex.push(old_index.map(|b| String::from_utf8(b).unwrap_or_default()));
                    }
                    IndexForm::Binary => {
                        new_bin.push(Some(value.to_vec()));
                        old_bin.push(old_index);
                    }
                }
                match stored {
                    StoredSealed::Text(t) => sealed_text.push(t),
                    StoredSealed::Binary(b) => sealed_bin.push(b),
                }
            }
            if !ids.is_empty() {
                let version = target as i32;
                let kid = key_id.to_string();
                let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&ids];
                match self.index_form {
                    IndexForm::Hex => {
                        params.push(&new_hex);
                        params.push(&old_hex);
                    }
                    IndexForm::Binary => {
                        params.push(&new_bin);
                        params.push(&old_bin);
                    }
                }
                params.push(&old_versions);
                params.push(&version);
                if self.key_id_column.is_some() {
                    params.push(&kid);
                }
                match self.sealed_form {
                    SealedForm::Text => params.push(&sealed_text),
                    SealedForm::Binary => params.push(&sealed_bin),
                }
                let n = tx.execute(update.as_str(), &params).await.map_err(db)?;
                batch.updated += n;
                batch.skipped_concurrent += ids.len() as u64 - n;
            }
            tx.execute(
                "INSERT INTO panseal_reindex_checkpoints
                   (job, target_version, last_id, scanned, updated, unchanged, skipped)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (job) DO UPDATE SET target_version = EXCLUDED.target_version,
                   last_id = EXCLUDED.last_id, scanned = EXCLUDED.scanned,
                   updated = EXCLUDED.updated, unchanged = EXCLUDED.unchanged,
                   skipped = EXCLUDED.skipped, updated_at = now()",
                &[
                    &self.name,
                    &(target as i32),
                    &batch.last_id.unwrap_or(cursor),
                    &(batch.scanned as i64),
                    &(batch.updated as i64),
                    &(batch.unchanged as i64),
                    &(batch.skipped_concurrent as i64),
                ],
            )
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)?;
            progress = batch;
            on_batch(&progress);
        }
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

/// A row as read: id, sealed value, old index value, old version.
type RowRead = (i64, StoredSealed, Option<Vec<u8>>, Option<i32>);

/// A sealed value exactly as read (the compare-and-set uses it).
enum StoredSealed {
    Text(String),
    Binary(Vec<u8>),
}
