//! `key_ceremony` — the custodians' ceremony for `panseal-keyd`'s master key
//! (PCI DSS 3.7.6 split knowledge and dual control, 3.7.8 acknowledgement).
//!
//! ```text
//! # once: generate the master key, split it k-of-n, one share file per custodian
//! cargo run --features keyd-client --example key_ceremony -- init \
//!     --keyd-bin target/debug/panseal-keyd --keyd-config keyd.toml \
//!     --threshold 2 --custodian alice --custodian bob --custodian carol --share-dir shares/
//!
//! # at every start of keyd: each custodian, with their own credential and share
//! cargo run --features keyd-client --example key_ceremony -- unseal \
//!     --config alice.json --share-file shares/alice.share --acknowledge
//!
//! cargo run --features keyd-client --example key_ceremony -- status --config alice.json
//! ```
//!
//! Shares are read from files and never printed; the statement a custodian
//! acknowledges is shown and must be confirmed.

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};
use panseal::config::ClientConfig;
use panseal::keyd::protocol::ShareText;

const STATEMENT: &str = "I acknowledge my responsibilities as a key custodian (PCI DSS 3.7.8).";

#[derive(Parser)]
#[command(about = "Master-key ceremony for panseal-keyd: init, unseal, status")]
struct Args {
    #[command(subcommand)]
    step: Step,
}

#[derive(Subcommand)]
enum Step {
    /// Generate the master key and write one share file per custodian.
    Init {
        /// The panseal-keyd binary.
        #[arg(long, default_value = "panseal-keyd")]
        keyd_bin: String,
        /// The server's configuration file.
        #[arg(long)]
        keyd_config: std::path::PathBuf,
        /// Shares needed to unseal (k).
        #[arg(long)]
        threshold: u32,
        /// Custodians (n); each gets one share file.
        #[arg(long = "custodian", required = true)]
        custodians: Vec<String>,
        /// Where the share files go (hand each to its custodian, then delete).
        #[arg(long)]
        share_dir: std::path::PathBuf,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Record this custodian's acknowledgement (if asked) and submit their share.
    Unseal {
        /// This custodian's client configuration (keyd credential).
        #[arg(long)]
        config: std::path::PathBuf,
        /// This custodian's share file.
        #[arg(long)]
        share_file: std::path::PathBuf,
        /// Acknowledge the custodian statement first (shown before sending).
        #[arg(long)]
        acknowledge: bool,
    },
    /// Show whether keyd is sealed and which custodians have submitted shares.
    Status {
        /// A client configuration (keyd credential).
        #[arg(long)]
        config: std::path::PathBuf,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("key_ceremony: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    match args.step {
        Step::Init {
            keyd_bin,
            keyd_config,
            threshold,
            custodians,
            share_dir,
            yes,
        } => {
            let distinct: std::collections::HashSet<_> = custodians.iter().collect();
            if distinct.len() != custodians.len() {
                return Err("each custodian must be named once".into());
            }
            if threshold < 2 || threshold as usize > custodians.len() {
                return Err("dual control needs 2 <= threshold <= number of custodians".into());
            }
            println!(
                "init: a new master key for {}, split {threshold}-of-{} among {}; share files in {}",
                keyd_config.display(),
                custodians.len(),
                custodians.join(", "),
                share_dir.display()
            );
            if !yes {
                use std::io::{BufRead, Write};
                print!("type 'yes' to proceed: ");
                std::io::stdout().flush()?;
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                if line.trim() != "yes" {
                    return Err("not confirmed; nothing changed".into());
                }
            }
            let mut cmd = Command::new(&keyd_bin);
            cmd.arg("init")
                .arg("--config")
                .arg(&keyd_config)
                .arg("--threshold")
                .arg(threshold.to_string())
                .arg("--share-dir")
                .arg(&share_dir);
            for c in &custodians {
                cmd.args(["--custodian", c]);
            }
            let out = cmd
                .output()
                .map_err(|e| format!("cannot run {keyd_bin}: {e}"))?;
            if !out.status.success() {
                return Err(
                    format!("init failed: {}", String::from_utf8_lossy(&out.stderr)).into(),
                );
            }
            println!("done: give each custodian their file only; no one else may see it");
            Ok(())
        }
        Step::Unseal {
            config,
            share_file,
            acknowledge,
        } => {
            let client = ClientConfig::from_file(&config)?.keyd_client()?;
            let me = client.status().await?;
            if !me.acknowledged {
                if !acknowledge {
                    return Err(format!(
                        "{} has no acknowledgement on record; rerun with --acknowledge to accept:\n  {STATEMENT}",
                        me.principal
                    )
                    .into());
                }
                println!("{} acknowledges: {STATEMENT}", me.principal);
                client.acknowledge(STATEMENT).await?;
            }
            let share = ShareText::new(std::fs::read_to_string(&share_file)?.trim().to_owned());
            let status = client.unseal(share).await?;
            println!(
                "share of {} accepted; {} of {} submitted ({}); keyd is {}",
                me.principal,
                status.submitted.len(),
                status.threshold,
                status.submitted.join(", "),
                if status.sealed {
                    "still sealed"
                } else {
                    "UNSEALED"
                }
            );
            Ok(())
        }
        Step::Status { config } => {
            let client = ClientConfig::from_file(&config)?.keyd_client()?;
            let s = client.status().await?;
            println!(
                "keyd is {}; {} of {} shares submitted ({}); you are {} (acknowledged: {})",
                if s.sealed { "sealed" } else { "unsealed" },
                s.submitted.len(),
                s.threshold,
                s.submitted.join(", "),
                s.principal,
                s.acknowledged
            );
            Ok(())
        }
    }
}
