//! `key_ceremony` — the custodians' ceremony for `panseal-keyd`'s master key
//! (PCI DSS 3.7.6 split knowledge and dual control, 3.7.8 acknowledgement).
//!
//! ```text
//! # once (operator): generate the master key, split it k-of-n; keyd waits
//! # until every custodian has collected their own share over mutual TLS
//! cargo run --features keyd-client --example key_ceremony -- init \
//!     --keyd-bin target/debug/panseal-keyd --keyd-config keyd.toml \
//!     --threshold 2 --custodian alice --custodian bob --custodian carol
//!
//! # each custodian, on their own machine, with their own credential
//! cargo run --features keyd-client --example key_ceremony -- collect \
//!     --config alice.json --share-file ~/alice.share --acknowledge
//!
//! # at every start of keyd: each custodian, with their own credential and share
//! cargo run --features keyd-client --example key_ceremony -- unseal \
//!     --config alice.json --share-file ~/alice.share --acknowledge [--expect-generation N]
//!
//! # a custodian leaves: k current custodians vote, then the new ones collect
//! cargo run --features keyd-client --example key_ceremony -- reshare \
//!     --config alice.json --share-file ~/alice.share --threshold 2 \
//!     --custodian alice --custodian carol --custodian dave
//!
//! cargo run --features keyd-client --example key_ceremony -- status --config alice.json
//!
//! # once unsealed: a custodian creates a scope's blind-index key inside keyd
//! # (the first, or the next version at a rotation); it never leaves keyd
//! cargo run --features keyd-client --example key_ceremony -- index-key \
//!     --config alice.json --scope merchant-42
//! ```
//!
//! No one but its custodian ever holds a share: `init` writes none, keyd
//! hands each out once to the authenticated custodian it belongs to. Shares
//! are read from and written to files only the custodian can read, and never
//! printed; the statement a custodian acknowledges is shown and must be
//! confirmed.

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};
use panseal::config::ClientConfig;
use panseal::keyd::ShareText;

const STATEMENT: &str = "I acknowledge my responsibilities as a key custodian (PCI DSS 3.7.8).";

#[derive(Parser)]
#[command(about = "Master-key ceremony for panseal-keyd: init, collect, unseal, reshare, status")]
struct Args {
    #[command(subcommand)]
    step: Step,
}

#[derive(Subcommand)]
enum Step {
    /// Generate the master key; wait until each custodian collected their share.
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
        /// Custodians (n); each collects one share.
        #[arg(long = "custodian", required = true)]
        custodians: Vec<String>,
        /// Where keyd listens for the collection (default: its `listen`).
        #[arg(long)]
        listen: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Collect this custodian's own share (after `init` or a re-share).
    Collect {
        /// This custodian's client configuration (keyd credential).
        #[arg(long)]
        config: std::path::PathBuf,
        /// A new file for the share (owner read/write only).
        #[arg(long)]
        share_file: std::path::PathBuf,
        /// Acknowledge the custodian statement with the share.
        #[arg(long)]
        acknowledge: bool,
    },
    /// Vote, with this custodian's current share, for new shares.
    Reshare {
        /// This custodian's client configuration (keyd credential).
        #[arg(long)]
        config: std::path::PathBuf,
        /// This custodian's current share file.
        #[arg(long)]
        share_file: std::path::PathBuf,
        /// New threshold.
        #[arg(long)]
        threshold: u8,
        /// New custodians.
        #[arg(long = "custodian", required = true)]
        custodians: Vec<String>,
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
        /// The state generation this custodian noted: refuse to unseal a
        /// server whose state is at another (rolled back).
        #[arg(long)]
        expect_generation: Option<u64>,
    },
    /// Create a scope's next blind-index key version inside keyd (the
    /// previous active version becomes lookup-only). Needs `custodian`.
    IndexKey {
        /// This custodian's client configuration (keyd credential).
        #[arg(long)]
        config: std::path::PathBuf,
        /// The scope.
        #[arg(long)]
        scope: String,
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
            listen,
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
                "init: a new master key for {}, split {threshold}-of-{} among {}; each collects their own share",
                keyd_config.display(),
                custodians.len(),
                custodians.join(", "),
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
                .arg(threshold.to_string());
            if let Some(l) = &listen {
                cmd.args(["--listen", l]);
            }
            for c in &custodians {
                cmd.args(["--custodian", c]);
            }
            // keyd prints where it waits, then returns once every share is collected.
            let out = cmd
                .stdin(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("cannot run {keyd_bin}: {e}"))?;
            if !out.success() {
                return Err("init failed (see above); nothing was written".into());
            }
            println!("done: every custodian holds their own share; nobody else ever saw one");
            Ok(())
        }
        Step::Collect {
            config,
            share_file,
            acknowledge,
        } => {
            let client = ClientConfig::from_file(&config)?.keyd_client()?;
            let statement = acknowledge.then_some(STATEMENT);
            if acknowledge {
                println!("acknowledging: {STATEMENT}");
            }
            let r = client.collect_share(statement).await?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&share_file)?;
            std::io::Write::write_all(&mut f, r.share.expose_secret().as_bytes())?;
            std::io::Write::write_all(&mut f, b"\n")?;
            f.sync_all()?;
            println!(
                "share written to {} (keep it secret and apart from the others); still to collect: {}",
                share_file.display(),
                if r.awaiting_collection.is_empty() {
                    "nobody".to_owned()
                } else {
                    r.awaiting_collection.join(", ")
                }
            );
            Ok(())
        }
        Step::Reshare {
            config,
            share_file,
            threshold,
            custodians,
        } => {
            let client = ClientConfig::from_file(&config)?.keyd_client()?;
            let share = ShareText::new(std::fs::read_to_string(&share_file)?.trim().to_owned());
            let r = client.reshare(threshold, &custodians, share).await?;
            if r.awaiting_collection.is_empty() {
                println!(
                    "vote recorded: {} of {} ({})",
                    r.submitted.len(),
                    r.threshold,
                    r.submitted.join(", ")
                );
            } else {
                println!(
                    "new shares ready: {} must each run `collect`; old shares stop working once all have",
                    r.awaiting_collection.join(", ")
                );
            }
            Ok(())
        }
        Step::Unseal {
            config,
            share_file,
            acknowledge,
            expect_generation,
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
            let status = client.unseal_expecting(share, expect_generation).await?;
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
        Step::IndexKey { config, scope } => {
            use panseal::KeyService;
            let client = ClientConfig::from_file(&config)?.keyd_client()?;
            let scope = panseal::Scope::new(&scope)?;
            let created = client.create_index_key(&scope).await?;
            println!(
                "index key {} version {} created inside keyd (active); the key never leaves it",
                scope, created.version
            );
            for k in client.index_keys(&scope).await? {
                println!("  version {}: {:?}", k.version, k.state);
            }
            Ok(())
        }
        Step::Status { config } => {
            let client = ClientConfig::from_file(&config)?.keyd_client()?;
            let s = client.status().await?;
            println!(
                "keyd is {}; {} of {} shares submitted ({}); state generation {}; you are {} (acknowledged: {})",
                if s.sealed { "sealed" } else { "unsealed" },
                s.submitted.len(),
                s.threshold,
                s.submitted.join(", "),
                s.state_generation,
                s.principal,
                s.acknowledged
            );
            Ok(())
        }
    }
}
