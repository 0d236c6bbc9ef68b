//! `reindex` — move a table's stored blind-index column to the scope's
//! newest index-key version inside the key service (after a custodian
//! created one), and migrate legacy index values made with the old
//! in-database index keys. Batched (one keyed-hash request per batch),
//! resumable after a crash or `kill -9` at any point (checkpoint committed
//! with each batch), idempotent, and safe while the application writes.
//!
//! ```text
//! PANSEAL_PKCS11_PIN=… cargo run --features postgres,pkcs11 --example reindex -- \
//!     --config panseal.json --pkcs11-module /usr/lib/softhsm/libsofthsm2.so \
//!     --pkcs11-token payments --pkcs11-kek cards \
//!     --table cards --column pan_sealed --index-column pan_index \
//!     --version-column pan_index_version --principal custodian-alice [--dry-run] [--yes]
//! ```
//!
//! The configuration (see `panseal::config`) names the PostgreSQL key store
//! (same database as the table), the audit sink, environment and scope. The
//! key service is the PKCS#11 token given on the command line (or, built
//! with `keyd-client`, the configuration's `panseal-keyd`). The job opens
//! every PAN: it needs a bulk credential with `unwrap` and `index`.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use panseal::config::{ClientConfig, KeyStoreConfig};
use panseal::reencrypt::SealedForm;
use panseal::reindex::{IndexForm, ReindexJob};
use panseal::{
    Access, Environment, KeyService, Pkcs11Config, Pkcs11KeyService, Pkcs11Pin, PostgresKeyStore,
};

#[derive(Clone, Copy, ValueEnum)]
enum Form {
    Text,
    Binary,
}

#[derive(Clone, Copy, ValueEnum)]
enum IndexStorage {
    Hex,
    Binary,
}

#[derive(Parser)]
#[command(about = "Move stored blind-index values to the newest index-key version")]
struct Args {
    /// Client configuration (JSON) naming the PostgreSQL key store and audit sink.
    #[arg(long)]
    config: std::path::PathBuf,
    /// PKCS#11 module (the PIN comes from PANSEAL_PKCS11_PIN).
    #[arg(long)]
    pkcs11_module: Option<std::path::PathBuf>,
    /// PKCS#11 token label.
    #[arg(long)]
    pkcs11_token: Option<String>,
    /// KEK name in the token.
    #[arg(long)]
    pkcs11_kek: Option<String>,
    /// Table holding the sealed PANs and their index.
    #[arg(long)]
    table: String,
    /// Its integer primary-key column.
    #[arg(long, default_value = "id")]
    id_column: String,
    /// Column holding sealed PANs.
    #[arg(long)]
    column: String,
    /// Storage form of the sealed column.
    #[arg(long, value_enum, default_value = "text")]
    form: Form,
    /// Column holding the blind-index value.
    #[arg(long)]
    index_column: String,
    /// Storage form of the index column.
    #[arg(long, value_enum, default_value = "hex")]
    index_form: IndexStorage,
    /// Integer column holding the index-key version.
    #[arg(long)]
    version_column: String,
    /// Optional column holding the index key id (16 hex digits).
    #[arg(long)]
    key_id_column: Option<String>,
    /// Table name used in the sealing context (default: --table).
    #[arg(long)]
    context_table: Option<String>,
    /// Column name used in the sealing context (default: --column).
    #[arg(long)]
    context_column: Option<String>,
    /// Rows per transaction (and per keyed-hash request).
    #[arg(long, default_value_t = 500)]
    batch: i64,
    /// Job name for the checkpoint (default: table.index-column).
    #[arg(long)]
    job: Option<String>,
    /// Who runs the job (recorded in the audit log of every open).
    #[arg(long)]
    principal: String,
    /// Count what would be done; open and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// No progress bar; one line per committed batch (for logs).
    #[arg(long)]
    quiet: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reindex: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn key_service(
    args: &Args,
    config: &ClientConfig,
) -> Result<Arc<dyn KeyService>, Box<dyn std::error::Error>> {
    if let (Some(module), Some(token), Some(kek)) =
        (&args.pkcs11_module, &args.pkcs11_token, &args.pkcs11_kek)
    {
        let pin = std::env::var("PANSEAL_PKCS11_PIN")
            .map_err(|_| "set PANSEAL_PKCS11_PIN to the token's user PIN")?;
        let cfg = Pkcs11Config::new(module, token, kek, Environment::new(&config.environment)?);
        return Ok(Arc::new(
            Pkcs11KeyService::connect(cfg, Pkcs11Pin::new(pin)).await?,
        ));
    }
    #[cfg(feature = "keyd-client")]
    if let Ok(ks) = config.keyd_client() {
        return Ok(Arc::new(ks));
    }
    let _ = config;
    Err("name a PKCS#11 token (--pkcs11-module, --pkcs11-token, --pkcs11-kek) or a keyd key service".into())
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = ClientConfig::from_file(&args.config)?;
    let KeyStoreConfig::Postgres { url, .. } = &config.key_store else {
        return Err("the configuration must name a PostgreSQL key store".into());
    };
    let store = PostgresKeyStore::new(url, 4)?;
    let ks = key_service(&args, &config).await?;
    let panseal = config
        .builder()?
        .key_service_arc(ks.clone())
        .build()
        .await?;
    let job = ReindexJob {
        name: args
            .job
            .clone()
            .unwrap_or_else(|| format!("{}.{}", args.table, args.index_column)),
        table: args.table.clone(),
        id_column: args.id_column.clone(),
        sealed_column: args.column.clone(),
        sealed_form: match args.form {
            Form::Text => SealedForm::Text,
            Form::Binary => SealedForm::Binary,
        },
        index_column: args.index_column.clone(),
        index_form: match args.index_form {
            IndexStorage::Hex => IndexForm::Hex,
            IndexStorage::Binary => IndexForm::Binary,
        },
        version_column: args.version_column.clone(),
        key_id_column: args.key_id_column.clone(),
        context_table: args.context_table.clone().unwrap_or(args.table.clone()),
        context_column: args.context_column.clone().unwrap_or(args.column.clone()),
        batch_size: args.batch,
    };
    let access = Access::new(&args.principal, "reindex")?;

    let plan = job.plan(&panseal, &*ks, &store).await?;
    let checkpoint = job.checkpoint(&store).await?;
    println!(
        "job {}: {}.{} to index-key version {} in scope {}",
        job.name,
        job.table,
        job.index_column,
        plan.target_version,
        panseal.scope()
    );
    if plan.restarts {
        println!(
            "the checkpoint was for version {}; starting over",
            checkpoint.target_version
        );
    } else if let Some(last) = checkpoint.last_id {
        println!(
            "resuming after id {last} ({} rows already updated)",
            checkpoint.updated
        );
    }
    println!(
        "{} rows to scan, {} of them on another version; batches of {}",
        plan.remaining_rows, plan.remaining_on_other_versions, job.batch_size
    );
    if args.dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    if !args.yes {
        print!("proceed? type 'yes': ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if line.trim() != "yes" {
            return Err("not confirmed; nothing changed".into());
        }
    }
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(plan.remaining_rows)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} rows  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start_scanned = if plan.restarts { 0 } else { checkpoint.scanned };
    let quiet = args.quiet;
    let done = job
        .run(
            &panseal,
            ks,
            &store,
            &access,
            |p| {
                bar.set_position(p.scanned.saturating_sub(start_scanned));
                if quiet && !p.finished {
                    println!(
                        "committed through id {} ({} scanned, {} updated)",
                        p.last_id.unwrap_or_default(),
                        p.scanned,
                        p.updated
                    );
                }
            },
            || false,
        )
        .await?;
    bar.finish_and_clear();
    println!(
        "done: {} rows scanned, {} updated to v{}, {} already current, {} changed by the application meanwhile (left as written)",
        done.scanned, done.updated, done.target_version, done.unchanged, done.skipped_concurrent
    );
    Ok(())
}
