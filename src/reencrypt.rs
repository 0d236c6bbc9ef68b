//! Re-sealing a table column off retired or compromised DEKs (feature
//! `postgres`), as the `reencrypt` custodian tool does.
//!
//! This is the one path on which data under a **compromised** DEK still
//! opens (PCI DSS 3.7.5): every field goes through
//! [`Panseal::reseal`], which seals it again under the active DEK at once
//! and never returns the PAN, and each open is audited under the job's
//! principal. [`Panseal::open_pan`] refuses the same fields with
//! [`crate::KeyError::Compromised`].
//!
//! Batches walk the table in primary-key order. Each batch is one
//! transaction that writes the re-sealed values *and* the job's checkpoint,
//! so a crash or `kill -9` at any moment leaves either the whole batch done
//! and recorded or none of it; a new run resumes after the last committed
//! batch. Every update is a compare-and-set on the old ciphertext, so an
//! application writing the same rows meanwhile always wins (its value is
//! sealed under an active key anyway), and running the job twice changes
//! nothing the second time. New ciphertexts reference only DEKs already
//! committed to the key store.
//!
//! Requirements on the table: a `bigint` (or smaller integer) primary key,
//! and contexts built as `Context::new(context_table, context_column, id as
//! decimal text)`.

use std::collections::HashSet;

use serde::Serialize;

use crate::access::Access;
use crate::context::Context;
use crate::error::{Error, KeyStoreError};
use crate::format::SealedPan;
use crate::keys::{unix_now, KeyId, KeyPurpose, KeyState};
use crate::keystore::postgres::PostgresKeyStore;
use crate::keystore::KeyStore;
use crate::Panseal;

/// How sealed PANs are stored in the column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealedForm {
    /// The 64-character text form (`varchar`/`text`).
    Text,
    /// The 48-byte binary form (`bytea`).
    Binary,
}

/// One re-encryption job.
#[derive(Clone, Debug)]
pub struct ReencryptJob {
    /// The job's name: its checkpoint is kept under it.
    pub name: String,
    /// The table.
    pub table: String,
    /// Its integer primary-key column.
    pub id_column: String,
    /// The column holding sealed PANs.
    pub sealed_column: String,
    /// Text or binary form.
    pub form: SealedForm,
    /// The table name used in the sealing context.
    pub context_table: String,
    /// The column name used in the sealing context.
    pub context_column: String,
    /// Rows per batch (one transaction each).
    pub batch_size: i64,
    /// Re-seal only fields under this DEK; otherwise every field whose DEK
    /// is not active (retired, compromised, or past its encrypt period).
    pub only_key: Option<KeyId>,
}

/// Where a job stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Progress {
    /// Rows read.
    pub scanned: u64,
    /// Rows re-sealed.
    pub resealed: u64,
    /// Rows the application changed between read and write (left as the
    /// application wrote them).
    pub skipped_concurrent: u64,
    /// The last primary key committed.
    pub last_id: Option<i64>,
    /// Whether the whole table has been walked.
    pub finished: bool,
}

fn db(e: tokio_postgres::Error) -> Error {
    KeyStoreError::Backend(e.to_string()).into()
}

fn pool(e: deadpool_postgres::PoolError) -> Error {
    KeyStoreError::Io(std::io::Error::other(e.to_string())).into()
}

impl ReencryptJob {
    fn check(&self) -> Result<(), Error> {
        for ident in [&self.table, &self.id_column, &self.sealed_column] {
            crate::keystore::postgres::check_ident(ident)?;
        }
        if self.batch_size < 1 {
            return Err(crate::error::ConfigError::Policy("batch size must be >= 1".into()).into());
        }
        Ok(())
    }

    /// The DEK ids whose fields this job re-seals.
    async fn stale_keys(
        &self,
        panseal: &Panseal,
        store: &PostgresKeyStore,
    ) -> Result<HashSet<KeyId>, Error> {
        if let Some(id) = self.only_key {
            return Ok(HashSet::from([id]));
        }
        let now = unix_now();
        Ok(store
            .list(Some(panseal.scope()))
            .await?
            .into_iter()
            .filter(|r| r.purpose == KeyPurpose::Data)
            .filter(|r| r.state != KeyState::Active || now >= r.encrypt_until)
            .map(|r| r.id)
            .collect())
    }

    /// The committed checkpoint, if a previous run was interrupted.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn checkpoint(&self, store: &PostgresKeyStore) -> Result<Progress, Error> {
        store.ready_public().await?;
        let c = store.pool().get().await.map_err(pool)?;
        let row = c
            .query_opt(
                "SELECT last_id, scanned, resealed, skipped FROM panseal_reencrypt_checkpoints
                 WHERE job = $1",
                &[&self.name],
            )
            .await
            .map_err(db)?;
        Ok(row
            .map(|r| Progress {
                last_id: Some(r.get(0)),
                scanned: r.get::<_, i64>(1) as u64,
                resealed: r.get::<_, i64>(2) as u64,
                skipped_concurrent: r.get::<_, i64>(3) as u64,
                finished: false,
            })
            .unwrap_or_default())
    }

    /// How many rows remain after the checkpoint, and how many of all rows
    /// are under the keys this job re-seals (a dry run: nothing changes).
    ///
    /// # Errors
    ///
    /// Database or key-store errors.
    pub async fn plan(&self, panseal: &Panseal, store: &PostgresKeyStore) -> Result<Plan, Error> {
        self.check()?;
        let stale = self.stale_keys(panseal, store).await?;
        let start = self.checkpoint(store).await?.last_id.unwrap_or(i64::MIN);
        let c = store.pool().get().await.map_err(pool)?;
        let sql = format!(
            "SELECT \"{col}\"::text FROM \"{t}\" WHERE \"{id}\" > $1 AND \"{col}\" IS NOT NULL",
            t = self.table,
            id = self.id_column,
            col = self.sealed_column,
        );
        let sql = if self.form == SealedForm::Binary {
            sql.replace("::text", "")
        } else {
            sql
        };
        let rows = c.query(sql.as_str(), &[&start]).await.map_err(db)?;
        let mut under_stale = 0u64;
        for r in &rows {
            if let Ok(s) = self.parse(r, 0) {
                under_stale += u64::from(stale.contains(&s.key_id()));
            }
        }
        Ok(Plan {
            stale_keys: stale.into_iter().collect(),
            remaining_rows: rows.len() as u64,
            remaining_under_stale_keys: under_stale,
        })
    }

    fn parse(&self, row: &tokio_postgres::Row, i: usize) -> Result<SealedPan, Error> {
        match self.form {
            SealedForm::Text => SealedPan::from_text(row.try_get::<_, &str>(i).map_err(db)?),
            SealedForm::Binary => SealedPan::from_bytes(row.try_get::<_, &[u8]>(i).map_err(db)?),
        }
    }

    /// Runs (or resumes) the job to the end, calling `on_batch` after every
    /// committed batch. Stops early, cleanly, when `stop` returns true
    /// between batches.
    ///
    /// # Errors
    ///
    /// Database, key-store, key-service or audit errors; whatever was
    /// committed before stays committed and the next run resumes from it.
    /// A field that fails to open (altered, wrong context) stops the job
    /// with that error and is left untouched.
    pub async fn run(
        &self,
        panseal: &Panseal,
        store: &PostgresKeyStore,
        access: &Access,
        mut on_batch: impl FnMut(&Progress),
        stop: impl Fn() -> bool,
    ) -> Result<Progress, Error> {
        self.check()?;
        let stale = self.stale_keys(panseal, store).await?;
        let mut progress = self.checkpoint(store).await?;
        let select = format!(
            "SELECT \"{id}\"::bigint, \"{col}\" FROM \"{t}\" WHERE \"{id}\" > $1 ORDER BY \"{id}\" LIMIT $2",
            t = self.table,
            id = self.id_column,
            col = self.sealed_column,
        );
        // One statement per batch: compare-and-set of every re-sealed row.
        let cast = match self.form {
            SealedForm::Text => "text",
            SealedForm::Binary => "bytea",
        };
        let update = format!(
            "UPDATE \"{t}\" AS t SET \"{col}\" = v.new
             FROM unnest($1::bigint[], $2::{cast}[], $3::{cast}[]) AS v(id, new, old)
             WHERE t.\"{id}\" = v.id AND t.\"{col}\" = v.old",
            t = self.table,
            id = self.id_column,
            col = self.sealed_column,
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
                    "DELETE FROM panseal_reencrypt_checkpoints WHERE job = $1",
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
            let mut new_text: Vec<String> = Vec::new();
            let mut old_text: Vec<String> = Vec::new();
            let mut new_bin: Vec<Vec<u8>> = Vec::new();
            let mut old_bin: Vec<Vec<u8>> = Vec::new();
            for row in &rows {
                let id: i64 = row.get(0);
                batch.scanned += 1;
                batch.last_id = Some(id);
                let is_null = match self.form {
                    SealedForm::Text => row.try_get::<_, Option<&str>>(1).map_err(db)?.is_none(),
                    SealedForm::Binary => row.try_get::<_, Option<&[u8]>>(1).map_err(db)?.is_none(),
                };
                if is_null {
                    continue;
                }
                let old = self.parse(row, 1)?;
                if !stale.contains(&old.key_id()) {
                    continue;
                }
                let ctx = Context::new(&self.context_table, &self.context_column, id.to_string())?;
                let new = panseal.reseal(&old, &ctx, access).await?;
                ids.push(id);
                // The compare-and-set uses the stored value as read.
                match self.form {
                    SealedForm::Text => {
                        new_text.push(new.to_text());
                        old_text.push(row.get::<_, String>(1));
                    }
                    SealedForm::Binary => {
                        new_bin.push(new.as_bytes().to_vec());
                        old_bin.push(row.get::<_, Vec<u8>>(1));
                    }
                }
            }
            if !ids.is_empty() {
                let n = match self.form {
                    SealedForm::Text => {
                        tx.execute(update.as_str(), &[&ids, &new_text, &old_text])
                            .await
                    }
                    SealedForm::Binary => {
                        tx.execute(update.as_str(), &[&ids, &new_bin, &old_bin])
                            .await
                    }
                }
                .map_err(db)?;
                batch.resealed += n;
                batch.skipped_concurrent += ids.len() as u64 - n;
            }
            tx.execute(
                "INSERT INTO panseal_reencrypt_checkpoints (job, last_id, scanned, resealed, skipped)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (job) DO UPDATE SET last_id = EXCLUDED.last_id,
                   scanned = EXCLUDED.scanned, resealed = EXCLUDED.resealed,
                   skipped = EXCLUDED.skipped, updated_at = now()",
                &[
                    &self.name,
                    &batch.last_id.unwrap_or(cursor),
                    &(batch.scanned as i64),
                    &(batch.resealed as i64),
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

/// What a job would do (dry run).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Plan {
    /// The DEKs whose fields would be re-sealed.
    pub stale_keys: Vec<KeyId>,
    /// Rows after the checkpoint.
    pub remaining_rows: u64,
    /// Of those, rows under the stale keys.
    pub remaining_under_stale_keys: u64,
}
