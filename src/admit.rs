//! The admission job (feature `postgres`), as the `admit` custodian tool
//! runs it: converts a PostgreSQL column of ingest ciphertexts
//! (`FORMAT.md` §17) into the compact form and fills the blind-index
//! column, through [`Panseal::admit`]: the PANs are opened and re-sealed
//! inside the key service, so neither a PAN nor a DEK enters the job's
//! process.
//!
//! Batches walk the table in primary-key order. Each batch is one
//! transaction that writes the admitted values *and* the job's checkpoint,
//! so a crash or `kill -9` at any moment leaves either the whole batch done
//! and recorded or none of it; a new run resumes after the last committed
//! batch. Every update is a compare-and-set on the ingest ciphertext as
//! read, so a row the application rewrote meanwhile keeps the
//! application's value, and a row is never admitted twice. Rows already in
//! the compact form are skipped; rows that hold neither form (garbage) and
//! ingest ciphertexts the key service refuses (another scope, an unknown
//! key, altered, another row's context) are counted and left untouched.
//!
//! Requirements on the table: a `bigint` (or smaller integer) primary key,
//! contexts built as `Context::new(context_table, context_column, id as
//! decimal text)`, the sealed column `text`/`varchar(140)` (text form) or
//! `bytea` (binary form), and the index column `text` (64 hex digits) or
//! `bytea` (32 bytes) to match.

use serde::Serialize;

use crate::context::Context;
use crate::error::{Error, KeyStoreError};
use crate::ingest::{IngestSealed, StoredPan};
use crate::keystore::postgres::PostgresKeyStore;
use crate::reencrypt::SealedForm;
use crate::Panseal;

/// One admission job.
#[derive(Clone, Debug)]
pub struct AdmitJob {
    /// The job's name: its checkpoint is kept under it.
    pub name: String,
    /// The table.
    pub table: String,
    /// Its integer primary-key column.
    pub id_column: String,
    /// The column holding sealed PANs (ingest, then compact).
    pub sealed_column: String,
    /// The column the blind index goes into.
    pub index_column: String,
    /// Text or binary form (of both columns).
    pub form: SealedForm,
    /// The table name used in the sealing context.
    pub context_table: String,
    /// The column name used in the sealing context.
    pub context_column: String,
    /// Rows per batch (one transaction and one key-service request each;
    /// at most [`crate::MAX_ADMIT_BATCH`] per request).
    pub batch_size: i64,
}

/// Where a job stands (committed with every batch).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AdmitProgress {
    /// Rows read.
    pub scanned: u64,
    /// Rows admitted (written in the compact form with their index).
    pub admitted: u64,
    /// Rows already in the compact form.
    pub already_compact: u64,
    /// Rows holding neither form (left untouched).
    pub garbage: u64,
    /// Ingest ciphertexts the key service refused (left untouched).
    pub refused: u64,
    /// Rows the application changed between read and write (left as the
    /// application wrote them).
    pub skipped_concurrent: u64,
    /// The last primary key committed.
    pub last_id: Option<i64>,
    /// Whether the whole table has been walked.
    pub finished: bool,
}

/// What a run would do (dry run: nothing changes).
#[derive(Clone, Debug, Default, Serialize)]
#[non_exhaustive]
pub struct AdmitPlan {
    /// Rows after the checkpoint.
    pub remaining_rows: u64,
    /// Of those, ingest ciphertexts to admit.
    pub ingest: u64,
    /// Of those, rows already compact.
    pub compact: u64,
    /// Of those, rows holding neither form.
    pub garbage: u64,
}

fn db(e: tokio_postgres::Error) -> Error {
    KeyStoreError::Backend(e.to_string()).into()
}

fn pool(e: deadpool_postgres::PoolError) -> Error {
    KeyStoreError::Io(std::io::Error::other(e.to_string())).into()
}

const CHECKPOINTS: &str = "CREATE TABLE IF NOT EXISTS panseal_admit_checkpoints (
    job text PRIMARY KEY,
    last_id bigint NOT NULL,
    scanned bigint NOT NULL,
    admitted bigint NOT NULL,
    already_compact bigint NOT NULL,
    garbage bigint NOT NULL,
    refused bigint NOT NULL,
    skipped bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now())";

/// A column value as read: its stored form, or garbage.
enum Cell {
    Null,
    Garbage,
    Compact,
    Ingest(IngestSealed),
}

impl AdmitJob {
    fn check(&self) -> Result<(), Error> {
        for ident in [
            &self.table,
            &self.id_column,
            &self.sealed_column,
            &self.index_column,
        ] {
            crate::keystore::postgres::check_ident(ident)?;
        }
        if self.batch_size < 1 || self.batch_size > crate::MAX_ADMIT_BATCH as i64 {
            return Err(crate::error::ConfigError::Policy(format!(
                "batch size must be 1 to {}",
                crate::MAX_ADMIT_BATCH
            ))
            .into());
        }
        Ok(())
    }

    async fn ensure_table(&self, store: &PostgresKeyStore) -> Result<(), Error> {
        store.ready_public().await?;
        let c = store.pool().get().await.map_err(pool)?;
        c.batch_execute(CHECKPOINTS).await.map_err(db)?;
        Ok(())
    }

    /// The committed checkpoint, if a previous run was interrupted.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn checkpoint(&self, store: &PostgresKeyStore) -> Result<AdmitProgress, Error> {
        self.ensure_table(store).await?;
        let c = store.pool().get().await.map_err(pool)?;
        let row = c
            .query_opt(
                "SELECT last_id, scanned, admitted, already_compact, garbage, refused, skipped
                 FROM panseal_admit_checkpoints WHERE job = $1",
                &[&self.name],
            )
            .await
            .map_err(db)?;
        Ok(row
            .map(|r| AdmitProgress {
                last_id: Some(r.get(0)),
                scanned: r.get::<_, i64>(1) as u64,
                admitted: r.get::<_, i64>(2) as u64,
                already_compact: r.get::<_, i64>(3) as u64,
                garbage: r.get::<_, i64>(4) as u64,
                refused: r.get::<_, i64>(5) as u64,
                skipped_concurrent: r.get::<_, i64>(6) as u64,
                finished: false,
            })
            .unwrap_or_default())
    }

    fn cell(&self, row: &tokio_postgres::Row, i: usize) -> Cell {
        let parsed = match self.form {
            SealedForm::Text => match row.try_get::<_, Option<&str>>(i) {
                Ok(None) => return Cell::Null,
                Ok(Some(s)) => StoredPan::from_text(s),
                Err(_) => return Cell::Garbage,
            },
            SealedForm::Binary => match row.try_get::<_, Option<&[u8]>>(i) {
                Ok(None) => return Cell::Null,
                Ok(Some(b)) => StoredPan::from_bytes(b),
                Err(_) => return Cell::Garbage,
            },
        };
        match parsed {
            Ok(StoredPan::Ingest(s)) => Cell::Ingest(s),
            Ok(_) => Cell::Compact,
            Err(_) => Cell::Garbage,
        }
    }

    fn select_sql(&self) -> String {
        format!(
            "SELECT \"{id}\"::bigint, \"{col}\" FROM \"{t}\" WHERE \"{id}\" > $1 ORDER BY \"{id}\" LIMIT $2",
            t = self.table,
            id = self.id_column,
            col = self.sealed_column,
        )
    }

    /// What remains after the checkpoint (a dry run: nothing changes, no
    /// key-service call).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn plan(&self, store: &PostgresKeyStore) -> Result<AdmitPlan, Error> {
        self.check()?;
        let start = self.checkpoint(store).await?.last_id.unwrap_or(i64::MIN);
        let c = store.pool().get().await.map_err(pool)?;
        let rows = c
            .query(self.select_sql().as_str(), &[&start, &i64::MAX])
            .await
            .map_err(db)?;
        let mut plan = AdmitPlan {
            remaining_rows: rows.len() as u64,
            ..AdmitPlan::default()
        };
        for r in &rows {
            match self.cell(r, 1) {
                Cell::Null => {}
                Cell::Garbage => plan.garbage += 1,
                Cell::Compact => plan.compact += 1,
                Cell::Ingest(_) => plan.ingest += 1,
            }
        }
        Ok(plan)
    }

    /// Runs (or resumes) the job to the end, calling `on_batch` after every
    /// committed batch. Stops early, cleanly, when `stop` returns true
    /// between batches.
    ///
    /// # Errors
    ///
    /// Database, key-store or key-service errors (permission, outage);
    /// whatever was committed before stays committed and the next run
    /// resumes from it. A row the key service refuses does not stop the
    /// job (it is counted in [`AdmitProgress::refused`]).
    pub async fn run(
        &self,
        panseal: &Panseal,
        store: &PostgresKeyStore,
        mut on_batch: impl FnMut(&AdmitProgress),
        stop: impl Fn() -> bool,
    ) -> Result<AdmitProgress, Error> {
        self.check()?;
        let mut progress = self.checkpoint(store).await?;
        let select = self.select_sql();
        let (cast, icast) = match self.form {
            SealedForm::Text => ("text", "text"),
            SealedForm::Binary => ("bytea", "bytea"),
        };
        let update = format!(
            "UPDATE \"{t}\" AS t SET \"{col}\" = v.new, \"{ix}\" = v.ix
             FROM unnest($1::bigint[], $2::{cast}[], $3::{cast}[], $4::{icast}[]) AS v(id, new, old, ix)
             WHERE t.\"{id}\" = v.id AND t.\"{col}\" = v.old",
            t = self.table,
            id = self.id_column,
            col = self.sealed_column,
            ix = self.index_column,
        );
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
                    "DELETE FROM panseal_admit_checkpoints WHERE job = $1",
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
            let mut ids: Vec<i64> = Vec::new();
            let mut items: Vec<(IngestSealed, Context)> = Vec::new();
            let mut raw_idx: Vec<usize> = Vec::new();
            for (i, row) in rows.iter().enumerate() {
                let id: i64 = row.get(0);
                batch.scanned += 1;
                batch.last_id = Some(id);
                match self.cell(row, 1) {
                    Cell::Null => {}
                    Cell::Garbage => batch.garbage += 1,
                    Cell::Compact => batch.already_compact += 1,
                    Cell::Ingest(sealed) => {
                        let ctx = Context::new(
                            &self.context_table,
                            &self.context_column,
                            id.to_string(),
                        )?;
                        ids.push(id);
                        items.push((sealed, ctx));
                        raw_idx.push(i);
                    }
                }
            }
            let results = panseal.admit(&items).await?;
            let mut up_ids: Vec<i64> = Vec::new();
            let mut new_text: Vec<String> = Vec::new();
            let mut old_text: Vec<String> = Vec::new();
            let mut ix_text: Vec<String> = Vec::new();
            let mut new_bin: Vec<Vec<u8>> = Vec::new();
            let mut old_bin: Vec<Vec<u8>> = Vec::new();
            let mut ix_bin: Vec<Vec<u8>> = Vec::new();
            for ((id, result), i) in ids.iter().zip(results).zip(raw_idx) {
                let admission = match result {
                    Ok(a) => a,
                    Err(e) => {
                        batch.refused += 1;
                        tracing::warn!(row = id, error = %e, "ingest ciphertext refused; row left untouched");
                        continue;
                    }
                };
                up_ids.push(*id);
                // The compare-and-set uses the stored value as read.
                match self.form {
                    SealedForm::Text => {
                        new_text.push(admission.sealed.to_text());
                        old_text.push(rows[i].get::<_, String>(1));
                        ix_text.push(admission.index.to_hex());
                    }
                    SealedForm::Binary => {
                        new_bin.push(admission.sealed.as_bytes().to_vec());
                        old_bin.push(rows[i].get::<_, Vec<u8>>(1));
                        ix_bin.push(admission.index.as_bytes().to_vec());
                    }
                }
            }
            if !up_ids.is_empty() {
                let n = match self.form {
                    SealedForm::Text => {
                        tx.execute(update.as_str(), &[&up_ids, &new_text, &old_text, &ix_text])
                            .await
                    }
                    SealedForm::Binary => {
                        tx.execute(update.as_str(), &[&up_ids, &new_bin, &old_bin, &ix_bin])
                            .await
                    }
                }
                .map_err(db)?;
                batch.admitted += n;
                batch.skipped_concurrent += up_ids.len() as u64 - n;
            }
            tx.execute(
                "INSERT INTO panseal_admit_checkpoints
                   (job, last_id, scanned, admitted, already_compact, garbage, refused, skipped)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (job) DO UPDATE SET last_id = EXCLUDED.last_id,
                   scanned = EXCLUDED.scanned, admitted = EXCLUDED.admitted,
                   already_compact = EXCLUDED.already_compact, garbage = EXCLUDED.garbage,
                   refused = EXCLUDED.refused, skipped = EXCLUDED.skipped, updated_at = now()",
                &[
                    &self.name,
                    &batch.last_id.unwrap_or(cursor),
                    &(batch.scanned as i64),
                    &(batch.admitted as i64),
                    &(batch.already_compact as i64),
                    &(batch.garbage as i64),
                    &(batch.refused as i64),
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
