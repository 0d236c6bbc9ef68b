//! `destroy` — crypto-shred a DEK (or index-key version): its wrapped key is
//! erased from the key store and nothing sealed under it can be opened again
//! (PCI DSS 3.2.1 retention, 3.7.5 retirement).
//!
//! Dual control is enforced by `panseal-keyd`, not by this tool (PCI DSS
//! 3.7.6): each run records one approval of the authenticated custodian
//! whose keyd credential `--keyd-config` names. With two distinct
//! custodians' unexpired approvals keyd records the DEK as destroyed and
//! never unwraps, rewraps or wraps it again, whatever the database says;
//! only then does the tool erase the wrapped key from the store. A DEK that
//! stored fields still reference needs `--force` (their data is lost).
//!
//! ```text
//! # first custodian, then a second one, each with their own credential
//! cargo run --features postgres,keyd-client --example destroy -- --config panseal.json \
//!     --keyd-config alice.json --key 0123456789abcdef [--force] [--dry-run] [--yes]
//! ```

#[path = "common/tool.rs"]
#[allow(dead_code)]
mod tool;

use std::process::ExitCode;

use clap::Parser;
use panseal::config::{ClientConfig, KeyServiceConfig};
use panseal::keyd::Permission;
use panseal::{Environment, KeyId, KeyRequest, KeyState, KeyStore};

#[derive(Parser)]
#[command(about = "Crypto-shred a key once nothing references it")]
struct Args {
    /// Client configuration (JSON) naming the PostgreSQL key store and audit sink.
    #[arg(long)]
    config: std::path::PathBuf,
    /// The key to destroy (16 hex digits).
    #[arg(long)]
    key: String,
    /// This custodian's keyd credential (client configuration JSON).
    #[arg(long)]
    keyd_config: std::path::PathBuf,
    /// Destroy although stored fields still reference the key (their data is lost).
    #[arg(long)]
    force: bool,
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
    if refs > 0 && !args.force {
        return Err(format!(
            "{refs} field(s) still use this key: re-encrypt them first, or --force (their data is lost)"
        )
        .into());
    }
    if !matches!(config.key_service, KeyServiceConfig::Keyd { .. }) {
        return Err(
            "dual control: destroying a DEK needs two custodians' approvals recorded by \
                    panseal-keyd, and this configuration's key service is not keyd"
                .into(),
        );
    }
    // The custodian is whoever keyd authenticates, not a name typed here.
    let keyd = ClientConfig::from_file(&args.keyd_config)?.keyd_client()?;
    let me = keyd.status().await?;
    if !me.permissions.contains(&Permission::Custodian) {
        return Err(format!("{} is not a custodian in keyd", me.principal).into());
    }
    if args.dry_run {
        println!(
            "dry run: nothing changed (approval would be recorded for {})",
            me.principal
        );
        return Ok(());
    }
    tool::confirm(
        args.yes,
        &format!(
            "approve, as {}, destroying key {id}; data under it becomes unrecoverable",
            me.principal
        ),
    )?;
    let request = KeyRequest {
        id,
        scope: record.scope.clone(),
        environment: Environment::new(&config.environment)?,
        purpose: record.purpose,
    };
    let answer = keyd.approve_dek_destroy(&request).await?;
    if !answer.destroyed {
        println!(
            "approval of {} recorded in keyd ({} of {}{}); a second, different custodian runs the same command",
            me.principal,
            answer.approvals.len(),
            answer.required,
            answer
                .expires_at
                .map(|t| format!(", expires {}", tool::date(t)))
                .unwrap_or_default()
        );
        return Ok(());
    }
    // keyd refuses the key from now on; erase its wrap from the store too
    // (through the library, so it is audited), signed by keyd for this
    // custodian: a destruction is a custodian's record change.
    let panseal = config
        .builder()?
        .key_service(keyd)
        .scope(record.scope.as_str())
        .build()
        .await?;
    let approvers = answer.approvals.join(" and ");
    let access = panseal::Access::new(
        &me.principal,
        &format!("destroy (approved in keyd by {approvers})"),
    )?;
    panseal
        .set_key_state_as(id, KeyState::Destroyed, &access)
        .await?;
    println!("key {id} destroyed: approved in keyd by {approvers}");
    Ok(())
}
