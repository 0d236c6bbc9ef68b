//! `reencrypt` — re-seal every PAN in a table column that is still under a
//! retired or compromised DEK with the active DEK. Batched, resumable after
//! a crash or kill at any point (checkpoint committed with each batch),
//! idempotent, and safe to run while the application writes.
//!
//! Fields under a compromised DEK open only here (each re-sealed at once,
//! each open audited under `--principal`); `open_pan` refuses them.
//!
//! ```text
//! cargo run --features postgres --example reencrypt -- \
//!     --config panseal.json --table cards --id-column id --column pan \
//!     --principal custodian-alice [--dry-run] [--yes]
//! ```
//!
//! The configuration (see `panseal::config`) must name a PostgreSQL key
//! store in the same database as the table.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use panseal::config::{ClientConfig, KeyStoreConfig};
use panseal::reencrypt::{ReencryptJob, SealedForm};
use panseal::{Access, KeyId, PostgresKeyStore};

#[derive(Clone, Copy, ValueEnum)]
enum Form {
    Text,
    Binary,
}

#[derive(Parser)]
#[command(about = "Re-seal PANs under retired or compromised DEKs with the active DEK")]
struct Args {
    /// Client configuration (JSON) naming key service, PostgreSQL key store and audit sink.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Table holding the sealed PANs.
    #[arg(long)]
    table: String,
    /// Its integer primary-key column.
    #[arg(long, default_value = "id")]
    id_column: String,
    /// Column holding sealed PANs.
    #[arg(long)]
    column: String,
    /// Storage form of the column.
    #[arg(long, value_enum, default_value = "text")]
    form: Form,
    /// Table name used in the sealing context (default: --table).
    #[arg(long)]
    context_table: Option<String>,
    /// Column name used in the sealing context (default: --column).
    #[arg(long)]
    context_column: Option<String>,
    /// Rows per transaction.
    #[arg(long, default_value_t = 500)]
    batch: i64,
    /// Only fields under this DEK (16 hex digits); default: every non-active DEK.
    #[arg(long)]
    key: Option<String>,
    /// Job name for the checkpoint (default: table.column).
    #[arg(long)]
    job: Option<String>,
    /// Who runs the job (recorded in the audit log of every open).
    #[arg(long)]
    principal: String,
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
            eprintln!("reencrypt: {e}");
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
    let job = ReencryptJob {
        name: args
            .job
            .clone()
            .unwrap_or_else(|| format!("{}.{}", args.table, args.column)),
        table: args.table.clone(),
        id_column: args.id_column.clone(),
        sealed_column: args.column.clone(),
        form: match args.form {
            Form::Text => SealedForm::Text,
            Form::Binary => SealedForm::Binary,
        },
        context_table: args.context_table.clone().unwrap_or(args.table.clone()),
        context_column: args.context_column.clone().unwrap_or(args.column.clone()),
        batch_size: args.batch,
        only_key: args.key.as_deref().map(KeyId::from_hex).transpose()?,
    };
    let access = Access::new(&args.principal, "reencrypt")?;

    let plan = job.plan(&panseal, &store).await?;
    let checkpoint = job.checkpoint(&store).await?;
    println!(
        "job {}: re-seal {}.{} fields under {} key(s) [{}] in scope {}",
        job.name,
        job.table,
        job.sealed_column,
        plan.stale_keys.len(),
        plan.stale_keys
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        panseal.scope()
    );
    if let Some(last) = checkpoint.last_id {
        println!(
            "resuming after id {last} ({} rows already re-sealed)",
            checkpoint.resealed
        );
    }
    println!(
        "{} rows to scan, {} of them under those keys; batches of {}",
        plan.remaining_rows, plan.remaining_under_stale_keys, job.batch_size
    );
    if args.dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    if plan.remaining_rows == 0 && checkpoint.last_id.is_none() {
        println!("nothing to do");
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
            &access,
            |p| bar.set_position(p.scanned - start_scanned),
            || false,
        )
        .await?;
    bar.finish_and_clear();
    println!(
        "done: {} rows scanned, {} re-sealed, {} changed by the application meanwhile (left as written)",
        done.scanned, done.resealed, done.skipped_concurrent
    );
    panseal.report_usage().await?;
    Ok(())
}
