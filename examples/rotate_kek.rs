//! `rotate_kek` — rotate a scope's KEK in `panseal-keyd`, then rewrap every
//! stored DEK and index-key record to the new version. The DEKs never leave
//! the key service (keyd's rewrap unwraps and wraps inside the server), and
//! no stored PAN is touched. Rotation needs a custodian's credential;
//! rewrapping needs one with the `rewrap` permission (separation of duties:
//! two configurations). Safe to re-run: each record is replaced by
//! compare-and-set, and records already on the newest version are skipped.
//!
//! ```text
//! cargo run --features postgres,keyd-client --example rotate_kek -- \
//!     --config rewrapper.json --custodian-config alice.json [--no-rotate] [--dry-run] [--yes]
//! ```

#[path = "common/tool.rs"]
#[allow(dead_code)]
mod tool;

use std::process::ExitCode;

use clap::Parser;
use indicatif::ProgressBar;
use panseal::config::ClientConfig;
use panseal::{KeyService, KeyState, KeyStore, KeyStoreError, Scope};

#[derive(Parser)]
#[command(about = "Rotate a scope's KEK in panseal-keyd and rewrap every stored key record")]
struct Args {
    /// Configuration naming the PostgreSQL key store and a keyd credential
    /// with the `rewrap` permission.
    #[arg(long)]
    config: std::path::PathBuf,
    /// Configuration with a keyd custodian credential (for the rotation).
    #[arg(long)]
    custodian_config: Option<std::path::PathBuf>,
    /// Only rewrap records still on older versions (no new version).
    #[arg(long)]
    no_rotate: bool,
    /// Show what would be done; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rotate_kek: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (config, store) = tool::load(&args.config)?;
    let scope = Scope::new(&config.scope)?;
    let rewrapper = config.keyd_client()?;
    let custodian = match &args.custodian_config {
        Some(p) => Some(ClientConfig::from_file(p)?.keyd_client()?),
        None if args.no_rotate => None,
        None => return Err("--custodian-config is needed to rotate (or use --no-rotate)".into()),
    };
    let before = rewrapper.kek_info().await?;
    let records: Vec<_> = store
        .list(Some(&scope))
        .await?
        .into_iter()
        .filter(|r| r.state != KeyState::Destroyed)
        .collect();
    let on_current = records
        .iter()
        .filter(|r| r.wrapped.kek.version == before.version && r.wrapped.kek.id == before.id)
        .count();
    println!(
        "scope {scope}: KEK {} is at version {}; {} live key record(s), {} on it",
        before.id,
        before.version,
        records.len(),
        on_current
    );
    if args.no_rotate {
        println!(
            "plan: rewrap {} record(s) to version {}",
            records.len() - on_current,
            before.version
        );
    } else {
        println!(
            "plan: create version {}, then rewrap all {} record(s) to it",
            before.version + 1,
            records.len()
        );
    }
    if args.dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    tool::confirm(args.yes, "rotate and rewrap")?;
    let target = match &custodian {
        Some(c) if !args.no_rotate => {
            let status = c.rotate(&scope).await?;
            println!(
                "KEK {} rotated to version {}",
                status.kek_id, status.active_version
            );
            status.active_version
        }
        _ => before.version,
    };
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(records.len() as u64)
    };
    let (mut rewrapped, mut skipped) = (0u64, 0u64);
    for r in &records {
        bar.inc(1);
        if r.wrapped.kek.version == target {
            skipped += 1;
            continue;
        }
        // Read, verify, rewrap inside keyd, sign the successor, swap.
        match panseal::rewrap_record(&rewrapper, &store, r.id).await {
            Ok(new) if new.wrapped.kek.version == target => rewrapped += 1,
            // Changed meanwhile (rewrapped by another run, or destroyed).
            Ok(_) | Err(panseal::Error::KeyStore(KeyStoreError::Conflict)) => skipped += 1,
            Err(e) => return Err(e.into()),
        }
    }
    bar.finish_and_clear();
    println!(
        "rewrapped {rewrapped} record(s) to version {target}; {skipped} already there or changed meanwhile"
    );
    println!("older versions can now be retired (decrypt-only) and, after a check, destroyed under dual control");
    Ok(())
}
