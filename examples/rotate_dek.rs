//! `rotate_dek` — retire every active DEK of a scope now: they become
//! decrypt-only, and every application instance makes a fresh DEK at its
//! next seal (within its re-check interval, 60 s by default).
//!
//! ```text
//! cargo run --features postgres --example rotate_dek -- --config panseal.json [--scope m] [--dry-run] [--yes]
//! ```

#[path = "common/tool.rs"]
#[allow(dead_code)]
mod tool;

use std::process::ExitCode;

use clap::Parser;
use panseal::{KeyPurpose, KeyState, KeyStore, Scope};

#[derive(Parser)]
#[command(about = "Retire the active DEKs of a scope (new seals use fresh DEKs)")]
struct Args {
    /// Client configuration (JSON) naming the PostgreSQL key store.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Scope (default: the configuration's).
    #[arg(long)]
    scope: Option<String>,
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
            eprintln!("rotate_dek: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (config, store) = tool::load(&args.config)?;
    let scope = Scope::new(args.scope.as_deref().unwrap_or(&config.scope))?;
    let active: Vec<_> = store
        .list(Some(&scope))
        .await?
        .into_iter()
        .filter(|r| r.purpose == KeyPurpose::Data && r.state == KeyState::Active)
        .collect();
    println!(
        "scope {scope}: {} active DEK(s) to retire (decrypt-only)",
        active.len()
    );
    for r in &active {
        println!(
            "  {}  created {}  uses {}/{}",
            r.id,
            tool::date(r.created_at),
            r.uses,
            r.max_uses
        );
    }
    if args.dry_run || active.is_empty() {
        println!(
            "{}",
            if args.dry_run {
                "dry run: nothing changed"
            } else {
                "nothing to do"
            }
        );
        return Ok(());
    }
    tool::confirm(args.yes, &format!("retire {} DEK(s)", active.len()))?;
    for r in &active {
        store.set_state(r.id, KeyState::DecryptOnly).await?;
    }
    println!(
        "retired {} DEK(s); run `reencrypt` to move their data to fresh DEKs",
        active.len()
    );
    Ok(())
}
