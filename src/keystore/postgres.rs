//! A key store in PostgreSQL (feature `postgres`).
//!
//! One row per wrapped-key record. The row's `record` column holds the
//! record in its specified binary encoding (`FORMAT.md`, "Key-store
//! record"); `scope`, `purpose`, `state` and the KEK reference are copied
//! into columns for queries (the library reads only `record`: its lifecycle
//! fields are signed by the key service, the copies are not). Every change
//! is one compare-and-swap `UPDATE … WHERE record = <previous>`, so any
//! number of application instances can share the store: two instances
//! never lose each other's updates, and
//! the primary key makes a duplicate id (including the deterministic
//! index-key ids) fail for the second inserter.
//!
//! The schema is created and upgraded by the library (versioned migrations
//! under a transaction-level advisory lock, so instances starting at once
//! apply each migration exactly once).
//!
//! [`Inventory`] counts, per DEK and per index-key version, the stored fields
//! that still use it, over the sealed-PAN columns the application registers
//! (PCI DSS 3.6.1.1 inventory; 3.7.5 retirement: a key whose count reaches
//! zero can be destroyed).

use std::collections::BTreeMap;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Serialize;
use tokio_postgres::NoTls;

use super::KeyStore;
use crate::error::KeyStoreError;
use crate::keys::{KeyId, KeyState, Scope, WrappedDek};

/// Schema migrations, applied in order; each entry is one version.
const MIGRATIONS: &[&str] = &[
    // v1: key records and registered columns.
    r#"
    CREATE TABLE panseal_keys (
        id          bytea PRIMARY KEY CHECK (length(id) = 8),
        scope       text NOT NULL,
        purpose     smallint NOT NULL,
        state       smallint NOT NULL,
        kek_id      text NOT NULL,
        kek_version bigint NOT NULL,
        record      bytea NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX panseal_keys_scope ON panseal_keys (scope, purpose, state);
    CREATE TABLE panseal_columns (
        table_name  text NOT NULL,
        column_name text NOT NULL,
        kind        text NOT NULL CHECK (kind IN ('sealed-text', 'sealed-binary', 'index')),
        version_column text,
        PRIMARY KEY (table_name, column_name)
    );
    "#,
    // v2: checkpoints of re-encryption jobs.
    r#"
    CREATE TABLE panseal_reencrypt_checkpoints (
        job        text PRIMARY KEY,
        last_id    bigint NOT NULL,
        scanned    bigint NOT NULL,
        resealed   bigint NOT NULL,
        skipped    bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    "#,
];

/// Advisory lock key for migrations ("panseal" in ASCII).
const MIGRATION_LOCK: i64 = 0x0070_616e_7365_616c;

/// A key store in PostgreSQL. Cheap to clone (a connection pool).
#[derive(Clone)]
pub struct PostgresKeyStore {
    pool: Pool,
    migrated: std::sync::Arc<tokio::sync::OnceCell<()>>,
}

impl std::fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresKeyStore")
    }
}

fn backend(e: impl std::fmt::Display) -> KeyStoreError {
    KeyStoreError::Backend(e.to_string())
}

/// Maps a database error: connection problems are retryable I/O.
fn db(e: tokio_postgres::Error) -> KeyStoreError {
    if e.is_closed() || e.as_db_error().is_none() {
        KeyStoreError::Io(std::io::Error::other(e.to_string()))
    } else {
        KeyStoreError::Backend(e.to_string())
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> KeyStoreError {
    KeyStoreError::Io(std::io::Error::other(e.to_string()))
}

impl PostgresKeyStore {
    /// Connects with a libpq-style URL or key=value string (e.g.
    /// `postgresql://app@127.0.0.1:5432/payments`), keeping up to
    /// `pool_size` connections, and applies pending schema migrations.
    ///
    /// # Errors
    ///
    /// An unusable URL, an unreachable server (retryable), or a failed
    /// migration.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, KeyStoreError> {
        let store = Self::new(url, pool_size)?;
        store.ready().await?;
        Ok(store)
    }

    /// Like [`PostgresKeyStore::connect`] without touching the server:
    /// connections are opened and migrations applied at first use (so it can
    /// be built outside an async context).
    ///
    /// # Errors
    ///
    /// An unusable URL.
    pub fn new(url: &str, pool_size: usize) -> Result<Self, KeyStoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(backend)?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(backend)?;
        Ok(PostgresKeyStore {
            pool,
            migrated: std::sync::Arc::new(tokio::sync::OnceCell::new()),
        })
    }

    /// Applies pending migrations once per store; every operation waits
    /// for it.
    async fn ready(&self) -> Result<(), KeyStoreError> {
        self.migrated
            .get_or_try_init(|| self.migrate())
            .await
            .map(|_| ())
    }

    pub(crate) async fn ready_public(&self) -> Result<(), KeyStoreError> {
        self.ready().await
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object, KeyStoreError> {
        self.ready().await?;
        self.pool.get().await.map_err(pool_err)
    }

    /// The connection pool, for tools that work on application tables in
    /// the same database.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The schema version now in the database.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn schema_version(&self) -> Result<i32, KeyStoreError> {
        let c = self.conn().await?;
        let row = c
            .query_one("SELECT coalesce(max(version), 0) FROM panseal_schema", &[])
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }

    async fn migrate(&self) -> Result<(), KeyStoreError> {
        let mut c = self.pool.get().await.map_err(pool_err)?;
        let tx = c.transaction().await.map_err(db)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS panseal_schema (
                 version int PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(db)?;
        let current: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM panseal_schema", &[])
            .await
            .map_err(db)?
            .get(0);
        if current as usize > MIGRATIONS.len() {
            return Err(KeyStoreError::Backend(format!(
                "database schema version {current} is newer than this library ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let version = i as i32 + 1;
            tx.batch_execute(sql).await.map_err(db)?;
            tx.execute(
                "INSERT INTO panseal_schema (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// Registers a column of `table` that holds sealed PANs (text or binary
    /// form), or blind-index values with their index-key version in
    /// `version_column`, for the [`Inventory`].
    ///
    /// # Errors
    ///
    /// An identifier that is not a plain lower-case SQL name, or database
    /// errors.
    pub async fn register_column(&self, column: RegisteredColumn) -> Result<(), KeyStoreError> {
        let (table, name, kind, version) = match &column {
            RegisteredColumn::SealedText { table, column } => (table, column, "sealed-text", None),
            RegisteredColumn::SealedBinary { table, column } => {
                (table, column, "sealed-binary", None)
            }
            RegisteredColumn::BlindIndex {
                table,
                column,
                version_column,
            } => (table, column, "index", Some(version_column)),
        };
        for ident in [Some(table), Some(name), version].into_iter().flatten() {
            check_ident(ident)?;
        }
        let c = self.conn().await?;
        c.execute(
            "INSERT INTO panseal_columns (table_name, column_name, kind, version_column)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (table_name, column_name) DO UPDATE
               SET kind = EXCLUDED.kind, version_column = EXCLUDED.version_column",
            &[table, name, &kind, &version],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    /// The key inventory: every record with the number of stored fields
    /// that still reference it in the registered columns.
    ///
    /// # Errors
    ///
    /// Database errors (including a registered column that no longer exists).
    pub async fn inventory(&self) -> Result<Inventory, KeyStoreError> {
        let records = self.list(None).await?;
        let c = self.conn().await?;
        let columns = c
            .query(
                "SELECT table_name, column_name, kind, version_column FROM panseal_columns
                 ORDER BY table_name, column_name",
                &[],
            )
            .await
            .map_err(db)?;
        let mut data_refs: BTreeMap<KeyId, u64> = BTreeMap::new();
        let mut index_refs: BTreeMap<u32, u64> = BTreeMap::new();
        let mut registered = Vec::new();
        for row in columns {
            let table: String = row.get(0);
            let column: String = row.get(1);
            let kind: String = row.get(2);
            let version_column: Option<String> = row.get(3);
            check_ident(&table)?;
            check_ident(&column)?;
            // Identifiers are validated above and quoted here.
            let sql = match kind.as_str() {
                "sealed-binary" => format!(
                    "SELECT substring(\"{column}\" FROM 3 FOR 8), count(*) FROM \"{table}\"
                     WHERE \"{column}\" IS NOT NULL GROUP BY 1"
                ),
                "sealed-text" => format!(
                    "SELECT substring(decode(translate(substr(\"{column}\", 3), '-_', '+/') || '==',
                                            'base64') FROM 1 FOR 8), count(*)
                     FROM \"{table}\" WHERE \"{column}\" LIKE 'P1%' AND length(\"{column}\") = 64
                     GROUP BY 1"
                ),
                _ => {
                    let v = version_column.clone().unwrap_or_default();
                    check_ident(&v)?;
                    format!(
                        "SELECT \"{v}\"::bigint, count(*) FROM \"{table}\"
                         WHERE \"{column}\" IS NOT NULL GROUP BY 1"
                    )
                }
            };
            let rows = c.query(sql.as_str(), &[]).await.map_err(db)?;
            for r in rows {
                let count: i64 = r.get(1);
                if kind == "index" {
                    let v: i64 = r.get(0);
                    *index_refs.entry(v as u32).or_default() += count as u64;
                } else {
                    let id: Vec<u8> = r.get(0);
                    if let Ok(id) = <[u8; 8]>::try_from(id.as_slice()) {
                        *data_refs.entry(KeyId::from_bytes(id)).or_default() += count as u64;
                    }
                }
            }
            registered.push(format!("{table}.{column} ({kind})"));
        }
        let keys = records
            .into_iter()
            .map(|r| {
                let references = match r.purpose {
                    crate::keys::KeyPurpose::Data => data_refs.get(&r.id).copied().unwrap_or(0),
                    crate::keys::KeyPurpose::Index => {
                        index_refs.get(&r.version).copied().unwrap_or(0)
                    }
                };
                InventoryEntry::new(&r, references)
            })
            .collect();
        Ok(Inventory {
            columns: registered,
            keys,
            index_references: index_refs,
        })
    }
}

/// A column the application registers with the inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegisteredColumn {
    /// Sealed PANs in the 64-character text form.
    SealedText {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
    },
    /// Sealed PANs in the 48-byte binary form.
    SealedBinary {
        /// Table name.
        table: String,
        /// Column name.
        column: String,
    },
    /// Blind-index values, with the index-key version in another column.
    BlindIndex {
        /// Table name.
        table: String,
        /// Column with the index value.
        column: String,
        /// Column with the index-key version.
        version_column: String,
    },
}

/// The key inventory (PCI DSS 3.6.1.1).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Inventory {
    /// The registered columns that were counted.
    pub columns: Vec<String>,
    /// Every key record (DEKs, and legacy in-database index keys).
    pub keys: Vec<InventoryEntry>,
    /// Stored blind-index values per index-key version, over the
    /// registered index columns. Index keys live in the key service (its
    /// `index_keys` lists them), not in the key store; a version whose
    /// count reaches zero after the re-index job can be destroyed there.
    pub index_references: BTreeMap<u32, u64>,
}

/// One key in the inventory. No key material.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct InventoryEntry {
    /// Key id.
    pub id: KeyId,
    /// `data` or `index`.
    pub purpose: crate::keys::KeyPurpose,
    /// Index-key version (0 for DEKs).
    pub version: u32,
    /// Scope.
    pub scope: String,
    /// Environment.
    pub environment: String,
    /// Lifecycle state.
    pub state: KeyState,
    /// Algorithm.
    pub algorithm: &'static str,
    /// Strength in bits.
    pub strength_bits: u32,
    /// KEK and version that wrap it.
    pub kek: String,
    /// Created, Unix seconds.
    pub created_at: u64,
    /// End of the encrypt period, Unix seconds.
    pub encrypt_until: u64,
    /// End of the decrypt period, Unix seconds.
    pub decrypt_until: u64,
    /// Seals reported.
    pub uses: u64,
    /// Seal budget.
    pub max_uses: u64,
    /// Stored fields that still reference it (registered columns only).
    pub references: u64,
}

impl InventoryEntry {
    fn new(r: &WrappedDek, references: u64) -> Self {
        InventoryEntry {
            id: r.id,
            purpose: r.purpose,
            version: r.version,
            scope: r.scope.to_string(),
            environment: r.environment.to_string(),
            state: r.state,
            algorithm: match r.purpose {
                crate::keys::KeyPurpose::Data => "AES-256-GCM",
                crate::keys::KeyPurpose::Index => "HMAC-SHA-256",
            },
            strength_bits: crate::keys::DEK_STRENGTH_BITS,
            kek: r.wrapped.kek.to_string(),
            created_at: r.created_at,
            encrypt_until: r.encrypt_until,
            decrypt_until: r.decrypt_until,
            uses: r.uses,
            max_uses: r.max_uses,
            references,
        }
    }
}

/// Plain lower-case SQL identifiers only: `[a-z_][a-z0-9_]{0,62}`.
pub(crate) fn check_ident(s: &str) -> Result<(), KeyStoreError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(KeyStoreError::Backend(format!(
            "{s:?} is not a plain lower-case SQL identifier"
        )))
    }
}

fn decode_row(bytes: Vec<u8>) -> Result<WrappedDek, KeyStoreError> {
    WrappedDek::from_bytes(&bytes).map_err(|e| KeyStoreError::Corrupt(e.to_string()))
}

#[async_trait]
impl KeyStore for PostgresKeyStore {
    async fn insert(&self, record: &WrappedDek) -> Result<(), KeyStoreError> {
        let c = self.conn().await?;
        let n = c
            .execute(
                "INSERT INTO panseal_keys (id, scope, purpose, state, kek_id, kek_version, record)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                &[
                    &record.id.as_bytes().as_slice(),
                    &record.scope.as_str(),
                    &i16::from(record.purpose as u8),
                    &i16::from(record.state as u8),
                    &record.wrapped.kek.id,
                    &i64::from(record.wrapped.kek.version),
                    &record.to_bytes(),
                ],
            )
            .await
            .map_err(db)?;
        if n == 0 {
            return Err(KeyStoreError::Duplicate(record.id));
        }
        Ok(())
    }

    async fn fetch(&self, id: KeyId) -> Result<Option<WrappedDek>, KeyStoreError> {
        let c = self.conn().await?;
        let row = c
            .query_opt(
                "SELECT record FROM panseal_keys WHERE id = $1",
                &[&id.as_bytes().as_slice()],
            )
            .await
            .map_err(db)?;
        row.map(|r| decode_row(r.get(0))).transpose()
    }

    async fn list(&self, scope: Option<&Scope>) -> Result<Vec<WrappedDek>, KeyStoreError> {
        let c = self.conn().await?;
        let rows = match scope {
            Some(s) => c
                .query(
                    "SELECT record FROM panseal_keys WHERE scope = $1 ORDER BY id",
                    &[&s.as_str()],
                )
                .await
                .map_err(db)?,
            None => c
                .query("SELECT record FROM panseal_keys ORDER BY id", &[])
                .await
                .map_err(db)?,
        };
        rows.into_iter().map(|r| decode_row(r.get(0))).collect()
    }

    async fn update(&self, previous: &WrappedDek, next: &WrappedDek) -> Result<(), KeyStoreError> {
        if previous.id != next.id {
            return Err(KeyStoreError::Backend(
                "an update must keep the record's id".into(),
            ));
        }
        let c = self.conn().await?;
        // One statement: the row changes only if it still holds exactly
        // `previous` (compare-and-swap; no lock held across round trips).
        let n = c
            .execute(
                "UPDATE panseal_keys SET state = $2, kek_id = $3, kek_version = $4, record = $5,
                     updated_at = now() WHERE id = $1 AND record = $6",
                &[
                    &next.id.as_bytes().as_slice(),
                    &i16::from(next.state as u8),
                    &next.wrapped.kek.id,
                    &i64::from(next.wrapped.kek.version),
                    &next.to_bytes(),
                    &previous.to_bytes(),
                ],
            )
            .await
            .map_err(db)?;
        if n == 1 {
            return Ok(());
        }
        match self.fetch(next.id).await? {
            None => Err(KeyStoreError::NotFound(next.id)),
            Some(_) => Err(KeyStoreError::Conflict),
        }
    }
}
