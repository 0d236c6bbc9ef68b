//! `admit` — convert a column of ingest ciphertexts (sealed by front ends
//! and browsers with the scope's public key, `FORMAT.md` §17) into the
//! compact form and fill the blind-index column. The PANs are opened and
//! re-sealed inside the key service (`Panseal::admit`): neither a PAN nor
//! a DEK enters this process. Batched, resumable after a crash or kill at
//! any point (checkpoint committed with each batch), compare-and-set per
//! row, safe to run while the application writes. Rows holding garbage or
//! ciphertexts the key service refuses are counted and left untouched.
//!
//! ```text
//! cargo run --features postgres --example admit -- \
//!     --config panseal.json --table cards --id-column id --column pan \
//!     --index-column pan_index [--dry-run] [--yes]
//! ```
//!
//! The configuration (see `panseal::config`) must name a PostgreSQL key
//! store in the same database as the table, and a key-service credential
//! with the `admit` and `wrap` permissions.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use panseal::admit::AdmitJob;
use panseal::config::{ClientConfig, KeyStoreConfig};
use panseal::reencrypt::SealedForm;
use panseal::PostgresKeyStore;

#[derive(Clone, Copy, ValueEnum)]
enum Form {
    Text,
    Binary,
}

#[derive(Parser)]
#[command(about = "Admit ingest ciphertexts into the compact form and fill the blind index")]
struct Args {
    /// Client configuration (JSON) naming key service and PostgreSQL key store.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Table holding the sealed PANs.
    #[arg(long)]
    table: String,
    /// Its integer primary-key column.
    #[arg(long, default_value = "id")]
    id_column: String,
    /// Column holding sealed PANs (ingest form, compact after admission).
    #[arg(long)]
    column: String,
    /// Column receiving the blind index (text: 64 hex digits; binary: 32 bytes).
    #[arg(long)]
    index_column: String,
    /// Storage form of both columns.
    #[arg(long, value_enum, default_value = "text")]
    form: Form,
    /// Table name used in the sealing context (default: --table).
    #[arg(long)]
    context_table: Option<String>,
    /// Column name used in the sealing context (default: --column).
    #[arg(long)]
    context_column: Option<String>,
    /// Rows per transaction and key-service request (at most 1024).
    #[arg(long, default_value_t = 500)]
    batch: i64,
    /// Job name for the checkpoint (default: table.column).
    #[arg(long)]
    job: Option<String>,
    /// Show what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// No progress bar (for logs).
    #[arg(long)]
    quiet: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("admit: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = ClientConfig::from_file(&args.config)?;
    let KeyStoreConfig::Postgres { url, .. } = &config.key_store else {
        return Err("the configuration must name a PostgreSQL key store".into());
    };
    let store = PostgresKeyStore::new(url, 4)?;
    let panseal = config.connect().await?.build().await?;
    let job = AdmitJob {
        name: args
            .job
            .clone()
            .unwrap_or_else(|| format!("{}.{}", args.table, args.column)),
        table: args.table.clone(),
        id_column: args.id_column.clone(),
        sealed_column: args.column.clone(),
        index_column: args.index_column.clone(),
        form: match args.form {
            Form::Text => SealedForm::Text,
            Form::Binary => SealedForm::Binary,
        },
        context_table: args.context_table.clone().unwrap_or(args.table.clone()),
        context_column: args.context_column.clone().unwrap_or(args.column.clone()),
        batch_size: args.batch,
    };

    let plan = job.plan(&store).await?;
    let checkpoint = job.checkpoint(&store).await?;
    let mut keys = panseal.ingest_keys().await?;
    if keys.is_empty() {
        // An in-process development service derives its first ingest key
        // on first use (as its first index key); any other service with
        // no ingest key has nothing this job can admit.
        if panseal.ingest_sealer(None).await.is_ok() {
            keys = panseal.ingest_keys().await?;
        }
    }
    println!(
        "job {}: admit {}.{} into the compact form, index into {} (scope {}, ingest key versions [{}])",
        job.name,
        job.table,
        job.sealed_column,
        job.index_column,
        panseal.scope(),
        keys.iter()
            .map(|k| format!("v{} {:?}", k.public_key.version(), k.state))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(last) = checkpoint.last_id {
        println!(
            "resuming after id {last} ({} rows already admitted)",
            checkpoint.admitted
        );
    }
    println!(
        "{} rows to scan: {} ingest, {} already compact, {} garbage; batches of {}",
        plan.remaining_rows, plan.ingest, plan.compact, plan.garbage, job.batch_size
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
    let start_scanned = checkpoint.scanned;
    let done = job
        .run(
            &panseal,
            &store,
            |p| bar.set_position(p.scanned - start_scanned),
            || false,
        )
        .await?;
    bar.finish_and_clear();
    println!(
        "done: {} rows scanned, {} admitted, {} already compact, {} garbage, {} refused, {} changed by the application meanwhile (left as written)",
        done.scanned, done.admitted, done.already_compact, done.garbage, done.refused, done.skipped_concurrent
    );
    Ok(())
}
