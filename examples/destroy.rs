//! `destroy` — crypto-shred a DEK (or index-key version): its wrapped key is
//! erased from the key store and nothing sealed under it can be opened again
//! (PCI DSS 3.2.1 retention, 3.7.5 retirement). Allowed when the inventory
//! shows no stored field still references it; otherwise only with `--force`
//! and two distinct custodians' approvals (dual control, PCI DSS 3.7.6),
//! which are recorded in the audit log.
//!
//! ```text
//! cargo run --features postgres --example destroy -- --config panseal.json --key 0123456789abcdef \
//!     --custodian alice [--force --approved-by bob] [--dry-run] [--yes]
//! ```

#[path = "common/tool.rs"]
#[allow(dead_code)]
mod tool;

use std::process::ExitCode;

use clap::Parser;
use panseal::{KeyId, KeyState, KeyStore};

#[derive(Parser)]
#[command(about = "Crypto-shred a key once nothing references it")]
struct Args {
    /// Client configuration (JSON) naming the PostgreSQL key store and audit sink.
    #[arg(long)]
    config: std::path::PathBuf,
    /// The key to destroy (16 hex digits).
    #[arg(long)]
    key: String,
    /// The custodian running the tool.
    #[arg(long)]
    custodian: String,
    /// Destroy although stored fields still reference the key (their data is lost).
    #[arg(long)]
    force: bool,
    /// The second custodian approving a forced destruction.
    #[arg(long)]
    approved_by: Option<String>,
    /// Show what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("destroy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (config, store) = tool::load(&args.config)?;
    let id = KeyId::from_hex(&args.key)?;
    let record = store
        .fetch(id)
        .await?
        .ok_or_else(|| format!("no key {id} in the store"))?;
    if record.state == KeyState::Destroyed {
        println!("key {id} is already destroyed");
        return Ok(());
    }
    let inv = store.inventory().await?;
    let refs = inv
        .keys
        .iter()
        .find(|k| k.id == id)
        .map(|k| k.references)
        .unwrap_or(0);
    println!(
        "key {id}: {:?} {:?} in scope {}, {} stored field(s) still reference it (registered columns: {})",
        record.purpose,
        record.state,
        record.scope,
        refs,
        if inv.columns.is_empty() { "none".into() } else { inv.columns.join(", ") }
    );
    if inv.columns.is_empty() && !args.force {
        return Err(
            "no sealed-PAN columns are registered, so references cannot be counted; \
                    register them (inventory --register) or use --force with dual control"
                .into(),
        );
    }
    if refs > 0 || args.force {
        if !args.force {
            return Err(format!(
                "{refs} field(s) still use this key: re-encrypt them first, or --force with a second custodian"
            )
            .into());
        }
        match &args.approved_by {
            Some(second) if second != &args.custodian => {}
            Some(_) => {
                return Err(
                    "dual control: the approving custodian must be a different person".into(),
                )
            }
            None => return Err("dual control: --force needs --approved-by SECOND_CUSTODIAN".into()),
        }
    }
    if args.dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    tool::confirm(
        args.yes,
        &format!("destroy key {id}; data under it becomes unrecoverable"),
    )?;
    // Through the library so the destruction is audited.
    let panseal = config
        .builder()?
        .scope(record.scope.as_str())
        .build()
        .await?;
    let purpose = match &args.approved_by {
        Some(b) => format!("destroy (forced; approved by {b})"),
        None => "destroy (no references)".to_owned(),
    };
    let access = panseal::Access::new(&args.custodian, &purpose)?;
    panseal
        .set_key_state_as(id, KeyState::Destroyed, &access)
        .await?;
    println!(
        "key {id} destroyed by {}{}",
        args.custodian,
        args.approved_by
            .map(|b| format!(", approved by {b}"))
            .unwrap_or_default()
    );
    Ok(())
}
