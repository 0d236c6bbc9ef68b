//! `rotate_dek` — retire every active DEK of a scope now: they become
//! decrypt-only, and every application instance makes a fresh DEK at its
//! next seal (within its re-check interval, 60 s by default).
//!
//! Each retirement goes through the library (audited) under the principal
//! keyd authenticates for `--keyd-config` (a custodian's credential;
//! required when the key service is keyd), never a name typed on the
//! command line.
//!
//! ```text
//! cargo run --features postgres,keyd-client --example rotate_dek -- --config panseal.json \
//!     --keyd-config alice.json [--scope m] [--dry-run] [--yes]
//! ```

#[path = "common/tool.rs"]
#[allow(dead_code)]
mod tool;

use std::process::ExitCode;

use clap::Parser;
use panseal::config::{ClientConfig, KeyServiceConfig};
use panseal::keyd::Permission;
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
    /// This custodian's keyd credential (client configuration JSON).
    #[arg(long)]
    keyd_config: Option<std::path::PathBuf>,
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
    let principal = match (&args.keyd_config, &config.key_service) {
        (Some(path), _) => {
            let me = ClientConfig::from_file(path)?
                .keyd_client()?
                .status()
                .await?;
            if !me.permissions.contains(&Permission::Custodian) {
                return Err(format!("{} is not a custodian in keyd", me.principal).into());
            }
            me.principal
        }
        (None, KeyServiceConfig::Keyd { .. }) => {
            return Err("--keyd-config (your custodian credential) is required with keyd".into())
        }
        (None, _) => "unauthenticated-operator".to_owned(),
    };
    tool::confirm(
        args.yes,
        &format!("retire {} DEK(s) as {principal}", active.len()),
    )?;
    let panseal = config
        .connect()
        .await?
        .scope(scope.as_str())
        .build()
        .await?;
    let access = panseal::Access::new(&principal, "rotate_dek")?;
    for r in &active {
        panseal
            .set_key_state_as(r.id, KeyState::DecryptOnly, &access)
            .await?;
    }
    println!(
        "retired {} DEK(s); run `reencrypt` to move their data to fresh DEKs",
        active.len()
    );
    Ok(())
}
